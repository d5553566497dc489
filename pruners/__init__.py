"""vlmeff.pruners: one module per token-reduction method; importing this package registers them."""

from vlmeff.pruners.fastervlm import FasterVLM

__all__ = ["FasterVLM"]
