"""In-LLM stage: strategies that remove visual tokens after chosen decoder layers during prefill."""
