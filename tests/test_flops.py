"""vlmeff.flops: the analytic formulas against independent arithmetic and against FlopCounterMode on real
forwards of tiny models (LLaVA + CLIP / DINOv2 / SigLIP, Qwen2-VL, Qwen2.5-VL)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from vlmeff.flops import (
    FlopsBreakdown,
    flop_counter_mode,
    llm_layer_flops,
    llm_prefill_flops,
    prefill_flops,
    projector_flops,
    vision_flops,
)
from vlmeff.testing import tiny_llava, tiny_qwen2_vl

REL_TOL = 0.02
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]


def rel_err(measured: int, formula: int) -> float:
    return abs(measured - formula) / formula


def assert_close(measured: int, formula: int) -> None:
    assert formula > 0
    assert rel_err(measured, formula) < REL_TOL, f"measured {measured} vs formula {formula}"


def count(fn, mode=None) -> int:
    with torch.no_grad(), (mode or flop_counter_mode()) as counter:
        fn()
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------- pure arithmetic


def test_llm_layer_flops_matches_hand_arithmetic():
    # head_dim deliberately != hidden // heads, GQA with 3 query heads per KV head
    cfg = SimpleNamespace(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=10,
                          intermediate_size=100, num_hidden_layers=3, vocab_size=37)
    n = 7
    macs = 0
    macs += n * 48 * 60  # q_proj  48 -> 6 * 10
    macs += n * 48 * 20  # k_proj  48 -> 2 * 10
    macs += n * 48 * 20  # v_proj
    macs += 6 * (n * 10 * n)  # per query head: Q [n, 10] @ K^T [10, n]
    macs += 6 * (n * n * 10)  # per query head: A [n, n] @ V [n, 10]
    macs += n * 60 * 48  # o_proj  60 -> 48
    macs += 2 * n * 48 * 100 + n * 100 * 48  # gate, up, down
    assert llm_layer_flops(cfg, n) == 2 * macs

    per_layer = [7, 5, 2]
    expected = sum(llm_layer_flops(cfg, k) for k in per_layer) + 2 * 4 * 48 * 37
    assert llm_prefill_flops(cfg, per_layer, logits_tokens=4) == expected
    assert llm_prefill_flops(cfg, 7) == 3 * llm_layer_flops(cfg, 7) + 2 * 48 * 37
    assert llm_layer_flops(cfg, 0) == 0
    with pytest.raises(ValueError, match="3 layers"):
        llm_prefill_flops(cfg, [7, 5])

    # no head_dim attribute -> hidden // heads; MHA (no num_key_value_heads) -> the docs/methods.md expression
    mha = SimpleNamespace(hidden_size=32, num_attention_heads=4, intermediate_size=80, num_hidden_layers=1,
                          vocab_size=11)
    d, m = 32, 80
    assert llm_layer_flops(mha, n) == 2 * n * (2 * d * d + 2 * d * d) + 4 * n * n * d + 6 * n * d * m
    # a VLM config is accepted (its text_config is used)
    assert llm_prefill_flops(SimpleNamespace(text_config=mha), 5) == llm_prefill_flops(mha, 5)


def test_flops_breakdown():
    a, b = FlopsBreakdown(1, 2, 3), FlopsBreakdown(10, 20, 30)
    assert a.total == 6
    assert a.to_dict() == {"vision": 1, "projector": 2, "llm": 3, "total": 6}
    assert (a + b).to_dict() == {"vision": 11, "projector": 22, "llm": 33, "total": 66}


def test_flop_counter_mode_counts_cpu_sdpa():
    q, k = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    got = count(lambda: sdpa(q, k, k, is_causal=True, enable_gqa=True))
    assert got == 4 * 2 * 4 * 9 * 9 * 8  # full square, all query heads
    # the same attention as explicit matmuls, counted by the stock FlopCounterMode
    kk = k.repeat_interleave(2, dim=1)
    assert count(lambda: (q @ kk.transpose(-1, -2)).softmax(-1) @ kk, FlopCounterMode(display=False)) == got


# ------------------------------------------------------------------------------------ real tiny models


def _encoder_and_projected(model, inputs, kind):
    """(image_tokens for vision_flops, projected tokens) of the single image in `inputs`."""
    if kind == "qwen2-vl":
        return [inputs["image_grid_thw"][0].tolist()], 0
    vc = model.config.vision_config
    patches = (vc.image_size // vc.patch_size) ** 2
    return [patches + 1], patches  # CLS in the tower; "default" strategy drops it before the projector


@pytest.fixture(scope="module", params=["llava-clip", "llava-dinov2", "qwen2-vl"])
def tiny(request):
    kind = request.param
    model, processor = tiny_qwen2_vl() if kind == "qwen2-vl" else tiny_llava(kind.split("-")[1])
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    inputs = processor(images=Image.new("RGB", (60, 50), "red"), text=prompt, return_tensors="pt")
    return kind, model, inputs


def _image_features(model, inputs, kind):
    if kind == "qwen2-vl":
        return model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    return model.model.get_image_features(inputs["pixel_values"])


def test_vision_and_projector_match_flop_counter(tiny):
    kind, model, inputs = tiny
    image_tokens, projected = _encoder_and_projected(model, inputs, kind)
    measured = count(lambda: _image_features(model, inputs, kind))
    formula = vision_flops(model.config, image_tokens) + projector_flops(model.config, projected)
    assert_close(measured, formula)
    if kind == "qwen2-vl":
        assert projector_flops(model.config, 100) == 0
        # a plain int (t*h*w) is the same for a single-frame image
        assert vision_flops(model.config, [image_tokens[0][1] * image_tokens[0][2]]) == vision_flops(
            model.config, image_tokens)


@pytest.mark.parametrize("length", [None, 20])
def test_llm_matches_flop_counter(tiny, length):
    kind, model, inputs = tiny
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(inputs["input_ids"])
    n = embeds.shape[1] if length is None else length
    assert n < embeds.shape[1] or length is None

    def run():
        hidden = model.model.language_model(inputs_embeds=embeds[:, :n],
                                            attention_mask=inputs["attention_mask"][:, :n]).last_hidden_state
        model.lm_head(hidden[:, -1:])

    assert_close(count(run), llm_prefill_flops(model.config.text_config, n, logits_tokens=1))


def test_full_forward_matches_prefill_flops(tiny):
    kind, model, inputs = tiny
    image_tokens, projected = _encoder_and_projected(model, inputs, kind)
    n = inputs["input_ids"].shape[1]
    measured = count(lambda: model(**inputs, logits_to_keep=1))
    breakdown = prefill_flops(model.config, image_tokens=image_tokens, projected_tokens=projected,
                              tokens_per_layer=n, logits_tokens=1)
    assert_close(measured, breakdown.total)
    assert breakdown.to_dict()["total"] == breakdown.vision + breakdown.projector + breakdown.llm
    assert (breakdown.projector == 0) == (kind == "qwen2-vl")


def test_per_layer_token_counts_match_layer_by_layer_run(tiny):
    """Run the decoder layers one by one on shrinking sequences (as a pruning method inside the LLM does)."""
    kind, model, inputs = tiny
    lm = model.model.language_model
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(inputs["input_ids"])
    full = embeds.shape[1]
    per_layer = [full, full // 3]
    assert len(lm.layers) == len(per_layer)
    positions = torch.arange(full)[None]
    if kind == "qwen2-vl":
        positions = positions[None].expand(3, 1, full)
    with torch.no_grad():
        cos, sin = lm.rotary_emb(embeds, positions)

    def run():
        hidden = embeds
        for layer, n in zip(lm.layers, per_layer):
            hidden = layer(hidden[:, :n], attention_mask=None,
                           position_embeddings=(cos[..., :n, :], sin[..., :n, :]))
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        model.lm_head(lm.norm(hidden)[:, -1:])

    formula = llm_prefill_flops(model.config.text_config, per_layer)
    assert_close(count(run), formula)
    cfg = model.config.text_config
    by_hand = sum(llm_layer_flops(cfg, n) for n in per_layer) + 2 * cfg.hidden_size * cfg.vocab_size
    assert formula == by_hand
    assert formula < llm_prefill_flops(cfg, full)


def test_eager_attention_counted_by_stock_flop_counter():
    """Eager attention is plain matmuls, so the stock FlopCounterMode (no CPU SDPA formula) sees all of it."""
    model, processor = tiny_llava("clip")
    model.set_attn_implementation("eager")
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    inputs = processor(images=Image.new("RGB", (60, 50), "red"), text=prompt, return_tensors="pt")
    image_tokens, projected = _encoder_and_projected(model, inputs, "llava-clip")
    measured = count(lambda: model(**inputs, logits_to_keep=1), FlopCounterMode(display=False))
    formula = prefill_flops(model.config, image_tokens=image_tokens, projected_tokens=projected,
                            tokens_per_layer=inputs["input_ids"].shape[1]).total
    assert_close(measured, formula)


# ------------------------------------------------------------------- towers built here from configs


def _llava_with(vision_config, strategy="default", feature_layer=-2):
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=50)
    config = LlavaConfig(vision_config=vision_config, text_config=text, image_token_id=49,
                         vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def _vision_kwargs():
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7)


@pytest.mark.parametrize("tower", ["siglip-head", "siglip-nohead", "dinov2-swiglu", "dinov2-registers",
                                   "clip-multilayer"])
def test_other_llava_towers(tower):
    from transformers import CLIPVisionConfig, Dinov2Config, Dinov2WithRegistersConfig, SiglipVisionConfig

    patches, prefix, strategy, layers = 16, 1, "default", -2
    if tower.startswith("siglip"):
        vc = SiglipVisionConfig(**_vision_kwargs(), intermediate_size=48, vision_use_head=tower == "siglip-head")
        prefix, strategy = 0, "full"
    elif tower == "dinov2-swiglu":
        vc = Dinov2Config(**_vision_kwargs(), mlp_ratio=3, use_swiglu_ffn=True)
    elif tower == "dinov2-registers":
        vc = Dinov2WithRegistersConfig(**_vision_kwargs(), mlp_ratio=2, num_register_tokens=3)
        prefix = 4
    else:
        vc = CLIPVisionConfig(**_vision_kwargs(), intermediate_size=48)
        layers = [-2, -1]
    model = _llava_with(vc, strategy, layers)
    pixel_values = torch.randn(2, 3, 28, 28)  # two images
    # LLaVA's "default" strategy drops only the first token (CLS; DINOv2 registers go through the projector)
    projected = 2 * (patches + prefix - (1 if strategy == "default" else 0))
    measured = count(lambda: model.model.get_image_features(pixel_values))
    formula = vision_flops(model.config, [patches + prefix] * 2) + projector_flops(model.config, projected)
    assert_close(measured, formula)


def _qwen_vl(version: str):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=50,
                bos_token_id=None, eos_token_id=None, pad_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    common = dict(num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    torch.manual_seed(0)
    if version == "2.5":
        vision = dict(depth=4, hidden_size=32, intermediate_size=48, out_hidden_size=64, window_size=112,
                      fullatt_block_indexes=[1, 3], **common)
        return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(vision_config=vision, text_config=text)).eval()
    vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, **common)
    return Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision, text_config=text)).eval()


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_qwen_grids_frames_and_windows(version):
    """Several images / a two-frame video: attention per frame; Qwen2.5-VL: gated MLP and window attention
    (window of 4x4 merged units here; grid 12 x 20 patches = 6 x 10 merged -> windows cut at the edges)."""
    model = _qwen_vl(version)
    grids = [[1, 12, 20], [2, 4, 6], [1, 8, 8]]
    grid_thw = torch.tensor(grids)
    pixel_values = torch.randn(sum(t * h * w for t, h, w in grids), 3 * 2 * 14 * 14)
    measured = count(lambda: model.model.get_image_features(pixel_values, grid_thw))
    formula = vision_flops(model.config, grids)
    assert_close(measured, formula)
    assert vision_flops(model.config, grid_thw) == formula  # tensor rows accepted
    # plain ints: one attention block per image -> over-counts the video (and Qwen2.5's windowed layers)
    assert vision_flops(model.config, [t * h * w for t, h, w in grids]) > formula
    assert vision_flops(model.config, [[1, 12, 20]]) == vision_flops(model.config, [240]) or version == "2.5"
    assert projector_flops(model.config, 10) == 0


def test_unsupported_tower_raises():
    config = SimpleNamespace(model_type="foo", vision_config=SimpleNamespace(model_type="bar"))
    with pytest.raises(NotImplementedError, match="bar"):
        vision_flops(config, [10])
    with pytest.raises(NotImplementedError, match="foo"):
        projector_flops(config, 10)


def test_vision_layer_tokens_for_encoder_pruning():
    """Per-block sequence lengths (FlowCut prunes inside the tower and stops at the feature block)."""
    from vlmeff.flops import vision_flops
    from vlmeff.testing import tiny_llava

    model, _ = tiny_llava("clip")
    cfg = model.config
    depth = cfg.vision_config.num_hidden_layers
    full = vision_flops(cfg, [65])
    assert vision_flops(cfg, [65], layer_tokens=[[65] * depth]) == full
    fewer = vision_flops(cfg, [65], layer_tokens=[[65, 30]])  # two blocks ran, the second on 30 tokens
    one_block = (full - vision_flops(cfg, [65], layer_tokens=[[]])) // depth
    assert fewer == vision_flops(cfg, [65], layer_tokens=[[]]) + one_block + (
        vision_flops(cfg, [30], layer_tokens=[[30]]) - vision_flops(cfg, [30], layer_tokens=[[]]))
    with pytest.raises(ValueError, match="entries for"):
        vision_flops(cfg, [65, 65], layer_tokens=[[65]])


def test_flowcut_stats_count_the_pruned_encoder(loaded):
    import vlmeff
    from conftest import make_image, make_inputs

    model, processor = loaded("llava-clip")
    inputs = make_inputs(processor, ["What is it?"], [[make_image(1)]])
    with vlmeff.wrap(model, processor, "flowcut:keep=8") as vm:
        vm.prepare(**inputs)
    record = vm.last_record[0]
    assert record.num_kept == 8 and record.per_layer_kept
    assert vm.stats.flops["vision"] < vm.stats.flops_vanilla["vision"]


def test_qwen_flowcut_vision_flops_match_flop_counter_on_the_pruned_encoder(loaded):
    """Qwen2-VL (full attention per image): the per-block formula equals FlopCounterMode on the pruned loop."""
    import copy

    from transformers import Qwen2VLForConditionalGeneration

    import vlmeff
    from conftest import make_image, make_inputs
    from vlmeff.flops import vision_flops

    model, processor = loaded("qwen2-vl")
    config = copy.deepcopy(model.config)
    config.vision_config.depth = 5
    deep = Qwen2VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for block in deep.model.visual.blocks:
            block.attn.qkv.weight[: 2 * block.attn.qkv.in_features].mul_(30.0)
            block.attn.qkv.bias[: block.attn.qkv.in_features].add_(1.5)
    inputs = make_inputs(processor, ["What is it?"], [[make_image(3)]])
    with vlmeff.wrap(deep, processor, "flowcut:keep=4,llm_stage=false") as vm:
        flowcut = vm.strategies[0]
        decisions = {}  # block -> what FlowCut kept; replayed below without its scoring FLOPs
        score_and_prune = flowcut.prune_layer
        flowcut.prune_layer = lambda i, *a: decisions.setdefault(i, score_and_prune(i, *a))
        vm.prepare(**inputs)
        flowcut.prune_layer = lambda i, *a: decisions[i]
        counted = count(lambda: vm.connector.encode_reduced(inputs, vm.strategies))
        record, slot = vm.last_record[0], vm.connector.slots(inputs)[0]
        per_block = vm.connector.encoder_layer_tokens(slot, record)
    assert len(set(per_block)) > 2  # pruned progressively
    assert vision_flops(deep.config, [vm.connector.encoder_tokens(slot)], layer_tokens=[per_block]) == counted
    assert vm.stats.flops["vision"] == counted
