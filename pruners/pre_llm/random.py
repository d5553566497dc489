"""Random: keep k visual tokens of each image chosen uniformly at random (METHODS.md "Random and Pool" baselines).

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
from vlmeff.strategy import Budget, ImageTokens, Stage, StrategyError, TokenReducer


def image_seed(seed: int, num_tokens: int, position: int) -> int:
    """Seed of one image's generator: the first 8 bytes (big-endian, top bit cleared) of
    sha256("{seed}:{num_tokens}:{position}"), where position counts the images of the same sample before it."""
    digest = hashlib.sha256(f"{seed}:{num_tokens}:{position}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def positions_in_sample(images: list[ImageTokens]) -> list[int]:
    """For each image, how many images of the same sample (batch row) come before it."""
    seen: dict[int, int] = {}
    positions = []
    for img in images:
        positions.append(seen.get(img.record.sample, 0))
        seen[img.record.sample] = positions[-1] + 1
    return positions


@register_strategy
@dataclass
class RandomPruner(TokenReducer, Budget):
    """Keep k tokens per image uniformly at random (seeded, reproducible per sample), raster order."""

    name = "random"
    stage = Stage.PRE_LLM
    summary = "uniformly random k tokens per image (keep/ratio, seed); baseline"
    paper = "baseline"

    seed: int = 0

    def __post_init__(self):
        TokenReducer.__post_init__(self)
        self._check_budget(self.name)
        if self.seed < 0:
            raise StrategyError(f"random.seed={self.seed}: must be >= 0")

    def reduce(self, images: list[ImageTokens]) -> list[ImageTokens]:
        out = []
        for img, position in zip(images, positions_in_sample(images)):
            num = img.features.shape[0]
            k = min(self.kept_count(img.num_original) if self.ratio is not None else self.keep, num)
            if k == num:  # keep everything: identity (exactly the unwrapped model)
                img.record.strategies.append(self.name)
                out.append(img)
                continue
            img.record.strategies.append(self.name)
            generator = torch.Generator().manual_seed(image_seed(self.seed, img.record.num_tokens, position))
            kept = torch.randperm(num, generator=generator)[:k].sort().values  # [k], CPU: same on every device
            out.append(img.keep(kept.to(img.features.device)))
        return out
