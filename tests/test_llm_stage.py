"""In-LLM removal (vlmeff.llm_stage) with FastV: real removal, cache consistency, batching, multi-image, Qwen."""

from __future__ import annotations

import copy

import pytest
import torch

import vlmeff
from conftest import greedy, make_image, make_inputs
from vlmeff.strategy import NotApplicableError, StrategyError

PROMPTS = ["What is in the image?", "Is there a dog in the image? Answer yes or no, please.", "Describe it."]
DEPTH = 6


def deepen(model, depth=DEPTH, seed=0, attn="sdpa"):
    """The same tiny VLM with a `depth`-layer LLM (random weights), so that removal after layer K leaves layers."""
    config = copy.deepcopy(model.config)
    config.text_config.num_hidden_layers = depth
    if getattr(config.text_config, "layer_types", None) is not None:
        config.text_config.layer_types = ["full_attention"] * depth
    config._attn_implementation = attn
    config.text_config._attn_implementation = attn
    torch.manual_seed(seed)
    return type(model)(config).eval()


@pytest.fixture(scope="module")
def llava(loaded):
    model, processor = loaded("llava-clip")
    return deepen(model), processor


@pytest.fixture(scope="module")
def qwen(loaded):
    model, processor = loaded("qwen2-vl")
    return deepen(model), processor


def layer_lengths(model):
    """Record the sequence length entering every decoder layer at every call: {layer: [len per call]}."""
    seen: dict[int, list[int]] = {}
    handles = []
    for i, layer in enumerate(model.model.language_model.layers):
        def hook(m, args, kwargs, i=i):
            seen.setdefault(i, []).append((args[0] if args else kwargs["hidden_states"]).shape[1])
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def reference_fastv_cells(model, inputs, layer, keep):
    """docs/methods.md FastV recomputed with an eager copy of the model and output_attentions: per sample, the attention
    of its last token in layer K-1 over its visual tokens, mean over heads, top-k by (-score, position)."""
    eager = deepen(model, attn="eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True)
    attn = out.attentions[layer - 1]  # [B, H, S, S]
    cells = []
    for row in range(inputs["input_ids"].shape[0]):
        visual = (inputs["input_ids"][row] == model.config.image_token_id).nonzero().squeeze(1).tolist()
        last = int(inputs["attention_mask"][row].nonzero().max())
        score = attn[row, :, last].mean(0)
        ranked = sorted(range(len(visual)), key=lambda j: (-float(score[visual[j]]), j))[:keep]
        cells.append(sorted(ranked))
    return cells


def test_fastv_selection_matches_eager_recomputation_per_sample(llava):
    model, processor = llava
    inputs = make_inputs(processor, PROMPTS, [[make_image(1)], [make_image(2)], [make_image(3)]])
    with vlmeff.wrap(model, processor, "fastv:layer=3,keep=12") as vm:
        vm(**inputs)
    expected = reference_fastv_cells(model, inputs, 3, 12)
    assert [r.llm_kept[3].tolist() for r in vm.last_record] == expected
    assert len({tuple(c) for c in expected}) == 3  # samples differ: a batch-0-for-everyone bug would fail


def test_keep_everything_reproduces_the_unwrapped_model(llava):
    model, processor = llava
    inputs = make_inputs(processor, PROMPTS[:2], [[make_image(0)], [make_image(1)]])
    with torch.no_grad():
        ref = model(**inputs).logits
    tokens = greedy(model.generate, inputs)
    with vlmeff.wrap(model, processor, "fastv:ratio=1.0") as vm:
        assert torch.equal(vm(**inputs).logits, ref)
        assert torch.equal(greedy(vm.generate, inputs), tokens)
    assert model.config.text_config._attn_implementation == "sdpa"  # restored


def test_removal_is_real_in_prefill_and_in_every_cache(llava):
    """Layers >= K see fewer tokens in prefill; in decode their caches are shorter than those of layers < K."""
    model, processor = llava
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(4)]])
    num_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    seen, handles = layer_lengths(model)
    caches = []
    try:
        with vlmeff.wrap(model, processor, "fastv:layer=2,keep=5") as vm:
            out = vm.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
            caches = [layer.get_seq_length() for layer in out.past_key_values.layers]
    finally:
        for h in handles:
            h.remove()
    full = inputs["input_ids"].shape[1]
    assert [seen[i][0] for i in range(DEPTH)] == [full] * 2 + [full - num_visual + 5] * (DEPTH - 2)
    assert all(seen[i][1:] == [1, 1] for i in range(DEPTH))
    assert caches == [full + 2] * 2 + [full - num_visual + 5 + 2] * (DEPTH - 2)
    assert vm.stats.equivalent_tokens == pytest.approx((2 * num_visual + (DEPTH - 2) * 5) / DEPTH)


