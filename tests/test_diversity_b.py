"""VisPruner and DART (docs/methods.md): selections recomputed independently on small tensors (the official loops
written out plainly, exact indices), on tiny models against eager / hook recomputations, and the invariants every
pruner has (keep-everything = unwrapped, batch = one by one, removed tokens really removed, refusals)."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from test_llm_stage import deepen, layer_lengths

import vlmeff
import vlmeff.pruners.in_llm.dart  # noqa: F401  (registers dart, dart-embed until vlmeff.pruners imports them)
import vlmeff.pruners.pre_llm.vispruner  # noqa: F401
from conftest import assert_batch_equals_one_by_one, greedy, llm_input_lengths, make_image, make_inputs
from vlmeff.connector import VisionProbe
from vlmeff.llm_stage import PrefillView, SampleTokens
from vlmeff.pruners.in_llm.dart import DART, DARTEmbed
from vlmeff.pruners.pre_llm.vispruner import VisPruner
from vlmeff.router import AttentionInputs
from vlmeff.strategy import ImageTokens, NotApplicableError, SelectionRecord, StrategyError
from vlmeff.testing import save_tiny_model

PROMPTS = ["What is in the image?", "Is there a dog in the image? Answer yes or no, please.", "Describe it."]


# --- independent references (plain Python, float64) ----------------------------------------------------------
def reference_vispruner(attention: list[float], features: torch.Tensor, k: int, important_ratio: float) -> list[int]:
    """Theia-4869/VisPruner `encode_images` written out: rank by (-attention, index); rounds of even/odd matching on
    unit features, drop the min(8, R - T_div) A tokens with the highest best-match cosine (ties: earlier A)."""
    important = int(k * important_ratio)
    diverse = k - important
    ranked = sorted(range(len(attention)), key=lambda j: (-attention[j], j))
    kept, residual = ranked[:important], ranked[important:]
    unit = features.double() / features.double().norm(dim=-1, keepdim=True)
    while diverse > 0:
        drop = min(8, len(residual) - diverse)
        if drop <= 0:
            break
        a, b = residual[0::2], residual[1::2]
        score = [max(float(unit[x] @ unit[y]) for y in b) for x in a]
        by_score = sorted(range(len(a)), key=lambda i: (-score[i], i))
        residual = [a[i] for i in by_score[drop:]] + b
    return sorted(kept + (residual if diverse > 0 else []))


def reference_dart(normed: torch.Tensor, keys: torch.Tensor, image: list[int], text: list[int], per_pivot: int,
                   pivot_image: int = 4, pivot_text: int = 4, order: str = "reference") -> list[int]:
    """ZichenWen1/DART `get_retained_image_token` written out on one unpadded sequence: normed [S, D] (the final-norm
    hidden states), keys [S, W] (heads concatenated); image: the image token positions, text: the text candidates.
    Pivots by L1 key norm (ties: earlier), processed in Python set order ("reference") or by position; each keeps the
    per_pivot least cosine-similar remaining non-pivot image tokens (ties: earlier). Returns kept image positions."""
    l1 = [float(keys[s].double().abs().sum()) for s in range(keys.shape[0])]
    image_pivots = sorted(image, key=lambda s: (-l1[s], s))[:pivot_image]
    text_pivots = sorted(text, key=lambda s: (-l1[s], s))[:pivot_text]
    pivots = list(set(image_pivots + text_pivots)) if order == "reference" else sorted(image_pivots + text_pivots)
    valid = [s for s in image if s not in image_pivots]
    kept = set(image_pivots)
    for p in pivots:
        sims = sorted((float(F.cosine_similarity(normed[p].double(), normed[s].double(), dim=0)), s) for s in valid)
        taken = [s for _, s in sims[:per_pivot]]
        kept.update(taken)
        valid = [s for s in valid if s not in taken]
    return sorted(kept)


class FakeProbe(VisionProbe):
    def __init__(self, rows: torch.Tensor):
        self.rows = rows  # [I, H, V]

    def cls_attention(self, image: int, block: int | None = None) -> torch.Tensor:
        return self.rows[image]


def image_tokens(features: torch.Tensor, attention: torch.Tensor | None = None) -> ImageTokens:
    v = features.shape[0]
    rows = (attention if attention is not None else torch.rand(2, v))[None]
    record = SelectionRecord(sample=0, image=0, grid=(1, 1, v), num_tokens=v, kept_indices=torch.arange(v))
    return ImageTokens(features=features, index=torch.arange(v), probe=FakeProbe(rows), image=0, record=record)


# --- VisPruner on small tensors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("v,dim,k,important_ratio", [(64, 16, 10, 0.5), (49, 8, 17, 0.25), (50, 12, 7, 0.0),
                                                    (37, 6, 30, 0.5), (64, 16, 9, 1.0), (100, 4, 40, 0.75)])
def test_vispruner_selection_matches_the_reference_loop(v, dim, k, important_ratio):
    g = torch.Generator().manual_seed(v * 100 + k)
    for trial in range(5):
        features = torch.randn(v, dim, generator=g)
        if trial % 2:  # near-duplicates: the matching is what decides
            features = features[torch.randint(0, v // 4, (v,), generator=g)] + 0.05 * torch.randn(v, dim, generator=g)
        attention = torch.softmax(torch.randn(3, v, generator=g), -1)
        img = image_tokens(features, attention)
        got = VisPruner(keep=k, important_ratio=important_ratio).reduce([img])[0]
        expected = reference_vispruner(attention.mean(0).tolist(), features, k, important_ratio)
        assert got.index.tolist() == expected
        assert torch.equal(got.features, features[expected]) and got.record.strategies == ["vispruner"]
        assert len(expected) == k


def test_vispruner_split_ratio_budget_and_identity():
    assert VisPruner(keep=64).split(64) == (32, 32)
    assert VisPruner(keep=64, important_ratio=0.75).split(64) == (48, 16)  # the README's MME example
    assert VisPruner(keep=7, important_ratio=0.5).split(7) == (3, 4)  # int(): important rounds down
    img = image_tokens(torch.randn(20, 4))
    assert VisPruner(keep=20).reduce([img])[0] is img  # keep-everything: untouched
    assert VisPruner(ratio=0.25).reduce([image_tokens(torch.randn(20, 4))])[0].index.numel() == 5


# --- DART on small tensors ------------------------------------------------------------------------------------
def fake_view(hidden: torch.Tensor, valid: torch.Tensor, images: list[list[tuple[int, int]]], final_norm=None):
    """PrefillView over [B, S] rows; images[row]: (batch image, sequence position) of every visual token."""
    samples = []
    for row in range(valid.shape[0]):
        visual = torch.tensor([p for _, p in images[row]], dtype=torch.long)
        owner = torch.tensor([i for i, _ in images[row]], dtype=torch.long)
        real = valid[row].nonzero().squeeze(1)
        text = real[~torch.isin(real, visual)]
        samples.append(SampleTokens(visual=visual, cells=torch.arange(visual.numel()), images=owner,
                                    text_after=text[text > visual[0]], last=int(real.max()),
                                    num_visual=visual.numel()))
    return PrefillView(samples, [], 4, valid, hidden=hidden, final_norm=final_norm)


def run_dart(strategy: DART, hidden, keys, valid, images, final_norm=None) -> list[list[int]]:
    """observe (keys as the router hands them: [B, H_kv, S, hd], query heads = 2 x kv heads) + select; returns per
    row the kept sequence positions."""
    batch, heads_kv, seq, head_dim = keys.shape
    query = torch.zeros(batch, 2 * heads_kv, seq, head_dim)
    state: dict = {}
    view = fake_view(hidden, valid, images, final_norm)
    strategy.observe(1, AttentionInputs(query, keys, keys, None, 1.0), view, state)
    out = []
    for sample, kept in zip(view.samples, strategy.select(1, view, state)):
        out.append(sample.visual.tolist() if kept is None else sample.visual[kept].tolist())
    return out


@pytest.mark.parametrize("order", ["reference", "sequence"])
def test_dart_selection_matches_the_reference_code(order):
    """Two rows (left padding, one or two images), GQA keys, a final RMSNorm with signed weights: per image the
    reference code on the row's unpadded sequence, text candidates = the tokens after the last image."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(7)
    dim, seq, pad = 24, 120, 9
    norm = LlamaRMSNorm(dim)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=g))
    orders_differ = False
    for _ in range(6):
        hidden = torch.randn(2, seq, dim, generator=g)
        keys = torch.randn(2, 2, seq, 8, generator=g) * torch.rand(2, 1, seq, 1, generator=g)
        valid = torch.ones(2, seq, dtype=torch.bool)
        valid[0, :pad] = False
        first = [(0, p) for p in range(pad + 5, pad + 5 + 48)]  # row 0: 48 image tokens after 5 text tokens
        second = [(1, p) for p in range(3, 43)] + [(2, p) for p in range(50, 100)]  # row 1: 40 + 50, text between
        strategy = DART(keep=16, pivot_order=order)
        got = run_dart(strategy, hidden, keys, valid, [first, second], norm)
        with torch.no_grad():
            normed = norm(hidden)
        flat_keys = keys.repeat_interleave(2, dim=1).permute(0, 2, 1, 3).reshape(2, seq, -1)  # repeat_kv, concat
        # row 0 on its unpadded sequence: positions shift by the padding
        image0 = [p - pad for _, p in first]
        text0 = list(range(image0[-1] + 1, seq - pad))
        exp0 = reference_dart(normed[0, pad:], flat_keys[0, pad:], image0, text0, 16 // 8, order=order)
        assert got[0] == [p + pad for p in exp0]
        assert len(got[0]) == 4 + 8 * 2
        text1 = list(range(100, seq))
        exp1 = sorted(reference_dart(normed[1], flat_keys[1], list(range(3, 43)), text1, 2, order=order)
                      + reference_dart(normed[1], flat_keys[1], list(range(50, 100)), text1, 2, order=order))
        assert got[1] == exp1
        other = "sequence" if order == "reference" else "reference"
        orders_differ |= reference_dart(normed[0, pad:], flat_keys[0, pad:], image0, text0, 2, order=other) != exp0
    assert orders_differ  # the order matters on these inputs, so the test tells the two apart


def test_dart_budget_counts_and_identity():
    """keep=K: T = K // 8 per pivot, 4 + 8 T kept ("128" keeps 132); ratio r: T = int(n r / 8) (the Qwen code's
    rule); a budget at least n keeps the unit (None: nothing removed)."""
    g = torch.Generator().manual_seed(3)
    seq, n = 600, 576
    hidden = torch.randn(1, seq, 16, generator=g)
    keys = torch.randn(1, 1, seq, 8, generator=g)
    valid = torch.ones(1, seq, dtype=torch.bool)
    image = [[(0, p) for p in range(10, 10 + n)]]
    assert len(run_dart(DART(keep=128), hidden, keys, valid, image)[0]) == 132
    assert len(run_dart(DART(ratio=0.222), hidden, keys, valid, image)[0]) == 4 + 8 * math.floor(n * 0.222 / 8)
    assert len(run_dart(DART(keep=64, pivot_image=2, pivot_text=6), hidden, keys, valid, image)[0]) == 2 + 64
    assert DART().ratio == 0.222  # the official scripts' reduction_ratio 0.778
    state: dict = {}
    view = fake_view(hidden, valid, image)
    query = torch.zeros(1, 2, seq, 8)
    for spec in (DART(keep=n), DART(ratio=1.0)):
        spec.observe(1, AttentionInputs(query, keys, keys, None, 1.0), view, state)
        assert spec.select(1, view, state) == [None]
    # candidates run out: every token is kept (the reference's topk would fail), reported as "nothing removed"
    small = [[(0, p) for p in range(10, 30)]]
    assert run_dart(DART(keep=19), hidden, keys, valid, small)[0] == list(range(10, 30))


def test_dart_embed_matches_the_reference_loop():
    """dart-embed: P image pivots by L1 norm of the projected tokens, processed by position, each keeps its
    T = keep // P least similar tokens (cosine of projected tokens); P + P T kept, raster order."""
    g = torch.Generator().manual_seed(11)
    for v, dim, keep, pivots in [(64, 16, 16, 8), (50, 8, 20, 4), (81, 12, 9, 3)]:
        features = torch.randn(v, dim, generator=g)
        img = image_tokens(features)
        img.projected = True
        got = DARTEmbed(keep=keep, pivots=pivots).reduce([img])[0]
        per = keep // pivots
        expected = reference_dart(features, features, list(range(v)), [], per, pivot_image=pivots, pivot_text=0,
                                  order="sequence")
        assert got.index.tolist() == expected and len(expected) == pivots + pivots * per
    full = image_tokens(torch.randn(20, 4))
    assert DARTEmbed(keep=16, pivots=4).reduce([full])[0] is full  # 4 + 4 x 4 = 20 tokens: all of them
    assert DARTEmbed(keep=15, pivots=4).reduce([full])[0].index.numel() == 16  # 4 + 4 x 3


# --- tiny models ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava(loaded):
    model, processor = loaded("llava-clip")
    return deepen(model), processor


@pytest.fixture(scope="module")
def qwen(loaded):
    model, processor = loaded("qwen2-vl")
    return deepen(model), processor


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    model, processor = vlmeff.load(str(save_tiny_model("llava-next", tmp_path_factory.mktemp("next") / "m")),
                                   dtype="float32")
    return deepen(model), processor


@pytest.fixture(scope="module")
def qwen25(loaded):
    model, processor = loaded("qwen2.5-vl")
    return deepen(model), processor


@pytest.fixture
def models(llava, qwen, qwen25, llava_next):
    return {"llava-clip": llava, "qwen2-vl": qwen, "qwen2.5-vl": qwen25, "llava-next": llava_next}


@pytest.mark.parametrize("kind", ["llava-clip", "llava-dinov2"])
@pytest.mark.parametrize("keep,important_ratio", [(10, 0.5), (24, 0.25), (7, 1.0), (40, 0.0)])
def test_vispruner_matches_an_eager_tower(loaded, saved_models, kind, keep, important_ratio):
    """Kept cells = the reference loop on the eager tower's [CLS] row (head mean) and feature-layer patches."""
    model, processor = loaded(kind)
    inputs = make_inputs(processor, PROMPTS[:2], [[make_image(1)], [make_image(2)]])
    with vlmeff.wrap(model, processor, f"vispruner:keep={keep},important_ratio={important_ratio}") as vm:
        vm.prepare(**inputs)
        records = vm.last_record
    eager, _ = vlmeff.load(saved_models[kind], dtype="float32", attn_implementation="eager")
    with torch.no_grad():
        out = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    feature_layer = model.config.vision_feature_layer
    block = feature_layer % (model.config.vision_config.num_hidden_layers + 1) - 1  # the block whose output it is
    for i in range(2):
        attention = out.attentions[block][i, :, 0, 1:].mean(0).tolist()
        features = out.hidden_states[feature_layer][i, 1:]
        assert records[i].kept_indices.tolist() == reference_vispruner(attention, features, keep, important_ratio)


def hooked_layer(model, layer: int):
    """Capture decoder layer `layer`'s attention input (hidden states after input_layernorm, rotary tables) and the
    layer's output, independently of vlmeff's router. Returns (captured dict, handles)."""
    block = model.model.language_model.layers[layer]
    captured: dict = {}

    def attention_in(module, args, kwargs):
        captured["x"] = args[0] if args else kwargs["hidden_states"]
        captured["cos_sin"] = kwargs["position_embeddings"]

    def layer_out(module, args, kwargs, output):
        captured["out"] = output[0] if isinstance(output, tuple) else output

    return captured, [block.self_attn.register_forward_pre_hook(attention_in, with_kwargs=True),
                      block.register_forward_hook(layer_out, with_kwargs=True)]


def post_rope_keys(model, layer: int, captured) -> torch.Tensor:
    """[S, H * hd] keys of one unpadded row after RoPE, kv heads repeated (the reference's repeat_kv), from the
    model file's own k_proj and apply_rotary_pos_emb."""
    attn = model.model.language_model.layers[layer].self_attn
    x = captured["x"].detach()
    keys = attn.k_proj(x).detach().view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
    cos, sin = captured["cos_sin"]
    _, keys = sys.modules[type(attn).__module__].apply_rotary_pos_emb(keys, keys, cos, sin)
    heads = model.config.text_config.num_attention_heads
    keys = keys.repeat_interleave(heads // keys.shape[1], dim=1)
    return keys[0].permute(1, 0, 2).reshape(x.shape[1], -1)


@pytest.mark.parametrize("kind", ["llava-clip", "qwen2-vl", "qwen2.5-vl"])
@pytest.mark.parametrize("spec,layer,per_pivot", [("dart:keep=16", 2, 2), ("dart:layer=3,ratio=0.4", 3, None),
                                                  ("dart:keep=8,pivot_order=sequence", 2, 1)])
def test_dart_matches_a_hook_recomputation(models, kind, spec, layer, per_pivot):
    """A padded batch through the wrapper; per sample, the reference code on the unwrapped model's own layer K-1
    (keys recomputed from its attention input, output through the final norm), run on that sample alone."""
    model, processor = models[kind]
    images = [[make_image(21)], [make_image(22, size=(40, 70))]]
    inputs = make_inputs(processor, PROMPTS[:2], images)
    with vlmeff.wrap(model, processor, spec) as vm:
        greedy(vm.generate, inputs, n=1)  # generate's positions: from the mask, as for an unpadded row
        records = vm.last_record
    order = "sequence" if "sequence" in spec else "reference"
    for row in range(2):
        single = make_inputs(processor, [PROMPTS[row]], [images[row]])
        captured, handles = hooked_layer(model, layer - 1)
        try:
            with torch.no_grad():
                model(**single)
        finally:
            for h in handles:
                h.remove()
        ids = single["input_ids"][0]
        image = (ids == model.config.image_token_id).nonzero().squeeze(1).tolist()
        text = list(range(image[-1] + 1, ids.numel()))
        with torch.no_grad():
            normed = model.model.language_model.norm(captured["out"])[0]
        per = per_pivot if per_pivot is not None else int(len(image) * 0.4 / 8)
        expected = reference_dart(normed, post_rope_keys(model, layer - 1, captured), image, text, per, order=order)
        assert records[row].llm_kept[layer].tolist() == [image.index(p) for p in expected]
        assert len(expected) == 4 + 8 * per


def test_keep_everything_reproduces_the_unwrapped_model(models):
    qwen_specs = ["dart:ratio=1.0", "vispruner:scorer=global_query,ratio=1.0", "dart-embed:keep=1000"]
    for kind, specs in (("llava-clip", ["vispruner:keep=64", "vispruner:ratio=1.0", "dart:ratio=1.0", "dart:keep=64",
                                        "dart-embed:ratio=1.0", "dart:layer=0,keep=100"]),
                        ("qwen2-vl", qwen_specs), ("qwen2.5-vl", qwen_specs),
                        ("llava-next", ["vispruner:keep=36", "dart:ratio=1.0", "dart-embed:ratio=1.0"])):
        model, processor = models[kind]
        inputs = make_inputs(processor, PROMPTS[:2], [[make_image(30)], [make_image(31, size=(70, 40))]])
        with torch.no_grad():
            ref = model(**inputs).logits
        tokens = greedy(model.generate, inputs)
        for spec in specs:
            with vlmeff.wrap(model, processor, spec) as vm:
                with torch.no_grad():
                    assert torch.equal(vm(**inputs).logits, ref), spec
                assert torch.equal(greedy(vm.generate, inputs), tokens), spec


@pytest.mark.parametrize("kind,spec", [
    ("llava-clip", "vispruner:keep=10"), ("llava-clip", "dart:keep=16"), ("llava-clip", "dart-embed:keep=8"),
    ("llava-clip", "dart:layer=3,ratio=0.3,pivot_order=sequence"), ("llava-clip", "vispruner:keep=20+dart:keep=8"),
    ("qwen2-vl", "dart:keep=8"), ("qwen2-vl", "vispruner:scorer=global_query,keep=6"),
    ("qwen2-vl", "dart-embed:keep=8"), ("qwen2.5-vl", "dart:keep=8"),
    ("qwen2.5-vl", "vispruner:scorer=global_query,keep=6"), ("qwen2.5-vl", "dart-embed:keep=8"),
    ("llava-next", "vispruner:keep=10"), ("llava-next", "dart:keep=16"), ("llava-next", "dart-embed:keep=8"),
    ("llava-next:per_image", "vispruner:keep=30"), ("llava-next:per_image", "dart:keep=40")])
def test_batch_equals_one_by_one(models, kind, spec):
    """Ragged batch (one or two images per sample, left padding): the same tokens and records as one by one
    (LLaVA-NeXT: per-view units, and per-image units that pool an image's views)."""
    kind, _, budget = kind.partition(":")
    model, processor = models[kind]
    connector = f":budget={budget}" if budget else None
    images = [[make_image(7)], [make_image(8, size=(70, 40)), make_image(9)], [make_image(10, size=(40, 70))]]
    with vlmeff.wrap(model, processor, spec, connector=connector) as vm:
        batched = assert_batch_equals_one_by_one(vm, processor, PROMPTS, images, max_new_tokens=4, min_new_tokens=4,
                                                 do_sample=False)
    assert any(len(r["kept_indices"]) < r["num_tokens"] or
               any(len(c) < len(r["kept_indices"]) for c in r["llm_kept"].values()) for r in batched)  # removed


def test_removed_tokens_are_really_removed(llava):
    """dart: layers < K see every token, layers >= K (and their caches) only text + kept; the pre-LLM ones hand the
    LLM a shorter prompt."""
    model, processor = llava
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(40)]])
    full = inputs["input_ids"].shape[1]
    text = full - int((inputs["input_ids"] == model.config.image_token_id).sum())
    seen, handles = layer_lengths(model)
    try:
        with vlmeff.wrap(model, processor, "dart:keep=16") as vm:
            out = vm.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
            caches = [layer.get_seq_length() for layer in out.past_key_values.layers]
    finally:
        for h in handles:
            h.remove()
    depth = len(seen)
    assert [seen[i][0] for i in range(depth)] == [full] * 2 + [text + 20] * (depth - 2)
    assert caches == [full + 2] * 2 + [text + 20 + 2] * (depth - 2)
    for spec, kept in (("vispruner:keep=12", 12), ("dart-embed:keep=16", 24)):
        lengths, handle = llm_input_lengths(model)
        try:
            with vlmeff.wrap(model, processor, spec) as vm, torch.no_grad():
                vm(**inputs)
        finally:
            handle.remove()
        assert lengths == [text + kept] and vm.last_record[0].num_kept == kept, spec
        assert vm.last_record[0].strategies == [spec.split(":")[0]]


