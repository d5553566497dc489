"""Strategy base classes: stages, validated parameters, budgets and the score-based pruner mechanics.

A strategy is a small dataclass whose fields are its hyper-parameters (validated in ``__post_init__``). It acts at
one stage of the pipeline:

1. ``vision``    - inside the vision encoder (FlowCut, ToMe);
2. ``pre_llm``   - on encoder / projector output, before the LLM (FasterVLM, VisionZip, AIM merge, random, pool);
3. ``in_llm``    - removes visual tokens after a decoder layer (FastV, ATP, AIM prune);
4. ``attention`` - changes prefill masks, positions or scores (NAAViT, MMA, CCA, PAI);
5. ``decoding``  - changes logits with a second branch (VCD, DAMRO).

Pre-LLM reducers share one loop, `TokenReducer.reduce`: per image a target count (`target_count`); at least the
current count keeps the image unchanged (identity, exactly the unwrapped model), otherwise `reduce_image` reduces it.
Score-based pruners subclass `ScorePruner` and implement only `score`; the base class turns the budget into a
count, ranks deterministically (ties broken by lower index), restores raster order, gathers the kept tokens and
updates the selection record.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from vlmeff.kernels import gather_tokens

if TYPE_CHECKING:
    from vlmeff.connector import Connector, VisionProbe


class Stage(str, enum.Enum):
    VISION = "vision"
    PRE_LLM = "pre_llm"
    IN_LLM = "in_llm"
    ATTENTION = "attention"
    DECODING = "decoding"


# Stages the wrapper executes; a strategy of another stage is refused with a clear error.
IMPLEMENTED_STAGES = (Stage.VISION, Stage.PRE_LLM, Stage.IN_LLM, Stage.ATTENTION, Stage.DECODING)
POSITION_MODES = ("auto", "reindex", "preserve")


class StrategyError(ValueError):
    """Invalid parameters, an invalid composition, or a strategy that cannot apply to a model."""


class NotApplicableError(StrategyError):
    """The strategy cannot run on this model (e.g. it needs a [CLS] token the vision tower does not have)."""


class ProbeUnavailableError(NotApplicableError):
    """The vision probe cannot answer: the encoder's original tokens were reduced inside the encoder."""


@dataclass
class SelectionRecord:
    """What happened to the visual tokens of one image (one view / frame).

    kept_indices: original grid indices (raster order over `grid`) of the tokens that reach the LLM, in the order
    they reach it; for a merged token, the cell that represents it. `num_extra` tokens without a grid cell follow
    (none of the built-in methods makes such tokens). `merge_groups[j]` lists the original cells folded into
    token j (a token kept as is has a group of one) when a method merged; None when nothing was merged.
    """

    sample: int
    image: int
    grid: tuple[int, int, int]  # (t, h, w) of the token grid the indices refer to
    num_tokens: int
    kept_indices: torch.Tensor
    num_extra: int = 0
    merge_groups: list[list[int]] | None = None
    per_layer_kept: dict[int, int] = field(default_factory=dict)
    strategies: list[str] = field(default_factory=list)
    projected_tokens: int = 0  # tokens that went through the projector (for FLOPs)
    # in-LLM stage: {first decoder layer that runs without the removed tokens: grid cells still present from it on}
    llm_kept: dict[int, torch.Tensor] = field(default_factory=dict)
    # frame index within its video (LLaVA: the frame fed as this image; Qwen2-VL video: the temporal patch, i.e.
    # input frames 2f and 2f+1); None for a still image
    frame: int | None = None

    @property
    def num_kept(self) -> int:
        return int(self.kept_indices.numel()) + self.num_extra

    def to_dict(self) -> dict[str, Any]:
        return {
            "sample": self.sample, "image": self.image, "grid": list(self.grid), "num_tokens": self.num_tokens,
            "kept_indices": self.kept_indices.tolist(), "num_extra": self.num_extra,
            "merge_groups": self.merge_groups, "per_layer_kept": self.per_layer_kept,
            "strategies": self.strategies, "frame": self.frame,
            "llm_kept": {layer: cells.tolist() for layer, cells in self.llm_kept.items()},
        }


