"""ATP-LLaVA's learned pruning module, `atp-learned` (arXiv 2412.00447; docs/methods.md "ATP").

EXPERIMENTAL: no official code exists. vlmeff trains the paper's module on its reference model with the LLM frozen
(`vlmeff reference train-atp`); the spatial score S_sp and the exact MLP inputs are vlmeff's reading of the paper.

At each ATP point (the layers of `atp`), per sample, from the scores `atp` also uses (S_self, S_cross: see
`vlmeff.pruners.in_llm.atp`) and the layer's output hidden states:
  features = [mean, std, max of n S_self], [mean, std, max of n S_cross]   (n = current visual tokens: 1 = uniform)
             ++ LayerNorm(mean of the hidden states of the sample's visual tokens and the text after them);
  (th_red, th_sp) = sigmoid(MLP_point(features)) - shift       (one MLP per point: Linear, GELU, Linear);
  margin_j = max(S_red_j - th_red, S_sp_j - th_sp),  S_red = (minmax S_self + minmax S_cross) / 2 in [0, 1],
             S_sp = `spatial_score` (how coarse a uniform lattice still contains the token, in [0, 1]).
Inference (hard cut): keep the visual tokens with margin > 0 (at least k_min, by S_red), remove the others for all
later layers; original positions. Training (`SoftATP`): soft mask m_j = sigmoid(temperature * margin_j), multiplied
over the points; the forward pass applies the hard cut (key j weighted by 0 / 1 in every later layer's attention,
DynamicViT's masked softmax) and the gradient goes through the soft masks (straight-through); loss = LM loss +
lambda (E - target)^2 with E the layer-averaged kept fraction of visual tokens (equivalent tokens / V). Hard cut and
soft mask agree on which side of 0.5 a token falls.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmeff.module_files import load_module_file, save_module_file
from vlmeff.pruners.in_llm.atp import ATPScores, redundancy, redundancy_scores, spatial_score
from vlmeff.registry import register_strategy
from vlmeff.router import AttentionInputs, Router
from vlmeff.strategy import NotApplicableError, StrategyError

WEIGHTS_NAME = "atp_learned.safetensors"
NUM_SCORE_FEATURES = 6


class ThresholdMLPs(nn.Module):
    """One small MLP per ATP point: features [.., 6 + D] -> thresholds (th_red, th_sp) [.., 2] in (0, 1)."""

    def __init__(self, hidden_size: int, num_points: int, width: int = 64):
        super().__init__()
        self.hidden_size, self.num_points, self.width = hidden_size, num_points, width
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(NUM_SCORE_FEATURES + hidden_size, width), nn.GELU(), nn.Linear(width, 2))
            for _ in range(num_points))
        for mlp in self.mlps:  # start at th = 0.5 for every input; training moves it
            nn.init.zeros_(mlp[2].weight)
            nn.init.zeros_(mlp[2].bias)

    def features(self, s_self: torch.Tensor, s_cross: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """[6 + D] features of one sample: s_self / s_cross [n] raw scores, pooled [D] mean hidden state."""
        n = s_self.numel()
        stats = []
        for s in (s_self.float() * n, s_cross.float() * n):
            stats += [s.mean(), s.std(unbiased=False), s.max()]
        return torch.cat([torch.stack(stats), self.norm(pooled.float())])

    def forward(self, point: int, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlps[point](features))


def keep_margin(s_red: torch.Tensor, s_sp: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """[n] margin = max(S_red - th_red, S_sp - th_sp): keep where > 0 (hard); soft mask = sigmoid(t * margin)."""
    return torch.maximum(s_red - thresholds[0], s_sp - thresholds[1])


def pooled_hidden(hidden: torch.Tensor, visual: torch.Tensor, text_after: torch.Tensor,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """[D] mean of one sample's hidden states [S, D] over its visual tokens (weighted by `weights` [n], the soft
    mask in training) and the text after them."""
    w_vis = torch.ones(visual.numel(), device=hidden.device) if weights is None else weights
    total = (hidden[visual].float() * w_vis[:, None]).sum(0) + hidden[text_after].float().sum(0)
    return total / (w_vis.sum() + text_after.numel()).clamp(min=1e-6)


def save_thresholds(path: str | Path, module: ThresholdMLPs, meta: dict[str, Any]) -> Path:
    """Write the MLPs (safetensors, atomically) with `meta` (points, num_layers, training setup) as JSON metadata."""
    meta = {**meta, "hidden_size": module.hidden_size, "num_points": module.num_points, "width": module.width}
    return save_module_file(path, module, "atp_learned", meta)


def untrained_thresholds(text_config, path: str | Path, points: str | None = None, width: int = 64) -> Path:
    """Write MLPs with the training's initial state (both thresholds 0.5 for every input) for an LLM of this
    config: what `atp-learned` costs on a model nobody trained thresholds for (e.g. `vlmeff bench`'s random model).
    Its selections are not ATP-LLaVA's; use it for cost measurements only."""
    layers = ATPScores(points=points).prune_layers(text_config.num_hidden_layers)
    module = ThresholdMLPs(text_config.hidden_size, len(layers), width)
    return save_thresholds(path, module, {"points": layers, "num_layers": text_config.num_hidden_layers,
                                          "model": "untrained (cost measurements only)"})


def load_thresholds(path: str | Path) -> tuple[ThresholdMLPs, dict[str, Any]]:
    """(MLPs in eval mode, metadata) from a file written by `save_thresholds` (cached per file and mtime)."""
    return load_module_file(
        path, "atp_learned", lambda meta: ThresholdMLPs(meta["hidden_size"], meta["num_points"], meta["width"]),
        owner="atp-learned", what="threshold weights", kind="an atp-learned weights file",
        missing_hint="; train them with `vlmeff reference train-atp` (reference model) and pass weights=<file>")


def default_weights() -> Path:
    """The MLPs vlmeff trained for its reference model (assets/reference/atp_learned.safetensors)."""
    from vlmeff.reference.model import asset_dir

    return asset_dir() / WEIGHTS_NAME


@register_strategy
@dataclass
class ATPLearned(ATPScores):
    """ATP-LLaVA's learned thresholds (trained on the reference model, LLM frozen; experimental).

    weights: a file from `vlmeff reference train-atp` (default: the one shipped for the reference model); its
    points and hidden size must match the model. shift: subtracted from both learned thresholds (more tokens when
    > 0; `vlmeff calibrate --strategy atp-learned` tunes it to another budget). k_min: kept at least per sample.
    """

    name = "atp-learned"
    summary = ("in-LLM, EXPERIMENTAL learned ATP: per-point MLPs predict redundancy and spatial thresholds "
               "(trained on the reference model with the LLM frozen: `vlmeff reference train-atp`)")
    paper = "arXiv 2412.00447"
    training_free = False
    experimental = True
    shift_range = (-1.0, 1.0)
    budget_params = ("shift",)  # what `calibrate` tunes to a budget

    weights: str | None = None
    shift: float = 0.0
    k_min: int = 1

    def __post_init__(self):
        ATPScores.__post_init__(self)
        if self.k_min < 0:
            raise StrategyError(f"atp-learned.k_min={self.k_min}: must be >= 0")
        if not -1.0 <= self.shift <= 1.0:
            raise StrategyError(f"atp-learned.shift={self.shift}: must be in [-1, 1] (thresholds live in (0, 1))")

    def thresholds(self) -> tuple[ThresholdMLPs, dict[str, Any]]:
        return load_thresholds(self.weights or default_weights())

    def check_applicable(self, connector) -> None:
        module, meta = self.thresholds()
        config = connector.model.config.text_config
        if config.hidden_size != module.hidden_size or config.num_hidden_layers != meta["num_layers"]:
            raise NotApplicableError(
                f"atp-learned: the weights {self.weights or default_weights()} were trained for an LLM of "
                f"{meta['num_layers']} layers and hidden size {module.hidden_size} ({meta.get('model', '?')}); this "
                f"one has {config.num_hidden_layers} and {config.hidden_size}. Train thresholds for it with "
                "`vlmeff reference train-atp` and pass weights=<file>, or use the training-free `atp`")

    def prune_layers(self, num_layers: int) -> list[int]:
        module, meta = self.thresholds()
        points = list(meta["points"])
        if self.points is not None and super().prune_layers(num_layers) != points:
            raise StrategyError(f"atp-learned.points={self.points!r}: the weights were trained at layers {points}")
        return points

    def select(self, layer, view, state) -> list[torch.Tensor | None]:
        module, _ = self.thresholds()
        point = self.prune_layers(view.num_layers).index(layer)
        kept = []
        for b, (sample, scores) in enumerate(zip(view.samples, state["scores"])):
            if scores is None:
                kept.append(None)
                continue
            s_self, s_cross = scores
            device = view.hidden.device
            pooled = pooled_hidden(view.hidden[b], sample.visual.to(device), sample.text_after.to(device))
            with torch.no_grad():
                module.to(pooled.device)
                th = module(point, module.features(s_self.to(device), s_cross.to(device), pooled)) - self.shift
            s_red = redundancy(s_self, s_cross).to(device)
            s_sp = spatial_score(sample.cells, sample.images, view.grids).to(device)
            keep = keep_margin(s_red, s_sp, th) > 0
            if int(keep.sum()) < min(self.k_min, keep.numel()):
                order = torch.sort(s_red, descending=True, stable=True).indices
                keep[order[:self.k_min]] = True
            kept.append(None if bool(keep.all()) else keep.nonzero().squeeze(1))
        return kept


class SoftATP:
    """Training-time ATP on a LLaVA-style model: the hard cut in the forward pass, the soft masks' gradient into
    the MLPs (straight-through), for forward calls of one sample (batch 1), used as a context manager.

    In every layer after a point, attention weights key j by G_j (DynamicViT's masked softmax:
    exp(s_ij) G_j / sum_k exp(s_ik) G_k, a query always keeping its own key), with
    G_j = hard_j + soft_j - stop_gradient(soft_j): hard_j = 1 while token j passed every point so far (margin > 0),
    soft_j = the product of sigmoid(temperature * margin_j) over those points. So the forward pass is exactly the
    inference forward with the pruned tokens removed (later points score only the kept tokens too), and the loss
    reaches the thresholds through the soft masks. (With the soft masks in the forward pass, as docs/methods.md words
    it, a token at m = 0.3 still feeds the later layers; measured on the reference model, thresholds trained that
    way kept too little at inference; see the model card.) `expected_fraction()` is the layer-averaged kept
    fraction E with the same straight-through rule. Its `vlmeff.router.Router` observes and replaces the attention
    it needs while the object is entered.

    prepare(visual [S] bool, prompt_end, grid) before each call: tokens before prompt_end are the prompt (S_cross
    reads only its text queries, never the supervised answer); grid: (t, h, w) of the image's tokens.
    """

    def __init__(self, model, module: ThresholdMLPs, points: list[int], temperature: float = 10.0):
        self.model, self.module, self.points, self.temperature = model, module, list(points), temperature
        self.layers = list(model.model.language_model.layers)
        self.router = Router(model)  # refuses backends that take no replacement attention
        for index in range(len(self.layers)):
            if index > self.points[0]:
                self.router.replace(index, self._weighted_attention)
            if index in self.points:
                self.router.observe(index, self._observe)
                self.router.after_layer(index, self._post_layer(index))
        self.visual: torch.Tensor | None = None
        self.prompt_end = 0
        self.grid: tuple[int, int, int] = (1, 1, 1)

    def __enter__(self) -> SoftATP:
        self.router.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.router.__exit__(*exc)

    def prepare(self, visual: torch.Tensor, prompt_end: int, grid: tuple[int, int, int]) -> None:
        """Set up the next forward call (one sample)."""
        self.visual, self.prompt_end, self.grid = visual, prompt_end, grid
        n = int(visual.sum())
        self.log_soft = torch.zeros(n, device=visual.device)  # sum over points of log sigmoid(t * margin)
        self.alive = torch.ones(n, dtype=torch.bool, device=visual.device)  # the hard cut's tokens
        self.fractions: list[torch.Tensor] = []  # kept fraction after each point (straight-through)
        self.hard: list[int] = []

    def key_weights(self) -> torch.Tensor:
        """[S] G: 1 for text keys, hard + soft - stop_gradient(soft) for visual keys."""
        soft = self.log_soft.exp()
        weights = torch.ones(self.visual.shape[0], device=soft.device, dtype=soft.dtype)
        return weights.masked_scatter(self.visual, self.alive.float() + soft - soft.detach())

    # --- hooks ----------------------------------------------------------------------------------------------
    def _weighted_attention(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        """[1, S, H, hd]: softmax attention with key j weighted by G_j (own key always 1), causal."""
        groups = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        length = query.shape[2]
        scores = torch.einsum("bhqd,bhkd->bhqk", query.float(), k.float()) * scaling
        causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)  # [1, H, S, S]
        eye = torch.eye(length, device=query.device)
        weights = self.key_weights()[None, :] * (1 - eye) + eye  # [S, S]
        probs = probs * weights
        probs = probs / probs.sum(-1, keepdim=True)
        out = torch.einsum("bhqk,bhkd->bhqd", probs.to(v.dtype), v)
        return out.transpose(1, 2).contiguous(), None

    def _observe(self, layer: int, inputs: AttentionInputs) -> None:
        query, scaling = inputs.query, inputs.scaling
        positions = self.visual.nonzero().squeeze(1)
        start = int(positions[0])
        text = torch.arange(int(positions[-1]) + 1, self.prompt_end, device=positions.device)
        length = query.shape[2]
        present = torch.ones(length, dtype=torch.bool, device=query.device)
        present[positions[~self.alive]] = False  # removed tokens are no keys (as at inference)
        allowed = torch.ones(length, length, dtype=torch.bool, device=query.device).tril() & present[None, :]
        allowed |= torch.eye(length, dtype=torch.bool, device=query.device)
        with torch.no_grad():
            rows = torch.arange(start, length, device=query.device)
            attention = AttentionInputs(query, inputs.key, inputs.value, allowed[None, None], scaling)
            probs = attention.head_mean_probabilities(rows)[0]  # [R, S]
            self._scores = redundancy_scores(probs, positions[self.alive], text, start)

    def _post_layer(self, index: int):
        def hook(module, args, kwargs, output):
            hidden = output[0] if isinstance(output, tuple) else output  # [1, S, D]
            s_self, s_cross = self._scores
            alive = self.alive
            positions = self.visual.nonzero().squeeze(1)
            text = torch.arange(int(positions[-1]) + 1, self.prompt_end, device=hidden.device)
            pooled = pooled_hidden(hidden[0].detach(), positions, text, alive.float())  # as at inference
            point = self.points.index(index)
            th = self.module(point, self.module.features(s_self, s_cross, pooled))  # [2], differentiable
            # S_red over the kept tokens as at inference; removed ones stay removed (alive)
            s_red = torch.zeros(positions.numel(), device=hidden.device)
            s_red[alive] = redundancy(s_self, s_cross)
            cells = torch.arange(positions.numel(), device=hidden.device) % (self.grid[1] * self.grid[2])
            s_sp = spatial_score(cells, torch.zeros_like(cells), [self.grid])
            margin = keep_margin(s_red, s_sp, th)
            self.alive = alive & (margin.detach() > 0)
            self.hard.append(int(self.alive.sum()))
            self.log_soft = self.log_soft + F.logsigmoid(self.temperature * margin)
            soft = self.log_soft.exp()
            self.fractions.append((self.alive.float() + soft - soft.detach()).mean())
            return None
        return hook

    # --- results ----------------------------------------------------------------------------------------------
    def expected_fraction(self) -> torch.Tensor:
        """E: layer-averaged kept fraction of the visual tokens (the hard cut's value, the soft masks' gradient)."""
        return self._layer_average(self.fractions, torch.ones((), device=self.log_soft.device))

    def hard_fraction(self) -> float:
        """The same average as a number."""
        total = max(int(self.visual.sum()), 1)
        return float(self._layer_average([h / total for h in self.hard], 1.0))

    def _layer_average(self, after_points: list, full) -> torch.Tensor:
        num = len(self.layers)
        bounds = self.points + [num - 1]
        total = full * (self.points[0] + 1)
        for k, fraction in enumerate(after_points):
            total = total + fraction * (bounds[k + 1] - bounds[k])
        return total / num
