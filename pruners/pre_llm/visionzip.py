"""VisionZip: dominant tokens by [CLS] attention + contextual tokens merged by key similarity (arXiv 2412.04467;
docs/methods.md "VisionZip").

Per image with V patches, at the feature block (the block whose output LLaVA reads):
1. dominant: score_j = sum over heads of the [CLS] attention row (softmax over all keys), patch column j; keep the
   top `dominant` patches (ties by lower index), raster order.
2. contextual: the other patches in raster order form the remaining list (N_rest tokens); targets are its entries
   0, step, 2 step, ... (first `contextual` of them), step = max(1, N_rest // contextual). Every other remaining
   token joins the target whose key is most similar: cosine of the head-averaged keys of the feature block
   (ties: the earlier target). Contextual token = target feature + mean of the features joined to it (+ 0 when
   none joined), as in the released code (``target_hidden + aggregated_hidden``).
3. output: dominant tokens, then the contextual tokens in target order; a contextual token's index is its target's.

Deviation from the released LLaVA code: it keeps the [CLS] feature as one of the `dominant` tokens (CLS + dominant - 1
patches). transformers' LLaVA drops [CLS] from the features ("default" select strategy), so the LLM was never trained
on a [CLS] token; vlmeff keeps `dominant` patches instead (same token count; the remaining list gains the one patch
the released code would drop for [CLS]). When dominant + contextual >= V every token is kept unchanged in raster order
(the released code would reorder them), so the unwrapped model is reproduced exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmeff.registry import register_strategy
from vlmeff.strategy import (
    Budget,
    ImageTokens,
    NotApplicableError,
    Stage,
    StrategyError,
    TokenReducer,
    topk_sorted,
)

# Published splits 192 = 162 + 30, 128 = 108 + 20, 64 = 54 + 10: contextual is 5/32 of the budget in all three.
CONTEXTUAL_NUM, CONTEXTUAL_DEN = 5, 32


def split_budget(k: int) -> tuple[int, int]:
    """(dominant, contextual) for a budget of k tokens: contextual = round_half_up(5 k / 32)."""
    contextual = (CONTEXTUAL_NUM * k + CONTEXTUAL_DEN // 2) // CONTEXTUAL_DEN
    return k - contextual, contextual


@register_strategy
@dataclass
class VisionZip(TokenReducer, Budget):
    """Dominant [CLS]-attention tokens plus contextual tokens merged by key similarity.

    Give either `dominant` and `contextual` (token counts per image), or a budget `keep` / `ratio` that is split by
    the published ratio (contextual = round(5 k / 32): 192 -> 162 + 30, 128 -> 108 + 20, 64 -> 54 + 10).
    """

    name = "visionzip"
    stage = Stage.PRE_LLM
    summary = "[CLS]-attention dominant tokens + similarity-merged contextual tokens (dominant+contextual or keep/ratio)"
    paper = "arXiv 2412.04467"
    needs_full_grid = True
    budget_params = ("keep", "ratio", "dominant", "contextual")

    dominant: int | None = None
    contextual: int | None = None

    def __post_init__(self):
        TokenReducer.__post_init__(self)
        counts = self.dominant is not None or self.contextual is not None
        if counts:
            if self.keep is not None or self.ratio is not None:
                raise StrategyError("visionzip: give either dominant= and contextual=, or one budget keep=/ratio=")
            if self.dominant is None or self.contextual is None:
                raise StrategyError("visionzip: dominant= and contextual= go together (e.g. dominant=54,contextual=10)")
            if self.dominant < 1:
                raise StrategyError(f"visionzip.dominant={self.dominant}: must be >= 1")
            if self.contextual < 0:
                raise StrategyError(f"visionzip.contextual={self.contextual}: must be >= 0")
        else:
            self._check_budget(self.name)

    def check_applicable(self, connector) -> None:
        if not connector.has_cls:
            raise NotApplicableError(
                f"visionzip needs a [CLS] token, and the {connector.name} vision tower has none, so VisionZip is not "
                "defined there. Alternatives: 'fastervlm:scorer=global_query,keep=K' (FlowCut's mean-query global "
                "token), 'pool:keep=K', 'random:keep=K', or another pruner from `vlmeff list`."
            )

    def counts(self, num_tokens: int) -> tuple[int, int]:
        """(dominant, contextual) for an image of `num_tokens` tokens."""
        if self.dominant is not None:
            return self.dominant, self.contextual
        return split_budget(self.kept_count(num_tokens))

    def target_count(self, image: ImageTokens) -> int:
        """dominant + contextual for the image's current (full-grid) count."""
        return sum(self.counts(image.features.shape[0]))

    def reduce_image(self, img: ImageTokens, k: int, position: int) -> ImageTokens:
        dominant, contextual = self.counts(img.features.shape[0])  # the split of k
        score = img.probe.cls_attention(img.image).sum(0)  # [V]: [CLS] row summed over heads
        dominant_idx = topk_sorted(score, dominant)  # [dominant] ascending
        is_rest = torch.ones_like(score, dtype=torch.bool)
        is_rest[dominant_idx] = False
        rest = is_rest.nonzero().squeeze(1)  # [N_rest] ascending
        features = img.features
        if contextual == 0:
            return img.keep(dominant_idx)

        keys = img.probe.keys(img.image)[1:]  # [V, H*hd] feature-block keys, [CLS] dropped
        heads = img.probe.cls_attention(img.image).shape[0]
        metric = F.normalize(keys.float().view(keys.shape[0], heads, -1).mean(1), dim=-1)  # [V, hd] unit vectors
        step = max(1, rest.numel() // contextual)
        is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=rest.device)
        is_target[torch.arange(0, rest.numel(), step, device=rest.device)[:contextual]] = True
        targets, others = rest[is_target], rest[~is_target]  # [C], [N_rest - C] grid indices
        assigned = (metric[others] @ metric[targets].T).argmax(1)  # [N_rest - C]: argmax keeps the first on ties
        one_hot = F.one_hot(assigned, contextual).to(torch.float32)  # [N_rest - C, C]
        sums = one_hot.T @ features[others].float()  # [C, D]
        mean = sums / one_hot.sum(0).clamp(min=1)[:, None]
        merged = (features[targets].float() + mean).to(features.dtype)  # [C, D]
        groups = [[int(d)] for d in img.index[dominant_idx].tolist()] + [
            sorted([int(t)] + others[assigned == j].tolist()) for j, t in enumerate(targets.tolist())
        ]
        return dataclasses.replace(
            img,
            features=torch.cat([features[dominant_idx], merged]),
            index=torch.cat([img.index[dominant_idx], img.index[targets]]),
            groups=groups,
        )
