"""DAMRO (arXiv 2410.04514; docs/methods.md "DAMRO"), `damro`. Training-free; needs a vision tower with [CLS].

Outlier tokens, as the reference code computes them: the [CLS] row of the feature layer's attention read as ONE
head over the full width (softmax(q k^T / sqrt(width)) on the q / k projection outputs, bias included), the [CLS]
column dropped, the top k = 10 patches, in DESCENDING score order (a per-head mean would pick other tokens).
Contrast branch: the same prompt whose image is only those k tokens, in that order (its own rows, own KV cache).
Per step, on logits: out = (1 + alpha) l - alpha l_outliers, -inf where l < log(beta) + max l (alpha = 2,
beta = 0.1). The outliers come from the image's full grid whatever the main rows keep (e.g. after
`fastervlm:keep=64`); after a vision-stage reduction the [CLS] row of the original tokens does not exist and the
combination is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmeff.decoding import Branch, ContrastDecoding
from vlmeff.registry import register_strategy
from vlmeff.strategy import NotApplicableError, Stage, StrategyError, TokenReducer


@dataclass
class Outliers(TokenReducer):
    """DAMRO's branch reducer: the k patches with the highest one-head [CLS] attention, in descending order."""

    name = "damro-outliers"
    stage = Stage.PRE_LLM

    k: int = 10

    def target_count(self, image):
        return self.k

    def reduce_image(self, image, k, position):
        score = image.probe.cls_attention_one_head(image.image)  # [V] over the original patches
        order = torch.sort(score, descending=True, stable=True).indices[:k]
        return image.keep(order.to(image.features.device))


@register_strategy
@dataclass
class DAMRO(ContrastDecoding):
    """Contrast against the prompt seeing only the k outlier tokens of the [CLS] row: (1 + alpha) l - alpha l_o."""

    name = "damro"
    summary = "decoding: contrast with only the top-k [CLS]-attention outlier tokens (one head, full width); needs [CLS]"
    paper = "arXiv 2410.04514"

    alpha: float = 2.0
    beta: float = 0.1
    k: int = 10

    def __post_init__(self):
        super().__post_init__()
        if self.k < 1:
            raise StrategyError(f"damro.k={self.k}: must be >= 1")

    def check_applicable(self, connector) -> None:
        if not connector.has_cls:
            raise NotApplicableError(f"damro needs a vision tower with a [CLS] token (its outliers are read from the "
                                     f"[CLS] attention row); the {connector.name} connector's tower has none")

    def check_after(self, previous) -> None:
        super().check_after(previous)
        vision = [p.name for p in previous if p.stage is Stage.VISION]
        if vision:
            raise StrategyError(f"damro cannot follow {', '.join(vision)}: its outliers are read from the [CLS] row of "
                                "the image's full token grid, which a vision-stage reduction prunes inside the encoder "
                                "(for the contrast rows too); reduce before the LLM instead (e.g. fastervlm:keep=64+damro)")

    def branches(self, inputs, connector):
        return [Branch("outlier tokens", dict(inputs), reducers=[Outliers(k=self.k)])]
