"""Tiny models for vLLM's CPU backend, saved like real checkpoints, for the plugin's parity tests and the serving
benchmark.

vlmeff.testing's tiny models use a text head size of 16, which vLLM's CPU attention backend does not take (it needs
32, 64, 80, ...): these builders take the same models (`vlmeff.testing.tiny_llava`, `tiny_qwen2_vl`: same tokenizer,
vision tower and processor settings) with the text model at 2 query heads / 1 key-value head of 32 dimensions (the
hidden size stays 64), weights drawn again from the seed. Qwen's processor is the full `Qwen2VLProcessor` /
`Qwen2_5_VLProcessor` with its video processor, which vLLM loads with AutoProcessor (the video processor needs
torchvision, which the vLLM environment has: scripts/vllm_env.sh).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmeff.testing import tiny_llava, tiny_qwen2_vl

TEXT_HEADS = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32)


def _text_heads(text_config) -> None:
    for key, value in TEXT_HEADS.items():
        setattr(text_config, key, value)


def tiny_llava_vllm(seed: int = 0, image_size: int = 56):
    """LlavaForConditionalGeneration (CLIP tower with [CLS], 8 x 8 patches at 56 px) + LlavaProcessor."""
    from transformers import LlavaForConditionalGeneration

    model, processor = tiny_llava("clip", image_size=image_size)
    config = model.config
    _text_heads(config.text_config)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval(), processor


def tiny_qwen_vllm(version: str = "2.5", seed: int = 0, image_size: int = 112):
    """Qwen2-VL ("2") or Qwen2.5-VL ("2.5") with the full processor (image + video processor); M-RoPE sections
    [4, 6, 6] for the 32-dimensional heads."""
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    model, small = tiny_qwen2_vl(seed=seed, image_size=image_size, version=version)
    config = model.config
    _text_heads(config.text_config)
    config.text_config.rope_parameters["mrope_section"] = [4, 6, 6]
    model_cls = Qwen2_5_VLForConditionalGeneration if version == "2.5" else Qwen2VLForConditionalGeneration
    processor_cls = Qwen2_5_VLProcessor if version == "2.5" else Qwen2VLProcessor
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    image = small.image_processor
    pixels = image_size * image_size
    video = Qwen2VLVideoProcessor(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=14,
                                  merge_size=2, temporal_patch_size=2)
    processor = processor_cls(image_processor=image, tokenizer=small.tokenizer, video_processor=video,
                              chat_template=small.chat_template)
    return model, processor


BUILDERS = {"llava": tiny_llava_vllm, "qwen2-vl": lambda: tiny_qwen_vllm("2"),
            "qwen2.5-vl": lambda: tiny_qwen_vllm("2.5")}


def save_tiny(kind: str, path: str | Path) -> Path:
    """Build a tiny model of `kind` (a key of BUILDERS) and save model + processor to `path` (transformers'
    save_pretrained, as a real checkpoint)."""
    model, processor = BUILDERS[kind]()
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
