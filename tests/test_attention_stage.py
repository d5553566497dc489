"""Attention-stage strategies (naavit, mma, cca, pai, paint) through the router and the token layout.

Masks are checked against dense boolean matrices written with plain loops from the docs/methods.md predicates; prefills
against the stock eager model given that dense mask and those positions; CCA's prefill and decode positions against
the formula; PAI's boost against a hand-computed edit of the pre-softmax row."""

from __future__ import annotations

import math

import pytest
import torch
from test_llm_stage import deepen

import vlmeff
from conftest import make_image, make_inputs
from vlmeff.router import AttentionInputs, Router
from vlmeff.strategy import NotApplicableError

PROMPTS = ["What is in the image?", "Is there a dog in the image? Answer yes or no, please."]


@pytest.fixture(scope="module")
def llava(loaded):
    model, processor = loaded("llava-clip")
    return deepen(model), processor


def batch(processor):
    return make_inputs(processor, PROMPTS, [[make_image(21)], [make_image(22)]])  # ragged: left padding


def prepared(model, processor, spec, inputs):
    vm = vlmeff.wrap(model, processor, spec)
    kwargs = vm.prepare(**inputs)
    return vm, kwargs, vm._session


def rows_of(kwargs, image_id, grid_w):
    """Per row: list of (kind, cell) from the LLM input, by plain iteration ('t' text, 'v' visual, 'p' pad)."""
    out = []
    for ids, mask in zip(kwargs["input_ids"].tolist(), kwargs["attention_mask"].tolist()):
        row, cell = [], 0
        for tok, m in zip(ids, mask):
            if not m:
                row.append(("p", -1))
            elif tok == image_id:
                row.append(("v", cell))
                cell += 1
            else:
                row.append(("t", -1))
        out.append(row)
    return out


def dense(rows, allowed):
    """[B, 1, S, S] bool from allowed(row, q, k) over real keys; padding rows see themselves only."""
    masks = []
    for b, row in enumerate(rows):
        n = len(row)
        m = torch.zeros(n, n, dtype=torch.bool)
        for q in range(n):
            for k in range(n):
                if row[q][0] == "p":
                    m[q, k] = q == k
                elif row[k][0] != "p":
                    m[q, k] = allowed(b, q, k)
        masks.append(m)
    return torch.stack(masks)[:, None]


def ring(cell, h, w):
    r, c = divmod(cell, w)
    return min(r, c, h - 1 - r, w - 1 - c)


def test_naavit_mask_equals_dense_loop(llava):
    model, processor = llava
    inputs = batch(processor)
    vm, kwargs, session = prepared(model, processor, "naavit", inputs)
    rows = rows_of(kwargs, model.config.image_token_id, session.layout0.grids[0][2])

    def allowed(b, q, k):
        if rows[b][q][0] == "v" and rows[b][k][0] == "v":
            return q == k
        return k <= q

    assert torch.equal(session.mask_of(session.layout0), dense(rows, allowed))


def test_mma_mask_includes_the_assistant_opener(llava):
    model, processor = llava
    inputs = batch(processor)
    vm, kwargs, session = prepared(model, processor, "mma", inputs)
    opener = vm.connector.answer_opener_ids()
    assert opener, "the tiny LLaVA chat template has an assistant turn"
    rows = rows_of(kwargs, model.config.image_token_id, 0)
    ends = []
    for ids in kwargs["input_ids"].tolist():  # last occurrence of the opener sequence, by plain search
        hits = [i for i in range(len(ids) - len(opener) + 1) if ids[i:i + len(opener)] == opener]
        ends.append(hits[-1])

    def allowed(b, q, k):
        return k <= q or (rows[b][q][0] == "v" and rows[b][k][0] == "t" and q < k <= ends[b])

    mask = session.mask_of(session.layout0)
    assert torch.equal(mask, dense(rows, allowed))
    first_visual = [r.index(next(x for x in r if x[0] == "v")) for r in rows]
    for b in range(len(rows)):
        assert mask[b, 0, first_visual[b], ends[b]] and not mask[b, 0, first_visual[b], ends[b] + 1]


def test_mma_without_assistant_turn_is_the_unwrapped_model(llava):
    model, processor = llava
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(3)]])
    with torch.no_grad():
        reference = model(**inputs).logits
    with vlmeff.wrap(model, None, "mma") as vm:  # no processor: no chat template, no opener -> plain causal
        assert torch.equal(vm(**inputs).logits, reference)