def manual_greedy(model, inputs, layer, removed, steps):
    """No-cache reference: every step recomputes the whole sequence; layers < K see everything, layers >= K the
    sequence without the `removed` positions (per row), with original positions. Returns (tokens, first logits)."""
    lm = model.model.language_model
    captured = {}
    handle = lm.register_forward_pre_hook(lambda m, a, kw: captured.update(embeds=kw["inputs_embeds"]),
                                          with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    embeds, mask = captured["embeds"], inputs["attention_mask"].bool()
    tokens, first = [], None
    for _ in range(steps):
        with torch.no_grad():
            hidden = embeds
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            keep = mask.clone()
            for row, drop in enumerate(removed):
                keep[row, drop] = False
            for i, block in enumerate(lm.layers):
                if i == layer:  # drop, left-pad again
                    lengths = keep.sum(1)
                    width = int(lengths.max())
                    new_h = hidden.new_zeros(hidden.shape[0], width, hidden.shape[2])
                    new_p = positions.new_zeros(hidden.shape[0], width)
                    new_m = torch.zeros(hidden.shape[0], width, dtype=torch.bool)
                    for row in range(hidden.shape[0]):
                        idx = keep[row].nonzero().squeeze(1)
                        new_h[row, width - idx.numel():] = hidden[row, idx]
                        new_p[row, width - idx.numel():] = positions[row, idx]
                        new_m[row, width - idx.numel():] = True
                    hidden, positions, valid = new_h, new_p, new_m
                elif i == 0:
                    valid = mask
                n = hidden.shape[1]
                allowed = torch.ones(n, n, dtype=torch.bool).tril()[None] & valid[:, None, :]
                allowed |= torch.eye(n, dtype=torch.bool)[None]
                cos_sin = lm.rotary_emb(hidden, positions)
                hidden = block(hidden, attention_mask=allowed[:, None], position_embeddings=cos_sin,
                               position_ids=positions)
            logits = model.lm_head(lm.norm(hidden[:, -1]))
        first = logits if first is None else first
        token = logits.argmax(-1)
        tokens.append(token)
        embeds = torch.cat([embeds, lm.embed_tokens(token)[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=torch.bool)], dim=1)
    return torch.stack(tokens, 1), first


@pytest.mark.parametrize("layer,keep", [(2, 5), (4, 17)])
def test_prefill_with_removal_then_decode_equals_no_cache_reference(llava, layer, keep):
    """Cache consistency: ragged batch (different prompt lengths), removal after layer K, 6 greedy steps."""
    model, processor = llava
    inputs = make_inputs(processor, PROMPTS[:2], [[make_image(5)], [make_image(6)]])
    with vlmeff.wrap(model, processor, f"fastv:layer={layer},keep={keep}") as vm:
        out = vm.generate(**inputs, max_new_tokens=6, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)
    removed = []
    for row, record in enumerate(vm.last_record):
        visual = (inputs["input_ids"][row] == model.config.image_token_id).nonzero().squeeze(1)
        dropped = sorted(set(range(visual.numel())) - set(record.llm_kept[layer].tolist()))
        removed.append(visual[dropped])
    tokens, first = manual_greedy(model, inputs, layer, removed, steps=6)
    assert torch.equal(out.sequences[:, inputs["input_ids"].shape[1]:], tokens)
    torch.testing.assert_close(out.scores[0], first, rtol=1e-4, atol=1e-4)


def test_batch_equals_per_sample_and_ragged_counts(llava):
    model, processor = llava
    images = [[make_image(7)], [make_image(8), make_image(9)], [make_image(10)]]
    inputs = make_inputs(processor, PROMPTS, images)
    with vlmeff.wrap(model, processor, "fastv:layer=2,ratio=0.25") as vm:
        batched_tokens = greedy(vm.generate, inputs, n=4)
        batched = [r.llm_kept[2].tolist() for r in vm.last_record]
        single, single_tokens = [], []
        for prompt, imgs in zip(PROMPTS, images):
            one = make_inputs(processor, [prompt], [imgs])
            single_tokens.append(greedy(vm.generate, one, n=4)[0, -4:])
            single += [r.llm_kept[2].tolist() for r in vm.last_record]
    assert batched == single
    per_sample = [len(batched[0]), len(batched[1]) + len(batched[2]), len(batched[3])]
    visual = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert per_sample == [round(v * 0.25) for v in visual]  # two images: one budget over both (ragged)
    assert torch.equal(batched_tokens[:, -4:], torch.stack(single_tokens))


def test_composes_with_a_pre_llm_pruner_and_flops_follow_the_layers(llava):
    from vlmeff.flops import llm_prefill_flops

    model, processor = llava
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(11)]])
    seen, handles = layer_lengths(model)
    try:
        with vlmeff.wrap(model, processor, "fastervlm:keep=20+fastv:layer=3,keep=6") as vm:
            vm(**inputs)
    finally:
        for h in handles:
            h.remove()
    lengths = [seen[i][0] for i in range(DEPTH)]
    text = inputs["input_ids"].shape[1] - int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert lengths == [text + 20] * 3 + [text + 6] * 3
    assert vm.last_record[0].num_kept == 20 and vm.last_record[0].llm_kept[3].numel() == 6
    assert set(vm.last_record[0].llm_kept[3].tolist()) <= set(vm.last_record[0].kept_indices.tolist())
    assert vm.stats.flops["llm"] == llm_prefill_flops(model.config.text_config, lengths)