def test_refusals_name_the_parameter_and_the_way_out(llava, qwen):
    model, processor = llava
    qwen_model, qwen_processor = qwen
    with pytest.raises(NotApplicableError, match=r"vispruner needs a \[CLS\].*scorer=global_query"):
        vlmeff.wrap(qwen_model, qwen_processor, "vispruner:keep=8")
    with pytest.raises(NotApplicableError, match="scorer=cls"):
        vlmeff.wrap(model, processor, "vispruner:keep=8,scorer=global_query")
    with pytest.raises(StrategyError, match="vispruner.scorer='attention'"):
        VisPruner(keep=8, scorer="attention")
    with pytest.raises(StrategyError, match=r"vispruner.important_ratio=1.5: must be in \[0, 1\]"):
        VisPruner(keep=8, important_ratio=1.5)
    with pytest.raises(StrategyError, match="exactly one of keep"):
        VisPruner()
    with pytest.raises(StrategyError, match="dart.layer=-1"):
        DART(layer=-1)
    with pytest.raises(StrategyError, match="dart.pivot_order='sorted'.*reference, sequence"):
        DART(pivot_order="sorted")
    with pytest.raises(StrategyError, match="dart.pivot_image=0"):
        DART(pivot_image=0)
    with pytest.raises(StrategyError, match="original positions"):
        DART(positions="reindex")
    with pytest.raises(StrategyError, match="dart-embed.pivots=0"):
        DARTEmbed(pivots=0)
    inputs = make_inputs(processor, PROMPTS[:1], [[make_image(41)]])
    with vlmeff.wrap(model, processor, f"dart:layer={len(model.model.language_model.layers)}") as vm, \
            pytest.raises(NotApplicableError, match="outside"):
        vm(**inputs)
    vm = vlmeff.wrap(model, processor, "dart:layer=0,keep=8")
    assert [s.name for s in vm.strategies] == ["dart-embed"] and vm.strategies[0].pivots == 8
    vm.unwrap()


@pytest.mark.parametrize("kind", ["qwen2-vl", "qwen2.5-vl"])
def test_vispruner_global_query_substitute_on_qwen(models, kind):
    """scorer=global_query: the reference loop on the probe's global-query row (its formula is tested with
    fastervlm) and the merged LLM-space tokens, per image."""
    model, processor = models[kind]
    inputs = make_inputs(processor, PROMPTS[:2], [[make_image(50)], [make_image(51, size=(90, 40))]])
    vm = vlmeff.wrap(model, processor, "vispruner:scorer=global_query,keep=9,important_ratio=0.25")
    try:
        with torch.no_grad():
            _, images = vm.connector.prepare_tokens(inputs)
        vm.prepare(**inputs)
        records = vm.last_record
    finally:
        vm.unwrap()
    for img, record in zip(images, records):
        attention = img.probe.global_query_attention(img.image).tolist()
        assert record.kept_indices.tolist() == reference_vispruner(attention, img.features, 9, 0.25)
