"""Qwen2-VL / Qwen2.5-VL connector.

Reduction space: the merged tokens after the PatchMerger (one LLM token per 2x2 patch group), so pruning always
removes whole merge groups. There is no [CLS] token. Position ids are always "preserve": the M-RoPE (t, h, w) ids
of kept tokens are gathered from `get_rope_index` of the unpruned layout, text continues at the original ids, and
`rope_deltas` is recomputed for the shorter sequence (docs/methods.md, "Shared rules").

Video (Qwen2-VL's own path): inputs with `pixel_values_videos` [sum_v t_v*H_v*W_v, C*tp*p*p] and `video_grid_thw`
[V, 3] (patch grid; tp = temporal_patch_size = 2 input frames per temporal patch) fill the `<|video_pad|>`
placeholders (`config.video_token_id`). Each temporal patch of a video is one reduction unit: one ImageTokens of
grid (1, H/2, W/2) with `frame` = its temporal index f (input frames tp*f .. tp*f+tp-1), so every pre-LLM strategy
reduces per frame. Encoding is the model's `get_video_features`; M-RoPE ids come from `get_rope_index` with the video
grids (mm_token_type_ids == 2 marks video tokens), so kept video tokens keep their (t, h, w) ids. Images and videos
may be mixed. `video_inputs` builds such inputs from PIL frames with the image processor (the video processor needs
torchvision).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.processing_utils import ProcessorMixin
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from vlmeff.attention_rows import global_query_attention
from vlmeff.connector import Connector, ImageSlot, VisionProbe, assign_slots, find_runs, grid_boxes
from vlmeff.kernels import gather_tokens
from vlmeff.registry import register_connector
from vlmeff.strategy import NotApplicableError, SelectionRecord, TokenReducer


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
        q, k, _ = block_qkv(block, self.block_input["hidden_states"], self.block_input["position_embeddings"])
        unit = visual.spatial_merge_size**2
        sizes = self.grid_thw.prod(-1).tolist()
        group_scores = []
        for qi, ki in zip(q.split(sizes), k.split(sizes)):
            group_scores.append(global_query_attention(qi, ki, block.attn.scaling).view(-1, unit).mean(-1))
        scores = torch.cat(group_scores)  # one score per 2x2 merge group
        if self.connector.windowed:  # Qwen2.5 permutes groups into windows: map back to raster order
            window_index, _ = get_vision_window_index(
                self.grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
                patch_size=visual.patch_size,
            )
            scores = scores[torch.argsort(window_index.to(scores.device))]
        return list(scores.split([s // unit for s in sizes]))


def block_qkv(block: torch.nn.Module, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k (rotary applied, as inside the block) and v of one Qwen vision block from its input, in float32.

    hidden: [N, C] packed patches of all images (the block's input) -> three [N, H, hd] tensors.
    """
    attn = block.attn
    n = hidden.shape[0]
    q, k, v = attn.qkv(block.norm1(hidden)).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    q = q.float() * cos + _rotate_half(q.float()) * sin
    k = k.float() * cos + _rotate_half(k.float()) * sin
    return q, k, v.float()


def _group_rows(x: torch.Tensor, groups: torch.Tensor, unit: int) -> torch.Tensor:
    """Rows of x [G * unit, ...] taken group by group in the order of `groups` [G'] -> [G' * unit, ...]."""
    return x.reshape(-1, unit, *x.shape[1:])[groups].reshape(-1, *x.shape[1:])


def _segments(segment_of: torch.Tensor, unit: int) -> torch.Tensor:
    """cu_seqlens [S + 1] (int32) of the attention segments of consecutive groups with the same id [G]."""
    change = torch.ones_like(segment_of, dtype=torch.bool)
    change[1:] = segment_of[1:] != segment_of[:-1]
    starts = change.nonzero().squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([segment_of.numel()])])
    lengths = (ends - starts) * unit
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _ConcatProbe(VisionProbe):
    """Probes of consecutive unit ranges (images, then video frames) seen as one: unit i goes to the part holding it."""

    def __init__(self, parts: list[tuple[VisionProbe, int]]):
        self.parts = parts  # (probe, number of units it covers)

    def _route(self, image: int) -> tuple[VisionProbe, int]:
        for probe, count in self.parts:
            if image < count:
                return probe, image
            image -= count
        raise IndexError(f"image {image}: beyond the {sum(c for _, c in self.parts)} encoded units")

    def cls_attention(self, image: int, block: int | None = None) -> torch.Tensor:
        probe, i = self._route(image)
        return probe.cls_attention(i, block)

    def keys(self, image: int, block: int | None = None) -> torch.Tensor:
        probe, i = self._route(image)
        return probe.keys(i, block)

    def global_query_attention(self, image: int) -> torch.Tensor:
        probe, i = self._route(image)
        return probe.global_query_attention(i)


