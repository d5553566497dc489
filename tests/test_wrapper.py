"""End-to-end invariants of wrap(): exactness, real removal, batching, positions, unwrap."""

from __future__ import annotations

import copy

import pytest
import torch

import vlmeff
from conftest import generate_recording_lengths, greedy, make_image, make_inputs

PROMPTS = ["What is in the image?", "Is there a dog in the image? Answer yes or no.", "Describe the picture."]
PRUNE = {"llava-clip": "fastervlm:keep=9", "llava-dinov2": "fastervlm:keep=9",
         "qwen2-vl": "fastervlm:keep=7,scorer=global_query", "qwen2.5-vl": "fastervlm:keep=7,scorer=global_query"}


@pytest.mark.parametrize("kind", ["llava-clip", "llava-dinov2", "qwen2-vl", "qwen2.5-vl"])
@pytest.mark.parametrize("spec", ["vanilla", "fastervlm:keep=100000"])
def test_keep_everything_is_exactly_the_unwrapped_model(loaded, kind, spec):
    model, processor = loaded(kind)
    if kind.startswith("qwen") and spec.startswith("fastervlm"):
        spec += ",scorer=global_query"
    inputs = make_inputs(processor, PROMPTS[:2], [[make_image(0)], [make_image(1)]])
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    ref_tokens = greedy(model.generate, inputs)
    with vlmeff.wrap(model, processor, spec) as vm:
        assert torch.equal(vm(**inputs).logits, ref_logits)
        assert torch.equal(greedy(vm.generate, inputs), ref_tokens)
        assert vm.stats.visual_tokens_kept == vm.stats.visual_tokens_in


@pytest.mark.parametrize("kind", ["llava-clip", "qwen2-vl", "qwen2.5-vl"])
def test_llm_input_really_shrinks_and_generate_works(loaded, kind):
    model, processor = loaded(kind)
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(3)]])
    out, vm, seen, num_visual = generate_recording_lengths(model, processor, PRUNE[kind], inputs)
    k = vm.last_record[0].num_kept
    assert k == (9 if kind.startswith("llava") else 7)
    assert seen[0] == inputs["input_ids"].shape[1] - num_visual + k  # s + k + text tokens
    assert all(n == 1 for n in seen[1:])  # decode steps
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert vm.stats.visual_tokens_in == num_visual and vm.stats.visual_tokens_kept == k


@pytest.mark.parametrize("positions", ["reindex", "preserve"])
def test_llava_reduced_logits_equal_manual_splice(loaded, positions):
    """Independent splice: embed text, project the kept features, run the language model on inputs_embeds."""
    model, processor = loaded("llava-clip")
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(4)]])
    vm = vlmeff.wrap(model, processor, f"fastervlm:keep=10,positions={positions}")
    logits = vm(**inputs).logits
    kept = vm.last_record[0].kept_indices
    vm.unwrap()
    ids = inputs["input_ids"][0]
    is_img = ids == model.config.image_token_id
    start = int(is_img.nonzero()[0])
    with torch.no_grad():
        hidden = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        feats = model.model.multi_modal_projector(hidden[model.config.vision_feature_layer][:, 1:][:, kept])[0]
        emb = model.model.get_input_embeddings()(ids)
        seq = torch.cat([emb[:start], feats, emb[start + int(is_img.sum()):]])[None]
        n_after = seq.shape[1] - start - kept.numel()
        if positions == "reindex":
            pos = torch.arange(seq.shape[1])
        else:
            pos = torch.cat([torch.arange(start), start + kept, start + int(is_img.sum()) + torch.arange(n_after)])
        hs = model.model.language_model(inputs_embeds=seq, position_ids=pos[None]).last_hidden_state
        expected = model.lm_head(hs)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llava-clip", "qwen2-vl", "qwen2.5-vl"])
def test_batch_equals_one_by_one(loaded, kind):
    model, processor = loaded(kind)
    images = [[make_image(10)], [make_image(11)], [make_image(12)]]
    vm = vlmeff.wrap(model, processor, PRUNE[kind])
    batch = make_inputs(processor, PROMPTS, images)
    out = greedy(vm.generate, batch, n=6)
    batch_records = [r.kept_indices.tolist() for r in vm.last_record]
    width = batch["input_ids"].shape[1]
    for i in range(3):
        single = make_inputs(processor, [PROMPTS[i]], [images[i]])
        one = greedy(vm.generate, single, n=6)
        assert torch.equal(out[i, width:], one[0, single["input_ids"].shape[1]:]), f"sample {i} differs"
        assert vm.last_record[0].kept_indices.tolist() == batch_records[i]
    vm.unwrap()


