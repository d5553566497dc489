"""Analytic prefill FLOPs of a vision-language model: vision encoder, projector and LLM.

Conventions (see docs/methods.md, "6. Benchmarks" -> "FLOPs"):

* **Prefill only.** One forward pass over the prompt (image tokens + text), plus the LM head on the
  positions whose logits are computed (``generate`` computes the last one only). Decode steps are not
  counted.
* **Three separate fields.** ``FlopsBreakdown.vision`` is the vision encoder (patch embedding and *every*
  encoder layer that transformers runs, including those after the feature layer; for Qwen2-VL /
  Qwen2.5-VL also the 2x2 PatchMerger), ``projector`` is the LLaVA multi-modal projector (0 for Qwen, whose
  merger is counted as vision), ``llm`` is the decoder layers plus the LM head. ``total`` is their sum.
* **FLOPs = 2 x multiply-adds** (a ``[n, k] @ [k, m]`` matmul is ``2 n k m`` FLOPs), the convention of
  ``torch.utils.flop_counter.FlopCounterMode``.
* **Attention is counted as the kernel is handed it: the full square.** ``QK^T`` and ``AV`` cost
  ``2 * 2 * n_q * n_k * heads * head_dim``; for causal LLM prefill this is the full ``n x n`` matrix, not
  the causal half (the masked half is computed and discarded by the math / masked kernels, and it is what
  FlopCounterMode's SDPA formula counts; block-skipping flash kernels with ``is_causal`` do somewhat less
  work than this figure). Grouped-query attention does not reduce these FLOPs (K/V heads are broadcast).
  Encoders that attend within blocks (Qwen: one block per image frame; Qwen2.5-VL windowed layers) are
  counted per block, as executed.
* **Not counted:** element-wise work - norms, softmax, activations, gating products, residual adds, RoPE,
  bias adds, position-embedding interpolation - and embedding lookups, as FlopCounterMode does not count
  them either. Only matmuls / convolutions are counted.

On CPU, FlopCounterMode does not know the CPU SDPA kernel (``aten._scaled_dot_product_flash_attention_for_cpu``)
and silently counts 0 FLOPs for attention; use :func:`flop_counter_mode`, which adds that kernel with the
same formula torch uses for the CUDA SDPA kernels, to measure FLOPs of a real forward on CPU.

Supported: LLaVA-style models (``LlavaConfig`` and relatives with ``vision_feature_layer``) with CLIP,
SigLIP / SigLIP2, DINOv2 (with or without registers) towers, Qwen2-VL and Qwen2.5-VL; dense decoder LLMs with
a SwiGLU FFN (Llama, Mistral, Vicuna, Qwen2, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FlopsBreakdown",
    "flop_counter_mode",
    "llm_layer_flops",
    "llm_prefill_flops",
    "prefill_flops",
    "projector_flops",
    "vision_flops",
]

_CLIP_LIKE = {"clip_vision_model", "siglip_vision_model", "siglip2_vision_model"}
_DINOV2 = {"dinov2", "dinov2_with_registers"}
_QWEN2_VL = "qwen2_vl_vision"
_QWEN2_5_VL = "qwen2_5_vl_vision"
_QWEN_VLMS = {"qwen2_vl", "qwen2_5_vl"}


@dataclass
class FlopsBreakdown:
    """Prefill FLOPs (2 x multiply-adds, plain ints) split into vision encoder, projector and LLM."""

    vision: int
    projector: int
    llm: int

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.llm

    def to_dict(self) -> dict[str, int]:
        """``{"vision", "projector", "llm", "total"}`` -> FLOPs."""
        return {"vision": self.vision, "projector": self.projector, "llm": self.llm, "total": self.total}

    def __add__(self, other: FlopsBreakdown) -> FlopsBreakdown:
        if not isinstance(other, FlopsBreakdown):
            return NotImplemented
        return FlopsBreakdown(self.vision + other.vision, self.projector + other.projector, self.llm + other.llm)


# ----------------------------------------------------------------------------------------------- helpers


def _text_config(config: Any) -> Any:
    """The decoder's config: ``config.text_config`` for a VLM config, else ``config`` itself."""
    sub = getattr(config, "text_config", None)
    return sub if sub is not None else config


def _prod(x: int | Sequence[int]) -> int:
    if isinstance(x, int):
        return x
    out = 1
    for v in x:
        out *= int(v)
    return out


