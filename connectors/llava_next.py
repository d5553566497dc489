"""LLaVA-NeXT connector (transformers' LlavaNextForConditionalGeneration: anyres views, unpadding, image_newline).

What the model does with one image (modeling_llava_next.py, `get_image_features` + `pack_image_features`): the
processor cuts it into 1 + r x c views of `vision_config.image_size` px (view 0, the base view: the whole image
resized; views 1..r c: the crops, row-major, of the image resized and zero-padded to the best pinpoint resolution).
Each view is one tower pass with its own [CLS]; the h x w patches of `vision_feature_layer` ([CLS] dropped) are
projected; the placeholder span is the base view's h w tokens, then the crops stitched into one (r h) x (c w) grid,
unpadded (rows or columns covering only padding are cut) and followed, row by row, by the learned `image_newline`
vector. The processor counts the same span from `image_sizes`.

How that maps onto vlmeff (docs/llava-next.md):
- Reduction units (one `ImageTokens` and one selection record each): with `budget="per_view"` (default) one unit per
  view, grid (1, h, w), the full view as the tower saw it; with `budget="per_image"` one unit per image, grid
  (views, h, w), its views stacked like the frames of a video, so a budget is shared by all views. `per_view` is what
  the papers that report LLaVA-NeXT numbers mean: FasterVLM keeps its k per view ("29 per view ... 29 * 5 = 145",
  Theia-4869/FasterVLM README, top-k per view in llava/model/llava_arch.py `encode_images`), VisionZip keeps
  dominant + contextual per view (dvlab-research/VisionZip visionzip/llava_arch.py: every view goes through the tower
  reduction), FlowCut's encoder keeps target/2 per view (TungChintao/FlowCut flowcut/main.py).
- Unpadding: strategies score and select on the full view; a kept cell that the model unpads away has no placeholder
  and is dropped at the splice (the FlowCut and FasterVLM reference code for NeXT select first, then unpad). A merged
  token whose representative cell is padding takes the placeholder of the first real cell of its group; a group of
  padding only is dropped. So a view touching the padding can send fewer than k tokens; stats count what is sent.
- Newlines: every image_newline token is kept (also a row whose tokens were all pruned keeps its newline, as the
  FasterVLM reference's unpad branch does: its index mask is all ones on the newline column), sits at its own
  position, and is laid out as TEXT: no budget counts it, in-LLM strategies never remove it, stats count it as text.
- Positions: kept tokens keep the sequence order of the unreduced span (crops interleave row by row); "preserve"
  gives each kept placeholder its original position id, "reindex" (default) contiguous ids.

The geometry (which cell lands at which offset of the span, where the newlines are) is read off the model's own
`pack_image_features` run on cell ids, so it is HF's layout by construction, and a keep-everything splice hands the
model its own packed features: the unwrapped logits are reproduced bit for bit.
Refused, with the reason: vision-stage strategies (each image is several tower passes whose kept cells must then
survive unpadding; `flowcut` runs its LLM stage here), position rules (`cca`: an image's tokens are not one grid run),
strategies that pair unit tokens with positions by concatenation (`saisa`, through `splices_in_unit_order`),
`vision_feature_select_strategy="full"`, tokens without a grid cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import LlavaNextForConditionalGeneration
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.image_utils import ChannelDimension
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from vlmeff.connector import ImageSlot, VisionProbe, assign_slots, find_runs, grid_boxes
from vlmeff.connectors.llava import LlavaConnector, LlavaProbe
from vlmeff.kernels import compact, gather_tokens
from vlmeff.layout import IMAGE, PAD, TEXT, TokenLayout
from vlmeff.registry import register_connector
from vlmeff.strategy import ImageTokens, NotApplicableError, SelectionRecord, TokenReducer

BUDGETS = ("per_view", "per_image")


@dataclass(frozen=True)
class ImageSpan:
    """One image's placeholder span in the unreduced prompt, laid out as `pack_image_features` packs it.

    cell_offsets: [views * h * w] offset inside the span of every view cell (view-major: cell = v h w + row w + col,
    view 0 = base), -1 for a crop cell the model unpads away; newline_offsets: [n] offsets of the image_newline tokens.
    """

    image: int  # index of the image in pixel_values / image_sizes
    sample: int
    start: int
    length: int
    cell_offsets: torch.Tensor
    newline_offsets: torch.Tensor
    crop_grid: tuple[int, int]  # (rows, cols) of high-resolution crops; (0, 0) for a base view alone


@dataclass
class NextRecord(SelectionRecord):
    """A selection record with the view geometry overlays need: `source_image` (index into the batch's images),
    `views` (the view indices the unit covers: one per view, all for per_image; grid axis t runs over them),
    `crop_grid` (rows, cols of the image's crops: view 1 + i cols + j is crop (i, j))."""

    source_image: int = -1
    views: tuple[int, ...] = ()
    crop_grid: tuple[int, int] = (0, 0)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "source_image": self.source_image, "views": list(self.views),
                "crop_grid": list(self.crop_grid)}


@dataclass
class ViewTokens(ImageTokens):
    """The tokens of one reduction unit, with where its cells sit in its image's span (strategies' `replace` and
    `keep` carry these fields along)."""

    span: ImageSpan | None = None
    first_cell: int = 0  # the unit's cell c is cell first_cell + c of its image

    def placed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order, offsets, cells) of the tokens that get a placeholder, in span order: positions into the current
        tokens, their offsets in the span, and the cell whose placeholder each takes (its representative, or for a
        merged token whose representative is padding, the first real cell of its group)."""
        index = self.index
        if bool((index < 0).any()):
            raise NotApplicableError("tokens without a grid cell cannot be placed in LLaVA-NeXT's stitched grid "
                                     "(its placeholders are grid cells and newlines); the strategy that made them "
                                     "cannot run on the llava-next connector")
        table = self.span.cell_offsets[self.first_cell: self.first_cell + self.record.num_tokens].to(index.device)
        offsets, cells = table[index], index
        if self.groups is not None and bool((offsets < 0).any()):
            sizes = torch.tensor([len(g) for g in self.groups], device=index.device)
            members = torch.tensor([c for g in self.groups for c in g], dtype=torch.long, device=index.device)
            owner = torch.repeat_interleave(torch.arange(index.numel(), device=index.device), sizes)
            past_end = self.span.length  # larger than every offset: "no real cell"
            member_offsets = table[members].masked_fill(table[members] < 0, past_end)
            first = torch.full_like(offsets, past_end).scatter_reduce(0, owner, member_offsets, "amin")
            moved = (offsets < 0) & (first < past_end)
            cell_at = torch.full((past_end + 1,), -1, dtype=torch.long, device=index.device)
            real = (table >= 0).nonzero().squeeze(1)
            cell_at[table[real]] = real
            offsets = torch.where(moved, first, offsets)
            cells = torch.where(moved, cell_at[first.clamp(max=past_end)], cells)
        order = (offsets >= 0).nonzero().squeeze(1)
        order = order[torch.argsort(offsets[order], stable=True)]
        return order, offsets[order], cells[order]

    def finish_record(self) -> SelectionRecord:
        """The record of what reaches the LLM: cells in span order, without those the model unpads away."""
        order, _, cells = self.placed()
        self.record.kept_indices = cells
        self.record.num_extra = 0
        self.record.merge_groups = None if self.groups is None else [self.groups[j] for j in order.tolist()]
        return self.record


@dataclass(frozen=True)
class _Arranged:
    """One image's reduced span: per kept position (in order) its offset in the original span, the unit it belongs
    to (-1 = newline), its cell (-1 = newline) and the row of the image's stacked unit tokens it takes (-1 = newline)."""

    span: ImageSpan
    offsets: torch.Tensor
    unit: torch.Tensor
    cell: torch.Tensor
    source: torch.Tensor


