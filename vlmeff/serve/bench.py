"""The serving benchmark: vLLM throughput and time to first token, vanilla vs each servable strategy, under
concurrency (the vLLM counterpart of `vlmeff bench`, docs/serving.md "Serving benchmark").

    .venv-vllm/bin/python -m vlmeff.serve.bench [--quick] [--strategy SPEC ...] [--keep 64] [--concurrency 1,4,16]
        [--rounds 2] [--warmup 1] [--new-tokens 16] [--text-tokens 40] [--dtype bfloat16] [--threads N]
        [--model-dir runs/serve-bench-model] [--output runs/serve-bench] [--force]

Runs inside the vLLM environment (scripts/vllm_env.sh). What it measures (random weights: cost only, never answers):

* **Model.** `eval/bench.py`'s `bench_model_config()`, the model of `vlmeff bench`: a CLIP ViT-L/14-336-shaped
  tower (576 visual tokens) and a Qwen2-0.5B-shaped LM (hidden 896, 24 layers, 14 heads of 64 dims, 2 KV heads,
  vocab 151936, untied head), seeded random init in bfloat16 as `build_bench_model` does it (`torch.manual_seed`,
  then `_from_config`), saved once with its processor to `--model-dir` and reused while its stamp (config, seed)
  matches.
  The tokenizer is built offline to fit the config: a word-level vocabulary of exactly `vocab_size` entries ("w0",
  "w1", ...) with the config's special ids (bos / pad 151643, eos 151645, `<image>` 151646), so every id the LM
  can emit decodes. `--quick`: the tiny model of `vlmeff bench --quick` (64 visual tokens, vocab 1024) with text
  heads of 32 dims (vLLM's CPU attention takes 32, 64, 80, ...), default keep 16.
* **Engine.** ONE in-process `vllm.LLM` (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) with `vlmeff.serve.vllm_kwargs(None)`:
  every request names its strategy in `mm_processor_kwargs={"vlmeff_strategy": spec}` ("vanilla" for none), so the
  model loads once and strategies interleave. `--dtype` (bfloat16 by default; the weights are cast on load), eager
  (no torch.compile, like `vlmeff bench`; `--compile` for vLLM's default), prefix caching OFF, chunked prefill with
  vLLM's CPU default token budget (`--max-num-batched-tokens 4096`), `max_num_seqs` = the largest concurrency,
  `VLLM_CPU_KVCACHE_SPACE` (GB, default 1). Threads: in-process, vLLM's CPU worker binds nothing
  (`VLLM_CPU_OMP_THREADS_BIND` is read only by its multiprocess executor) and forbids `torch.set_num_threads` once
  it starts, so `--threads N` sets `OMP_NUM_THREADS` and torch's thread count before the engine is built (default:
  the environment's `OMP_NUM_THREADS`, else torch's default).
* **Requests.** Every request is one image (random 336 x 336 RGB, a different seed per request) and a prompt of
  `--text-tokens` random words (6 before `<image>`, the rest after, as `vlmeff bench`); `SamplingParams(max_tokens=
  --new-tokens, ignore_eos=True, temperature=0)`, so every request yields exactly that many tokens. No two requests
  share an image or text: nothing is answered from the encoder, processor or prefix cache.
* **Concurrency.** A batch of N requests (N in `--concurrency`) with one strategy is submitted together as one
  `LLM.generate(list)` call: vLLM preprocesses the N prompts (HF processor: resize, normalise, tokenise) and then
  schedules them together (continuous batching, chunked prefill). Per batch:
  - wall = `time.perf_counter()` around the call; requests/s = N / wall; output tokens/s = generated tokens / wall;
  - TTFT per request, from vLLM's own per-request metrics (`RequestOutput.metrics`, a `RequestStateStats`, present
    with `disable_log_stats=False`): `arrival_time + first_token_latency - t_submit`, where `t_submit` is
    `time.time()` just before the call, `arrival_time` the wall-clock time vLLM stamped when it began to render that
    request, and `first_token_latency` vLLM's time from arrival to the engine step that returned the request's first
    token. So it is the time a client that sent all N requests at once waits for each first token (queueing behind
    the other requests' preprocessing and prefill included); the table gives its min, mean and max over the N
    requests. vLLM's own `first_token_latency` (from the request's arrival) is kept in results.json;
  - TPOT (time per output token) = (`last_token_ts` - `first_token_ts`) / (tokens - 1), engine-core timestamps,
    mean over the batch: what a streaming client sees between tokens, so a request that decodes while later
    requests of its batch are still prefilling counts those stalls.
* **Order.** `--warmup` untimed passes (one batch of 1 request per strategy, then one batch of the largest
  concurrency with the first strategy after vanilla), then for each concurrency `--rounds` passes, each running
  every strategy once, interleaved, the starting strategy rotated per pass so that none always follows another.
  With several rounds the table shows medians over them. Ratios compare each strategy with vanilla at the same
  concurrency: throughput ratio = strategy requests/s / vanilla requests/s; TTFT speedup = vanilla mean TTFT /
  strategy mean TTFT.

Writes `table.md`, `results.json` (every request's numbers) and `run.json` (command, versions, device, dtype,
threads, engine arguments, environment, load average) to `--output` and prints the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LLAVA_STRATEGIES = ("fastervlm", "visionzip", "random", "pool", "divprune")  # servable on LLaVA (policy.SERVABLE)
DEFAULT_KEEP, QUICK_KEEP = 64, 16
DEFAULT_CONCURRENCY, QUICK_CONCURRENCY = (1, 4, 16), (1, 4)
QUICK_NEW_TOKENS = 4
PREFIX_WORDS = 6  # text tokens before the image, as vlmeff bench (eval/bench.py PREFIX_TOKENS)
STAMP = "vlmeff-serve-bench.json"
QUICK_TEXT_HEADS = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32)  # = vlmeff.serve.testing
BATCH_COLUMNS = ("strategy", "visual tokens", "prompt tokens", "concurrency", "wall s", "requests/s",
                 "output tokens/s", "throughput ratio", "TTFT min ms", "TTFT mean ms", "TTFT max ms", "TTFT speedup",
                 "TPOT ms")


class ServeBenchOptionError(ValueError):
    """An option value the benchmark does not accept (the message names option, value and what is accepted)."""


@dataclass
class ServeBenchConfig:
    strategies: list[str] | None = None  # specs; None -> LLAVA_STRATEGIES; vanilla always runs
    keep: int | None = None  # budget for specs without one; None -> 64 (quick: 16)
    concurrency: list[int] | None = None  # None -> 1,4,16 (quick: 1,4)
    rounds: int = 2
    warmup: int = 1
    new_tokens: int | None = None  # None -> 16 (quick: 4)
    text_tokens: int = 40
    quick: bool = False
    dtype: str = "bfloat16"
    threads: int | None = None
    model_dir: str | None = None  # None -> runs/serve-bench-model (quick: runs/serve-bench-model-quick)
    max_num_batched_tokens: int = 4096  # vLLM's CPU default for the LLM class
    max_model_len: int | None = None  # None -> prompt + new tokens, rounded up to 128
    kv_cache_gb: int = 1
    compile: bool = False
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.keep is None:
            self.keep = QUICK_KEEP if self.quick else DEFAULT_KEEP
        if self.concurrency is None:
            self.concurrency = list(QUICK_CONCURRENCY if self.quick else DEFAULT_CONCURRENCY)
        if self.new_tokens is None:
            self.new_tokens = 16 if not self.quick else QUICK_NEW_TOKENS
        if self.model_dir is None:
            self.model_dir = "runs/serve-bench-model" + ("-quick" if self.quick else "")

    def check(self) -> None:
        checks = [
            ("keep", self.keep, self.keep >= 1, "an integer >= 1"),
            ("concurrency", self.concurrency, bool(self.concurrency) and min(self.concurrency) >= 1,
             "a non-empty comma-separated list of integers >= 1"),
            ("rounds", self.rounds, self.rounds >= 1, "an integer >= 1"),
            ("warmup", self.warmup, self.warmup >= 0, "an integer >= 0"),
            ("new_tokens", self.new_tokens, self.new_tokens >= 2, "an integer >= 2 (decode time needs two tokens)"),
            ("text_tokens", self.text_tokens, self.text_tokens > PREFIX_WORDS, f"an integer > {PREFIX_WORDS}"),
            ("dtype", self.dtype, self.dtype in ("bfloat16", "float16", "float32"), "bfloat16, float16 or float32"),
            ("threads", self.threads, self.threads is None or self.threads >= 1, "an integer >= 1"),
            ("max_num_batched_tokens", self.max_num_batched_tokens, self.max_num_batched_tokens >= 64,
             "an integer >= 64"),
            ("kv_cache_gb", self.kv_cache_gb, self.kv_cache_gb >= 1, "an integer >= 1 (VLLM_CPU_KVCACHE_SPACE, GB)"),
        ]
        for name, value, ok, accepted in checks:
            if not ok:
                raise ServeBenchOptionError(f"{name}={value!r}: expected {accepted}")


def plan_specs(strategies: Sequence[str] | None, keep: int) -> list[str]:
    """vanilla first, then each strategy at `keep` (a spec that gives its own budget stays as given), canonical,
    without duplicates; every spec is checked to run inside vLLM on LLaVA before anything is built."""
    from vlmeff.eval.runner import budgeted
    from vlmeff.serve.policy import resolve

    specs = ["vanilla"]
    for strategy in strategies or LLAVA_STRATEGIES:
        for spec in budgeted(strategy, [keep]):
            if spec not in specs:
                resolve("" if spec == "vanilla" else spec, "llava", True)  # ServeError with the reason
                specs.append(spec)
    return specs


# ------------------------------------------------------------------------------------------------------- model


def serve_bench_config(quick: bool = False):
    """`vlmeff bench`'s LlavaConfig; quick: its tiny one with text heads of 32 dims for vLLM's CPU attention."""
    from vlmeff.eval.bench import bench_model_config

    config = bench_model_config(quick)
    if quick:
        for key, value in QUICK_TEXT_HEADS.items():
            setattr(config.text_config, key, value)
    return config


def special_tokens(config) -> dict[int, str]:
    """id -> token text of the config's special ids (Qwen2's names where the full config uses Qwen2's ids)."""
    tc = config.text_config
    names = {tc.bos_token_id: "<|endoftext|>", tc.eos_token_id: "<|im_end|>", config.image_token_id: "<image>"}
    names.setdefault(tc.pad_token_id, "<|pad|>")
    return names


