"""Triton backend for :mod:`vlmeff.kernels`.

``triton`` is imported lazily (first kernel use), so importing this module never needs triton. The JIT
wrapper is also built lazily and cached per value of the interpreter flag, which triton (3.x) reads when a
function is decorated: ``TRITON_INTERPRET=1`` only has to be set before the first Triton gather runs.

Data movement is done on a same-width *integer view* of ``x`` (fp32 -> int32, bf16/fp16 -> int16, ...), so
the copy is bit-exact for every dtype (NaN payloads, ``-0.0``, float8) and the kernel needs no per-dtype
cases. ``x`` may be non-contiguous: its strides are passed to the kernel (no ``.contiguous()`` copy).
``index`` is made contiguous; the output is always freshly allocated and contiguous. Not differentiable.
"""

from __future__ import annotations

import os
from typing import Any

import torch

tl: Any = None  # ``triton.language``, bound by :func:`_kernel` before the kernel is jitted/run
_KERNELS: dict[bool, Any] = {}
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# fmt: off
def _gather_kernel(
    x_ptr, idx_ptr, out_ptr, fill_ptr,  # x: [B, N, D], idx: [B, K] int64, out: [B, K, D], fill: [1]
    K, D,
    stride_xb, stride_xn, stride_xd,
    stride_ib, stride_ik,
    stride_ob, stride_ok,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid = (B, cdiv(K, BLOCK_K), cdiv(D, BLOCK_D)); one program copies a [BLOCK_K, BLOCK_D] tile.
    b = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_k = offs_k < K
    mask_d = offs_d < D
    src = tl.load(idx_ptr + b * stride_ib + offs_k * stride_ik, mask=mask_k, other=-1)
    real = src >= 0
    row = tl.where(real, src, 0)
    tile = mask_k[:, None] & mask_d[None, :]
    ptrs = x_ptr + b * stride_xb + row[:, None] * stride_xn + offs_d[None, :] * stride_xd
    vals = tl.load(ptrs, mask=tile & real[:, None], other=0)
    vals = tl.where(real[:, None], vals, tl.load(fill_ptr))
    tl.store(out_ptr + b * stride_ob + offs_k[:, None] * stride_ok + offs_d[None, :], vals, mask=tile)
# fmt: on


def interpreter_enabled() -> bool:
    """Whether triton would currently build kernels for its CPU interpreter (``TRITON_INTERPRET``)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older triton: plain environment variable
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in {"1", "true", "on", "yes"}


def unavailable_reason(device: torch.device) -> str | None:
    """``None`` if the Triton gather can run on ``device``, else a human-readable reason why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install failing at import time
        return f"triton is not importable ({exc!r})"
    if device.type == "cuda" or interpreter_enabled():
        return None
    return (
        f"triton needs a CUDA tensor (got device {device.type!r}) or its CPU interpreter; set "
        "TRITON_INTERPRET=1 in the environment before the first Triton kernel is built"
    )


def _kernel() -> Any:
    global tl
    interp = interpreter_enabled()
    if interp not in _KERNELS:
        import triton
        import triton.language

        tl = triton.language
        _KERNELS[interp] = triton.jit(_gather_kernel)
    return _KERNELS[interp]


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gather_tokens(x: torch.Tensor, index: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Triton row-wise token gather; same contract as :func:`vlmeff.kernels._torch.gather_tokens`.

    Args:
        x: ``[B, N, D]`` source tokens, any dtype of 1/2/4/8 bytes, any strides.
        index: int64 ``[B, K]`` validated to lie in ``[-1, N)``; ``-1`` marks a pad slot.
        fill: 0-dim tensor of ``x.dtype`` on ``x.device``.

    Returns:
        ``[B, K, D]`` contiguous tensor, bit-identical to the torch backend.
    """
    reason = unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(reason)
    view = _INT_VIEW.get(x.element_size())
    if view is None:
        raise TypeError(f"triton gather supports 1/2/4/8-byte dtypes, got {x.dtype}")
    b, n, d = x.shape
    k = index.shape[1]
    if n == 0 or b * k * d == 0:  # nothing to read (all padding) or nothing to write
        return fill.expand(b, k, d).clone()
    out = torch.empty((b, k, d), dtype=x.dtype, device=x.device)
    xv, ov, fv = x.view(view), out.view(view), fill.reshape(1).view(view)
    idx = index.contiguous()
    block_d = min(_pow2(d), 256)
    block_k = max(1, min(_pow2(k), 4096 // block_d))
    grid = (b, _cdiv(k, block_k), _cdiv(d, block_d))
    # fmt: off
    _kernel()[grid](
        xv, idx, ov, fv, k, d,
        xv.stride(0), xv.stride(1), xv.stride(2),
        idx.stride(0), idx.stride(1),
        ov.stride(0), ov.stride(1),
        BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4,
    )
    # fmt: on
    return out
