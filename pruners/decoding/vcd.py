"""VCD (visual contrastive decoding, arXiv 2311.16922; docs/methods.md "VCD"), `vcd`. Training-free.

Contrast branch: the same prompt with the image distorted by diffusion forward noise on the processor's normalised
pixels, x' = sqrt(abar_t) x + sqrt(1 - abar_t) eps at step t = noise_step (500) of 1000, beta_t = sigmoid(
linspace(-6, 6, 1000)) (5e-3 - 1e-5) + 1e-5, abar_t = prod_{s <= t} (1 - beta_s), indexed as the reference code
indexes it (abar[500]). eps ~ N(0, 1) from a generator seeded with `seed`, drawn per image (every image of a given
shape gets the same noise, so a batch equals its prompts one by one; the reference code draws fresh, unseeded
noise per call). Per step, on logits: out = (1 + alpha) l - alpha l_noised, and -inf where l < log(beta) + max l
(alpha = 1, beta = 0.1). With a reduction, the noised image goes through the same vision and pre-LLM pipeline as
the image (its own selection). Qwen2-VL: the noise is applied to its flattened normalised patches, per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vlmeff.decoding import Branch, ContrastDecoding
from vlmeff.registry import register_strategy
from vlmeff.strategy import StrategyError

NUM_STEPS = 1000


def noise_schedule(num_steps: int = NUM_STEPS) -> torch.Tensor:
    """[num_steps] abar_t = cumprod(1 - beta_t), beta_t = sigmoid(linspace(-6, 6)) (5e-3 - 1e-5) + 1e-5 (float32)."""
    betas = torch.sigmoid(torch.linspace(-6, 6, num_steps)) * (0.5e-2 - 1e-5) + 1e-5
    return torch.cumprod(1 - betas, dim=0)


def diffusion_noise(pixels: torch.Tensor, step: int, seed: int) -> torch.Tensor:
    """One image's pixels (any shape) noised to `step`: sqrt(abar) x + sqrt(1 - abar) eps, eps seeded (CPU)."""
    abar = float(noise_schedule()[step])
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn(pixels.shape, generator=generator, dtype=torch.float32).to(pixels.device)
    return (math.sqrt(abar) * pixels.float() + math.sqrt(1 - abar) * eps).to(pixels.dtype)


def noised_pixels(pixel_values: torch.Tensor, grid_thw: torch.Tensor | None, step: int, seed: int) -> torch.Tensor:
    """Every image of a batch noised on its own: LLaVA pixel_values [I, 3, H, W] per first index; Qwen2-VL's
    flattened patches [sum t h w, D] per image's t h w rows (`grid_thw` [I, 3])."""
    if grid_thw is None:
        return torch.stack([diffusion_noise(image, step, seed) for image in pixel_values])
    sizes = [int(t * h * w) for t, h, w in grid_thw.tolist()]
    return torch.cat([diffusion_noise(part, step, seed) for part in pixel_values.split(sizes)])


@register_strategy
@dataclass
class VCD(ContrastDecoding):
    """Contrast against the same prompt with a diffusion-noised image: (1 + alpha) l - alpha l', plausibility beta."""

    name = "vcd"
    summary = "decoding: contrast with a diffusion-noised image, (1+alpha) l - alpha l' with a beta plausibility cutoff"
    paper = "arXiv 2311.16922"

    alpha: float = 1.0
    beta: float = 0.1
    noise_step: int = 500
    seed: int = 0
    param_ranges = {"seed": "[0, inf)"}  # like random.seed: a negative seed is refused, not wrapped around

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.noise_step < NUM_STEPS:
            raise StrategyError(f"vcd.noise_step={self.noise_step}: must be in [0, {NUM_STEPS})")

    def branches(self, inputs, connector):
        noised = dict(inputs)
        if inputs.get("pixel_values") is not None:
            noised["pixel_values"] = noised_pixels(inputs["pixel_values"], inputs.get("image_grid_thw"),
                                                   self.noise_step, self.seed)
        if inputs.get("pixel_values_videos") is not None:
            noised["pixel_values_videos"] = noised_pixels(inputs["pixel_values_videos"], inputs.get("video_grid_thw"),
                                                          self.noise_step, self.seed)
        return [Branch("noised image", noised)]