@dataclass(frozen=True, eq=False)
class PromptText:
    """The prompt of the sample (batch row) an image belongs to, for strategies conditioned on the text (CDPruner's
    instruction). The wrapper builds one per sample; every image of the sample shares it.

    input_ids: [S] the row's prompt as given to the wrapper (unreduced), padding removed;
    image_span: [S] bool, the tokens of image / video spans (`Connector.image_span_ids`: the placeholders and the
               family's wrapping tokens, e.g. Qwen's <|vision_start|> / <|vision_end|>);
    control:   [S] bool, tokens that never carry the user's words (`Connector.control_token_ids`: the image-span
               ids, the config's bos / eos / pad ids, the tokenizer's special tokens);
    opener:    the assistant-turn opener (`Connector.answer_opener_ids`), None when unknown (no processor);
    embed:     the language model's input embedding: ids [n] -> [n, D] in the LLM input space;
    tokenizer: the processor's tokenizer (None without a processor), to decode / re-encode the text.
    """

    input_ids: torch.Tensor
    image_span: torch.Tensor
    control: torch.Tensor
    opener: tuple[int, ...] | None
    embed: Any
    tokenizer: Any = None

    def instruction(self) -> torch.Tensor:
        """[n] positions (ascending, into `input_ids`) of the instruction: the user's text of the turn that holds
        the sample's images. Rule: the run of tokens right after the LAST image span, up to the first control token
        (Qwen's <|im_end|>) or the first assistant opener (LLaVA's "ASSISTANT:"), whichever comes first (else the
        row's end). When that run is empty or blank (decoded, when the tokenizer is known), e.g. because the text
        precedes the images: the run right before the FIRST image span, back to the previous control token or the
        row's start (on templates whose role names are plain text, "USER:" is part of it). Empty when neither
        holds text. Several images in one prompt share it."""
        ids, control = self.input_ids, self.control
        length = ids.numel()
        position = torch.arange(length, device=ids.device)
        spans = self.image_span.nonzero().squeeze(1)
        if not spans.numel():
            return position[:0]
        start = int(spans[-1]) + 1
        stops = (control & (position >= start)).nonzero().squeeze(1)
        end = int(stops[0]) if stops.numel() else length
        if self.opener and end - start >= len(self.opener):
            windows = ids[start:end].unfold(0, len(self.opener), 1)  # [end - start - n + 1, n]
            hits = (windows == torch.as_tensor(self.opener, device=ids.device)).all(1).nonzero().squeeze(1)
            end = start + int(hits[0]) if hits.numel() else end
        after = position[start:end]
        if not self._blank(after):
            return after
        first = int(spans[0])
        previous = (control & (position < first)).nonzero().squeeze(1)
        before = position[(int(previous[-1]) + 1 if previous.numel() else 0): first]
        return position[:0] if self._blank(before) else before

    def _blank(self, positions: torch.Tensor) -> bool:
        """True when the tokens at `positions` carry no text: none, or only whitespace (with a tokenizer)."""
        if not positions.numel():
            return True
        if self.tokenizer is None:
            return False
        return not self.tokenizer.decode(self.input_ids[positions].tolist(), skip_special_tokens=True).strip()


