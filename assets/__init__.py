"""Weights vlmeff trained (the reference model's projector and LoRA adapters) and their model card."""
