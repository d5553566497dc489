"""Shared fixtures: tiny LLaVA (CLIP, DINOv2) and Qwen2-VL models saved to disk and loaded with from_pretrained."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import vlmeff
from vlmeff.testing import save_tiny_model

warnings.filterwarnings("ignore", message=".*requires torchvision.*")

KINDS = ("llava-clip", "llava-dinov2", "qwen2-vl", "qwen2.5-vl")


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: str(save_tiny_model(kind, root / kind)) for kind in KINDS}


@pytest.fixture(scope="session")
def loaded(saved_models):
    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = vlmeff.load(saved_models[kind], dtype="float32")
        return cache[kind]

    return get


def make_image(seed: int, size=(60, 50)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def make_inputs(processor, prompts: list[str], images: list[list[Image.Image]]):
    """Batch of chat prompts; images[i] are the images of prompt i (in order)."""
    texts = []
    for prompt, imgs in zip(prompts, images):
        content = [{"type": "image"} for _ in imgs] + [{"type": "text", "text": prompt}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
    flat = [im for imgs in images for im in imgs]
    return processor(images=flat or None, text=texts, return_tensors="pt", padding=True)


def assert_keep_everything_is_vanilla(model, processor, spec: str, prompts: list[str]):
    """The wrapped forward of `spec` set to keep every token gives the unwrapped model's logits bit for bit (the
    prompts as one batch, image i for prompt i); returns the call's stats."""
    import vlmeff

    inputs = make_inputs(processor, prompts, [[make_image(i)] for i in range(len(prompts))])
    with torch.no_grad():
        ref = model(**inputs).logits
    with vlmeff.wrap(model, processor, spec) as vm:
        assert torch.equal(vm(**inputs).logits, ref), spec
        return vm.stats


def assert_batch_equals_one_by_one(vm, processor, prompts: list[str], images: list[list[Image.Image]],
                                   **generate_kwargs) -> list[dict]:
    """Generate the prompts as one left-padded batch and one by one through the same wrapper `vm`: every sample's new
    tokens and selection records must be equal (records compared with the batch row as their sample, without the
    batch-global image indices). Returns the batched records as dicts."""
    inputs = make_inputs(processor, prompts, images)
    out = vm.generate(**inputs, **generate_kwargs)
    batched = [r.to_dict() for r in vm.last_record]
    single = []
    for i, (prompt, imgs) in enumerate(zip(prompts, images)):
        one = make_inputs(processor, [prompt], [imgs])
        tokens = vm.generate(**one, **generate_kwargs)
        assert torch.equal(out[i, inputs["input_ids"].shape[1]:], tokens[0, one["input_ids"].shape[1]:]), \
            f"sample {i} differs"
        single += [dict(r.to_dict(), sample=i) for r in vm.last_record]
    global_indices = ("image", "source_image")
    assert [{k: v for k, v in r.items() if k not in global_indices} for r in batched] == \
           [{k: v for k, v in r.items() if k not in global_indices} for r in single]
    return batched


def greedy(fn, inputs, n=5):
    """Greedy generation of n new tokens with `fn` (model.generate or a wrapper's generate)."""
    return fn(**inputs, max_new_tokens=n, do_sample=False)


def generate_recording_lengths(model, processor, spec, inputs, n=4):
    """Greedy-generate n tokens through vlmeff.wrap(spec), recording the LLM's input length at every call.

    Returns (output ids, the (unwrapped) wrapper with its records and stats, lengths, visual placeholders in inputs).
    """
    import vlmeff

    vm = vlmeff.wrap(model, processor, spec)
    seen, handle = llm_input_lengths(model)
    try:
        out = greedy(vm.generate, inputs, n=n)
    finally:
        handle.remove()
        vm.unwrap()
    num_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    return out, vm, seen, num_visual


def llm_input_lengths(model):
    """Record the sequence length of every language-model call; returns (lengths list, hook handle)."""
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    return seen, handle


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
