"""Inside the LLM: one session per wrapped call for the in-LLM (token removal) and attention (masks, positions,
score edits) stages, built on the attention router (`vlmeff.router`) and the token layout (`vlmeff.layout`).

Prefill:
1. the layout of the spliced input says what every position is; attention strategies contribute index predicates
   over it (composed with transformers' `masking_utils`), from which the prefill mask is built once per segment;
2. in-LLM strategies read the attention inputs of the layers they need through the router (`observe`); after each
   layer a strategy prunes at, its `select` returns, per sample, which current visual tokens stay; the session
   compacts the batch (left padding, ragged counts) with `vlmeff.kernels.compact`, gathers the layout, and returns
   the shorter hidden states from that layer's forward hook;
3. every later layer gets, through a forward pre-hook, the mask of the compacted layout and the rotary embeddings /
   position ids gathered at the kept positions, so the kept tokens keep their positions.
Later layers' KV caches hold only the kept tokens, earlier layers keep everything. In each decode step a pre-hook
gives a compacted layer the mask [kept prompt tokens, generated tokens] of its own cache. Phases come from the cache
length (the router), not from call order. Score edits (PAI / PAINT) apply to the last query row of every call.

Backends: sdpa and eager (the router runs them); flash attention is refused, as are sliding-window layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmeff.kernels import compact, gather_tokens
from vlmeff.layout import TokenLayout
from vlmeff.router import AttentionInputs, Router
from vlmeff.strategy import NotApplicableError
from vlmeff.timing import Clock, Spans

__all__ = ["AttentionInputs", "LLMSession", "PrefillView", "SampleTokens"]


@dataclass
class SampleTokens:
    """The current tokens of one batch row during prefill (positions index the current, compacted sequence).

    visual: [n] positions of its visual tokens; cells: [n] their original grid cells; images: [n] the batch image
    each belongs to; text_after: [t] positions of its real text tokens after its first visual token; last: position
    of its last real token; num_visual: visual tokens it had when the LLM started (budgets refer to this);
    original_counts: per image of the sample, its token count before any reduction (the placeholders).
    """

    visual: torch.Tensor
    cells: torch.Tensor
    images: torch.Tensor
    text_after: torch.Tensor
    last: int
    num_visual: int
    original_counts: list[int] = field(default_factory=list)


@dataclass
class PrefillView:
    samples: list[SampleTokens]
    grids: list[tuple[int, int, int]]  # (t, h, w) per batch image
    num_layers: int
    valid: torch.Tensor  # [B, S] bool, real (not padding) tokens of the current sequence
    hidden: torch.Tensor | None = None  # [B, S, D] output of the layer `select` prunes after (None in `observe`)
    layout: TokenLayout | None = None  # the current layout the view was made from
    # the language model's final normalisation (hidden -> what the LM head reads); None where the model has none
    final_norm: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class _Segment:
    """Layers after a pruning point: the compacted batch they see."""

    layout: TokenLayout
    cos_sin: tuple[torch.Tensor, ...] | None = None  # rotary embeddings gathered at the kept positions (prefill)
    position_ids: torch.Tensor | None = None
    prefill_mask: torch.Tensor | None = None  # [B, 1, S_seg, S_seg], shared by the segment's layers
    decode_mask: tuple[int, torch.Tensor | None] | None = None  # (kv length, mask) of the current decode step


class LLMSession:
    """The hooks of one wrapped call (prefill + decode steps) inside the language model."""

    def __init__(self, model, strategies: list, layout: TokenLayout, images: list, attention: list = (),
                 context: dict[str, Any] | None = None):
        self.model = model
        self.strategies = list(strategies)  # in-LLM pruners
        self.attention = list(attention)  # attention-stage strategies
        self.layout0 = layout
        self.images = images
        # the strategies' own work inside the LLM forward, by phase (the prefill part is inside the prefill's time)
        self.clock = Clock(model.device)
        self._prefill_spans, self._decode_spans = Spans(self.clock), Spans(self.clock)
        self.layer_lengths: list[list[int]] = []  # [B][L] real tokens entering each layer
        self.layer_visual: list[list[int]] = []  # [B][L] visual tokens entering each layer
        lm = model.model.language_model
        self.layers = list(lm.layers)
        self.num_layers = len(self.layers)
        text_config = model.config.text_config
        self.router = Router(model)  # refuses flash attention with a message naming sdpa
        if self.strategies and any(t != "full_attention" for t in getattr(text_config, "layer_types", None) or []):
            raise NotApplicableError("in-LLM token removal does not support sliding-window attention layers")
        self.prune_at: dict[int, list] = {}
        for strategy in self.strategies:
            for layer in strategy.prune_layers(self.num_layers):
                if not 0 <= layer < self.num_layers - 1:
                    raise NotApplicableError(f"{strategy.name}: prune layer {layer} is outside 0..{self.num_layers - 2} "
                                             f"for this {self.num_layers}-layer LLM")
                self.prune_at.setdefault(layer, []).append(strategy)
            for layer in strategy.observe_layers(self.num_layers):
                self.router.observe(layer, self._observer(strategy))
        self.states = {id(s): {} for s in [*self.strategies, *self.attention]}
        for strategy in self.attention:
            strategy.prepare(images, layout, context or {}, self.states[id(strategy)])
            layers = strategy.score_layers(self.num_layers)
            if layers:
                self.router.edit_last_row(layers, self._score_edit(strategy))
        self.router.on_call(self._on_llm_call)
        for index in range(self.num_layers):
            self.router.before_layer(index, self._pre_layer(index))
            if index in self.prune_at:
                self.router.after_layer(index, self._post_layer(index))
        for strategy in self.attention:
            strategy.install(self.router, layout, images, self.states[id(strategy)])
        self.original_counts = [[img.record.num_tokens for img in images if img.record.sample == row]
                                for row in range(layout.kind.shape[0])]
        self.num_visual = layout.visual.sum(1).tolist()
        self._segments: dict[int, _Segment] = {}  # first layer of a segment -> its batch
        self._layer_segment: list[int | None] = [None] * self.num_layers
        self._prompt_length = layout.kind.shape[1]
        self._decode_mask: torch.Tensor | None = None
        self._set_current(layout)

    # --- masks and views ------------------------------------------------------------------------------------------
    def mask_of(self, layout: TokenLayout) -> torch.Tensor | None:
        """The prefill mask of `layout`: causal + padding with every attention strategy's predicates."""
        ors, ands = [], []
        for strategy in self.attention:
            o, a = strategy.mask_functions(layout, self.states[id(strategy)])
            ors += o
            ands += a
        return layout.prefill_mask(ors, ands)

    def view(self, layout: TokenLayout) -> PrefillView:
        samples = []
        valid, visual = layout.valid, layout.visual
        for row in range(valid.shape[0]):
            real = valid[row]
            positions = visual[row].nonzero().squeeze(1)
            first = int(positions[0]) if positions.numel() else valid.shape[1]
            text_after = (real & ~visual[row]).nonzero().squeeze(1)
            text_after = text_after[text_after > first]
            samples.append(SampleTokens(visual=positions, cells=layout.cell[row, positions],
                                        images=layout.image[row, positions], text_after=text_after,
                                        last=int(real.nonzero().max()), num_visual=self.num_visual[row],
                                        original_counts=self.original_counts[row]))
        return PrefillView(samples, layout.grids, self.num_layers, valid, layout=layout,
                           final_norm=getattr(self.model.model.language_model, "norm", None))

    def _set_current(self, layout: TokenLayout) -> None:
        """The prefill sequence the next layers see, and its per-row token counts (one host sync per compaction)."""
        self.layout, self._view = layout, None
        self._counts = layout.counts()

    def current_view(self) -> PrefillView:
        if self._view is None:
            self._view = self.view(self.layout)
        return self._view

    # --- install / remove ---------------------------------------------------------------------------------------
    def __enter__(self) -> LLMSession:
        self.router.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.router.__exit__(*exc)

    @property
    def prefill(self) -> bool:
        return self.router.phase == "prefill"

    def _spent(self, start) -> None:
        """Book the time since `start` (a `Clock` point) as strategy work of the current phase."""
        (self._prefill_spans if self.prefill else self._decode_spans).add(start)

    @property
    def prefill_strategy_s(self) -> float:
        return self._prefill_spans.seconds

    @property
    def decode_strategy_s(self) -> float:
        return self._decode_spans.seconds

    def _on_llm_call(self, phase: str, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            raise NotApplicableError("vlmeff's LLM-side strategies need a 2-D attention mask from generate (got a "
                                     f"{type(mask).__name__}); use a dynamic cache")
        self._decode_mask = mask
        if phase != "prefill":
            return
        if kwargs.get("inputs_embeds", torch.empty(0, 0)).shape[1] != self._prompt_length:
            raise ValueError("LLM session: the prefill is not the prepared prompt")
        batch = self.layout0.kind.shape[0]
        self.layer_lengths = [[0] * self.num_layers for _ in range(batch)]
        self.layer_visual = [[0] * self.num_layers for _ in range(batch)]
        self._segments, self._layer_segment = {}, [None] * self.num_layers
        self._set_current(self.layout0)
        if self.attention:
            start = self.clock.now()
            prefill_mask = self.mask_of(self.layout0)
            if prefill_mask is not None:
                kwargs["attention_mask"] = prefill_mask  # a 4-D mask is used as is by transformers
            self._spent(start)

    # --- hooks ----------------------------------------------------------------------------------------------------
    def _observer(self, strategy):
        def observe(layer: int, attention: AttentionInputs) -> None:
            start = self.clock.now()
            strategy.observe(layer, attention, self.current_view(), self.states[id(strategy)])
            self._spent(start)
        return observe

    def _score_edit(self, strategy):
        def edit(layer: int, scores: torch.Tensor) -> torch.Tensor:
            first = self._layer_segment[layer]
            layout = self.layout0 if first is None else self._segments[first].layout
            image_keys = layout.over_keys(layout.visual, scores.shape[-1])  # generated tokens are no image keys
            state = self.states[id(strategy)]
            state["phase"] = self.router.phase
            return strategy.edit_scores(layer, scores, layout, image_keys, state)
        return edit

    def _pre_layer(self, index: int):
        def hook(module, args, kwargs):
            if self.prefill:
                for row, (length, visual) in enumerate(zip(*self._counts)):
                    self.layer_lengths[row][index] = length
                    self.layer_visual[row][index] = visual
            first = self._layer_segment[index]
            if first is None:
                return None
            segment = self._segments[first]
            hidden = args[0] if args else kwargs["hidden_states"]
            if self.prefill:
                kwargs["attention_mask"] = segment.prefill_mask
                kwargs["position_embeddings"] = segment.cos_sin
                if kwargs.get("position_ids") is not None:
                    kwargs["position_ids"] = segment.position_ids
            else:
                kwargs["attention_mask"] = self._decode_layer_mask(segment, index, hidden.shape[1], kwargs)
            return args, kwargs
        return hook

    def _decode_layer_mask(self, segment: _Segment, index: int, q_len: int, kwargs) -> torch.Tensor | None:
        """[B, 1, q, kv] mask of a decode step for a layer of `segment` (its cache: kept prompt + generated tokens);
        built once per step and segment, the segment's other layers reuse it."""
        cache = kwargs.get("cache")
        past = cache.layers[index].get_seq_length() if cache is not None else 0
        if segment.decode_mask is not None and segment.decode_mask[0] == past + q_len:
            return segment.decode_mask[1]
        valid = segment.layout.valid
        new = past + q_len - valid.shape[1]  # generated tokens in this layer's cache after the update
        if self._decode_mask is not None:
            tail = self._decode_mask[:, self._prompt_length:].bool()
            if tail.shape[1] != new:
                raise RuntimeError(f"LLM session: layer {index} holds {new} generated tokens, the mask {tail.shape[1]}")
        else:
            tail = torch.ones(valid.shape[0], new, dtype=torch.bool, device=valid.device)
        keys = torch.cat([valid, tail], dim=1)  # [B, kv]
        kv = keys.shape[1]
        mask = None
        if not (bool(keys.all()) and q_len == 1):
            rows = torch.arange(kv - q_len, kv, device=keys.device)
            causal = torch.arange(kv, device=keys.device)[None, :] <= rows[:, None]  # [q, kv]
            mask = (causal[None] & keys[:, None, :])[:, None]  # [B, 1, q, kv]
        segment.decode_mask = (kv, mask)
        return mask

    def _post_layer(self, index: int):
        def hook(module, args, kwargs, output):
            if not self.prefill:
                return None
            start = self.clock.now()
            hidden = output[0] if isinstance(output, tuple) else output  # [B, S_cur, D]
            valid = self.layout.valid
            keep = valid.clone()
            view = dataclasses.replace(self.current_view(), hidden=hidden)
            strategies = self.prune_at[index]
            for position, strategy in enumerate(strategies):
                chosen = strategy.select(index, view, self.states[id(strategy)])
                for row, (sample, kept) in enumerate(zip(view.samples, chosen)):
                    if kept is None:
                        continue
                    drop = torch.ones(sample.visual.numel(), dtype=torch.bool, device=keep.device)
                    drop[kept.to(keep.device)] = False
                    keep[row, sample.visual[drop]] = False
                if position + 1 < len(strategies):  # a later strategy at the same layer sees what is left
                    remaining = dataclasses.replace(self.layout, kind=self.layout.kind.masked_fill(~keep, -1))
                    view = dataclasses.replace(self.view(remaining), hidden=hidden)
            if torch.equal(keep, valid):
                self._spent(start)
                return None
            idx = compact(keep, pad_side="left")  # [B, S'] current positions, -1 = pad
            cos, sin = kwargs["position_embeddings"]
            position_ids = kwargs.get("position_ids")
            layout = self.layout.gather(idx.index)
            segment = _Segment(
                layout=layout,
                cos_sin=(_gather_seq(cos, idx.index, seq_dim=-2), _gather_seq(sin, idx.index, seq_dim=-2)),
                position_ids=None if position_ids is None else _gather_seq(position_ids, idx.index, seq_dim=-1),
                prefill_mask=self.mask_of(layout),
            )
            self._segments[index + 1] = segment
            for later in range(index + 1, self.num_layers):
                self._layer_segment[later] = index + 1
            self._set_current(layout)
            self._record(index + 1)
            hidden = gather_tokens(hidden, idx.index)
            self._spent(start)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook

    def _record(self, layer: int) -> None:
        """Write the grid cells of every image still present from `layer` on into its selection record."""
        layout = self.layout
        for i, img in enumerate(self.images):
            row = img.record.sample
            here = layout.image[row] == i
            img.record.llm_kept[layer] = layout.cell[row, here.nonzero().squeeze(1)]

    # --- results ----------------------------------------------------------------------------------------------
    def per_sample_equivalent_tokens(self) -> list[float]:
        """Layer-averaged visual tokens of each batch row (docs/methods.md, "FLOPs": equivalent tokens)."""
        return [sum(v) / self.num_layers for v in self.layer_visual]

    def equivalent_tokens(self) -> float:
        """Layer-averaged kept visual tokens, summed over the batch."""
        return sum(self.per_sample_equivalent_tokens())


def _gather_seq(x: torch.Tensor, index: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """x with the sequence axis at `seq_dim` (negative) and the batch axis (B or 1) just before it, gathered along
    the sequence with index [B, S'] (-1 -> 0): rotary tables [B, S, D] (seq_dim -2), position ids [B, S] (-1); axes
    before the batch (M-RoPE sections, e.g. [3, B, S]) are gathered one by one."""
    if x.dim() + seq_dim > 1:  # leading axes before the batch axis
        return torch.stack([_gather_seq(part, index, seq_dim) for part in x])
    return gather_tokens(x.expand(index.shape[0], *x.shape[1:]).contiguous(), index, fill_value=0)
