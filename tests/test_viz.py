"""vlmeff.viz overlays against hand computations, and connectors' cell boxes against what the processor does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vlmeff
from vlmeff import viz
from vlmeff.strategy import SelectionRecord
from vlmeff.wrapper import find_connector

# a 60 x 40 image split into a 2 x 3 grid of 20 x 20 cells (uniform boxes: no connector); sides below 28 px would be
# upscaled by vlmeff.images.load_image, as the wrapper's chat does
S, ROWS, COLS = 20, 2, 3
W, H = S * COLS, S * ROWS


def picture(seed: int = 0, size=(W, H)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))  # never pure white


def record(kept, groups=None, llm_kept=None, grid=(1, ROWS, COLS)) -> SelectionRecord:
    return SelectionRecord(sample=0, image=0, grid=grid, num_tokens=grid[1] * grid[2],
                           kept_indices=torch.tensor(kept), merge_groups=groups,
                           llm_kept={k: torch.tensor(v) for k, v in (llm_kept or {}).items()})


def cell(pixels: np.ndarray, index: int) -> np.ndarray:
    """The S x S block of cell `index` (raster order) of an [H, W, 3] array."""
    r, c = divmod(index, COLS)
    return pixels[S * r: S * r + S, S * c: S * c + S]


def faded(block: np.ndarray, fade: float) -> np.ndarray:
    return np.rint(block.astype(np.float64) * (1 - fade) + 255 * fade).astype(np.uint8)


def test_kept_cells_keep_pixels_and_pruned_cells_fade():
    image = picture()
    src = np.asarray(image)
    out = np.asarray(viz.overlay(image, record([0, 4]), fade=0.75))
    assert out.shape == src.shape
    for index in range(ROWS * COLS):
        expected = cell(src, index) if index in (0, 4) else faded(cell(src, index), 0.75)
        np.testing.assert_array_equal(cell(out, index), expected, err_msg=f"cell {index}")


def test_merged_group_is_outlined_along_its_border():
    image = picture(1)
    src = np.asarray(image)
    # token 0 merges cells 0, 1, 3 (an L shape), token 1 is cell 5 alone; cells 2 and 4 were pruned
    out = np.asarray(viz.overlay(image, record([0, 5], groups=[[0, 1, 3], [5]]), fade=0.5, outline=1))
    colour = viz.PALETTE[0].astype(np.uint8)
    # the L shape's border, one pixel wide: top, left, the step and the two right / bottom ends
    border = np.zeros((H, W), dtype=bool)
    border[0, 0:40] = True                           # top of cells 0, 1
    border[0:40, 0] = True                           # left of cells 0, 3
    border[19, 20:40] = True                         # bottom of cell 1
    border[0:20, 39] = True                          # right of cell 1
    border[39, 0:20] = True                          # bottom of cell 3
    border[20:40, 19] = True                         # right of cell 3
    np.testing.assert_array_equal(out[border], np.broadcast_to(colour, (int(border.sum()), 3)))
    in_group = np.zeros((H, W), dtype=bool)
    in_group[0:20, 0:40] = True
    in_group[20:40, 0:20] = True
    np.testing.assert_array_equal(out[in_group & ~border], src[in_group & ~border])  # merged content not faded
    np.testing.assert_array_equal(cell(out, 5), cell(src, 5))  # a group of one is kept, not outlined
    for index in (2, 4):
        np.testing.assert_array_equal(cell(out, index), faded(cell(src, index), 0.5))


def test_llm_kept_at_a_layer():
    image = picture(2)
    src = np.asarray(image)
    rec = record([0, 1, 2, 3, 4, 5], llm_kept={2: [1, 4], 4: [4]})
    for layer in (None, 0, 1):  # before the first removal every token is present
        np.testing.assert_array_equal(np.asarray(viz.overlay(image, rec, layer)), src)
    for layer, present in ((2, {1, 4}), (3, {1, 4}), (4, {4}), (30, {4})):
        out = np.asarray(viz.overlay(image, rec, layer, fade=0.75))
        for index in range(ROWS * COLS):
            expected = cell(src, index) if index in present else faded(cell(src, index), 0.75)
            np.testing.assert_array_equal(cell(out, index), expected, err_msg=f"layer {layer} cell {index}")


def test_llm_removal_of_a_merged_token_fades_its_whole_group():
    image = picture(3)
    src = np.asarray(image)
    rec = record([0, 5], groups=[[0, 1, 3], [2, 4, 5]], llm_kept={1: [5]})
    out = np.asarray(viz.overlay(image, rec, 1, fade=0.75, outline=0))
    for index in (0, 1, 3):
        np.testing.assert_array_equal(cell(out, index), faded(cell(src, index), 0.75))
    for index in (2, 4, 5):
        np.testing.assert_array_equal(cell(out, index), cell(src, index))
    visible, group = viz.cell_states(rec, 1)
    assert visible.tolist() == [False, False, True, False, True, True]
    assert group.tolist() == [-1, -1, 1, -1, 1, 1]


def test_pixels_outside_every_cell_are_darkened():
    image = picture(4)
    src = np.asarray(image).astype(np.float64)
    boxes = torch.tensor([[10.0, 0.0, 30.0, 40.0], [30.0, 0.0, 50.0, 40.0]])  # a 1 x 2 grid over x in [10, 50)
    out = np.asarray(viz.overlay(image, record([1], grid=(1, 1, 2)), boxes=boxes, unseen=0.6, fade=0.75))
    np.testing.assert_array_equal(out[:, :10], np.rint(src[:, :10] * 0.4).astype(np.uint8))
    np.testing.assert_array_equal(out[:, 50:], np.rint(src[:, 50:] * 0.4).astype(np.uint8))
    np.testing.assert_array_equal(out[:, 10:30], faded(src[:, 10:30], 0.75))
    np.testing.assert_array_equal(out[:, 30:50], src[:, 30:50].astype(np.uint8))


def test_bad_arguments_name_themselves():
    rec = record([0])
    with pytest.raises(ValueError, match="which=3"):
        viz.overlay(picture(), [rec], which=3)
    with pytest.raises(ValueError, match="records=\\[\\]"):
        viz.overlay(picture(), [])
    with pytest.raises(ValueError, match="fade=1.5"):
        viz.overlay(picture(), rec, fade=1.5)
    with pytest.raises(ValueError, match="layer=-1"):
        viz.overlay(picture(), rec, -1)
    with pytest.raises(ValueError, match="rectilinear"):
        viz.overlay(picture(), rec, boxes=torch.rand(6, 4))


# --- connectors' cell boxes: does the box of a cell hold what the processor puts into that cell's patch? ---------
def darkest_cells(processor, connector, size, cells, grid_of, cell_means):
    """For each cell: paint its box black on a white image of `size`, run the processor, return the grid cell whose
    pixels came out darkest."""
    found = []
    for index in cells:
        image = np.full((size[1], size[0], 3), 255, dtype=np.uint8)
        probe = processor.image_processor(images=Image.fromarray(image), return_tensors="pt")
        grid = grid_of(probe)
        x0, y0, x1, y1 = connector.cell_boxes(size, record([0], grid=grid))[index].tolist()
        xs, ys = np.arange(size[0]) + 0.5, np.arange(size[1]) + 0.5  # pixel centres inside the box
        image[np.ix_((ys >= y0) & (ys < y1), (xs >= x0) & (xs < x1))] = 0
        found.append(int(cell_means(processor, Image.fromarray(image), grid).argmin()))
    return found


def llava_cell_means(processor, image, grid):
    pixels = processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]  # [3, H, W]
    _, rows, cols = grid
    return pixels.reshape(3, rows, pixels.shape[1] // rows, cols, pixels.shape[2] // cols).mean(dim=(0, 2, 4)).flatten()


def qwen_cell_means(processor, image, grid):
    # rows of pixel_values: merged cells in raster order, merge_size ** 2 patches each
    pixels = processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
    return pixels.reshape(grid[1] * grid[2], -1).mean(1)


@pytest.mark.parametrize("size", [(100, 64), (50, 90), (56, 56)])
def test_llava_cell_boxes_follow_resize_and_centre_crop(loaded, size):
    model, processor = loaded("llava-clip")
    connector = find_connector(model, processor)
    patch = model.config.vision_config.patch_size

    def grid_of(probe):
        return (1, probe["pixel_values"].shape[-2] // patch, probe["pixel_values"].shape[-1] // patch)

    cells = [0, 7, 27, 36, 56, 63]
    assert darkest_cells(processor, connector, size, cells, grid_of, llava_cell_means) == cells
    if size[0] > size[1]:  # wider than tall: the crop cuts the sides, so the grid starts right of x = 0
        assert connector.cell_boxes(size, record([0], grid=(1, 8, 8)))[0, 0] > 0


def test_llava_cell_boxes_follow_pad_to_square(loaded):
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    model, processor = loaded("llava-clip")
    processor = type(processor)(image_processor=LlavaImageProcessorPil(
        do_pad=True, size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, image_mean=[1.0] * 3),
        tokenizer=processor.tokenizer, patch_size=7, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=processor.chat_template)
    connector = find_connector(model, processor)
    # 100 x 40 is padded (white: mean 1.0) to 100 x 100, image rows at y in [30, 70): cell rows 2 to 5 show it
    cells = [16, 26, 31, 37, 40, 47]
    assert darkest_cells(processor, connector, (100, 40), cells, lambda probe: (1, 8, 8), llava_cell_means) == cells
    boxes = connector.cell_boxes((100, 40), record([0], grid=(1, 8, 8)))
    assert boxes[0, 1] < 0 and boxes[-1, 3] > 40  # the first / last rows lie in the padding
    assert torch.allclose(boxes[0], torch.tensor([0.0, -30.0, 12.5, -17.5], dtype=torch.float64))


@pytest.mark.parametrize("kind", ["qwen2-vl", "qwen2.5-vl"])
def test_qwen_cell_boxes_follow_smart_resize(loaded, kind):
    model, processor = loaded(kind)
    connector = find_connector(model, processor)
    merge = model.config.vision_config.spatial_merge_size

    def grid_of(probe):
        t, h, w = probe["image_grid_thw"][0].tolist()
        return (t, h // merge, w // merge)

    size = (230, 120)
    grid = grid_of(processor.image_processor(images=picture(0, size), return_tensors="pt"))
    cells = [0, grid[2] - 1, grid[1] * grid[2] // 2, grid[1] * grid[2] - 1]
    assert darkest_cells(processor, connector, size, cells, grid_of, qwen_cell_means) == cells


def test_overlay_of_a_real_run_fades_exactly_the_pruned_cells(loaded):
    model, processor = loaded("llava-clip")
    image = picture(5, (90, 70))
    with vlmeff.wrap(model, processor, "fastervlm:keep=20") as vm:
        vm.chat(image, "What is in the image?", max_new_tokens=2)
        out = np.asarray(viz.overlay(image, vm.last_record, connector=vm, fade=1.0, unseen=1.0)).astype(int)
        boxes = vm.connector.cell_boxes(image.size, vm.last_record[0])
    centres = ((boxes[:, :2] + boxes[:, 2:]) / 2).long()  # pixel at the centre of every cell's box
    white = (out[centres[:, 1], centres[:, 0]] == 255).all(-1)
    assert sorted(np.flatnonzero(~white).tolist()) == sorted(vm.last_record[0].kept_indices.tolist())
    assert (out[:, :5] == 0).all()  # the 90 x 70 image was cropped at the sides: pixels there are unseen (black)