class NextProbe(VisionProbe):
    """Per reduction unit, the rows of the views it covers (a `LlavaProbe` over all tower views of the batch)."""

    def __init__(self, views: LlavaProbe, unit_views: list[list[int]], has_cls: bool):
        self.views = views
        self.unit_views = unit_views
        self.has_cls = has_cls

    def cls_attention(self, image: int, block: int | None = None) -> torch.Tensor:
        return torch.cat([self.views.cls_attention(v, block) for v in self.unit_views[image]], dim=-1)

    def cls_attention_one_head(self, image: int, block: int | None = None) -> torch.Tensor:
        return torch.cat([self.views.cls_attention_one_head(v, block) for v in self.unit_views[image]], dim=-1)

    def keys(self, image: int, block: int | None = None) -> torch.Tensor:
        """[1 + V, W] with [CLS]: the first view's [CLS] key, then the patch keys of every view of the unit."""
        keys = [self.views.keys(v, block) for v in self.unit_views[image]]
        if not self.has_cls:
            return torch.cat(keys)
        return torch.cat([keys[0][:1], *[k[1:] for k in keys]])


@register_connector
class LlavaNextConnector(LlavaConnector):
    """LLaVA-NeXT: per-view (default) or per-image reduction units, newlines always kept (module docstring)."""

    name = "llava-next"
    summary = ("LLaVA-NeXT (LlavaNextForConditionalGeneration): anyres views, unpadding, image_newline kept; "
               "budget=per_view (papers) or per_image")
    model_classes = (LlavaNextForConditionalGeneration,)
    splices_in_unit_order = False  # span order: crops interleave, cells over padding are dropped

    def __init__(self, model, processor=None, budget: str = "per_view"):
        super().__init__(model, processor)
        self.budget = budget
        if self.config.vision_feature_select_strategy != "default":
            raise NotApplicableError(
                f"vision_feature_select_strategy={self.config.vision_feature_select_strategy!r}: the llava-next "
                "connector supports 'default' ([CLS] dropped, an h x w grid per view), as every LLaVA-NeXT checkpoint")
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        self.view_grid = (side, side)

    @property
    def budget(self) -> str:
        """What a strategy's budget covers: "per_view" each view (the papers' reading), "per_image" the image."""
        return self._budget

    @budget.setter
    def budget(self, value: str) -> None:
        if value not in BUDGETS:
            raise ValueError(f"budget={value!r}: expected 'per_view' (keep/ratio per view, as FasterVLM, VisionZip and "
                             "FlowCut report LLaVA-NeXT) or 'per_image' (one budget shared by all views of an image)")
        self._budget = value

    @property
    def runs_vision_stage(self) -> bool:
        return False

    # --- geometry ---------------------------------------------------------------------------------------------
    def spans(self, inputs: dict[str, Any]) -> list[ImageSpan]:
        """Each image's span, read off `pack_image_features` run on cell ids (newlines marked -1)."""
        if inputs.get("image_sizes") is None:
            raise ValueError("LLaVA-NeXT inputs need image_sizes (returned by the processor with pixel_values)")
        input_ids, sizes = inputs["input_ids"], inputs["image_sizes"]
        config, device = self.config, input_ids.device
        cells = self.view_grid[0] * self.view_grid[1]
        views = [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                 for size in sizes]
        ids = [torch.arange(v * cells, dtype=torch.float64, device=device).view(v, cells, 1) for v in views]
        packed, lengths = self.model.model.pack_image_features(
            ids, sizes, "default", image_newline=torch.tensor([-1.0], dtype=torch.float64, device=device))
        runs = find_runs(input_ids == self.image_token_id)
        slots = assign_slots(runs, [(1, 1, int(n)) for n in lengths])  # one run per image, in HF's scatter order
        spans = []
        for image, (slot, seq, count) in enumerate(zip(slots, packed, views)):
            seq = seq[:, 0].round().long()  # [L]: cell id, or -1 for a newline
            table = torch.full((count * cells,), -1, dtype=torch.long, device=device)
            grid_positions = (seq >= 0).nonzero().squeeze(1)
            table[seq[grid_positions]] = grid_positions
            crops = (0, 0) if count == 1 else tuple(get_anyres_image_grid_shape(
                sizes[image], config.image_grid_pinpoints, config.vision_config.image_size))
            spans.append(ImageSpan(image, slot.sample, slot.start, slot.length, table,
                                   (seq < 0).nonzero().squeeze(1), crops))
        return spans

    def _units(self, spans: list[ImageSpan]) -> list[tuple[ImageSpan, int, tuple[int, int, int], list[int]]]:
        """(span, first cell, grid, views) of every reduction unit, in image order."""
        h, w = self.view_grid
        units = []
        for span in spans:
            count = span.cell_offsets.numel() // (h * w)
            if self.budget == "per_view":
                units += [(span, v * h * w, (1, h, w), [v]) for v in range(count)]
            else:
                units.append((span, 0, (count, h, w), list(range(count))))
        return units

    def slots(self, inputs: dict[str, Any]) -> list[ImageSlot]:
        """One slot per reduction unit; `length` counts its cells that have a placeholder (newlines excluded)."""
        return [self._slot(span, first, grid) for span, first, grid, _ in self._units(self.spans(inputs))]

    @staticmethod
    def _slot(span: ImageSpan, first: int, grid: tuple[int, int, int]) -> ImageSlot:
        cells = grid[0] * grid[1] * grid[2]
        placed = int((span.cell_offsets[first: first + cells] >= 0).sum())
        return ImageSlot(span.sample, span.start, placed, grid)

    def image_grids(self, inputs: dict[str, Any]) -> list[tuple[int, int, int]]:
        return [grid for _, _, grid, _ in self._units(self.spans(inputs))]

    def cell_boxes(self, image_size: tuple[int, int], record: SelectionRecord) -> torch.Tensor:
        """Boxes of one view's cells in the image's pixels, undoing the processor as it works: the base view is the
        image resized to a view (stretched), a crop view is a view-sized tile of the image resized with its aspect
        kept (`get_patch_output_size`) and centred in the best pinpoint resolution (`_get_padding_size`). Cells over
        that padding get boxes outside the image. A `per_image` record stacks views (t > 1): draw per view."""
        processor = getattr(self.processor, "image_processor", None)
        if processor is None or not hasattr(processor, "_get_padding_size"):
            raise NotApplicableError("cell boxes need the model's LLaVA-NeXT image processor: "
                                     "vlmeff.wrap(model, processor, ...)")
        views = getattr(record, "views", ())
        if len(views) != 1:
            raise NotApplicableError(f"record of image {record.image} covers views {list(views)} (budget='per_image'); "
                                     "cell boxes are per view: use budget='per_view' to draw a view")
        width, height = image_size
        px, patch = self.config.vision_config.image_size, self.config.vision_config.patch_size
        sides = {_size_value(processor.crop_size, "height"), _size_value(processor.crop_size, "width"),
                 _size_value(processor.size, "shortest_edge") or _size_value(processor.size, "height")}
        if sides != {px}:
            raise NotApplicableError(f"the image processor's view sizes {sorted(sides)} differ from the tower's "
                                     f"{px} px: cell boxes assume views of exactly {px} px")
        _, rows, cols = record.grid
        steps = torch.arange(max(rows, cols) + 1, dtype=torch.float64) * patch
        if views[0] == 0:  # base view: the whole image resized to px x px
            return grid_boxes(steps[: cols + 1] * (width / px), steps[: rows + 1] * (height / px))
        best_h, best_w = select_best_resolution((height, width), processor.image_grid_pinpoints)
        if tuple(record.crop_grid) != (best_h // px, best_w // px):
            raise ValueError(f"image_size={image_size}: its crop grid would be {(best_h // px, best_w // px)}, the "
                             f"record's is {tuple(record.crop_grid)}; pass the size of the image the record is of")
        shape_only = np.broadcast_to(np.zeros((), np.uint8), (1, height, width))  # the helper reads the shape only
        new_h, new_w = get_patch_output_size(shape_only, (best_h, best_w), ChannelDimension.FIRST)
        (top, _), (left, _) = processor._get_padding_size((new_h, new_w), (best_h, best_w))
        i, j = divmod(views[0] - 1, best_w // px)
        xs = (steps[: cols + 1] + j * px - left) * (width / new_w)
        ys = (steps[: rows + 1] + i * px - top) * (height / new_h)
        return grid_boxes(xs, ys)

    def encoder_tokens(self, slot: ImageSlot) -> int:
        """Tokens through the tower for the unit: each view is its own pass of h w patches (+ [CLS])."""
        t, h, w = slot.grid
        return t * (h * w + int(self.has_cls))

    # --- encoding ---------------------------------------------------------------------------------------------
    def _views(self, inputs: dict[str, Any], spans: list[ImageSpan]) -> tuple[torch.Tensor, LlavaProbe]:
        """All views of the batch through the tower in one call, as `get_image_features` runs it: [N, h w, D_vis]
        at the feature layer ([CLS] dropped) and a probe over the N views."""
        tower = self.model.model.vision_tower
        pixel_values = inputs["pixel_values"]
        h, w = self.view_grid
        if pixel_values.dim() == 5:  # [images, max views, C, H, W], padded with empty views
            counts = [span.cell_offsets.numel() // (h * w) for span in spans]
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)])
        out = tower(pixel_values.to(tower.dtype), output_hidden_states=True, return_dict=True)
        layers = self.config.vision_feature_layer
        pick = [layers] if isinstance(layers, int) else list(layers)
        features = torch.cat([out.hidden_states[i][:, 1:] for i in pick], dim=-1)
        return features, LlavaProbe(self, out.hidden_states)

    def encode(self, inputs: dict[str, Any]) -> tuple[list[torch.Tensor], VisionProbe]:
        """Per reduction unit: its views' tokens [V_unit, D_vis] (views in order) and a probe over the units."""
        units = self._units(self.spans(inputs))
        return self._encode_units(inputs, units)

    def _encode_units(self, inputs, units) -> tuple[list[torch.Tensor], NextProbe]:
        spans = list({id(span): span for span, *_ in units}.values())
        features, views_probe = self._views(inputs, spans)
        starts, first_view = {}, 0
        for span in spans:  # index of each image's first view among the tower's views
            starts[id(span)] = first_view
            first_view += span.cell_offsets.numel() // features.shape[1]
        unit_views = [[starts[id(span)] + v for v in views] for span, _, _, views in units]
        per_unit = [features[v[0]: v[-1] + 1].flatten(0, 1) for v in unit_views]
        return per_unit, NextProbe(views_probe, unit_views, self.has_cls)

    def encode_reduced(self, inputs: dict[str, Any], strategies: list[TokenReducer]):
        names = ", ".join(s.name for s in strategies)
        raise NotApplicableError(
            f"{names}: the llava-next connector does not prune inside its vision encoder (every image is several "
            "tower passes whose kept cells would then have to survive unpadding); use a pre-LLM or in-LLM strategy "
            "(flowcut runs its LLM stage, flowcut-llm, on LLaVA-NeXT)")

    def prepare_tokens(self, inputs: dict[str, Any], vision_strategies: list[TokenReducer] | None = None
                       ) -> tuple[list[ImageSlot], list[ImageTokens]]:
        if vision_strategies:
            self.encode_reduced(inputs, vision_strategies)
        units = self._units(self.spans(inputs))
        features, probe = self._encode_units(inputs, units)
        slots, images = [], []
        for i, ((span, first, grid, views), feats) in enumerate(zip(units, features)):
            slots.append(self._slot(span, first, grid))
            index = torch.arange(feats.shape[0], device=feats.device)
            record = NextRecord(sample=span.sample, image=i, grid=grid, num_tokens=feats.shape[0], kept_indices=index,
                                source_image=span.image, views=tuple(views), crop_grid=span.crop_grid)
            images.append(ViewTokens(features=feats, index=index, probe=probe, image=i, record=record, span=span,
                                     first_cell=first))
        return slots, images

    def project(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """All units' tokens through the projector in one call (the same matmul rows `get_image_features` runs)."""
        projector = self.model.model.multi_modal_projector
        out = projector(torch.cat(features)[None])[0]
        return list(out.split([f.shape[0] for f in features]))

    # --- splice -----------------------------------------------------------------------------------------------
    def arrange(self, images: list[ImageTokens]) -> list[_Arranged]:
        """Per image (in order), its kept grid tokens and all its newlines in span order."""
        by_image: dict[int, list[int]] = {}
        for i, img in enumerate(images):
            if not isinstance(img, ViewTokens):
                raise TypeError(f"image {i}: the llava-next connector needs the tokens it prepared (ViewTokens)")
            by_image.setdefault(img.span.image, []).append(i)
        out = []
        for _, members in sorted(by_image.items()):
            span = images[members[0]].span
            offsets, units, cells, sources, stacked = [], [], [], [], 0
            for i in members:
                order, off, cell = images[i].placed()
                offsets.append(off)
                cells.append(cell)
                units.append(torch.full_like(off, i))
                sources.append(order + stacked)
                stacked += images[i].index.numel()
            newline = span.newline_offsets.to(offsets[0].device)
            offsets.append(newline)
            for part in (units, cells, sources):
                part.append(torch.full_like(newline, -1))
            offsets = torch.cat(offsets)
            order = torch.argsort(offsets)
            offsets = offsets[order]
            if bool((offsets[1:] == offsets[:-1]).any()):
                raise NotApplicableError(f"image {span.image}: two kept tokens claim the same placeholder (merge groups "
                                         "overlap); the strategies' merge groups must be disjoint on llava-next")
            out.append(_Arranged(span, offsets, torch.cat(units)[order], torch.cat(cells)[order],
                                 torch.cat(sources)[order]))
        return out

    def assemble(self, inputs: dict[str, Any], slots: list[ImageSlot], images: list[ImageTokens],
                 positions: str) -> dict[str, Any]:
        """Model kwargs: per image its kept tokens and newlines in span order as `mm_encoder_outputs`, the prompt
        without the placeholders of removed tokens (left-padded), position ids for "preserve"."""
        if positions not in self.supported_positions:
            raise NotApplicableError(f"positions={positions!r} is not supported by the {self.name} connector; "
                                     f"supported: {', '.join(self.supported_positions)}")
        input_ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask
        projected = self.project_images(images)
        arranged = self.arrange(projected)
        newline = self.model.model.image_newline
        embeds = []
        for part in arranged:
            rows = [img.features for img in projected if img.span.image == part.span.image]  # arrange's order
            stacked = torch.cat([*rows, newline[None].to(rows[0])])  # the newline is the last row
            embeds.append(stacked[part.source.masked_fill(part.source < 0, stacked.shape[0] - 1)])
        mm = {"image": BaseModelOutputWithPooling(pooler_output=tuple(embeds))}
        if all(part.offsets.numel() == part.span.length for part in arranged):  # nothing removed: the model's inputs
            return {"input_ids": input_ids, "attention_mask": mask, "mm_encoder_outputs": mm}
        keep = mask.bool().clone()
        for part in arranged:
            span = part.span
            keep[span.sample, span.start: span.start + span.length] = False
            keep[span.sample, span.start + part.offsets.to(keep.device)] = True
        idx = compact(keep, pad_side="left")  # [B, S'] kept positions, -1 for pads
        out = {
            "input_ids": gather_tokens(input_ids, idx.index, fill_value=self.pad_token_id),
            "attention_mask": idx.attention_mask.to(mask.dtype),
            "mm_encoder_outputs": mm,
        }
        if positions == "preserve":  # every kept placeholder (grid token or newline) keeps its original id
            out["position_ids"] = gather_tokens(self.original_positions(inputs), idx.index, fill_value=0)
        return out

    def layout(self, model_kwargs: dict[str, Any], images: list[ImageTokens]) -> TokenLayout:
        """Grid tokens are IMAGE (their unit and cell), newlines TEXT: never a budget's or an in-LLM pruner's."""
        input_ids = model_kwargs["input_ids"]
        mask = model_kwargs.get("attention_mask")
        valid = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        kind = torch.full_like(input_ids, TEXT).masked_fill(~valid, PAD)
        image = torch.full_like(input_ids, -1)
        cell = torch.full_like(input_ids, -1)
        placeholders = (input_ids == self.image_token_id) & valid
        arranged = self.arrange(images)
        for row in range(input_ids.shape[0]):
            mine = [part for part in arranged if part.span.sample == row]
            positions = placeholders[row].nonzero().squeeze(1)
            expected = sum(p.unit.numel() for p in mine)
            if expected != positions.numel():
                raise ValueError(f"row {row}: {positions.numel()} image placeholders for {expected} tokens")
            if not mine:
                continue
            units = torch.cat([p.unit for p in mine]).to(input_ids.device)
            cells = torch.cat([p.cell for p in mine]).to(input_ids.device)
            grid = units >= 0
            kind[row, positions[grid]] = IMAGE
            image[row, positions[grid]] = units[grid]
            cell[row, positions[grid]] = cells[grid]
        source = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids).masked_fill(~valid, -1)
        positions = model_kwargs.get("position_ids")
        layout = TokenLayout(kind, image, cell, source, [img.record.grid for img in images], positions)
        return layout.mark_answer(input_ids, self.answer_opener_ids())

    def model_positions(self, layout: TokenLayout) -> torch.Tensor:
        raise NotApplicableError(
            "position rules (cca) need each image's visual tokens as one run over its grid; on LLaVA-NeXT an image is "
            "a base view followed by crops stitched row by row with image_newline tokens between the rows, so the "
            "llava-next connector refuses strategies that rewrite position ids")


def _size_value(size, key: str):
    """A field of an image processor's size dict (a SizeDict in transformers 5, a plain dict before)."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)
