"""Pre-LLM stage: strategies that reduce each image's tokens between the vision encoder and the LLM."""
