"""DivPrune: keep the most diverse visual tokens, by greedy max-min selection (arXiv 2503.02175, CVPR 2025;
official code vbdi/divprune; docs/methods.md "DivPrune").

On the V projected tokens x_1..x_V of one image (LLM input space, float32), with rows L2-normalised:
    dist[i, j] = 1 - cos(x_i, x_j)
Greedy max-min diversity, k steps (`maxmin_order`):
    step 0:  pick argmax_j of the second-smallest entry of column j (its nearest-neighbour distance; the smallest is
             dist[j, j] = 0 up to rounding);
    step t:  pick argmax_j of m_j = min over the picked set S of dist[s, j] (kept incrementally: m = min(m, dist[j*]));
    ties: the lowest index (torch.argmax returns the first maximum). The picks form a nested order: the k tokens kept
    at a budget are the first k picks at any larger one. Kept tokens reach the LLM in raster order.
Count: k = round(ratio * V) (Python round, the reference's ``int(round(ratio * V))``), at least 1; default ratio
0.098 when neither keep nor ratio is given (the paper's setting: 56 of 576 tokens).

Deviations from the reference code (LLaVA/llava/model/llava_arch.py, `DivPrune` and its call):
- per image, per sample: the reference selects on batch row 0 and applies that selection to every row, and finds the
  image at a hard-coded offset 35 (the Vicuna system prompt); vlmeff reads each image's span from the connector;
- float32 distances (the reference computes them in the model dtype, fp16);
- a picked token is never picked again: the reference's later-step score of a picked token is its self-distance
  (0 up to rounding), so it could only be re-picked when every unpicked token is a duplicate (all scores <= that
  rounding), which would feed a token twice; vlmeff masks picked tokens, identical otherwise;
- LLaVA-NeXT: the reference runs on the packed features of the first image (base view + unpadded crops + newline
  tokens) with V = that length; vlmeff runs per reduction unit (a view, or an image with the connector's
  budget=per_image), on the full view grid, newlines always kept (docs/llava-next.md);
- positions: the reference's contiguous renumbering is vlmeff's "reindex" (the LLaVA default); Qwen2-VL keeps the
  M-RoPE ids of the kept tokens ("preserve"), as every pre-LLM reducer there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmeff.registry import register_strategy
from vlmeff.strategy import BudgetReducer, ImageTokens, Stage

DEFAULT_RATIO = 0.098  # the paper's and the reference's SUBSET_RATIO


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """[V, D] -> [V, V] float32 matrix 1 - cos(x_i, x_j) (rows normalised by their L2 norm)."""
    unit = F.normalize(features.float(), dim=-1)
    return 1.0 - unit @ unit.T


def maxmin_order(dist: torch.Tensor, k: int) -> torch.Tensor:
    """The first k picks [k] of DivPrune's greedy max-min selection on a distance matrix [V, V] (see the module
    docstring), in pick order. k sequential steps of four O(V) tensor operations each (launch-bound on a GPU)."""
    num = dist.shape[0]
    # step 0: nearest-neighbour distance of each token (2nd smallest of its column; the smallest is its own 0)
    score = torch.topk(dist, 2, dim=0, largest=False).values[1] if num > 1 else dist[0].clone()
    nearest = torch.full_like(score, float("inf"))  # min distance to the picked set; -inf marks a picked token
    picks = []
    for _ in range(k):
        j = torch.argmax(score)  # first maximum: lowest index on ties
        picks.append(j)
        nearest = torch.minimum(nearest, dist[j])  # -inf stays -inf: a picked token is never picked again
        nearest[j] = float("-inf")
        score = nearest
    return torch.stack(picks)


@register_strategy
@dataclass
class DivPrune(BudgetReducer):
    """Keep k projected tokens per image that are far apart: greedy max-min over cosine distances (no attention, no
    text). Default ratio 0.098 (the paper's) when neither keep nor ratio is given."""

    name = "divprune"
    stage = Stage.PRE_LLM
    summary = "greedy max-min diversity of projected tokens (keep/ratio, default ratio=0.098)"
    paper = "arXiv 2503.02175"
    token_space = "llm"

    def __post_init__(self):
        if self.keep is None and self.ratio is None:
            self.ratio = DEFAULT_RATIO
        super().__post_init__()

    def reduce_image(self, image: ImageTokens, k: int, position: int) -> ImageTokens:
        order = maxmin_order(cosine_distance(image.features), k)
        return image.keep(order.sort().values)  # raster order
