"""DivPrune and CDPruner: each selection recomputed with slow, obvious loops (greedy max-min, the DPP's greedy MAP and
a brute-force log-det greedy), the instruction read from the prompt, the CLIP relevance path on a tiny CLIPModel,
keep-everything exactness, batch == one by one on LLaVA / Qwen2-VL / LLaVA-NeXT, real removal, refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vlmeff
from conftest import (
    assert_batch_equals_one_by_one,
    assert_keep_everything_is_vanilla,
    generate_recording_lengths,
    make_image,
    make_inputs,
)
from vlmeff.pruners.pre_llm.cdpruner import (
    CDPruner,
    cosine_similarity,
    dpp_order,
    instruction_ids,
    minmax,
    relevance_from,
)
from vlmeff.pruners.pre_llm.divprune import DivPrune, cosine_distance, maxmin_order
from vlmeff.spec import parse_spec
from vlmeff.strategy import NotApplicableError, PromptText, StrategyError
from vlmeff.testing import build_tokenizer, save_tiny_model

SUFFIX = "\nAnswer the question using a single word or phrase."
PROMPTS = ["Is there a dog in the image?" + SUFFIX, "What is in the image?", "Describe the picture in detail."]
QUESTIONS = ["Is there a dog in the image?", "What is in the image?", "Describe the picture in detail."]


# --- slow, obvious references -----------------------------------------------------------------------------------
def slow_maxmin(dist: list[list[float]], k: int) -> list[int]:
    """DivPrune written out: step 0 scores column j by its second-smallest entry, later steps by the smallest entry
    over the picked rows; the first best unpicked index wins (ties: lowest index)."""
    n, picks = len(dist), []
    for step in range(k):
        best, best_score = -1, -math.inf
        for j in range(n):
            if j in picks:
                continue
            column = [dist[i][j] for i in range(n)]
            score = sorted(column)[1] if step == 0 else min(dist[s][j] for s in picks)
            if score > best_score:
                best, best_score = j, score
        picks.append(best)
    return picks


def slow_dpp(kernel: list[list[float]], k: int) -> list[int]:
    """Chen et al.'s fast greedy MAP written out with Python floats (docs: no update when the gain is not positive)."""
    n = len(kernel)
    gain = [kernel[i][i] for i in range(n)]
    rows: list[list[float]] = []
    picks: list[int] = []
    for _ in range(k):
        best = max((j for j in range(n) if j not in picks), key=lambda j: (gain[j], -j))
        picks.append(best)
        scale = 1.0 / math.sqrt(gain[best]) if gain[best] > 0 else 0.0
        e = [(kernel[best][i] - sum(c[best] * c[i] for c in rows)) * scale for i in range(n)]
        rows.append(e)
        gain = [gain[i] - e[i] ** 2 for i in range(n)]
    return picks


def logdet_greedy(kernel: np.ndarray, k: int) -> list[int]:
    """Brute force: each step adds the token j maximising det(L[S + j, S + j]) (numpy, float64)."""
    picks: list[int] = []
    for _ in range(k):
        dets = {j: np.linalg.det(kernel[np.ix_(picks + [j], picks + [j])]) for j in range(len(kernel)) if j not in picks}
        ranked = sorted(dets.values(), reverse=True)
        assert ranked[0] - ranked[1] > 1e-9 * abs(ranked[0]), "near-tie: pick another seed"
        picks.append(max(dets, key=lambda j: (dets[j], -j)))
    return picks


def slow_relevance(image: np.ndarray, text: np.ndarray, negate: bool) -> np.ndarray:
    """mean over text rows of (-)cos, then (r - min + 1e-6) / (max - min); loops over tokens."""
    rel = []
    for v in image:
        cos = [float(v @ t) / (np.linalg.norm(v) * np.linalg.norm(t)) for t in text]
        rel.append(sum(-c if negate else c for c in cos) / len(cos))
    rel = np.array(rel)
    return (rel - rel.min() + 1e-6) / (rel.max() - rel.min())