@dataclass
class ImageTokens:
    """The visual tokens of one image while strategies act on them (pre-LLM stage).

    features: [V_cur, D] vision features (LLaVA: before the projector; Qwen2-VL: after the PatchMerger, which
              is already the LLM space) or, once `projected`, LLM embeddings. A strategy with
              `token_space = "llm"` receives projected tokens (the wrapper projects first).
    index:    [V_cur] original grid index of each token: for a merged token, the index of the token it was
              merged into (its representative); -1 only for synthetic tokens without a grid cell. Order is the
              order the tokens reach the LLM (kept tokens in raster order, merged/contextual ones appended).
    probe:    lazy access to vision-encoder internals (attention rows) for this image, see `VisionProbe`.
    prompt:   the text of the image's sample (`PromptText`), set by the wrapper; None outside it.
    vision_features: [V_cur, D_vis] the same tokens before the projector, kept when they were projected
              (`Connector.project_images`) for a strategy that also needs the vision space (CDPruner's CLIP
              relevance); None before projection. On Qwen2-VL, where the reduction space is the LLM's, it equals
              `features`. A strategy that replaces `features` after projection without `keep` leaves it stale, so
              readers check that its rows match.
    """

    features: torch.Tensor
    index: torch.Tensor
    probe: VisionProbe
    image: int
    record: SelectionRecord
    projected: bool = False  # True once features are in the LLM embedding space
    # groups[j]: original grid indices folded into token j (None while no strategy has merged anything)
    groups: list[list[int]] | None = None
    frame: int | None = None  # frame index within its video (see SelectionRecord.frame); None for a still image
    prompt: PromptText | None = None
    vision_features: torch.Tensor | None = None

    @property
    def num_original(self) -> int:
        return self.record.num_tokens

    def keep(self, positions: torch.Tensor) -> ImageTokens:
        """The tokens at `positions` [k] (in that order), with their indices, merge groups and vision features."""
        features = gather_tokens(self.features[None], positions[None])[0]  # [k, D]
        groups = None if self.groups is None else [self.groups[j] for j in positions.tolist()]
        vision = self.vision_features
        if vision is not None and vision.shape[0] == self.features.shape[0]:
            vision = gather_tokens(vision[None], positions[None])[0]
        else:
            vision = None
        return dataclasses.replace(self, features=features, index=self.index[positions], groups=groups,
                                   vision_features=vision)

    def finish_record(self) -> SelectionRecord:
        """Write what reaches the LLM into the record: kept (representative) indices, extras, merge groups."""
        self.record.kept_indices = self.index[self.index >= 0]
        self.record.num_extra = int((self.index < 0).sum())
        self.record.merge_groups = self.groups
        return self.record


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Coerce a value parsed from a spec string ("64", "0.5", "true") to the field's annotated type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own message
            return _coerce(value, options[0], name)
        for arg in options:
            try:
                return _coerce(value, arg, name)
            except (TypeError, ValueError):
                continue
        raise StrategyError(f"{name}={value!r}: expected {' or '.join(a.__name__ for a in options)}")
    if origin is typing.Literal:
        if value not in args:
            raise StrategyError(f"{name}={value!r}: expected one of {', '.join(map(repr, args))}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise StrategyError(f"{name}={value!r}: expected a boolean (true/false)")
    if annotation is int:
        if isinstance(value, bool):
            raise StrategyError(f"{name}={value!r}: expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise StrategyError(f"{name}={value!r}: expected an integer")
    if annotation is float:
        if isinstance(value, bool):
            raise StrategyError(f"{name}={value!r}: expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise StrategyError(f"{name}={value!r}: expected a number") from None
    if annotation is str:
        return str(value)
    return value


_INTERVAL = re.compile(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s\])]+)\s*([\])])\s*")


def in_interval(value: float, interval: str) -> bool:
    """Whether `value` lies in `interval`, written as in mathematics: "[0, 1]", "(0, 1]", "[1, inf)", "(-inf, 0)"."""
    m = _INTERVAL.fullmatch(interval)
    if m is None:
        raise ValueError(f"interval {interval!r}: expected e.g. '[0, 1]', '(0, inf)'")
    low, high = float(m.group(2)), float(m.group(3))
    above = value >= low if m.group(1) == "[" else value > low
    below = value <= high if m.group(4) == "]" else value < high
    return above and below


