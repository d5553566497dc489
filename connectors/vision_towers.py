"""ViT towers used by LLaVA-style models: where their layers are and how to recompute one attention row.

A registry keyed by the vision config's `model_type` (no class-name checks). Each entry knows the tower's encoder
layers, whether it has a [CLS] token, and how to get the [CLS] query and all keys of one layer from that layer's
input, so that a strategy needing the [CLS] attention row recomputes exactly that row (docs/methods.md, "Shared rules":
q = q_proj(ln1(h))[:, 0] * head_dim^-0.5, k = k_proj(ln1(h)), softmax per head) instead of running the tower eagerly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ViTSpec:
    has_cls: bool
    layers: Callable[[nn.Module], nn.ModuleList]
    # (layer, layer_input [I, T, D]) -> (q_cls [I, 1, H*hd], k [I, T, H*hd], num_heads, scale)
    cls_query_keys: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor, int, float]] | None
    # (tower, pixel_values) -> [I, T, D]: the input of block 0, exactly as the tower's own forward computes it
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    # layer -> (q_proj, k_proj, v_proj, num_heads, scale): the projections whose outputs vision-stage strategies
    # score with, captured while the block runs (`capture_projections`)
    projections: Callable[[nn.Module], tuple[nn.Module, nn.Module, nn.Module, int, float]] | None = None

    @property
    def runs_layer_by_layer(self) -> bool:
        """True when vision-stage strategies can run inside this tower (explicit block loop)."""
        return self.has_cls and self.embed is not None and self.projections is not None


@contextmanager
def capture_projections(spec: ViTSpec, layer: nn.Module) -> Iterator[dict]:
    """While the block `layer` runs inside the `with`, its own q / k / v projection outputs ([I, T, H*hd], [CLS]
    first) land in the yielded dict ("q", "k", "v", plus "heads" and "scale"): a vision-stage strategy scores with
    what the block computed instead of recomputing ln1 and the k / v projections of every token (docs/benchmarks.md,
    FlowCut)."""
    q_proj, k_proj, v_proj, heads, scale = spec.projections(layer)
    captured: dict = {"heads": heads, "scale": scale}

    def keeper(name):
        def hook(module, args, output):
            captured[name] = output
        return hook

    handles = [m.register_forward_hook(keeper(n)) for n, m in (("q", q_proj), ("k", k_proj), ("v", v_proj))]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _clip_cls_query_keys(layer, hidden):
    normed = layer.layer_norm1(hidden)
    attn = layer.self_attn
    return attn.q_proj(normed[:, :1]), attn.k_proj(normed), attn.num_heads, attn.scale


def _clip_projections(layer):
    attn = layer.self_attn
    return attn.q_proj, attn.k_proj, attn.v_proj, attn.num_heads, attn.scale


def _clip_embed(tower, pixel_values):
    return tower.pre_layrnorm(tower.embeddings(pixel_values))  # CLIPVisionModel.forward: embeddings, pre-norm


def _dinov2_cls_query_keys(layer, hidden):
    normed = layer.norm1(hidden)
    attn = layer.attention
    return attn.q_proj(normed[:, :1]), attn.k_proj(normed), attn.num_attention_heads, attn.scaling


def _dinov2_projections(layer):
    attn = layer.attention
    return attn.q_proj, attn.k_proj, attn.v_proj, attn.num_attention_heads, attn.scaling


def _dinov2_embed(tower, pixel_values):
    return tower.embeddings(pixel_values)  # Dinov2Model.forward: embeddings, no pre-norm


VIT_TOWERS: dict[str, ViTSpec] = {
    "clip_vision_model": ViTSpec(True, lambda tower: tower.encoder.layers, _clip_cls_query_keys,
                                 _clip_embed, _clip_projections),
    "dinov2": ViTSpec(True, lambda tower: tower.encoder.layer, _dinov2_cls_query_keys,
                      _dinov2_embed, _dinov2_projections),
    "siglip_vision_model": ViTSpec(False, lambda tower: tower.encoder.layers, None),
}


def vit_spec(vision_config) -> ViTSpec:
    spec = VIT_TOWERS.get(vision_config.model_type)
    if spec is None:
        raise NotImplementedError(
            f"vision tower {vision_config.model_type!r} is not known to vlmeff; known: {', '.join(sorted(VIT_TOWERS))}"
        )
    return spec


