"""Tiny, offline models of the real HF classes, for tests and for trying the CLI without a hub.

Every builder returns real transformers classes (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
Qwen2VLForConditionalGeneration)
with random weights and a real processor whose tokenizer is a small byte-level BPE trained here, so nothing is
downloaded. `save_tiny_model(kind, path)` writes model + processor with save_pretrained so that tests exercise
the same from_pretrained path as real checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch

_CORPUS = [
    "USER: What is in the image? ASSISTANT: A red circle and a blue square.",
    "Is there a dog in the image? Answer the question using a single word or phrase. Yes No",
    "Describe the picture in detail. There is a cat next to a tree, a car, a person and a bird.",
    "system user assistant The quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9",
]

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    " {% else %}ASSISTANT: {% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(special_tokens: list[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on a few sentences (offline), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _llava_tokenizer():
    """The tiny LLaVA families' tokenizer: byte-level BPE with Llama's special tokens and <image>, left padding."""
    tokenizer = build_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"])
    tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
    tokenizer.padding_side = "left"
    return tokenizer


def _tiny_llama_config(tokenizer, max_positions: int):
    """The tiny LLaVA families' text model: 2 Llama layers, GQA (4 query / 2 key-value heads)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def tiny_llava(vision: str = "clip", image_size: int = 56, patch_size: int = 7, seed: int = 0):
    """A tiny LlavaForConditionalGeneration + LlavaProcessor. vision: "clip" or "dinov2" (both with CLS)."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        Dinov2Config,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _llava_tokenizer()
    vision_kwargs = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size,
    )
    if vision == "clip":
        vision_config = CLIPVisionConfig(**vision_kwargs, projection_dim=32)
    elif vision == "dinov2":
        vision_config = Dinov2Config(**{k: v for k, v in vision_kwargs.items() if k != "intermediate_size"}, mlp_ratio=2)
    else:
        raise ValueError(f"vision={vision!r}: expected 'clip' or 'dinov2'")
    text_config = _tiny_llama_config(tokenizer, max_positions=512)
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor


# LLaVA-NeXT's pinpoints as (rows, columns) of crops: [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
NEXT_CROP_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


def tiny_llava_next(image_size: int = 42, patch_size: int = 7, seed: int = 0):
    """A tiny LlavaNextForConditionalGeneration + LlavaNextProcessor: CLIP tower with [CLS] (a 6 x 6 patch grid per
    42-px view), the real checkpoints' anyres crop grids at this view size (`NEXT_CROP_GRIDS`), the text head of
    `tiny_llava`."""
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tokenizer = _llava_tokenizer()
    pinpoints = [[rows * image_size, cols * image_size] for rows, cols in NEXT_CROP_GRIDS]
    vision_config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     image_size=image_size, patch_size=patch_size, projection_dim=32)
    text_config = _tiny_llama_config(tokenizer, max_positions=1024)
    config = LlavaNextConfig(
        vision_config=vision_config, text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor


def tiny_qwen2_vl(seed: int = 0, image_size: int = 168, version: str = "2"):
    """A tiny Qwen2-VL (version "2") or Qwen2.5-VL ("2.5") model + image-only processor (image_size^2 pixels)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    from vlmeff.connectors.qwen2_vl import Qwen2VLImageOnlyProcessor

    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tokenizer = build_tokenizer(specials)
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"})
    tokenizer.padding_side = "left"
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    patches = dict(num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if version == "2.5":  # window attention (4x4 merged units) in blocks 0 and 2, full attention in 1 and 3
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision_config = dict(depth=4, hidden_size=32, intermediate_size=48, out_hidden_size=64, window_size=112,
                             fullatt_block_indexes=[1, 3], **patches)
    elif version == "2":
        config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision_config = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, **patches)
    else:
        raise ValueError(f"version={version!r}: expected '2' or '2.5'")
    config = config_cls(
        vision_config=vision_config,
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3]},
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2,
                                               temporal_patch_size=2)
    processor = Qwen2VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                           chat_template=QWEN_CHAT_TEMPLATE)
    return model, processor


TINY_BUILDERS = {"llava-clip": lambda: tiny_llava("clip"), "llava-dinov2": lambda: tiny_llava("dinov2"),
                 "llava-next": tiny_llava_next,
                 "qwen2-vl": tiny_qwen2_vl, "qwen2.5-vl": lambda: tiny_qwen2_vl(version="2.5")}


def save_tiny_model(kind: str, path: str | Path) -> Path:
    """Build a tiny model of `kind` (one of TINY_BUILDERS) and save model + processor to `path`."""
    if kind not in TINY_BUILDERS:
        raise ValueError(f"kind={kind!r}: expected one of {sorted(TINY_BUILDERS)}")
    model, processor = TINY_BUILDERS[kind]()
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