def test_qwen2_vl_generate_with_mrope_and_keep_everything(qwen):
    model, processor = qwen
    inputs = make_inputs(processor, PROMPTS[:2], [[make_image(12)], [make_image(13, size=(90, 40))]])
    tokens = greedy(model.generate, inputs)
    with vlmeff.wrap(model, processor, "fastv:ratio=1.0") as vm:
        assert torch.equal(greedy(vm.generate, inputs), tokens)
    seen, handles = layer_lengths(model)
    try:
        with vlmeff.wrap(model, processor, "fastv:layer=2,keep=4") as vm:
            out = greedy(vm.generate, inputs, n=4)
    finally:
        for h in handles:
            h.remove()
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert seen[2][0] < seen[1][0] and all(r.llm_kept[2].numel() == 4 for r in vm.last_record)


def test_errors(llava, loaded):
    model, processor = llava
    with pytest.raises(StrategyError, match="original positions"):
        vlmeff.wrap(model, processor, "fastv:positions=reindex")
    with pytest.raises(StrategyError, match="fastv.layer=0"):
        vlmeff.wrap(model, processor, "fastv:layer=0")
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(14)]])
    with vlmeff.wrap(model, processor, f"fastv:layer={DEPTH}") as vm, pytest.raises(NotApplicableError,
                                                                                    match="outside"):
        vm(**inputs)
    flash = deepen(model)
    flash.config.text_config._attn_implementation = "flash_attention_2"  # takes no custom masks: refused
    with vlmeff.wrap(flash, processor, "fastv") as vm, pytest.raises(NotApplicableError, match="sdpa"):
        vm(**inputs)


def test_eager_backend_equals_sdpa(llava):
    """The router runs eager attention too (its own model file's function, boolean masks made additive): the same
    kept tokens and logits as under sdpa, for a ragged batch."""
    model, processor = llava
    eager = deepen(model, attn="eager")
    eager.load_state_dict(model.state_dict())
    inputs = make_inputs(processor, PROMPTS[:2], [[make_image(14)], [make_image(15)]])
    out = {}
    for name, m in (("sdpa", model), ("eager", eager)):
        with vlmeff.wrap(m, processor, "fastv:ratio=0.5") as vm:
            out[name] = (vm(**inputs).logits[:, -1], [r.llm_kept for r in vm.last_record])
    torch.testing.assert_close(out["eager"][0], out["sdpa"][0], rtol=1e-4, atol=1e-4)
    for a, b in zip(out["eager"][1], out["sdpa"][1]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