def video_patches(image_processor, frames: list, temporal_patch_size: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL video inputs from PIL frames, with the image processor (resize, rescale, normalise per frame).

    Returns pixel_values_videos [t*H*W, C*tp*p*p] and video_grid_thw [1, 3] = (t, H, W) in patches, t = ceil(T / tp):
    the video processor's layout, in which patch vector [c, j, y, x] of temporal patch f holds frame tp*f + j (an odd
    frame count is padded by repeating the last frame, as the video processor does). The image processor tiles each
    frame tp times along j, so the frames' first copies are stacked in time.
    """
    if not frames:
        raise ValueError("frames=[]: a video needs at least one frame")
    tp = temporal_patch_size or image_processor.temporal_patch_size
    out = image_processor(images=list(frames), return_tensors="pt")
    grids = out["image_grid_thw"]  # [T, 3], each (1, H, W)
    if (grids != grids[0]).any():
        raise ValueError(f"video frames have different sizes (patch grids {sorted(set(map(tuple, grids.tolist())))}); "
                         "all frames of a video must share one size")
    _, h, w = grids[0].tolist()
    num, dim = len(frames), out["pixel_values"].shape[-1]
    channels = dim // (tp * image_processor.patch_size**2)
    per_frame = out["pixel_values"].view(num, h * w, channels, tp, -1)[:, :, :, 0]  # [T, N, C, p*p]
    if num % tp:
        per_frame = torch.cat([per_frame, per_frame[-1:].expand(tp - num % tp, -1, -1, -1)])
    t = per_frame.shape[0] // tp
    stacked = per_frame.view(t, tp, h * w, channels, -1).permute(0, 2, 3, 1, 4)  # [t, N, C, tp, p*p]
    return stacked.reshape(t * h * w, dim), torch.tensor([[t, h, w]])


@register_connector
class Qwen2VLConnector(Connector):
    name = "qwen2-vl"
    summary = "Qwen2-VL and Qwen2.5-VL: dynamic-resolution grids, 2x2-merged tokens, M-RoPE positions"
    model_classes = (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)
    default_positions = "preserve"
    rope = "mrope"
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
            if inputs.get("pixel_values_videos") is not None:
                return self._encode_with_videos(inputs, captured)
            grid_thw = inputs["image_grid_thw"]
            out = self.model.model.get_image_features(inputs["pixel_values"], grid_thw, return_dict=True)
        finally:
            handle.remove()
        return list(out.pooler_output), QwenProbe(self, captured, grid_thw)

    def cell_boxes(self, image_size: tuple[int, int], record: SelectionRecord) -> torch.Tensor:
        """The processor resizes the whole image (smart_resize, no crop) to the merged grid times
        patch_size * spatial_merge_size pixels, so each cell is a uniform share of the image."""
        width, height = image_size
        _, rows, cols = record.grid
        xs = torch.linspace(0, width, cols + 1, dtype=torch.float64)
        ys = torch.linspace(0, height, rows + 1, dtype=torch.float64)
        return grid_boxes(xs, ys)

    # --- video ------------------------------------------------------------------------------------------------
    @property
    def video_token_id(self) -> int:
        return self.config.video_token_id

    def image_span_ids(self) -> list[int]:
        """<|vision_start|>, the image / video placeholders and <|vision_end|>."""
        return [*super().image_span_ids(), self.config.vision_start_token_id, self.config.vision_end_token_id]

    def video_grids(self, inputs: dict[str, Any]) -> list[tuple[int, int, int]]:
        """(1, h, w) merged-token grid of every temporal patch of every video, in order (t per video)."""
        if inputs.get("video_grid_thw") is None:
            raise ValueError("Qwen2-VL video inputs need video_grid_thw (with pixel_values_videos)")
        m = self.config.vision_config.spatial_merge_size
        return [(1, h // m, w // m) for t, h, w in inputs["video_grid_thw"].tolist() for _ in range(t)]

    def slots(self, inputs: dict[str, Any]) -> list[ImageSlot]:
        """Image slots (images in order), then one slot per temporal patch of each video (videos in order)."""
        slots = super().slots(inputs) if inputs.get("pixel_values") is not None else []
        if inputs.get("pixel_values_videos") is not None:
            runs = find_runs(inputs["input_ids"] == self.video_token_id)
            slots += assign_slots(runs, self.video_grids(inputs))
        return slots

    def frame_indices(self, inputs: dict[str, Any], slots: list[ImageSlot]) -> list[int | None]:
        images = len(slots) - sum(t for t, _, _ in self._video_thw(inputs))
        return [None] * images + [f for t, _, _ in self._video_thw(inputs) for f in range(t)]

    @staticmethod
    def _video_thw(inputs: dict[str, Any]) -> list[list[int]]:
        if inputs.get("pixel_values_videos") is None or inputs.get("video_grid_thw") is None:
            return []
        return inputs["video_grid_thw"].tolist()

    def _encode_with_videos(self, inputs: dict[str, Any], captured: dict[str, Any]
                            ) -> tuple[list[torch.Tensor], VisionProbe]:
        """Images (if any) with get_image_features, videos with get_video_features: the model's own two calls, so
        keep-everything is exact. Returns per unit (image, then temporal patch) tokens [h*w, D] and one probe."""
        features: list[torch.Tensor] = []
        parts: list[tuple[VisionProbe, int]] = []
        if inputs.get("pixel_values") is not None:
            grid_thw = inputs["image_grid_thw"]
            out = self.model.model.get_image_features(inputs["pixel_values"], grid_thw, return_dict=True)
            features += list(out.pooler_output)
            parts.append((QwenProbe(self, dict(captured), grid_thw), len(out.pooler_output)))
        grid_thw = inputs["video_grid_thw"]  # [V, 3]
        out = self.model.model.get_video_features(inputs["pixel_values_videos"], grid_thw, return_dict=True)
        unit = self.config.vision_config.spatial_merge_size**2
        for video, (_, h, w) in zip(out.pooler_output, grid_thw.tolist()):  # video: [t*h*w/unit, D], t-major
            features += list(video.split(h * w // unit))
        # temporal patches attend only within themselves in the tower: one probe grid (1, h, w) per patch
        per_frame = torch.repeat_interleave(torch.cat([torch.ones_like(grid_thw[:, :1]), grid_thw[:, 1:]], 1),
                                            grid_thw[:, 0], dim=0)
        parts.append((QwenProbe(self, dict(captured), per_frame), per_frame.shape[0]))
        return features, (parts[0][0] if len(parts) == 1 else _ConcatProbe(parts))

    def video_inputs(self, frames: list, prompt: str | list[str]) -> dict[str, Any]:
        """Model inputs for one video given as PIL frames and a prompt holding one `<|video_pad|>` (the chat
        template's video entry): the placeholder is expanded to the video's t*h*w/4 tokens; input_ids,
        attention_mask, mm_token_type_ids (2 = video), pixel_values_videos, video_grid_thw."""
        processor = self.processor
        if processor is None:
            raise ValueError("video_inputs needs the processor: vlmeff.wrap(model, processor, spec)")
        video_token = getattr(processor, "video_token", None) or "<|video_pad|>"
        prompt = prompt if isinstance(prompt, str) else prompt[0]
        if prompt.count(video_token) != 1:
            raise ValueError(f"the prompt must hold exactly one {video_token} (the chat template's "
                             f"{{'type': 'video'}} entry); it holds {prompt.count(video_token)}: the processor's chat "
                             "template may have no video entry")
        pixel_values_videos, grid_thw = video_patches(processor.image_processor, frames)
        num_tokens = int(grid_thw.prod()) // self.config.vision_config.spatial_merge_size**2
        text = prompt.replace(video_token, video_token * num_tokens)
        encoded = processor.tokenizer(text, return_tensors="pt")
        ids = encoded["input_ids"]
        types = (ids == self.image_token_id).long() + 2 * (ids == self.video_token_id).long()
        return {"input_ids": ids, "attention_mask": encoded["attention_mask"], "mm_token_type_ids": types,
                "pixel_values_videos": pixel_values_videos, "video_grid_thw": grid_thw}

    def assemble(self, inputs: dict[str, Any], slots: list[ImageSlot], images: list, positions: str
                 ) -> dict[str, Any]:
        out = super().assemble(inputs, slots, images, positions)
        if inputs.get("pixel_values_videos") is None:
            return out
        # the model scatters images and videos separately (into image / video placeholders): split by modality
        ids = inputs["input_ids"]
        is_video = [int(ids[s.sample, s.start]) == self.video_token_id for s in slots]
        embeds = [img.features for img in self.project_images(images)]
        mm = {}
        for key, flag in (("image", False), ("video", True)):
            part = tuple(e for e, v in zip(embeds, is_video) if v == flag)
            if part:
                mm[key] = BaseModelOutputWithPooling(pooler_output=part)
        out["mm_encoder_outputs"] = mm
        return out

    def encode_reduced(self, inputs: dict[str, Any], strategies: list[TokenReducer]
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[dict[int, int]]]:
        """The vision tower's blocks in an explicit loop, vision-stage strategies pruning whole 2x2 merge groups.

        Same computation as `Qwen2VisionTransformerPretrainedModel.forward` (and Qwen2.5's, with its window
        permutation): patch embedding, rotary embeddings, blocks with attention per image (Qwen2.5: per window in
        the windowed blocks), PatchMerger. After each block every strategy may return, per image, the current merge
        groups to keep; their 4 patch rows, rotary rows and the attention segment lengths are gathered/recomputed.
        Strategies get in `state`: "final_block" (depth - 1: the merger reads its output), "num_groups" (per image,
        before any reduction), "current_groups" (() -> per image, its groups now), "group_size" (4), "scale" (the
        attention softmax scale) and "image_qkv" ((block, block input) -> per image (q, k, v), each [n_i, H, hd]
        float32 over its current patches, rotary applied).
        Returns per image the merged tokens [V'_i, D_llm] in raster order, their grid indices [V'_i] and the group
        count after each block.
        """
        names = ", ".join(s.name for s in strategies)
        if inputs.get("pixel_values_videos") is not None:
            raise NotApplicableError(f"{names}: pruning inside the Qwen vision encoder is not implemented for video "
                                     "inputs (pixel_values_videos); use a pre-LLM strategy, which reduces per frame")
        grid_thw = inputs["image_grid_thw"]
        if (grid_thw[:, 0] != 1).any():
            raise NotApplicableError(f"{names}: pruning inside the Qwen vision encoder supports still images "
                                     "(grid t = 1) only")
        visual = self.model.model.visual
        unit = visual.spatial_merge_size**2
        groups = (grid_thw.prod(-1) // unit).tolist()  # merge groups (LLM tokens) per image
        num_images = len(groups)
        hidden = visual.patch_embed(inputs["pixel_values"].type(visual.dtype))  # [P, C]
        device = hidden.device
        cos, sin = visual.rotary_pos_emb(hidden, get_vision_position_ids(grid_thw, visual.spatial_merge_size))
        image_of = torch.repeat_interleave(torch.arange(num_images, device=device),
                                           torch.tensor(groups, device=device))  # [G] image of each group
        offsets = torch.tensor([0] + groups[:-1], device=device).cumsum(0)
        raster = torch.arange(sum(groups), device=device)  # raster group index (within the batch) of each group
        window_of = None
        if self.windowed:  # Qwen2.5: groups in window order; window id of each group for the windowed blocks
            window_index, cu_windows = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                                               window_size=visual.window_size,
                                                               patch_size=visual.patch_size)
            window_index = window_index.to(device)
            window_sizes = (cu_windows[1:] - cu_windows[:-1]).to(device) // unit
            window_of = torch.repeat_interleave(torch.arange(window_sizes.numel(), device=device), window_sizes)
            raster = window_index
            hidden = _group_rows(hidden, window_index, unit)
            cos, sin = _group_rows(cos, window_index, unit), _group_rows(sin, window_index, unit)
            image_of = image_of[window_index]
        full_blocks = set(getattr(visual, "fullatt_block_indexes", range(len(visual.blocks))))

        def current_groups() -> list[int]:
            return torch.bincount(image_of, minlength=num_images).tolist()

        def image_qkv(block, block_input):
            q, k, v = block_qkv(block, block_input, (cos, sin))
            sizes = [g * unit for g in current_groups()]
            return list(zip(q.split(sizes), k.split(sizes), v.split(sizes)))

        context = {"final_block": len(visual.blocks) - 1, "num_groups": groups, "group_size": unit,
                   "current_groups": current_groups, "image_qkv": image_qkv, "scale": visual.blocks[0].attn.scaling}
        states = [dict(context) for _ in strategies]
        per_layer: list[dict[int, int]] = [{} for _ in range(num_images)]
        for index, block in enumerate(visual.blocks):
            segment_of = image_of if window_of is None or index in full_blocks else window_of
            cu_seqlens = _segments(segment_of, unit)
            block_input = hidden
            hidden = block(block_input, cu_seqlens=cu_seqlens, max_seqlen=int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
                           position_embeddings=(cos, sin))
            for strategy, state in zip(strategies, states):
                keep = strategy.prune_layer(index, block, block_input, hidden, state)
                if keep is None:  # per image: current group positions to keep (ascending), or None
                    continue
                counts = torch.bincount(image_of, minlength=num_images)
                starts = (counts.cumsum(0) - counts).tolist()  # first current group of each image
                kept = torch.cat([k.to(device) + start for k, start in zip(keep, starts)])  # [G'] groups
                rows = (kept[:, None] * unit + torch.arange(unit, device=device)).flatten()  # [G' * unit] patches
                hidden = gather_tokens(hidden[None], rows[None])[0]
                block_input = gather_tokens(block_input[None], rows[None])[0]
                cos, sin = cos[rows], sin[rows]
                image_of, raster = image_of[kept], raster[kept]
                window_of = None if window_of is None else window_of[kept]
            for i, count in enumerate(current_groups()):
                per_layer[i][index] = count
        merged = visual.merger(hidden)  # [G', D_llm] in the current (window) order
        features, indices = [], []
        for i in range(num_images):
            mine = (image_of == i).nonzero().squeeze(1)
            order = mine[torch.argsort(raster[mine])]  # raster order within the image
            features.append(merged[order])
            indices.append(raster[order] - offsets[i])
        return features, indices, per_layer

    def encoder_layer_tokens(self, slot: ImageSlot, record: SelectionRecord) -> list[int] | None:
        """Patches entering each vision block (the full grid, then 4 x the groups kept after each block), then the
        PatchMerger's input (4 x the groups the last block kept)."""
        if not record.per_layer_kept:
            return None
        t, h, w = self.encoder_tokens(slot)
        unit = self.config.vision_config.spatial_merge_size**2
        last = max(record.per_layer_kept)
        return [t * h * w] + [record.per_layer_kept[b] * unit for b in range(last + 1)]

    def project(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return features  # the PatchMerger already projected into the LLM space

    def original_positions(self, inputs: dict[str, Any]) -> torch.Tensor:
        videos = {k: inputs[k] for k in ("video_grid_thw", "second_per_grid_ts") if inputs.get(k) is not None}
        positions, _ = self.model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"), attention_mask=inputs.get("attention_mask"), **videos,
        )
        return positions  # [3, B, S]

    def layout_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        return position_ids[1:]  # [3, B, S] (t, h, w) ids; row 0 of the kwarg is the text position

    def finish_positions(self, positions: torch.Tensor, text_positions: torch.Tensor) -> dict[str, Any]:
        # rows: text positions (used for mask creation) + the gathered (t, h, w) M-RoPE ids -> [4, B, S']
        lengths = (text_positions.max(-1).values + 1)  # real tokens per row (pads sit at 0)
        self.model.model.rope_deltas = (positions.amax(dim=(0, 2)) + 1 - lengths)[:, None]
        return {"position_ids": torch.cat([text_positions[None], positions], dim=0)}

    def passthrough_kwargs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        keys = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")
        return {k: inputs[k] for k in keys if inputs.get(k) is not None}
