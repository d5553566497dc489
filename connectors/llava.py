"""LLaVA-1.5 connector (transformers' LlavaForConditionalGeneration: CLIP / DINOv2 / SigLIP tower + MLP projector).

Reduction space: vision features at `vision_feature_layer` (after dropping [CLS] for the "default" select strategy),
before the projector, so pruned tokens cost no projector FLOPs. Encoding reproduces `get_image_features` exactly:
same tower call, same hidden state, same projector.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import LlavaForConditionalGeneration

from vlmeff.attention_rows import cls_attention_one_head, cls_attention_row
from vlmeff.connector import Connector, VisionProbe, grid_boxes
from vlmeff.connectors.vision_towers import capture_projections, vit_spec
from vlmeff.kernels import gather_tokens
from vlmeff.registry import register_connector
from vlmeff.strategy import NotApplicableError, SelectionRecord, TokenReducer


class LlavaProbe(VisionProbe):
    """Keeps the tower's hidden states of one batch; the [CLS] row is recomputed for all images at once, lazily."""

    def __init__(self, connector: LlavaConnector, hidden_states: tuple[torch.Tensor, ...]):
        self.connector = connector
        self.hidden_states = hidden_states
        self._inputs: dict[int, tuple[torch.Tensor, torch.Tensor, int, float]] = {}  # block -> (q_cls, k, heads, scale)
        self._rows: dict[tuple[str, int], torch.Tensor] = {}

    def _query_keys(self, block: int) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """(q_cls [I, 1, W], k [I, T, W] float32, heads, scale) of encoder block `block`, recomputed once from the
        block's input (hs[block]) and shared by every row this probe gives."""
        if block not in self._inputs:
            spec = self.connector.vit
            if spec.cls_query_keys is None:
                raise NotApplicableError(f"keys of the {self.connector.config.vision_config.model_type} tower "
                                         "are not exposed by vlmeff yet")
            layer = spec.layers(self.connector.model.model.vision_tower)[block]
            with torch.no_grad():
                q, k, heads, scale = spec.cls_query_keys(layer, self.hidden_states[block])
            self._inputs[block] = (q.float(), k.float(), heads, scale)
        return self._inputs[block]

    def keys(self, image: int, block: int | None = None) -> torch.Tensor:
        block = self.connector.feature_layer if block is None else block
        return self._query_keys(block)[1][image]  # [T, H*hd]

    def _cls_row(self, kind: str, block: int | None) -> torch.Tensor:
        block = self.connector.feature_layer_index - 1 if block is None else block  # default: OUTPUT = feature layer
        if (kind, block) not in self._rows:
            q, k, heads, scale = self._query_keys(block)
            row = cls_attention_row(q, k, heads, scale) if kind == "heads" else cls_attention_one_head(q, k)
            self._rows[(kind, block)] = row[..., 1:]  # patch columns: [I, H, V] or [I, V]
        return self._rows[(kind, block)]

    def cls_attention_one_head(self, image: int, block: int | None = None) -> torch.Tensor:
        if not self.connector.has_cls:
            return super().cls_attention_one_head(image, block)
        return self._cls_row("one-head", block)[image]

    def cls_attention(self, image: int, block: int | None = None) -> torch.Tensor:
        if not self.connector.has_cls:
            return super().cls_attention(image, block)
        return self._cls_row("heads", block)[image]


