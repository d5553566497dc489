"""atp-learned: hard selections vs an independent hand-written prefill, the spatial score, the training-time soft
masks (formula, agreement with the hard cut), weight files and errors, and training resume == uninterrupted."""

from __future__ import annotations

import json
import math

import pytest
import torch
from llm_reference import reference_prefill
from test_aim_prune_atp import PROMPTS, plain_scores, sharpened_llava

import vlmeff
from conftest import make_image, make_inputs
from vlmeff.pruners.in_llm.atp import calibrate, mean_equivalent_tokens, spatial_score
from vlmeff.pruners.in_llm.atp.learned import (
    ATPLearned,
    SoftATP,
    ThresholdMLPs,
    load_thresholds,
    save_thresholds,
)
from vlmeff.router import ROUTER_ATTENTION as RECORDING_ATTENTION
from vlmeff.strategy import NotApplicableError, StrategyError


@pytest.fixture(scope="module")
def llava(loaded):
    return sharpened_llava(loaded, seed=2)


def random_thresholds(model, points, seed=0, width=8) -> ThresholdMLPs:
    """MLPs whose thresholds depend on the input (the trained init has zero output weights)."""
    torch.manual_seed(seed)
    module = ThresholdMLPs(model.config.text_config.hidden_size, len(points), width)
    with torch.no_grad():
        for mlp in module.mlps:
            mlp[2].weight.normal_(0, 0.5)
            mlp[2].bias.uniform_(-0.5, 0.5)
    return module


def save(tmp_path, model, module, points, name="t.safetensors"):
    return str(save_thresholds(tmp_path / name, module, {
        "points": points, "num_layers": model.config.text_config.num_hidden_layers, "model": "tiny"}))


def level_by_hand(cell, h, w):
    r, c = divmod(cell, w)
    top = max(1, int(math.floor(math.log2(min(h, w)))))
    return max(k for k in range(top + 1) if r % 2 ** k == 0 and c % 2 ** k == 0) / top


def learned_select(points, module, grid_h, grid_w, shift=0.0):
    """atp-learned's hard cut written plainly (module docstring), from logits and the layer's output."""
    lin = [[(m[0].weight, m[0].bias), (m[2].weight, m[2].bias)] for m in module.mlps]

    def mlp(point, x):
        (w1, b1), (w2, b2) = lin[point]
        hidden = torch.nn.functional.gelu(x @ w1.T + b1)
        return torch.sigmoid(hidden @ w2.T + b2)

    def select(layer, logits, samples):
        point = points.index(layer)
        out = []
        for b, s in enumerate(samples):
            vis, n, text = s["visual"].tolist(), s["visual"].numel(), s["text_after"].tolist()
            s_self, s_cross = plain_scores(logits[b], s)
            stats = []
            for x in (s_self * n, s_cross * n):
                stats += [float(x.mean()), float(((x - x.mean()) ** 2).mean().sqrt()), float(x.max())]
            rows = vis + text
            pooled = s["hidden"][rows].float().mean(0)
            normed = (pooled - pooled.mean()) / torch.sqrt(pooled.var(unbiased=False) + 1e-5)
            th = mlp(point, torch.cat([torch.tensor(stats), normed])) - shift
            red = ((s_self - s_self.min()) / (s_self.max() - s_self.min())
                   + (s_cross - s_cross.min()) / (s_cross.max() - s_cross.min())) / 2
            keep = [j for j, cell in enumerate(s["cells"].tolist())
                    if max(float(red[j]) - float(th[0]), level_by_hand(cell, grid_h, grid_w) - float(th[1])) > 0]
            out.append(keep or [min(range(n), key=lambda j: (-float(red[j]), j))])
        return out
    return select


def test_matches_independent_prefill(llava, tmp_path):
    model, processor = llava
    module = random_thresholds(model, [1, 3])
    path = save(tmp_path, model, module, [1, 3])
    inputs = make_inputs(processor, PROMPTS, [[make_image(11)], [make_image(12)], [make_image(13)]])
    with vlmeff.wrap(model, processor, f"atp-learned:weights={path},shift=0.05") as vm:
        vm(**inputs)
    _, h, w = vm.last_record[0].grid
    expected = reference_prefill(model, inputs, [1, 3], learned_select([1, 3], module, h, w, shift=0.05))
    for layer in (2, 4):
        assert [r.llm_kept[layer].tolist() for r in vm.last_record] == expected[layer], layer
    counts = [r.llm_kept[2].numel() for r in vm.last_record]
    assert 0 < min(counts) and max(counts) < vm.last_record[0].num_tokens
    assert len(set(counts)) > 1  # instance-adaptive thresholds: ragged batch