@pytest.mark.parametrize("kind", ["qwen2-vl", "qwen2.5-vl"])
def test_qwen_mrope_ids_of_kept_tokens_are_gathered_from_unpruned_layout(loaded, kind):
    model, processor = loaded(kind)
    images = [[make_image(20, (60, 50))], [make_image(21, (90, 40)), make_image(22, (40, 70))]]
    inputs = make_inputs(processor, PROMPTS[:2], images)
    full, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                         image_grid_thw=inputs["image_grid_thw"],
                                         attention_mask=inputs["attention_mask"])
    vm = vlmeff.wrap(model, processor, "fastervlm:ratio=0.3,scorer=global_query")
    kw = vm.prepare(**inputs)
    records = vm.last_record
    vm.unwrap()
    assert len(records) == 3
    image_id = model.config.image_token_id
    deltas = []
    for b in range(2):
        ids, mask = inputs["input_ids"][b], inputs["attention_mask"][b].bool()
        keep_pos = [p for p in range(ids.numel()) if mask[p] and ids[p] != image_id]
        for r in (r for r in records if r.sample == b):
            starts = (ids == image_id).nonzero().flatten().tolist()
            spans = [s for s in starts if s == 0 or ids[s - 1] != image_id]
            start = spans[[rr.image for rr in records if rr.sample == b].index(r.image)]
            keep_pos += [start + j for j in r.kept_indices.tolist()]
        keep_pos.sort()
        expected = full[:, b, keep_pos]  # [3, n]
        got_mask = kw["attention_mask"][b].bool()
        got = kw["position_ids"][1:, b][:, got_mask]
        assert torch.equal(got, expected)
        assert torch.equal(kw["position_ids"][0, b][got_mask], torch.arange(len(keep_pos)))  # text row
        assert torch.equal(kw["input_ids"][b][got_mask], ids[keep_pos])
        deltas.append(int(expected.max()) + 1 - len(keep_pos))
    assert model.model.rope_deltas.flatten().tolist() == deltas


def test_several_images_per_prompt_llava(loaded):
    model, processor = loaded("llava-clip")
    images = [[make_image(30), make_image(31)], [make_image(32)]]
    inputs = make_inputs(processor, PROMPTS[:2], images)
    vm = vlmeff.wrap(model, processor, "fastervlm:keep=5")
    out = greedy(vm.generate, inputs, n=3)
    records = vm.last_record
    vm.unwrap()
    assert [(r.sample, r.image, r.num_kept) for r in records] == [(0, 0, 5), (0, 1, 5), (1, 2, 5)]
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    # each image is scored on its own: image 2 alone gives the same selection
    single = make_inputs(processor, PROMPTS[1:2], images[1:])
    vm = vlmeff.wrap(model, processor, "fastervlm:keep=5")
    vm.prepare(**single)
    assert torch.equal(vm.last_record[0].kept_indices, records[2].kept_indices)
    vm.unwrap()


def test_preserve_positions_llava_are_original_ids(loaded):
    model, processor = loaded("llava-clip")
    inputs = make_inputs(processor, PROMPTS[:2], [[make_image(40)], [make_image(41)]])
    vm = vlmeff.wrap(model, processor, "fastervlm:keep=6,positions=preserve")
    kw = vm.prepare(**inputs)
    vm.unwrap()
    orig = inputs["attention_mask"].cumsum(-1) - 1
    for b, record in enumerate(vm.last_record):
        ids, mask = inputs["input_ids"][b], inputs["attention_mask"][b].bool()
        start = int((ids == model.config.image_token_id).nonzero()[0])
        keep = [p for p in range(ids.numel()) if mask[p] and ids[p] != model.config.image_token_id]
        keep = sorted(keep + [start + j for j in record.kept_indices.tolist()])
        got = kw["position_ids"][b][kw["attention_mask"][b].bool()]
        assert torch.equal(got, orig[b, keep])


def test_unwrap_restores_the_model(loaded):
    model, processor = loaded("llava-clip")
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(50)]])
    lm = model.model.language_model
    hooks_before = (dict(lm._forward_hooks), dict(lm._forward_pre_hooks))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(**inputs).logits
    with vlmeff.wrap(model, processor, "fastervlm:keep=4") as vm:
        vm(**inputs)
        assert len(lm._forward_hooks) == len(hooks_before[0]) + 1
    assert (dict(lm._forward_hooks), dict(lm._forward_pre_hooks)) == hooks_before
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