def reference_divprune(features: torch.Tensor, k: int) -> list[int]:
    """Kept cells (raster order) of DivPrune on projected features [V, D], distances in float64."""
    x = features.double()
    x = x / x.norm(dim=1, keepdim=True)
    return sorted(slow_maxmin((1 - x @ x.T).tolist(), k))


def reference_cdpruner(features: torch.Tensor, text_embeds: torch.Tensor, k: int,
                       image_embeds: torch.Tensor | None = None, negate: bool | None = None) -> list[int]:
    """Kept cells of CDPruner: float64 relevance (loops), kernel diag(r) cos diag(r), slow greedy MAP. Without
    image_embeds the substitute (+cos unless negate), with them the CLIP path (-cos unless negate=False)."""
    x = features.double().numpy()
    e = x if image_embeds is None else image_embeds.double().numpy()
    negate = (image_embeds is not None) if negate is None else negate
    r = slow_relevance(e, text_embeds.double().numpy(), negate)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    kernel = r[:, None] * (unit @ unit.T) * r[None, :]
    return sorted(slow_dpp(kernel.tolist(), k))


def llava_projected(model, inputs) -> torch.Tensor:
    """[I, V, D] LLaVA's projected visual tokens, from the tower and projector called directly."""
    with torch.no_grad():
        hidden = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        return model.model.multi_modal_projector(hidden[model.config.vision_feature_layer][:, 1:])


