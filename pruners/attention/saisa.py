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
    """One projector per decoder layer: raw vision features [.., d_vis] -> that layer's visual hidden states [.., d].

    rank None: the paper's form, L independent projectors Linear(d_vis -> d), GELU, Linear(d -> d). rank r: a
    factored form of the same function family (vlmeff's, for shipping and for a CPU fine-tune): one shared first
    layer g = GELU(W1 v + b1) and shared second layer W2 g + b2, plus a per-layer rank-r update up_l(down_l(g))
    (down_l: d -> r without bias, up_l: r -> d with bias), so P_l(v) = W2 g + b2 + up_l(down_l(g)). With up_l zero
    every layer equals the shared projector. Its weights are (d_vis d + d^2 + L (2 d r + d)) instead of L (d_vis d +
    d^2): 1.7 M rather than 16.6 M parameters on the reference model at r = 32, and the shared part runs once per
    prefill rather than once per layer.

    Call `prepare(features)` once per prefill and `layer_output(l, prepared)` per layer; `forward(l, features)` does
    both (tests, one-off use).
    """

    def __init__(self, vision_size: int, hidden_size: int, num_layers: int, rank: int | None = None):
        super().__init__()
        if rank is not None and not 1 <= rank <= hidden_size:
            raise StrategyError(f"saisa: projector rank {rank} must be in [1, {hidden_size}] (the hidden size)")
        self.vision_size, self.hidden_size, self.num_layers, self.rank = vision_size, hidden_size, num_layers, rank
        if rank is None:
            self.projectors = nn.ModuleList(
                nn.Sequential(nn.Linear(vision_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
                for _ in range(num_layers))
            return
        self.first = nn.Sequential(nn.Linear(vision_size, hidden_size), nn.GELU())
        self.second = nn.Linear(hidden_size, hidden_size)
        self.down = nn.ModuleList(nn.Linear(hidden_size, rank, bias=False) for _ in range(num_layers))
        self.up = nn.ModuleList(nn.Linear(rank, hidden_size) for _ in range(num_layers))
        self._zero_updates()  # LoRA's start: every layer equals the shared projector until trained

    def _zero_updates(self) -> None:
        with torch.no_grad():
            for up in self.up:
                up.weight.zero_()
                up.bias.zero_()

    def prepare(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What every layer shares: the features themselves (paper form), or (g, W2 g + b2) (factored form)."""
        if self.rank is None:
            return (features,)
        hidden = self.first(features)
        return hidden, self.second(hidden)

    def layer_output(self, layer: int, prepared: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.rank is None:
            return self.projectors[layer](prepared[0])
        hidden, shared = prepared
        return shared + self.up[layer](self.down[layer](hidden))

    def forward(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        return self.layer_output(layer, self.prepare(features))

    def flops(self, tokens: int) -> int:
        """Multiply-add FLOPs (2 per MAC) of all L layer outputs for `tokens` visual tokens."""
        dv, d, layers = self.vision_size, self.hidden_size, self.num_layers
        if self.rank is None:
            return layers * 2 * tokens * (dv * d + d * d)
        return 2 * tokens * (dv * d + d * d) + layers * 2 * tokens * 2 * d * self.rank

    def copy_stock(self, linear_1: nn.Linear, linear_2: nn.Linear) -> None:
        """Every layer := the stock LLaVA projector (linear_1, GELU, linear_2); the factored form's updates zero."""
        with torch.no_grad():
            if self.rank is None:
                for layer in self.projectors:
                    layer[0].load_state_dict(linear_1.state_dict())
                    layer[2].load_state_dict(linear_2.state_dict())
                return
            self.first[0].load_state_dict(linear_1.state_dict())
            self.second.load_state_dict(linear_2.state_dict())
        self._zero_updates()


def save_projectors(path: str | Path, module: SAISAProjectors, meta: dict[str, Any] | None = None,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Write the projectors (safetensors, atomically, in `dtype`) with their shapes and `meta` (e.g. the model
    trained on)."""
    meta = {**(meta or {}), "vision_size": module.vision_size, "hidden_size": module.hidden_size,
            "num_layers": module.num_layers, "rank": module.rank}
    return save_module_file(path, module, META_KEY, meta, dtype=dtype)


def untrained_projectors(config, path: str | Path, seed: int = 0, rank: int | None = None) -> Path:
    """Write randomly initialised projectors shaped for the VLM `config`: what `saisa` costs on a model nobody
    trained projectors for (e.g. `vlmeff bench`'s random model). Its answers are meaningless; cost figures only."""
    text = config.text_config
    torch.manual_seed(seed)
    module = SAISAProjectors(vision_feature_size(config), text.hidden_size, text.num_hidden_layers, rank)
    return save_projectors(path, module, {"model": "untrained (cost measurements only)"})


def fit_projectors(module: SAISAProjectors, batches, ridge: float = 1e-3) -> dict[str, list[float]]:
    """Fit a factored `module`'s second layer and per-layer updates so that P_l(v) predicts given per-layer targets
    (vlmeff's distillation init: the visual hidden states a causally trained model holds at each layer's input),
    keeping its first layer. `batches` yields (features [N, d_vis], targets [L, N, d]).

    With g = first(v) and h = [g, 1]: the ridge solution B_l = (H^T H + lambda I)^-1 H^T Y_l per layer (lambda =
    `ridge` x the mean diagonal of H^T H); the shared layer takes their mean B (the fit to the layers' mean target);
    each layer's update is the reduced-rank regression of its residual D_l = B_l - B: the rank-r projection
    D_l V V^T, V the top r eigenvectors of D_l^T H^T H D_l (the fitted values' covariance). Only H^T H and H^T Y_l
    are accumulated. Returns {"r2_shared": [per layer], "r2": [per layer]}: the share of each layer's target
    variance explained by the shared layer alone and with its update.
    """
    if module.rank is None:
        raise StrategyError("saisa: fit_projectors fits the factored form (rank=r); the paper form has no shared layer")
    d, layers, rank = module.hidden_size, module.num_layers, module.rank
    gram = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    cross = torch.zeros(layers, d + 1, d, dtype=torch.float64)
    sums = torch.zeros(layers, d, dtype=torch.float64)
    squares = torch.zeros(layers, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for features, targets in batches:
            h = module.first(features.float()).double()
            h = torch.cat([h, torch.ones_like(h[:, :1])], 1)
            y = targets.double()
            gram += h.T @ h
            cross += torch.einsum("nk,lnd->lkd", h, y)
            sums += y.sum(1)
            squares += (y * y).sum((1, 2))
            count += h.shape[0]
        if count == 0:
            raise StrategyError("saisa: fit_projectors got no visual tokens to fit")
        lam = ridge * gram.diagonal().mean()
        solve = torch.linalg.solve(gram + lam * torch.eye(d + 1, dtype=gram.dtype), cross)  # [L, d+1, d]
        shared = solve.mean(0)
        module.second.weight.copy_(shared[:d].T)
        module.second.bias.copy_(shared[d])
        total = squares - (sums * sums).sum(1) / count  # per layer: sum of squared deviations from the mean

        def explained(coef):  # 1 - SSE / SST for predictions H coef, from the accumulated statistics
            sse = squares - 2 * (coef * cross).sum((1, 2)) + torch.einsum("lkd,kj,ljd->l", coef, gram, coef)
            return (1 - sse / total).tolist()

        r2_shared = explained(shared.expand(layers, -1, -1))
        full = []
        for layer in range(layers):
            residual = solve[layer] - shared  # [d+1, d]
            _, vectors = torch.linalg.eigh(residual.T @ gram @ residual)
            top = vectors[:, -rank:]  # [d, r], the largest eigenvalues last
            low = residual @ top  # [d+1, r]
            module.down[layer].weight.copy_(low[:d].T)
            module.up[layer].weight.copy_(top)
            module.up[layer].bias.copy_(low[d] @ top.T)
            full.append(shared + low @ top.T)
        return {"r2_shared": r2_shared, "r2": explained(torch.stack(full))}


def load_projectors(path: str | Path) -> tuple[SAISAProjectors, dict[str, Any]]:
    """(projectors in eval mode, metadata) from a file written by `save_projectors` (cached per file and mtime)."""
    return load_module_file(
        path, META_KEY, lambda meta: SAISAProjectors(meta["vision_size"], meta["hidden_size"], meta["num_layers"],
                                                 meta.get("rank")),
        owner="saisa", what="projector weights", kind="a SAISA projector file")


WEIGHTS_NAME = "saisa_projectors.safetensors"


def default_weights() -> Path:
    """The projectors vlmeff trained for its reference model, with `reference-saisa`'s LoRA
    (assets/reference/saisa_projectors.safetensors)."""
    from vlmeff.reference.model import asset_dir

    return asset_dir() / WEIGHTS_NAME


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
    queries, no FFN). weights: a file from `save_projectors` trained for this model; default: the projectors vlmeff
    trained for its reference model together with the LoRA of `reference-saisa` (`vlmeff reference train
    --attention saisa`), so use them with `--model reference-saisa`. Those shipped projectors deviate from the paper:
    they are factored (`SAISAProjectors` with rank 32) and start from a closed-form fit to the causal model's visual
    states (`fit_projectors`) instead of the paper's pre-training; the paper form loads too."""

    name = "saisa"
    summary = ("attention: SAISA layer, visual tokens as keys/values only (per-layer projectors of raw vision "
               "features, no visual queries or FFN); EXPERIMENTAL, needs trained projectors: shipped for "
               "--model reference-saisa, weights=<file> for other models")
    paper = "arXiv 2502.02458"
    training_free = False
    experimental = True

    weights: str | None = None

    def weights_file(self) -> Path:
        return Path(self.weights) if self.weights else default_weights()

    def projectors(self) -> tuple[SAISAProjectors, dict[str, Any]]:
        return load_projectors(self.weights_file())

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
                f"saisa: the projectors in {self.weights_file()} map {have[0]} -> {have[1]} for {have[2]} layers "
                f"({meta.get('model', '?')}); this model needs {want[0]} -> {want[1]} for {want[2]} layers: pass "
                "weights=<file> trained for it (vlmeff.pruners.attention.saisa.save_projectors; an untrained file "
                "from untrained_projectors gives cost figures only)")
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
        `visual` tokens (counted as projector FLOPs; the factored form's shared part once)."""
        return FlopsBreakdown(vision=0, projector=self.projectors()[0].flops(visual),
                              llm=llm_prefill_flops(config.text_config, text, key_only_tokens=visual))

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
                module.to(device=embeds.device, dtype=embeds.dtype)
                state["prepared"] = module.prepare(raw.to(device=embeds.device, dtype=embeds.dtype))
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
            hidden = layer.input_layernorm(module.layer_output(index, state["prepared"]))
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