def test_cca_positions_and_mask_equal_the_formula(llava):
    model, processor = llava
    inputs = batch(processor)
    vm, kwargs, session = prepared(model, processor, "cca", inputs)
    _, h, w = session.layout0.grids[0]
    rows = rows_of(kwargs, model.config.image_token_id, w)
    expected = []
    for row in rows:  # text +1, image tokens start + ring, text after the image at start + ceil(min(h, w) / 2)
        pos, start, out, in_image = 0, None, [], False
        for kind, cell in row:
            if kind == "p":
                out.append(0)
                continue
            if kind == "v":
                if not in_image:
                    start, in_image = pos, True
                out.append(start + ring(cell, h, w))
                continue
            if in_image:
                pos, in_image = start + math.ceil(min(h, w) / 2), False
            out.append(pos)
            pos += 1
        expected.append(out)
    assert kwargs["position_ids"].tolist() == expected

    def allowed(b, q, k):
        if rows[b][q][0] == "v" and rows[b][k][0] == "v":
            return ring(rows[b][k][1], h, w) <= ring(rows[b][q][1], h, w)
        return k <= q

    assert torch.equal(session.mask_of(session.layout0), dense(rows, allowed))


def test_cca_decode_keeps_the_delta(llava):
    model, processor = llava
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(4)]])
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True)
    try:
        with vlmeff.wrap(model, processor, "cca") as vm:
            vm.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    last = int(seen[0][0, -1])
    assert [int(p[0, -1]) for p in seen[1:]] == [last + 1, last + 2]
    assert last < inputs["input_ids"].shape[1] - 1  # the prompt was folded: the delta is carried on