def _side(x: int | Sequence[int]) -> int:
    """patch_size may be an int or a (h, w) pair; windows only make sense for square patches."""
    if isinstance(x, int):
        return x
    vals = {int(v) for v in x}
    if len(vals) != 1:
        raise ValueError(f"non-square patch_size {x!r} is not supported")
    return vals.pop()


def _attention_core(n_q: int, n_k: int, width: int) -> int:
    """QK^T plus AV for n_q queries over n_k keys; width = heads * head_dim. 4 n_q n_k width FLOPs."""
    return 4 * n_q * n_k * width


def _vit_mha_layer(n: int, dim: int, mlp_flops_per_token: int, attention_blocks: Sequence[int] | None = None) -> int:
    """One pre-norm ViT block on n tokens of width dim: q, k, v, out projections (8 n dim^2), attention
    (full square over each block of ``attention_blocks``, default one block of n) and the MLP."""
    blocks = [n] if attention_blocks is None else attention_blocks
    return 8 * n * dim * dim + sum(_attention_core(b, b, dim) for b in blocks) + n * mlp_flops_per_token


def _split_image_tokens(items: Sequence[Any]) -> list[tuple[int, tuple[int, int, int] | None]]:
    """Normalise entries of ``image_tokens`` to (sequence length, (t, h, w) or None)."""
    out: list[tuple[int, tuple[int, int, int] | None]] = []
    for item in items:
        if hasattr(item, "tolist"):  # tensor / numpy row of image_grid_thw or a 0-d tensor
            item = item.tolist()
        if isinstance(item, (list, tuple)):
            if len(item) != 3:
                raise ValueError(f"image_tokens entry {item!r}: expected an int or a (t, h, w) triple")
            t, h, w = (int(v) for v in item)
            out.append((t * h * w, (t, h, w)))
        else:
            out.append((int(item), None))
    return out


# ------------------------------------------------------------------------------------------------- LLM


def llm_layer_flops(text_config: Any, n: int, key_only: int = 0) -> int:
    """FLOPs of one dense decoder layer (self-attention + SwiGLU FFN) run on ``n`` tokens in prefill.

    ``key_only`` further tokens contribute keys and values only (the SAISA layer's visual rows): their k / v
    projections are counted and the ``n`` queries attend ``n + key_only`` keys; they have no query, output
    projection or FFN.

    With hidden size ``d``, query heads ``h``, key/value heads ``h_kv``, ``head_dim`` (``config.head_dim`` if
    set, else ``d // h``) and FFN width ``m`` (``intermediate_size``)::

        q, o projections   2 n (d * h*head_dim) * 2
        k, v projections   2 n (d * h_kv*head_dim) * 2      # = 2n(2d^2 + 2 d d_kv) when h*head_dim = d
        QK^T and AV        4 n^2 * h*head_dim               # FULL n x n square, see below
        SwiGLU FFN         6 n d m                          # gate, up, down

    The attention term is the causal prefill counted as the SDPA kernel is handed it: the full ``n x n``
    score matrix, NOT the causal half ``2 n^2 h head_dim`` (the math / masked kernels compute the masked half
    and discard it, and FlopCounterMode's SDPA formula counts it; flash kernels called with ``is_causal`` may
    skip fully masked blocks, so their real work is somewhat lower). GQA does not shrink it (K/V heads are
    broadcast).
    Norms, RoPE, softmax, SiLU and bias adds are not counted. A ``VLM`` config is accepted too (its
    ``text_config`` is used).
    """
    cfg = _text_config(text_config)
    n, key_only = int(n), int(key_only)
    if n <= 0:
        return 0
    d = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    m = int(cfg.intermediate_size)
    q_width, kv_width = heads * int(head_dim), kv_heads * int(head_dim)
    projections = 2 * n * (2 * d * q_width + 2 * d * kv_width) + 2 * key_only * 2 * d * kv_width
    attention = _attention_core(n, n + key_only, q_width)
    ffn = 6 * n * d * m
    return projections + attention + ffn


