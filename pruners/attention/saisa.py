"""The SAISA layer (Self-Attention Input Space Alignment, arXiv 2502.02458; docs/methods.md "SAISA"), `saisa`.

EXPERIMENTAL, needs trained weights: every decoder layer l owns a projector P_l = Linear(d_vis -> d), GELU,
Linear(d -> d) applied to the raw vision features v (LLaVA: the feature-layer output the stock projector reads).
In the prefill, at layer l the visual hidden states are P_l(v): they give keys and values (at their original
positions) to the text rows, and issue no queries and pass no FFN. Text rows attend causally, at their original
positions, to every earlier text or visual key. Decode steps are plain attention over the cache.

How vlmeff runs it (removal, not masking): the language model's residual stream holds the TEXT rows only (the
visual rows are taken out of `inputs_embeds` before layer 0, left-padded compaction); before each layer's attention
the layer's own norm and k / v projections (and rotary embedding, from the model's file) turn P_l(v) into keys and
values that are written into the layer's cache ahead of the text keys. So queries, attention output and FFN run on
text rows only, and the cache holds [visual keys, text keys] per layer; the decode mask follows that order. With a
pre-LLM reduction (e.g. `fastervlm:keep=64+saisa`) P_l sees the raw features of the kept tokens. Not combinable with
in-LLM removal (visual tokens have no hidden states inside the LLM to prune) nor with other attention-stage
strategies (they act on visual query rows or on the sequence order SAISA changes). 1-D RoPE decoders with the
Llama layer structure (LLaVA, the reference model); M-RoPE (Qwen2-VL) is refused.

The reference code's per-batch bookkeeping (right for one image per batch only) is not copied: every row has its
own visual count. The stock LLaVA projector still runs once (its output is dropped); its FLOPs are counted.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import or_masks, sdpa_mask

from vlmeff.flops import FlopsBreakdown, llm_prefill_flops
from vlmeff.kernels import compact, gather_tokens
from vlmeff.module_files import load_module_file, save_module_file
from vlmeff.registry import register_strategy
from vlmeff.strategy import AttentionStrategy, NotApplicableError, StrategyError

META_KEY = "saisa"


class SAISAProjectors(nn.Module):
    """One projector per decoder layer: raw vision features [.., d_vis] -> that layer's visual hidden states [.., d]."""

    def __init__(self, vision_size: int, hidden_size: int, num_layers: int):
        super().__init__()
        self.vision_size, self.hidden_size, self.num_layers = vision_size, hidden_size, num_layers
        self.projectors = nn.ModuleList(
            nn.Sequential(nn.Linear(vision_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
            for _ in range(num_layers))

    def forward(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        return self.projectors[layer](features)


def save_projectors(path: str | Path, module: SAISAProjectors, meta: dict[str, Any] | None = None) -> Path:
    """Write the projectors (safetensors, atomically) with their shapes and `meta` (e.g. the model trained on)."""
    meta = {**(meta or {}), "vision_size": module.vision_size, "hidden_size": module.hidden_size,
            "num_layers": module.num_layers}
    return save_module_file(path, module, META_KEY, meta)


def untrained_projectors(config, path: str | Path, seed: int = 0) -> Path:
    """Write randomly initialised projectors shaped for the VLM `config`: what `saisa` costs on a model nobody
    trained projectors for (e.g. `vlmeff bench`'s random model). Its answers are meaningless; cost figures only."""
    text = config.text_config
    torch.manual_seed(seed)
    module = SAISAProjectors(vision_feature_size(config), text.hidden_size, text.num_hidden_layers)
    return save_projectors(path, module, {"model": "untrained (cost measurements only)"})


def load_projectors(path: str | Path) -> tuple[SAISAProjectors, dict[str, Any]]:
    """(projectors in eval mode, metadata) from a file written by `save_projectors` (cached per file and mtime)."""
    return load_module_file(
        path, META_KEY, lambda meta: SAISAProjectors(meta["vision_size"], meta["hidden_size"], meta["num_layers"]),
        owner="saisa", what="projector weights", kind="a SAISA projector file")


def vision_feature_size(config) -> int:
    """Width of the raw vision features a LLaVA-style projector reads (several feature layers are concatenated)."""
    layers = getattr(config, "vision_feature_layer", -1)
    return int(config.vision_config.hidden_size) * (1 if isinstance(layers, int) else len(layers))


def _rotate_keys(attention: nn.Module, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Keys [B, H_kv, V, hd] with the rotary embedding of the attention module's own model file."""
    apply = getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None)
    if apply is None:
        raise NotApplicableError(f"saisa: {type(attention).__name__}'s model file has no apply_rotary_pos_emb")
    return apply(key, key, cos, sin)[1]


@register_strategy
@dataclass
class SAISA(AttentionStrategy):
    """SAISA layer: per-layer projectors of the raw vision features; visual rows give keys / values only (no
    queries, no FFN). weights: a file from `save_projectors` trained for this model (none ship yet)."""

    name = "saisa"
    summary = ("attention: SAISA layer, visual tokens as keys/values only (per-layer projectors of raw vision "
               "features, no visual queries or FFN); EXPERIMENTAL, needs trained projectors (weights=<file>)")
    paper = "arXiv 2502.02458"
    training_free = False
    experimental = True

    weights: str | None = None

    def projectors(self) -> tuple[SAISAProjectors, dict[str, Any]]:
        if self.weights is None:
            raise NotApplicableError(
                "saisa needs trained per-layer projectors and none were given: pass weights=<file.safetensors> "
                "written by vlmeff.pruners.attention.saisa.save_projectors for this model (vlmeff ships none yet; "
                "an untrained file gives cost figures only)")
        return load_projectors(self.weights)

    def check_applicable(self, connector) -> None:
        if not connector.splices_in_unit_order:
            raise NotApplicableError(f"saisa: the {connector.name} connector re-arranges the visual tokens it splices "
                                     "(e.g. LLaVA-NeXT's crops interleave row by row), and the SAISA layer pairs raw "
                                     "vision features with visual positions in unit order")
        if connector.rope != "1d":
            raise NotApplicableError(f"saisa: the {connector.name} connector uses M-RoPE position ids; the SAISA "
                                     "layer is implemented for 1-D RoPE decoders (LLaVA, the reference model)")
        config = connector.model.config
        text = config.text_config
        module, meta = self.projectors()
        want = (vision_feature_size(config), text.hidden_size, text.num_hidden_layers)
        have = (module.vision_size, module.hidden_size, module.num_layers)
        if want != have:
            raise NotApplicableError(
                f"saisa: the projectors in {self.weights} map {have[0]} -> {have[1]} for {have[2]} layers "
                f"({meta.get('model', '?')}); this model needs {want[0]} -> {want[1]} for {want[2]} layers")
        layer = connector.model.model.language_model.layers[0]
        if not all(hasattr(layer, a) for a in ("input_layernorm", "self_attn")) or not all(
                hasattr(layer.self_attn, a) for a in ("k_proj", "v_proj", "head_dim")):
            raise NotApplicableError(f"saisa: {type(layer).__name__} does not have the Llama layer structure "
                                     "(input_layernorm, self_attn.k_proj / v_proj) the SAISA layer needs")

    def check_after(self, previous) -> None:
        super().check_after(previous)
        self._refuse([p for p in previous if p.stage.value in ("in_llm", "attention")])

    def check_before(self, later) -> None:
        self._refuse([s for s in later if s.stage.value in ("in_llm", "attention")])

    def _refuse(self, others) -> None:
        for other in others:
            if other.stage.value == "in_llm":
                raise StrategyError(f"saisa cannot be combined with {other.name}: SAISA's visual tokens have no hidden "
                                    "states inside the LLM (each layer projects them afresh), so in-LLM removal has "
                                    "nothing to prune; reduce before the LLM instead (e.g. fastervlm:keep=64+saisa)")
            raise StrategyError(f"saisa cannot be combined with {other.name}: attention-stage strategies act on visual "
                                "query rows or on the sequence order, which the SAISA layer removes")

    # --- cost ----------------------------------------------------------------------------------------------------
    def llm_flops(self, config, text: int, visual: int) -> FlopsBreakdown:
        """Decoder layers with `text` query rows over text + visual keys, the LM head, and the L projectors on the
        `visual` tokens (counted as projector FLOPs)."""
        text_config = config.text_config
        d, dv, layers = text_config.hidden_size, vision_feature_size(config), text_config.num_hidden_layers
        return FlopsBreakdown(vision=0, projector=layers * 2 * visual * (dv * d + d * d),
                              llm=llm_prefill_flops(text_config, text, key_only_tokens=visual))

    # --- the call ------------------------------------------------------------------------------------------------
    def install(self, router, layout, images, state) -> None:
        module, _ = self.projectors()
        if any(img.projected for img in images):
            raise NotApplicableError("saisa needs the raw vision features; a pre-LLM strategy working on projected "
                                     "tokens (token_space 'llm') ran before it")
        lm = router.language_model
        visual = layout.visual
        text = layout.valid & ~visual
        vis_index = compact(visual, pad_side="left").index  # [B, Vm] positions of the visual tokens, -1 = pad
        text_index = compact(text, pad_side="left").index  # [B, T]
        rows = []
        for row in range(visual.shape[0]):
            mine = [img.features for img in images if img.record.sample == row]
            rows.append(torch.cat(mine) if mine else images[0].features.new_zeros(0, module.vision_size))
        width = vis_index.shape[1]
        raw = torch.stack([torch.nn.functional.pad(r, (0, 0, width - r.shape[0], 0)) for r in rows])  # left pad
        positions = layout.default_positions()
        source = layout.source
        state.update(vis_valid=vis_index >= 0, text_valid=text_index >= 0, prompt=visual.shape[1],
                     vis_source=gather_tokens(source, vis_index, fill_value=-1),
                     text_source=gather_tokens(source, text_index, fill_value=-1))

        def on_call(phase, kwargs):
            if phase == "prefill":
                embeds = kwargs["inputs_embeds"]
                kwargs["inputs_embeds"] = gather_tokens(embeds, text_index)
                kwargs["position_ids"] = gather_tokens(positions, text_index)
                kwargs["attention_mask"] = self._prefill_mask(state)
                if kwargs.get("cache") is None:
                    kwargs["cache"] = DynamicCache(config=lm.config)
                vis_positions = gather_tokens(positions, vis_index)
                state["rotary"] = lm.rotary_emb(embeds, vis_positions)
                state["raw"] = raw.to(device=embeds.device, dtype=embeds.dtype)
                module.to(device=embeds.device, dtype=embeds.dtype)
            else:
                kwargs["attention_mask"] = self._decode_mask(state, kwargs)

        router.on_call(on_call)
        for index, layer in enumerate(lm.layers):
            router.before_layer(index, self._visual_keys(index, layer, module, state, router))

    @staticmethod
    def _prefill_mask(state) -> torch.Tensor:
        """[B, 1, T, Vm + T]: text query q may attend key k (visual block first, then text) iff k is real and came
        at or before q in the original sequence; padding query rows see themselves (finite, never read)."""
        keys = torch.cat([state["vis_source"], state["text_source"]], dim=1)  # [B, K] original index, -1 = pad
        queries = state["text_source"]
        offset = state["vis_source"].shape[1]

        def earlier(batch, head, q, kv):
            return (keys[batch, kv] >= 0) & (keys[batch, kv] <= queries[batch, q])

        def own_pad_row(batch, head, q, kv):
            return (queries[batch, q] < 0) & (kv == q + offset)

        return sdpa_mask(batch_size=keys.shape[0], q_length=queries.shape[1], kv_length=keys.shape[1],
                         mask_function=or_masks(earlier, own_pad_row), attention_mask=None,
                         allow_is_causal_skip=False, device=keys.device)

    @staticmethod
    def _decode_mask(state, kwargs) -> torch.Tensor:
        """[B, 1, q, Vm + T + new]: the cache order [visual, text, generated] with generate's padding of the new
        tokens, causal among the new ones."""
        mask = kwargs.get("attention_mask")
        embeds = kwargs.get("inputs_embeds")
        q = embeds.shape[1] if embeds is not None else kwargs["input_ids"].shape[1]
        batch = state["vis_valid"].shape[0]
        tail = (mask[:, state["prompt"]:].bool() if mask is not None and mask.dim() == 2
                else torch.ones(batch, kwargs["cache"].get_seq_length() - state["vis_valid"].shape[1]
                                - state["text_valid"].shape[1] + q, dtype=torch.bool, device=state["vis_valid"].device))
        keys = torch.cat([state["vis_valid"], state["text_valid"], tail.to(state["vis_valid"].device)], dim=1)
        total = keys.shape[1]
        rows = torch.arange(total - q, total, device=keys.device)
        causal = torch.arange(total, device=keys.device)[None, :] <= rows[:, None]  # [q, K]
        return (causal[None] & keys[:, None, :])[:, None]

    @staticmethod
    def _visual_keys(index: int, layer, module: SAISAProjectors, state, router):
        """Pre-hook of decoder layer `index` in prefill: P_l(v) -> norm -> k / v projections -> rotary, written into
        the layer's cache ahead of the text keys the layer appends."""
        attention = layer.self_attn

        def hook(layer_module, args, kwargs):
            if router.phase != "prefill":
                return None
            cache = kwargs.get("cache")
            hidden = layer.input_layernorm(module(index, state["raw"]))
            b, v, _ = hidden.shape
            shape = (b, v, -1, attention.head_dim)
            key = attention.k_proj(hidden).view(shape)
            if hasattr(attention, "k_norm"):
                key = attention.k_norm(key)
            key = key.transpose(1, 2)
            value = attention.v_proj(hidden).view(shape).transpose(1, 2)
            cos, sin = state["rotary"]
            cache.update(_rotate_keys(attention, key, cos, sin), value, index)
            return None
        return hook
