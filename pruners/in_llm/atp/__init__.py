"""ATP (adaptive token pruning, ATP-LLaVA, arXiv 2412.00447): training-free approximation `atp` (docs/methods.md "ATP").

EXPERIMENTAL: the paper's pruning module is learned and no official code exists; `atp` applies its scores
training-free with fixed mass thresholds. `atp-learned` (vlmeff.pruners.in_llm.atp.learned) learns the thresholds as the
paper does, from the same scores (`ATPScores`).

At each ATP point (after decoder layers {2, 6, 12, 18} of a 32-layer LLM, scaled as round(p L / 32) for other
depths), per sample, from that layer's attention probabilities A (softmax over all keys, mean over heads):
  S_self[j]  = mean over the current visual queries i >= j of A[i, j];
  S_cross[j] = mean over the text queries after the image of A[t, j];
  each min-max normalised per sample; S_red = (S_self + S_cross) / 2.
Keep the smallest set of visual tokens whose share of sum(S_red) reaches m_l (default 0.95, 0.90, 0.85, 0.80; a
calibration `shift` is added to every m_l, clamped to [0, 1]), clamped to [k_min, k_max] tokens, united with a
uniform spatial lattice of the alive tokens (grid cells with row and column divisible by the stride 2, 4, 4, 8: the
"spatial augmented pruning" branch). The rest is removed for all later layers; original positions; sequence order.
Counts are instance-adaptive. `calibrate(...)` finds the shift whose mean equivalent-token count (layer-averaged
visual tokens) hits a budget on a calibration set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from vlmeff.registry import register_strategy
from vlmeff.strategy import LLMPruner, StrategyError

PUBLISHED_POINTS = (2, 6, 12, 18)  # of 32 layers
PUBLISHED_MASS = (0.95, 0.90, 0.85, 0.80)
PUBLISHED_STRIDES = (2, 4, 4, 8)


def _numbers(text: str | None, name: str, default: tuple, cast: type = float) -> tuple:
    """Numbers separated by '/' (cast=float: masses; cast=int: layers, strides, where "2.5" or "inf" is an error, not
    silently 2 or a crash)."""
    if text is None:
        return default
    try:
        return tuple(cast(x) for x in str(text).split("/"))
    except ValueError:
        kind, example = ("whole numbers", "2/6/12/18") if cast is int else ("numbers", "0.95/0.9/0.85/0.8")
        raise StrategyError(f"atp.{name}={text!r}: expected {kind} separated by '/' (e.g. {example})") from None


@dataclass
class ATPScores(LLMPruner):
    """What both ATP variants share: the ATP points and the raw redundancy scores of every sample's visual tokens.

    After `observe` at a point, state["scores"][b] is (S_self [n], S_cross [n]) of sample b's current visual tokens
    (None for a sample without any), computed from the layer's attention probabilities (softmax over all keys, mean
    over heads): S_self[j] = mean over the current visual queries i >= j of A[i, j]; S_cross[j] = mean over the
    text queries after the image of A[t, j] (zeros when there is none).
    """

    points: str | None = None

    def __post_init__(self):
        LLMPruner.__post_init__(self)
        self._points = None if self.points is None else _numbers(self.points, "points", (), int)

    def point_count(self) -> int:
        return len(self._points) if self._points is not None else len(PUBLISHED_POINTS)

    def prune_layers(self, num_layers: int) -> list[int]:
        points = self._points or tuple(round(p * num_layers / 32) for p in PUBLISHED_POINTS)
        if list(points) != sorted(set(points)):
            raise StrategyError(f"{self.name}: points {points} for a {num_layers}-layer LLM are not strictly "
                                "increasing; give points= explicitly")
        return list(points)

    def observe(self, layer, attention, view, state) -> None:
        firsts = [int(s.visual[0]) for s in view.samples if s.visual.numel()]
        if not firsts:
            state["scores"] = [None] * len(view.samples)
            return
        start = min(firsts)
        rows = torch.arange(start, attention.query.shape[2], device=attention.query.device)
        probs = attention.head_mean_probabilities(rows)  # [B, R, S] mean over heads
        state["scores"] = [None if sample.visual.numel() == 0 else
                           redundancy_scores(probs[b], sample.visual.to(rows.device),
                                             sample.text_after.to(rows.device), start)
                           for b, sample in enumerate(view.samples)]


def redundancy_scores(probs: torch.Tensor, visual: torch.Tensor, text: torch.Tensor,
                      start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_self [n], S_cross [n]) of one sample (docs/methods.md "ATP").

    probs: [R, S] attention probabilities (mean over heads) of the query rows start, start + 1, ...;
    visual: [n] positions of the sample's visual tokens; text: [t] positions of the text queries after the image.
    """
    block = probs[(visual - start)[:, None], visual[None, :]]  # [n, n] A[i, j] among visual tokens
    n = visual.numel()
    s_self = block.tril().sum(0) / torch.arange(n, 0, -1, device=block.device)  # mean over i >= j
    if text.numel() == 0:
        return s_self, torch.zeros_like(s_self)
    return s_self, probs[(text - start)[:, None], visual[None, :]].mean(0)