def build_tokenizer(config):
    """A word-level tokenizer with exactly the LM's vocabulary size: token i is "w{i}" except the config's special
    ids, so every id the LM can emit decodes and the ids of the config are the tokenizer's (built offline)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tc = config.text_config
    specials = special_tokens(config)
    vocab = {specials.get(i, f"w{i}"): i for i in range(tc.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[tc.pad_token_id]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=specials[tc.bos_token_id], eos_token=specials[tc.eos_token_id],
        pad_token=specials[tc.pad_token_id], unk_token=specials[tc.pad_token_id],
        model_max_length=tc.max_position_embeddings)
    if len(tokenizer) != tc.vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, the LM {tc.vocab_size}")
    return tokenizer


def build_processor(config):
    """LlavaProcessor (CLIP image processor at the tower's size, [CLS] dropped: "default") around `build_tokenizer`."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    from vlmeff.testing import LLAVA_CHAT_TEMPLATE

    vc = config.vision_config
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": vc.image_size},
                                            crop_size={"height": vc.image_size, "width": vc.image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(config),
                          patch_size=vc.patch_size,
                          vision_feature_select_strategy=config.vision_feature_select_strategy,
                          num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)


def _stamp(config, seed: int) -> dict[str, Any]:
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return {"config_sha256": hashlib.sha256(text.encode()).hexdigest(), "seed": seed, "weights_dtype": "bfloat16"}


def ensure_model(path: str | Path, quick: bool = False, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Save the benchmark model (bfloat16, seeded) + processor to `path` unless a matching one is there; returns its
    info (parameter counts, whether it was built now, build seconds)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    path = Path(path)
    config = serve_bench_config(quick)
    stamp = _stamp(config, seed)
    stamp_file = path / STAMP
    if stamp_file.is_file():
        saved = json.loads(stamp_file.read_text())
        if {k: saved.get(k) for k in stamp} == stamp:
            return {**saved, "built_now": False, "path": str(path)}
    started = time.perf_counter()
    if progress:
        print(f"building the benchmark model in {path} (once; reused while config and seed match)", file=sys.stderr)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    params = {"vision_tower": count(model.model.vision_tower), "projector": count(model.model.multi_modal_projector),
              "language_model": count(model.model.language_model), "lm_head": count(model.lm_head),
              "total": count(model)}
    path.mkdir(parents=True, exist_ok=True)
    if stamp_file.exists():
        stamp_file.unlink()
    model.save_pretrained(path)
    build_processor(config).save_pretrained(path)
    vc, tc = config.vision_config, config.text_config
    info = {**stamp, "quick": quick, "params": params,
            "name": "llava-1.5-shape tiny (quick)" if quick else "llava-1.5-shape: CLIP ViT-L/14-336 + Qwen2-0.5B LM",
            "visual_tokens": (vc.image_size // vc.patch_size) ** 2, "image_size": vc.image_size,
            "text": {**{k: getattr(tc, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                    "num_key_value_heads", "vocab_size")},
                     "head_dim": getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads},
            "build_s": time.perf_counter() - started}
    del model
    stamp_file.write_text(json.dumps(info, indent=1))  # last: a half-written folder is never reused
    return {**info, "built_now": True, "path": str(path)}


# ---------------------------------------------------------------------------------------------------- requests


def make_request(config, spec: str, seed: int, text_tokens: int) -> dict[str, Any]:
    """One request: a random image of the tower's size and `text_tokens` random words around `<image>`."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    size = config.vision_config.image_size
    image = Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8))
    tc = config.text_config
    high = min(set(special_tokens(config)) | {tc.vocab_size})  # words stay below every special id
    words = [f"w{i}" for i in rng.randint(0, high, text_tokens)]
    prompt = " ".join(words[:PREFIX_WORDS] + ["<image>"] + words[PREFIX_WORDS:])
    return {"prompt": prompt, "multi_modal_data": {"image": image}, "mm_processor_kwargs": {"vlmeff_strategy": spec}}


def run_batch(llm, config, spec: str, n: int, seed: int, cfg: ServeBenchConfig, params) -> dict[str, Any]:
    """Submit n requests of `spec` together (one LLM.generate call); per-request TTFT from vLLM's metrics."""
    requests = [make_request(config, spec, seed * 1000 + i, cfg.text_tokens) for i in range(n)]
    t_submit = time.time()
    started = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    wall = time.perf_counter() - started
    per_request = []
    for out in outputs:
        m = out.metrics
        if m is None or not m.first_token_latency:
            raise RuntimeError("vLLM returned no per-request metrics (the engine needs disable_log_stats=False)")
        tokens = len(out.outputs[0].token_ids)
        per_request.append({
            "prompt_tokens": len(out.prompt_token_ids), "output_tokens": tokens,
            "ttft_s": m.arrival_time + m.first_token_latency - t_submit,  # from the batch's submission
            "first_token_latency_s": m.first_token_latency,  # vLLM's: from this request's arrival
            "arrival_offset_s": m.arrival_time - t_submit,
            "queued_s": m.scheduled_ts - m.queued_ts, "prefill_s": m.first_token_ts - m.scheduled_ts,
            "tpot_s": (m.last_token_ts - m.first_token_ts) / (tokens - 1) if tokens > 1 else float("nan"),
            "e2e_s": m.last_token_ts - m.queued_ts, "num_preemptions": m.num_preemptions,
        })
    return {"spec": spec, "concurrency": n, "seed": seed, "wall_s": wall, "requests": per_request}


# --------------------------------------------------------------------------------------------------- the run


def _setup_environment(cfg: ServeBenchConfig) -> dict[str, str]:
    """Environment of the in-process CPU engine, set before torch's thread pool and vLLM start."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gb))
    if cfg.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(cfg.threads)
    import torch

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    keys = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS",
            "VLLM_CPU_OMP_THREADS_BIND", "LD_PRELOAD")
    return {k: os.environ[k] for k in keys if k in os.environ}


def _quiet_thread_warning() -> None:
    """vLLM's multimodal processing asks torch for a thread count per request, which the CPU worker (having fixed
    the threads) answers with one warning each time: drop that one message."""
    import logging

    class _Drop(logging.Filter):
        def filter(self, record):
            return "torch.set_num_threads" not in record.getMessage()

    logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_Drop())


def engine_kwargs(cfg: ServeBenchConfig, model_dir: str, max_model_len: int) -> dict[str, Any]:
    return dict(model=model_dir, dtype=cfg.dtype, enforce_eager=not cfg.compile, max_model_len=max_model_len,
                seed=cfg.seed, limit_mm_per_prompt={"image": 1}, enable_prefix_caching=False,
                enable_chunked_prefill=True, max_num_batched_tokens=cfg.max_num_batched_tokens,
                max_num_seqs=max(cfg.concurrency), disable_log_stats=False)


def run_serve_bench(cfg: ServeBenchConfig) -> dict[str, Any]:
    cfg.check()
    specs = plan_specs(cfg.strategies, cfg.keep)  # a refused spec fails here, before anything is built
    environment = _setup_environment(cfg)
    import torch

    load_start = os.getloadavg()
    info = ensure_model(cfg.model_dir, cfg.quick, cfg.seed, cfg.progress)
    config = serve_bench_config(cfg.quick)
    visual = info["visual_tokens"]
    max_model_len = cfg.max_model_len or -(-(visual + cfg.text_tokens + cfg.new_tokens) // 128) * 128

    from vllm import LLM, SamplingParams

    from vlmeff.serve import vllm_kwargs

    kwargs = engine_kwargs(cfg, str(cfg.model_dir), max_model_len)
    started = time.perf_counter()
    llm = LLM(**kwargs, **vllm_kwargs(None))
    _quiet_thread_warning()
    init_s = time.perf_counter() - started
    params = SamplingParams(max_tokens=cfg.new_tokens, ignore_eos=True, temperature=0.0)
    say = (lambda text: print(f"[serve-bench] {text}", file=sys.stderr, flush=True)) if cfg.progress else (
        lambda text: None)
    say(f"engine ready in {init_s:.1f} s ({cfg.dtype}, {torch.get_num_threads()} threads); specs: {', '.join(specs)}")

    seed = 1  # every batch its own seeds: no image or prompt repeats
    t_bench = time.perf_counter()
    warmup = []
    for _ in range(cfg.warmup):
        for spec in specs:
            warmup.append(run_batch(llm, config, spec, 1, seed, cfg, params))
            seed += 1
        spec = specs[1] if len(specs) > 1 else specs[0]
        warmup.append(run_batch(llm, config, spec, max(cfg.concurrency), seed, cfg, params))
        seed += 1
    say(f"warm-up done in {time.perf_counter() - t_bench:.1f} s")
    batches = []
    for n in cfg.concurrency:
        for r in range(cfg.rounds):
            shift = (len(batches) // len(specs)) % len(specs)
            for spec in specs[shift:] + specs[:shift]:
                batch = run_batch(llm, config, spec, n, seed, cfg, params)
                batch["round"] = r
                batches.append(batch)
                seed += 1
                say(f"{spec} x{n} round {r + 1}: {batch['wall_s']:.2f} s")
    bench_s = time.perf_counter() - t_bench
    import vllm

    from vlmeff.eval.bench import device_name

    return {"model": info, "config": asdict(cfg),
            "specs": specs, "engine": {**kwargs, "init_s": init_s, "hf_overrides": "vlmeff.serve.vllm_kwargs(None)"},
            "environment": environment, "threads": torch.get_num_threads(), "batches": batches, "warmup": warmup,
            "rows": summarize(batches, specs, cfg.concurrency, cfg.text_tokens), "bench_s": bench_s,
            "load_average": {"start": load_start, "end": os.getloadavg()}, "vllm": vllm.__version__,
            "device": device_name(torch.device("cpu"))}


def _median(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]
    return float(statistics.median(values)) if values else float("nan")


def summarize(batches: list[dict], specs: Sequence[str], concurrency: Sequence[int],
              text_tokens: int) -> list[dict[str, Any]]:
    """One row per (concurrency, spec): medians over rounds of each batch's totals; ratios against vanilla."""
    rows = []
    for n in concurrency:
        level = []
        for spec in specs:
            mine = [b for b in batches if b["spec"] == spec and b["concurrency"] == n]
            if not mine:
                continue
            per = [b["requests"] for b in mine]
            prompt = _median([r["prompt_tokens"] for reqs in per for r in reqs])
            level.append({
                "spec": spec, "concurrency": n, "rounds": len(mine), "prompt_tokens": prompt,
                "visual_tokens": prompt - text_tokens,
                "wall_s": _median([b["wall_s"] for b in mine]),
                "requests_per_s": _median([len(b["requests"]) / b["wall_s"] for b in mine]),
                "output_tokens_per_s": _median([sum(r["output_tokens"] for r in b["requests"]) / b["wall_s"]
                                                for b in mine]),
                "ttft_min_s": _median([min(r["ttft_s"] for r in reqs) for reqs in per]),
                "ttft_mean_s": _median([statistics.fmean(r["ttft_s"] for r in reqs) for reqs in per]),
                "ttft_max_s": _median([max(r["ttft_s"] for r in reqs) for reqs in per]),
                "tpot_s": _median([statistics.fmean(r["tpot_s"] for r in reqs) for reqs in per]),
            })
        base = next((row for row in level if row["spec"] == "vanilla"), None)
        for row in level:
            row["throughput_ratio"] = row["requests_per_s"] / base["requests_per_s"] if base else float("nan")
            row["ttft_speedup"] = base["ttft_mean_s"] / row["ttft_mean_s"] if base else float("nan")
        rows.extend(level)
    return rows


# ---------------------------------------------------------------------------------------------------- reports


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{
        "strategy": r["spec"], "visual tokens": f"{r['visual_tokens']:.0f}",
        "prompt tokens": f"{r['prompt_tokens']:.0f}", "concurrency": str(r["concurrency"]),
        "wall s": f"{r['wall_s']:.2f}", "requests/s": f"{r['requests_per_s']:.3f}",
        "output tokens/s": f"{r['output_tokens_per_s']:.2f}", "throughput ratio": f"{r['throughput_ratio']:.2f}",
        "TTFT min ms": f"{r['ttft_min_s'] * 1e3:.0f}", "TTFT mean ms": f"{r['ttft_mean_s'] * 1e3:.0f}",
        "TTFT max ms": f"{r['ttft_max_s'] * 1e3:.0f}", "TTFT speedup": f"{r['ttft_speedup']:.2f}",
        "TPOT ms": f"{r['tpot_s'] * 1e3:.1f}",
    } for r in rows]


def markdown_report(results: dict[str, Any]) -> str:
    cfg, model = results["config"], results["model"]
    params = model.get("params", {})
    lines = [
        f"# vLLM serving benchmark ({model.get('name', '')})", "",
        f"vLLM {results['vllm']} (CPU), {results['device']}, {cfg['dtype']}, {results['threads']} threads, "
        f"{'eager' if not cfg['compile'] else 'torch.compile'}, prefix caching off, chunked prefill "
        f"(max_num_batched_tokens {cfg['max_num_batched_tokens']}). Model: {params.get('total', 0) / 1e6:.1f}M "
        f"parameters, {model['visual_tokens']} visual tokens per image, random weights (cost only). Each request: one "
        f"{model['image_size']} px image + {cfg['text_tokens']} text tokens, exactly {cfg['new_tokens']} output "
        f"tokens (ignore_eos). N requests submitted together per batch; {cfg['rounds']} round(s) per concurrency "
        f"after {cfg['warmup']} warm-up pass(es), strategies interleaved. TTFT: from the batch's submission to each "
        f"request's first token (vLLM's per-request metrics), min / mean / max over the batch; TTFT speedup = "
        f"vanilla mean / strategy mean. TPOT: time per output token after the first, per request (stalls "
        f"behind other requests' prefill included), mean. Throughput ratio: requests/s against vanilla at the same "
        f"concurrency.",
        "", "| " + " | ".join(BATCH_COLUMNS) + " |", "|" + "---|" * len(BATCH_COLUMNS)]
    for row in table_rows(results["rows"]):
        lines.append("| " + " | ".join(row[c] for c in BATCH_COLUMNS) + " |")
    load = results["load_average"]
    lines += ["", f"Benchmark {results['bench_s']:.0f} s after engine start-up {results['engine']['init_s']:.0f} s; "
              f"load average {load['start'][0]:.2f} at the start, {load['end'][0]:.2f} at the end."]
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[str, Any], output: str | Path, argv: Sequence[str], wall_s: float) -> dict[str, Path]:
    import torch
    import transformers

    import vlmeff

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown_report(results))
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    run = {"command": "python -m vlmeff.serve.bench " + " ".join(argv), "seed": results["config"]["seed"],
           "time": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": wall_s,
           "versions": {"vlmeff": vlmeff.__version__, "vllm": results["vllm"], "torch": torch.__version__,
                        "transformers": transformers.__version__, "python": platform.python_version()},
           "platform": platform.platform(), "device": results["device"], "dtype": results["config"]["dtype"],
           "threads": results["threads"], "cpu_count": os.cpu_count(), "environment": results["environment"],
           "engine": results["engine"], "load_average": results["load_average"], "bench_s": results["bench_s"],
           "model": results["model"], "config": results["config"]}
    (out / "run.json").write_text(json.dumps(run, indent=1, default=str))
    return {"table": out / "table.md", "results": out / "results.json", "run": out / "run.json"}


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ServeBenchOptionError(f"--concurrency={text!r}: expected comma-separated integers, e.g. 1,4,16") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m vlmeff.serve.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model of the same classes (smoke test)")
    parser.add_argument("--strategy", action="append", default=None,
                        help=f"spec (repeatable); default: {', '.join(LLAVA_STRATEGIES)}; vanilla always runs")
    parser.add_argument("--keep", type=int, default=None, help="budget for specs without one (default 64; quick 16)")
    parser.add_argument("--concurrency", default=None, help="requests submitted together (default 1,4,16; quick 1,4)")
    parser.add_argument("--rounds", type=int, default=2, help="timed passes per concurrency (medians) (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes before (default 1)")
    parser.add_argument("--new-tokens", type=int, default=None, help="output tokens per request (default 16; quick 4)")
    parser.add_argument("--text-tokens", type=int, default=40, help="text tokens per prompt (default 40)")
    parser.add_argument("--dtype", default="bfloat16", help="engine dtype: bfloat16 (default), float16, float32")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP / torch threads (default: $OMP_NUM_THREADS, else torch's default)")
    parser.add_argument("--model-dir", default=None,
                        help="saved model folder, built once (default runs/serve-bench-model[-quick])")
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096, help="vLLM's token budget per step")
    parser.add_argument("--max-model-len", type=int, default=None, help="default: prompt + output, rounded up to 128")
    parser.add_argument("--kv-cache-gb", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE unless set (default 1)")
    parser.add_argument("--compile", action="store_true", help="vLLM's torch.compile instead of eager")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="runs/serve-bench")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --output")
    args = parser.parse_args(argv)
    from vlmeff.strategy import StrategyError

    started = time.perf_counter()
    try:
        output = Path(args.output)
        if output.exists() and any(output.iterdir()) and not args.force:
            raise ServeBenchOptionError(f"output folder {output} is not empty: pass --force, or a new --output")
        cfg = ServeBenchConfig(
            strategies=args.strategy, keep=args.keep,
            concurrency=_int_list(args.concurrency) if args.concurrency else None, rounds=args.rounds,
            warmup=args.warmup, new_tokens=args.new_tokens, text_tokens=args.text_tokens, quick=args.quick,
            dtype=args.dtype, threads=args.threads, model_dir=args.model_dir,
            max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
            kv_cache_gb=args.kv_cache_gb, compile=args.compile, seed=args.seed)
        cfg.check()
        results = run_serve_bench(cfg)
    except (ServeBenchOptionError, StrategyError) as e:  # StrategyError: a spec vLLM cannot run (the reason)
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = write_outputs(results, args.output, argv, time.perf_counter() - started)
    print(paths["table"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())} ({time.perf_counter() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