def check_params(strategy: Strategy) -> None:
    """The checks every strategy gets at construction: every float parameter is finite (NaN or infinity would run
    with a silently different meaning: a NaN compares False with every bound), and every parameter named in the
    class's `param_ranges` lies in its interval (None, where allowed, is not checked)."""
    for f in dataclasses.fields(strategy):
        value = getattr(strategy, f.name)
        if f.init and isinstance(value, float) and not math.isfinite(value):
            raise StrategyError(f"{strategy.name}.{f.name}={value}: must be a finite number")
    for name, interval in type(strategy).param_ranges.items():
        if not any(f.name == name and f.init for f in dataclasses.fields(strategy)):
            raise TypeError(f"{type(strategy).__name__}.param_ranges names {name!r}, which is not a parameter")
        value = getattr(strategy, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise StrategyError(f"{strategy.name}.{name}={value!r}: expected a number in {interval}")
        if not in_interval(value, interval):
            raise StrategyError(f"{strategy.name}.{name}={value}: must be in {interval}")


def _checking(post_init):
    """`post_init` preceded by `check_params` (installed on every Strategy subclass that defines __post_init__, so
    no subclass can skip the generic checks by not calling its parent's)."""
    @functools.wraps(post_init)
    def checked(self, *args, **kwargs):
        check_params(self)
        return post_init(self, *args, **kwargs)

    checked.checks_params = True
    return checked


@dataclass
class Strategy:
    """Base class of every strategy. Subclasses are dataclasses; class attributes describe them for `vlmeff list`.

    Every strategy's parameters are checked at construction by `check_params` (finite floats, `param_ranges`)
    before the class's own `__post_init__` checks run."""

    name: ClassVar[str]
    stage: ClassVar[Stage]
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    training_free: ClassVar[bool] = True
    experimental: ClassVar[bool] = False
    # True when the method needs the complete, unreduced token grid (it cannot follow another reduction).
    needs_full_grid: ClassVar[bool] = False
    # "vision": acts on vision features (before the projector); "llm": on projected tokens
    token_space: ClassVar[str] = "vision"
    # Fields that set how many tokens survive (the budget axis of an eval sweep); each must be a dataclass field.
    # `vlmeff eval` sweeps --budgets over `keep` only when it is declared here and no budget field was given.
    budget_params: ClassVar[tuple[str, ...]] = ()
    # Declared ranges of numeric parameters, e.g. {"shift": "[-1, 1]", "seed": "[0, inf)"}: checked at construction
    # (`check_params`), for parameters whose __post_init__ does not check them already.
    param_ranges: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "checks_params", False):
            cls.__post_init__ = _checking(own)

    def __post_init__(self):
        check_params(self)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Strategy:
        """Build from a dict of raw values (strings from a spec, or YAML scalars), coercing to field types."""
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(params) - fields)
        if unknown:
            raise StrategyError(
                f"{cls.name}: unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(sorted(fields)) or 'none'}"
            )
        kwargs = {k: _coerce(v, hints[k], f"{cls.name}.{k}") for k, v in params.items()}
        return cls(**kwargs)

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def spec(self) -> str:
        """Canonical spec string, e.g. ``fastervlm:keep=64,positions=auto`` (parsable by `parse_spec`)."""
        return self._spec_without(())

    def family(self) -> str:
        """The canonical spec without the budget parameters, e.g. ``fastervlm:positions=auto,scorer=cls``: what the
        runs of one method along a budget sweep share (one line per family in the eval plot)."""
        return self._spec_without(self.budget_params)

    def _spec_without(self, excluded: tuple[str, ...]) -> str:
        items = ",".join(f"{k}={v}" for k, v in self.params().items() if v is not None and k not in excluded)
        return f"{self.name}:{items}" if items else self.name

    def check_applicable(self, connector: Connector) -> None:
        """Raise `NotApplicableError` if this strategy cannot run on the connector's model."""

    def expand(self, connector: Connector) -> list[Strategy]:
        """The strategies that run for this one on the connector's model: itself, or its per-stage parts when the
        method acts at several stages there (FlowCut on Qwen2-VL: inside the encoder, then inside the LLM)."""
        return [self]

    def check_after(self, previous: list[Strategy]) -> None:
        """Raise `StrategyError` if this strategy cannot follow `previous` (same or earlier stages)."""
        if self.needs_full_grid and any(isinstance(p, TokenReducer) for p in previous):
            names = ", ".join(p.name for p in previous if isinstance(p, TokenReducer))
            raise StrategyError(f"{self.name} needs the full token grid and cannot follow the reduction by {names}")

    def check_before(self, later: list[Strategy]) -> None:
        """Raise `StrategyError` if this strategy cannot be followed by `later` (same or later stages)."""

    def llm_flops(self, config, text: int, visual: int):
        """Prefill FLOPs of the LLM side (`vlmeff.flops.FlopsBreakdown`: modules the strategy adds as `projector`,
        decoder layers + LM head as `llm`) of a row with `text` text and `visual` visual tokens, when the strategy
        changes the computation; None (the default) when it does not: a dense mask or a score edit saves nothing."""
        return None


