"""The POPE runner: per-sample JSONL, resume without loss or duplicates, reports, budget expansion, CLI."""

from __future__ import annotations

import json

import pytest

from vlmeff.cli import main
from vlmeff.eval.pope import load_synthetic, synthetic_image
from vlmeff.eval.runner import PopeRunner, budgeted, read_done, summarize, table_rows, write_reports


@pytest.fixture(scope="module")
def samples():
    out = [s for s in load_synthetic(num_images=3) if s.split in ("random", "adversarial")]
    return out  # 2 splits x 3 images x 6 questions


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_budget_expansion():
    assert budgeted("fastervlm", [64, 32]) == ["fastervlm:keep=64,positions=auto,scorer=cls",
                                               "fastervlm:keep=32,positions=auto,scorer=cls"]
    assert budgeted("fastervlm:scorer=global_query", [8]) == ["fastervlm:keep=8,positions=auto,scorer=global_query"]
    assert budgeted("fastervlm:ratio=0.5", [64, 32]) == ["fastervlm:ratio=0.5,positions=auto,scorer=cls"]
    assert budgeted("vanilla", [64]) == ["vanilla"]
    assert budgeted("fastervlm-64", [128, 32]) == ["fastervlm:keep=64,positions=auto,scorer=cls"]  # a preset
    assert budgeted("atp", [128, 32]) == ["atp:positions=auto,shift=0.0,k_min=1"]  # no per-image budget


