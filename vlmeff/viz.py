"""Overlays of what a strategy kept, drawn on the image the model was given.

`overlay(image, vm.last_record, connector=vm)` returns a PIL image of the same size as the (normalised) input:

- cells whose visual token reaches the LLM keep their pixels;
- pruned cells are faded towards white (`fade`);
- cells folded into a merged token keep their pixels (their content reached the LLM) and every merge group of two
  or more cells is outlined inside its border in its own colour;
- pixels no token covers (cut away by the processor's centre crop) are darkened (`unseen`);
- with `layer`, the cells whose token is still in the sequence at that LLM decoder layer (in-LLM methods such as
  FastV / ATP record them in `SelectionRecord.llm_kept`); tokens removed before it are faded with their groups.

The cell boxes come from the connector (`Connector.cell_boxes`), which undoes the processor's resize / crop / pad, so
the drawing matches what each token saw. Without a connector the grid is spread uniformly over the whole image,
which is right for processors that resize without cropping (Qwen2-VL) and wrong after a crop (LLaVA-1.5).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from vlmeff.connector import grid_boxes
from vlmeff.images import load_image
from vlmeff.strategy import SelectionRecord

# distinct, saturated colours for merge-group outlines (group j gets PALETTE[j % len])
PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128),
], dtype=np.float64)
FADE_TO = 255.0  # pruned cells blend towards white
UNSEEN_TO = 0.0  # pixels outside every cell blend towards black


def pick_record(records: SelectionRecord | Sequence[SelectionRecord], which: int = 0) -> SelectionRecord:
    """The record to draw: `records` itself, or `records[which]` of a list such as `vm.last_record`."""
    if isinstance(records, SelectionRecord):
        return records
    records = list(records)
    if not records:
        raise ValueError("records=[]: no selection record to draw; run the wrapper on an image first")
    if not -len(records) <= which < len(records):
        raise ValueError(f"which={which}: there are {len(records)} records (images), so 0..{len(records) - 1}")
    return records[which]


def llm_layers(record: SelectionRecord) -> list[int]:
    """Decoder layers from which fewer visual tokens run (the keys of `record.llm_kept`), ascending."""
    return sorted(record.llm_kept)


def present_tokens(record: SelectionRecord, layer: int | None = None) -> torch.Tensor:
    """[n] bool over the tokens of `record.kept_indices`: still in the sequence at decoder layer `layer` (None: as the
    tokens enter the LLM)."""
    reps = record.kept_indices.detach().cpu().long()
    if layer is None:
        return torch.ones_like(reps, dtype=torch.bool)
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
        raise ValueError(f"layer={layer!r}: expected a decoder layer index >= 0, or None for the LLM's input")
    earlier = [k for k in record.llm_kept if k <= layer]
    if not earlier:
        return torch.ones_like(reps, dtype=torch.bool)
    still = record.llm_kept[max(earlier)].detach().cpu().long()
    return torch.isin(reps, still)


def cell_states(record: SelectionRecord, layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(visible [V] bool, group [V] long) over the h * w grid cells: whether the cell's content is in the LLM's
    sequence at `layer` (kept, or folded into a kept merged token), and the index (into kept_indices) of the merged
    token of two or more cells that holds it (-1: none)."""
    t, h, w = record.grid
    if t != 1:
        raise ValueError(f"record of image {record.image} has grid {record.grid}: overlays draw one frame (t = 1)")
    cells = h * w
    reps = record.kept_indices.detach().cpu().long()
    present = present_tokens(record, layer)
    visible = torch.zeros(cells, dtype=torch.bool)
    group = torch.full((cells,), -1, dtype=torch.long)
    if record.merge_groups is None:
        members, owner = reps, torch.arange(reps.numel())
        sizes = torch.ones_like(reps)
    else:
        if len(record.merge_groups) != reps.numel():
            raise ValueError(f"record of image {record.image}: {len(record.merge_groups)} merge groups for "
                             f"{reps.numel()} kept tokens")
        sizes = torch.tensor([len(g) for g in record.merge_groups], dtype=torch.long)
        members = torch.tensor(list(itertools.chain.from_iterable(record.merge_groups)), dtype=torch.long)
        owner = torch.repeat_interleave(torch.arange(reps.numel()), sizes)
    if members.numel() and (members.min() < 0 or members.max() >= cells):
        raise ValueError(f"record of image {record.image}: cell indices outside its {h}x{w} grid")
    alive = present[owner]
    visible[members[alive]] = True
    merged = alive & (sizes[owner] > 1)
    group[members[merged]] = owner[merged]
    return visible, group