@pytest.mark.parametrize("spec", ["naavit", "mma", "cca", "fastervlm:keep=5+cca", "fastervlm:keep=5+naavit"])
def test_prefill_equals_eager_model_given_the_dense_mask(llava, spec):
    """The wrapped prefill = the stock eager model fed the session's (dense-checked) mask and positions."""
    model, processor = llava
    inputs = batch(processor)
    vm, kwargs, session = prepared(model, processor, spec, inputs)
    with torch.no_grad():
        ours = vm(**inputs).logits
    eager = deepen(model, attn="eager")
    eager.load_state_dict(model.state_dict())
    mask = session.mask_of(session.layout0)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    captured = {}

    def install(module, args, kw):  # the same inputs_embeds, with the 4-D mask given to the language model
        kw["attention_mask"] = additive
        captured["ok"] = True
        return args, kw

    handle = eager.model.language_model.register_forward_pre_hook(install, with_kwargs=True)
    try:
        with torch.no_grad():
            reference = eager(**kwargs).logits
    finally:
        handle.remove()
    assert captured["ok"]
    valid = kwargs["attention_mask"].bool()
    torch.testing.assert_close(ours[valid], reference[valid], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", ["naavit", "cca", "pai", "paint", "fastv+naavit", "fastervlm:keep=6+mma+pai"])
def test_batch_equals_one_by_one(llava, spec):
    model, processor = llava
    inputs = batch(processor)
    with vlmeff.wrap(model, processor, spec) as vm:
        together = vm(**inputs).logits[:, -1]
        single = [vm(**make_inputs(processor, [p], [[make_image(21 + i)]])).logits[0, -1]
                  for i, p in enumerate(PROMPTS)]
    torch.testing.assert_close(together, torch.stack(single), rtol=1e-4, atol=1e-4)


def test_pai_boost_equals_a_hand_edited_row():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    image = torch.tensor([[False, True, True, False, False], [False, False, True, True, False]])
    from vlmeff.pruners.attention.pai import boost

    out = torch.zeros(2, 5, 4, 8)
    got = Router._edited_last_row(3, [lambda layer, s: boost(s, image, 0.2)], AttentionInputs(q, k, v, None, 0.3), out)
    for b in range(2):
        for h in range(4):
            a = [float(q[b, h, 4] @ k[b, h // 2, j]) * 0.3 for j in range(5)]
            a = [x + 0.2 * abs(x) if image[b, j] else x for j, x in enumerate(a)]
            p = torch.softmax(torch.tensor(a), 0)
            torch.testing.assert_close(got[b, 4, h], p @ v[b, h // 2], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[:, :4], out[:, :4])  # other rows untouched


def test_pai_decode_row_alone_equals_the_hand_edited_row():
    """A decode step (one query row) is computed from the edited scores alone, without the backend's pass."""
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    image = torch.tensor([[False, True, True, False, False, False], [False, False, True, True, True, False]])
    from vlmeff.pruners.attention.pai import boost

    got = Router._edited_last_row(3, [lambda layer, s: boost(s, image, 0.2)], AttentionInputs(q, k, v, None, 0.3), None)
    assert got.shape == (2, 1, 4, 8)
    for b in range(2):
        for h in range(4):
            a = [float(q[b, h, 0] @ k[b, h // 2, j]) * 0.3 for j in range(6)]
            a = [x + 0.2 * abs(x) if image[b, j] else x for j, x in enumerate(a)]
            torch.testing.assert_close(got[b, 0, h], torch.softmax(torch.tensor(a), 0) @ v[b, h // 2],
                                       rtol=1e-5, atol=1e-5)


def test_pai_with_alpha_zero_generates_the_unwrapped_scores(llava):
    model, processor = llava
    inputs = batch(processor)
    kwargs = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        reference = model.generate(**inputs, **kwargs)
    with vlmeff.wrap(model, processor, "pai:alpha=0,cfg=false") as vm:  # the boost alone
        out = vm.generate(**inputs, **kwargs)
    assert torch.equal(out.sequences, reference.sequences)
    for got, want in zip(out.scores, reference.scores):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_pai_changes_the_answer_distribution_only_from_start_layer(llava):
    model, processor = llava
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(5)]])
    with torch.no_grad():
        reference = model(**inputs).logits[0, -1]
    depth = model.config.text_config.num_hidden_layers
    with vlmeff.wrap(model, processor, f"pai:start_layer={depth},cfg=false") as vm:  # no layer boosted
        assert torch.equal(vm(**inputs).logits[0, -1], reference)
    with vlmeff.wrap(model, processor, "pai:alpha=0.5,cfg=false") as vm:
        assert not torch.allclose(vm(**inputs).logits[0, -1], reference)


def test_refusals(llava, loaded):
    model, processor = llava
    qwen, qproc = loaded("qwen2-vl")
    with pytest.raises(NotApplicableError, match="M-RoPE"):
        vlmeff.wrap(qwen, qproc, "cca")
    with pytest.raises(NotApplicableError, match=r"\[CLS\]"):
        vlmeff.wrap(qwen, qproc, "paint")
    flash = deepen(model)
    flash.config.text_config._attn_implementation = "flash_attention_2"
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(6)]])
    with vlmeff.wrap(flash, processor, "naavit") as vm, pytest.raises(NotApplicableError, match="sdpa"):
        vm(**inputs)


def test_mma_runs_on_qwen(loaded):
    """Qwen2-VL: the opener is <|im_start|> of the assistant turn; batch equals one by one."""
    model, processor = loaded("qwen2-vl")
    model = deepen(model)
    inputs = batch(processor)
    with vlmeff.wrap(model, processor, "mma+pai") as vm:
        assert vm.connector.answer_opener_ids()[0] == processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
        together = vm(**inputs).logits[:, -1]
        single = [vm(**make_inputs(processor, [p], [[make_image(21 + i)]])).logits[0, -1]
                  for i, p in enumerate(PROMPTS)]
    torch.testing.assert_close(together, torch.stack(single), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("masked", [False, True])
def test_head_mean_probabilities_equal_a_slow_softmax_per_head(masked):
    """The chunked, kv-shared head mean (ATP's rows) equals softmax per head by hand, then the mean over heads."""
    torch.manual_seed(2)
    q, k = torch.randn(2, 6, 9, 4), torch.randn(2, 3, 9, 4)  # 6 query heads over 3 kv heads
    mask = torch.ones(2, 1, 9, 9, dtype=torch.bool).tril()
    mask[1, :, :, :2] = False  # sample 1 left-padded by two positions
    inputs = AttentionInputs(q, k, k, mask if masked else None, 0.5)
    rows = torch.tensor([1, 3, 4, 5, 6, 8])
    got = inputs.head_mean_probabilities(rows, chunk=4)  # chunks of 4 and 2 rows
    for b in range(2):
        for r, row in enumerate(rows.tolist()):
            allowed = [j <= row and not (masked and b == 1 and j < 2) for j in range(9)]
            if not any(allowed):
                allowed[row] = True  # a padding row sees itself (finite, never read)
            heads = []
            for h in range(6):
                a = torch.tensor([float(q[b, h, row] @ k[b, h // 2, j]) * 0.5 if allowed[j] else float("-inf")
                                  for j in range(9)])
                heads.append(torch.softmax(a, 0))
            torch.testing.assert_close(got[b, r], torch.stack(heads).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, inputs.probabilities(rows).mean(1), rtol=1e-6, atol=1e-7)
