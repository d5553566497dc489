"""Decoding stage: contrast branches (extra rows of the same forward pass) whose next-token scores are combined."""
