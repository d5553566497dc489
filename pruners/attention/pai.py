"""PAI (paying more attention to image, arXiv 2407.21771; docs/methods.md "4. Attention masks, positions and scores"), attention part.

Training-free. Two halves:
- attention (this strategy): in decoder layers [start_layer, L), for the last query row of every call (the last
  prompt token in prefill, the new token in each decode step), all heads, on the scaled, masked pre-softmax scores a
  over the image keys: a <- a + alpha |a| (alpha = 0.2). The other rows and keys are unchanged. No FLOP change.
- decoding (`pai-cfg`, added by `expand` when cfg=true, the default): classifier-free guidance against the same
  prompt without the image (`vlmeff.decoding.TextOnlyGuidance`): gamma lp_c - (gamma - 1) lp_u on log-probs with the
  plausibility cutoff lp_c < log(0.1) + max lp_c -> -inf, gamma = 1.1. The text-only rows have no image keys, so the
  boost is off there by construction. cfg=false runs the boost alone.
gate: "paper" (default) boosts in every call, as the paper describes; "reference" copies the reference code, which
switches the boost off during the conditional prefill while CFG is on (so a one-word answer never gets it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from vlmeff.decoding import TextOnlyGuidance
from vlmeff.registry import register_strategy
from vlmeff.strategy import AttentionStrategy, StrategyError


def boost(scores: torch.Tensor, keys: torch.Tensor, alpha: float) -> torch.Tensor:
    """scores [B, H, K] with a + alpha |a| on the allowed (finite) entries where keys [B, K] is True."""
    chosen = keys[:, None, :] & torch.isfinite(scores)
    return torch.where(chosen, scores + alpha * scores.abs(), scores)


@dataclass
class PAIGuidance(TextOnlyGuidance):
    """PAI's decoding half: CFG against the text-only prompt (added by `pai` when cfg=true)."""

    name = "pai-cfg"
    summary = "decoding: PAI's classifier-free guidance against the prompt without its image"
    paper = "arXiv 2407.21771"


@register_strategy
@dataclass
class PAI(AttentionStrategy):
    """Boost the last query row's pre-softmax scores on image keys by alpha |a| in layers >= start_layer, plus (cfg)
    guidance against the text-only prompt."""

    name = "pai"
    summary = ("attention + decoding: last-row image-key boost a + alpha|a| from start_layer, and CFG against the "
               "text-only prompt (gamma; cfg=false: boost only)")
    paper = "arXiv 2407.21771"

    alpha: float = 0.2
    start_layer: int = 2
    cfg: bool = True
    gamma: float = 1.1
    gate: Literal["paper", "reference"] = "paper"

    def __post_init__(self):
        if self.alpha < 0:
            raise StrategyError(f"pai.alpha={self.alpha}: must be >= 0 (0 changes nothing)")
        if self.start_layer < 0:
            raise StrategyError(f"pai.start_layer={self.start_layer}: must be >= 0 (a decoder layer index)")
        if self.gate not in ("paper", "reference"):
            raise StrategyError(f"pai.gate={self.gate!r}: expected 'paper' or 'reference'")
        PAIGuidance(gamma=self.gamma)  # validates gamma

    def expand(self, connector):
        return [self, PAIGuidance(gamma=self.gamma)] if self.cfg else [self]

    def score_layers(self, num_layers: int) -> list[int]:
        return list(range(self.start_layer, num_layers))

    def edit_scores(self, layer, scores, layout, image_keys, state):
        if self.gate == "reference" and self.cfg and state.get("phase") == "prefill":
            return scores  # the reference code's CFG path skips the boost in the conditional prefill
        return boost(scores, image_keys, self.alpha)
