"""AIM merge: the rule against a plain-loop implementation, the keys against the tower's own modules, end to end."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import vlmeff
from conftest import assert_keep_everything_is_vanilla, make_image, make_inputs
from vlmeff.connector import VisionProbe
from vlmeff.pruners.pre_llm.aim import AIM, bipartite_assignment, merge_schedule
from vlmeff.spec import parse_spec
from vlmeff.strategy import ImageTokens, NotApplicableError, SelectionRecord, StrategyError

PROMPTS = ["What is in the image?", "Is there a dog in the image? Answer yes or no.", "Describe the picture."]


def reference_merge(x, metric=None, index=None, iterations=None, keep=None):
    """AIM's merge written out with Python loops (docs/methods.md "AIM", odd lengths and partial rounds as documented).

    x: [N, D]; metric: [N, M] or None (then the tokens themselves); index: original indices (default 0..N-1).
    Returns (merged features [N', D] float64, representatives, groups).
    """
    index = list(range(len(x))) if index is None else [int(i) for i in index]
    tokens = [{"x": x[p].double(), "m": None if metric is None else metric[p].double(), "rep": index[p],
               "group": [index[p]]} for p in range(len(x))]
    rounds = 0
    while True:
        n = len(tokens)
        if keep is None:
            if rounds == iterations:
                break
            r = n // 2
        else:
            if n <= keep:
                break
            r = min(n // 2, n - keep)
        if r == 0:
            break
        rounds += 1
        sources, dests = tokens[0::2], tokens[1::2]

        def vec(t):
            return t["x"] if metric is None else t["m"]

        best = []  # (similarity, destination) per source
        for a in sources:
            best_s, best_j = -math.inf, None
            for j, b in enumerate(dests):
                s = float(vec(a) @ vec(b)) / (float(vec(a).norm()) * float(vec(b).norm()))
                if s > best_s:  # strict: the first (lowest) destination wins ties
                    best_s, best_j = s, j
            best.append((best_s, best_j))
        ranked = sorted(range(len(sources)), key=lambda i: (-best[i][0], i))
        merged = set(ranked[:r])
        members = {j: [b] for j, b in enumerate(dests)}
        for i in sorted(merged):
            members[best[i][1]].append(sources[i])
        new = []
        for p, t in enumerate(tokens):
            if p % 2 == 0:
                if p // 2 not in merged:
                    new.append(t)  # unmerged source: stays at its raster position
                continue
            group = members[p // 2]
            new.append({"x": sum(u["x"] for u in group) / len(group),
                        "m": None if metric is None else sum(u["m"] for u in group) / len(group),
                        "rep": t["rep"], "group": sorted(g for u in group for g in u["group"])})
        tokens = new
    return torch.stack([t["x"] for t in tokens]), [t["rep"] for t in tokens], [t["group"] for t in tokens]


class FakeProbe(VisionProbe):
    """Keys of one image with a [CLS] row first; remembers which block was asked for."""

    def __init__(self, keys):
        self._keys = keys
        self.blocks = []

    def keys(self, image, block=None):
        self.blocks.append(block)
        return self._keys


def run_aim(strategy, features, index, probe, num_original):
    record = SelectionRecord(sample=0, image=0, grid=(1, 1, num_original), num_tokens=num_original,
                             kept_indices=index)
    image = ImageTokens(features=features, index=index, probe=probe, image=0, record=record)
    strategy.check_applicable(SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(
        num_hidden_layers=5))))
    return strategy.reduce([image])[0]


def test_merge_schedule():
    assert merge_schedule(576, iterations=3) == [288, 144, 72]  # 576 -> 72, (1/2)^3
    assert merge_schedule(576, keep=100) == [288, 144, 44]  # 144 -> 100 by a partial round
    assert merge_schedule(576, keep=144) == [288, 144]
    assert merge_schedule(9, iterations=2) == [4, 2]  # odd: ceil(N / 2) remain
    assert merge_schedule(1, iterations=3) == [] and merge_schedule(8, keep=8) == []


def test_odd_length_keeps_the_unmerged_source_in_raster_order():
    # A = {0, 2, 4}, B = {1, 3}: 0 -> 1 and 4 -> 3 are exact matches, 2 is the least similar and stays
    metric = torch.tensor([[1.0, 0, 0], [1, 0, 0], [0.6, 0.8, 0.1], [0, 0, 1], [0, 0, 1]])
    dest, kept = bipartite_assignment(metric)
    assert kept.tolist() == [1, 2, 3]  # the reference would emit [2, 1, 3] (unmerged sources first)
    assert dest.tolist() == [0, 0, 1, 2, 2]


def test_ties_go_to_the_lowest_destination():
    g = torch.Generator().manual_seed(3)
    metric = torch.randn(6, 4, generator=g)
    metric[1::2] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # every B identical: each A ties across all of them
    dest, kept = bipartite_assignment(metric)
    assert kept.tolist() == [1, 3, 5] and dest.tolist() == [0, 0, 0, 1, 0, 2]


@pytest.mark.parametrize("n", [16, 17, 23, 64])
@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("metric", ["keys", "features"])
def test_merge_equals_plain_loop(n, iterations, metric):
    g = torch.Generator().manual_seed(n * 10 + iterations)
    num_original = n + 7
    index = torch.randperm(num_original, generator=g)[:n].sort().values  # tokens left by an earlier pruner
    features = torch.randn(n, 6, generator=g)
    keys = torch.randn(num_original + 1, 10, generator=g)  # [CLS] row first
    probe = FakeProbe(keys)
    out = run_aim(AIM(iterations=iterations, metric=metric), features, index, probe, num_original)
    ref_metric = keys[1:][index] if metric == "keys" else None
    ref_x, ref_rep, ref_groups = reference_merge(features, ref_metric, index, iterations=iterations)
    torch.testing.assert_close(out.features, ref_x.float(), rtol=1e-5, atol=1e-6)
    assert out.index.tolist() == ref_rep == out.finish_record().kept_indices.tolist()
    assert out.finish_record().merge_groups == ref_groups
    assert sorted(i for grp in ref_groups for i in grp) == index.tolist()
    assert probe.blocks == ([4] if metric == "keys" else [])  # the last of 5 blocks
    expected = n
    for _ in range(iterations):
        expected -= expected // 2
    assert out.features.shape[0] == expected


@pytest.mark.parametrize(("n", "keep"), [(64, 20), (64, 13), (23, 7), (16, 9), (16, 1)])
def test_partial_keep_equals_plain_loop(n, keep):
    g = torch.Generator().manual_seed(n + keep)
    features = torch.randn(n, 5, generator=g)
    keys = torch.randn(n + 1, 8, generator=g)
    out = run_aim(AIM(keep=keep), features, torch.arange(n), FakeProbe(keys), n)
    ref_x, ref_rep, ref_groups = reference_merge(features, keys[1:], keep=keep)
    assert out.features.shape[0] == keep == len(ref_rep)
    torch.testing.assert_close(out.features, ref_x.float(), rtol=1e-5, atol=1e-6)
    assert out.index.tolist() == ref_rep and out.finish_record().merge_groups == ref_groups


def test_parameters_are_validated():
    assert AIM().iterations == 3 and AIM().metric == "keys"
    with pytest.raises(StrategyError, match="iterations=0"):
        AIM(iterations=0)
    with pytest.raises(StrategyError, match="one of iterations"):
        AIM(iterations=2, keep=10)
    with pytest.raises(StrategyError, match="metric='cls'"):
        AIM(metric="cls")
    with pytest.raises(StrategyError, match="keep=0"):
        AIM(keep=0)
    spec = AIM.from_params({"keep": "13", "metric": "features"}).spec()
    assert parse_spec(spec)[0] == AIM(keep=13, metric="features")


def _tower_keys_and_features(model, kind, pixel_values):
    """Independent recomputation: k_proj(layer_norm(hidden_states[last block])) with the tower's own modules."""
    tower = model.model.vision_tower
    last = model.config.vision_config.num_hidden_layers - 1
    with torch.no_grad():
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states
        if kind == "llava-clip":
            layer = tower.encoder.layers[last]
            keys = layer.self_attn.k_proj(layer.layer_norm1(hidden[last]))
        else:
            layer = tower.encoder.layer[last]
            keys = layer.attention.k_proj(layer.norm1(hidden[last]))
    features = hidden[model.config.vision_feature_layer][:, 1:]  # LLaVA's features: layer -2, [CLS] dropped
    return keys, features


@pytest.mark.parametrize("kind", ["llava-clip", "llava-dinov2"])
def test_llava_merges_features_before_projector_by_last_block_keys(loaded, kind):
    model, processor = loaded(kind)
    inputs = make_inputs(processor, PROMPTS[:2], [[make_image(1)], [make_image(2)]])
    keys, features = _tower_keys_and_features(model, kind, inputs["pixel_values"])
    num_tokens = features.shape[1]
    vm = vlmeff.wrap(model, processor, "aim")
    connector = vm.connector
    _, images = connector.prepare_tokens(inputs)
    last = model.config.vision_config.num_hidden_layers - 1
    torch.testing.assert_close(images[1].probe.keys(1, block=last), keys[1], rtol=1e-5, atol=1e-6)
    kw = vm.prepare(**inputs)
    records = vm.last_record
    vm.unwrap()
    embeds = kw["mm_encoder_outputs"]["image"].pooler_output
    for i in range(2):
        ref_x, ref_rep, ref_groups = reference_merge(features[i], keys[i][1:], iterations=3)
        with torch.no_grad():
            projected = model.model.multi_modal_projector(ref_x.float()[None])[0]  # merge first, then project
        torch.testing.assert_close(embeds[i], projected, rtol=1e-4, atol=1e-5)
        assert records[i].kept_indices.tolist() == ref_rep and records[i].merge_groups == ref_groups
        assert len(ref_rep) == num_tokens // 8
        # the test can tell the metric apart: the features or the feature block's keys would group differently
        assert reference_merge(features[i], None, iterations=3)[2] != ref_groups
        assert reference_merge(features[i], images[i].probe.keys(i)[1:], iterations=3)[2] != ref_groups


def test_llava_partial_keep_and_groups_partition(loaded):
    model, processor = loaded("llava-clip")
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(5)]])
    keys, features = _tower_keys_and_features(model, "llava-clip", inputs["pixel_values"])
    with vlmeff.wrap(model, processor, "aim:keep=13") as vm:
        kw = vm.prepare(**inputs)
    record = vm.last_record[0]
    ref_x, ref_rep, ref_groups = reference_merge(features[0], keys[0][1:], keep=13)
    with torch.no_grad():
        projected = model.model.multi_modal_projector(ref_x.float()[None])[0]
    torch.testing.assert_close(kw["mm_encoder_outputs"]["image"].pooler_output[0], projected, rtol=1e-4, atol=1e-5)
    assert record.num_kept == 13 and record.merge_groups == ref_groups
    groups = record.merge_groups
    assert sorted(i for g in groups for i in g) == list(range(record.num_tokens))  # each token in exactly one group
    assert all(rep in g for rep, g in zip(record.kept_indices.tolist(), groups))
    assert record.kept_indices.tolist() == sorted(record.kept_indices.tolist())