def llm_prefill_flops(text_config: Any, tokens_per_layer: int | Sequence[int], logits_tokens: int = 1,
                      key_only_tokens: int = 0) -> int:
    """FLOPs of the LLM prefill: all decoder layers plus the LM head.

    Args:
        text_config: the decoder config (``LlamaConfig``, ``Qwen2VLTextConfig``, ...) or a VLM config.
        tokens_per_layer: sequence length seen by each decoder layer. An int means the same length in every
            layer; a sequence must have ``num_hidden_layers`` entries (for methods that drop tokens inside the
            LLM: entry ``l`` is the number of tokens layer ``l`` runs on, queries = keys).
        logits_tokens: positions the LM head is applied to (1 for ``generate``: last token only).
        key_only_tokens: tokens that give keys and values only in every layer (see :func:`llm_layer_flops`).

    Returns:
        ``sum_l llm_layer_flops(n_l, key_only_tokens) + 2 * logits_tokens * d * vocab_size``.
    """
    cfg = _text_config(text_config)
    n_layers = int(cfg.num_hidden_layers)
    if isinstance(tokens_per_layer, int) or hasattr(tokens_per_layer, "__index__"):
        per_layer = [int(tokens_per_layer)] * n_layers
    else:
        per_layer = [int(n) for n in tokens_per_layer]
        if len(per_layer) != n_layers:
            raise ValueError(f"tokens_per_layer has {len(per_layer)} entries; the LLM has {n_layers} layers")
    head = 2 * int(logits_tokens) * int(cfg.hidden_size) * int(cfg.vocab_size)
    return sum(llm_layer_flops(cfg, n, key_only_tokens) for n in per_layer) + head


# ---------------------------------------------------------------------------------------------- vision


def _layer_terms(depth: int, n: int, per_block: Sequence[int] | None, layer_fn) -> int:
    """Encoder layers: `depth` layers of n tokens, or one layer per entry of `per_block` (blocks that ran)."""
    return depth * layer_fn(n) if per_block is None else sum(layer_fn(m) for m in per_block)


def _clip_like_flops(vc: Any, seqs: list[int], layer_tokens: Sequence[Sequence[int]] | None = None) -> int:
    """CLIP / SigLIP / SigLIP2 towers: conv (or linear) patch embedding, ViT layers with a 2-matrix MLP,
    and, for SigLIP with ``vision_use_head``, the attention-pooling head (one probe query)."""
    dim, inter, depth = int(vc.hidden_size), int(vc.intermediate_size), int(vc.num_hidden_layers)
    channels, patch = int(getattr(vc, "num_channels", 3)), _side(vc.patch_size)
    has_cls = vc.model_type == "clip_vision_model"
    siglip_head = vc.model_type != "clip_vision_model" and bool(getattr(vc, "vision_use_head", True))
    total = 0
    for i, n in enumerate(seqs):
        patches = n - int(has_cls)
        total += 2 * patches * channels * patch * patch * dim
        per_block = None if layer_tokens is None else layer_tokens[i]
        total += _layer_terms(depth, n, per_block, lambda m: _vit_mha_layer(m, dim, 4 * dim * inter))
        if siglip_head:
            # nn.MultiheadAttention(probe, x, x): q and out on 1 token, fused k/v on n, scores 1 x n, MLP on 1.
            total += 2 * dim * dim + 2 * n * dim * 2 * dim + _attention_core(1, n, dim) + 2 * dim * dim
            total += 4 * dim * inter
    return total


def _dinov2_flops(vc: Any, seqs: list[int], layer_tokens: Sequence[Sequence[int]] | None = None) -> int:
    """DINOv2 (optionally with registers): conv patch embedding, ViT layers; MLP width
    ``int(hidden * mlp_ratio)``, or SwiGLU (3 matrices, width 2/3 of that rounded up to a multiple of 8)."""
    dim, depth = int(vc.hidden_size), int(vc.num_hidden_layers)
    channels, patch = int(getattr(vc, "num_channels", 3)), int(_side(vc.patch_size))
    hidden = int(dim * vc.mlp_ratio)
    if getattr(vc, "use_swiglu_ffn", False):
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        mlp = 6 * dim * hidden
    else:
        mlp = 4 * dim * hidden
    prefix = 1 + int(getattr(vc, "num_register_tokens", 0) if vc.model_type == "dinov2_with_registers" else 0)
    total = 0
    for i, n in enumerate(seqs):
        total += 2 * (n - prefix) * channels * patch * patch * dim
        per_block = None if layer_tokens is None else layer_tokens[i]
        total += _layer_terms(depth, n, per_block, lambda m: _vit_mha_layer(m, dim, mlp))
    return total


