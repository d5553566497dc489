"""Calibrating instance-adaptive strategies (`atp`, `atp-learned`) to a mean token budget: `vlmeff calibrate`.

ATP's kept counts depend on each image and question, so "ATP at 64 tokens" means: the shift whose mean
equivalent-token count (visual tokens averaged over the LLM's layers) is 64 on a calibration set. The calibration set
is disjoint from the evaluated questions: synthetic POPE questions about scenes of the evaluation seed range beyond
the 500 benchmark images (seeds EVAL_SEED_BASE + 500000 ...), or the first questions of user-given POPE files.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import vlmeff
from vlmeff.eval.pope import PopeSample
from vlmeff.pruners.in_llm.atp import ATPScores, calibrate, mean_equivalent_tokens
from vlmeff.spec import parse_spec

CALIBRATION_SEED_OFFSET = 500_000


def calibration_samples(num_images: int = 12) -> list[PopeSample]:
    """Synthetic POPE questions (random split) about `num_images` scenes not used by the benchmark."""
    from vlmeff.eval.pope import load_synthetic
    from vlmeff.reference import world

    samples = load_synthetic(num_images=num_images, seed_base=world.EVAL_SEED_BASE + CALIBRATION_SEED_OFFSET)
    return [s for s in samples if s.split == "random"]


def calibrate_atp(model, processor, target: float, samples: Sequence[PopeSample], image_loader, *,
                  spec: str = "atp", batch_size: int = 8, steps: int = 8) -> tuple[ATPScores, float]:
    """The atp / atp-learned strategy (from `spec`, its shift replaced) whose mean equivalent tokens on `samples` is
    closest to target."""
    from vlmeff.eval.pope import LLAVA_PROMPT_SUFFIX

    (base,) = parse_spec(spec)
    if not isinstance(base, ATPScores):
        raise ValueError(f"spec={spec!r}: calibration is defined for 'atp' and 'atp-learned' (instance-adaptive "
                         "counts with a `shift`)")
    processor.tokenizer.padding_side = "left"
    batches = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.text + LLAVA_PROMPT_SUFFIX}]}],
            add_generation_prompt=True) for s in batch]
        inputs = processor(images=[image_loader(s) for s in batch], text=texts, return_tensors="pt", padding=True)
        batches.append(inputs.to(model.device))
    run = mean_equivalent_tokens(lambda strategy: vlmeff.wrap(model, processor, [strategy]), batches)
    with torch.no_grad():
        return calibrate(run, target, base=base, steps=steps)
