"""Token compaction kernels: turn a ragged ``keep`` mask into a dense, padded token batch.

* :func:`compact` - pure index arithmetic (cumsum + scatter, no Python loops): ``keep [B, N]`` ->
  :class:`CompactIndex` (``index`` / ``attention_mask`` / ``position_ids`` / ``lengths``).
* :func:`gather_tokens` - the data movement ``out[b, k] = x[b, index[b, k]]`` with ``-1`` = padding,
  done by a Triton kernel for CUDA tensors (when triton is importable) and by ``torch.gather`` otherwise.
  Both backends are bit-exact with ``torch.gather``.
* :func:`compact_tokens` - both steps in one call.

``backend="auto"`` uses Triton only for CUDA tensors that do not need autograd (the Triton path is not
differentiable); ``backend="torch"`` / ``"triton"`` force a path (Triton on CPU tensors needs
``TRITON_INTERPRET=1`` set before the first Triton gather). Every call validates ``index`` (one host sync).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch

from . import _torch, _triton

__all__ = ["CompactIndex", "compact", "compact_tokens", "gather_tokens", "triton_available"]

Backend = Literal["auto", "torch", "triton"]
PadSide = Literal["right", "left"]


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``triton`` can be imported (says nothing about a GPU being present)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import time
        return False
    return True


@dataclass(frozen=True)
class CompactIndex:
    """Result of :func:`compact` for a ``keep`` mask of shape ``[B, N]``; ``Kmax = lengths.max()``.

    Attributes:
        index: int64 ``[B, Kmax]`` source position of each output slot (ascending), ``-1`` in pad slots.
        attention_mask: int64 ``[B, Kmax]``, 1 for real slots, 0 for pad slots.
        position_ids: int64 ``[B, Kmax]``, ``0 .. n_b - 1`` over the real slots of row ``b``, 0 in pads.
        lengths: int64 ``[B]``, number of kept tokens ``n_b`` per row.
    """

    index: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    lengths: torch.Tensor


def _use_triton(backend: str, x: torch.Tensor) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    return x.is_cuda and not needs_grad and x.element_size() in (1, 2, 4, 8) and triton_available()


def gather_tokens(
    x: torch.Tensor, index: torch.Tensor, *, fill_value: float | int | bool = 0, backend: Backend = "auto"
) -> torch.Tensor:
    """Gather tokens per batch row: ``out[b, k] = x[b, index[b, k]]``.

    Args:
        x: ``[B, N, D]`` (or ``[B, N]``) tokens of any float / integer dtype; may be non-contiguous.
        index: integer ``[B, K]`` (converted to int64) with values in ``[-1, N)``; ``-1`` is a pad slot.
        fill_value: value written into pad slots (converted to ``x.dtype``).
        backend: ``"auto"`` (Triton for CUDA tensors without autograd, if importable), ``"torch"``,
            or ``"triton"`` (CPU tensors need ``TRITON_INTERPRET=1``; never differentiable).

    Returns:
        ``[B, K, D]`` (or ``[B, K]``) contiguous tensor of ``x.dtype`` on ``x.device``.

    Raises:
        ValueError: bad shapes / devices, or an index value ``>= N`` or ``< -1`` (named in the message).
    """
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [B, N, D] or [B, N], got shape {tuple(x.shape)}")
    if index.dim() != 2 or index.shape[0] != x.shape[0]:
        raise ValueError(f"index must be [B, K] with B={x.shape[0]}, got shape {tuple(index.shape)}")
    if index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
        raise TypeError(f"index must be an integer tensor, got {index.dtype}")
    if index.device != x.device:
        raise ValueError(f"index is on {index.device} but x is on {x.device}")
    index = index.long()
    n = x.shape[1]
    bad = (index < -1) | (index >= n)
    if bool(bad.any()):
        value = int(index[bad][0])
        raise ValueError(f"index value {value} is out of range for N={n} (use -1 for padding, else 0..N-1)")
    x3 = x.unsqueeze(-1) if x.dim() == 2 else x
    fill = torch.full((), fill_value, dtype=x.dtype, device=x.device)
    impl = _triton if _use_triton(backend, x3) else _torch
    out = impl.gather_tokens(x3, index, fill)
    return out.squeeze(-1) if x.dim() == 2 else out


def compact(keep: torch.Tensor, *, pad_side: PadSide = "right") -> CompactIndex:
    """Turn a ragged per-row ``keep`` mask into padded gather indices (no data is moved).

    Args:
        keep: bool ``[B, N]``; ``keep[b, i]`` says whether token ``i`` of row ``b`` survives.
        pad_side: ``"right"`` puts the real slots first, ``"left"`` puts the pads first (decoder-only
            generation).

    Returns:
        :class:`CompactIndex` whose tensors are ``[B, Kmax]`` (``lengths``: ``[B]``), ``Kmax`` = largest
        kept count (``0`` allowed). One host sync (to read ``Kmax``).
    """
    if keep.dtype != torch.bool or keep.dim() != 2:
        raise ValueError(f"keep must be a bool [B, N] tensor, got {keep.dtype} {tuple(keep.shape)}")
    if pad_side not in ("right", "left"):
        raise ValueError(f"pad_side must be 'right' or 'left', got {pad_side!r}")
    b, n = keep.shape
    dev = keep.device
    lengths = keep.sum(1)  # [B] int64
    kmax = int(lengths.max()) if b > 0 else 0
    offset = kmax - lengths if pad_side == "left" else torch.zeros_like(lengths)  # [B] first real slot
    # destination slot of each kept token; dropped tokens go to a scratch column `kmax`, sliced off below
    dest = torch.where(keep, keep.cumsum(1) - 1 + offset[:, None], kmax)  # [B, N]
    index = torch.full((b, kmax + 1), -1, dtype=torch.long, device=dev)
    index.scatter_(1, dest, torch.arange(n, device=dev).expand(b, n))
    pos = torch.arange(kmax, device=dev)[None, :] - offset[:, None]  # [B, Kmax]
    real = (pos >= 0) & (pos < lengths[:, None])
    return CompactIndex(
        index=index[:, :kmax].contiguous(),
        attention_mask=real.long(),
        position_ids=pos.masked_fill(~real, 0),
        lengths=lengths,
    )


def compact_tokens(
    x: torch.Tensor,
    keep: torch.Tensor,
    *,
    pad_side: PadSide = "right",
    fill_value: float | int | bool = 0,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, CompactIndex]:
    """:func:`compact` then :func:`gather_tokens`.

    Args:
        x: ``[B, N, D]`` or ``[B, N]`` tokens.
        keep: bool ``[B, N]`` mask of surviving tokens.

    Returns:
        ``(tokens, idx)`` with tokens ``[B, Kmax, D]`` (or ``[B, Kmax]``) and ``idx`` the :class:`CompactIndex`.
    """
    if tuple(x.shape[:2]) != tuple(keep.shape):
        raise ValueError(f"x {tuple(x.shape)} and keep {tuple(keep.shape)} disagree on [B, N]")
    idx = compact(keep, pad_side=pad_side)
    return gather_tokens(x, idx.index, fill_value=fill_value, backend=backend), idx