def _qwen_window_blocks(vc: Any, grid: tuple[int, int, int]) -> list[int]:
    """Token counts of the attention windows of Qwen2.5-VL's windowed layers for one (t, h, w) grid:
    windows of ``window_size // merge // patch`` merged units per side, per frame, edges cut."""
    t, h, w = grid
    merge = int(vc.spatial_merge_size)
    win = int(vc.window_size) // merge // _side(vc.patch_size)

    def chunks(length: int) -> list[int]:
        return [win] * (length // win) + ([length % win] if length % win else [])

    rows, cols = chunks(h // merge), chunks(w // merge)
    return [r * c * merge * merge for _ in range(t) for r in rows for c in cols]


def _qwen_flops(vc: Any, items: list[tuple[int, tuple[int, int, int] | None]],
                layer_tokens: Sequence[Sequence[int]] | None = None) -> int:
    """Qwen2-VL / Qwen2.5-VL vision: Conv3d patch embedding, ViT blocks with attention per frame (Qwen2.5:
    per window in the non-``fullatt_block_indexes`` layers), MLP (Qwen2-VL: 2 matrices of width
    ``embed_dim * mlp_ratio``; Qwen2.5-VL: gated, 3 matrices of ``intermediate_size``), PatchMerger."""
    is_25 = vc.model_type == _QWEN2_5_VL
    dim = int(vc.hidden_size if is_25 else vc.embed_dim)
    out_dim = int(vc.out_hidden_size if is_25 else vc.hidden_size)
    mlp = 6 * dim * int(vc.intermediate_size) if is_25 else 4 * dim * int(dim * vc.mlp_ratio)
    depth = int(vc.depth)
    full_layers = {int(i) for i in getattr(vc, "fullatt_block_indexes", ())} if is_25 else set(range(depth))
    channels, patch, tps = int(vc.in_channels), _side(vc.patch_size), _prod(vc.temporal_patch_size)
    merge_unit = int(vc.spatial_merge_size) ** 2
    merged_width = dim * merge_unit
    total = 0
    for i, (n, grid) in enumerate(items):
        frames = [n] if grid is None else [grid[1] * grid[2]] * grid[0]
        windows = frames if (grid is None or not is_25) else _qwen_window_blocks(vc, grid)
        total += 2 * n * channels * tps * patch * patch * dim
        # tokens entering each block, then the merger's input (what the last block kept)
        per_block = [n] * (depth + 1) if layer_tokens is None else [int(m) for m in layer_tokens[i]]
        if len(per_block) != depth + 1:
            raise ValueError(f"layer_tokens[{i}] has {len(per_block)} entries; the Qwen tower needs {depth + 1} "
                             "(tokens entering each block, then the merger's input)")
        for layer, m in enumerate(per_block[:-1]):
            # pruned inside the encoder (FlowCut): kept patches assumed spread over frames / windows in proportion
            # to their sizes (exact for full-attention blocks of one frame, an estimate for windows)
            blocks = [b * m // n for b in (frames if layer in full_layers else windows)]
            total += _vit_mha_layer(m, dim, mlp, blocks)
        total += 2 * (per_block[-1] // merge_unit) * (merged_width * merged_width + merged_width * out_dim)
    return total


def vision_flops(config: Any, image_tokens: Sequence[Any],
                 layer_tokens: Sequence[Sequence[int]] | None = None) -> int:
    """FLOPs of the vision encoder (all layers; Qwen: including the PatchMerger) for the given images.

    Args:
        config: the full VLM config (``LlavaConfig``, ``Qwen2VLConfig``, ``Qwen2_5_VLConfig``, ...). The tower
            is identified by ``config.vision_config.model_type``: ``clip_vision_model``,
            ``siglip_vision_model``, ``siglip2_vision_model``, ``dinov2``, ``dinov2_with_registers``,
            ``qwen2_vl_vision``, ``qwen2_5_vl_vision``.
        image_tokens: one entry per image, the encoder sequence length: LLaVA towers: patches + prefix tokens
            (CLS for CLIP / DINOv2, CLS + registers for DINOv2-with-registers, none for SigLIP); Qwen: ``t*h*w``
            patches before the 2x2 merge. For Qwen an entry may also be the ``(t, h, w)`` patch grid (a row of
            ``image_grid_thw``): attention is then counted per frame, and for Qwen2.5-VL the windowed layers
            exactly per window. A plain int is one frame with full attention in every layer, which
            over-counts the attention of Qwen2.5-VL's windowed layers (and of multi-frame videos).

        layer_tokens: optional, per image the sequence length entering each encoder block that ran, for strategies
            that prune inside the encoder (FlowCut): LLaVA towers stop at the feature block; Qwen runs every block
            (patches, 4 per merge group; one more entry, the merger's input = patches left after the last block; the attention
            of windowed blocks assumes the kept patches spread over the windows in proportion to their sizes).
            Without it every block runs on the full sequence.

    Returns:
        FLOPs (int): patch embedding (conv as a matmul, ``2 * patches * in_ch * p * p [* temporal_patch] * D``)
        + every encoder layer (``8 n D^2`` projections, ``4 n^2 D`` attention as a full square per attention
        block, MLP) + Qwen merger (``2 (n/4)(4C * 4C + 4C * d)``). Element-wise ops are not counted.
    """
    vc = config.vision_config
    kind = vc.model_type
    items = _split_image_tokens(image_tokens)
    if layer_tokens is not None and len(layer_tokens) != len(items):
        raise ValueError(f"layer_tokens has {len(layer_tokens)} entries for {len(items)} images")
    if kind in _CLIP_LIKE:
        return _clip_like_flops(vc, [n for n, _ in items], layer_tokens)
    if kind in _DINOV2:
        return _dinov2_flops(vc, [n for n, _ in items], layer_tokens)
    if kind in (_QWEN2_VL, _QWEN2_5_VL):
        return _qwen_flops(vc, items, layer_tokens)
    if layer_tokens is not None:
        raise NotImplementedError(f"per-block vision tokens are not supported for {kind!r}")
    raise NotImplementedError(f"vision FLOPs: unsupported vision tower model_type {kind!r}")


def projector_flops(config: Any, tokens: int) -> int:
    """FLOPs of the LLaVA multi-modal projector on ``tokens`` visual tokens.

    ``Linear(D_vis * n_feature_layers -> d)``, activation, ``Linear(d -> d)``:
    ``2 * tokens * (D_vis * n_feature_layers * d + d * d)``. 0 for Qwen2-VL / Qwen2.5-VL (the PatchMerger is
    part of :func:`vision_flops`).
    """
    if config.model_type in _QWEN_VLMS or config.vision_config.model_type in (_QWEN2_VL, _QWEN2_5_VL):
        return 0
    layers = getattr(config, "vision_feature_layer", None)
    if layers is None:
        raise NotImplementedError(f"projector FLOPs: unsupported VLM model_type {config.model_type!r}")
    n_layers = 1 if isinstance(layers, int) else len(layers)
    d_in = int(config.vision_config.hidden_size) * n_layers
    d = int(_text_config(config).hidden_size)
    return 2 * int(tokens) * (d_in * d + d * d)


def prefill_flops(
    config: Any,
    *,
    image_tokens: Sequence[Any],
    projected_tokens: int,
    tokens_per_layer: int | Sequence[int],
    logits_tokens: int = 1,
    vision_layer_tokens: Sequence[Sequence[int]] | None = None,
) -> FlopsBreakdown:
    """Prefill FLOPs of one sample, split into vision / projector / LLM.

    Args:
        config: the full VLM config.
        image_tokens: per image, the vision-encoder sequence length (see :func:`vision_flops`).
        projected_tokens: visual tokens that go through the LLaVA projector (ignored for Qwen).
        tokens_per_layer: LLM sequence length (text + visual tokens), an int or one entry per decoder layer.
        logits_tokens: positions the LM head is applied to (1 = last token, as in ``generate``).
        vision_layer_tokens: per image, the sequence length entering each encoder block that ran (see
            :func:`vision_flops`), for strategies that prune inside the encoder.
    """
    return FlopsBreakdown(
        vision=vision_flops(config, image_tokens, vision_layer_tokens),
        projector=projector_flops(config, projected_tokens),
        llm=llm_prefill_flops(_text_config(config), tokens_per_layer, logits_tokens),
    )


# ------------------------------------------------------------------------------------------ measuring


def _sdpa_formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T + AV of an SDPA call, (B, H_q, L, E) x (B, H_kv, S, E) x (B, H_kv, S, Ev): full square."""
    b, heads, q_len, e = query_shape
    k_len, e_v = key_shape[-2], value_shape[-1]
    return 2 * b * heads * q_len * k_len * e + 2 * b * heads * q_len * k_len * e_v


def flop_counter_mode(display: bool = False, **kwargs: Any):
    """``torch.utils.flop_counter.FlopCounterMode`` that also counts the CPU SDPA kernel.

    Stock FlopCounterMode has formulas for the CUDA SDPA kernels only; on CPU, ``F.scaled_dot_product_attention``
    dispatches to ``aten._scaled_dot_product_flash_attention_for_cpu``, which it counts as 0. This adds that op
    with the same full-square formula (``4 B H L S E``). Extra kwargs go to FlopCounterMode.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    mapping = dict(kwargs.pop("custom_mapping", None) or {})
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping.setdefault(cpu_sdpa, _sdpa_formula)
    return FlopCounterMode(display=display, custom_mapping=mapping, **kwargs)
