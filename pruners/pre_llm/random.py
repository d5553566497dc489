"""Random: keep k visual tokens of each image chosen uniformly at random (docs/methods.md "Random", "Pool").

Rule: for one image with n current tokens and budget k (keep / ratio as for every pruner), the kept tokens are the
first k entries of ``torch.randperm(n, generator=g)``, sorted back into raster order. The generator is seeded per
image from (seed, the image's original token count, the image's position within its own sample), see
`image_seed`, so a sample gets the same selection whether it runs alone or inside any batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from vlmeff.registry import register_strategy
from vlmeff.strategy import BudgetReducer, ImageTokens, Stage, StrategyError


def image_seed(seed: int, num_tokens: int, position: int) -> int:
    """Seed of one image's generator: the first 8 bytes (big-endian, top bit cleared) of
    sha256("{seed}:{num_tokens}:{position}"), where position counts the images of the same sample before it."""
    digest = hashlib.sha256(f"{seed}:{num_tokens}:{position}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


@register_strategy
@dataclass
class RandomPruner(BudgetReducer):
    """Keep k tokens per image uniformly at random (seeded, reproducible per sample), raster order."""

    name = "random"
    stage = Stage.PRE_LLM
    summary = "uniformly random k tokens per image (keep/ratio, seed); baseline"
    paper = "baseline"

    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.seed < 0:
            raise StrategyError(f"random.seed={self.seed}: must be >= 0")

    def reduce_image(self, image: ImageTokens, k: int, position: int) -> ImageTokens:
        generator = torch.Generator().manual_seed(image_seed(self.seed, image.record.num_tokens, position))
        kept = torch.randperm(image.features.shape[0], generator=generator)[:k].sort().values  # [k], CPU: same anywhere
        return image.keep(kept.to(image.features.device))
