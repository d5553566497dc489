"""vlmeff's vLLM plugin (vlmeff.serve, docs/serving.md).

The rules (which strategies run in vLLM, their kept counts, the spec field) are tested here directly. The parity
tests run `python -m vlmeff.serve.parity` once inside the vLLM environment (scripts/vllm_env.sh builds it in
.venv-vllm; $VLMEFF_VLLM_PYTHON names another interpreter) and check, per model and case (strategy x 1 or 2 images,
chunked prefill, then a prefix-cache hit): vLLM's greedy tokens, kept indices and (Qwen) M-RoPE ids equal
vlmeff's transformers path on the same tiny saved model, in float32. They skip when that environment is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmeff.serve import policy
from vlmeff.serve.parity import CASES, REFUSED
from vlmeff.strategy import NotApplicableError, StrategyError

ROOT = Path(__file__).resolve().parents[1]


# --- rules (no vLLM needed) ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, family, count", [
    ("fastervlm:keep=10", "llava", 10), ("fastervlm-64", "llava", 64), ("visionzip:keep=12", "llava", 12),
    ("random:keep=10", "llava", 10), ("pool:keep=10", "llava", 9), ("divprune:keep=10", "llava", 10),
    ("random:keep=100", "llava", 64), ("pool:keep=5", "qwen2-vl", 4), ("fastervlm:keep=6,scorer=global_query",
                                                                        "qwen2-vl", 6),
])
def test_kept_count_is_the_strategys_own(spec, family, count):
    strategy = policy.resolve(spec, family, family == "llava")
    grid = (1, 8, 8) if family == "llava" else (1, 4, 5)
    assert policy.kept_count(strategy, grid) == count
    features = torch.randn(grid[1] * grid[2], 8)
    probe = policy._ZeroProbe(features.shape[0])
    kept = policy.reduce_image(strategy, policy.stand_in(grid, features, probe), position=1)
    assert kept.features.shape[0] == count  # real features keep as many as the stand-in


@pytest.mark.parametrize("spec, reason", [
    ("fastv:keep=8", "between decoder layers"), ("flowcut:keep=8", "inside the vision encoder"),
    ("vcd", "second contrast branch"), ("cdpruner:keep=8", "instruction text"),
    ("random:keep=8+fastervlm:keep=6", "not a composition"), ("fastervlm:keep=6,positions=preserve", "reindex"),
])
def test_refused_with_the_reason(spec, reason):
    with pytest.raises(StrategyError, match=reason):
        policy.resolve(spec, "llava", True)


def test_qwen_refuses_cls_scores_and_names_the_substitute():
    with pytest.raises(NotApplicableError, match="scorer=global_query"):
        policy.resolve("fastervlm:keep=8", "qwen2-vl", False)
    with pytest.raises(StrategyError, match="does not run on qwen2-vl"):
        policy.resolve("visionzip:keep=8", "qwen2-vl", False)
    policy.check_servable("visionzip:keep=8")  # servable somewhere (LLaVA)


def test_spec_travels_as_bytes():
    spec = policy.canonical("fastervlm-64")
    assert spec == "fastervlm:keep=64,positions=auto,scorer=cls"
    assert policy.decode_spec(policy.encode_spec(spec)) == spec
    assert policy.canonical("vanilla") == "" and policy.resolve("", "llava") is None
    assert policy.uses_position(policy.resolve("random:keep=3", "llava")) and \
        not policy.uses_position(policy.resolve("pool:keep=3", "llava"))


# --- parity inside vLLM ----------------------------------------------------------------------------------------
def _vllm_python() -> str | None:
    path = os.environ.get("VLMEFF_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    return path if Path(path).is_file() else None


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    python = _vllm_python()
    if python is None:
        pytest.skip("no vLLM environment: run scripts/vllm_env.sh (or set VLMEFF_VLLM_PYTHON)")
    work = tmp_path_factory.mktemp("vllm")
    out = work / "parity.json"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("VIRTUAL_ENV", None)
    done = subprocess.run([python, "-m", "vlmeff.serve.parity", "--out", str(out), "--workdir", str(work)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"vlmeff.serve.parity failed ({done.returncode}):\n{(done.stdout + done.stderr)[-6000:]}")
    return json.loads(out.read_text())


CASE_IDS = [(kind, i) for kind, specs in CASES.items() for i in range(2 * len(specs))]


@pytest.mark.parametrize("kind, index", CASE_IDS, ids=[f"{k}-{CASES[k][i // 2]}-{i % 2 + 1}img" for k, i in CASE_IDS])
def test_vllm_matches_transformers(parity, kind, index):
    case = parity[kind]["cases"][index]
    ref, got = case["reference"], case["vllm"]
    assert got["tokens"] == ref["tokens"], case["spec"]
    assert got["kept"] == ref["kept"], case["spec"]
    if ref.get("mrope_positions") is not None:
        assert got["mrope_positions"] == ref["mrope_positions"], case["spec"]


@pytest.mark.parametrize("kind", list(CASES))
def test_prefill_was_chunked_and_prefix_cache_hits(parity, kind):
    from vlmeff.serve.parity import TOKEN_BUDGET

    cases = parity[kind]["cases"]
    assert max(c["vllm"]["prompt_tokens"] for c in cases) > TOKEN_BUDGET  # prompts longer than one step's budget
    repeat = parity[kind]["repeat"]
    assert repeat["vllm"]["cached_tokens"] > 0  # the second identical request reads its prefix from the cache
    assert repeat["vllm"]["tokens"] == repeat["reference"]["tokens"]


@pytest.mark.parametrize("kind", list(CASES))
def test_refused_requests_name_the_reason(parity, kind):
    refused = parity[kind]["refused"]
    assert set(refused) == set(REFUSED)
    assert "between decoder layers" in refused["fastv:keep=8"]
    assert "not a composition" in refused["random:keep=8+fastervlm:keep=6"]
    assert "instruction text" in refused["cdpruner:keep=8"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
