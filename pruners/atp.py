"""ATP (adaptive token pruning, ATP-LLaVA, arXiv 2412.00447): training-free approximation `atp` (METHODS.md "ATP").

EXPERIMENTAL: the paper's pruning module is learned and no official code exists; `atp` applies its scores
training-free with fixed mass thresholds. (`atp-learned`, the paper's threshold MLPs trained on the reference model,
is not in this release.)

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


def _floats(text: str | None, name: str, default: tuple) -> tuple:
    if text is None:
        return default
    try:
        return tuple(float(x) for x in str(text).split("/"))
    except ValueError:
        raise StrategyError(f"atp.{name}={text!r}: expected numbers separated by '/' (e.g. 0.95/0.9/0.85/0.8)") from None


@register_strategy
@dataclass
class ATP(LLMPruner):
    """Instance-adaptive in-LLM pruning at several points (training-free approximation of ATP-LLaVA; experimental).

    points / mass / strides: '/'-separated lists, one entry per point (points are 0-based layers after which tokens
    are removed; default scaled from the paper's 2/6/12/18 of 32). shift: added to every mass (see `calibrate`).
    """

    name = "atp"
    summary = ("in-LLM, EXPERIMENTAL training-free ATP: redundancy (self + cross attention) mass thresholds + spatial "
               "lattice at 4 points, instance-adaptive counts (calibrate to a budget with `vlmeff calibrate`)")
    paper = "arXiv 2412.00447"
    experimental = True

    points: str | None = None
    mass: str | None = None
    strides: str | None = None
    shift: float = 0.0
    k_min: int = 1
    k_max: int | None = None

    def __post_init__(self):
        LLMPruner.__post_init__(self)
        self._mass = _floats(self.mass, "mass", PUBLISHED_MASS)
        self._strides = tuple(int(s) for s in _floats(self.strides, "strides", PUBLISHED_STRIDES))
        self._points = None if self.points is None else tuple(int(p) for p in _floats(self.points, "points", ()))
        count = len(self._points) if self._points is not None else len(PUBLISHED_POINTS)
        if len(self._mass) != count or len(self._strides) != count:
            raise StrategyError(f"atp: {count} points need {count} mass values and {count} strides "
                                f"(got mass={self._mass}, strides={self._strides})")
        if any(not 0.0 < m <= 1.0 for m in self._mass):
            raise StrategyError(f"atp.mass={self.mass!r}: every value must be in (0, 1]")
        if any(s < 1 for s in self._strides):
            raise StrategyError(f"atp.strides={self.strides!r}: every stride must be >= 1")
        if self.k_min < 0 or (self.k_max is not None and self.k_max < max(self.k_min, 1)):
            raise StrategyError(f"atp: need 0 <= k_min <= k_max (got k_min={self.k_min}, k_max={self.k_max})")

    def prune_layers(self, num_layers: int) -> list[int]:
        points = self._points or tuple(round(p * num_layers / 32) for p in PUBLISHED_POINTS)
        if list(points) != sorted(set(points)):
            raise StrategyError(f"atp: points {points} for a {num_layers}-layer LLM are not strictly increasing; "
                                "give points= explicitly")
        return list(points)

    def observe(self, layer, attention, view, state) -> None:
        firsts = [int(s.visual[0]) for s in view.samples if s.visual.numel()]
        if not firsts:
            state["scores"] = [None] * len(view.samples)
            return
        start = min(firsts)
        rows = torch.arange(start, attention.query.shape[2], device=attention.query.device)
        probs = attention.probabilities(rows).mean(1)  # [B, R, S] mean over heads
        scores = []
        for b, sample in enumerate(view.samples):
            visual = sample.visual.to(rows.device)
            if visual.numel() == 0:
                scores.append(None)
                continue
            block = probs[b][(visual - start)[:, None], visual[None, :]]  # [n, n] A[i, j] among visual tokens
            n = visual.numel()
            s_self = block.tril().sum(0) / torch.arange(n, 0, -1, device=block.device)  # mean over i >= j
            text = sample.text_after.to(rows.device)
            s_cross = probs[b][(text - start)[:, None], visual[None, :]].mean(0) if text.numel() else torch.zeros(n)
            scores.append((_minmax(s_self) + _minmax(s_cross.to(block.device))) / 2)
        state["scores"] = scores

    def select(self, layer, view, state) -> list[torch.Tensor | None]:
        point = self.prune_layers(view.num_layers).index(layer)
        mass = min(max(self._mass[point] + self.shift, 0.0), 1.0)
        stride = self._strides[point]
        kept = []
        for sample, score in zip(view.samples, state["scores"]):
            if score is None:
                kept.append(None)
                continue
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


def _lattice(cells: torch.Tensor, images: torch.Tensor, grids: list[tuple[int, int, int]], stride: int) -> torch.Tensor:
    """[n] bool: tokens whose grid cell (row, column) of their image both divide by `stride`."""
    widths = torch.tensor([g[2] for g in grids], device=cells.device)[images]
    heights = torch.tensor([g[1] for g in grids], device=cells.device)[images]
    row, col = (cells // widths) % heights, cells % widths
    return (row % stride == 0) & (col % stride == 0)


def calibrate(run: Callable[[ATP], float], target: float, base: ATP | None = None, steps: int = 10,
              low: float = -1.0, high: float = 0.05) -> tuple[ATP, float]:
    """Find the mass `shift` whose mean equivalent-token count hits `target` (bisection; counts grow with the shift).

    run(strategy) -> mean equivalent visual tokens of the calibration set under `strategy` (see
    `vlmeff.eval.calibration` for the POPE-based runner). Returns (the calibrated ATP, its measured mean).
    """
    base = base or ATP()
    params = base.params()
    best = None
    for _ in range(steps):
        mid = (low + high) / 2
        strategy = ATP(**{**params, "shift": round(mid, 4)})
        value = run(strategy)
        if best is None or abs(value - target) < abs(best[1] - target):
            best = (strategy, value)
        if value > target:
            high = mid
        else:
            low = mid
    return best


def mean_equivalent_tokens(wrapper_factory: Callable[[ATP], object], batches: Iterable[dict]) -> Callable[[ATP], float]:
    """A `run` for `calibrate`: prefill each batch through a wrapper and average stats.equivalent_tokens per sample."""
    batches = list(batches)

    def run(strategy: ATP) -> float:
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
