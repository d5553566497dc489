"""In-LLM token removal: the mechanics every in-LLM strategy (FastV, ATP, AIM prune, FlowCut's LLM stage) shares.

During the prefill call of the language model:
1. a recording attention function, registered with transformers' `AttentionInterface` under ``vlmeff_sdpa`` (with
   the matching `AttentionMaskInterface` entry, so masks are built exactly as for ``sdpa``), runs SDPA as usual and,
   for the decoder layers a strategy reads, hands it the layer's post-RoPE queries / keys / values (`AttentionInputs`);
   the strategy computes only the rows it needs from them;
2. after each layer a strategy prunes at, its `select` returns, per sample, which current visual tokens stay; the
   session compacts the batch (left padding, ragged counts) with `vlmeff.kernels.compact` and returns the shorter
   hidden states from that layer's forward hook;
3. every later layer gets, through a forward pre-hook, the attention mask of the compacted batch and the rotary
   embeddings / position ids gathered at the kept positions, so the kept tokens keep their original positions.
Later layers' KV caches therefore hold only the kept tokens, earlier layers keep everything. In each decode step the
pre-hook gives a layer the mask [kept prompt tokens, generated tokens] of its own cache; the new token's position is
the original one (``preserve``), which is what `generate` computes anyway.

Only ``sdpa`` is supported (the default of every model vlmeff connects): eager and flash attention are refused with
a message, as are sliding-window layers.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from vlmeff.kernels import compact, gather_tokens
from vlmeff.strategy import LLMPruner, NotApplicableError

RECORDING_ATTENTION = "vlmeff_sdpa"
_OBSERVERS: dict[int, Any] = {}  # id(attention module) -> callback(module, query, key, value, mask, scaling)
# id(attention module) -> an attention function used instead of SDPA (same signature; atp-learned's training masks)
_REPLACEMENTS: dict[int, Any] = {}


def _recording_sdpa(module, query, key, value, attention_mask, **kwargs):
    """SDPA (or the replacement registered for this module), plus a call to its observer (if any)."""
    attention = _REPLACEMENTS.get(id(module), sdpa_attention_forward)
    out = attention(module, query, key, value, attention_mask, **kwargs)
    observer = _OBSERVERS.get(id(module))
    if observer is not None:
        observer(module, query, key, value, attention_mask, kwargs.get("scaling"))
    return out


AttentionInterface.register(RECORDING_ATTENTION, _recording_sdpa)
AttentionMaskInterface.register(RECORDING_ATTENTION, sdpa_mask)


@dataclass
class AttentionInputs:
    """What one decoder layer's attention received in prefill.

    query: [B, H, S, hd] (rotary applied); key / value: [B, H_kv, S, hd]; mask: the layer's mask ([B, 1, S, S]
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
        """[B, H, S, hd] float32 keys with the kv heads repeated for each query head."""
        return self._expand(self.key)

    @property
    def values(self) -> torch.Tensor:
        """[B, H, S, hd] float32 values with the kv heads repeated for each query head."""
        return self._expand(self.value)

    def allowed(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, 1, R, S] bool: which keys the query rows `rows` ([R] positions) may attend."""
        num = self.key.shape[2]
        if self.mask is None:
            return (torch.arange(num, device=rows.device)[None, :] <= rows[:, None])[None, None]
        mask = self.mask[:, :, rows] if self.mask.shape[2] > 1 else self.mask
        mask = mask if mask.dtype == torch.bool else mask == 0
        # padding query rows attend to nothing in transformers' masks: let them see themselves (finite, never read)
        diagonal = torch.arange(num, device=rows.device)[None, :] == rows[:, None]  # [R, S]
        return mask | (diagonal & ~mask.any(-1, keepdim=True))

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, H, R, S] float32 scaled scores of the query rows `rows` over all keys, masked positions -inf."""
        scores = torch.einsum("bhrd,bhsd->bhrs", self.query[:, :, rows].float(), self.keys) * self.scaling
        return scores.masked_fill(~self.allowed(rows), float("-inf"))

    def probabilities(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, H, R, S] float32 attention probabilities of the query rows `rows` (as the layer computed them)."""
        return torch.softmax(self.logits(rows), dim=-1)

    def sample_row_probabilities(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, H, S] float32 attention probabilities of ONE query row per sample (`rows`: [B] positions)."""
        batch = torch.arange(rows.numel(), device=rows.device)
        query = self.query.float()[batch, :, rows]  # [B, H, hd]
        scores = torch.einsum("bhd,bhsd->bhs", query, self.keys) * self.scaling
        if self.mask is None:
            allowed = torch.arange(self.key.shape[2], device=rows.device)[None, :] <= rows[:, None]  # [B, S]
        else:
            full = self.mask.expand(rows.numel(), -1, -1, -1)
            mask = full[batch, 0, rows] if full.shape[2] > 1 else full[:, 0, 0]  # [B, S]
            allowed = mask if mask.dtype == torch.bool else mask == 0
        return torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)


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


