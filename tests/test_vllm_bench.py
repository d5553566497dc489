"""The vLLM serving benchmark (vlmeff.serve.bench, docs/serving.md "Serving benchmark").

Its plan, tokenizer and summary run everywhere; the smoke test runs `python -m vlmeff.serve.bench --quick` inside
the vLLM environment (scripts/vllm_env.sh builds .venv-vllm; $VLMEFF_VLLM_PYTHON names another interpreter) and
skips where that environment is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from vlmeff.serve import bench
from vlmeff.strategy import StrategyError

ROOT = Path(__file__).resolve().parents[1]


def test_plan_is_vanilla_then_each_strategy_at_the_budget():
    specs = bench.plan_specs(None, 64)
    assert specs[0] == "vanilla" and len(specs) == 1 + len(bench.LLAVA_STRATEGIES)
    assert specs[1] == "fastervlm:keep=64,positions=auto,scorer=cls"
    assert bench.plan_specs(["pool:keep=32", "pool:keep=32"], 64) == ["vanilla", "pool:keep=32,positions=auto"]
    with pytest.raises(StrategyError, match="between decoder layers"):
        bench.plan_specs(["fastv"], 64)
    with pytest.raises(bench.ServeBenchOptionError, match="concurrency"):
        bench.ServeBenchConfig(concurrency=[0]).check()


def test_tokenizer_fits_the_config_and_prompts_have_the_image_where_vlmeff_bench_puts_it():
    config = bench.serve_bench_config(quick=True)
    assert config.text_config.num_attention_heads * 32 == config.text_config.hidden_size  # vLLM CPU head size
    tokenizer = bench.build_tokenizer(config)
    assert len(tokenizer) == config.text_config.vocab_size
    request = bench.make_request(config, "pool:keep=16", seed=3, text_tokens=12)
    ids = tokenizer(request["prompt"])["input_ids"]
    assert len(ids) == 13 and ids[bench.PREFIX_WORDS] == config.image_token_id
    assert max(ids[:bench.PREFIX_WORDS]) < 1000  # random words stay below the special ids
    assert request["mm_processor_kwargs"] == {"vlmeff_strategy": "pool:keep=16"}


def test_summary_ratios_are_against_vanilla_at_the_same_concurrency():
    def batch(spec, n, wall, ttft, prompt):
        return {"spec": spec, "concurrency": n, "wall_s": wall, "requests": [
            {"prompt_tokens": prompt, "output_tokens": 4, "ttft_s": ttft * (i + 1), "tpot_s": 0.01} for i in range(n)]}

    rows = bench.summarize([batch("vanilla", 2, 4.0, 1.0, 104), batch("pool", 2, 2.0, 0.5, 56)],
                           ["vanilla", "pool"], [2], text_tokens=40)
    pool = rows[1]
    assert pool["visual_tokens"] == 16 and pool["requests_per_s"] == 1.0 and pool["output_tokens_per_s"] == 4.0
    assert pool["throughput_ratio"] == 2.0 and pool["ttft_speedup"] == 2.0
    assert (pool["ttft_min_s"], pool["ttft_mean_s"], pool["ttft_max_s"]) == (0.5, 0.75, 1.0)


def _vllm_python() -> str | None:
    path = os.environ.get("VLMEFF_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    return path if Path(path).is_file() else None


def _run(python, *args, cwd=ROOT):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("VIRTUAL_ENV", None)
    done = subprocess.run([python, "-m", "vlmeff.serve.bench", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"vlmeff.serve.bench failed ({done.returncode}):\n{(done.stdout + done.stderr)[-6000:]}")
    return done


def test_quick_serving_benchmark_in_vllm(tmp_path):
    python = _vllm_python()
    if python is None:
        pytest.skip("no vLLM environment: run scripts/vllm_env.sh (or set VLMEFF_VLLM_PYTHON)")
    model, out = tmp_path / "model", tmp_path / "out"
    done = _run(python, "--quick", "--model-dir", str(model), "--output", str(out))
    assert "| strategy | visual tokens |" in done.stdout
    results = json.loads((out / "results.json").read_text())
    specs = results["specs"]
    assert specs[0] == "vanilla" and len(specs) == 1 + len(bench.LLAVA_STRATEGIES)
    assert [(r["concurrency"], r["spec"]) for r in results["rows"]] == [(n, s) for n in (1, 4) for s in specs]
    for row in results["rows"]:
        assert row["visual_tokens"] == (64 if row["spec"] == "vanilla" else 16)  # the plugin reduced in vLLM
        assert row["requests_per_s"] > 0
        assert 0 < row["ttft_min_s"] <= row["ttft_mean_s"] <= row["ttft_max_s"] <= row["wall_s"]
    for b in results["batches"]:
        assert len(b["requests"]) == b["concurrency"]
        assert all(r["output_tokens"] == 4 for r in b["requests"])  # ignore_eos: exactly --new-tokens
    run = json.loads((out / "run.json").read_text())
    assert run["command"].startswith("python -m vlmeff.serve.bench --quick") and run["versions"]["vllm"]
    assert results["model"]["built_now"]
    again = _run(python, "--quick", "--model-dir", str(model), "--output", str(tmp_path / "again"),
                 "--strategy", "pool", "--concurrency", "2", "--warmup", "0", "--rounds", "1")
    assert json.loads((tmp_path / "again" / "results.json").read_text())["model"]["built_now"] is False
    assert "pool:keep=16" in again.stdout