def question_embeds(model, processor, question: str) -> torch.Tensor:
    ids = processor.tokenizer(question, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model.get_input_embeddings()(torch.tensor(ids))


# --- the greedy rules on small tensors -------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_maxmin_order_equals_loops(seed):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(23, 6, generator=g)
    dist = cosine_distance(features)
    assert maxmin_order(dist, 23).tolist() == slow_maxmin(dist.tolist(), 23)  # the same matrix: exact


def test_maxmin_order_ties_take_the_lowest_index():
    # axis-aligned vectors, duplicated: every distance is exactly 0 or 1, so every step is a tie
    axes = torch.eye(4)[[2, 0, 2, 1, 3, 0, 1, 3, 3]]
    dist = cosine_distance(axes)
    order = maxmin_order(dist, 9).tolist()
    assert order == slow_maxmin(dist.tolist(), 9)
    assert order[:4] == [0, 1, 3, 4]  # first copy of each axis, lowest index first; duplicates after
    assert sorted(order) == list(range(9))  # a picked token is never picked again
    torch.testing.assert_close(cosine_distance(torch.ones(3, 2)), torch.zeros(3, 3))


def test_cosine_distance_is_one_minus_cosine():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 5, generator=g)
    expected = [[1 - float(a @ b) / float(a.norm() * b.norm()) for b in x.double()] for a in x.double()]
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(cosine_distance(x).double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(cosine_similarity(x).double(), 1 - expected, atol=1e-6, rtol=0)


def test_maxmin_order_is_nested():
    g = torch.Generator().manual_seed(4)
    dist = cosine_distance(torch.randn(30, 8, generator=g))
    full = maxmin_order(dist, 30).tolist()
    for k in (1, 5, 12):
        assert maxmin_order(dist, k).tolist() == full[:k]


@pytest.mark.parametrize("seed", range(6))
def test_dpp_order_equals_slow_loops(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(14, 9, generator=g, dtype=torch.float64)
    r = torch.rand(14, generator=g, dtype=torch.float64) + 0.1
    unit = x / x.norm(dim=1, keepdim=True)
    kernel = r[:, None] * (unit @ unit.T) * r[None, :]
    assert dpp_order(kernel, 9).tolist() == slow_dpp(kernel.tolist(), 9)


@pytest.mark.parametrize("seed", range(5))
def test_dpp_greedy_steps_maximise_the_log_determinant(seed):
    """Each fast-update pick is the argmax of det(L_{S+j}) over unpicked j (g_j = det(L_{S+j}) / det(L_S))."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 10, generator=g, dtype=torch.float64)
    r = torch.rand(8, generator=g, dtype=torch.float64) + 0.2
    unit = x / x.norm(dim=1, keepdim=True)
    kernel = r[:, None] * (unit @ unit.T) * r[None, :]
    assert dpp_order(kernel, 6).tolist() == logdet_greedy(kernel.numpy(), 6)
    kernel32 = kernel.float()  # what the strategy runs: float32
    assert dpp_order(kernel32, 6).tolist() == logdet_greedy(kernel.numpy(), 6)


def test_dpp_ties_and_an_exhausted_kernel():
    assert dpp_order(torch.eye(5), 5).tolist() == [0, 1, 2, 3, 4]  # equal gains: lowest index
    # tokens 0 and 1 identical: after picking 0, token 1 adds nothing (gain 0), picked last, no NaN anywhere
    kernel = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.5], [0.0, 0.0, 0.5, 1.0]])
    order = dpp_order(kernel, 4).tolist()
    assert order == slow_dpp(kernel.tolist(), 4) == [0, 2, 3, 1]


def test_relevance_formula_and_minmax():
    g = torch.Generator().manual_seed(5)
    image, text = torch.randn(11, 7, generator=g), torch.randn(3, 7, generator=g)
    for negate in (True, False):
        expected = slow_relevance(image.double().numpy(), text.double().numpy(), negate)
        torch.testing.assert_close(relevance_from(image, text, negate).double(), torch.tensor(expected),
                                   atol=1e-5, rtol=1e-5)
    assert torch.equal(relevance_from(image, text[:0], True), torch.ones(11))  # no instruction: r = 1
    assert torch.equal(minmax(torch.full((4,), 0.3)), torch.ones(4))  # constant: r = 1, not 1e-6 / 0
    r = minmax(torch.tensor([2.0, 4.0, 3.0]))
    torch.testing.assert_close(r, torch.tensor([1e-6 / 2, 1 + 1e-6 / 2, 0.5 + 1e-6 / 2]))
    # negated: the token least similar to the text gets the highest relevance (the released code's sign)
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert relevance_from(image, torch.tensor([[1.0, 0.0]]), negate=True).argmax() == 2
    assert relevance_from(image, torch.tensor([[1.0, 0.0]]), negate=False).argmax() == 0


# --- the instruction read from the prompt ------------------------------------------------------------------------
def prompt(ids, span, control, opener=None):
    ids = torch.tensor(ids)
    return PromptText(ids, torch.isin(ids, torch.tensor(span)), torch.isin(ids, torch.tensor(control)),
                      opener, embed=None)


def test_instruction_rule_on_id_sequences():
    # LLaVA-like: <s> USER : <image> x3 \n q1 q2 ASSISTANT : (opener 20 21)
    llava = prompt([1, 10, 11, 9, 9, 9, 12, 13, 14, 20, 21], span=[9], control=[1, 9], opener=(20, 21))
    assert llava.instruction().tolist() == [6, 7, 8]
    # Qwen-like: <im_start> user \n <vs> <pad> <pad> <ve> q1 q2 <im_end> \n <im_start> assistant
    qwen = prompt([2, 30, 31, 5, 9, 9, 6, 12, 13, 3, 40, 2, 41], span=[5, 6, 9], control=[2, 3, 5, 6, 9],
                  opener=(2, 41))
    assert qwen.instruction().tolist() == [7, 8]
    # two images with text between them: the text after the LAST image
    two = prompt([1, 9, 9, 15, 9, 9, 12, 13, 20, 21], span=[9], control=[1, 9], opener=(20, 21))
    assert two.instruction().tolist() == [6, 7]
    # text before the image (Qwen order text, image): the run before the first image span
    before = prompt([2, 30, 12, 13, 5, 9, 6, 3, 40, 2, 41], span=[5, 6, 9], control=[2, 3, 5, 6, 9],
                    opener=(2, 41))
    assert before.instruction().tolist() == [1, 2, 3]
    # no opener known (no processor): to the end of the row
    assert prompt([1, 9, 9, 12, 13, 14], span=[9], control=[1, 9]).instruction().tolist() == [3, 4, 5]
    # nothing but the image and the template
    assert prompt([1, 9, 9, 20, 21], span=[9], control=[1, 9], opener=(20, 21)).instruction().numel() == 0


@pytest.mark.parametrize("kind", ["llava-clip", "qwen2-vl"])
def test_instruction_of_each_sample_on_real_prompts(loaded, kind):
    """Per sample of a left-padded batch, one and two images: the question as the user typed it, the answer-format
    suffix removed; every image of a sample shares its sample's prompt."""
    model, processor = loaded(kind)
    images = [[make_image(1)], [make_image(2), make_image(3)], [make_image(4)]]
    inputs = make_inputs(processor, PROMPTS, images)
    vm = vlmeff.wrap(model, processor)
    _, tokens = vm.connector.prepare_tokens(inputs)
    tokens = vm._attach_prompts(inputs, tokens)
    vm.unwrap()
    assert [t.record.sample for t in tokens] == [0, 1, 1, 2]
    assert tokens[1].prompt is tokens[2].prompt
    for t in tokens:
        ids, text = instruction_ids(t.prompt, strip_suffix=True)
        assert text == QUESTIONS[t.record.sample]
        assert ids.tolist() == processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert t.prompt.input_ids.numel() == int(inputs["attention_mask"][t.record.sample].sum())
    _, text = instruction_ids(tokens[0].prompt, strip_suffix=False)
    assert text == PROMPTS[0]


# --- selections on the tiny models, recomputed independently -----------------------------------------------------
@pytest.mark.parametrize("keep", [1, 7, 20])
def test_divprune_on_llava_equals_the_slow_rule(loaded, keep):
    model, processor = loaded("llava-clip")
    inputs = make_inputs(processor, PROMPTS[:2], [[make_image(1)], [make_image(2)]])
    vm = vlmeff.wrap(model, processor, f"divprune:keep={keep}")
    vm.prepare(**inputs)
    vm.unwrap()
    projected = llava_projected(model, inputs)
    for i, record in enumerate(vm.last_record):
        assert record.kept_indices.tolist() == reference_divprune(projected[i], keep)


def test_divprune_default_ratio_and_nested_budgets(loaded):
    model, processor = loaded("llava-clip")
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(6)]])
    assert DivPrune().ratio == 0.098 and DivPrune(keep=5).ratio is None
    kept = {}
    for spec in ["divprune", "divprune:keep=3", "divprune:keep=10", "divprune:ratio=0.5"]:
        with vlmeff.wrap(model, processor, spec) as vm:
            vm.prepare(**inputs)
            kept[spec] = set(vm.last_record[0].kept_indices.tolist())
    assert len(kept["divprune"]) == round(64 * 0.098) == 6 and len(kept["divprune:ratio=0.5"]) == 32
    assert kept["divprune:keep=3"] < kept["divprune"] < kept["divprune:keep=10"] < kept["divprune:ratio=0.5"]


