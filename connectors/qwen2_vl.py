"""Qwen2-VL / Qwen2.5-VL connector.

Reduction space: the merged tokens after the PatchMerger (one LLM token per 2x2 patch group), so pruning always
removes whole merge groups. There is no [CLS] token. Position ids are always "preserve": the M-RoPE (t, h, w) ids
of kept tokens are gathered from `get_rope_index` of the unpruned layout, text continues at the original ids, and
`rope_deltas` is recomputed for the shorter sequence (METHODS.md, "Shared rules").
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin
from transformers.vision_utils import get_vision_window_index

from vlmeff.connectors.base import Connector, VisionProbe
from vlmeff.registry import register_connector


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor without the video processor (which needs torchvision, CUDA-only on PyPI).

    Same prompts, same image processing, returns `mm_token_type_ids`; used when AutoProcessor cannot build the full
    processor on a CPU-only machine.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class QwenProbe(VisionProbe):
    """Keeps the last vision block's input; scores are recomputed from it for all images on first use."""

    def __init__(self, connector: Qwen2VLConnector, block_input: dict[str, Any], grid_thw: torch.Tensor):
        self.connector = connector
        self.block_input = block_input
        self.grid_thw = grid_thw
        self._global = None

    def global_query_attention(self, image: int) -> torch.Tensor:
        if self._global is None:
            self._global = self._compute_global()
        return self._global[image]

    @torch.no_grad()
    def _compute_global(self) -> list[torch.Tensor]:
        visual = self.connector.model.model.visual
        block = visual.blocks[-1]
        hidden = self.block_input["hidden_states"]  # [N_patches, C] (window-permuted on Qwen2.5)
        cos, sin = self.block_input["position_embeddings"]
        attn = block.attn
        n = hidden.shape[0]
        q, k, _ = attn.qkv(block.norm1(hidden)).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
        q = q.float() * cos + _rotate_half(q.float()) * sin  # [N, H, hd], RoPE as in the block
        k = k.float() * cos + _rotate_half(k.float()) * sin
        unit = visual.spatial_merge_size**2
        sizes = self.grid_thw.prod(-1).tolist()
        group_scores = []
        for qi, ki in zip(q.split(sizes), k.split(sizes)):
            q_global = qi.mean(0)  # [H, hd]: FlowCut's global token = mean query over the image's patches
            att = torch.softmax(torch.einsum("hd,nhd->hn", q_global, ki) * attn.scaling, dim=-1).mean(0)  # [n]
            group_scores.append(att.view(-1, unit).mean(-1))  # one score per 2x2 merge group
        scores = torch.cat(group_scores)
        if self.connector.windowed:  # Qwen2.5 permutes groups into windows: map back to raster order
            window_index, _ = get_vision_window_index(
                self.grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
                patch_size=visual.patch_size,
            )
            scores = scores[torch.argsort(window_index.to(scores.device))]
        return list(scores.split([s // unit for s in sizes]))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@register_connector
class Qwen2VLConnector(Connector):
    name = "qwen2-vl"
    summary = "Qwen2-VL and Qwen2.5-VL: dynamic-resolution grids, 2x2-merged tokens, M-RoPE positions"
    model_classes = (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)
    default_positions = "preserve"
    supported_positions = ("preserve",)

    def __init__(self, model, processor=None):
        super().__init__(model, processor)
        self.windowed = isinstance(model, Qwen2_5_VLForConditionalGeneration)

    @property
    def has_cls(self) -> bool:
        return False

    @property
    def feature_layer(self) -> int:
        return self.config.vision_config.depth - 1

    def image_grids(self, inputs: dict[str, Any]) -> list[tuple[int, int, int]]:
        if inputs.get("image_grid_thw") is None:
            raise ValueError("Qwen2-VL inputs need image_grid_thw (returned by the processor with pixel_values)")
        m = self.config.vision_config.spatial_merge_size
        return [(t, h // m, w // m) for t, h, w in inputs["image_grid_thw"].tolist()]

    def encoder_tokens(self, slot) -> tuple[int, int, int]:
        m = self.config.vision_config.spatial_merge_size
        t, h, w = slot.grid
        return (t, h * m, w * m)  # patch grid before the 2x2 merge (vlmeff.flops counts windows/frames from it)

    def encode(self, inputs: dict[str, Any]) -> tuple[list[torch.Tensor], VisionProbe]:
        visual = self.model.model.visual
        captured: dict[str, Any] = {}

        def capture(module, args, kwargs):
            captured["hidden_states"] = args[0] if args else kwargs["hidden_states"]
            captured["position_embeddings"] = kwargs["position_embeddings"]

        handle = visual.blocks[-1].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            grid_thw = inputs["image_grid_thw"]
            out = self.model.model.get_image_features(inputs["pixel_values"], grid_thw, return_dict=True)
        finally:
            handle.remove()
        return list(out.pooler_output), QwenProbe(self, captured, grid_thw)

    def project(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return features  # the PatchMerger already projected into the LLM space

    def original_positions(self, inputs: dict[str, Any]) -> torch.Tensor:
        positions, _ = self.model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs.get("attention_mask"),
        )
        return positions  # [3, B, S]

    def finish_positions(self, positions: torch.Tensor, text_positions: torch.Tensor) -> dict[str, Any]:
        # rows: text positions (used for mask creation) + the gathered (t, h, w) M-RoPE ids -> [4, B, S']
        lengths = (text_positions.max(-1).values + 1)  # real tokens per row (pads sit at 0)
        self.model.model.rope_deltas = (positions.amax(dim=(0, 2)) + 1 - lengths)[:, None]
        return {"position_ids": torch.cat([text_positions[None], positions], dim=0)}

    def passthrough_kwargs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {k: inputs[k] for k in ("mm_token_type_ids", "image_grid_thw") if inputs.get(k) is not None}
