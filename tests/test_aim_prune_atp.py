"""AIM's in-LLM pruning and training-free ATP: selections vs an independent hand-written prefill, schedules, budgets."""

from __future__ import annotations

import math

import pytest
import torch
from llm_reference import reference_prefill
from test_llm_stage import deepen, layer_lengths

import vlmeff
from conftest import greedy, make_image, make_inputs
from vlmeff.pruners.in_llm.aim_prune import AIMPrune
from vlmeff.pruners.in_llm.atp import ATP, calibrate, mean_equivalent_tokens
from vlmeff.strategy import StrategyError

PROMPTS = ["What is in the image?", "Is there a dog in the image? Answer yes or no, please.", "Describe it."]


def sharpened_llava(loaded, seed: int):
    """The tiny CLIP LLaVA with a deeper LLM whose attention is sharper than random init, so scores differ."""
    model, processor = loaded("llava-clip")
    deep = deepen(model, seed=seed)
    with torch.no_grad():
        for layer in deep.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return deep, processor


@pytest.fixture(scope="module")
def llava(loaded):
    return sharpened_llava(loaded, seed=1)


def ranked(score, k):
    return sorted(sorted(range(len(score)), key=lambda j: (-float(score[j]), j))[:k])


def aim_select(start, span):
    def select(layer, logits, samples):
        out = []
        for b, s in enumerate(samples):
            m = torch.softmax(logits[b] / 0.1, dim=-1)  # [H, S, S]
            d = s["valid"].float() / s["valid"].sum()
            d = d[None].repeat(m.shape[0], 1)
            for _ in range(5):
                d = torch.stack([d[h] @ m[h] for h in range(m.shape[0])])
            importance = (d ** 2).mean(0).sqrt()
            rate = max(0.0, 1 - (layer - start + 1) / span)
            out.append(ranked(importance[s["visual"]], round(s["num_visual"] * rate)))
        return out
    return select


def test_aim_prune_matches_independent_prefill_at_every_layer(llava):
    model, processor = llava
    inputs = make_inputs(processor, PROMPTS, [[make_image(1)], [make_image(2)], [make_image(3)]])
    with vlmeff.wrap(model, processor, "aim-prune:start=1,span=4") as vm:
        vm(**inputs)
    expected = reference_prefill(model, inputs, [1, 2, 3, 4], aim_select(1, 4))
    for layer in (2, 3, 4, 5):
        assert [r.llm_kept[layer].tolist() for r in vm.last_record] == expected[layer], layer
    v0 = vm.last_record[0].num_tokens
    assert [vm.last_record[0].llm_kept[layer].numel() for layer in (2, 3, 4, 5)] == [
        round(v0 * 0.75), round(v0 * 0.5), round(v0 * 0.25), 0]


def test_aim_prune_default_schedule_scales_with_depth():
    s = AIMPrune()
    assert s.schedule(32) == (13, 8) and s.schedule(28) == (14, 7)
    assert s.prune_layers(32) == list(range(13, 21))
    assert s.rate(12, 32) == 1.0 and s.rate(13, 32) == pytest.approx(7 / 8) and s.rate(20, 32) == 0.0
    assert s.schedule(30) == (12, 8)  # SmolLM2-135M (reference model)
    assert s.prune_layers(6) == [2, 3]  # round(13 * 6 / 32) = 2, span round(1.5) = 2
    with pytest.raises(StrategyError, match="temperature"):
        AIMPrune(temperature=0)


def test_aim_merge_then_prune_generates(llava):
    model, processor = llava
    inputs = make_inputs(processor, PROMPTS[:2], [[make_image(4)], [make_image(5)]])
    seen, handles = layer_lengths(model)
    try:
        with vlmeff.wrap(model, processor, "aim:iterations=1+aim-prune:start=2,span=2") as vm:
            out = greedy(vm.generate, inputs, n=3)
    finally:
        for h in handles:
            h.remove()
    record = vm.last_record[0]
    assert record.num_kept == record.num_tokens // 2 and record.merge_groups is not None
    assert record.llm_kept[3].numel() == round(record.num_kept / 2) and record.llm_kept[4].numel() == 0
    assert seen[3][0] < seen[2][0] and seen[4][0] < seen[3][0]
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def plain_scores(logits, sample):
    """ATP's (S_self [n], S_cross [n]) of one sample, by plain loops over the head-mean attention of `logits`."""
    a = torch.softmax(logits, dim=-1).mean(0)  # [S, S]
    vis, n, text = sample["visual"].tolist(), sample["visual"].numel(), sample["text_after"].tolist()
    s_self = torch.tensor([float(sum(a[vis[i], vis[j]] for i in range(j, n)) / (n - j)) for j in range(n)])
    s_cross = torch.tensor([float(sum(a[t, vis[j]] for t in text) / len(text)) for j in range(n)])
    return s_self, s_cross


