"""VisPruner: important tokens by [CLS] attention, then diverse tokens by similarity-based duplicate removal
(arXiv 2412.01818v2, ICCV 2025, "Beyond Text-Visual Attention"; Theia-4869/VisPruner llava/model/llava_arch.py
`encode_images`; docs/methods.md "VisPruner").

Per image (reduction unit) with V tokens, budget T (keep / ratio), T_imp = int(T * important_ratio), T_div = T - T_imp:
1. important: rank the tokens by the head-mean [CLS] attention row of the feature block (softmax over all keys,
   patch columns), descending; the first T_imp are important, the rest in that order is the residual.
2. diverse: while the residual is longer than T_div: r = min(8, R - T_div); A = residual entries 0, 2, 4, ...,
   B = entries 1, 3, ...; score(a) = max over b of cos(a, b) on the L2-normalised feature-layer features; drop the
   r highest-scoring A tokens; the new residual is the remaining A tokens in descending-score order followed by B.
3. kept = important + final residual, in raster order.
Deviations from the reference code: ties are broken by the lower position (stable sorts; the reference uses
`argsort`, whose tie order is unspecified); scores and similarities in float32 (the reference runs in the model's
dtype); the cosines come from one [R, R] matmul over the first residual, gathered per round, where the reference
multiplies a @ b^T anew each round: the same dot products, which a BLAS may round differently for different shapes
(that can only flip ties closer than fp32 rounding; on this CPU backend they are bit-identical at LLaVA's sizes), for
a quarter of the arithmetic (per round: 2.8 % of the bench prefill at 64 tokens, over the 2 % target); every image is
its own unit (the reference gives each view of a LLaVA-NeXT image its own budget, which is what the llava-next
connector's default per-view units do). Qwen2-VL has no [CLS]: it is refused unless `scorer=global_query`, vlmeff's
documented substitute (FlowCut's mean-query global token, as fastervlm uses it), with the merged (LLM-space) tokens as
the similarity features. That substitute is not VisPruner's published method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmeff.registry import register_strategy
from vlmeff.strategy import BudgetReducer, ImageTokens, NotApplicableError, Stage, StrategyError

SCORES = ("cls", "global_query")
ROUND_DROP = 8  # tokens removed per matching round (the reference's constant)


def diverse_residual(features: torch.Tensor, residual: torch.Tensor, keep: int) -> torch.Tensor:
    """The residual after VisPruner's iterative matching: `residual` [R] (positions into `features` [V, D], in the
    order the rounds see them) shrunk to at most `keep` entries, in the order the last round leaves them.

    The cosines of the residual tokens are one [R, R] matmul, gathered per round (the reference recomputes a @ b^T
    each round: the same products, 4 to 5 times the arithmetic). One round per iteration (each depends on the order
    the previous one left); no loop over tokens."""
    unit = features[residual].float()
    unit = unit / unit.norm(dim=-1, keepdim=True)  # the reference normalises without an epsilon
    similarity = unit @ unit.T  # [R, R]
    local = torch.arange(residual.numel(), device=residual.device)  # positions into `residual`
    while True:
        drop = min(ROUND_DROP, local.numel() - keep)
        if drop <= 0:
            return residual[local]
        a, b = local[0::2], local[1::2]
        score = similarity[a].index_select(1, b).max(dim=-1).values  # [ceil(R/2)]: each A token's best match in B
        order = torch.sort(score, descending=True, stable=True).indices
        local = torch.cat([a[order[drop:]], b])  # the r most duplicated A tokens leave


@register_strategy
@dataclass
class VisPruner(BudgetReducer):
    """Keep T_imp important tokens ([CLS] attention) and T - T_imp diverse tokens (duplicates removed by matching).

    important_ratio (default 0.5, the README's 64 + 64 for 128) is the share of the budget given to important tokens.
    scorer="cls" is the paper's score; scorer="global_query" is vlmeff's substitute for towers without [CLS].
    """

    name = "vispruner"
    stage = Stage.PRE_LLM
    summary = "[CLS]-attention important tokens + duplicate-removed diverse tokens (keep/ratio, important_ratio)"
    paper = "arXiv 2412.01818v2"
    param_ranges = {"important_ratio": "[0, 1]"}

    important_ratio: float = 0.5
    scorer: str = "cls"

    def __post_init__(self):
        super().__post_init__()
        if self.scorer not in SCORES:
            raise StrategyError(f"vispruner.scorer={self.scorer!r}: expected one of {', '.join(SCORES)}")

    def check_applicable(self, connector) -> None:
        if self.scorer == "cls" and not connector.has_cls:
            raise NotApplicableError(
                f"vispruner needs a [CLS] token for its important tokens, and the {connector.name} vision tower has "
                "none, so VisPruner is not defined there. Alternatives: 'vispruner:scorer=global_query,keep=K' "
                "(vlmeff's documented substitute: FlowCut's mean-query global token), or another pruner from "
                "`vlmeff list`.")
        if self.scorer == "global_query" and connector.has_cls:
            raise NotApplicableError(
                f"vispruner.scorer='global_query' is vlmeff's substitute for towers without [CLS]; the "
                f"{connector.name} vision tower has one, so use the paper's score: scorer=cls (the default)")

    def split(self, k: int) -> tuple[int, int]:
        """(important, diverse) token counts for a budget of k tokens: important = int(k * important_ratio)."""
        important = int(k * self.important_ratio)
        return important, k - important

    def attention(self, image: ImageTokens) -> torch.Tensor:
        """[V_cur] float32 importance of the image's current tokens."""
        if self.scorer == "cls":
            per_token = image.probe.cls_attention(image.image).mean(0)  # [V] mean over heads
        else:
            per_token = image.probe.global_query_attention(image.image)  # [V]
        if image.groups is not None or (image.index < 0).any():
            raise NotApplicableError("vispruner cannot score merged tokens; put it before merging strategies")
        return per_token[image.index]

    def reduce_image(self, image: ImageTokens, k: int, position: int) -> ImageTokens:
        important, diverse = self.split(k)
        ranked = torch.sort(self.attention(image), descending=True, stable=True).indices  # [V_cur]
        kept = ranked[:important]
        if diverse > 0:
            kept = torch.cat([kept, diverse_residual(image.features, ranked[important:], diverse)])
        return image.keep(kept.sort().values)  # raster order
