"""The attention router: the one way into a language model's attention for every strategy.

transformers lets a model's attention be looked up by name (`AttentionInterface`) together with the function that
builds its masks (`AttentionMaskInterface`). vlmeff registers one pair under ``vlmeff``: the attention function runs
the backend the user chose (``sdpa`` or ``eager``, bit for bit the same computation) and, when the call carries a
`Router`, lets it intervene; the mask function is transformers' own `sdpa_mask` (boolean masks, converted to
additive ones for eager).

Per-call state travels with the call, never in module globals: a `Router` is a context manager that, while it is
entered, switches the text backbone to ``vlmeff``, and a forward pre-hook on the language model puts the router into
the call's keyword arguments (transformers passes them down to every decoder layer's attention function). On exit
every hook is removed and the backend restored, also when the call raised. Through a router a strategy can
- observe a layer's post-RoPE queries / keys / values in prefill (`observe`),
- replace a layer's attention (`replace`, training),
- edit the pre-softmax scores of the last query row of each call (`edit_last_row`, PAI / PAINT boosts),
- learn the phase of the current call (`phase`: "prefill" when the cache is empty, else "decode"), so that several
  branches with their own caches can run through the same router;
and a session can rewrite the language model's keyword arguments per call (`on_call`: 4-D prefill masks,
gathered positions). Masks themselves are index predicates composed with `masking_utils` (`vlmeff.layout`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from vlmeff.strategy import NotApplicableError

ROUTER_ATTENTION = "vlmeff"
_CALL_KEY = "vlmeff_router"
BACKENDS = ("sdpa", "eager")


def _eager_for(module) -> Callable:
    """The eager attention function of the module's own model file (so eager results match the unwrapped model)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise NotApplicableError(f"{type(module).__name__}: no eager attention function in its model file; use sdpa")
    return fn


def run_backend(backend: str, module, query, key, value, mask, **kwargs):
    """Attention with `backend` ("sdpa" | "eager") for a boolean (or None = causal) mask from `sdpa_mask`."""
    if backend == "sdpa":
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    if mask is None:  # sdpa_mask skipped a plain causal mask
        q_len, kv_len = query.shape[2], key.shape[2]
        rows = torch.arange(kv_len - q_len, kv_len, device=query.device)
        mask = (torch.arange(kv_len, device=query.device)[None, :] <= rows[:, None])[None, None]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min)
    return _eager_for(module)(module, query, key, value, mask, **kwargs)


