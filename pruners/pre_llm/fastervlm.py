"""FasterVLM: [CLS]-attention pruning before the LLM (arXiv 2412.01818; docs/methods.md "FasterVLM").

score_j = mean over heads of softmax(q_CLS . k / sqrt(d)) at the feature layer, patch column j (softmax over all
keys including [CLS], no renormalisation); keep the top-k, raster order. The row is recomputed from the captured
input of that one layer, never by switching the tower to eager.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmeff.registry import register_strategy
from vlmeff.strategy import ImageTokens, NotApplicableError, ScorePruner, Stage, StrategyError

SCORES = ("cls", "global_query")


@register_strategy
@dataclass
class FasterVLM(ScorePruner):
    """Keep the k patches the [CLS] token attends to most at the feature layer.

    scorer="cls" (default) is the paper's score. scorer="global_query" is vlmeff's documented substitute for towers
    without [CLS] (Qwen2-VL): attention of the mean query over the image's patches (FlowCut's "global token") at
    the last vision block, mean over heads and over each 2x2 merge group. It is not FasterVLM's published method.
    """

    name = "fastervlm"
    stage = Stage.PRE_LLM
    summary = "[CLS]-attention top-k before the LLM (keep/ratio); scorer=global_query substitute for towers without CLS"
    paper = "arXiv 2412.01818"

    scorer: str = "cls"

    def __post_init__(self):
        super().__post_init__()
        if self.scorer not in SCORES:
            raise StrategyError(f"fastervlm.scorer={self.scorer!r}: expected one of {', '.join(SCORES)}")

    def check_applicable(self, connector) -> None:
        if self.scorer == "cls" and not connector.has_cls:
            raise NotApplicableError(
                f"fastervlm needs a [CLS] token, and the {connector.name} vision tower has none, so FasterVLM is not "
                "defined there. Alternatives: 'fastervlm:scorer=global_query,keep=K' (vlmeff's documented "
                "substitute: FlowCut's mean-query global token), or another pruner from `vlmeff list`."
            )

    def score(self, image: ImageTokens) -> torch.Tensor:
        if self.scorer == "cls":
            per_token = image.probe.cls_attention(image.image).mean(0)  # [V] mean over heads
        else:
            per_token = image.probe.global_query_attention(image.image)  # [V]
        if (image.index < 0).any():
            raise NotApplicableError("fastervlm cannot score merged tokens; put it before merging strategies")
        return per_token[image.index]  # scores of the tokens still present
