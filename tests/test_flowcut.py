"""FlowCut: pruning inside the vision encoder vs an independent layer-by-layer recomputation, exactness, batching."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import vlmeff
import vlmeff.pruners.vision.flowcut  # noqa: F401  (registers "flowcut")
from conftest import generate_recording_lengths, greedy, make_image, make_inputs
from vlmeff.connectors.llava import LlavaConnector
from vlmeff.strategy import ProbeUnavailableError

PROMPTS = ["What is in the image?", "Is there a dog in the image? Answer yes or no.", "Describe the picture."]


def reference_flowcut(model, pixel_values, keep: int, semantic_scale: bool = False):
    """docs/methods.md "FlowCut" written out plainly: per image, per head, Python loops; P = max over the batch.

    Returns (kept original patch indices per image, patch count after each block).
    """
    vc = model.config.vision_config
    tower = model.model.vision_tower
    clip = vc.model_type == "clip_vision_model"
    layers = tower.encoder.layers if clip else tower.encoder.layer
    feature = model.config.vision_feature_layer % (vc.num_hidden_layers + 1) - 1  # block whose output LLaVA reads
    heads = vc.num_attention_heads
    with torch.no_grad():
        hidden = tower.embeddings(pixel_values)
        if clip:
            hidden = tower.pre_layrnorm(hidden)
        num_images, num_tokens, width = hidden.shape
        head_dim = width // heads
        target = min(keep, num_tokens - 1)
        original = [list(range(num_tokens)) for _ in range(num_images)]  # original position of each current token
        score, counts = None, []
        for block in range(feature + 1):
            layer = layers[block]
            norm, attn = (layer.layer_norm1, layer.self_attn) if clip else (layer.norm1, layer.attention)
            normed = norm(hidden)
            q, k, v = attn.q_proj(normed), attn.k_proj(normed), attn.v_proj(normed)
            out = layer(hidden, None)
            n = hidden.shape[1] - 1
            rpl = (feature - 1) - block
            if n > target and rpl >= 0:
                current, rels = [], []
                for i in range(num_images):
                    rel, sem = torch.zeros(n), torch.zeros(n)
                    for h in range(heads):
                        cols = slice(h * head_dim, (h + 1) * head_dim)
                        rel += torch.softmax(k[i, :, cols] @ q[i, 0, cols] * head_dim**-0.5, 0)[1:] / heads
                        logits = v[i, :, cols] @ v[i, 0, cols]
                        if semantic_scale:
                            logits = logits * head_dim**-0.5
                        sem += torch.softmax(logits, 0)[1:] / heads
                    rel, sem = rel / rel.sum(), sem / sem.sum()
                    value_mean = sum(v[i, :, h * head_dim:(h + 1) * head_dim] for h in range(heads)) / heads
                    dens = value_mean[1:].abs().sum(1)
                    current.append((rel + sem) * dens)
                    rels.append(rel)
                score = current if score is None else [0.5 * s + 0.5 * c for s, c in zip(score, current)]
                if rpl % 2 == 0:
                    if rpl == 0:
                        prune = n - target
                    else:
                        counts_per_image = []
                        for rel in rels:
                            ratio = float(-(rel * torch.log(rel + 1e-7)).sum()) / math.log(n)
                            counts_per_image.append(round((n - target) / math.sqrt(rpl) * (1 - ratio**2)))
                        prune = max(max(counts_per_image), 0)
                    kept = max(n - prune, target)
                    if kept < n:
                        chosen = [sorted(sorted(range(n), key=lambda j: (-float(s[j]), j))[:kept]) for s in score]
                        out = torch.stack([out[i, [0] + [j + 1 for j in chosen[i]]] for i in range(num_images)])
                        score = [s[c] for s, c in zip(score, chosen)]
                        original = [[o[0]] + [o[j + 1] for j in c] for o, c in zip(original, chosen)]
            hidden = out
            counts.append(hidden.shape[1] - 1)
    return [[p - 1 for p in o[1:]] for o in original], counts


@pytest.fixture(scope="module")
def deep_llava(loaded):
    """The tiny CLIP LLaVA with an 8-block tower (feature block 6, FlowCut prunes after blocks 1, 3 and 5) and
    sharpened q/k so that [CLS] attention is far from uniform and the entropy schedule prunes at every step."""
    model, processor = loaded("llava-clip")
    config = copy.deepcopy(model.config)
    config.vision_config.num_hidden_layers = 8
    torch.manual_seed(3)
    deep = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for layer in deep.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(12.0)
            layer.self_attn.k_proj.weight.mul_(12.0)
    return deep, processor


@pytest.mark.parametrize("kind", ["llava-clip", "llava-dinov2", "deep"])
@pytest.mark.parametrize("keep", [1, 9, 30])
def test_kept_indices_match_independent_recomputation_batch_max(loaded, deep_llava, kind, keep):
    """Batch of 3 images: the batch path equals the plain recomputation with P = max over the batch."""
    model, processor = deep_llava if kind == "deep" else loaded(kind)
    inputs = make_inputs(processor, PROMPTS, [[make_image(1)], [make_image(2)], [make_image(3)]])
    vm = vlmeff.wrap(model, processor, f"flowcut:keep={keep}")
    vm.prepare(**inputs)
    vm.unwrap()
    expected, counts = reference_flowcut(model, inputs["pixel_values"], keep)
    assert [r.kept_indices.tolist() for r in vm.last_record] == expected
    assert all(r.per_layer_kept == dict(enumerate(counts)) for r in vm.last_record)
    assert counts[-1] == keep
    if kind == "deep" and keep < 30:
        assert len(set(counts)) > 2  # progressive: more than one pruning step before the feature block


def test_semantic_scale_option(deep_llava):
    model, processor = deep_llava
    inputs = make_inputs(processor, PROMPTS[:2], [[make_image(4)], [make_image(5)]])
    vm = vlmeff.wrap(model, processor, "flowcut:keep=9,semantic_scale=true")
    vm.prepare(**inputs)
    vm.unwrap()
    expected, _ = reference_flowcut(model, inputs["pixel_values"], 9, semantic_scale=True)
    assert [r.kept_indices.tolist() for r in vm.last_record] == expected


@pytest.mark.parametrize("kind", ["llava-clip", "llava-dinov2"])
def test_keep_everything_is_exactly_the_unwrapped_model(loaded, kind):
    model, processor = loaded(kind)
    inputs = make_inputs(processor, PROMPTS[:2], [[make_image(0)], [make_image(1)]])
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    ref_tokens = greedy(model.generate, inputs)
    with vlmeff.wrap(model, processor, "flowcut:keep=100000") as vm:
        assert torch.equal(vm(**inputs).logits, ref_logits)
        assert torch.equal(greedy(vm.generate, inputs), ref_tokens)
        assert vm.stats.visual_tokens_kept == vm.stats.visual_tokens_in


@pytest.mark.parametrize("kind", ["llava-clip", "llava-dinov2"])
def test_explicit_block_loop_keeping_everything_equals_stock_tower(loaded, kind):
    model, processor = loaded(kind)
    inputs = make_inputs(processor, PROMPTS[:2], [[make_image(6)], [make_image(7)]])
    vm = vlmeff.wrap(model, processor, "flowcut:ratio=1.0")
    stock, _ = vm.connector.encode(inputs)
    looped, indices, _ = vm.connector.encode_reduced(inputs, vm.strategies)
    vm.unwrap()
    for a, b, index in zip(stock, looped, indices):
        assert torch.equal(a, b)
        assert index.tolist() == list(range(a.shape[0]))


def test_without_vision_strategies_the_stock_tower_call_is_used(loaded, monkeypatch):
    model, processor = loaded("llava-clip")
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(8)]])

    def refuse(*args, **kwargs):
        raise AssertionError("explicit block loop used without vision-stage strategies")

    monkeypatch.setattr(LlavaConnector, "encode_reduced", refuse)
    for spec in ("vanilla", "fastervlm:keep=9"):
        with vlmeff.wrap(model, processor, spec) as vm:
            vm.prepare(**inputs)


def test_llm_input_shrinks_to_text_plus_target_and_generate_works(loaded):
    model, processor = loaded("llava-clip")
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(9)]])
    out, vm, seen, num_visual = generate_recording_lengths(model, processor, "flowcut:keep=9", inputs)
    assert vm.last_record[0].num_kept == 9 and vm.last_record[0].strategies == ["flowcut"]
    assert seen[0] == inputs["input_ids"].shape[1] - num_visual + 9
    assert all(n == 1 for n in seen[1:])
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert vm.stats.visual_tokens_kept == 9


def test_ratio_budget(loaded):
    model, processor = loaded("llava-dinov2")
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(10)]])
    with vlmeff.wrap(model, processor, "flowcut:ratio=0.25") as vm:
        vm.prepare(**inputs)
        assert vm.last_record[0].num_kept == round(vm.last_record[0].num_tokens * 0.25)


def test_probe_strategies_cannot_follow_a_vision_stage_reduction(loaded):
    model, processor = loaded("llava-clip")
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(11)]])
    with vlmeff.wrap(model, processor, "flowcut:keep=20+fastervlm:keep=9") as vm:
        with pytest.raises(ProbeUnavailableError, match="fastervlm cannot follow a vision-stage reduction"):
            vm.prepare(**inputs)
