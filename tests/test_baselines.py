"""Random, Pool and VisionZip: each rule recomputed with plain loops (on small tensors and on the tiny models),
keep-everything exactness, batch == one by one, generate(), and the selection records."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

import vlmeff
from conftest import (
    assert_batch_equals_one_by_one,
    assert_keep_everything_is_vanilla,
    generate_recording_lengths,
    make_image,
    make_inputs,
)
from vlmeff.connector import VisionProbe
from vlmeff.pruners.pre_llm.pool import Pool
from vlmeff.pruners.pre_llm.random import RandomPruner
from vlmeff.pruners.pre_llm.visionzip import VisionZip, split_budget
from vlmeff.spec import build_pipeline, parse_spec
from vlmeff.strategy import ImageTokens, NotApplicableError, SelectionRecord, StrategyError

PROMPTS = ["What is in the image?", "Is there a dog in the image? Answer yes or no.", "Describe the picture."]


# --- plain reference implementations ----------------------------------------------------------------------------
def reference_topk(score: list[float], k: int) -> list[int]:
    """Rank by (-score, index), keep k, raster order (docs/methods.md shared rules)."""
    return sorted(sorted(range(len(score)), key=lambda j: (-score[j], j))[:k])


def reference_random(seed: int, num_tokens: int, position: int, n: int, k: int) -> list[int]:
    """The documented rule: first k of a randperm seeded by sha256("seed:num_tokens:position")[:8], sorted."""
    digest = hashlib.sha256(f"{seed}:{num_tokens}:{position}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") & (2**63 - 1))
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def reference_pool(features: torch.Tensor, grid, k: int):
    """Largest pooled grid with one integer stride that fits in k; window means written out with loops."""
    t, h, w = grid
    stride = next((r for r in range(2, max(h, w) + 1) if t * math.ceil(h / r) * math.ceil(w / r) <= k), max(h, w))
    values, groups = [], []
    for f in range(t):
        for i in range(math.ceil(h / stride)):
            for j in range(math.ceil(w / stride)):
                cells = [f * h * w + r * w + c for r in range(i * stride, min(i * stride + stride, h))
                         for c in range(j * stride, min(j * stride + stride, w))]
                groups.append(cells)
                values.append(sum(features[c] for c in cells) / len(cells))
    return torch.stack(values), groups


def reference_visionzip(cls_sum: list[float], metric: torch.Tensor, features: torch.Tensor, dominant: int,
                        contextual: int):
    """VisionZip written out: dominant top patches, uniform targets, argmax cosine (first on ties),
    contextual = target + mean(assigned). metric: [V, d] head-averaged keys (not normalised)."""
    num = len(cls_sum)
    dom = reference_topk(cls_sum, dominant)
    rest = [j for j in range(num) if j not in dom]
    if contextual == 0:
        return dom, [], features[dom], []
    step = max(1, len(rest) // contextual)
    targets = [rest[p] for p in range(0, len(rest), step)][:contextual]
    unit = [metric[j] / metric[j].norm() for j in range(num)]
    members = {t: [] for t in targets}
    for j in rest:
        if j in targets:
            continue
        sims = [float(unit[j] @ unit[t]) for t in targets]
        members[targets[max(range(len(targets)), key=lambda a: sims[a])]].append(j)  # max(): first maximum
    merged = []
    for t in targets:
        extra = sum(features[j] for j in members[t]) / len(members[t]) if members[t] else 0
        merged.append(features[t] + extra)
    values = torch.cat([features[dom], torch.stack(merged)])
    return dom, targets, values, [sorted([t] + members[t]) for t in targets]


def assert_partition(record: SelectionRecord):
    """merge_groups hold every original token exactly once; each group contains its representative."""
    covered = [j for g in record.merge_groups for j in g]
    assert sorted(covered) == list(range(record.num_tokens))
    assert record.num_kept == record.kept_indices.numel() == len(record.merge_groups)
    assert all(rep in g for rep, g in zip(record.kept_indices.tolist(), record.merge_groups))


class FakeProbe(VisionProbe):
    def __init__(self, cls: torch.Tensor, keys: torch.Tensor):
        self.cls, self.k = cls, keys

    def cls_attention(self, image):
        return self.cls[image]

    def keys(self, image, block=None):
        return self.k[image]


def tokens(features, grid, sample=0, image=0, probe=None) -> ImageTokens:
    index = torch.arange(features.shape[0])
    record = SelectionRecord(sample=sample, image=image, grid=grid, num_tokens=features.shape[0], kept_indices=index)
    return ImageTokens(features=features, index=index, probe=probe, image=image, record=record)


# --- rules on small tensors -------------------------------------------------------------------------------------
def test_random_rule_reproducible_per_sample_and_uniform():
    feats = torch.randn(10, 3)
    images = [tokens(feats, (1, 2, 5), sample=0, image=0), tokens(feats, (1, 2, 5), sample=1, image=1),
              tokens(feats, (1, 2, 5), sample=1, image=2)]
    out = RandomPruner(keep=4, seed=3).reduce(images)
    kept = [o.finish_record().kept_indices.tolist() for o in out]
    assert kept[0] == reference_random(3, 10, 0, 10, 4)
    assert kept[1] == kept[0]  # first image of its sample: same draw as sample 0's first image
    assert kept[2] == reference_random(3, 10, 1, 10, 4) and kept[2] != kept[1]
    torch.testing.assert_close(out[2].features, feats[kept[2]], rtol=0, atol=0)
    counts = torch.zeros(10)
    for seed in range(600):
        counts[RandomPruner(keep=3, seed=seed).reduce([tokens(feats, (1, 2, 5))])[0].finish_record().kept_indices] += 1
    assert ((counts / 600 - 0.3).abs() < 0.08).all(), counts  # every token kept with probability k / n
    assert RandomPruner(ratio=0.25).reduce([tokens(feats, (1, 2, 5))])[0].features.shape[0] == 2  # round(2.5)


@pytest.mark.parametrize("grid,k,expected", [((1, 8, 8), 16, (4, 4)), ((1, 8, 8), 15, (3, 3)), ((1, 8, 8), 63, (4, 4)),
                                             ((1, 5, 7), 12, (3, 4)), ((1, 5, 7), 11, (2, 3)), ((1, 3, 4), 1, (1, 1))])
def test_pool_grid_and_window_means(grid, k, expected):
    t, h, w = grid
    feats = torch.randn(t * h * w, 6)
    out = Pool(keep=k).reduce([tokens(feats, grid)])[0]
    values, groups = reference_pool(feats, grid, k)
    assert len(groups) == expected[0] * expected[1] <= k
    torch.testing.assert_close(out.features, values)
    assert out.finish_record().merge_groups == groups
    assert out.index.tolist() == [g[0] for g in groups]  # top-left cell represents the window
    assert_partition(out.record)


def test_pool_equals_adaptive_pooling_when_the_stride_divides_the_grid():
    feats = torch.randn(64, 5)
    out = Pool(keep=16).reduce([tokens(feats, (1, 8, 8))])[0]
    grid = feats.T.reshape(1, 5, 8, 8)
    expected = torch.nn.functional.adaptive_avg_pool2d(grid, (4, 4)).reshape(5, 16).T
    torch.testing.assert_close(out.features, expected)


@pytest.mark.parametrize("dominant,contextual", [(5, 3), (2, 7), (6, 0), (1, 1)])
def test_visionzip_rule_on_small_tensors(dominant, contextual):
    g = torch.Generator().manual_seed(dominant * 10 + contextual)
    num, heads, hd = 20, 3, 4
    cls = torch.softmax(torch.randn(1, heads, num + 1, generator=g), -1)[:, :, 1:]
    cls[0, :, 4] = cls[0, :, 9]  # a tie, broken by the lower index
    keys = torch.randn(1, num + 1, heads * hd, generator=g)
    feats = torch.randn(num, 5, generator=g)
    img = tokens(feats, (1, 4, 5), probe=FakeProbe(cls, keys))
    out = VisionZip(dominant=dominant, contextual=contextual).reduce([img])[0]
    metric = keys[0, 1:].view(num, heads, hd).mean(1)
    dom, targets, values, groups = reference_visionzip(cls[0].sum(0).tolist(), metric, feats, dominant, contextual)
    record = out.finish_record()
    assert record.kept_indices.tolist() == out.index.tolist() == dom + targets
    assert record.num_extra == 0
    assert record.merge_groups == ([[d] for d in dom] + groups if contextual else None)
    torch.testing.assert_close(out.features, values)
    if contextual:  # without contextual tokens the other patches are dropped, not merged
        assert_partition(out.record)


def test_visionzip_budget_split_and_parameters():
    assert [split_budget(k) for k in (192, 128, 64)] == [(162, 30), (108, 20), (54, 10)]  # published splits
    assert VisionZip(keep=192).counts(576) == (162, 30)
    assert VisionZip(ratio=1 / 3).counts(576) == (162, 30)
    assert VisionZip(dominant=7, contextual=2).counts(576) == (7, 2)
    for bad in ({"keep": 64, "dominant": 54, "contextual": 10}, {"dominant": 54}, {}, {"dominant": 0, "contextual": 1},
                {"dominant": 3, "contextual": -1}):
        with pytest.raises(StrategyError):
            VisionZip(**bad)


# --- on the tiny models -----------------------------------------------------------------------------------------
def llava_features(model, pixel_values):
    """[I, V, D] vision features LLaVA reads, straight from the tower; and all hidden states."""
    with torch.no_grad():
        hs = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    return hs[model.config.vision_feature_layer][:, 1:], hs


@pytest.mark.parametrize("kind", ["llava-clip", "qwen2-vl"])
def test_random_selection_on_models(loaded, kind):
    model, processor = loaded(kind)
    images = [[make_image(30)], [make_image(31), make_image(32, (40, 70))]]
    inputs = make_inputs(processor, PROMPTS[:2], images)
    with vlmeff.wrap(model, processor, "random:keep=5,seed=7") as vm:
        vm.prepare(**inputs)
    for record, position in zip(vm.last_record, [0, 0, 1]):
        num = record.num_tokens
        assert record.kept_indices.tolist() == reference_random(7, num, position, num, 5)
        assert record.strategies == ["random"] and record.num_kept == 5


@pytest.mark.parametrize("kind", ["llava-clip", "qwen2-vl"])
def test_pool_values_on_models(loaded, kind):
    model, processor = loaded(kind)
    images = [[make_image(40)], [make_image(41, (90, 40))]]
    inputs = make_inputs(processor, PROMPTS[:2], images)
    k = 7
    with vlmeff.wrap(model, processor, f"pool:keep={k}") as vm:
        kw = vm.prepare(**inputs)
    embeds = kw["mm_encoder_outputs"]["image"].pooler_output
    with torch.no_grad():
        if kind.startswith("llava"):
            feats, _ = llava_features(model, inputs["pixel_values"])
            side = model.config.vision_config.image_size // model.config.vision_config.patch_size
            grids = [(1, side, side)] * 2
        else:
            feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
            grids = [(t, h // 2, w // 2) for t, h, w in inputs["image_grid_thw"].tolist()]
        for i, record in enumerate(vm.last_record):
            values, groups = reference_pool(feats[i], grids[i], k)
            assert record.grid == grids[i] and record.merge_groups == groups and len(groups) <= k
            assert_partition(record)
            if kind.startswith("llava"):
                values = model.model.multi_modal_projector(values[None])[0]
            torch.testing.assert_close(embeds[i], values)


TOWER_KEYS = {  # keys of one block from the tower's own modules (independent of vlmeff.connectors)
    "llava-clip": lambda layer, h: layer.self_attn.k_proj(layer.layer_norm1(h)),
    "llava-dinov2": lambda layer, h: layer.attention.k_proj(layer.norm1(h)),
}


@pytest.mark.parametrize("kind", ["llava-clip", "llava-dinov2"])
@pytest.mark.parametrize("spec,dominant,contextual", [("keep=16", 13, 3), ("dominant=9,contextual=7", 9, 7),
                                                      ("ratio=0.5", 27, 5), ("dominant=10,contextual=0", 10, 0)])
def test_visionzip_matches_eager_attention_and_tower_keys(loaded, saved_models, kind, spec, dominant, contextual):
    model, processor = loaded(kind)
    inputs = make_inputs(processor, PROMPTS[:2], [[make_image(50)], [make_image(51)]])
    with vlmeff.wrap(model, processor, f"visionzip:{spec}") as vm:
        kw = vm.prepare(**inputs)
    embeds = kw["mm_encoder_outputs"]["image"].pooler_output

    eager, _ = vlmeff.load(saved_models[kind], dtype="float32", attn_implementation="eager")
    block = model.config.vision_feature_layer % (model.config.vision_config.num_hidden_layers + 1) - 1
    heads = model.config.vision_config.num_attention_heads
    feats, hs = llava_features(model, inputs["pixel_values"])
    layer = vm.connector.vit.layers(model.model.vision_tower)[block]
    with torch.no_grad():
        att = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions[block]
        keys = TOWER_KEYS[kind](layer, hs[block])[:, 1:]  # [I, V, H*hd], [CLS] dropped
    for i, record in enumerate(vm.last_record):
        cls_sum = att[i, :, 0, 1:].float().sum(0).tolist()  # [CLS] row summed over heads, patch columns
        metric = keys[i].view(keys.shape[1], heads, -1).mean(1)
        dom, targets, values, groups = reference_visionzip(cls_sum, metric, feats[i], dominant, contextual)
        assert record.kept_indices.tolist() == dom + targets and record.num_extra == 0
        assert record.merge_groups == ([[d] for d in dom] + groups if contextual else None)
        if contextual:
            assert_partition(record)
        with torch.no_grad():
            torch.testing.assert_close(embeds[i], model.model.multi_modal_projector(values[None])[0])


@pytest.mark.parametrize("kind,spec", [
    ("llava-clip", "random:keep=100000"), ("qwen2-vl", "random:keep=100000"), ("llava-clip", "pool:keep=100000"),
    ("qwen2-vl", "pool:ratio=1.0"), ("llava-clip", "visionzip:keep=100000"),
    ("llava-clip", "visionzip:dominant=50,contextual=14"),
])
def test_keep_everything_is_exactly_vanilla(loaded, kind, spec):
    stats = assert_keep_everything_is_vanilla(*loaded(kind), spec, PROMPTS[:2])
    assert stats.visual_tokens_kept == stats.visual_tokens_in


@pytest.mark.parametrize("kind,spec", [("llava-clip", "random:keep=9,seed=1"), ("llava-clip", "visionzip:keep=12"),
                                       ("qwen2-vl", "random:ratio=0.4"), ("qwen2-vl", "pool:keep=6")])
def test_batch_equals_one_by_one(loaded, kind, spec):
    model, processor = loaded(kind)
    if kind.startswith("qwen"):  # a sample with two images: the random seed counts images within the sample
        images = [[make_image(10)], [make_image(11), make_image(12)], [make_image(13, (90, 40))]]
    else:
        images = [[make_image(10)], [make_image(11)], [make_image(12)]]
    with vlmeff.wrap(model, processor, spec) as vm:
        assert_batch_equals_one_by_one(vm, processor, PROMPTS, images, max_new_tokens=6, do_sample=False)


@pytest.mark.parametrize("kind,spec,kept", [
    ("llava-clip", "random:keep=9", 9), ("qwen2-vl", "random:keep=5", 5), ("llava-clip", "pool:keep=20", 16),
    ("qwen2-vl", "pool:keep=4", None), ("llava-clip", "visionzip:dominant=6,contextual=3", 9),
])
def test_generate_shrinks_the_llm_input(loaded, kind, spec, kept):
    model, processor = loaded(kind)
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(3)]])
    out, vm, seen, num_visual = generate_recording_lengths(model, processor, spec, inputs)
    k = vm.last_record[0].num_kept
    if kept is None:  # pooled grid size depends on the Qwen grid: at most the budget
        assert 1 <= k <= 4
    else:
        assert k == kept
    assert k < num_visual and seen[0] == inputs["input_ids"].shape[1] - num_visual + k
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_visionzip_on_qwen_raises_naming_alternatives(loaded):
    model, processor = loaded("qwen2-vl")
    with pytest.raises(NotApplicableError, match=r"needs a \[CLS\] token.*scorer=global_query.*pool.*random"):
        vlmeff.wrap(model, processor, "visionzip:keep=8")


def test_pool_and_visionzip_need_the_full_grid():
    with pytest.raises(StrategyError, match="needs the full token grid"):
        build_pipeline(parse_spec("random:keep=30+pool:keep=8"))
    with pytest.raises(StrategyError, match="needs the full token grid"):
        build_pipeline(parse_spec("random:keep=30+visionzip:keep=8"))


def test_random_after_pool_keeps_the_merge_groups_of_what_it_keeps():
    feats = torch.randn(64, 4)
    pooled = Pool(keep=16).reduce([tokens(feats, (1, 8, 8))])[0]
    out = RandomPruner(keep=5, seed=2).reduce([pooled])[0]
    picked = reference_random(2, 64, 0, 16, 5)
    record = out.finish_record()
    assert record.kept_indices.numel() == 5 and record.num_extra == 0
    assert record.merge_groups == [reference_pool(feats, (1, 8, 8), 16)[1][p] for p in picked]
    assert out.index.tolist() == record.kept_indices.tolist() == [g[0] for g in record.merge_groups]
    torch.testing.assert_close(out.features, pooled.features[picked], rtol=0, atol=0)
