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


def _train(out, steps, resume_from_steps=None):
    if resume_from_steps:
        model, processor = tiny_parts()
        Trainer(model, processor, TrainConfig(out=str(out), steps=resume_from_steps, num_scenes=5, warmup=2,
                                              checkpoint_every=2, reference=REF)).train()
    model, processor = tiny_parts()
    trainer = Trainer(model, processor, TrainConfig(out=str(out), steps=steps, num_scenes=5, warmup=2,
                                                    checkpoint_every=2, reference=REF))
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
