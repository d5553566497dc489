"""Which vlmeff strategies run inside vLLM, how many tokens they keep, and how a spec travels with an image.

No vLLM import here: the rules are plain vlmeff and are tested without vLLM.

vLLM fixes an image's placeholder count when the prompt is processed, before the vision encoder runs (the
processor's `_get_prompt_updates`), and its scheduler, KV cache and positions follow that count. So a strategy can
run there only when
1. it acts before the LLM (pre-LLM stage): the model's `embed_multimodal` returns the kept tokens;
2. its kept count is a function of the image's token grid alone (`kept_count`), computed by the strategy's own code;
   WHICH tokens it keeps may depend on the features (and the vision probe);
3. it needs nothing vLLM's encoder does not see (the prompt text) and writes no synthetic tokens without a cell;
4. it is one strategy (a composition would have to be checked for a grid-only count as a whole).
`SERVABLE` lists the strategies verified token for token against vlmeff's transformers path (tests/test_vllm.py);
every other name is refused with the reason.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from vlmeff.spec import build_pipeline, describe, parse_spec
from vlmeff.strategy import (
    ImageTokens,
    NotApplicableError,
    SelectionRecord,
    Stage,
    Strategy,
    StrategyError,
    TokenReducer,
)

# name -> (families it runs on, whether its selection depends on the image's position in its prompt)
SERVABLE: dict[str, tuple[tuple[str, ...], bool]] = {
    "fastervlm": (("llava", "qwen2-vl"), False),  # Qwen: scorer=global_query (check_applicable refuses cls)
    "visionzip": (("llava",), False),
    "random": (("llava", "qwen2-vl"), True),  # seeded per (seed, tokens, position in the prompt)
    "pool": (("llava", "qwen2-vl"), False),
    "divprune": (("llava", "qwen2-vl"), False),
}

STAGE_REASONS = {
    Stage.VISION: "it prunes inside the vision encoder, block by block, which vLLM's encoders do not expose",
    Stage.IN_LLM: "it removes tokens between decoder layers, but vLLM's scheduler, paged KV cache and positions fix "
                  "each request's sequence before the LLM runs",
    Stage.ATTENTION: "it changes attention masks, positions or scores inside the LLM, which vLLM's attention "
                     "backends take no per-token input for",
    Stage.DECODING: "it combines a second contrast branch with each decoding step, which vLLM's sampler does not run",
}

NAME_REASONS = {
    "cdpruner": "it conditions on the prompt's instruction text, which vLLM's vision encoder does not see",
    "dart-embed": "its kept count is fixed by the grid but it is not verified in vLLM yet",
    "vispruner": "its kept count is fixed by the grid but it is not verified in vLLM yet",
    "aim": "its kept count is fixed by the grid but it is not verified in vLLM yet",
}

SPEC_BYTES = 256  # a spec travels with each image as this many bytes (utf-8, zero padded)
MODEL_SPEC_KEY = "vlmeff_strategy"  # config attribute (hf_overrides) and per-request mm_processor_kwargs key


class ServeError(StrategyError):
    """A strategy (or spec) that cannot run inside vLLM; the message says why and what runs instead."""


def _servable_names(family: str) -> str:
    return ", ".join(name for name, (families, _) in SERVABLE.items() if family in families)


@dataclass(frozen=True)
class _Family:
    """What `Strategy.check_applicable` reads of a connector, for a model family served by vLLM."""

    name: str
    has_cls: bool


@functools.lru_cache(maxsize=256)
def resolve(spec: str, family: str, has_cls: bool = True) -> TokenReducer | None:
    """The one strategy a spec asks for on `family` ("llava" or "qwen2-vl"), checked for vLLM; None for vanilla.

    Raises `ServeError` (or vlmeff's own `StrategyError` / `NotApplicableError` for an invalid spec or a strategy the
    model cannot run) with the reason."""
    strategies = build_pipeline(parse_spec(spec))
    if not strategies:
        return None
    if len(strategies) > 1:
        raise ServeError(f"{describe(strategies)}: vlmeff's vLLM plugin runs one strategy per image, not a "
                         f"composition; give one of: {_servable_names(family)}")
    strategy = strategies[0]
    refuse = f"{strategy.name} cannot run inside vLLM: "
    if strategy.stage is not Stage.PRE_LLM:
        raise ServeError(refuse + STAGE_REASONS[strategy.stage] + f". Strategies that run in vLLM on {family}: "
                         f"{_servable_names(family)}")
    if strategy.name not in SERVABLE:
        reason = NAME_REASONS.get(strategy.name, "it is not verified to keep a count fixed by the image grid")
        raise ServeError(refuse + reason + f". Strategies that run in vLLM on {family}: {_servable_names(family)}")
    families, _ = SERVABLE[strategy.name]
    if family not in families:
        raise ServeError(f"{strategy.name} does not run on {family} in vLLM; there: {_servable_names(family)}")
    strategy.check_applicable(_Family(family, has_cls))
    positions = getattr(strategy, "positions", "auto")
    if family == "llava" and positions == "preserve":
        raise ServeError(f"{strategy.name}.positions=preserve: on LLaVA vLLM numbers the kept tokens contiguously "
                         "(positions=reindex, vlmeff's LLaVA default); use positions=auto or reindex")
    if family == "qwen2-vl" and positions == "reindex":
        raise NotApplicableError(f"{strategy.name}.positions=reindex: Qwen2-VL keeps the M-RoPE ids of kept tokens; "
                                 "use positions=auto or preserve")
    return strategy


def canonical(spec: str | None) -> str:
    """The canonical spec string (presets and YAML expanded): what is stored and hashed; "" for vanilla."""
    if spec is None:
        return ""
    strategies = parse_spec(spec)
    return describe(strategies) if strategies else ""


def uses_position(strategy: Strategy | None) -> bool:
    """True when the strategy's selection depends on the image's position within its prompt (random's seed)."""
    return strategy is not None and SERVABLE.get(strategy.name, ((), False))[1]


class _ZeroProbe:
    """A vision probe of zeros for the stand-in image `kept_count` reduces: the count must not depend on scores."""

    def __init__(self, num_tokens: int):
        self.num_tokens = num_tokens

    def cls_attention(self, image, block=None):
        return torch.zeros(1, self.num_tokens)

    def cls_attention_one_head(self, image, block=None):
        return torch.zeros(self.num_tokens)

    def keys(self, image, block=None):
        return torch.zeros(self.num_tokens + 1, 1)

    def global_query_attention(self, image):
        return torch.zeros(self.num_tokens)


def stand_in(grid: tuple[int, int, int], features: torch.Tensor | None = None, probe=None, image: int = 0,
             sample: int = 0) -> ImageTokens:
    """The unreduced tokens of one image of `grid` (t, h, w), as vlmeff's connectors hand them to strategies."""
    count = grid[0] * grid[1] * grid[2]
    features = torch.zeros(count, 1) if features is None else features
    index = torch.arange(count, device=features.device)
    record = SelectionRecord(sample=sample, image=image, grid=tuple(grid), num_tokens=count, kept_indices=index)
    return ImageTokens(features=features, index=index, probe=probe or _ZeroProbe(count), image=image, record=record)


def reduce_image(strategy: TokenReducer | None, image: ImageTokens, position: int) -> ImageTokens:
    """`TokenReducer.reduce` for one image at `position` within its prompt: identity when the strategy's target
    count covers the image, else the strategy's `reduce_image`. The record lists the strategy."""
    if strategy is None:
        return image
    image.record.strategies.append(strategy.name)
    k = strategy.target_count(image)
    return image if k >= image.features.shape[0] else strategy.reduce_image(image, k, position)


_COUNTS: dict[tuple[str, tuple[int, int, int]], int] = {}


def kept_count(strategy: TokenReducer | None, grid: tuple[int, int, int]) -> int:
    """Tokens the strategy keeps of an image with token grid `grid`: the strategy's own reduction run on a stand-in
    image of that grid (zero features, zero scores), so the count is the strategy's, not a re-derivation (pool keeps
    its pooled grid, visionzip dominant + contextual). The served model checks every real image against it."""
    grid = tuple(int(g) for g in grid)
    if strategy is None:
        return grid[0] * grid[1] * grid[2]
    key = (strategy.spec(), grid)
    if key not in _COUNTS:
        _COUNTS[key] = int(reduce_image(strategy, stand_in(grid), 0).features.shape[0])
    return _COUNTS[key]


def encode_spec(spec: str) -> torch.Tensor:
    """[SPEC_BYTES] uint8: the canonical spec as it travels with each image through vLLM's multimodal inputs."""
    data = spec.encode()
    if len(data) > SPEC_BYTES:
        raise ServeError(f"strategy spec {spec!r} is longer than {SPEC_BYTES} bytes")
    out = torch.zeros(SPEC_BYTES, dtype=torch.uint8)
    out[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    return out


def decode_spec(data: torch.Tensor) -> str:
    raw = bytes(data.to(torch.uint8).cpu().tolist())
    return raw.rstrip(b"\0").decode()


def check_servable(spec: str) -> None:
    """Raise (with the reason) unless the spec runs inside vLLM on at least one served family (LLaVA or Qwen2-VL);
    whether it runs on the model at hand is checked when vLLM builds it."""
    errors = []
    for family, has_cls in (("llava", True), ("qwen2-vl", False)):
        try:
            resolve(spec, family, has_cls)
            return
        except StrategyError as e:
            errors.append(e)
    raise errors[0]