def test_run_appends_and_resumes_without_loss_or_duplicates(loaded, tmp_path, samples, monkeypatch):
    model, processor = loaded("llava-dinov2")
    runner = PopeRunner(model, processor, samples, tmp_path, image_loader=synthetic_image, batch_size=4,
                        max_new_tokens=2, progress=False)
    spec = "fastervlm:keep=16"
    calls = {"n": 0}
    original = PopeRunner._answer

    def crash_after_two_batches(self, vm, batch, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # an interrupted run
        return original(self, vm, batch, **kwargs)

    monkeypatch.setattr(PopeRunner, "_answer", crash_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        runner.run(spec)
    path = runner.samples_path(spec)
    assert len(lines(path)) == 8
    with path.open("a") as f:
        f.write('{"question_id": "random-1000000000-4", "spl')  # torn write from a killed process
    monkeypatch.setattr(PopeRunner, "_answer", original)
    records = runner.run(spec)
    final = lines(path)
    keys = [(r["question_id"], r["split"]) for r in final]
    assert len(keys) == len(set(keys)) == len(samples)
    assert sorted(keys) == sorted((s.question_id, s.split) for s in samples)
    assert [r["question_id"] for r in records] == [s.question_id for s in samples]
    assert all(r["kept_tokens"] == 16 and r["visual_tokens"] == 64 and r["prefill_flops"] > 0 for r in final)
    # a third run has nothing to do and changes nothing
    before = path.read_text()
    runner.run(spec)
    assert path.read_text() == before


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"question_id": "a", "split": "random"}\nnot json\n{"question_id": "b", "split": "random"}\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        read_done(path)


def test_summary_and_reports(tmp_path):
    recs = []
    for split in ("random", "popular"):
        for i, (label, answer) in enumerate([("yes", "Yes"), ("yes", "No"), ("no", "No"), ("no", "Yes.")]):
            recs.append({"question_id": f"{split}-{i}", "split": split, "label": label, "answer": answer,
                         "kept_tokens": 10, "visual_tokens": 20, "prefill_flops": 2e9, "prefill_s": 0.1,
                         "total_s": 0.2})
    summary = summarize({"vanilla": recs, "fastervlm:keep=10": recs}, "official")
    m = summary["vanilla"]["metrics"]
    assert m["random"]["accuracy"] == 0.5 and m["mean"]["f1"] == 0.5 and m["mean"]["yes_ratio"] == 0.5
    assert set(summary["vanilla"]["metrics_all_parsers"]) == {"official", "lmms-eval", "substring"}
    assert summary["vanilla"]["metrics_all_parsers"]["lmms-eval"]["random"]["n_other"] == 1  # "Yes." is not strict
    paths = write_reports(tmp_path, summary, "official")
    assert "Parser: official" in paths["table"].read_text()
    assert paths["plot"].stat().st_size > 1000
    assert paths["csv"].read_text().splitlines()[0].startswith("strategy,kept tokens")


def test_cli_eval_on_tiny_model(saved_models, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["eval", "--benchmark", "pope", "--model", saved_models["llava-dinov2"], "--strategy", "blind",
            "--strategy", "fastervlm",
            "--budgets", "16,8", "--limit", "6", "--split", "random", "--batch-size", "3", "--max-new-tokens",
            "2", "--output", str(out), "--dtype", "float32"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| vanilla |" in table and "fastervlm:keep=8" in table
    run = json.loads((out / "run.json").read_text())
    assert run["command"].startswith("vlmeff eval") and run["questions_per_split"] == {"random": 6}
    assert "torch" in run["versions"] and run["strategies"][0] == "vanilla"
    summary = json.loads((out / "summary.json").read_text())
    assert [round(s["kept_tokens"]) for s in summary.values()] == [64, 0, 16, 8]
    assert list(summary)[1] == "blind" and 0 < summary["blind"]["prefill_gflops"] < summary["vanilla"]["prefill_gflops"]
    assert main(args) == 2  # output exists: refuse without --resume
    assert "pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert all(len(lines(p)) == 6 for p in (out / "samples").iterdir())


def test_in_llm_methods_report_equivalent_tokens(loaded, tmp_path, samples):
    """FastV keeps all tokens at the LLM input but fewer inside: the report's equivalent tokens say how many."""
    from test_llm_stage import deepen

    model, processor = loaded("llava-dinov2")
    deep = deepen(model, depth=4)
    runner = PopeRunner(deep, processor, samples[:4], tmp_path, image_loader=synthetic_image, batch_size=4,
                        max_new_tokens=2, progress=False)
    results = {spec: runner.run(spec) for spec in ("vanilla", "fastv:keep=8,layer=2")}
    assert all(r["equivalent_tokens"] == 64 for r in results["vanilla"])
    assert all(r["kept_tokens"] == 64 and r["equivalent_tokens"] == (2 * 64 + 2 * 8) / 4
               for r in results["fastv:keep=8,layer=2"])
    summary = summarize(results, "official")
    rows = {row["strategy"]: row for row in table_rows(summary)}
    assert rows["fastv:keep=8,layer=2"]["equiv. tokens"] == 36.0
    assert summary["fastv:keep=8,layer=2"]["prefill_gflops"] < summary["vanilla"]["prefill_gflops"]


def test_length_grouping_pads_less_and_answers_the_same(loaded, tmp_path):
    """Batches of similar prompt length: less padding, the same greedy answers as batches in data order."""
    from vlmeff.eval.pope import PopeSample

    model, processor = loaded("llava-clip")
    texts = ["Is there a dog?", "Is there a very large and unusually colourful umbrella near the old red car?",
             "Is there a cat?", "Is there a person standing next to the tall tree in the middle of the picture?"] * 2
    samples = [PopeSample(question_id=f"q{i}", split="random", image_id=str(i % 3), text=t,
                          label="yes" if i % 2 else "no", image=None) for i, t in enumerate(texts)]
    runs = {}
    for grouped in (False, True):
        runner = PopeRunner(model, processor, samples, tmp_path / str(grouped), image_loader=lambda s: make_img(s),
                            batch_size=4, max_new_tokens=3, progress=False, group_by_length=grouped)
        order = runner.batch_order()
        tok = processor.tokenizer
        lengths = [len(tok(runner.prompt(s), add_special_tokens=False).input_ids) for s in order]
        padding = sum(max(lengths[i:i + 4]) * len(lengths[i:i + 4]) - sum(lengths[i:i + 4]) for i in range(0, 8, 4))
        runs[grouped] = (padding, runner.run("vanilla"))
    assert runs[True][0] < runs[False][0]
    assert [r["answer"] for r in runs[True][1]] == [r["answer"] for r in runs[False][1]]
    assert [r["question_id"] for r in runs[True][1]] == [s.question_id for s in samples]  # data order out


def make_img(sample):
    from conftest import make_image

    return make_image(int(sample.image_id))