@pytest.mark.parametrize("kind", ["qwen2-vl", "qwen2.5-vl"])
def test_divprune_and_cdpruner_on_qwen_equal_the_slow_rules(loaded, kind):
    model, processor = loaded(kind)
    images = [[make_image(7, (84, 56))], [make_image(8)]]
    inputs = make_inputs(processor, PROMPTS[:2], images)
    with torch.no_grad():
        merged = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    for spec, keep in [("divprune:keep=5", 5), ("cdpruner:keep=6", 6)]:
        with vlmeff.wrap(model, processor, spec) as vm:
            vm.prepare(**inputs)
            records = vm.last_record
        for i, record in enumerate(records):
            if spec.startswith("divprune"):
                expected = reference_divprune(merged[i], keep)
            else:
                expected = reference_cdpruner(merged[i], question_embeds(model, processor, QUESTIONS[i]), keep)
            assert record.kept_indices.tolist() == expected, f"{spec}, image {i}"


@pytest.mark.parametrize("keep,negate", [(1, None), (9, None), (30, None), (9, True), (9, False)])
def test_cdpruner_on_llava_equals_the_slow_rule(loaded, keep, negate):
    """The default relevance: the LLM's input embeddings of the question's tokens against the projected tokens
    (+cos unless negate=true)."""
    model, processor = loaded("llava-clip")
    inputs = make_inputs(processor, PROMPTS, [[make_image(1)], [make_image(2)], [make_image(3)]])
    spec = f"cdpruner:keep={keep}" + ("" if negate is None else f",negate={negate}")
    with vlmeff.wrap(model, processor, spec) as vm:
        vm.prepare(**inputs)
    projected = llava_projected(model, inputs)
    for i, record in enumerate(vm.last_record):
        expected = reference_cdpruner(projected[i], question_embeds(model, processor, QUESTIONS[i]), keep,
                                      negate=negate)
        assert record.kept_indices.tolist() == expected
    if negate is True:  # the sign matters
        assert [r.kept_indices.tolist() for r in vm.last_record] != [
            reference_cdpruner(projected[i], question_embeds(model, processor, QUESTIONS[i]), keep, negate=False)
            for i in range(3)]


