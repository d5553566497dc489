"""`vlmeff bench` on the quick (tiny) model: columns, FLOP ratios, targets marked, files written, CLI parsing.

Timings are never asserted (a test machine is shared and noisy); one timed run, two strategies.
"""

from __future__ import annotations

import json

import pytest
import torch

from vlmeff.cli import build_parser, main
from vlmeff.eval.bench import (
    BATCH_COLUMNS,
    TABLE_COLUMNS,
    BenchConfig,
    BenchOptionError,
    bench_model_config,
    build_inputs,
    markdown_report,
    pick_batch_strategy,
    plan_specs,
    run_bench,
    table_rows,
    visual_tokens_per_image,
    write_outputs,
)


@pytest.fixture(scope="module")
def results():
    cfg = BenchConfig(strategies=["random", "fastervlm"], budgets=[16, 8], runs=1, warmup=0, new_tokens=2,
                      batch_size=2, batch_strategy="fastervlm:keep=8", quick=True, threads=1, progress=False)
    return run_bench(cfg)


def test_rows_flop_ratios_and_targets(results):
    rows = {r["spec"]: r for r in results["rows"]}
    assert list(rows)[0] == "vanilla" and len(rows) == 5  # vanilla + 2 strategies x 2 budgets
    vanilla = rows["vanilla"]
    assert vanilla["flop_ratio"] == 1.0 and vanilla["speedup"] == 1.0
    assert vanilla["kept_per_image"] == 64 and vanilla["speedup_target_met"] is None
    for spec, r in rows.items():
        if spec == "vanilla":
            continue
        assert r["stages"] == ["pre_llm"] and r["flop_ratio"] > 1
        assert r["kept_per_image"] == r["budget"] and r["flops_vanilla_total"] == vanilla["flops_total"]
        assert isinstance(r["overhead_target_met"], bool)
        # the speedup target is judged at the smallest budget only
        assert (r["speedup_target_met"] is None) == (r["budget"] != 8)
        assert r["prefill_s"] > 0 and r["decode_s_per_token"] >= 0 and r["peak_bytes"] is not None
        assert len(r["calls"]) == 1 and r["calls"][0]["new_tokens"] == 2
    assert rows["random:keep=8,positions=auto,seed=0"]["flop_ratio"] > rows["random:keep=16,positions=auto,seed=0"][
        "flop_ratio"]
    assert torch.get_num_threads() >= 1  # restored after the run (threads=1 applies to the run only)


def test_batch_is_ragged_and_matches_one_by_one(results):
    batch = results["batch"]
    assert batch["samples"] == 2 and batch["images_per_sample"] == [1, 2]
    assert batch["kept_per_sample"] == [8, 16] == batch["kept_per_sample_one_by_one"] and batch["ragged"]
    assert batch["throughput_ratio"] > 0 and isinstance(batch["batching_wins"], bool)
    assert batch["equivalent_tokens_batched"] == batch["equivalent_tokens_one_by_one"] == 24


def test_batch_strategy_choice():
    from vlmeff.registry import STRATEGIES

    assert pick_batch_strategy("random:keep=4", 8)[0] == "random:keep=4,positions=auto,seed=0"
    spec, why = pick_batch_strategy(None, 8)
    assert spec.startswith("atp" if "atp" in STRATEGIES.items() else "fastervlm:keep=8") and why


def test_table_and_files(results, tmp_path):
    table = markdown_report(results)
    header = next(line for line in table.splitlines() if line.startswith("| strategy | stage"))
    assert header == "| " + " | ".join(TABLE_COLUMNS) + " |"
    assert "| " + " | ".join(BATCH_COLUMNS) + " |" in table
    cells = table_rows(results)
    assert cells[0]["FLOP ratio"] == "1.00" and all(float(c["FLOP ratio"]) > 1 for c in cells[1:])
    assert {c["speedup target"].removesuffix(" (CI too wide)") for c in cells} <= {"met", "MISSED", "-"}
    paths = write_outputs(results, tmp_path, ["bench", "--quick"])
    saved = json.loads(paths["results"].read_text())
    assert [r["spec"] for r in saved["rows"]] == [r["spec"] for r in results["rows"]]
    run = json.loads(paths["run"].read_text())
    assert run["command"] == "vlmeff bench --quick" and run["threads"] == 1 and run["dtype"] == "bfloat16"
    assert {"torch", "transformers"} <= set(run["versions"])
    assert paths["table"].read_text() == table
    assert paths["plot"].stat().st_size > 1000


def test_paired_speedup_interval_comes_from_the_same_passes(results):
    from vlmeff.eval.intervals import ratio_interval

    vanilla = results["rows"][0]
    for row in results["rows"][1:]:
        paired = [v["prefill_s"] / c["prefill_s"] for v, c in zip(vanilla["calls"], row["calls"])]
        centre, low, high = ratio_interval(paired)
        assert row["speedup_paired"] == centre
        assert row["speedup_ci95"] == pytest.approx([low, high], nan_ok=True)
        assert min(paired) <= centre <= max(paired)
        if row["speedup_target_met"] is not None:  # undecided exactly when the interval holds the target
            target = 0.9 * row["flop_ratio"]
            assert row["speedup_undecided"] == (low < target < high)


def test_inputs_left_padded_with_image_runs():
    config = bench_model_config(quick=True)
    per_image = visual_tokens_per_image(config)
    x = build_inputs(config, [10, 13], [1, 2])
    assert x["pixel_values"].shape == (3, 3, 112, 112)
    assert (x["input_ids"] == config.image_token_id).sum(1).tolist() == [per_image, 2 * per_image]
    assert x["attention_mask"].sum(1).tolist() == [10 + per_image, 13 + 2 * per_image]
    assert x["attention_mask"][0, 0] == 0 and x["attention_mask"][:, -1].all()  # left padding


def test_plan_and_option_errors():
    plans = plan_specs(["random", "pool:keep=4", "random:keep=8", "fastervlm-64"], [8, 4])
    assert [p.spec for p in plans] == ["vanilla", "random:keep=8,positions=auto,seed=0",
                                       "random:keep=4,positions=auto,seed=0", "pool:keep=4,positions=auto",
                                       "fastervlm:keep=64,positions=auto,scorer=cls"]  # a preset runs as given
    assert [p.budget for p in plans] == [None, 8, 4, None, None]
    with pytest.raises(BenchOptionError, match="runs=0"):
        BenchConfig(runs=0).check()
    with pytest.raises(BenchOptionError, match="dtype='int8'"):
        BenchConfig(dtype="int8").check()


def test_cli_parses_and_refuses_bad_values(tmp_path, capsys):
    args = build_parser().parse_args(["bench", "--quick", "--strategy", "random", "--strategy", "pool",
                                      "--budgets", "16,8", "--runs", "1", "--threads", "1"])
    assert args.command == "bench" and args.quick and args.strategy == ["random", "pool"]
    assert (args.budgets, args.runs, args.warmup, args.new_tokens, args.batch_size) == ("16,8", 1, 1, 16, 8)
    assert main(["bench", "--quick", "--runs", "0", "--output", str(tmp_path / "a")]) == 2
    assert "runs=0" in capsys.readouterr().err
    assert main(["bench", "--quick", "--budgets", "a,b", "--output", str(tmp_path / "b")]) == 2
    assert "--budgets='a,b'" in capsys.readouterr().err
    assert main(["bench", "--quick", "--strategy", "nosuch", "--output", str(tmp_path / "c")]) == 2