def _edges(boxes: torch.Tensor, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Column edges [cols + 1] and row edges [rows + 1] of a rectilinear grid of boxes [rows * cols, 4]."""
    boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(rows, cols, 4)
    xs = torch.cat([boxes[0, :, 0], boxes[0, -1:, 2]])
    ys = torch.cat([boxes[:, 0, 1], boxes[-1:, 0, 3]])
    if not torch.allclose(grid_boxes(xs, ys), boxes.reshape(-1, 4)):
        raise ValueError("boxes: expected the cells of a rectilinear grid in raster order (Connector.cell_boxes)")
    return xs.numpy(), ys.numpy()


def _cell_map(xs: np.ndarray, ys: np.ndarray, width: int, height: int) -> np.ndarray:
    """[H, W] cell index of every pixel (by its centre), -1 where no cell covers it."""
    col = np.searchsorted(xs, np.arange(width) + 0.5, side="right") - 1
    row = np.searchsorted(ys, np.arange(height) + 0.5, side="right") - 1
    col_ok = (col >= 0) & (col < len(xs) - 1)
    row_ok = (row >= 0) & (row < len(ys) - 1)
    index = row[:, None] * (len(xs) - 1) + col[None, :]
    return np.where(row_ok[:, None] & col_ok[None, :], index, -1)


def _border_band(labels: np.ndarray, width: int) -> np.ndarray:
    """[H, W] bool: pixels of a labelled region (label >= 0) within `width` px of a pixel with another label or of
    the image border."""
    padded = np.pad(labels, width, constant_values=-2)
    height, wide = labels.shape
    band = np.zeros(labels.shape, dtype=bool)
    for d in range(1, width + 1):
        for dy, dx in ((d, 0), (-d, 0), (0, d), (0, -d)):
            neighbour = padded[width + dy: width + dy + height, width + dx: width + dx + wide]
            band |= neighbour != labels
    return band & (labels >= 0)


def overlay(image: str | os.PathLike | Image.Image | np.ndarray,
            records: SelectionRecord | Sequence[SelectionRecord], layer: int | None = None, *,
            connector=None, boxes: torch.Tensor | None = None, which: int = 0, fade: float = 0.75,
            unseen: float = 0.6, outline: int = 2, scale: float = 1.0) -> Image.Image:
    """Draw which visual tokens of one image reached the LLM (at decoder layer `layer`; None: at its input).

    image:     the image the model was given (path, PIL image or array; normalised by `vlmeff.images.load_image`
               as `VLMWrapper.chat` does, so pass the original, not the processor's tensor).
    records:   a `SelectionRecord` or a list (`vm.last_record`), of which `which` is drawn.
    connector: a Connector or a wrapper (its `.connector`): maps grid cells to image boxes (`cell_boxes`);
               `boxes` [h * w, 4] gives them directly; neither: a uniform grid over the whole image.
    fade:      weight of white in pruned cells (0: unchanged, 1: white); `unseen`: weight of black outside every
               cell; `outline`: width in px of merge-group outlines (0: none); `scale`: resize the image (bicubic)
               before drawing, so thin outlines stay sharp on small images.
    """
    record = pick_record(records, which)
    for name, value in (("fade", fade), ("unseen", unseen)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value!r}: expected a blend weight in [0, 1]")
    if isinstance(outline, bool) or not isinstance(outline, int) or outline < 0:
        raise ValueError(f"outline={outline!r}: expected a width in pixels >= 0")
    if not scale > 0:
        raise ValueError(f"scale={scale!r}: expected a factor > 0")
    picture = load_image(image)
    _, rows, cols = record.grid
    if boxes is None:
        if connector is not None:
            boxes = getattr(connector, "connector", connector).cell_boxes(picture.size, record)
        else:
            boxes = grid_boxes(torch.linspace(0, picture.width, cols + 1, dtype=torch.float64),
                               torch.linspace(0, picture.height, rows + 1, dtype=torch.float64))
    xs, ys = _edges(boxes, rows, cols)
    if scale != 1.0:
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        xs, ys = xs * size[0] / picture.width, ys * size[1] / picture.height
        picture = picture.resize(size, Image.Resampling.BICUBIC)
    visible, group = cell_states(record, layer)
    cell = _cell_map(xs, ys, picture.width, picture.height)  # [H, W]
    covered = cell >= 0
    safe = np.where(covered, cell, 0)
    pixels = np.asarray(picture, dtype=np.float64)
    out = pixels.copy()
    faded = covered & ~visible.numpy()[safe]
    out[faded] = pixels[faded] * (1 - fade) + FADE_TO * fade
    out[~covered] = pixels[~covered] * (1 - unseen) + UNSEEN_TO * unseen
    if outline:
        labels = np.where(covered, group.numpy()[safe], -1)
        band = _border_band(labels, outline)
        out[band] = PALETTE[labels[band] % len(PALETTE)]
    return Image.fromarray(np.rint(out).clip(0, 255).astype(np.uint8))
