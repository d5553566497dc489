"""FlowCut on Qwen2-VL / Qwen2.5-VL: global-token score pruned by 2x2 merge groups inside the vision encoder."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration
from transformers.vision_utils import get_vision_position_ids

import vlmeff
import vlmeff.pruners.vision.flowcut  # noqa: F401  (registers "flowcut")
from conftest import generate_recording_lengths, greedy, make_image, make_inputs

PROMPTS = ["What is in the image?", "Is there a dog? Answer yes or no.", "Describe the picture."]


def rotate(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_qwen_flowcut(model, pixel_rows, grid, keep):
    """docs/methods.md "FlowCut" (Qwen2-VL ViT) for ONE image, written out plainly (per-head loops, full attention).

    Returns (kept group indices in raster order, merged features of the kept groups, groups after each block).
    """
    visual = model.model.visual
    unit = visual.spatial_merge_size ** 2
    with torch.no_grad():
        hidden = visual.patch_embed(pixel_rows)
        cos, sin = visual.rotary_pos_emb(hidden, get_vision_position_ids(grid[None], visual.spatial_merge_size))
        groups = list(range(hidden.shape[0] // unit))
        target = min(keep, len(groups))
        depth = len(visual.blocks)
        score, counts = None, []
        for index, block in enumerate(visual.blocks):
            n = hidden.shape[0]
            heads = block.attn.num_heads
            qkv = block.attn.qkv(block.norm1(hidden)).view(n, 3, heads, -1)
            q, k, v = qkv[:, 0].float(), qkv[:, 1].float(), qkv[:, 2].float()
            c, s = cos[:, None].float(), sin[:, None].float()
            q, k = q * c + rotate(q) * s, k * c + rotate(k) * s
            out = block(hidden, cu_seqlens=torch.tensor([0, n], dtype=torch.int32), position_embeddings=(cos, sin))
            rpl = depth - 1 - index
            num = n // unit
            if num > target:
                rel = torch.zeros(n)
                for h in range(heads):
                    rel += torch.softmax(k[:, h] @ q[:, h].mean(0) / math.sqrt(q.shape[-1]), 0) / heads
                dens = v.mean(1).abs().sum(-1)
                current = torch.tensor([float((rel * dens)[g * unit:(g + 1) * unit].mean()) for g in range(num)])
                rel_group = torch.tensor([float(rel[g * unit:(g + 1) * unit].sum()) for g in range(num)])
                score = current if score is None else 0.5 * score + 0.5 * current
                if rpl % 2 == 0:
                    if rpl == 0:
                        prune = num - target
                    else:
                        ratio = float(-(rel_group * torch.log(rel_group + 1e-7)).sum()) / math.log(num)
                        prune = max(int(torch.round(torch.tensor((num - target) / math.sqrt(rpl)
                                                                 * (1 - ratio ** 2)))), 0)
                    kept = max(num - prune, target)
                    if kept < num:
                        chosen = sorted(sorted(range(num), key=lambda j: (-float(score[j]), j))[:kept])
                        rows = [g * unit + r for g in chosen for r in range(unit)]
                        out, cos, sin = out[rows], cos[rows], sin[rows]
                        score = score[chosen]
                        groups = [groups[j] for j in chosen]
            hidden = out
            counts.append(hidden.shape[0] // unit)
        merged = visual.merger(hidden)
    return groups, merged, counts


@pytest.fixture(scope="module")
def deep_qwen(loaded):
    """The tiny Qwen2-VL with a 7-block tower (prunes after blocks 0, 2, 4 and 6) and sharpened q/k."""
    model, processor = loaded("qwen2-vl")
    config = copy.deepcopy(model.config)
    config.vision_config.depth = 7
    torch.manual_seed(5)
    deep = Qwen2VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for block in deep.model.visual.blocks:
            block.attn.qkv.weight[: 2 * block.attn.qkv.in_features].mul_(30.0)  # q and k rows
            block.attn.qkv.bias[: block.attn.qkv.in_features].add_(1.5)  # a non-zero mean query
    return deep, processor


def image_rows(inputs, image):
    sizes = inputs["image_grid_thw"].prod(-1).tolist()
    return inputs["pixel_values"].split(sizes)[image]


@pytest.mark.parametrize("kind", ["qwen2-vl", "deep"])
@pytest.mark.parametrize("keep", [1, 7, 20])
def test_kept_groups_and_features_match_independent_per_image_recomputation(loaded, deep_qwen, kind, keep):
    model, processor = deep_qwen if kind == "deep" else loaded(kind)
    images = [[make_image(1)], [make_image(2, size=(90, 40))], [make_image(3)]]
    inputs = make_inputs(processor, PROMPTS, images)
    vm = vlmeff.wrap(model, processor, f"flowcut:keep={keep},llm_stage=false")
    vm.prepare(**inputs)
    vm.unwrap()
    for i, record in enumerate(vm.last_record):
        grid = inputs["image_grid_thw"][i]
        groups, merged, counts = reference_qwen_flowcut(model, image_rows(inputs, i), grid, keep)
        assert record.kept_indices.tolist() == groups
        assert record.per_layer_kept == dict(enumerate(counts))
        assert counts[-1] == min(keep, record.num_tokens)
        features, _, _ = vm.connector.encode_reduced(inputs, vm.strategies)
        torch.testing.assert_close(features[i], merged, rtol=1e-5, atol=1e-5)
    if kind == "deep" and keep < 20:
        assert len(set(vm.last_record[0].per_layer_kept.values())) > 2  # progressive, not one cut


@pytest.mark.parametrize("kind", ["qwen2-vl", "qwen2.5-vl"])
def test_explicit_block_loop_keeping_everything_equals_stock_tower(loaded, kind):
    model, processor = loaded(kind)
    inputs = make_inputs(processor, PROMPTS[:2], [[make_image(6)], [make_image(7, size=(90, 40))]])
    vm = vlmeff.wrap(model, processor, "flowcut:ratio=1.0,llm_stage=false")
    stock, _ = vm.connector.encode(inputs)
    looped, indices, _ = vm.connector.encode_reduced(inputs, vm.strategies)
    vm.unwrap()
    for a, b, index in zip(stock, looped, indices):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert index.tolist() == list(range(a.shape[0]))


@pytest.mark.parametrize("kind", ["qwen2-vl", "qwen2.5-vl"])
def test_keep_everything_is_exactly_the_unwrapped_model(loaded, kind):
    model, processor = loaded(kind)
    inputs = make_inputs(processor, PROMPTS[:2], [[make_image(0)], [make_image(1)]])
    ref_tokens = greedy(model.generate, inputs)
    with vlmeff.wrap(model, processor, "flowcut:keep=100000,llm_stage=false") as vm:
        assert torch.equal(greedy(vm.generate, inputs), ref_tokens)
        assert vm.stats.visual_tokens_kept == vm.stats.visual_tokens_in


@pytest.mark.parametrize("kind", ["qwen2-vl", "qwen2.5-vl"])
def test_batch_equals_per_image(loaded, kind):
    """Counts are per image on Qwen (no batch max), so each image's selection ignores its batch mates."""
    model, processor = loaded(kind)
    images = [[make_image(11)], [make_image(12, size=(90, 40))], [make_image(13)]]
    batch = make_inputs(processor, PROMPTS, images)
    with vlmeff.wrap(model, processor, "flowcut:keep=5,llm_stage=false") as vm:
        vm.prepare(**batch)
        batched = [r.kept_indices.tolist() for r in vm.last_record]
        singles = []
        for prompt, imgs in zip(PROMPTS, images):
            vm.prepare(**make_inputs(processor, [prompt], [imgs]))
            singles.append(vm.last_record[0].kept_indices.tolist())
    assert batched == singles
    assert all(len(k) == 5 for k in batched)


