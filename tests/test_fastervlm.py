"""FasterVLM: formula on small tensors, selection vs an eager tower, and where it cannot apply."""

from __future__ import annotations

import pytest
import torch

import vlmeff
from conftest import make_image, make_inputs
from vlmeff.attention_rows import cls_attention_row
from vlmeff.strategy import NotApplicableError, topk_sorted


def reference_topk(score: list[float], k: int) -> list[int]:
    """Rank by (-score, index), keep k, raster order: docs/methods.md shared rules, written out plainly."""
    return sorted(sorted(range(len(score)), key=lambda j: (-score[j], j))[:k])


def test_topk_sorted_ties_and_order():
    score = torch.tensor([0.1, 0.5, 0.5, 0.2, 0.5, 0.0])
    assert topk_sorted(score, 2).tolist() == [1, 2]  # three-way tie at 0.5: lowest indices win
    assert topk_sorted(score, 4).tolist() == [1, 2, 3, 4]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = torch.randint(0, 4, (30,), generator=g).float()
        assert topk_sorted(s, 7).tolist() == reference_topk(s.tolist(), 7)


def test_cls_attention_row_formula():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 1, 12, generator=g), torch.randn(2, 5, 12, generator=g)
    got = cls_attention_row(q, k, num_heads=3, scale=0.5)
    for i in range(2):
        for h in range(3):
            logits = [(q[i, 0, h * 4:(h + 1) * 4] @ k[i, j, h * 4:(h + 1) * 4]).item() * 0.5 for j in range(5)]
            expected = torch.softmax(torch.tensor(logits), 0)
            torch.testing.assert_close(got[i, h], expected)


@pytest.mark.parametrize("kind", ["llava-clip", "llava-dinov2"])
@pytest.mark.parametrize("keep", [1, 9, 40])
def test_kept_indices_match_eager_output_attentions(loaded, saved_models, kind, keep):
    model, processor = loaded(kind)
    images = [[make_image(1)], [make_image(2)]]
    inputs = make_inputs(processor, ["What is it?", "Is there a cat?"], images)
    vm = vlmeff.wrap(model, processor, f"fastervlm:keep={keep}")
    vm.prepare(**inputs)
    probe_rows = [vm.last_record[i] for i in range(2)]
    vm.unwrap()

    eager, _ = vlmeff.load(saved_models[kind], dtype="float32", attn_implementation="eager")
    with torch.no_grad():
        out = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    layer = model.config.vision_feature_layer % (model.config.vision_config.num_hidden_layers + 1) - 1
    scores = out.attentions[layer][:, :, 0, 1:].float().mean(1)  # [I, V]: CLS row, patch columns, head mean
    for i in range(2):
        assert probe_rows[i].kept_indices.tolist() == reference_topk(scores[i].tolist(), keep)


def test_probe_scores_equal_eager_attention_values(loaded, saved_models):
    model, processor = loaded("llava-clip")
    inputs = make_inputs(processor, ["What is it?"], [[make_image(5)]])
    connector = vlmeff.wrap(model, processor).connector
    _, images = connector.prepare_tokens(inputs)
    ours = images[0].probe.cls_attention(0)  # [H, V]
    eager, _ = vlmeff.load(saved_models["llava-clip"], dtype="float32", attn_implementation="eager")
    with torch.no_grad():
        att = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    torch.testing.assert_close(ours, att[connector.feature_layer][0, :, 0, 1:], rtol=1e-5, atol=1e-7)
    assert connector.feature_layer == model.config.vision_config.num_hidden_layers - 2


def test_fastervlm_on_qwen_raises_unless_substitute_chosen(loaded):
    model, processor = loaded("qwen2-vl")
    with pytest.raises(NotApplicableError, match=r"needs a \[CLS\] token.*scorer=global_query"):
        vlmeff.wrap(model, processor, "fastervlm:keep=4")
    vm = vlmeff.wrap(model, processor, "fastervlm:keep=4,scorer=global_query")
    vm.unwrap()


def test_global_query_substitute_formula(loaded):
    """Recompute the Qwen2-VL substitute score from an eager-style full attention of the last block."""
    model, processor = loaded("qwen2-vl")
    inputs = make_inputs(processor, ["What is it?"], [[make_image(7, (84, 56))]])
    connector = vlmeff.wrap(model, processor).connector
    _, images = connector.prepare_tokens(inputs)
    ours = images[0].probe.global_query_attention(0)
    visual = model.model.visual
    captured = {}
    handle = visual.blocks[-1].attn.register_forward_pre_hook(
        lambda m, a, kw: captured.update(h=a[0] if a else kw["hidden_states"], pe=kw["position_embeddings"]),
        with_kwargs=True)
    with torch.no_grad():
        model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    handle.remove()
    attn = visual.blocks[-1].attn
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    n = captured["h"].shape[0]
    q, k, _ = attn.qkv(captured["h"]).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *captured["pe"])
    qg = q.mean(0)  # [H, hd]
    att = torch.stack([torch.softmax(k[:, h] @ qg[h] * attn.scaling, 0) for h in range(attn.num_heads)]).mean(0)
    expected = att.reshape(-1, 4).mean(1)
    torch.testing.assert_close(ours, expected.detach(), rtol=1e-5, atol=1e-7)
    assert ours.numel() == images[0].record.num_tokens


def test_global_query_on_qwen25_maps_window_order_back_to_raster(loaded):
    """Qwen2.5-VL permutes 2x2 groups into windows inside the encoder. Recover the permutation independently by
    matching merger outputs (window order) to the final pooled features (raster order), then compare scores."""
    model, processor = loaded("qwen2.5-vl")
    inputs = make_inputs(processor, ["What is it?"], [[make_image(8, (168, 168))]])
    connector = vlmeff.wrap(model, processor).connector
    _, images = connector.prepare_tokens(inputs)
    ours = images[0].probe.global_query_attention(0)  # raster order
    visual = model.model.visual
    captured = {}
    h1 = visual.blocks[-1].attn.register_forward_pre_hook(
        lambda m, a, kw: captured.update(h=a[0] if a else kw["hidden_states"], pe=kw["position_embeddings"]),
        with_kwargs=True)
    h2 = visual.merger.register_forward_hook(lambda m, a, out: captured.update(merged=out))
    with torch.no_grad():
        pooled = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
    h1.remove()
    h2.remove()
    perm = torch.cdist(pooled, captured["merged"]).argmin(1)  # raster group r sits at window slot perm[r]
    assert sorted(perm.tolist()) == list(range(pooled.shape[0])) and perm.tolist() != sorted(perm.tolist())
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    attn = visual.blocks[-1].attn
    n = captured["h"].shape[0]
    with torch.no_grad():
        q, k, _ = attn.qkv(captured["h"]).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *captured["pe"])
    qg = q.mean(0)
    att = torch.stack([torch.softmax(k[:, h] @ qg[h] * attn.scaling, 0) for h in range(attn.num_heads)]).mean(0)
    window_order = att.reshape(-1, 4).mean(1)
    torch.testing.assert_close(ours, window_order[perm], rtol=1e-5, atol=1e-7)