def test_keep_everything_is_exactly_the_unwrapped_model(loaded):
    assert_keep_everything_is_vanilla(*loaded("llava-clip"), "aim:keep=100000", PROMPTS[:2])


def test_batch_equals_one_by_one(loaded):
    model, processor = loaded("llava-clip")
    images = [[make_image(10)], [make_image(11)], [make_image(12)]]
    vm = vlmeff.wrap(model, processor, "aim")
    batch = make_inputs(processor, PROMPTS, images)
    out = vm.generate(**batch, max_new_tokens=5, do_sample=False)
    batch_records = [(r.kept_indices.tolist(), r.merge_groups) for r in vm.last_record]
    width = batch["input_ids"].shape[1]
    for i in range(3):
        single = make_inputs(processor, [PROMPTS[i]], [images[i]])
        one = vm.generate(**single, max_new_tokens=5, do_sample=False)
        assert torch.equal(out[i, width:], one[0, single["input_ids"].shape[1]:]), f"sample {i} differs"
        assert (vm.last_record[0].kept_indices.tolist(), vm.last_record[0].merge_groups) == batch_records[i]
    vm.unwrap()


@pytest.mark.parametrize(("kind", "spec", "iterations"),
                         [("llava-clip", "aim", 3), ("qwen2-vl", "aim:metric=features,iterations=2", 2)])
def test_llm_input_shrinks_and_generate_works(loaded, kind, spec, iterations):
    model, processor = loaded(kind)
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(3, (168, 168))]])
    vm = vlmeff.wrap(model, processor, spec)
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        out = vm.generate(**inputs, max_new_tokens=4, do_sample=False)
    finally:
        handle.remove()
        vm.unwrap()
    num_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    kept = num_visual // 2**iterations
    assert num_visual % 2**iterations == 0 and vm.last_record[0].num_kept == kept
    assert seen[0] == inputs["input_ids"].shape[1] - num_visual + kept
    assert all(n == 1 for n in seen[1:])
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    groups = vm.last_record[0].merge_groups
    assert sorted(i for g in groups for i in g) == list(range(num_visual))


def test_qwen_keys_metric_is_refused_with_the_alternative(loaded):
    model, processor = loaded("qwen2-vl")
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(4)]])
    with vlmeff.wrap(model, processor, "aim") as vm:
        with pytest.raises(NotApplicableError, match="metric=features"):
            vm.prepare(**inputs)
