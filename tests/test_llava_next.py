"""LLaVA-NeXT connector on a tiny LlavaNextForConditionalGeneration saved and reloaded through `vlmeff.load`.

The span geometry (which view cell lands where, where the newlines are) is written out below from the processor's
unpadding rule with plain loops, independently of the connector (which reads it off `pack_image_features`); kept
cells are recomputed from an eager tower's attentions, the documented random rule and plain window means.
"""

from __future__ import annotations

import types

import pytest
import torch
from test_baselines import reference_pool, reference_random, reference_topk
from test_llm_stage import deepen
from transformers.image_processing_utils import select_best_resolution

import vlmeff
from conftest import assert_batch_equals_one_by_one, greedy, llm_input_lengths, make_image, make_inputs
from vlmeff.connectors.llava_next import LlavaNextConnector
from vlmeff.pruners.vision.flowcut import FlowCut
from vlmeff.strategy import NotApplicableError
from vlmeff.testing import save_tiny_model

PROMPTS = ["What is in the image?", "Is there a dog in the image? Answer yes or no.", "Describe the picture."]
# (width, height): 2x2 crops with padded rows, 3x1 crops without padding, 1x3 crops with padded columns, square 2x2
SIZES = [(60, 50), (30, 90), (100, 40), (50, 50)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    return str(save_tiny_model("llava-next", tmp_path_factory.mktemp("tiny-next") / "llava-next"))


@pytest.fixture(scope="module")
def next_model(saved):
    return vlmeff.load(saved, dtype="float32")


@pytest.fixture(scope="module")
def eager_tower(saved):
    model, _ = vlmeff.load(saved, dtype="float32", attn_implementation="eager")
    return model.model.vision_tower


def batch_inputs(processor, images_per_prompt, prompts=PROMPTS):
    images = [[make_image(seed, SIZES[size]) for seed, size in prompt] for prompt in images_per_prompt]
    return make_inputs(processor, prompts[: len(images)], images), images


# sample 0: two images (2x2 padded, 1x3 padded); sample 1: one image (3x1): left padding and ragged spans
TWO_PROMPTS = [[(1, 0), (2, 2)], [(3, 1)]]


# --- independent geometry ---------------------------------------------------------------------------------------
def reference_span(image_hw, config):
    """{(view, cell): offset}, newline offsets, span length and view count of one image: base view first, then the
    crops stitched row by row, rows / columns of padding cut (the processor's `_get_unpadded_features` rule), a
    newline after every row."""
    height, width = image_hw
    px = config.vision_config.image_size
    side = px // config.vision_config.patch_size
    best_h, best_w = select_best_resolution((height, width), config.image_grid_pinpoints)
    rows, cols = best_h // px, best_w // px
    cur_h, cur_w = rows * side, cols * side
    keep_r, keep_c = range(cur_h), range(cur_w)
    if width / height > cur_w / cur_h:
        pad = (cur_h - int(round(height * (cur_w / width), 7))) // 2
        keep_r = range(pad, cur_h - pad)
    else:
        pad = (cur_w - int(round(width * (cur_h / height), 7))) // 2
        keep_c = range(pad, cur_w - pad)
    offsets = {(0, c): c for c in range(side * side)}
    newlines, position = [], side * side
    for r in keep_r:
        for c in keep_c:
            offsets[(1 + (r // side) * cols + c // side, (r % side) * side + c % side)] = position
            position += 1
        newlines.append(position)
        position += 1
    return offsets, newlines, position, 1 + rows * cols


def spans_of(model, inputs):
    """Per image (in order): (sample, start, geometry) from input_ids runs and `reference_span`."""
    ids, image_id = inputs["input_ids"], model.config.image_token_id
    out, image = [], 0
    for row in range(ids.shape[0]):
        positions = (ids[row] == image_id).nonzero().squeeze(1).tolist()
        while positions:
            geometry = reference_span(inputs["image_sizes"][image].tolist(), model.config)
            out.append((row, positions[0], geometry))
            positions = positions[geometry[2]:]
            image += 1
    return out


def place(cells, groups, offsets, view):
    """Where each kept token of one view lands: its cell's placeholder, else (a merged token over padding) the first
    real cell of its group, else nowhere. Returns [(offset, cell, j)] in span order, j = the token's position."""
    placed = []
    for j, cell in enumerate(cells):
        real = [(offsets[(view, c)], c) for c in (groups[j] if groups else [cell]) if (view, c) in offsets]
        if (view, cell) in offsets:
            placed.append((offsets[(view, cell)], cell, j))
        elif groups and real:
            placed.append((*min(real), j))
    return sorted(placed)


def tower_views(model, inputs):
    """[N, C, H, W]: every image's views in order (pixel_values is padded with empty views)."""
    counts = [reference_span(s.tolist(), model.config)[3] for s in inputs["image_sizes"]]
    return torch.cat([pv[:n] for pv, n in zip(inputs["pixel_values"], counts)]), counts


def packed_features(model, inputs):
    """The model's own per-image span features [L, D] (projected, unpadded, newlines)."""
    with torch.no_grad():
        return model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output


# --- tests ------------------------------------------------------------------------------------------------------
def test_geometry_equals_processor_and_reference(next_model):
    model, processor = next_model
    inputs, _ = batch_inputs(processor, [[(0, 0), (1, 1)], [(2, 2), (3, 3)]])
    connector = LlavaNextConnector(model, processor)
    spans = connector.spans(inputs)
    assert len(spans) == 4
    for span, (sample, start, (offsets, newlines, length, views)) in zip(spans, spans_of(model, inputs)):
        assert (span.sample, span.start, span.length) == (sample, start, length)
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        expected = [offsets.get((v, c), -1) for v in range(views) for c in range(side * side)]
        assert span.cell_offsets.tolist() == expected
        assert span.newline_offsets.tolist() == newlines
    assert [s.crop_grid for s in spans] == [(2, 2), (3, 1), (1, 3), (2, 2)]


@pytest.mark.parametrize("spec,budget", [("vanilla", "per_view"), ("fastervlm:keep=100000", "per_view"),
                                         ("pool:keep=100000", "per_image"), ("visionzip:keep=100000", "per_image")])
def test_keep_everything_is_exactly_vanilla(next_model, spec, budget):
    """Two images of different sizes in one prompt, a batch of two with left padding."""
    model, processor = next_model
    inputs, _ = batch_inputs(processor, TWO_PROMPTS)
    assert inputs["attention_mask"].min() == 0  # the shorter row is padded
    with torch.no_grad():
        reference = model(**inputs).logits
    tokens = greedy(model.generate, inputs, n=5)
    with vlmeff.wrap(model, processor, spec) as vm:
        vm.connector.budget = budget
        assert torch.equal(vm(**inputs).logits, reference)
        assert torch.equal(greedy(vm.generate, inputs, n=5), tokens)
        num_newlines = sum(len(g[1]) for _, _, g in spans_of(model, inputs))
        placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
        assert vm.stats.visual_tokens_in == vm.stats.visual_tokens_kept == placeholders - num_newlines


def check_splice(model, inputs, kw, records, expected):
    """expected[u]: [(offset, cell)] of unit u's kept tokens. The spliced embeds of each image are its kept tokens
    and all its newlines in span order; the prompt keeps exactly those placeholders (plus all text)."""
    spans = spans_of(model, inputs)
    unit_of = {}
    for u, record in enumerate(records):
        assert record.kept_indices.tolist() == [cell for _, cell in expected[u]], f"unit {u}"
        for offset, _ in expected[u]:
            unit_of[(record.source_image, offset)] = u
    newline = model.model.image_newline
    embeds = kw["mm_encoder_outputs"]["image"].pooler_output
    kept_per_row = [0] * inputs["input_ids"].shape[0]
    for m, (sample, _, (_, newlines, _, _)) in enumerate(spans):
        kept = sorted([o for (image, o) in unit_of if image == m] + newlines)
        assert embeds[m].shape[0] == len(kept)
        for row, offset in zip(embeds[m], kept):
            if offset in newlines:
                assert torch.equal(row, newline)
        kept_per_row[sample] += len(kept)
    text = ((inputs["input_ids"] != model.config.image_token_id) & inputs["attention_mask"].bool()).sum(1)
    assert kw["attention_mask"].sum(1).tolist() == (text + torch.tensor(kept_per_row)).tolist()
    return embeds


@pytest.mark.parametrize("budget", ["per_view", "per_image"])
def test_fastervlm_keeps_the_top_cls_attention_cells(next_model, eager_tower, budget):
    model, processor = next_model
    inputs, _ = batch_inputs(processor, TWO_PROMPTS)
    k = 7 if budget == "per_view" else 30
    with vlmeff.wrap(model, processor, f"fastervlm:keep={k}") as vm:
        vm.connector.budget = budget
        kw = vm.prepare(**inputs)
        records = vm.last_record
    views, counts = tower_views(model, inputs)
    block = model.config.vision_feature_layer % (model.config.vision_config.num_hidden_layers + 1) - 1
    with torch.no_grad():
        scores = eager_tower(views, output_attentions=True).attentions[block][:, :, 0, 1:].mean(1)  # [N, 36]
    expected, first = [], 0
    for (_, _, (offsets, *_)), count in zip(spans_of(model, inputs), counts):
        if budget == "per_view":
            for v in range(count):
                cells = reference_topk(scores[first + v].tolist(), k)
                expected.append([(o, c) for o, c, _ in place(cells, None, offsets, v)])
        else:
            cells = reference_topk(scores[first: first + count].flatten().tolist(), k)
            side2 = scores.shape[1]
            placed = sorted((offsets[(c // side2, c % side2)], c) for c in cells if (c // side2, c % side2) in offsets)
            expected.append(placed)
        first += count
    assert [r.grid[0] for r in records] == ([1] * sum(counts) if budget == "per_view" else counts)
    embeds = check_splice(model, inputs, kw, records, expected)
    packed = packed_features(model, inputs)  # kept rows are the model's own rows at those offsets
    for m, (_, _, (_, newlines, _, _)) in enumerate(spans_of(model, inputs)):
        mine = [u for u, r in enumerate(records) if r.source_image == m]
        offsets = sorted([o for u in mine for o, _ in expected[u]] + newlines)
        torch.testing.assert_close(embeds[m], packed[m][offsets], rtol=1e-5, atol=1e-6)


def test_random_and_pool_per_view(next_model):
    model, processor = next_model
    inputs, _ = batch_inputs(processor, TWO_PROMPTS)
    spans = spans_of(model, inputs)
    with vlmeff.wrap(model, processor, "random:keep=9,seed=3") as vm:
        kw = vm.prepare(**inputs)
        records = vm.last_record
    expected, position = [], {}
    for record in records:
        offsets = spans[record.source_image][2][0]
        index = position.setdefault(record.sample, 0)  # views of the same sample before this one
        position[record.sample] += 1
        cells = reference_random(3, 36, index, 36, 9)
        expected.append([(o, c) for o, c, _ in place(cells, None, offsets, record.views[0])])
    check_splice(model, inputs, kw, records, expected)

    with vlmeff.wrap(model, processor, "pool:keep=9") as vm:
        kw = vm.prepare(**inputs)
        records = vm.last_record
    views, _ = tower_views(model, inputs)
    with torch.no_grad():
        features = model.model.vision_tower(views, output_hidden_states=True).hidden_states[-2][:, 1:]
    expected, values, moved = [], [], 0
    for u, record in enumerate(records):
        offsets = spans[record.source_image][2][0]
        means, groups = reference_pool(features[u], (1, 6, 6), 9)
        placed = place([g[0] for g in groups], groups, offsets, record.views[0])
        expected.append([(o, c) for o, c, _ in placed])
        values.append([(o, means[j]) for o, _, j in placed])
        assert record.merge_groups == [groups[j] for _, _, j in placed]
        moved += sum(c != groups[j][0] for _, c, j in placed)
    assert moved > 0  # windows whose top-left cell is padding sit at their first real cell
    embeds = check_splice(model, inputs, kw, records, expected)
    projector = model.model.multi_modal_projector
    for m, (_, _, (_, newlines, _, _)) in enumerate(spans):
        rows = sorted([v for u, r in enumerate(records) if r.source_image == m for v in values[u]]
                      + [(o, None) for o in newlines], key=lambda x: x[0])
        grid_rows = [i for i, (_, v) in enumerate(rows) if v is not None]
        with torch.no_grad():
            want = projector(torch.stack([v for _, v in rows if v is not None])[None])[0]
        torch.testing.assert_close(embeds[m][grid_rows], want, rtol=1e-5, atol=1e-6)


def test_per_image_pool_equals_per_view_pool_with_the_summed_budget(next_model):
    model, processor = next_model
    inputs, _ = batch_inputs(processor, [[(4, 0)]])  # 5 views
    outs = {}
    for budget, keep in (("per_view", 9), ("per_image", 45)):
        with vlmeff.wrap(model, processor, f"pool:keep={keep}", connector=f":budget={budget}") as vm:
            assert vm.connector.budget == budget
            outs[budget] = (vm.prepare(**inputs), vm.last_record)
    (view_kw, view_records), (image_kw, image_records) = outs["per_view"], outs["per_image"]
    assert len(view_records) == 5 and len(image_records) == 1 and image_records[0].grid == (5, 6, 6)
    assert torch.equal(view_kw["input_ids"], image_kw["input_ids"])
    torch.testing.assert_close(view_kw["mm_encoder_outputs"]["image"].pooler_output[0],
                               image_kw["mm_encoder_outputs"]["image"].pooler_output[0])
    cells = sorted(v * 36 + c for r in view_records for v in r.views for c in r.kept_indices.tolist())
    assert sorted(image_records[0].kept_indices.tolist()) == cells


def test_visionzip_and_preserve_positions(next_model):
    model, processor = next_model
    inputs, _ = batch_inputs(processor, TWO_PROMPTS)
    with vlmeff.wrap(model, processor, "visionzip:keep=10,positions=preserve") as vm:
        kw = vm.prepare(**inputs)
        records = vm.last_record
    for record in records:  # 9 dominant + 1 contextual per view; dominant cells over padding are dropped
        assert record.num_kept <= 10 and len(record.merge_groups) == record.num_kept
        assert all(c in g for c, g in zip(record.kept_indices.tolist(), record.merge_groups))
    original = inputs["attention_mask"].cumsum(-1) - 1
    spans = spans_of(model, inputs)
    for row in range(2):
        keep = [p for p in range(inputs["input_ids"].shape[1]) if inputs["attention_mask"][row, p]
                and inputs["input_ids"][row, p] != model.config.image_token_id]
        for m, (sample, start, (offsets, newlines, _, _)) in enumerate(spans):
            if sample == row:
                keep += [start + n for n in newlines]
                keep += [start + offsets[(v, c)] for r in records if r.source_image == m
                         for v in r.views for c in r.kept_indices.tolist()]
        got = kw["position_ids"][row][kw["attention_mask"][row].bool()]
        assert torch.equal(got, original[row, sorted(keep)])


@pytest.mark.parametrize("spec", ["fastervlm:keep=7", "random:keep=9,seed=1", "pool:keep=9", "visionzip:keep=10",
                                  "fastv:layer=1,keep=40", "atp:points=0,mass=0.7,strides=2", "naavit",
                                  "fastervlm:keep=20+fastv:layer=1,ratio=0.5"])
def test_batch_equals_one_by_one(next_model, spec):
    model, processor = next_model
    prompts = [[(1, 0), (2, 2)], [(3, 1)], [(4, 3)]]
    _, images = batch_inputs(processor, prompts)
    with vlmeff.wrap(model, processor, spec) as vm:  # min_new_tokens: no early EOS, rows stay comparable
        assert_batch_equals_one_by_one(vm, processor, PROMPTS[: len(images)], images, max_new_tokens=4,
                                       min_new_tokens=4, do_sample=False)


def test_fastv_ranks_grid_tokens_only_and_keeps_every_newline(next_model, saved):
    """FastV after layer 0: per sample the top-k grid tokens by the last token's layer-0 attention (eager
    recomputation); the newlines are no candidates and all reach layer 1."""
    model, processor = next_model
    inputs, _ = batch_inputs(processor, TWO_PROMPTS)
    keep = 25
    eager, _ = vlmeff.load(saved, dtype="float32", attn_implementation="eager")
    with torch.no_grad():
        attn = eager(**inputs, output_attentions=True).attentions[0]  # [B, H, S, S]
    spans = spans_of(model, inputs)
    seen, handle = llm_input_lengths(model)
    lengths = []

    def record_length(module, args, kwargs):
        lengths.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    hooks = [model.model.language_model.layers[1].register_forward_pre_hook(record_length, with_kwargs=True)]
    try:
        with vlmeff.wrap(model, processor, f"fastv:layer=1,keep={keep}") as vm:
            with torch.no_grad():
                vm(**inputs)
            records = vm.last_record
    finally:
        handle.remove()
        hooks[0].remove()
    expected_lengths = []
    for row in range(2):
        last = int(inputs["attention_mask"][row].nonzero().max())
        cells = []  # (position, image, view, cell) of every grid token of the row
        for m, (sample, start, (offsets, _, _, _)) in enumerate(spans):
            if sample == row:
                cells += [(start + o, m, view, cell) for (view, cell), o in offsets.items()]
        cells.sort()
        score = attn[row, :, last].mean(0)
        ranked = reference_topk([float(score[p]) for p, *_ in cells], keep)
        expected = sorted(cells[j][1:] for j in ranked)
        got = sorted((r.source_image, r.views[0], c) for r in records if r.sample == row
                     for c in r.llm_kept[1].tolist())
        assert got == expected
        real = int(inputs["attention_mask"][row].sum())
        expected_lengths.append(real - len(cells) + keep)  # text + every newline + the kept grid tokens
    assert seen[0] == inputs["input_ids"].shape[1] and lengths == [max(expected_lengths)]
    assert vm.stats.visual_tokens_kept == vm.stats.visual_tokens_in  # removal happens inside the LLM


def test_flowcut_runs_its_llm_stage_on_next(next_model):
    """The LLM stage at its default layer 1 needs a deeper LLM than the tiny model's two layers."""
    model, processor = next_model
    model = deepen(model, depth=4)
    inputs, _ = batch_inputs(processor, TWO_PROMPTS)
    with vlmeff.wrap(model, processor, "flowcut:keep=5") as vm:
        assert [s.name for s in vm.strategies] == ["flowcut-llm"]
        tokens = greedy(vm.generate, inputs, n=4)
        records = vm.last_record
    with vlmeff.wrap(model, processor, "flowcut-llm:keep=5") as vm:
        assert torch.equal(greedy(vm.generate, inputs, n=4), tokens)
        assert [r.llm_kept[2].tolist() for r in vm.last_record] == [r.llm_kept[2].tolist() for r in records]
    assert sum(r.llm_kept[2].numel() for r in records if r.sample == 1) == 5 * 4  # per view: 5 x its 4 views
    with pytest.raises(NotApplicableError, match="cannot prune inside its vision encoder.*llm_stage"):
        vlmeff.wrap(model, processor, "flowcut:keep=5,llm_stage=false")


def test_refusals_name_the_reason(next_model):
    model, processor = next_model
    inputs, _ = batch_inputs(processor, [[(1, 0)]])
    connector = LlavaNextConnector(model, processor)
    with pytest.raises(NotApplicableError, match="does not prune inside its vision encoder.*flowcut-llm"):
        connector.prepare_tokens(inputs, [FlowCut(keep=4)])
    assert not connector.runs_vision_stage
    with vlmeff.wrap(model, processor, "cca") as vm:
        with pytest.raises(NotApplicableError, match="position rules.*image_newline"):
            vm.generate(**inputs, max_new_tokens=1)
    with pytest.raises(ValueError, match="budget='per_crop'.*per_view.*per_image"):
        LlavaNextConnector(model, processor, budget="per_crop")
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.vision_feature_select_strategy = "full"
    with pytest.raises(NotApplicableError, match="vision_feature_select_strategy='full'"):
        LlavaNextConnector(types.SimpleNamespace(config=config))
    with pytest.raises(ValueError, match="need image_sizes"):
        connector.spans({k: v for k, v in inputs.items() if k != "image_sizes"})


def test_saisa_is_refused(next_model):
    """SAISA pairs raw features with visual positions in unit order, which this connector re-arranges."""
    model, processor = next_model
    with pytest.raises(NotApplicableError, match="saisa: the llava-next connector re-arranges"):
        vlmeff.wrap(model, processor, "saisa")


def test_connector_options_are_checked(next_model):
    model, processor = next_model
    with vlmeff.wrap(model, processor, "pool:keep=9", connector="llava-next:budget=per_image") as vm:
        assert vm.connector.budget == "per_image"
    with pytest.raises(vlmeff.StrategyError, match="connector 'llava-next': budget='per_crop'"):
        vlmeff.wrap(model, processor, connector=":budget=per_crop")
    with pytest.raises(vlmeff.StrategyError, match="connector 'llava-next' has no option bugdet; options: budget"):
        vlmeff.wrap(model, processor, connector=":bugdet=per_image")


def test_chat_and_connector_by_name(next_model):
    model, processor = next_model
    with vlmeff.wrap(model, processor, "fastervlm:keep=5", connector="llava-next") as vm:
        assert isinstance(vm.connector, LlavaNextConnector)
        assert isinstance(vm.chat(make_image(7, SIZES[2]), "What is it?", max_new_tokens=2), str)
        assert [r.num_kept for r in vm.last_record] == [5, 5, 5, 5]  # 1x3 crops: padding columns hold no top-5 cell


def test_cell_boxes_follow_the_processor_and_overlays_draw_per_view(next_model):
    """A crop cell whose box lies outside the image is a patch of pure padding in pixel_values, one inside is not;
    the base view tiles the whole image."""
    from vlmeff.viz import overlay

    model, processor = next_model
    for size in SIZES[:3] + [(200, 37)]:
        image = make_image(5, size)
        inputs = make_inputs(processor, ["hi"], [[image]])
        with vlmeff.wrap(model, processor, "random:keep=20") as vm:
            vm.prepare(**inputs)
        width, height = size
        patch = model.config.vision_config.patch_size
        for record in vm.last_record:
            boxes = vm.connector.cell_boxes(image.size, record)
            view = inputs["pixel_values"][0, record.views[0]]  # [3, px, px]
            cells = view.unfold(1, patch, patch).unfold(2, patch, patch).flatten(1, 2).flatten(2)  # [3, 36, p*p]
            uniform = (cells == cells[..., :1]).all(-1).all(0)  # [36] a patch of one value: padding
            outside = (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0) | (boxes[:, 0] >= width) | (boxes[:, 1] >= height)
            inside = (boxes[:, :2] >= 0).all(1) & (boxes[:, 2] <= width) & (boxes[:, 3] <= height)
            assert bool(uniform[outside].all()) and not bool(uniform[inside].any()), (size, record.views)
            if record.views == (0,):
                assert boxes[0, :2].tolist() == [0, 0] and boxes[-1, 2:].tolist() == [width, height]
        assert overlay(image, vm.last_record, connector=vm, which=1).size == image.size
    with vlmeff.wrap(model, processor, "random:keep=20") as vm:
        vm.connector.budget = "per_image"
        vm.prepare(**inputs)
        with pytest.raises(NotApplicableError, match="cell boxes are per view"):
            vm.connector.cell_boxes(image.size, vm.last_record[0])
