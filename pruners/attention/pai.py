"""PAI (paying more attention to image, arXiv 2407.21771; METHODS.md "Hallucination mitigation"), attention part.

Training-free. In decoder layers [start_layer, L), for the last query row of every call (the last prompt token in
prefill, the new token in each decode step), all heads, on the scaled, masked pre-softmax scores a over the image
keys: a <- a + alpha |a| (alpha = 0.2). The other rows and keys are unchanged.
BOOST ONLY: PAI's second half, the CFG logits refinement against a text-only branch (gamma = 1.1), needs the
decoding stage, which this release does not run yet. Reference quirk not copied: with CFG on, the reference code
switches the boost off during the conditional prefill (so a one-word answer never gets it); vlmeff boosts as the
paper describes. No FLOP change (one row recomputed per edited layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmeff.registry import register_strategy
from vlmeff.strategy import AttentionStrategy, StrategyError


def boost(scores: torch.Tensor, keys: torch.Tensor, alpha: float) -> torch.Tensor:
    """scores [B, H, K] with a + alpha |a| on the allowed (finite) entries where keys [B, K] is True."""
    chosen = keys[:, None, :] & torch.isfinite(scores)
    return torch.where(chosen, scores + alpha * scores.abs(), scores)


@register_strategy
@dataclass
class PAI(AttentionStrategy):
    """Boost the last query row's pre-softmax scores on image keys by alpha |a| in layers >= start_layer."""

    name = "pai"
    summary = "attention: last-row image-key boost a + alpha|a| (alpha, start_layer); BOOST ONLY, CFG half not yet"
    paper = "arXiv 2407.21771"

    alpha: float = 0.2
    start_layer: int = 2

    def __post_init__(self):
        if self.alpha < 0:
            raise StrategyError(f"pai.alpha={self.alpha}: must be >= 0 (0 changes nothing)")
        if self.start_layer < 0:
            raise StrategyError(f"pai.start_layer={self.start_layer}: must be >= 0 (a decoder layer index)")

    def score_layers(self, num_layers: int) -> list[int]:
        return list(range(self.start_layer, num_layers))

    def edit_scores(self, layer, scores, layout, image_keys, state):
        return boost(scores, image_keys, self.alpha)