@pytest.mark.parametrize("kind", ["qwen2-vl", "qwen2.5-vl"])
def test_mrope_ids_of_kept_groups_and_generate(loaded, kind):
    """The LLM sees text + the kept groups, and the kept tokens carry the (t, h, w) ids of their grid cells."""
    model, processor = loaded(kind)
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(9)]])
    vm = vlmeff.wrap(model, processor, "flowcut:keep=6,llm_stage=false")
    kwargs = vm.prepare(**inputs)
    record = vm.last_record[0]
    full, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                         image_grid_thw=inputs["image_grid_thw"],
                                         attention_mask=inputs["attention_mask"])
    start = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    new_start = int((kwargs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    expected = full[:, 0, start + record.kept_indices]  # [3, 6]
    assert torch.equal(kwargs["position_ids"][1:, 0, new_start:new_start + 6], expected)
    vm.unwrap()
    out, vm, seen, num_visual = generate_recording_lengths(model, processor, "flowcut:keep=6,llm_stage=false", inputs)
    assert seen[0] == inputs["input_ids"].shape[1] - num_visual + 6
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert vm.stats.flops["vision"] < vm.stats.flops_vanilla["vision"]


def test_two_stage_flowcut_on_qwen_matches_an_independent_llm_score(loaded):
    """Default on Qwen2-VL: the encoder keeps 2T groups, decoder layer 1's (rel + sem) x dens keeps T."""
    from test_llm_stage import deepen
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

    model, processor = loaded("qwen2-vl")
    deep = deepen(model, seed=2)
    inputs = make_inputs(processor, PROMPTS[:2], [[make_image(20)], [make_image(21, size=(90, 40))]])
    vm = vlmeff.wrap(deep, processor, "flowcut:keep=5")
    assert [s.name for s in vm.strategies] == ["flowcut", "flowcut-llm"]
    assert vm.strategies[0].keep == 10 and vm.strategies[1].keep == 5
    vm(**inputs)
    records = vm.last_record
    llm_inputs = vm.prepare(**inputs)
    vm.unwrap()
    captured = {}

    def grab(module, args, kwargs):
        captured.update(hidden=args[0] if args else kwargs["hidden_states"], cos_sin=kwargs["position_embeddings"],
                        mask=kwargs["attention_mask"])

    layer = deep.model.language_model.layers[1]
    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        deep(**llm_inputs)
    handle.remove()
    attn = layer.self_attn
    with torch.no_grad():
        x = layer.input_layernorm(captured["hidden"])
        b, s, _ = x.shape
        q = attn.q_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *captured["cos_sin"])
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1).float(), v.repeat_interleave(groups, 1).float()
    for row, record in enumerate(records):
        assert record.num_kept == 10
        visual = (llm_inputs["input_ids"][row] == deep.config.image_token_id).nonzero().squeeze(1)
        last = int(llm_inputs["attention_mask"][row].nonzero().max())
        d = q.shape[-1]
        rel = sum(torch.softmax(k[row, h, visual] @ q[row, h, last].float() / d ** 0.5, 0)
                  for h in range(q.shape[1])) / q.shape[1]
        sem = sum(torch.softmax(v[row, h, visual] @ v[row, h, last] / d ** 0.5, 0) for h in range(q.shape[1])) / q.shape[1]
        dens = v[row, :, visual].mean(0).abs().sum(-1)
        score = (rel + sem) * dens
        chosen = sorted(sorted(range(visual.numel()), key=lambda j: (-float(score[j]), j))[:5])
        assert record.llm_kept[2].tolist() == record.kept_indices[chosen].tolist()