def redundancy(s_self: torch.Tensor, s_cross: torch.Tensor) -> torch.Tensor:
    """S_red [n] in [0, 1]: the mean of the per-sample min-max normalised S_self and S_cross."""
    return (_minmax(s_self) + _minmax(s_cross)) / 2


@register_strategy
@dataclass
class ATP(ATPScores):
    """Instance-adaptive in-LLM pruning at several points (training-free approximation of ATP-LLaVA; experimental).

    points / mass / strides: '/'-separated lists, one entry per point (points are 0-based layers after which tokens
    are removed; default scaled from the paper's 2/6/12/18 of 32). shift: added to every mass (see `calibrate`).
    """

    name = "atp"
    summary = ("in-LLM, EXPERIMENTAL training-free ATP: redundancy (self + cross attention) mass thresholds + spatial "
               "lattice at 4 points, instance-adaptive counts (calibrate to a budget with `vlmeff calibrate`)")
    paper = "arXiv 2412.00447"
    experimental = True
    shift_range = (-1.0, 0.05)  # bisection bounds of `calibrate`
    budget_params = ("shift",)  # what `calibrate` tunes to a budget; mass, strides, k_min / k_max define the variant
    param_ranges = {"shift": "[-1, 1]"}  # added to masses in (0, 1] and clamped: beyond +-1 nothing changes

    mass: str | None = None
    strides: str | None = None
    shift: float = 0.0
    k_min: int = 1
    k_max: int | None = None

    def __post_init__(self):
        ATPScores.__post_init__(self)
        self._mass = _numbers(self.mass, "mass", PUBLISHED_MASS)
        self._strides = _numbers(self.strides, "strides", PUBLISHED_STRIDES, int)
        count = self.point_count()
        if len(self._mass) != count or len(self._strides) != count:
            raise StrategyError(f"atp: {count} points need {count} mass values and {count} strides "
                                f"(got mass={self._mass}, strides={self._strides})")
        if any(not 0.0 < m <= 1.0 for m in self._mass):
            raise StrategyError(f"atp.mass={self.mass!r}: every value must be in (0, 1]")
        if any(s < 1 for s in self._strides):
            raise StrategyError(f"atp.strides={self.strides!r}: every stride must be >= 1")
        if self.k_min < 0 or (self.k_max is not None and self.k_max < max(self.k_min, 1)):
            raise StrategyError(f"atp: need 0 <= k_min <= k_max (got k_min={self.k_min}, k_max={self.k_max})")

    def select(self, layer, view, state) -> list[torch.Tensor | None]:
        point = self.prune_layers(view.num_layers).index(layer)
        mass = min(max(self._mass[point] + self.shift, 0.0), 1.0)
        stride = self._strides[point]
        kept = []
        for sample, scores in zip(view.samples, state["scores"]):
            if scores is None:
                kept.append(None)
                continue
            score = redundancy(*scores)
            n = score.numel()
            order = torch.sort(score, descending=True, stable=True).indices  # ties: lower position first
            share = score[order].cumsum(0) / score.sum().clamp(min=1e-12)
            count = int((share < mass - 1e-9).sum()) + 1 if mass > 0 else 0  # smallest prefix reaching the mass
            count = max(self.k_min, min(count, n, self.k_max if self.k_max is not None else n))
            keep = torch.zeros(n, dtype=torch.bool, device=score.device)
            keep[order[:count]] = True
            keep |= _lattice(sample.cells, sample.images, view.grids, stride).to(score.device)
            kept.append(keep.nonzero().squeeze(1) if not bool(keep.all()) else None)
        return kept