def test_cdpruner_depends_on_the_instruction(loaded):
    model, processor = loaded("llava-clip")
    image = make_image(9)
    kept = []
    for question in ["Is there a dog in the image?", "Describe the picture in detail."]:
        with vlmeff.wrap(model, processor, "cdpruner:keep=8") as vm:
            vm.prepare(**make_inputs(processor, [question], [[image]]))
            kept.append(vm.last_record[0].kept_indices.tolist())
    assert kept[0] != kept[1]
    with vlmeff.wrap(model, processor, "cdpruner:keep=8") as vm:  # the answer-format suffix changes nothing
        vm.prepare(**make_inputs(processor, ["Is there a dog in the image?" + SUFFIX], [[image]]))
        assert vm.last_record[0].kept_indices.tolist() == kept[0]


def test_cdpruner_without_a_processor_reads_the_prompt_ids(loaded):
    """No tokenizer (vlmeff bench): the instruction is the prompt's own ids after the image, unstripped."""
    model, processor = loaded("llava-clip")
    inputs = make_inputs(processor, PROMPTS[1:2], [[make_image(2)]])
    with vlmeff.wrap(model, None, "cdpruner:keep=9") as vm:
        vm.prepare(**inputs)
    ids = inputs["input_ids"][0]
    after = ids[int((ids == model.config.image_token_id).nonzero().max()) + 1:]  # to the row's end: no opener known
    with torch.no_grad():
        text = model.get_input_embeddings()(after)
    assert vm.last_record[0].kept_indices.tolist() == reference_cdpruner(llava_projected(model, inputs)[0], text, 9)


# --- the CLIP relevance path -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, loaded):
    """A tiny CLIPModel whose vision model has the tiny LLaVA tower's shape, saved with a tokenizer; text segments
    of 8 tokens so that a question spans several segments."""
    from transformers import CLIPConfig, CLIPModel

    model, _ = loaded("llava-clip")
    tokenizer = build_tokenizer(["<unk>", "<s>", "</s>", "<pad>"])
    tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
    vision = model.config.vision_config
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=8, bos_token_id=1, eos_token_id=2,
                         pad_token_id=3),
        vision_config=dict(hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
                           num_hidden_layers=1, num_attention_heads=vision.num_attention_heads,
                           image_size=vision.image_size, patch_size=vision.patch_size),
        projection_dim=16,
    )
    torch.manual_seed(1)
    clip = CLIPModel(config).eval()
    with torch.no_grad():  # a visible post_layernorm, so that using it is tested
        clip.vision_model.post_layernorm.weight.uniform_(0.5, 1.5)
        clip.vision_model.post_layernorm.bias.normal_()
    path = tmp_path_factory.mktemp("tiny-clip") / "clip"
    clip.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def slow_clip_text(clip, tokenizer, text: str) -> torch.Tensor:
    """[M, C]: one embedding per 8-token segment, each segment zero-padded, run on its own."""
    ids = tokenizer(text=[text])["input_ids"][0]
    span = clip.config.text_config.max_position_embeddings
    out = []
    for start in range(0, len(ids), span):
        segment = ids[start: start + span]
        mask = [1] * len(segment) + [0] * (span - len(segment))
        segment = segment + [0] * (span - len(segment))
        with torch.no_grad():
            pooled = clip.text_model(input_ids=torch.tensor([segment]), attention_mask=torch.tensor([mask])).pooler_output
            out.append(clip.text_projection(pooled)[0])
    return torch.stack(out)