def atp_select(points, masses, strides, grid_w, grid_h, k_min=1):
    def select(layer, logits, samples):
        point = points.index(layer)
        out = []
        for b, s in enumerate(samples):
            n = s["visual"].numel()
            s_self, s_cross = plain_scores(logits[b], s)
            norm = [(x - x.min()) / (x.max() - x.min()) for x in (s_self, s_cross)]
            red = (norm[0] + norm[1]) / 2
            order = sorted(range(n), key=lambda j: (-float(red[j]), j))
            total, acc, count = float(red.sum()), 0.0, 0
            for j in order:
                if acc / total >= masses[point] - 1e-9:
                    break
                acc += float(red[j])
                count += 1
            keep = set(order[:max(count, k_min)])
            for j, cell in enumerate(s["cells"].tolist()):
                if (cell // grid_w) % grid_h % strides[point] == 0 and cell % grid_w % strides[point] == 0:
                    keep.add(j)
            out.append(sorted(keep))
        return out
    return select


def test_atp_matches_independent_prefill_and_counts_are_instance_adaptive(llava):
    model, processor = llava
    inputs = make_inputs(processor, PROMPTS, [[make_image(6)], [make_image(7)], [make_image(8)]])
    spec = "atp:points=1/3,mass=0.6/0.5,strides=4/8"
    with vlmeff.wrap(model, processor, spec) as vm:
        vm(**inputs)
    _, h, w = vm.last_record[0].grid
    expected = reference_prefill(model, inputs, [1, 3], atp_select([1, 3], [0.6, 0.5], [4, 8], w, h))
    for layer in (2, 4):
        assert [r.llm_kept[layer].tolist() for r in vm.last_record] == expected[layer], layer
    counts = [r.llm_kept[2].numel() for r in vm.last_record]
    assert len(set(counts)) > 1  # instance-adaptive, ragged batch
    lattice = {c for c in range(h * w) if (c // w) % 4 == 0 and c % 4 == 0}
    assert all(lattice <= set(r.llm_kept[2].tolist()) for r in vm.last_record)


def test_atp_points_scale_and_validation():
    assert ATP().prune_layers(32) == [2, 6, 12, 18]
    assert ATP().prune_layers(30) == [2, 6, 11, 17]
    with pytest.raises(StrategyError, match="2 points need 2 mass values"):
        ATP(points="1/2", mass="0.9")
    with pytest.raises(StrategyError, match=r"in \(0, 1\]"):
        ATP(mass="1.5/0.9/0.8/0.7")
    with pytest.raises(StrategyError, match="separated by '/'"):
        ATP(mass="a/b")
    assert ATP().prune_layers(6) == [0, 1, 2, 3]
    with pytest.raises(StrategyError, match="not strictly increasing"):
        ATP().prune_layers(4)  # 0, 1, 2, 2


def test_atp_calibration_hits_a_token_budget(llava):
    model, processor = llava
    batches = [make_inputs(processor, PROMPTS[:2], [[make_image(9)], [make_image(10)]])]
    run = mean_equivalent_tokens(lambda s: vlmeff.wrap(model, processor, [s]), batches)
    spec = "atp:points=1/3,mass=0.9/0.8,strides=4/8"
    base = vlmeff.parse_spec(spec)[0]
    full = run(base)
    target = full * 0.7
    strategy, value = calibrate(run, target, base=base, steps=8)
    assert strategy.shift < 0
    assert abs(value - target) <= max(2.0, 0.1 * target)
    assert math.isclose(run(strategy), value)