def _minmax(x: torch.Tensor) -> torch.Tensor:
    return (x - x.min()) / (x.max() - x.min()).clamp(min=1e-12)


def _rows_cols(cells: torch.Tensor, images: torch.Tensor,
               grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """([n], [n]) grid row and column of each token in its image (frames of a video share the grid)."""
    widths = torch.tensor([g[2] for g in grids], device=cells.device)[images]
    heights = torch.tensor([g[1] for g in grids], device=cells.device)[images]
    return (cells // widths) % heights, cells % widths


def _lattice(cells: torch.Tensor, images: torch.Tensor, grids: list[tuple[int, int, int]], stride: int) -> torch.Tensor:
    """[n] bool: tokens whose grid cell (row, column) of their image both divide by `stride`."""
    row, col = _rows_cols(cells, images, grids)
    return (row % stride == 0) & (col % stride == 0)


def spatial_score(cells: torch.Tensor, images: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
    """S_sp [n] in [0, 1]: how coarse a uniform lattice of its image still contains each token.

    level = the largest k <= K with row and column both divisible by 2^k, K = floor(log2(min(h, w))) (at least 1);
    S_sp = level / K. So S_sp > th keeps exactly the stride-2^k lattice with k = floor(th K) + 1: a threshold on
    S_sp chooses the density of `atp`'s lattice (the spatial branch), and `atp-learned` learns it per instance.
    """
    row, col = _rows_cols(cells, images, grids)
    sizes = torch.tensor([min(g[1], g[2]) for g in grids], device=cells.device)[images]
    top = torch.log2(sizes.float()).floor().clamp(min=1).long()  # [n] K per token's image
    level = torch.zeros_like(row)
    for k in range(1, int(top.max()) + 1):  # K <= log2(grid side): a handful of vectorised passes
        level = torch.where((row % 2 ** k == 0) & (col % 2 ** k == 0) & (k <= top), k, level)
    return level.float() / top.float()


def calibrate(run: Callable[[ATPScores], float], target: float, base: ATPScores | None = None, steps: int = 10,
              low: float | None = None, high: float | None = None) -> tuple[ATPScores, float]:
    """Find the `shift` whose mean equivalent-token count hits `target` (bisection; counts grow with the shift).

    Works for any strategy with a `shift` field whose kept counts grow with it: `atp` (added to every mass) and
    `atp-learned` (subtracted from every learned threshold). run(strategy) -> mean equivalent visual tokens of the
    calibration set under `strategy` (see `vlmeff.eval.calibration` for the POPE-based runner). Returns (the
    calibrated strategy, its measured mean).
    """
    base = base or ATP()
    if "shift" not in base.params():
        raise StrategyError(f"calibrate: {base.name} has no `shift` parameter to tune")
    params = base.params()
    low = base.shift_range[0] if low is None else low
    high = base.shift_range[1] if high is None else high
    best = None
    for _ in range(steps):
        mid = (low + high) / 2
        strategy = type(base)(**{**params, "shift": round(mid, 4)})
        value = run(strategy)
        if best is None or abs(value - target) < abs(best[1] - target):
            best = (strategy, value)
        if value > target:
            high = mid
        else:
            low = mid
    return best


def mean_equivalent_tokens(wrapper_factory: Callable[[ATPScores], object],
                           batches: Iterable[dict]) -> Callable[[ATPScores], float]:
    """A `run` for `calibrate`: prefill each batch through a wrapper and average stats.equivalent_tokens per sample."""
    batches = list(batches)

    def run(strategy: ATPScores) -> float:
        vm = wrapper_factory(strategy)
        total, count = 0.0, 0
        try:
            for inputs in batches:
                vm(**inputs)
                total += vm.stats.equivalent_tokens
                count += inputs["input_ids"].shape[0]
        finally:
            vm.unwrap()
        return total / max(count, 1)
    return run