def test_cdpruner_clip_path_equals_the_slow_rule(loaded, clip_dir):
    from transformers import AutoTokenizer, CLIPModel

    model, processor = loaded("llava-clip")
    inputs = make_inputs(processor, PROMPTS, [[make_image(1)], [make_image(2)], [make_image(3)]])
    strategy = CDPruner(keep=9, text_encoder=clip_dir)
    with vlmeff.wrap(model, processor, [strategy]) as vm:
        vm.prepare(**inputs)
    clip, tokenizer = CLIPModel.from_pretrained(clip_dir).eval(), AutoTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        hidden = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        patches = hidden[model.config.vision_feature_layer][:, 1:]  # the tower's feature layer, [CLS] dropped
        image_embeds = clip.visual_projection(clip.vision_model.post_layernorm(patches))
    projected = llava_projected(model, inputs)
    assert len(tokenizer(text=[QUESTIONS[2]])["input_ids"][0]) > 8  # several segments
    for i, record in enumerate(vm.last_record):
        text = slow_clip_text(clip, tokenizer, QUESTIONS[i])
        expected = reference_cdpruner(projected[i], text, 9, image_embeds=image_embeds[i])
        assert record.kept_indices.tolist() == expected
    # the written sign on the CLIP path; the CLIP relevance differs from the default one on the same inputs
    with vlmeff.wrap(model, processor, [CDPruner(keep=9, text_encoder=clip_dir, negate=False)]) as vm:
        vm.prepare(**inputs)
        assert [r.kept_indices.tolist() for r in vm.last_record] == [
            reference_cdpruner(projected[i], slow_clip_text(clip, tokenizer, QUESTIONS[i]), 9,
                               image_embeds=image_embeds[i], negate=False) for i in range(3)]
    with vlmeff.wrap(model, processor, "cdpruner:keep=9,negate=true") as vm:
        vm.prepare(**inputs)
        assert [r.kept_indices.tolist() for r in vm.last_record] != [
            reference_cdpruner(projected[i], slow_clip_text(clip, tokenizer, QUESTIONS[i]), 9,
                               image_embeds=image_embeds[i]) for i in range(3)]


def test_cdpruner_clip_path_refusals(loaded, clip_dir, tmp_path):
    model, processor = loaded("qwen2-vl")
    with pytest.raises(NotApplicableError, match=r"needs a CLIP vision tower.*qwen2_vl.*leave text_encoder unset"):
        vlmeff.wrap(model, processor, [CDPruner(keep=4, text_encoder=clip_dir)])
    model, processor = loaded("llava-dinov2")
    with pytest.raises(NotApplicableError, match=r"needs a CLIP vision tower.*dinov2"):
        vlmeff.wrap(model, processor, [CDPruner(keep=4, text_encoder=clip_dir)])
    model, processor = loaded("llava-clip")
    with pytest.raises(NotApplicableError, match=r"needs the processor"):
        vlmeff.wrap(model, None, [CDPruner(keep=4, text_encoder=clip_dir)])
    with pytest.raises(NotApplicableError, match=r"text_encoder=.*missing.*cannot load a CLIPModel"):
        vlmeff.wrap(model, processor, [CDPruner(keep=4, text_encoder=str(tmp_path / "missing"))])
    from transformers import CLIPConfig, CLIPModel

    narrow = tmp_path / "narrow"
    CLIPModel(CLIPConfig(vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=56, patch_size=7),
                         text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2))).save_pretrained(narrow)
    build_tokenizer(["<unk>"]).save_pretrained(narrow)
    with pytest.raises(NotApplicableError, match=r"vision width 16 differs from the tower's 32"):
        vlmeff.wrap(model, processor, [CDPruner(keep=4, text_encoder=str(narrow))])