@dataclass
class TokenReducer(Strategy):
    """A strategy that removes or merges visual tokens. `positions` picks the position ids of what is kept:
    reindex (contiguous ids), preserve (original ids of kept tokens), auto (the connector's default: reindex on
    LLaVA, preserve on Qwen2-VL whose M-RoPE ids are always gathered)."""

    positions: str = "auto"

    def __post_init__(self):
        if self.positions not in POSITION_MODES:
            raise StrategyError(f"{self.name}.positions={self.positions!r}: expected one of {', '.join(POSITION_MODES)}")

    def reduce(self, images: list[ImageTokens]) -> list[ImageTokens]:
        """Pre-LLM stage: the reduced tokens of each image; every record lists the strategy. An image whose
        `target_count` is at least its current token count is returned unchanged (identity: exactly the unwrapped
        model), any other goes through `reduce_image`."""
        out = []
        for img, position in zip(images, positions_in_sample(images)):
            k = self.target_count(img)
            img.record.strategies.append(self.name)
            out.append(img if k >= img.features.shape[0] else self.reduce_image(img, k, position))
        return out

    def target_count(self, image: ImageTokens) -> int:
        """Pre-LLM stage: how many tokens of `image` survive (>= its current count keeps it unchanged)."""
        raise NotImplementedError

    def reduce_image(self, image: ImageTokens, k: int, position: int) -> ImageTokens:
        """Pre-LLM stage: `image` reduced to k (< its current count) tokens, record updated through the returned
        tokens. position: how many images of the same sample precede it (`positions_in_sample`)."""
        raise NotImplementedError

    def prune_layer(self, layer_index: int, layer: torch.nn.Module, hidden_in: torch.Tensor,
                    hidden_out: torch.Tensor, state: dict[str, Any]) -> torch.Tensor | None:
        """Vision stage: called by the connector after encoder block `layer_index` (0-based) of one encode.

        hidden_in / hidden_out: [I, T, D] input and output of the block for all images of the batch ([CLS] first).
        state: one dict per strategy and encode. The connector seeds it with read-only context: "feature_layer"
        (0-based block whose output LLaVA reads), "num_patches" (V before any reduction) and "attention_inputs"
        ((layer, hidden_in) -> (q_cls [I, 1, H*hd], k [I, T, H*hd], v [I, T, H*hd], heads, scale): what the block
        itself computed from hidden_in, captured, not recomputed); the strategy
        keeps its own entries (e.g. a cumulative score, which it gathers itself when it prunes).
        Returns the positions to keep, [I, T'] ascending with position 0 ([CLS]) kept and the same T' for every
        image, or None to keep everything.
        """
        raise NotImplementedError


@dataclass
class Budget:
    """Token budget: exactly one of `keep` (tokens per image) or `ratio` (kept fraction in (0, 1])."""

    keep: int | None = None
    ratio: float | None = None

    def _check_budget(self, name: str) -> None:
        if (self.keep is None) == (self.ratio is None):
            raise StrategyError(f"{name}: give exactly one of keep=<tokens per image> or ratio=<fraction in (0, 1]>")
        if self.keep is not None and self.keep < 1:
            raise StrategyError(f"{name}.keep={self.keep}: must be >= 1 (keep >= the token count keeps everything)")
        if self.ratio is not None and not (0.0 < self.ratio <= 1.0):
            raise StrategyError(f"{name}.ratio={self.ratio}: must be in (0, 1]")

    def kept_count(self, num_tokens: int) -> int:
        """k for an image of `num_tokens` tokens: min(keep, V), or round(V * ratio) (at least 1)."""
        if self.keep is not None:
            return min(self.keep, num_tokens)
        return max(1, min(num_tokens, round(num_tokens * self.ratio)))


@dataclass
class BudgetReducer(TokenReducer, Budget):
    """A reducer with a `Budget` (validated): per image, k = round(V_original * ratio), or `keep` tokens."""

    budget_params = ("keep", "ratio")

    def __post_init__(self):
        TokenReducer.__post_init__(self)
        self._check_budget(self.name)

    def target_count(self, image: ImageTokens) -> int:
        """`ratio` counts from the image's original tokens (a later strategy keeps a fraction of the image, not of
        what an earlier one left); `keep` is the count itself."""
        return self.kept_count(image.num_original) if self.ratio is not None else self.keep


def positions_in_sample(images: list[ImageTokens]) -> list[int]:
    """For each image, how many images of the same sample (batch row) come before it."""
    seen: dict[int, int] = {}
    positions = []
    for img in images:
        positions.append(seen.get(img.record.sample, 0))
        seen[img.record.sample] = positions[-1] + 1
    return positions