def call_phase(kwargs: dict[str, Any]) -> str:
    """"prefill" when a language-model call starts from an empty (or no) cache, else "decode"."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return "prefill" if cache is None or cache.get_seq_length() == 0 else "decode"


def _route(module, query, key, value, attention_mask, **kwargs):
    router = kwargs.pop(_CALL_KEY, None)
    if router is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return router.attend(module, query, key, value, attention_mask, kwargs)


AttentionInterface.register(ROUTER_ATTENTION, _route)
AttentionMaskInterface.register(ROUTER_ATTENTION, sdpa_mask)


@dataclass
class AttentionInputs:
    """What one decoder layer's attention received.

    query: [B, H, S, hd] (rotary applied); key / value: [B, H_kv, K, hd]; mask: the layer's mask ([B, 1, S, K]
    bool, True = attend, or None = plain causal); scaling: the softmax scale.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    scaling: float

    def _expand(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.query.shape[1] // x.shape[1]
        return x.float().repeat_interleave(groups, dim=1) if groups > 1 else x.float()

    @property
    def keys(self) -> torch.Tensor:
        """[B, H, K, hd] float32 keys with the kv heads repeated for each query head."""
        return self._expand(self.key)

    @property
    def values(self) -> torch.Tensor:
        """[B, H, K, hd] float32 values with the kv heads repeated for each query head."""
        return self._expand(self.value)

    def allowed(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, 1, R, K] bool: which keys the query rows `rows` ([R] positions) may attend."""
        num = self.key.shape[2]
        offset = num - self.query.shape[2]  # keys before the first query (decode: the cache)
        if self.mask is None:
            return (torch.arange(num, device=rows.device)[None, :] <= rows[:, None] + offset)[None, None]
        mask = self.mask[:, :, rows] if self.mask.shape[2] > 1 else self.mask
        mask = mask if mask.dtype == torch.bool else mask == 0
        # padding query rows attend to nothing in transformers' masks: let them see themselves (finite, never read)
        diagonal = torch.arange(num, device=rows.device)[None, :] == rows[:, None] + offset  # [R, K]
        return mask | (diagonal & ~mask.any(-1, keepdim=True))

    def logits(self, rows: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """[B, H, R, K'] float32 scaled scores of the query rows `rows` over the first K' keys, masked positions -inf
        (a fresh tensor: callers may edit it in place). allowed: `allowed(rows)`, possibly cut to its first K' key
        columns (default: all K keys). Query heads h = g * groups + j share kv head g: one matmul per kv head over
        its groups' rows, so the keys are never repeated."""
        allowed = self.allowed(rows) if allowed is None else allowed
        batch, heads, _, head_dim = self.query.shape
        kv_heads, num_keys = self.key.shape[1], allowed.shape[-1]
        query = self.query[:, :, rows].float().view(batch, kv_heads, heads // kv_heads * rows.numel(), head_dim)
        keys_t = self.key[:, :, :num_keys].float().transpose(-1, -2)  # [B, H_kv, hd, K']
        scores = torch.matmul(query, keys_t).view(batch, heads, rows.numel(), num_keys).mul_(self.scaling)
        return scores.masked_fill_(~allowed, float("-inf"))

    def probabilities(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, H, R, K] float32 attention probabilities of the query rows `rows` (as the layer computed them)."""
        return torch.softmax(self.logits(rows), dim=-1)

    def probability_chunks(self, rows: torch.Tensor, chunk: int = 64, temperature: float = 1.0):
        """Yields (start, horizon, probs [B, H, r, horizon] float32): the softmax of (scaled scores / temperature) of
        the query rows rows[start:start + r], `chunk` rows at a time, over the keys up to the last one any of those
        rows may attend (about half the keys under a causal mask; later keys have probability exactly 0). Readers of
        many attention rows (ATP, AIM's PageRank) never hold a [B, H, R, K] tensor of zeros."""
        for start in range(0, rows.numel(), chunk):
            part = rows[start:start + chunk]
            allowed = self.allowed(part)  # [B, 1, r, K]
            horizon = int(allowed.flatten(0, 2).any(0).nonzero().max()) + 1
            scores = self.logits(part, allowed[..., :horizon])
            if temperature != 1.0:
                scores.div_(temperature)
            yield start, horizon, torch.softmax(scores, dim=-1)

    def head_mean_probabilities(self, rows: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """[B, R, K] float32 attention probabilities of the query rows `rows`, averaged over heads: the numbers of
        `probabilities(rows).mean(1)`, computed by `probability_chunks` (ATP reads these rows at every pruning point;
        docs/benchmarks.md)."""
        out = torch.zeros(self.query.shape[0], rows.numel(), self.key.shape[2], device=self.query.device)
        for start, horizon, probs in self.probability_chunks(rows, chunk):
            torch.mean(probs, dim=1, out=out[:, start:start + probs.shape[2], :horizon])
        return out

    def sample_row_probabilities(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, H, K] float32 attention probabilities of ONE query row per sample (`rows`: [B] positions)."""
        batch = torch.arange(rows.numel(), device=rows.device)
        query = self.query.float()[batch, :, rows]  # [B, H, hd]
        scores = torch.einsum("bhd,bhsd->bhs", query, self.keys) * self.scaling
        if self.mask is None:
            allowed = torch.arange(self.key.shape[2], device=rows.device)[None, :] <= rows[:, None]  # [B, K]
        else:
            full = self.mask.expand(rows.numel(), -1, -1, -1)
            mask = full[batch, 0, rows] if full.shape[2] > 1 else full[:, 0, 0]  # [B, K]
            allowed = mask if mask.dtype == torch.bool else mask == 0
        return torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)


# (layer, scores [B, H, K] float32 of the last query row, masked keys -inf) -> edited scores
ScoreEdit = Callable[[int, torch.Tensor], torch.Tensor]


class Router:
    """Every attention-level intervention of one wrapped call on one model, owned in one place.

    Register interventions (and the layer hooks of the session that uses them) before entering; `__exit__` removes
    every hook and restores the backend, also when the call raised: the router is their one owner.
    """

    def __init__(self, model):
        self.model = model
        self.language_model = model.model.language_model
        text_config = model.config.text_config
        implementation = text_config._attn_implementation
        if implementation not in (*BACKENDS, ROUTER_ATTENTION):
            raise NotApplicableError(
                f"vlmeff's attention-level strategies need attn_implementation='sdpa' or 'eager' (the model uses "
                f"{implementation!r}, which takes no custom mask or score edit); load it with "
                "attn_implementation='sdpa'")
        self._implementation = implementation
        self.backend = "sdpa" if implementation == ROUTER_ATTENTION else implementation
        self._observers: dict[int, list[Callable[[int, AttentionInputs], None]]] = {}
        self._replacements: dict[int, Callable] = {}
        self._edits: dict[int, list[ScoreEdit]] = {}
        self._on_call: list[Callable[[str, dict[str, Any]], None]] = []
        self._layer_hooks: list[tuple[int, str, Callable]] = []
        self._handles: list[Any] = []
        self.phase: str | None = None  # "prefill" | "decode" of the current language-model call
        self.calls = 0

    # --- registration -------------------------------------------------------------------------------------------
    def observe(self, layer: int, fn: Callable[[int, AttentionInputs], None]) -> None:
        """Call fn(layer, AttentionInputs) after the layer's attention in every prefill call."""
        self._observers.setdefault(layer, []).append(fn)

    def replace(self, layer: int, fn: Callable) -> None:
        """Run fn(module, query, key, value, mask, **kwargs) -> (out, weights) instead of the backend at `layer`."""
        self._replacements[layer] = fn

    def edit_last_row(self, layers, fn: ScoreEdit) -> None:
        """In `layers`, recompute the last query row of each call (prefill: the last prompt token; decode: the new
        token) with fn applied to its scaled, masked pre-softmax scores; the other rows are the backend's."""
        for layer in layers:
            self._edits.setdefault(layer, []).append(fn)

    def on_call(self, fn: Callable[[str, dict[str, Any]], None]) -> None:
        """fn(phase, kwargs) before each language-model call; it may rewrite the call's keyword arguments."""
        self._on_call.append(fn)

    def before_layer(self, layer: int, fn: Callable) -> None:
        """A forward pre-hook (module, args, kwargs) -> (args, kwargs) | None on decoder layer `layer`."""
        self._layer_hooks.append((layer, "pre", fn))

    def after_layer(self, layer: int, fn: Callable) -> None:
        """A forward hook (module, args, kwargs, output) -> output | None on decoder layer `layer`."""
        self._layer_hooks.append((layer, "post", fn))

    # --- install / remove -----------------------------------------------------------------------------------------
    def __enter__(self) -> Router:
        try:
            layers = self.language_model.layers
            for index, kind, fn in self._layer_hooks:
                register = layers[index].register_forward_pre_hook if kind == "pre" else layers[index].register_forward_hook
                self._handles.append(register(fn, with_kwargs=True))
            self._handles.append(self.language_model.register_forward_pre_hook(self._before_call, with_kwargs=True))
            if self._implementation != ROUTER_ATTENTION:
                self.model.set_attn_implementation({"text_config": ROUTER_ATTENTION})
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._implementation != ROUTER_ATTENTION:
            self.model.set_attn_implementation({"text_config": self._implementation})

    def _before_call(self, module, args, kwargs):
        self.phase = call_phase(kwargs)
        self.calls += 1
        for fn in self._on_call:
            fn(self.phase, kwargs)
        kwargs[_CALL_KEY] = self
        return args, kwargs

    # --- the attention call -------------------------------------------------------------------------------------
    def attend(self, module, query, key, value, mask, kwargs):
        layer = module.layer_idx
        replacement = self._replacements.get(layer)
        edits = self._edits.get(layer)
        if edits and replacement is None and query.shape[2] == 1:  # a decode step: the edited row is the output
            inputs = AttentionInputs(query, key, value, mask, kwargs["scaling"])
            out, weights = self._edited_last_row(layer, edits, inputs, None), None
        else:
            if replacement is not None:
                out, weights = replacement(module, query, key, value, mask, **kwargs)
            else:
                out, weights = run_backend(self.backend, module, query, key, value, mask, **kwargs)
            if edits:
                inputs = AttentionInputs(query, key, value, mask, kwargs["scaling"])
                out = self._edited_last_row(layer, edits, inputs, out)
        if self.phase == "prefill" and layer in self._observers:
            inputs = AttentionInputs(query, key, value, mask, kwargs.get("scaling"))
            for fn in self._observers[layer]:
                fn(layer, inputs)
        return out, weights

    @staticmethod
    def _edited_last_row(layer: int, edits: list[ScoreEdit], inputs: AttentionInputs, out: torch.Tensor | None):
        """out [B, S, H, hd] with row S-1 recomputed from edited scores (softmax in float32, as eager does); with
        out None (one query row: a decode step) that row alone, [B, 1, H, hd], without running the backend."""
        row = torch.tensor([inputs.query.shape[2] - 1], device=inputs.query.device)
        scores = inputs.logits(row)[:, :, 0]  # [B, H, K], masked -inf
        for fn in edits:
            scores = fn(layer, scores)
        probs = torch.softmax(scores, dim=-1).to(inputs.value.dtype)
        values = inputs.value.repeat_interleave(inputs.query.shape[1] // inputs.value.shape[1], dim=1)
        last = torch.einsum("bhk,bhkd->bhd", probs, values)  # [B, H, hd]
        if out is None:
            return last[:, None].to(inputs.query.dtype)
        out = out.clone()
        out[:, -1] = last.to(out.dtype)
        return out