@dataclass
class _Segment:
    """Layers after a pruning point: the compacted batch they see."""

    source: torch.Tensor  # [B, S_seg] position in the LLM input of each current slot, -1 = pad
    valid: torch.Tensor  # [B, S_seg] bool, real tokens
    cos_sin: tuple[torch.Tensor, ...] | None = None  # rotary embeddings gathered at the kept positions (prefill)
    position_ids: torch.Tensor | None = None
    prefill_mask: torch.Tensor | None = None  # [B, 1, S_seg, S_seg], shared by the segment's layers
    decode_mask: tuple[int, torch.Tensor | None] | None = None  # (kv length, mask) of the current decode step


@dataclass
class LLMSession:
    """Hooks of one wrapped call (prefill + decode steps) that remove visual tokens inside the language model."""

    model: Any
    strategies: list[LLMPruner]
    input_ids: torch.Tensor  # [B, S0] the LLM input (after pre-LLM reduction)
    attention_mask: torch.Tensor  # [B, S0]
    image_token_id: int
    images: list[Any]  # ImageTokens reaching the LLM, in batch order
    strategy_s: float = 0.0
    layer_lengths: list[list[int]] = field(default_factory=list)  # [B][L] real tokens entering each layer
    layer_visual: list[list[int]] = field(default_factory=list)  # [B][L] visual tokens entering each layer

    def __post_init__(self):
        lm = self.model.model.language_model
        self.layers = list(lm.layers)
        self.num_layers = len(self.layers)
        text_config = self.model.config.text_config
        implementation = text_config._attn_implementation
        if implementation not in ("sdpa", RECORDING_ATTENTION):
            names = ", ".join(s.name for s in self.strategies)
            raise NotApplicableError(
                f"{names}: in-LLM token removal needs attn_implementation='sdpa' (the model uses {implementation!r}); "
                "load it with attn_implementation='sdpa'")
        if any(t != "full_attention" for t in getattr(text_config, "layer_types", None) or []):
            raise NotApplicableError("in-LLM token removal does not support sliding-window attention layers")
        self._implementation = implementation
        self.prune_at: dict[int, list[LLMPruner]] = {}
        self.observe_at: dict[int, list[LLMPruner]] = {}
        for strategy in self.strategies:
            for layer in strategy.prune_layers(self.num_layers):
                if not 0 <= layer < self.num_layers - 1:
                    raise NotApplicableError(f"{strategy.name}: prune layer {layer} is outside 0..{self.num_layers - 2} "
                                             f"for this {self.num_layers}-layer LLM")
                self.prune_at.setdefault(layer, []).append(strategy)
            for layer in strategy.observe_layers(self.num_layers):
                self.observe_at.setdefault(layer, []).append(strategy)
        self.states = {id(s): {} for s in self.strategies}
        self._maps()
        self._handles: list[Any] = []
        self._segments: dict[int, _Segment] = {}  # first layer of a segment -> its batch
        self._layer_segment: list[int | None] = [None] * self.num_layers
        self._calls = 0
        self._prompt_length = self.input_ids.shape[1]
        self._decode_mask: torch.Tensor | None = None
        self._view: PrefillView | None = None  # view of the current prefill sequence, rebuilt after a compaction

    # --- what the LLM input holds -------------------------------------------------------------------------------
    def _maps(self) -> None:
        """Per LLM-input position: visual or not, its grid cell and batch image (from input_ids and the records)."""
        ids, mask = self.input_ids, self.attention_mask.bool()
        self.is_visual = (ids == self.image_token_id) & mask  # [B, S0]
        self.cell = torch.full_like(ids, -1)
        self.image = torch.full_like(ids, -1)
        for row in range(ids.shape[0]):
            mine = [(i, img) for i, img in enumerate(self.images) if img.record.sample == row]
            positions = self.is_visual[row].nonzero().squeeze(1)
            if mine:
                cells = torch.cat([img.index for _, img in mine]).to(ids.device)
                owner = torch.cat([torch.full((img.features.shape[0],), i, device=ids.device) for i, img in mine])
                if cells.numel() != positions.numel():
                    raise ValueError(f"row {row}: {positions.numel()} image placeholders for {cells.numel()} tokens")
                self.cell[row, positions] = cells
                self.image[row, positions] = owner
        self.grids = [img.record.grid for img in self.images]
        self.original_counts = [[img.record.num_tokens for img in self.images if img.record.sample == row]
                                for row in range(ids.shape[0])]

    def view(self, source: torch.Tensor, valid: torch.Tensor) -> PrefillView:
        samples = []
        for row in range(source.shape[0]):
            src = source[row].clamp(min=0)
            real = valid[row]
            visual = (self.is_visual[row, src] & real).nonzero().squeeze(1)
            first = int(visual[0]) if visual.numel() else source.shape[1]
            text_after = (real & ~self.is_visual[row, src]).nonzero().squeeze(1)
            text_after = text_after[text_after > first]
            samples.append(SampleTokens(visual=visual, cells=self.cell[row, src[visual]],
                                        images=self.image[row, src[visual]], text_after=text_after,
                                        last=int(real.nonzero().max()), num_visual=int(self.is_visual[row].sum()),
                                        original_counts=self.original_counts[row]))
        return PrefillView(samples, self.grids, self.num_layers, valid)

    # --- install / remove ---------------------------------------------------------------------------------------
    def __enter__(self) -> LLMSession:
        if self._implementation != RECORDING_ATTENTION:
            self.model.set_attn_implementation({"text_config": RECORDING_ATTENTION})
        lm = self.model.model.language_model
        self._handles.append(lm.register_forward_pre_hook(self._on_llm_call, with_kwargs=True))
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre_layer(index), with_kwargs=True))
            if index in self.prune_at:
                self._handles.append(layer.register_forward_hook(self._post_layer(index), with_kwargs=True))
            if index in self.observe_at:
                _OBSERVERS[id(layer.self_attn)] = self._observer(index)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self.layers:
            _OBSERVERS.pop(id(layer.self_attn), None)
        if self._implementation != RECORDING_ATTENTION:
            self.model.set_attn_implementation({"text_config": self._implementation})

    @property
    def prefill(self) -> bool:
        return self._calls == 1

    def _on_llm_call(self, module, args, kwargs):
        self._calls += 1
        mask = kwargs.get("attention_mask")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            raise NotApplicableError("in-LLM token removal needs a 2-D attention mask from generate (got a "
                                     f"{type(mask).__name__}); use a dynamic cache")
        self._decode_mask = mask
        if self.prefill:
            if kwargs.get("inputs_embeds", torch.empty(0, 0)).shape[1] != self._prompt_length:
                raise ValueError("in-LLM session: the first LLM call is not the prefill of the prepared prompt")
            batch = self.input_ids.shape[0]
            self.layer_lengths = [[0] * self.num_layers for _ in range(batch)]
            self.layer_visual = [[0] * self.num_layers for _ in range(batch)]
            self._set_current(torch.arange(self._prompt_length, device=self.input_ids.device).expand(batch, -1),
                              self.attention_mask.bool())

    def _set_current(self, source: torch.Tensor, valid: torch.Tensor) -> None:
        """The prefill sequence the next layers see, and its per-row token counts (one host sync per compaction)."""
        self._source, self._valid, self._view = source, valid, None
        visual = self.is_visual.gather(1, source.clamp(min=0)) & valid
        self._counts = (valid.sum(1).tolist(), visual.sum(1).tolist())

    def current_view(self) -> PrefillView:
        if self._view is None:
            self._view = self.view(self._source, self._valid)
        return self._view

    # --- hooks ----------------------------------------------------------------------------------------------------
    def _observer(self, index: int):
        def observe(module, query, key, value, mask, scaling):
            if not self.prefill:
                return
            start = time.perf_counter()
            attention = AttentionInputs(query, key, value, mask, scaling)
            view = self.current_view()
            for strategy in self.observe_at[index]:
                strategy.observe(index, attention, view, self.states[id(strategy)])
            self.strategy_s += time.perf_counter() - start
        return observe

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
        new = past + q_len - segment.valid.shape[1]  # generated tokens in this layer's cache after the update
        if self._decode_mask is not None:
            tail = self._decode_mask[:, self._prompt_length:].bool()
            if tail.shape[1] != new:
                raise RuntimeError(f"in-LLM session: layer {index} holds {new} generated tokens, the mask {tail.shape[1]}")
        else:
            tail = torch.ones(segment.valid.shape[0], new, dtype=torch.bool, device=segment.valid.device)
        keys = torch.cat([segment.valid, tail], dim=1)  # [B, kv]
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
            start = time.perf_counter()
            hidden = output[0] if isinstance(output, tuple) else output  # [B, S_cur, D]
            keep = self._valid.clone()
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
                    view = dataclasses.replace(self.view(self._source, keep), hidden=hidden)
            if torch.equal(keep, self._valid):
                self.strategy_s += time.perf_counter() - start
                return None
            idx = compact(keep, pad_side="left")  # [B, S'] current positions, -1 = pad
            cos, sin = kwargs["position_embeddings"]
            position_ids = kwargs.get("position_ids")
            valid = idx.attention_mask.bool()
            segment = _Segment(
                source=gather_tokens(self._source, idx.index, fill_value=-1),
                valid=valid,
                cos_sin=(_gather_seq(cos, idx.index, seq_dim=-2), _gather_seq(sin, idx.index, seq_dim=-2)),
                position_ids=None if position_ids is None else _gather_seq(position_ids, idx.index, seq_dim=-1),
                prefill_mask=_prefill_mask(valid),
            )
            self._segments[index + 1] = segment
            for later in range(index + 1, self.num_layers):
                self._layer_segment[later] = index + 1
            self._set_current(segment.source, segment.valid)
            self._record(index + 1)
            hidden = gather_tokens(hidden, idx.index)
            self.strategy_s += time.perf_counter() - start
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook

    def _record(self, layer: int) -> None:
        """Write the grid cells of every image still present from `layer` on into its selection record."""
        alive = torch.zeros_like(self.is_visual)
        rows = torch.arange(self._source.shape[0], device=alive.device)[:, None].expand_as(self._source)
        real = self._valid
        alive[rows[real], self._source[real]] = True
        for i, img in enumerate(self.images):
            row = img.record.sample
            here = alive[row] & (self.image[row] == i)
            img.record.llm_kept[layer] = self.cell[row, here.nonzero().squeeze(1)]

    # --- results ----------------------------------------------------------------------------------------------
    def per_sample_equivalent_tokens(self) -> list[float]:
        """Layer-averaged visual tokens of each batch row (METHODS.md, "FLOPs": equivalent tokens)."""
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


def _prefill_mask(valid: torch.Tensor) -> torch.Tensor | None:
    """[B, 1, S, S] bool causal mask over real tokens (pad rows attend to themselves), or None if nothing is padded."""
    if bool(valid.all()):
        return None
    num = valid.shape[1]
    causal = torch.ones(num, num, dtype=torch.bool, device=valid.device).tril()
    allowed = causal[None] & valid[:, None, :]
    allowed |= torch.eye(num, dtype=torch.bool, device=valid.device)[None] & ~valid[:, :, None]
    return allowed[:, None]