# --- wrapper invariants ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,spec", [
    ("llava-clip", "divprune:keep=100000"), ("llava-clip", "cdpruner:ratio=1.0"), ("qwen2-vl", "divprune:ratio=1.0"),
    ("qwen2-vl", "cdpruner:keep=100000"), ("qwen2.5-vl", "cdpruner:keep=100000"),
])
def test_keep_everything_is_exactly_vanilla(loaded, kind, spec):
    stats = assert_keep_everything_is_vanilla(*loaded(kind), spec, PROMPTS[:2])
    assert stats.visual_tokens_kept == stats.visual_tokens_in


@pytest.mark.parametrize("kind,spec", [("llava-clip", "divprune:keep=9"), ("llava-clip", "cdpruner:keep=11"),
                                       ("qwen2-vl", "divprune:ratio=0.3"), ("qwen2-vl", "cdpruner:keep=6"),
                                       ("qwen2.5-vl", "cdpruner:ratio=0.25")])
def test_batch_equals_one_by_one(loaded, kind, spec):
    model, processor = loaded(kind)
    if kind.startswith("qwen"):  # a sample with two images: both get the sample's instruction
        images = [[make_image(10)], [make_image(11), make_image(12)], [make_image(13, (90, 40))]]
    else:
        images = [[make_image(10)], [make_image(11)], [make_image(12)]]
    with vlmeff.wrap(model, processor, spec) as vm:
        assert_batch_equals_one_by_one(vm, processor, PROMPTS, images, max_new_tokens=5, do_sample=False)


@pytest.mark.parametrize("kind,spec,kept", [("llava-clip", "divprune:keep=9", 9), ("llava-clip", "cdpruner:keep=5", 5),
                                            ("qwen2-vl", "cdpruner:keep=7", 7), ("qwen2-vl", "divprune", 4)])
def test_generate_shrinks_the_llm_input(loaded, kind, spec, kept):
    model, processor = loaded(kind)
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(3)]])
    out, vm, seen, num_visual = generate_recording_lengths(model, processor, spec, inputs)
    assert vm.last_record[0].num_kept == kept < num_visual
    assert seen[0] == inputs["input_ids"].shape[1] - num_visual + kept
    assert all(length == 1 for length in seen[1:])  # decode steps on the cache of the reduced prompt
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert vm.last_record[0].strategies == [spec.split(":")[0]]


def test_budget_and_parameter_refusals():
    with pytest.raises(StrategyError, match=r"cdpruner: give exactly one of keep=.*or ratio="):
        CDPruner()
    with pytest.raises(StrategyError, match=r"divprune: give exactly one of keep="):
        DivPrune(keep=4, ratio=0.5)
    with pytest.raises(StrategyError, match=r"divprune.keep=0: must be >= 1"):
        parse_spec("divprune:keep=0")
    with pytest.raises(StrategyError, match=r"cdpruner.ratio=1.5: must be in \(0, 1\]"):
        parse_spec("cdpruner:ratio=1.5")
    with pytest.raises(StrategyError, match=r"cdpruner.ratio=nan: must be a finite number"):
        parse_spec("cdpruner:ratio=nan")
    with pytest.raises(StrategyError, match=r"cdpruner.text_encoder='  ': expected a CLIPModel folder"):
        CDPruner(keep=3, text_encoder="  ")
    with pytest.raises(StrategyError, match=r"cdpruner.negate='maybe': expected a boolean"):
        parse_spec("cdpruner:keep=3,negate=maybe")
    with pytest.raises(StrategyError, match=r"cdpruner: unknown parameter\(s\) theta; accepted: .*text_encoder"):
        parse_spec("cdpruner:keep=3,theta=0.5")
    for strategy in (CDPruner(keep=3, negate=False), CDPruner(ratio=0.2), DivPrune(), DivPrune(keep=2)):
        assert parse_spec(strategy.spec())[0] == strategy  # specs round-trip
    assert CDPruner(keep=3).spec() == "cdpruner:keep=3,positions=auto,strip_suffix=True"
    assert DivPrune().spec() == "divprune:ratio=0.098,positions=auto"
    with pytest.raises(StrategyError, match=r"run it through vlmeff.wrap"):
        from vlmeff.strategy import ImageTokens, SelectionRecord

        record = SelectionRecord(0, 0, (1, 2, 2), 4, torch.arange(4))
        CDPruner(keep=2).reduce([ImageTokens(torch.randn(4, 3), torch.arange(4), None, 0, record)])


