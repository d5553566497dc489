"""Reference-model training mechanics on tiny parts: labels, resume == uninterrupted, LoRA merge at load."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")

from transformers import Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM  # noqa: E402

from vlmeff.reference.model import ReferenceConfig, assemble, load_trained  # noqa: E402
from vlmeff.reference.train import TrainConfig, Trainer, chatml_tokens  # noqa: E402
from vlmeff.testing import build_tokenizer  # noqa: E402

REF = ReferenceConfig(image_size=56, feature_layer=-2, lora_rank=4, lora_alpha=8)


def tiny_parts(seed=0):
    torch.manual_seed(seed)
    tok = build_tokenizer(["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    vision = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, patch_size=14,
                                      image_size=56, mlp_ratio=2))
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                                      tie_word_embeddings=True))
    return assemble(vision.eval(), lm.eval(), tok, REF)


def test_chatml_labels_supervise_only_answers():
    model, processor = tiny_parts()
    tok = processor.tokenizer
    ids, labels = chatml_tokens(tok, [("List.", "A star."), ("Is there a moon?", "No")],
                                model.config.image_token_id, 16)
    assert (ids == model.config.image_token_id).sum() == 16
    supervised = tok.decode(ids[labels != -100])
    assert supervised == "A star.<|im_end|>No<|im_end|>"
    text = tok.decode(ids[ids != model.config.image_token_id])
    assert text == "<|im_start|>user\n\nList.<|im_end|>\n<|im_start|>assistant\nA star.<|im_end|>\n" \
                   "<|im_start|>user\nIs there a moon?<|im_end|>\n<|im_start|>assistant\nNo<|im_end|>\n"


def _train(out, steps, resume_from_steps=None, attention=None):
    if resume_from_steps:
        model, processor = tiny_parts()
        Trainer(model, processor, TrainConfig(out=str(out), steps=resume_from_steps, num_scenes=5, warmup=2,
                                              checkpoint_every=2, reference=REF, attention=attention)).train()
    model, processor = tiny_parts()
    trainer = Trainer(model, processor, TrainConfig(out=str(out), steps=steps, num_scenes=5, warmup=2,
                                                    checkpoint_every=2, reference=REF, attention=attention))
    trainer.train()
    return trainer


def test_resume_equals_uninterrupted(tmp_path):
    straight = _train(tmp_path / "a", steps=4)
    resumed = _train(tmp_path / "b", steps=4, resume_from_steps=2)
    for name, p in straight.params.items():
        assert torch.equal(p, resumed.params[name]), name
    log = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 4
    with pytest.raises(ValueError, match="cannot resume"):
        model, processor = tiny_parts()
        Trainer(model, processor, TrainConfig(out=str(tmp_path / "b"), steps=6, num_scenes=7,
                                              reference=REF)).resume()


def test_load_trained_merges_lora_exactly(tmp_path):
    trainer = _train(tmp_path / "a", steps=3)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        for p in trainer.params.values():  # make LoRA B non-zero so the merge matters
            p.add_(0.01 * torch.randn_like(p))
        trainer.checkpoint()
        ref = trainer.model.model.language_model(input_ids=ids).last_hidden_state
    fresh, _ = tiny_parts()
    cfg = load_trained(fresh, tmp_path / "a" / "reference.safetensors")
    assert cfg == REF
    with torch.no_grad():
        got = fresh.model.language_model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        proj = {k: v for k, v in trainer.model.model.multi_modal_projector.state_dict().items()}
        for k, v in fresh.model.multi_modal_projector.state_dict().items():
            assert torch.equal(v, proj[k])


def test_init_from_asset_restores_the_trained_weights(tmp_path):
    trainer = _train(tmp_path / "a", steps=2)
    model, processor = tiny_parts()
    fresh = Trainer(model, processor, TrainConfig(out=str(tmp_path / "c"), steps=2, num_scenes=5, reference=REF))
    fresh.init_from(tmp_path / "a" / "reference.safetensors")
    exported, original = fresh.export(), trainer.export()
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)


# --- attention variants (issue 17): the strategy in every training forward -----------------------------------
def _prompt_inputs(processor, seed=0):
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    image = Image.fromarray((torch.rand(56, 56, 3, generator=gen) * 255).byte().numpy())
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a moon?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=[image], text=[text], return_tensors="pt")


@pytest.mark.parametrize("spec", ["cca", "mma", "naavit"])
def test_training_forward_equals_inference_forward(spec):
    """train_forward (features from the model's own forward, with gradients) gives the logits of the inference
    forward under the same masks / positions, differs from plain causal attention, and trains the projector."""
    import vlmeff

    model, processor = tiny_parts()
    inputs = _prompt_inputs(processor)
    with torch.no_grad():
        plain = model(**inputs).logits
    with vlmeff.wrap(model, processor, spec) as vm:
        with torch.no_grad():
            inference = vm(**inputs).logits
        model.model.multi_modal_projector.requires_grad_(True)
        trained = vm.train_forward(**inputs).logits
        trained[0, -1].logsumexp(-1).backward()
    torch.testing.assert_close(trained.detach(), inference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(inference, plain, atol=1e-4)  # the strategy was active in both
    grad = model.model.multi_modal_projector.linear_1.weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("attention", ["cca", "saisa"])
def test_attention_fine_tune_resumes_exactly(tmp_path, attention):
    straight = _train(tmp_path / "a", steps=3, attention=attention)
    resumed = _train(tmp_path / "b", steps=3, resume_from_steps=2, attention=attention)
    assert straight.params.keys() == resumed.params.keys()
    for name, p in straight.params.items():
        assert torch.equal(p, resumed.params[name]), name
    if attention == "saisa":  # SAISA trains its per-layer projectors (and LoRA), not the stock projector
        assert any(n.startswith("saisa.") for n in straight.params)
        assert not any(n.startswith("projector.") for n in straight.params)
        assert (tmp_path / "a" / "saisa_projectors.safetensors").is_file()


@pytest.mark.parametrize("rank", [None, 4], ids=["paper-form", "factored"])
def test_saisa_training_forward_equals_inference_forward(tmp_path, rank):
    import vlmeff
    from vlmeff.pruners.attention.saisa import untrained_projectors

    model, processor = tiny_parts()
    inputs = _prompt_inputs(processor)
    path = untrained_projectors(model.config, tmp_path / "p.safetensors", rank=rank)
    with vlmeff.wrap(model, processor, f"saisa:weights={path}") as vm:
        with torch.no_grad():
            inference = vm(**inputs).logits
        module = vm.strategies[0].projectors()[0]
        module.requires_grad_(True)
        trained = vm.train_forward(**inputs).logits
        trained[0, -1].logsumexp(-1).backward()
    torch.testing.assert_close(trained.detach(), inference, rtol=1e-5, atol=1e-5)
    grads = [p.grad for p in module.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_attention_fine_tune_refuses_other_stages(tmp_path):
    straight = _train(tmp_path / "a", steps=3, attention="cca")
    control = _train(tmp_path / "c", steps=3, attention="none")  # same data, steps, lrs and seed; causal attention
    assert any(not torch.equal(p, control.params[n]) for n, p in straight.params.items())
    with pytest.raises(ValueError, match="attention"):  # a run keeps its variant
        _train(tmp_path / "a", steps=4, attention="mma")
    from vlmeff.strategy import StrategyError

    for spec in ("fastv", "vcd"):
        with pytest.raises(StrategyError, match="not an attention-stage strategy"):
            model, processor = tiny_parts()
            Trainer(model, processor, TrainConfig(out=str(tmp_path / spec), reference=REF, attention=spec))


def test_exported_variants_are_named_by_their_attention(tmp_path):
    from vlmeff.reference.model import attention_variant

    for attention, name in (("cca", "cca"), ("none", "control"), (None, None)):
        _train(tmp_path / str(attention), steps=1, attention=attention)
        assert attention_variant(tmp_path / str(attention) / "reference.safetensors") == name


def test_saisa_init_fits_the_models_own_visual_states(tmp_path):
    """distill_saisa fits the projectors to the RMS-normalised visual hidden states at each layer's input of the
    causal model; its reported explained variance is recomputed here from the fitted projectors' predictions."""
    trainer = _train(tmp_path / "s", steps=0, attention="saisa")
    model = trainer.model
    fit = trainer.distill_saisa(scenes=3)
    layers = model.config.text_config.num_hidden_layers
    preds, ys = [], []
    with torch.no_grad():
        for step in range(3):
            pixel_values, ids, _ = trainer.batch_for(step)
            feats, embeds = trainer.stock_inputs(pixel_values, ids)
            states = model.model.language_model(inputs_embeds=embeds, output_hidden_states=True).hidden_states
            visual = ids == model.config.image_token_id
            y = torch.stack([states[layer][0, visual] for layer in range(layers)])
            ys.append(y / y.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())
            preds.append(torch.stack([trainer.saisa(layer, feats[0]) for layer in range(layers)]))
    y, pred = torch.cat(ys, 1).double(), torch.cat(preds, 1).double()
    for layer in range(layers):
        r2 = 1 - ((y[layer] - pred[layer]) ** 2).sum() / ((y[layer] - y[layer].mean(0)) ** 2).sum()
        assert fit["r2"][layer] == pytest.approx(float(r2), abs=1e-3)
    assert all(a >= b - 1e-6 for a, b in zip(fit["r2"], fit["r2_shared"]))
