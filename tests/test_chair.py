"""CHAIR metrics against hand counts (synonyms, plurals, repeated mentions, phrases), the COCO loader on a tiny
annotation file, and `vlmeff eval --benchmark chair` end to end on the reference model (resumable)."""

from __future__ import annotations

import json

import pytest

from vlmeff.cli import main
from vlmeff.eval.chair import ChairSample, ObjectVocabulary, chair_scores, load_coco_chair, singular


def test_singular_and_mentions():
    assert [singular(w) for w in ("boxes", "berries", "dogs", "glasses", "people", "bus", "knives")] == [
        "box", "berry", "dog", "glass", "person", "bus", "knife"]
    vocab = ObjectVocabulary.coco()
    assert vocab.mentions("A hot dog next to two dogs and a man with a cellphone.") == [
        "hot dog", "dog", "person", "cell phone"]
    ref = ObjectVocabulary.reference()
    assert ref.mentions("A box, two boxes and a sphere; a crescent.") == ["box", "box", "ball", "moon"]


def test_chair_scores_equal_a_hand_count():
    vocab = ObjectVocabulary.reference()
    samples = [ChairSample("1", None, "1", objects={"box", "ball"}),
               ChairSample("2", None, "2", objects={"star"}, allowed={"moon"}),  # moon drawn but occluded
               ChairSample("3", None, "3", objects={"kite", "hat"})]
    captions = ["A box, a box and a kite.",  # 3 mentions, kite hallucinated -> 1 of 3
                "A star and a moon.",  # moon allowed: no hallucination
                "Two kites and a bell."]  # bell hallucinated -> 1 of 2
    got = chair_scores(captions, samples, vocab)
    assert got["mentions"] == 7
    assert got["chair_i"] == pytest.approx(2 / 7)
    assert got["chair_s"] == pytest.approx(2 / 3)
    assert got["recall"] == pytest.approx((1 + 1 + 1) / (2 + 1 + 2))  # box; star; kite
    assert got["mean_length"] == pytest.approx((7 + 5 + 5) / 3)  # words split on spaces
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        chair_scores(captions[:2], samples, vocab)


def test_coco_loader_merges_instances_and_caption_mentions(tmp_path):
    instances = {"categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
                 "images": [{"id": 5, "file_name": "COCO_val2014_000000000005.jpg"},
                            {"id": 7, "file_name": "COCO_val2014_000000000007.jpg"}],
                 "annotations": [{"image_id": 5, "category_id": 18}, {"image_id": 7, "category_id": 1}]}
    captions = {"annotations": [{"image_id": 5, "caption": "A puppy on a sofa."}]}
    (tmp_path / "inst.json").write_text(json.dumps(instances))
    (tmp_path / "caps.json").write_text(json.dumps(captions))
    for image in instances["images"]:  # the loader checks that the chosen image files exist
        (tmp_path / image["file_name"]).touch()
    samples = load_coco_chair(tmp_path / "inst.json", tmp_path, tmp_path / "caps.json", num_images=10)
    assert [s.question_id for s in samples] == ["5", "7"]
    assert samples[0].objects == {"dog", "couch"} and samples[1].objects == {"person"}
    assert samples[0].image == str(tmp_path / "COCO_val2014_000000000005.jpg")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a COCO instances file"):
        load_coco_chair(tmp_path / "bad.json", None)


def test_chair_cli_on_the_reference_model_resumes(tmp_path, capsys):
    out = tmp_path / "chair"
    args = ["eval", "--benchmark", "chair", "--limit", "2", "--batch-size", "2", "--max-new-tokens", "12",
            "--strategy", "vcd", "--output", str(out)]
    assert main(args) == 0
    table = (out / "table.md").read_text()
    assert "CHAIR_S" in table and "prompt 'List the objects in the image.', max new tokens 12, greedy" in table
    lines = (out / "samples" / "vanilla.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all("caption" in json.loads(line) for line in lines)
    assert main(args + ["--resume"]) == 0  # nothing left to do: the same samples, no duplicates
    assert (out / "samples" / "vanilla.jsonl").read_text().splitlines() == lines
    assert (out / "chair.png").is_file()


def test_sampling_setting_is_named_and_seeded():
    from types import SimpleNamespace

    from vlmeff.eval.runner import decoding_label, generation_kwargs

    greedy = SimpleNamespace(sample=False)
    assert generation_kwargs(greedy) == {} and decoding_label({}) == "greedy"
    sampling = SimpleNamespace(sample=True, temperature=1.0, top_p=1.0, top_k=0)
    kwargs = generation_kwargs(sampling)
    assert kwargs == {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
    assert decoding_label(kwargs) == "sampling (temperature 1.0, top-p 1.0, top-k off)"


def test_paired_change_counts_discordant_pairs_and_an_exact_sign_test():
    from vlmeff.eval.chair import paired_change

    base = [True, True, True, False, False, True]
    other = [False, False, True, True, False, False]
    fixed, new, p = paired_change(base, other)
    assert (fixed, new) == (3, 1)
    assert p == pytest.approx(2 * (1 + 4) / 16)  # n = 4 discordant pairs, P(X <= 1) doubled
    assert paired_change([False], [False]) == (0, 0, 1.0)