# --- LLaVA-NeXT -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def next_model(tmp_path_factory):
    return vlmeff.load(str(save_tiny_model("llava-next", tmp_path_factory.mktemp("next") / "next")), dtype="float32")


def next_base_views(model, inputs) -> torch.Tensor:
    """[images, 36, D] projected tokens of every image's base view (view 0), from the tower and projector."""
    with torch.no_grad():
        views = inputs["pixel_values"][:, 0]  # [images, C, H, W]
        hidden = model.model.vision_tower(views, output_hidden_states=True).hidden_states
        return model.model.multi_modal_projector(hidden[model.config.vision_feature_layer][:, 1:])


def test_next_per_view_selection_keep_everything_and_batch(next_model):
    model, processor = next_model
    images = [[make_image(1, (60, 50)), make_image(2, (100, 40))], [make_image(3, (30, 90))], [make_image(4)]]
    inputs = make_inputs(processor, PROMPTS, images)
    base = next_base_views(model, inputs)
    for spec, keep in [("divprune:keep=7", 7), ("cdpruner:keep=8", 8)]:
        with vlmeff.wrap(model, processor, spec) as vm:
            vm.prepare(**inputs)
            bases = [r for r in vm.last_record if r.views == (0,)]
        assert len(bases) == 4  # one base-view unit per image, all of its cells real (no unpadding)
        for image, record in enumerate(bases):
            sample = record.sample
            if spec.startswith("divprune"):
                expected = reference_divprune(base[image], keep)
            else:
                expected = reference_cdpruner(base[image], question_embeds(model, processor, QUESTIONS[sample]), keep)
            assert record.kept_indices.tolist() == expected, f"{spec}, image {image}"
    with torch.no_grad():
        reference = model(**inputs).logits
    with vlmeff.wrap(model, processor, "cdpruner:keep=100000+divprune:ratio=1.0") as vm:
        assert torch.equal(vm(**inputs).logits, reference)
    for spec in ["divprune:keep=6", "cdpruner:keep=9"]:
        with vlmeff.wrap(model, processor, spec) as vm:
            assert_batch_equals_one_by_one(vm, processor, PROMPTS, images, max_new_tokens=3, min_new_tokens=3,
                                           do_sample=False)


@pytest.mark.parametrize("preset, name", [("divprune-64", "divprune"), ("cdpruner-64", "cdpruner"),
                                          ("vispruner-64", "vispruner"), ("dart-128", "dart")])
def test_usable_from_cli_yaml_and_python(saved_models, tmp_path, capsys, preset, name):
    """The four diversity methods by preset (YAML in configs/), by a YAML file of one's own, from the CLI and from
    Python, all giving the same selection."""
    import json

    from PIL import Image

    from vlmeff.cli import main

    image = tmp_path / "img.png"
    Image.new("RGB", (60, 50), "red").save(image)
    own = tmp_path / "mine.yaml"
    own.write_text((vlmeff.spec._preset_path(preset)).read_text())
    if name == "dart":  # the tiny LLM has 2 layers: DART before its layer 1 instead of the preset's layer 2
        assert "layer=2" in vlmeff.spec.describe(parse_spec(preset))
        own.write_text(own.read_text().replace("layer: 2", "layer: 1"))
        preset = "dart:layer=1,keep=128"
    kept = []
    for spec in (preset, str(own)):
        assert main(["run", "--model", saved_models["llava-clip"], "--image", str(image), "--prompt", "Is it red?",
                     "--strategy", spec, "--max-new-tokens", "1", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["strategy"].startswith(name + ":")
        kept.append(out["records"][0]["kept_indices"])
    model, processor = vlmeff.load(saved_models["llava-clip"], dtype="float32")
    with vlmeff.wrap(model, processor, parse_spec(preset)) as vm:
        vm.chat(str(image), "Is it red?", max_new_tokens=1)
        kept.append(vm.last_record[0].kept_indices.tolist())
    assert kept[0] == kept[1] == kept[2]