def test_batch_equals_per_sample(llava, tmp_path):
    model, processor = llava
    path = save(tmp_path, model, random_thresholds(model, [1, 3], seed=3), [1, 3])
    spec = f"atp-learned:weights={path}"
    images = [[make_image(14)], [make_image(15)]]
    with vlmeff.wrap(model, processor, spec) as vm:
        vm(**make_inputs(processor, PROMPTS[:2], images))
        batched = [r.llm_kept[4].tolist() for r in vm.last_record]
        single = []
        for prompt, imgs in zip(PROMPTS[:2], images):
            vm(**make_inputs(processor, [prompt], [imgs]))
            single.append(vm.last_record[0].llm_kept[4].tolist())
    assert batched == single


def test_spatial_score_is_a_lattice_hierarchy():
    h = w = 16
    cells = torch.arange(h * w)
    score = spatial_score(cells, torch.zeros_like(cells), [(1, h, w)])
    assert score.tolist() == [level_by_hand(c, h, w) for c in range(h * w)]
    for k, count in ((0, 64), (1, 16), (2, 4), (3, 1)):  # S_sp > k / 4 keeps the stride-2^(k+1) lattice
        kept = (score > k / 4).nonzero().squeeze(1)
        assert kept.numel() == count
        assert all((c // w) % 2 ** (k + 1) == 0 and c % 2 ** (k + 1) == 0 for c in kept.tolist())
    odd = spatial_score(torch.arange(15), torch.zeros(15, dtype=torch.long), [(1, 3, 5)])  # K = 1 for a 3x5 grid
    assert odd.tolist() == [level_by_hand(c, 3, 5) for c in range(15)]


def test_training_forward_is_the_inference_forward_and_trains_the_mlps(llava, tmp_path):
    """SoftATP's forward (hard cut through weighted attention) gives the logits, kept tokens and counts of the
    inference path that really removes the tokens; the loss and the budget term reach every MLP parameter."""
    model, processor = llava
    module = random_thresholds(model, [1, 3], seed=5)
    path = save(tmp_path, model, module, [1, 3])
    inputs = make_inputs(processor, [PROMPTS[1]], [[make_image(16)]])
    with vlmeff.wrap(model, processor, f"atp-learned:weights={path}") as vm:
        reference = vm(**inputs).logits[0, -1]
    record = vm.last_record[0]
    model.set_attn_implementation({"text_config": RECORDING_ATTENTION})
    try:
        soft = SoftATP(model, module, [1, 3], temperature=10.0)
        visual = inputs["input_ids"][0] == model.config.image_token_id
        with soft:
            soft.prepare(visual, inputs["input_ids"].shape[1], record.grid)
            logits = model(**inputs).logits[0, -1]
        loss = logits.float().logsumexp(-1) + soft.expected_fraction()
        loss.backward()
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
        model.zero_grad(set_to_none=True)
    assert soft.hard == [record.llm_kept[2].numel(), record.llm_kept[4].numel()]
    assert soft.alive.nonzero().squeeze(1).tolist() == record.llm_kept[4].tolist()
    assert record.llm_kept[4].numel() < record.llm_kept[2].numel() < record.num_tokens
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    assert math.isclose(float(soft.expected_fraction().detach()), soft.hard_fraction(), rel_tol=1e-6)
    assert math.isclose(soft.hard_fraction() * record.num_tokens, vm.stats.equivalent_tokens, rel_tol=1e-6)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_weighted_attention_is_the_masked_softmax(llava):
    """Key weights G: exp(s_ij) G_j / sum_k exp(s_ik) G_k (own key 1), checked against plain loops."""
    model, _ = llava
    model.set_attn_implementation({"text_config": RECORDING_ATTENTION})
    try:
        soft = SoftATP(model, ThresholdMLPs(model.config.text_config.hidden_size, 1, 4), [1])
        soft.prepare(torch.tensor([False, True, True, True, False]), 5, (1, 1, 3))
        soft.alive = torch.tensor([True, False, True])
        soft.log_soft = torch.log(torch.tensor([0.9, 0.2, 0.6]))
        torch.manual_seed(1)
        q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
        out, _ = soft._weighted_attention(None, q, k, v, None, scaling=0.3)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    g = [1.0, 1.0, 0.0, 1.0, 1.0]  # forward values: text 1, visual = the hard cut
    for h in range(4):
        for i in range(5):
            w = [math.exp(float(q[0, h, i] @ k[0, h // 2, j]) * 0.3) * (1.0 if j == i else g[j]) for j in range(i + 1)]
            expected = sum(w[j] * v[0, h // 2, j] for j in range(i + 1)) / sum(w)
            torch.testing.assert_close(out[0, i, h], expected, rtol=1e-5, atol=1e-5)


def test_weights_errors(llava, tmp_path, loaded):
    model, processor = llava
    with pytest.raises(StrategyError, match="no threshold weights"):
        vlmeff.wrap(model, processor, f"atp-learned:weights={tmp_path / 'missing.safetensors'}")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(StrategyError, match="not an atp-learned weights file"):
        vlmeff.wrap(model, processor, f"atp-learned:weights={bad}")
    path = save(tmp_path, model, random_thresholds(model, [1, 3]), [1, 3])
    other, other_processor = loaded("llava-dinov2")  # another LLM depth
    with pytest.raises(NotApplicableError, match="trained for an LLM of"):
        vlmeff.wrap(other, other_processor, f"atp-learned:weights={path}")
    with pytest.raises(StrategyError, match="trained at layers"):
        ATPLearned(weights=path, points="1/2").prune_layers(model.config.text_config.num_hidden_layers)
    with pytest.raises(StrategyError, match="shift"):
        ATPLearned(shift=2.0)
    module, meta = load_thresholds(path)
    assert meta["points"] == [1, 3] and meta["model"] == "tiny" and module.num_points == 2


def test_untrained_thresholds_are_one_half_everywhere(llava, tmp_path):
    from vlmeff.pruners.in_llm.atp.learned import untrained_thresholds

    model, processor = llava
    path = untrained_thresholds(model.config.text_config, tmp_path / "u.safetensors", points="1/3")
    module, meta = load_thresholds(path)
    assert meta["points"] == [1, 3] and "untrained" in meta["model"]
    features = torch.randn(3, 6 + module.hidden_size)
    assert torch.equal(module(0, features), torch.full((3, 2), 0.5))
    with vlmeff.wrap(model, processor, f"atp-learned:weights={path}") as vm:
        vm(**make_inputs(processor, [PROMPTS[0]], [[make_image(19)]]))
    assert 0 < vm.stats.equivalent_tokens < vm.last_record[0].num_tokens


def test_calibrate_shift_of_the_learned_thresholds(llava, tmp_path):
    model, processor = llava
    path = save(tmp_path, model, random_thresholds(model, [1, 3], seed=7), [1, 3])
    batches = [make_inputs(processor, PROMPTS[:2], [[make_image(17)], [make_image(18)]])]
    run = mean_equivalent_tokens(lambda s: vlmeff.wrap(model, processor, [s]), batches)
    base = ATPLearned(weights=path)
    low, high = run(ATPLearned(weights=path, shift=-0.5)), run(ATPLearned(weights=path, shift=0.5))
    assert low < run(base) < high  # more tokens with a larger shift
    target = (low + high) / 2
    strategy, value = calibrate(run, target, base=base, steps=8)
    assert abs(value - target) <= max(2.0, 0.1 * target)
    assert isinstance(strategy, ATPLearned) and strategy.weights == path


def test_training_resume_equals_uninterrupted(tmp_path):
    from test_reference_train import tiny_parts

    from vlmeff.reference.train_atp import ATPTrainConfig, ATPTrainer

    def train(out, steps, first=None):
        if first:
            model, processor = tiny_parts()
            ATPTrainer(model, processor, ATPTrainConfig(out=str(out), steps=first, points="0", num_scenes=5,
                                                        warmup=2, checkpoint_every=2, width=4)).train()
        model, processor = tiny_parts()
        trainer = ATPTrainer(model, processor, ATPTrainConfig(out=str(out), steps=steps, points="0", num_scenes=5,
                                                              warmup=2, checkpoint_every=2, width=4))
        trainer.train()
        return trainer

    frozen = {k: v.clone() for k, v in tiny_parts()[0].state_dict().items()}
    straight = train(tmp_path / "a", 4)
    assert all(torch.equal(v, frozen[k]) for k, v in straight.model.state_dict().items())  # only the MLPs train
    resumed = train(tmp_path / "b", 4, first=2)
    for name, p in straight.module.named_parameters():
        assert torch.equal(p, dict(resumed.module.named_parameters())[name]), name
    log = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2, 3, 4] and all("hard_tokens" in x for x in log)
    assert straight.budget_mean == resumed.budget_mean
    module, meta = load_thresholds(tmp_path / "a" / "atp_learned.safetensors")
    assert meta["points"] == [0] and meta["step"] == 4
    assert torch.equal(module.mlps[0][2].weight, straight.module.mlps[0][2].weight.detach())