@register_connector
class LlavaConnector(Connector):
    name = "llava"
    summary = "LLaVA-1.5 (LlavaForConditionalGeneration): CLIP/DINOv2/SigLIP tower, single image grid"
    model_classes = (LlavaForConditionalGeneration,)

    def __init__(self, model, processor=None):
        super().__init__(model, processor)
        self.vit = vit_spec(self.config.vision_config)
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            layer = max(layer, key=lambda i: i % (self.config.vision_config.num_hidden_layers + 1))
        # index into hidden_states (0 = embeddings, i = output of block i-1)
        self.feature_layer_index = layer % (self.config.vision_config.num_hidden_layers + 1)

    @property
    def has_cls(self) -> bool:
        return self.vit.has_cls

    @property
    def feature_layer(self) -> int:
        """0-based index of the vision block whose output LLaVA reads (22 for CLIP-L with -2)."""
        return self.feature_layer_index - 1

    def image_grids(self, inputs: dict[str, Any]) -> list[tuple[int, int, int]]:
        pixel_values = inputs["pixel_values"]
        patch = self.config.vision_config.patch_size
        h, w = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
        return [(1, h, w)] * pixel_values.shape[0]

    def encoder_tokens(self, slot) -> int:
        t, h, w = slot.grid
        return t * h * w + int(self.has_cls)

    def encode(self, inputs: dict[str, Any]) -> tuple[list[torch.Tensor], VisionProbe]:
        tower = self.model.model.vision_tower
        pixel_values = inputs["pixel_values"].to(tower.dtype)
        out = tower(pixel_values, output_hidden_states=True, return_dict=True)
        layers = self.config.vision_feature_layer
        strategy = self.config.vision_feature_select_strategy
        pick = [layers] if isinstance(layers, int) else list(layers)
        selected = [out.hidden_states[i] for i in pick]
        if strategy == "default":
            selected = [hs[:, 1:] for hs in selected]
        features = torch.cat(selected, dim=-1)  # [I, V, D_vis]
        return list(features), LlavaProbe(self, out.hidden_states)

    def encode_reduced(self, inputs: dict[str, Any], strategies: list[TokenReducer]
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[dict[int, int]]]:
        """The tower's blocks in an explicit loop (embeddings, then blocks 0..feature_layer; later blocks are not
        needed), calling each vision-stage strategy after every block and gathering the positions it keeps.

        Returns per-image features at the feature layer ([CLS] dropped), their original grid indices and the patch
        count after each block. With strategies that keep everything this is exactly `encode`'s features.
        """
        names = ", ".join(s.name for s in strategies)
        if not self.vit.runs_layer_by_layer:
            raise NotApplicableError(f"{names}: the {self.config.vision_config.model_type} tower has no [CLS] token or "
                                     "is not supported layer by layer by vlmeff")
        if not isinstance(self.config.vision_feature_layer, int) or self.config.vision_feature_select_strategy != "default":
            raise NotApplicableError(f"{names}: vision-stage pruning needs one vision_feature_layer and the 'default' "
                                     "select strategy ([CLS] dropped)")
        tower = self.model.model.vision_tower
        layers = self.vit.layers(tower)
        hidden = self.vit.embed(tower, inputs["pixel_values"].to(tower.dtype))  # [I, T, D], [CLS] first
        num_images, num_tokens, _ = hidden.shape
        # position of each current token in the ORIGINAL sequence ([CLS] = 0, patch j = j + 1)
        positions = torch.arange(num_tokens, device=hidden.device).expand(num_images, -1)  # [I, T]
        projected: dict = {}  # the running block's own q / k / v outputs (capture_projections)

        def attention_inputs(layer, hidden_in):  # what the block just computed from hidden_in: nothing recomputed
            return projected["q"], projected["k"], projected["v"], projected["heads"], projected["scale"]

        context = {"feature_layer": self.feature_layer, "final_block": self.feature_layer - 1,
                   "num_patches": num_tokens - 1, "attention_inputs": attention_inputs}
        states = [dict(context) for _ in strategies]
        per_layer: dict[int, int] = {}
        for block in range(self.feature_layer + 1):
            hidden_in = hidden
            with capture_projections(self.vit, layers[block]) as captured:
                hidden = layers[block](hidden_in, None)  # CLIPEncoderLayer / Dinov2Layer: (hidden, mask) -> hidden
            projected.update(captured, q=captured["q"][:, :1])  # only the [CLS] query is read
            for strategy, state in zip(strategies, states):
                keep = strategy.prune_layer(block, layers[block], hidden_in, hidden, state)
                if keep is not None:  # [I, T'] ascending, [CLS] (position 0) first
                    hidden = gather_tokens(hidden, keep)
                    positions = gather_tokens(positions, keep)
                    hidden_in = gather_tokens(hidden_in, keep)
                    for name in ("k", "v"):  # a later strategy of this block scores the kept tokens
                        projected[name] = gather_tokens(projected[name], keep)
            per_layer[block] = hidden.shape[1] - 1
        features = hidden[:, 1:]  # [I, V', D_vis] feature layer, [CLS] dropped
        return list(features), list(positions[:, 1:] - 1), [dict(per_layer) for _ in range(num_images)]

    def cell_boxes(self, image_size: tuple[int, int], record: SelectionRecord) -> torch.Tensor:
        """Undo the image processor's steps, as it does them: LlavaImageProcessor's pad to a centred square (do_pad),
        resize (shortest edge, shortest + longest edge, max height / width or a fixed size), centre crop (padding
        first when the crop is larger), then one patch per cell. Any other pad (after these steps, at the bottom /
        right) does not move the cells. LLaVA-1.5's single view only: a subclass for another model (LLaVA-NeXT's
        views) must give its own."""
        from transformers.image_processing_backends import PilBackend

        processor = getattr(self.processor, "image_processor", None)
        if processor is None:
            raise NotApplicableError("cell boxes need the model's image processor: vlmeff.wrap(model, processor, ...)")
        width, height = image_size
        _, rows, cols = record.grid
        patch = self.config.vision_config.patch_size
        square = bool(getattr(processor, "do_pad", False)) and isinstance(processor, _square_pad_processors())
        late_pad = bool(getattr(processor, "do_pad", False)) and not square
        pad_x = pad_y = 0
        if square:
            side = max(width, height)
            pad_x, pad_y, width, height = (side - width) // 2, (side - height) // 2, side, side
        resized_h, resized_w = _resized_size(processor, height, width) if processor.do_resize else (height, width)
        top = left = 0
        if processor.do_center_crop:
            crop_h, crop_w = _size_field(processor.crop_size, "height"), _size_field(processor.crop_size, "width")
            ceil_pad = isinstance(processor, PilBackend)  # numpy's centre crop pads ceil((C - R) / 2) in front
            top, left = _crop_start(resized_h, crop_h, ceil_pad), _crop_start(resized_w, crop_w, ceil_pad)
            seen = (crop_h, crop_w)
        else:
            seen = (resized_h, resized_w)
        if not late_pad and seen != (rows * patch, cols * patch):
            raise NotApplicableError(f"the image processor makes {seen[1]}x{seen[0]} px views but the token grid "
                                     f"{rows}x{cols} of {patch} px patches needs {cols * patch}x{rows * patch}")
        steps = torch.arange(max(rows, cols) + 1, dtype=torch.float64) * patch
        xs = (steps[: cols + 1] + left) * (width / resized_w) - pad_x
        ys = (steps[: rows + 1] + top) * (height / resized_h) - pad_y
        return grid_boxes(xs, ys)

    def project(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        projector = self.model.model.multi_modal_projector
        if len({f.shape[0] for f in features}) == 1:  # one batched call when counts agree
            return list(projector(torch.stack(features)))
        return [projector(f[None])[0] for f in features]


def _size_field(size, key: str):
    """A field of an image processor's size dict (a SizeDict in transformers 5, a plain dict before)."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _resized_size(processor, height: int, width: int) -> tuple[int, int]:
    """(height, width) after the processor's resize, by the helpers transformers' backends call."""
    from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
    from transformers.image_utils import ChannelDimension, get_image_size_for_max_height_width

    size = processor.size
    shortest, longest = _size_field(size, "shortest_edge"), _size_field(size, "longest_edge")
    if shortest and longest:
        return tuple(get_size_with_aspect_ratio((height, width), shortest, longest))
    if shortest:  # the helper only reads the shape: a zero-stride stand-in of that shape costs no memory
        shape_only = np.broadcast_to(np.zeros((), np.uint8), (1, height, width))
        return tuple(get_resize_output_image_size(shape_only, size=shortest, default_to_square=False,
                                                  input_data_format=ChannelDimension.FIRST))
    max_h, max_w = _size_field(size, "max_height"), _size_field(size, "max_width")
    if max_h and max_w:
        return tuple(get_image_size_for_max_height_width((height, width), max_h, max_w))
    if _size_field(size, "height") and _size_field(size, "width"):
        return _size_field(size, "height"), _size_field(size, "width")
    raise NotApplicableError(f"cell boxes: image processor size {size!r} is not a resize vlmeff knows")


def _crop_start(length: int, crop: int, ceil_pad: bool) -> int:
    """Start of a centre crop of `crop` px in an axis of `length` px; negative when the crop pads the image."""
    if crop <= length:
        return (length - crop) // 2
    return -((crop - length + 1) // 2 if ceil_pad else (crop - length) // 2)


def _square_pad_processors() -> tuple[type, ...]:
    """LLaVA's image processors, whose do_pad pads to a centred square BEFORE resizing (the torchvision one only
    where torchvision imports)."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    classes: tuple[type, ...] = (LlavaImageProcessorPil,)
    try:
        from transformers.models.llava.image_processing_llava import LlavaImageProcessor
    except ImportError:
        return classes
    return (*classes, LlavaImageProcessor)
