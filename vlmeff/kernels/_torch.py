"""Pure-torch backend for :mod:`vlmeff.kernels` (any device, differentiable w.r.t. ``x``)."""

from __future__ import annotations

import torch


def gather_tokens(x: torch.Tensor, index: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Row-wise token gather with padding.

    Args:
        x: ``[B, N, D]`` source tokens (any dtype, any strides).
        index: int64 ``[B, K]``, already validated to lie in ``[-1, N)``; ``-1`` marks a pad slot.
        fill: 0-dim tensor of ``x.dtype`` on ``x.device`` written into pad slots.

    Returns:
        ``[B, K, D]`` contiguous tensor with ``out[b, k] = x[b, index[b, k]]`` (``fill`` where ``index == -1``).
    """
    b, n, d = x.shape
    k = index.shape[1]
    if n == 0:  # every slot is padding (validated by the caller); torch.gather cannot index an empty dim
        return fill.expand(b, k, d).clone()
    pad = index.lt(0).unsqueeze(-1)  # [B, K, 1]
    src = index.clamp(min=0).unsqueeze(-1).expand(b, k, d)  # [B, K, D]
    return torch.where(pad, fill, torch.gather(x, 1, src))
