"""The decoding stage: contrast branches as extra rows of one batch, combined by a logits processor (vcd, damro, and
the CFG halves of pai / paint). Formulas are recomputed by hand; every branch's scores at every step are compared
with a separate, cache-free run of the model on that branch's inputs alone."""

from __future__ import annotations

import math

import pytest
import torch
from test_llm_stage import deepen
from transformers import LogitsProcessor, LogitsProcessorList

import vlmeff
from conftest import make_image, make_inputs
from vlmeff.decoding import BranchPlan, contrast, drop_tokens, guidance
from vlmeff.pruners.decoding.vcd import diffusion_noise, noise_schedule
from vlmeff.strategy import NotApplicableError, StrategyError

PROMPTS = ["What is in the image?", "Is there a dog in the image? Answer yes or no, please."]


@pytest.fixture(scope="module")
def llava(loaded):
    model, processor = loaded("llava-clip")
    return deepen(model), processor


def batch(processor, seeds=(41, 42)):
    return make_inputs(processor, PROMPTS, [[make_image(seeds[0])], [make_image(seeds[1])]])


def greedy_new(fn, inputs, n=4, **kwargs):
    out = fn(**inputs, max_new_tokens=n, do_sample=False, **kwargs)
    return out[:, inputs["input_ids"].shape[1]:]


# --- formulas ---------------------------------------------------------------------------------------------------
def test_vcd_noise_equals_the_schedule_and_is_seeded():
    abar, product = [], 1.0
    for t in range(1000):  # the reference code's schedule, in plain float64 arithmetic
        beta = 1 / (1 + math.exp(-(-6 + 12 * t / 999))) * (0.5e-2 - 1e-5) + 1e-5
        product *= 1 - beta
        abar.append(product)
    torch.testing.assert_close(noise_schedule().double(), torch.tensor(abar, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    x = torch.randn(3, 8, 8)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    a = float(noise_schedule()[500])
    assert torch.equal(diffusion_noise(x, 500, 7), math.sqrt(a) * x + math.sqrt(1 - a) * eps)
    assert torch.equal(diffusion_noise(x, 500, 7), diffusion_noise(x, 500, 7))
    assert not torch.equal(diffusion_noise(x, 500, 7), diffusion_noise(x, 500, 8))


def test_contrast_and_guidance_equal_a_hand_computation():
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5], [0.0, 3.0, 2.9, float("-inf")]])
    o = torch.tensor([[1.0, 2.0, 0.0, 0.5], [1.0, 1.0, 1.0, 1.0]])
    got = contrast(logits, o, alpha=1.0, beta=0.1)
    for b in range(2):
        top = max(x for x in logits[b].tolist())
        for v in range(4):
            x, y = float(logits[b, v]), float(o[b, v])
            want = float("-inf") if (x < math.log(0.1) + top or math.isinf(x)) else 2 * x - y
            assert float(got[b, v]) == pytest.approx(want) if math.isfinite(want) else math.isinf(float(got[b, v]))
    u = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 2.0, 0.5]])
    got = guidance(logits, u, gamma=1.1, beta=0.1)
    for b in range(2):
        lp_c = torch.log_softmax(logits[b], 0).tolist()
        lp_u = torch.log_softmax(u[b], 0).tolist()
        for v in range(4):
            cut = lp_c[v] < math.log(0.1) + max(lp_c) or math.isinf(lp_c[v])
            if cut:
                assert math.isinf(float(got[b, v]))
            else:
                assert float(got[b, v]) == pytest.approx(1.1 * lp_c[v] - 0.1 * lp_u[v], rel=1e-5)


def test_text_only_rows_drop_the_image_span(loaded):
    for kind in ("llava-clip", "qwen2-vl"):
        model, processor = loaded(kind)
        inputs = batch(processor)
        connector = vlmeff.wrap(model, processor).connector
        out = drop_tokens(inputs, connector.image_span_ids(), connector.pad_token_id)
        for row in range(2):
            ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()
            want = [t for t in ids if t not in connector.image_span_ids()]
            assert out["input_ids"][row][out["attention_mask"][row].bool()].tolist() == want


# --- invariants -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["vcd:alpha=0", "damro:alpha=0", "pai:alpha=0,gamma=1", "paint:alpha_local=0,"
                                  "alpha_summary=0,gamma=1"])
