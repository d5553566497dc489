"""Attention stage: strategies that change the LLM's masks, positions or pre-softmax scores (no token removal)."""