def test_stats_and_records(loaded):
    model, processor = loaded("llava-clip")
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(60)]])
    vm = vlmeff.wrap(model, processor, "fastervlm:ratio=0.25")
    greedy(vm.generate, inputs, n=2)
    s = vm.stats
    assert (s.visual_tokens_in, s.visual_tokens_kept) == (64, 16)
    assert 0 < s.flops["total"] < s.flops_vanilla["total"]
    assert s.flops["vision"] == s.flops_vanilla["vision"]
    assert s.prefill_s > 0 and s.total_s >= s.prefill_s and s.new_tokens == 2
    rec = vm.last_record[0].to_dict()
    assert rec["grid"] == [1, 8, 8] and len(rec["kept_indices"]) == 16 and rec["strategies"] == ["fastervlm"]
    vm.unwrap()


def test_chat_text_only_and_with_image(loaded):
    model, processor = loaded("llava-clip")
    with vlmeff.wrap(model, processor, "fastervlm:keep=8") as vm:
        assert isinstance(vm.chat(make_image(70), "What is this?", max_new_tokens=3), str)
        assert vm.stats.visual_tokens_kept == 8
        assert isinstance(vm.chat(None, "Hello", max_new_tokens=3), str)
        assert vm.stats.visual_tokens_in == 0


def test_forward_sets_prefill_time(loaded):
    model, processor = loaded("llava-clip")
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(5)]])
    with vlmeff.wrap(model, processor, "fastervlm:keep=9") as vm:
        vm(**inputs)
        stats = vm.stats
    assert stats.llm_prefill_s > 0 and stats.prefill_s == stats.encode_s + stats.strategy_s + stats.llm_prefill_s
    assert stats.total_s >= stats.prefill_s * 0.99


@pytest.mark.parametrize("spec", ["vanilla", "fastervlm:keep=16", "flowcut:keep=16", "fastv:keep=16,layer=1",
                                  "atp:points=0,mass=0.6,strides=4",
                                  "aim:iterations=1+aim-prune", "naavit", "pai", "vcd",
                                  "fastervlm:keep=16+fastv:keep=8,layer=1"])
@pytest.mark.parametrize("batched", [False, True], ids=["one", "batch"])
def test_timings_add_up(loaded, spec, batched):
    """prefill (time to first token) never exceeds the whole call, and the in-LLM strategy work is counted once:
    inside the LLM's prefill time, not a second time next to it."""
    model, processor = loaded("llava-clip")
    prompts = ["What is it?", "Describe the picture in detail please."][: 2 if batched else 1]
    inputs = make_inputs(processor, prompts, [[make_image(i)] for i in range(len(prompts))])
    with vlmeff.wrap(model, processor, spec) as vm:
        greedy(vm.generate, inputs, n=3)
        s = vm.stats
    assert 0 < s.prefill_s <= s.total_s
    assert s.prefill_s == pytest.approx(s.encode_s + (s.strategy_s - s.llm_strategy_s) + s.llm_prefill_s)
    assert 0 <= s.llm_strategy_s <= s.llm_prefill_s and s.llm_strategy_s <= s.strategy_s


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events need a CUDA device")
@pytest.mark.parametrize("spec", ["vanilla", "atp:points=0,mass=0.6,strides=4"])
def test_cuda_timings_come_from_events_and_add_up(loaded, spec):
    """On CUDA every time is read from events after the call (vlmeff.timing.Clock), and the identities still hold."""
    from vlmeff.timing import Clock

    model, processor = loaded("llava-clip")
    model = copy.deepcopy(model).cuda()
    inputs = {k: v.cuda() for k, v in make_inputs(processor, PROMPTS[:1], [[make_image(5)]]).items()}
    with vlmeff.wrap(model, processor, spec) as vm:
        assert vm._clock.cuda and isinstance(vm._clock.now(), torch.cuda.Event)
        greedy(vm.generate, inputs, n=3)
        s = vm.stats
    assert Clock("cuda").cuda and not Clock("cpu").cuda
    assert 0 < s.prefill_s <= s.total_s and s.llm_prefill_s > 0
    assert s.prefill_s == pytest.approx(s.encode_s + (s.strategy_s - s.llm_strategy_s) + s.llm_prefill_s)
    assert 0 <= s.llm_strategy_s <= s.llm_prefill_s
