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
    bucketed = batch["bucketed"]  # 1 image (64 + 40 tokens) and 2 images (128 + 51): too ragged for one bucket
    assert bucketed["buckets"] == [[0], [1]] and bucketed["padding"] == 0
    assert bucketed["kept_per_sample"] == [8, 16] and len(bucketed["calls"]) == 1 and len(bucketed["calls"][0]) == 2
    low, high = bucketed["throughput_ratio_ci95"]
    assert isinstance(bucketed["throughput_target_met"], bool) and (low <= high or low != low)


def brute_force_batches(lengths, batch_size, max_padding):
    """The rule spelled out: walk the stably sorted samples, open a new batch when the current one is full or
    would pad more than max_padding."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = []
    for i in order:
        if batches:
            candidate = batches[-1] + [i]
            padded = len(candidate) * max(lengths[j] for j in candidate)
            real = sum(lengths[j] for j in candidate)
            if len(candidate) <= batch_size and (max_padding is None or padded <= (1 + max_padding) * real):
                batches[-1] = candidate
                continue
        batches.append([i])
    return batches


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_padding", [None, 0.0, 0.1, 0.5])
def test_length_batches_follow_the_rule(seed, max_padding):
    from vlmeff.batching import length_batches

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(10, 40, (23,), generator=gen).tolist() + [616, 1200, 640, 1230]
    got = length_batches(lengths, 4, max_padding)
    assert got == brute_force_batches(lengths, 4, max_padding)
    assert sorted(i for b in got for i in b) == list(range(len(lengths)))  # every sample exactly once


def test_length_batches_refuse_bad_arguments():
    from vlmeff.batching import length_batches

    with pytest.raises(ValueError, match="batch_size=0"):
        length_batches([3, 4], 0)
    with pytest.raises(ValueError, match="max_padding=-0.1"):
        length_batches([3, 4], 2, -0.1)
    assert length_batches([], 3) == []
    assert length_batches([5, 5, 9, 9], 8, 0.0) == [[0, 1], [2, 3]]  # equal lengths pad nothing


def test_sub_batch_trims_padding_and_takes_the_rows_images():
    from vlmeff.eval.bench import sub_batch

    config = bench_model_config(quick=True)
    texts, images = [40, 51, 45], [1, 2, 0]
    batch = build_inputs(config, texts, images, seed=3)
    part = sub_batch(batch, images, [2, 0])
    per_image = visual_tokens_per_image(config)
    assert part["input_ids"].shape[1] == max(45, 40 + per_image)  # the longer of the two, no extra padding
    assert torch.equal(part["input_ids"][1], batch["input_ids"][0][-part["input_ids"].shape[1]:])
    assert torch.equal(part["pixel_values"], batch["pixel_values"][:1])  # sample 2 has no image, sample 0 image 0
    assert torch.equal(sub_batch(batch, images, [1])["pixel_values"], batch["pixel_values"][1:3])


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
        # exp(log(x)) can land one ulp below x: a relative tolerance, not an exact bound
        assert min(paired) * (1 - 1e-12) <= centre <= max(paired) * (1 + 1e-12)
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


def test_kernel_bench_reports_bandwidth(tmp_path, capsys):
    """`vlmeff bench --kernels` on the CPU: torch rows with bytes, GB/s and the copy reference; Triton named as not
    measured (it needs CUDA); files written."""
    from vlmeff.eval.kernel_bench import kernel_table, run_kernel_bench

    results = run_kernel_bench(torch.device("cpu"), torch.float32, runs=1, shapes=((2, 10, 8, 4),))
    (row,) = results["rows"]
    assert row["backend"] == "torch" and row["bytes"] == 2 * 2 * 4 * 8 * 4 + 2 * 4 * 8
    assert row["gb_per_s"] > 0 and row["of_peak"] is None and "triton" in results["skipped"]
    assert "| torch | 2 x 10 x 8 -> 4 |" in kernel_table(results)
    out = tmp_path / "k"
    assert main(["bench", "--kernels", "--quick", "--dtype", "float32", "--runs", "1", "--device", "cpu", "--output", str(out)]) == 0
    assert (out / "kernels.md").exists() and json.loads((out / "kernels.json").read_text())["rows"]
    assert "GB/s" in capsys.readouterr().out
