"""The SAISA layer (`saisa`): checked against a slow reference that runs the stock decoder layers on the FULL
sequence with the visual rows overwritten by P_l(v) before every layer (visual rows then compute queries and an FFN
whose results are never read). Text rows see exactly SAISA's keys and values, so their logits must match vlmeff's
removal implementation (text-only residual stream, visual keys written into the cache)."""

from __future__ import annotations

import pytest
import torch
from test_llm_stage import deepen

import vlmeff
from conftest import make_image, make_inputs
from vlmeff.flops import llm_layer_flops, llm_prefill_flops
from vlmeff.pruners.attention.saisa import (
    SAISAProjectors,
    fit_projectors,
    load_projectors,
    save_projectors,
    vision_feature_size,
)
from vlmeff.strategy import NotApplicableError, StrategyError

PROMPTS = ["What is in the image?", "Is there a dog in the image? Answer yes or no, please."]


@pytest.fixture(scope="module")
def llava(loaded):
    model, processor = loaded("llava-clip")
    return deepen(model), processor


def random_weights(module: SAISAProjectors) -> SAISAProjectors:
    """Every parameter drawn from N(0, 0.5^2), so that no layer equals another and no update is zero."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    return module


@pytest.fixture(scope="module", params=[None, 3], ids=["paper-form", "factored-rank3"])
def weights(llava, tmp_path_factory, request):
    model, _ = llava
    text = model.config.text_config
    torch.manual_seed(3)
    module = random_weights(
        SAISAProjectors(vision_feature_size(model.config), text.hidden_size, text.num_hidden_layers, request.param))
    path = save_projectors(tmp_path_factory.mktemp("saisa") / "saisa.safetensors", module, {"model": "tiny test"})
    return str(path), module


def raw_features(model, inputs) -> list[torch.Tensor]:
    """Per image [V, d_vis]: the vision tower's feature-layer output without [CLS] (what LLaVA's projector reads)."""
    tower = model.model.vision_tower
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_hidden_states=True)
    return list(out.hidden_states[model.config.vision_feature_layer][:, 1:])


def reference_logits(model, inputs, module, extra_ids=None) -> torch.Tensor:
    """[B, vocab] logits of the last position by the slow full-sequence reference (extra_ids [B, n]: tokens
    appended after the prompt, all real)."""
    lm = model.model.language_model
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    if extra_ids is not None:
        ids = torch.cat([ids, extra_ids], 1)
        valid = torch.cat([valid, torch.ones_like(extra_ids, dtype=torch.bool)], 1)
    visual = (ids == model.config.image_token_id) & valid
    feats = raw_features(model, inputs)
    n = ids.shape[1]
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    allowed = (torch.ones(n, n, dtype=torch.bool).tril()[None] & valid[:, None, :]) | torch.eye(n, dtype=torch.bool)
    with torch.no_grad():
        hidden = model.get_input_embeddings()(ids)
        rotary = lm.rotary_emb(hidden, positions)
        for index, layer in enumerate(lm.layers):
            hidden = hidden.clone()
            for row in range(ids.shape[0]):
                cols = visual[row].nonzero().squeeze(1)
                hidden[row, cols] = module(index, feats[row][: cols.numel()])  # one image per row here
            additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
            hidden = layer(hidden, attention_mask=additive, position_embeddings=rotary, position_ids=positions)
        return model.lm_head(lm.norm(hidden))[:, -1]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefill_logits_equal_the_full_sequence_reference(llava, weights, attn):
    model, processor = llava
    model = model if attn == "sdpa" else deepen(model, attn="eager")  # same seed: same weights
    path, module = weights
    inputs = make_inputs(processor, PROMPTS, [[make_image(31)], [make_image(32)]])  # ragged: left padding
    vm = vlmeff.wrap(model, processor, f"saisa:weights={path}")
    out = vm(**inputs)
    expected = reference_logits(model, inputs, module)
    torch.testing.assert_close(out.logits[:, -1], expected, atol=1e-4, rtol=1e-4)
    # the residual stream really holds the text rows only
    text_rows = int(((inputs["input_ids"] != model.config.image_token_id) & inputs["attention_mask"].bool()).sum(1).max())
    assert out.logits.shape[1] == text_rows
    vm.unwrap()


def test_decode_steps_equal_the_reference_and_batch_equals_one_by_one(llava, weights):
    model, processor = llava
    path, module = weights
    inputs = make_inputs(processor, PROMPTS, [[make_image(33)], [make_image(34)]])
    vm = vlmeff.wrap(model, processor, f"saisa:weights={path}")
    out = vm.generate(**inputs, max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    for step in range(3):
        expected = reference_logits(model, inputs, module, new[:, :step] if step else None)
        torch.testing.assert_close(out.scores[step], expected, atol=1e-4, rtol=1e-4)
    for row in range(2):
        one = make_inputs(processor, [PROMPTS[row]], [[make_image(33 + row)]])
        alone = vm.generate(**one, max_new_tokens=3, do_sample=False)
        assert alone[0, one["input_ids"].shape[1]:].tolist() == new[row].tolist()
    vm.unwrap()


def test_after_fastervlm_the_projectors_see_the_kept_raw_features(llava, weights):
    model, processor = llava
    path, module = weights
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(35)]])
    vm = vlmeff.wrap(model, processor, f"fastervlm:keep=5+saisa:weights={path}")
    out = vm(**inputs)
    kept = vm.last_record[0].kept_indices
    # reference: the prompt with 5 placeholders, whose raw features are those of the kept cells
    image_id = model.config.image_token_id
    ids = inputs["input_ids"][0]
    first = int((ids == image_id).nonzero()[0])
    short_ids = torch.cat([ids[:first], ids[first:first + 5], ids[first + int((ids == image_id).sum()):]])[None]
    short = {"input_ids": short_ids, "attention_mask": torch.ones_like(short_ids), "pixel_values": inputs["pixel_values"]}
    feats = raw_features(model, inputs)[0][kept]

    class Kept(torch.nn.Module):
        def forward(self, layer, x):
            return module(layer, feats)

    expected = reference_logits(model, short, Kept())
    torch.testing.assert_close(out.logits[:, -1], expected, atol=1e-4, rtol=1e-4)
    vm.unwrap()


def test_missing_wrong_and_corrupt_weights_are_named(llava, tmp_path):
    model, processor = llava
    with pytest.raises(NotApplicableError, match="saisa_projectors.safetensors map .* this model needs .* pass "
                                                 "weights=<file> trained for it"):
        vlmeff.wrap(model, processor, "saisa")  # the default: the reference model's projectors, shaped for it
    with pytest.raises(StrategyError, match="no projector weights at"):
        vlmeff.wrap(model, processor, f"saisa:weights={tmp_path / 'nothing.safetensors'}")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(StrategyError, match="is not a SAISA projector file"):
        vlmeff.wrap(model, processor, f"saisa:weights={bad}")
    text = model.config.text_config
    wrong = save_projectors(tmp_path / "wrong.safetensors",
                            SAISAProjectors(vision_feature_size(model.config), text.hidden_size, text.num_hidden_layers + 1))
    with pytest.raises(NotApplicableError, match="this model needs"):
        vlmeff.wrap(model, processor, f"saisa:weights={wrong}")


def test_save_load_round_trip(weights):
    path, module = weights
    loaded, meta = load_projectors(path)
    assert meta["model"] == "tiny test" and meta["num_layers"] == module.num_layers
    for a, b in zip(loaded.state_dict().values(), module.state_dict().values()):
        assert torch.equal(a, b)


def test_refused_compositions_name_the_reason(llava, weights, loaded):
    model, processor = llava
    path, _ = weights
    with pytest.raises(StrategyError, match="in-LLM removal has nothing to prune"):
        vlmeff.wrap(model, processor, f"saisa:weights={path}+fastv:keep=4")
    with pytest.raises(StrategyError, match="attention-stage strategies act on visual query rows"):
        vlmeff.wrap(model, processor, f"naavit+saisa:weights={path}")
    with pytest.raises(StrategyError, match="attention-stage strategies act on visual query rows"):
        vlmeff.wrap(model, processor, f"saisa:weights={path}+pai")
    qwen, qproc = loaded("qwen2-vl")
    with pytest.raises(NotApplicableError, match="M-RoPE"):
        vlmeff.wrap(qwen, qproc, f"saisa:weights={path}")


def test_flops_count_text_queries_and_visual_keys(llava, weights):
    model, processor = llava
    path, module = weights
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(36)]])
    vm = vlmeff.wrap(model, processor, f"saisa:weights={path}")
    vm(**inputs)
    text_cfg = model.config.text_config
    visual = vm.stats.visual_tokens_kept
    text = vm.stats.text_tokens
    d, hd = text_cfg.hidden_size, text_cfg.head_dim
    q_width, kv_width = text_cfg.num_attention_heads * hd, text_cfg.num_key_value_heads * hd
    per_layer = (2 * text * (2 * d * q_width + 2 * d * kv_width) + 2 * visual * 2 * d * kv_width
                 + 4 * text * (text + visual) * q_width + 6 * text * d * text_cfg.intermediate_size)
    assert llm_layer_flops(text_cfg, text, key_only=visual) == per_layer
    assert vm.stats.flops["llm"] == llm_prefill_flops(text_cfg, text, key_only_tokens=visual)
    dv = vision_feature_size(model.config)
    stock = 2 * visual * (dv * d + d * d)
    layers, rank = text_cfg.num_hidden_layers, module.rank
    saisa = layers * stock if rank is None else stock + layers * 2 * visual * (d * rank + rank * d)
    assert vm.stats.flops["projector"] == stock + saisa
    assert vm.stats.flops["llm"] < vm.stats.flops_vanilla["llm"]
    vm.unwrap()


def _manual_factored(module: SAISAProjectors, layer: int, v: torch.Tensor) -> torch.Tensor:
    """P_l(v) = W2 g + b2 + U_l (D_l g) + c_l, g = GELU(W1 v + b1), from the raw parameters."""
    w = module.state_dict()
    g = torch.nn.functional.gelu(v @ w["first.0.weight"].T + w["first.0.bias"])
    delta = (g @ w[f"down.{layer}.weight"].T) @ w[f"up.{layer}.weight"].T + w[f"up.{layer}.bias"]
    return g @ w["second.weight"].T + w["second.bias"] + delta


def test_factored_projectors_follow_their_formula_and_start_as_the_stock_projector():
    torch.manual_seed(0)
    module = random_weights(SAISAProjectors(6, 8, 3, rank=2))
    v = torch.randn(5, 6)
    for layer in range(3):
        torch.testing.assert_close(module(layer, v), _manual_factored(module, layer, v))
    assert len({tuple(module(layer, v).flatten().tolist()) for layer in range(3)}) == 3
    linear_1, linear_2 = torch.nn.Linear(6, 8), torch.nn.Linear(8, 8)
    stock = torch.nn.Sequential(linear_1, torch.nn.GELU(), linear_2)
    paper = SAISAProjectors(6, 8, 3)
    for m in (module, paper):
        m.copy_stock(linear_1, linear_2)
        for layer in range(3):
            torch.testing.assert_close(m(layer, v), stock(v), rtol=0, atol=0)
    with pytest.raises(StrategyError, match="rank 9 must be in"):
        SAISAProjectors(6, 8, 3, rank=9)


def _design(module, v):
    g = module.first(v).double()
    return torch.cat([g, torch.ones_like(g[:, :1])], 1)


def test_fit_recovers_targets_a_rank_r_update_can_reach():
    """Targets P_l(v) = W2 g + b2 + c_l U D g with sum_l c_l = 0 (a shared layer plus per-layer updates of rank 1
    around it, same first layer) are recovered exactly by the rank-2 fit."""
    torch.manual_seed(1)
    truth = random_weights(SAISAProjectors(6, 8, 4, rank=2))
    with torch.no_grad():
        up, down = torch.randn(8, 2), torch.randn(2, 8)
        for layer, c in enumerate([1.0, -2.0, 0.5, 0.5]):
            truth.up[layer].weight.copy_(c * up)
            truth.up[layer].bias.zero_()
            truth.down[layer].weight.copy_(down)
    fitted = SAISAProjectors(6, 8, 4, rank=2)
    fitted.first.load_state_dict(truth.first.state_dict())
    chunks = [torch.randn(40, 6) for _ in range(3)]
    with torch.no_grad():
        batches = [(v, torch.stack([truth(layer, v) for layer in range(4)])) for v in chunks]
    fit = fit_projectors(fitted, batches, ridge=1e-12)
    v = torch.randn(7, 6)
    with torch.no_grad():
        for layer in range(4):
            torch.testing.assert_close(fitted(layer, v), truth(layer, v), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fitted.second.weight, truth.second.weight, atol=1e-4, rtol=1e-4)
    assert min(fit["r2"]) > 0.9999


def test_fit_at_full_rank_is_each_layers_least_squares_and_reports_its_r2():
    """rank = d: every layer's projector is that layer's own least-squares fit (torch.linalg.lstsq on [g, 1]); the
    reported explained variances equal those recomputed from the fitted module's predictions."""
    torch.manual_seed(2)
    module = SAISAProjectors(5, 4, 3, rank=4)
    v = torch.randn(200, 5)
    targets = torch.randn(3, 200, 4) + torch.arange(3.0)[:, None, None]
    fit = fit_projectors(module, [(v[:120], targets[:, :120]), (v[120:], targets[:, 120:])], ridge=1e-12)
    design = _design(module, v)
    with torch.no_grad():
        for layer in range(3):
            coef = torch.linalg.lstsq(design, targets[layer].double()).solution
            torch.testing.assert_close(module(layer, v).double(), design @ coef, atol=1e-4, rtol=1e-4)
            pred = module(layer, v).double()
            y = targets[layer].double()
            r2 = 1 - ((y - pred) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
            assert fit["r2"][layer] == pytest.approx(float(r2), abs=1e-4)
            shared = design @ torch.cat([module.second.weight.T, module.second.bias[None]]).double()
            r2_shared = 1 - ((y - shared) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
            assert fit["r2_shared"][layer] == pytest.approx(float(r2_shared), abs=1e-4)
    with pytest.raises(StrategyError, match="factored form"):
        fit_projectors(SAISAProjectors(5, 4, 3), [])


def test_float16_file_loads_as_the_rounded_weights(tmp_path):
    torch.manual_seed(4)
    module = random_weights(SAISAProjectors(6, 8, 3, rank=2))
    path = save_projectors(tmp_path / "half.safetensors", module, {"model": "t"}, dtype=torch.float16)
    loaded, meta = load_projectors(path)
    assert meta["rank"] == 2
    for name, p in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p.half().float()), name