def test_no_op_settings_reproduce_vanilla_greedy_generation(llava, spec):
    model, processor = llava
    inputs = batch(processor)
    with torch.no_grad():
        reference = greedy_new(model.generate, inputs, n=5)
    with vlmeff.wrap(model, processor, spec) as vm:
        assert torch.equal(greedy_new(vm.generate, inputs, n=5), reference)


class Recorder:
    """Keeps the rows' raw scores that each step's combination receives."""

    def __init__(self, plan_strategy):
        self.steps = []
        self.strategy = plan_strategy
        self._combine = plan_strategy.combine

    def __enter__(self):
        def combine(scores, branch_scores):
            self.steps.append((scores.clone(), [b.clone() for b in branch_scores]))
            return self._combine(scores, branch_scores)
        self.strategy.combine = combine
        return self

    def __exit__(self, *exc):
        del self.strategy.combine


def last_logits(model, inputs, new_tokens) -> torch.Tensor:
    """[B, V] last-position logits of a cache-free forward over the prompt plus `new_tokens` [B, n]."""
    ids = torch.cat([inputs["input_ids"], new_tokens], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(new_tokens)], 1)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits[:, -1].float()


@pytest.mark.parametrize("spec", ["vcd", "pai:alpha=0"])
def test_every_branch_matches_a_separate_run_at_every_step(llava, spec):
    """Main rows = the model on the prompt; VCD rows = the model on the noised image; PAI-CFG rows = the model on
    the text-only prompt; each at every decode step, from a cache-free forward."""
    model, processor = llava
    inputs = batch(processor)
    vm = vlmeff.wrap(model, processor, spec)
    decoding = [s for s in vm.strategies if s.stage.value == "decoding"][0]
    with Recorder(decoding) as rec:
        new = greedy_new(vm.generate, inputs, n=4)
    branch = decoding.branches(inputs, vm.connector)[0].inputs
    for step, (main, (other,)) in enumerate(rec.steps):
        done = new[:, :step]
        torch.testing.assert_close(main, last_logits(model, inputs, done), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(other, last_logits(model, branch, done), rtol=1e-4, atol=1e-4)
    vm.unwrap()


@pytest.mark.parametrize("spec", ["vcd", "damro", "pai", "paint", "fastervlm:keep=8+vcd", "fastervlm:keep=8+damro",
                                  "fastv:keep=8+vcd", "naavit+damro", "cca+pai"])
def test_batch_equals_one_by_one(llava, spec):
    model, processor = llava
    inputs = batch(processor)
    with vlmeff.wrap(model, processor, spec) as vm:
        together = greedy_new(vm.generate, inputs)
        assert len(vm.last_record) == 2 and vm.stats.visual_tokens_in == 2 * vm.last_record[0].num_tokens
        for row in range(2):
            one = make_inputs(processor, [PROMPTS[row]], [[make_image(41 + row)]])
            assert greedy_new(vm.generate, one).tolist()[0] == together[row].tolist()


def test_damro_outliers_equal_an_independent_one_head_computation(llava):
    model, processor = llava
    inputs = batch(processor)
    vm = vlmeff.wrap(model, processor, "damro:k=5")
    vm.prepare(**inputs)
    branch_images = [img for img in vm._images if img.record.sample >= 2]
    tower = model.model.vision_tower
    block = model.config.vision_feature_layer % (model.config.vision_config.num_hidden_layers + 1) - 1
    with torch.no_grad():
        hidden = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[block]
        layer = getattr(tower, "vision_model", tower).encoder.layers[block]
        normed = layer.layer_norm1(hidden)
        q, k = layer.self_attn.q_proj(normed)[:, 0], layer.self_attn.k_proj(normed)
    for i, img in enumerate(branch_images):
        scores = torch.softmax((k[i] @ q[i]) / math.sqrt(k.shape[-1]), dim=0)[1:]  # one head, CLS column dropped
        order = sorted(range(scores.numel()), key=lambda j: -float(scores[j]))[:5]
        assert img.record.kept_indices.tolist() == order  # descending order, as the reference code feeds them
    assert all(r.num_kept == r.num_tokens for r in vm.last_record)  # the main rows keep everything
    vm.unwrap()


def test_sampling_with_a_seed_is_reproducible_and_user_processors_still_apply(llava):
    model, processor = llava
    inputs = batch(processor)

    class Ban(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.index_fill(1, torch.tensor([221, 62]), float("-inf"))

    with vlmeff.wrap(model, processor, "vcd") as vm:
        kwargs = dict(max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.9, top_k=50)
        torch.manual_seed(0)
        first = vm.generate(**inputs, **kwargs)
        torch.manual_seed(0)
        second = vm.generate(**inputs, **kwargs)
        assert torch.equal(first, second)
        banned = vm.generate(**inputs, max_new_tokens=6, do_sample=False, logits_processor=LogitsProcessorList([Ban()]))
        new = banned[:, inputs["input_ids"].shape[1]:]
        assert not torch.isin(new, torch.tensor([221, 62])).any()


def test_forward_returns_the_callers_rows_with_combined_last_scores(llava):
    model, processor = llava
    inputs = batch(processor)
    with vlmeff.wrap(model, processor, "vcd") as vm:
        out = vm(**inputs)
        plan: BranchPlan = vm._plan
        assert out.logits.shape[0] == 2 and plan.total_rows == 4
        first = greedy_new(vm.generate, inputs, n=1)
    assert first[:, 0].tolist() == out.logits[:, -1].argmax(-1).tolist()


def test_refusals_name_the_reason(llava, loaded):
    model, processor = llava
    inputs = batch(processor)
    qwen, qproc = loaded("qwen2-vl")
    with pytest.raises(NotApplicableError, match=r"\[CLS\]"):
        vlmeff.wrap(qwen, qproc, "damro")
    with pytest.raises(StrategyError, match="one decoding-stage combination per call"):
        vlmeff.wrap(model, processor, "vcd+damro")
    with pytest.raises(StrategyError, match="one decoding-stage combination per call"):
        vlmeff.wrap(model, processor, "pai+vcd")
    with vlmeff.wrap(model, processor, "vcd") as vm, pytest.raises(StrategyError, match="num_beams=2"):
        vm.generate(**inputs, max_new_tokens=2, num_beams=2)
    with pytest.raises(StrategyError, match="vision-stage reduction prunes inside the encoder"):
        vlmeff.wrap(model, processor, "flowcut:keep=8+damro")
    for bad in ("vcd:beta=0", "vcd:alpha=-1", "vcd:noise_step=1000", "damro:k=0", "pai:gamma=0.5", "pai:gate=x"):
        with pytest.raises(StrategyError):
            vlmeff.wrap(model, processor, bad)


@pytest.mark.parametrize("spec", ["vcd", "pai", "fastervlm:scorer=global_query,keep=8+vcd"])
def test_qwen2_vl_batch_equals_one_by_one(loaded, spec):
    model, processor = loaded("qwen2-vl")
    model = deepen(model)
    inputs = batch(processor)
    with vlmeff.wrap(model, processor, spec) as vm:
        together = greedy_new(vm.generate, inputs)
        for row in range(2):
            one = make_inputs(processor, [PROMPTS[row]], [[make_image(41 + row)]])
            assert greedy_new(vm.generate, one).tolist()[0] == together[row].tolist()


def test_paint_head_specific_modulation_equals_a_hand_computation():
    """heads=specific (the paper's modulation, not in the released code): alpha_h = alpha v_h / mean_h(v)."""
    from vlmeff.layout import IMAGE, TEXT, TokenLayout
    from vlmeff.pruners.attention.paint import PAINT

    kind = torch.tensor([[TEXT, IMAGE, IMAGE, IMAGE, TEXT]])
    layout = TokenLayout(kind=kind, image=torch.tensor([[-1, 0, 0, 0, -1]]), cell=torch.tensor([[-1, 0, 1, 2, -1]]),
                         source=torch.arange(5)[None], grids=[(1, 1, 3)])
    state = {"local": torch.tensor([[True, False, False]]), "summary": torch.tensor([[False, False, True]])}
    torch.manual_seed(2)
    scores = torch.randn(1, 3, 5)
    image_keys = kind == IMAGE
    got = PAINT(heads="specific", cfg=False).edit_scores(3, scores, layout, image_keys, state)
    probs = torch.softmax(scores, -1)
    mass = [float(probs[0, h, 1:4].sum()) for h in range(3)]
    mean = sum(mass) / 3
    for h in range(3):
        for k in range(5):
            a = float(scores[0, h, k])
            gain = {1: 0.7, 3: 0.3}.get(k, 0.0) * mass[h] / mean
            assert float(got[0, h, k]) == pytest.approx(a + gain * abs(a), rel=1e-5, abs=1e-6)
