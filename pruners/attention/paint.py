"""PAINT ("Fixing imbalanced attention", arXiv 2501.12206; docs/methods.md "4. Attention masks, positions and scores"), attention part.

Training-free, as the released code (hasanar1f/PAINT, modPAI) computes it, per image (the code reads sample 0 for
the whole batch: not copied):
- local tokens: the top int(V * local_ratio) (25 %) patches by the [CLS] row of encoder block 0 (the FIRST layer),
  summed over heads;
- summary tokens: Tukey outliers (> Q3 + 1.5 IQR, linear percentiles) of the [CLS] row of the feature block (the
  block whose output the LLM reads; 22 for CLIP-L), summed over heads; local = local minus summary.
In decoder layers [start_layer, L), on the last query row of every call (scaled, masked scores a): local keys
a += alpha_local |a| (0.7), summary keys a += alpha_summary |a| (0.3); the other image keys are NOT boosted.
Cells are chosen on the full grid; after a reduction only the kept cells of each set are boosted.
Decoding half (`paint-cfg`, added by `expand` when cfg=true, the default): PAI's CFG against the text-only prompt
(gamma 1.1, `vlmeff.decoding.TextOnlyGuidance`). gate: "paper" (default) boosts in every call; "reference" copies the
released code, which switches the boost off in the conditional prefill while CFG is on. Needs a [CLS] token.
heads="specific": the paper's head-specific modulation, alpha_h = alpha v_h / mean_h(v), v_h = head h's attention
mass on image keys before the boost. NOT in the released code (vlmeff's reading of the paper); default "uniform".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from vlmeff.decoding import TextOnlyGuidance
from vlmeff.registry import register_strategy
from vlmeff.strategy import AttentionStrategy, NotApplicableError, StrategyError


def paint_sets(first_row: torch.Tensor, feature_row: torch.Tensor, local_ratio: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(local [V] bool, summary [V] bool) from head-summed [CLS] rows of block 0 and of the feature block."""
    num = first_row.numel()
    local = torch.zeros(num, dtype=torch.bool, device=first_row.device)
    top = torch.sort(first_row, descending=True, stable=True).indices[: int(num * local_ratio)]
    local[top] = True
    q1, q3 = torch.quantile(feature_row, torch.tensor([0.25, 0.75], device=feature_row.device))
    summary = feature_row > q3 + 1.5 * (q3 - q1)
    return local & ~summary, summary


@dataclass
class PAINTGuidance(TextOnlyGuidance):
    """PAINT's decoding half: PAI's CFG against the text-only prompt (added by `paint` when cfg=true)."""

    name = "paint-cfg"
    summary = "decoding: PAINT's classifier-free guidance against the prompt without its image"
    paper = "arXiv 2501.12206"


@register_strategy
@dataclass
class PAINT(AttentionStrategy):
    """Boost local (early-layer [CLS]) and summary (feature-layer outlier) image keys of the last query row."""

    name = "paint"
    summary = ("attention + decoding: boost local (block-0 CLS top 25%) and summary (outlier) image keys, and CFG "
               "against the text-only prompt (cfg=false: boosts only); needs CLS")
    paper = "arXiv 2501.12206"

    alpha_local: float = 0.7
    alpha_summary: float = 0.3
    local_ratio: float = 0.25
    start_layer: int = 2
    cfg: bool = True
    gamma: float = 1.1
    gate: Literal["paper", "reference"] = "paper"
    heads: Literal["uniform", "specific"] = "uniform"

    def __post_init__(self):
        for name in ("alpha_local", "alpha_summary"):
            if getattr(self, name) < 0:
                raise StrategyError(f"paint.{name}={getattr(self, name)}: must be >= 0")
        if not 0.0 < self.local_ratio <= 1.0:
            raise StrategyError(f"paint.local_ratio={self.local_ratio}: must be in (0, 1]")
        if self.start_layer < 0:
            raise StrategyError(f"paint.start_layer={self.start_layer}: must be >= 0 (a decoder layer index)")
        PAINTGuidance(gamma=self.gamma)  # validates gamma

    def expand(self, connector):
        return [self, PAINTGuidance(gamma=self.gamma)] if self.cfg else [self]

    def check_applicable(self, connector) -> None:
        if not connector.has_cls:
            raise NotApplicableError(f"paint: the {connector.name} vision tower has no [CLS] token, whose attention "
                                     "rows define PAINT's local and summary tokens; use pai")

    def prepare(self, images, layout, context, state) -> None:
        locals_, summaries = [], []
        for img in images:
            first = img.probe.cls_attention(img.image, block=0).sum(0)  # [V] summed over heads
            feature = img.probe.cls_attention(img.image).sum(0)
            local, summary = paint_sets(first, feature, self.local_ratio)
            locals_.append(local)
            summaries.append(summary)
        width = max((x.numel() for x in locals_), default=0)
        pad = [torch.nn.functional.pad(x, (0, width - x.numel())) for x in locals_]
        state["local"] = torch.stack(pad) if pad else None  # [I, V_max] bool, by batch image and cell
        state["summary"] = torch.stack([torch.nn.functional.pad(x, (0, width - x.numel())) for x in summaries]) \
            if summaries else None

    def score_layers(self, num_layers: int) -> list[int]:
        return list(range(self.start_layer, num_layers))

    def edit_scores(self, layer, scores, layout, image_keys, state):
        if state.get("local") is None:
            return scores
        key = ("sets", id(layout))
        if state.get("cached", (None,))[0] != key:
            image, cell = layout.image.clamp(min=0), layout.cell.clamp(min=0)
            real = layout.visual
            state["cached"] = (key, state["local"][image, cell] & real, state["summary"][image, cell] & real)
        _, local, summary = state["cached"]
        local, summary = layout.over_keys(local, scores.shape[-1]), layout.over_keys(summary, scores.shape[-1])
        if self.gate == "reference" and self.cfg and state.get("phase") == "prefill":
            return scores  # the released code's CFG path skips the boost in the conditional prefill
        finite = torch.isfinite(scores)
        gain = self.alpha_local * local[:, None] + self.alpha_summary * summary[:, None]  # [B, 1, K]
        if self.heads == "specific":  # alpha_h = alpha v_h / mean_h(v): not in the released code
            mass = (torch.softmax(scores, dim=-1) * image_keys[:, None]).sum(-1)  # [B, H]
            mean = mass.mean(-1, keepdim=True)
            ratio = torch.where(mean > 0, mass / mean.clamp(min=1e-12), torch.ones_like(mass))
            gain = gain * ratio[..., None]
        return torch.where(finite, scores + gain * scores.abs(), scores)