def topk_sorted(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, ties broken by lower index, returned in ascending (raster) order.

    score: [..., N] -> [..., k]
    """
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices  # stable: equal scores keep index order
    return order[..., :k].sort(dim=-1).values


@dataclass
class ScorePruner(BudgetReducer):
    """Keep the top-k tokens of each image by `score` (higher = keep); kvpress-style: subclasses define `score`."""

    def score(self, image: ImageTokens) -> torch.Tensor:
        """Return the score of each current token of one image: [V_cur] float32, higher = keep."""
        raise NotImplementedError

    def reduce_image(self, image: ImageTokens, k: int, position: int) -> ImageTokens:
        return image.keep(topk_sorted(self.score(image), k))  # top-k, raster order


@dataclass
class LLMPruner(TokenReducer):
    """Base of in-LLM strategies: during prefill, visual tokens are removed after some decoder layers.

    The mechanics live in `vlmeff.llm_stage` (one place): a recording attention function registered with
    transformers hands the strategy the attention inputs of the layers it reads (`observe_layers`), and after each
    layer of `prune_layers` the strategy's `select` says which of each sample's current visual tokens stay; the
    others are removed from the hidden states of all later layers (their KV caches hold only what is kept; earlier
    layers keep theirs). Positions are always the original ones ("preserve"), in prefill and in every decode step.
    """

    stage = Stage.IN_LLM

    def __post_init__(self):
        TokenReducer.__post_init__(self)
        if self.positions not in ("auto", "preserve"):
            raise StrategyError(f"{self.name}.positions={self.positions!r}: in-LLM removal keeps the original "
                                "positions; expected 'auto' or 'preserve'")

    def observe_layers(self, num_layers: int) -> set[int]:
        """Decoder layers (0-based) whose attention inputs `observe` receives during prefill."""
        return set(self.prune_layers(num_layers))

    def prune_layers(self, num_layers: int) -> list[int]:
        """Decoder layers (0-based) after which `select` is called; the next layer sees the reduced sequence."""
        raise NotImplementedError

    def observe(self, layer: int, attention: Any, view: Any, state: dict[str, Any]) -> None:
        """Store what `select` will need from `attention` (`vlmeff.llm_stage.AttentionInputs`) in `state`."""

    def select(self, layer: int, view: Any, state: dict[str, Any]) -> list[torch.Tensor | None]:
        """Per sample, the positions (into `view.samples[b].visual`, ascending) of the visual tokens to keep after
        `layer`, or None to keep all of that sample's visual tokens. `view`: `vlmeff.llm_stage.PrefillView`."""
        raise NotImplementedError

    @staticmethod
    def keep_top(score: torch.Tensor, k: int) -> torch.Tensor | None:
        """`select`'s answer for one sample keeping its k best visual tokens by `score` [n]: None (keep all) when
        k >= n, else their positions ascending (`topk_sorted`)."""
        return None if k >= score.numel() else topk_sorted(score, k)


@dataclass
class AttentionStrategy(Strategy):
    """Base of attention-stage strategies: they change what the LLM attends to, not which tokens it gets.

    Everything runs through `vlmeff.llm_stage.LLMSession` on the token layout (`vlmeff.layout.TokenLayout`, which
    follows every reduction, so masks and positions follow the kept tokens) and the attention router:
    - `positions(layout)`: a position rule, applied once after the splice (generate continues it in decode);
    - `mask_functions(layout, state)`: index predicates (transformers' `masking_utils` style) or-ed with causal /
      and-ed onto it for the prefill mask (re-evaluated on each compacted layout); decode steps stay causal;
    - `score_layers` / `edit_scores`: an edit of the last query row's pre-softmax scores in those layers, in every
      call (prefill and decode steps);
    - `prepare(images, layout, context, state)`: per-call setup from the tokens that reach the LLM (their probes);
    - `install(router, layout, images, state)`: any other intervention on the call's router (SAISA's layer);
    - `llm_flops(config, text, visual)`: the LLM-side FLOPs when the strategy changes the computation.
    A dense mask saves no FLOPs: those strategies change accuracy, not cost.
    """

    stage = Stage.ATTENTION

    def positions(self, layout):
        """The layout with this strategy's position ids (return `layout` itself to keep the positions)."""
        return layout

    def mask_functions(self, layout, state: dict[str, Any]) -> tuple[list, list]:
        """(or_functions, and_functions) over `layout`'s current positions for the prefill mask."""
        return [], []

    def score_layers(self, num_layers: int) -> list[int]:
        """Decoder layers (0-based) whose last query row `edit_scores` edits."""
        return []

    def edit_scores(self, layer: int, scores: torch.Tensor, layout, image_keys: torch.Tensor,
                    state: dict[str, Any]) -> torch.Tensor:
        """scores [B, H, K] float32 (scaled, masked keys -inf) of the last query row -> edited scores.
        image_keys: [B, K] bool, the keys that are visual tokens of the current layout."""
        return scores

    def prepare(self, images: list[ImageTokens], layout, context: dict[str, Any], state: dict[str, Any]) -> None:
        """Per-call setup (before the prefill) from the tokens that reach the LLM."""

    def install(self, router, layout, images: list[ImageTokens], state: dict[str, Any]) -> None:
        """Register interventions beyond masks, positions and score edits on this call's `vlmeff.router.Router`
        (per-call argument rewrites, layer hooks): for a strategy that changes the computation itself (the SAISA
        layer's key-only visual rows). Called after the session registered its own."""
