"""Pool: average-pool each image's token grid to a smaller grid (docs/methods.md "Random", "Pool").

Grid size from the budget k: the smallest integer stride r >= 2 with t * ceil(h / r) * ceil(w / r) <= k (the largest
pooled grid that fits, same stride on both axes so the aspect is kept); r = max(h, w) (one token per frame) when none
fits. Window (i, j) covers rows [i r, min((i + 1) r, h)) and columns [j r, min((j + 1) r, w)): the windows partition
the grid, border windows are smaller, and each pooled token is the plain mean of its window's tokens
(``avg_pool2d(kernel=r, stride=r, ceil_mode=True)``, which divides by the in-bounds count). So the kept count is the
pooled grid size, <= k. On Qwen2-VL the grid is the one of the already 2x2-merged tokens.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmeff.registry import register_strategy
from vlmeff.strategy import BudgetReducer, ImageTokens, Stage


def pool_stride(grid: tuple[int, int, int], k: int) -> int:
    """Smallest stride r >= 2 whose pooled grid t * ceil(h/r) * ceil(w/r) fits in k; max(h, w) when none does."""
    t, h, w = grid
    for r in range(2, max(h, w) + 1):
        if t * math.ceil(h / r) * math.ceil(w / r) <= k:
            return r
    return max(h, w, 2)


def pool_windows(grid: tuple[int, int, int], stride: int) -> list[list[int]]:
    """Original raster indices pooled into each output token, in output (raster) order."""
    t, h, w = grid
    groups = []
    for f in range(t):
        for top in range(0, h, stride):
            for left in range(0, w, stride):
                rows = range(top, min(top + stride, h))
                cols = range(left, min(left + stride, w))
                groups.append([f * h * w + r * w + c for r in rows for c in cols])
    return groups


@register_strategy
@dataclass
class Pool(BudgetReducer):
    """Average-pool the token grid with the stride that gives the largest pooled grid within the budget."""

    name = "pool"
    stage = Stage.PRE_LLM
    summary = "average-pool the token grid to at most k tokens (keep/ratio); baseline"
    paper = "baseline"
    needs_full_grid = True

    def target_count(self, image: ImageTokens) -> int:
        """The budget of the grid being pooled, i.e. of the current count. Pool needs the full grid, so this is
        `BudgetReducer`'s rule whenever Pool can run; counting from the current tokens keeps a grid that is not
        full failing in `reduce_image` rather than passing as identity."""
        return self.kept_count(image.features.shape[0])

    def reduce_image(self, image: ImageTokens, k: int, position: int) -> ImageTokens:
        t, h, w = image.record.grid
        stride = pool_stride((t, h, w), k)
        grid = image.features.float().view(t, h, w, -1).permute(0, 3, 1, 2)  # [t, D, h, w]
        pooled = F.avg_pool2d(grid, kernel_size=stride, stride=stride, ceil_mode=True)  # [t, D, s, s']
        features = pooled.permute(0, 2, 3, 1).reshape(-1, grid.shape[1]).to(image.features.dtype)  # [t*s*s', D]
        groups = pool_windows((t, h, w), stride)
        # each pooled token stands at the top-left cell of its window (its representative)
        index = torch.tensor([g[0] for g in groups], dtype=image.index.dtype, device=image.index.device)
        return dataclasses.replace(image, features=features, index=index, groups=groups)
