"""FastV: drop visual tokens inside the LLM by the last token's attention (arXiv 2403.06764; docs/methods.md "FastV").

After decoder layer K - 1 (0-based; K = 2 by default, so layers 0 and 1 see everything), per sample: score_j =
attention of the last prompt token over visual token j in layer K - 1, mean over heads (softmax over all keys, as
the layer computed it); keep the top round(V * ratio) (or `keep`) visual tokens, ties by lower position, in sequence
order; they keep their original positions; layers < K keep their full KV cache. Per sample (the reference code
ranks with sample 0 for the whole batch: not copied). With several images in a prompt the ranking runs over all
visual tokens of the sample, and V is their total.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmeff.registry import register_strategy
from vlmeff.strategy import Budget, LLMPruner, StrategyError


@register_strategy
@dataclass
class FastV(LLMPruner, Budget):
    """Keep `ratio` (default 0.5, the paper's R = 50% pruned) or `keep` visual tokens from decoder layer `layer` on."""

    name = "fastv"
    summary = "in-LLM: last-token attention at layer K-1, top-k visual tokens kept from layer K (layer=K, keep/ratio)"
    paper = "arXiv 2403.06764"
    budget_params = ("keep", "ratio")

    layer: int = 2

    def __post_init__(self):
        LLMPruner.__post_init__(self)
        if self.keep is None and self.ratio is None:
            self.ratio = 0.5
        self._check_budget(self.name)
        if self.layer < 1:
            raise StrategyError(f"fastv.layer={self.layer}: must be >= 1 (tokens are dropped after layer K - 1)")

    def prune_layers(self, num_layers: int) -> list[int]:
        return [self.layer - 1]

    def observe(self, layer, attention, view, state) -> None:
        rows = torch.tensor([s.last for s in view.samples], device=attention.query.device)  # [B]
        state["score"] = attention.sample_row_probabilities(rows).mean(1)  # [B, S] mean over heads

    def select(self, layer, view, state) -> list[torch.Tensor | None]:
        return [self.keep_top(state["score"][row, sample.visual], self.kept_count(sample.num_visual))
                for row, sample in enumerate(view.samples)]
