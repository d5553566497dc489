"""Vision stage: strategies that act inside the vision encoder (between its blocks)."""
