"""The shipped reference model loads offline from the converted cache and answers held-out questions."""

from __future__ import annotations

import os

import pytest
import torch

from vlmeff.reference.model import ASSET_NAME, asset_dir
from vlmeff.reference.weights import PART_DIRS, cache_dir

CACHE_READY = all((cache_dir() / d / "done.json").is_file() for d in PART_DIRS.values())
pytestmark = [
    pytest.mark.skipif(not (asset_dir() / ASSET_NAME).is_file(), reason="no trained reference weights in assets/"),
    pytest.mark.skipif(not CACHE_READY, reason="pretrained parts not converted yet: run `vlmeff reference fetch`"),
]


@pytest.fixture(scope="module")
def reference(monkeypatch_module):
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")  # everything must come from the local cache
    from vlmeff.reference.model import load_reference

    return load_reference(dtype=torch.float32)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_loads_offline_as_a_plain_llava(reference):
    model, processor = reference
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.vision_config.model_type == "dinov2"
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.fixture(scope="module")
def held_out_answers(reference):
    import vlmeff
    from vlmeff.eval.pope import load_synthetic, synthetic_image
    from vlmeff.eval.runner import PopeRunner

    model, processor = reference
    samples = [s for s in load_synthetic(num_images=4) if s.split == "adversarial"]  # 24 held-out questions
    runner = PopeRunner(model, processor, samples, output=None, image_loader=synthetic_image, progress=False)
    with vlmeff.wrap(model, processor) as vm:
        return runner._answer(vm, samples)


def test_answers_are_single_yes_or_no(held_out_answers):
    from vlmeff.eval.parsers import parse_lmms_eval

    assert all(parse_lmms_eval(r["answer"]) in ("yes", "no") for r in held_out_answers), \
        [r["answer"] for r in held_out_answers]


def test_answers_held_out_questions_correctly(held_out_answers):
    from vlmeff.eval.parsers import parse_official

    correct = [parse_official(r["answer"]) == r["label"] for r in held_out_answers]
    assert sum(correct) >= 0.75 * len(correct), [(r["answer"], r["label"]) for r in held_out_answers]


def test_shipped_atp_learned_thresholds_prune_per_instance(reference):
    """The atp-learned MLPs trained on this model: they load by default, remove tokens per sample, near their target."""
    import vlmeff
    from vlmeff.eval.pope import load_synthetic, synthetic_image
    from vlmeff.pruners.in_llm.atp.learned import default_weights, load_thresholds

    if not default_weights().is_file():
        pytest.skip("no trained atp-learned weights in assets/")
    model, processor = reference
    _, meta = load_thresholds(default_weights())
    samples = [s for s in load_synthetic(num_images=2) if s.split == "random"][:6]
    texts = [processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": s.text}]}], add_generation_prompt=True) for s in samples]
    inputs = processor(images=[synthetic_image(s) for s in samples], text=texts, return_tensors="pt", padding=True)
    with vlmeff.wrap(model, processor, "atp-learned") as vm:
        vm(**inputs)
        per_sample = vm.stats.per_sample_equivalent_tokens
    assert len(set(round(x, 3) for x in per_sample)) > 1  # instance-adaptive
    mean = sum(per_sample) / len(per_sample)
    target = meta["config"]["target_tokens"]
    assert 0.5 * target <= mean <= 2 * target, (mean, target)


def test_saved_reference_model_loads_back_with_the_same_logits(reference, tmp_path):
    """save_pretrained of the assembled model + processor, then vlmeff.load(folder): the same computation."""
    import vlmeff
    from vlmeff.reference.world import render_scene

    model, processor = reference
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded_model, loaded_processor = vlmeff.load(str(tmp_path), dtype="float32")
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Is there a star in the image?"}]}], add_generation_prompt=True)
    image = render_scene(1_000_000_123).image
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    reloaded_inputs = loaded_processor(images=[image], text=[text], return_tensors="pt")
    assert torch.equal(inputs["input_ids"], reloaded_inputs["input_ids"])
    assert torch.equal(inputs["pixel_values"], reloaded_inputs["pixel_values"])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded_model(**reloaded_inputs).logits)


def test_cli_run_answers_with_the_reference_model(capsys, tmp_path):
    import json

    from vlmeff.cli import main
    from vlmeff.reference.world import render_scene

    path = tmp_path / "scene.png"
    render_scene(1_000_000_123).image.save(path)
    assert main(["run", "--model", "reference", "--image", str(path), "--prompt", "Is there a star in the image?",
                 "--strategy", "fastervlm:keep=64", "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answer"].strip().lower().rstrip(".") in ("yes", "no")
    assert out["stats"]["visual_tokens_kept"] == 64 and out["stats"]["visual_tokens_in"] == 256
