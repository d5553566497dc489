"""The efficiency benchmark behind `vlmeff bench`: time, memory and FLOPs of each strategy on a LLaVA-1.5-shaped model.

What it measures (one model, one prompt, random weights: the numbers are about cost, never about answers):

* **Model.** `LlavaForConditionalGeneration` built from a config, seeded random init, no download:
  a CLIP ViT-L/14-336-shaped tower (hidden 1024, 24 blocks, 16 heads, MLP 4096, 336 px, patch 14 -> 24 x 24 = 576
  visual tokens, `vision_feature_layer=-2`, "default" select) and a Qwen2-0.5B-shaped LM (hidden 896, 24 layers,
  14 heads, 2 KV heads, MLP 4864, vocab 151936) with an untied LM head, so the LM holds 630M parameters
  (494M with Qwen's tied head, just under the 0.5B the issue asks for). `--quick` builds a tiny model of the same
  classes (64 visual tokens) for smoke tests.
* **Input.** One prompt of `--text-tokens` random text ids (6 before the image, the rest after it) around the
  576 image placeholders (`config.image_token_id`), and one random `pixel_values` image [1, 3, 336, 336].
* **Calls.** Every measurement is one `vm.generate(..., max_new_tokens=N, min_new_tokens=N, do_sample=False)` of
  the wrapper (`vlmeff.wrap(model, None, spec)`), N = `--new-tokens` (exactly N tokens: EOS is suppressed until N).
  From its `RunStats`:
  - prefill time = `stats.prefill_s` = vision encode + strategies + the first LLM forward (time to first token),
    i.e. the same forward a `max_new_tokens=1` generate runs; the LM head runs on the last position only, as the
    FLOP count assumes (a plain `vm(**inputs)` forward would compute logits on every position);
  - decode time per token = (`total_s` - `prefill_s`) / (N - 1);
  - strategy overhead = `stats.strategy_s` (scores, selection and the splice of the reduced batch; vanilla pays
    the splice too). A vision-stage strategy (FlowCut) does its work inside the encoder's block loop, so that
    part is in `encode_s`, not in the overhead column;
  - FLOPs = `stats.flops["total"]` (analytic prefill FLOPs, vlmeff.flops) and `stats.flops_vanilla["total"]`;
    FLOP ratio = vanilla / strategy; measured speedup = median vanilla prefill / median strategy prefill.
* **Order.** A warm-up pass over all strategies, then `--runs` passes, each running every strategy once
  (interleaved, so that a drift in machine load hits every row alike); times are medians over the passes.
* **Peak memory**, in one extra pass after the timed ones (so the sampler never disturbs a timed call):
  CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (absolute peak, and its increase over
  what was allocated before the call: activations + KV cache). CPU: the process RSS sampled every millisecond by
  a background thread (psutil, else /proc/self/statm), after `gc.collect()` and glibc `malloc_trim(0)`; the
  increase over the RSS just before the call is a lower bound of the call's peak allocation (memory the
  allocator had kept from earlier calls and reuses does not show up as an increase).
* **In-LLM strategies** (a stage of "in_llm") need no special case: their rows report the wrapper's
  `stats.equivalent_tokens` (layer-averaged kept visual tokens) when the wrapper exposes it; otherwise the
  "equiv. tokens" column repeats the kept count and says so.
* **Batch test.** `--batch-size` samples with ragged kept counts (1 or 2 images per sample, so 1 or 2 x the
  budget of visual tokens, and different text lengths, left-padded) with one strategy (default: `atp` when
  registered, else fastervlm at the smallest budget), three ways interleaved run by run: as one padded batch, as
  length buckets (`vlmeff.batching.length_batches`, at most 10 % padding per batch) and one by one; throughput =
  samples / wall time of the generate calls (`stats.total_s`, prepare included), median over the passes, plus the
  paired per-run ratio with its 95 % interval.
* **Targets** (issue): measured prefill speedup >= 0.9 x FLOP ratio at the smallest budget (64 by default) for
  strategies that reduce before the LLM (vision and pre-LLM stages); strategy overhead <= 2 % of prefill;
  length-bucketed batches >= 1.3 x one-by-one throughput and >= 1.0 x its prefill. Each is marked met / missed.
* **Clock.** CPU: perf_counter. CUDA: events read after the call (`vlmeff.timing`), no synchronisation between
  the parts. `--kernels` measures the token gather's bandwidth instead (`vlmeff.eval.kernel_bench`).

Output (`--output`, default runs/bench): table.md, results.json (every call's raw numbers) and run.json
(exact command, versions, device, dtype, threads, load average).
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vlmeff.eval.intervals import ratio_interval

DEFAULT_STRATEGIES = ("fastervlm", "flowcut", "visionzip", "aim", "random", "pool")
DEFAULT_BUDGETS = (192, 128, 64)
QUICK_BUDGETS = (24, 16, 8)  # the quick model has 64 visual tokens
SPEEDUP_TARGET = 0.9  # measured speedup >= 0.9 x FLOP ratio at the smallest budget
OVERHEAD_TARGET = 0.02  # strategy_s <= 2 % of prefill_s
BUCKET_PADDING = 0.1  # length buckets of the batch test: padded tokens <= 1.1 x real tokens per batch
BATCH_THROUGHPUT_TARGET = 1.3  # length-bucketed batches: samples/s >= 1.3 x one by one
BATCH_PREFILL_TARGET = 1.0  # ... and prefill per sample no slower than one by one
PREFIX_TOKENS = 6  # text tokens before the first image
REDUCE_BEFORE_LLM = {"vision", "pre_llm"}
MIB = 2**20


class BenchOptionError(ValueError):
    """A benchmark option with a value it does not accept (the message names option, value and what is accepted)."""


# ------------------------------------------------------------------------------------------------------ options


@dataclass
class BenchConfig:
    """Options of one benchmark run (the CLI flags of `vlmeff bench`)."""

    strategies: list[str] | None = None  # specs; None -> DEFAULT_STRATEGIES. vanilla always runs first
    budgets: list[int] | None = None  # kept tokens per image for budget-less specs; None -> 192,128,64 (quick: 24,16,8)
    runs: int = 3  # timed passes (>= 1); times are medians over them
    warmup: int = 1  # untimed passes before (>= 0)
    new_tokens: int = 16  # generated tokens per call (>= 2, decode time needs two)
    batch_size: int = 8  # samples in the batch test (0 skips it; 1 is refused: nothing to compare)
    batch_strategy: str | None = None  # None -> "atp" when registered, else fastervlm at the smallest budget
    quick: bool = False  # tiny model (smoke test)
    dtype: str = "bfloat16"
    device: str | None = None  # None -> cuda when available, else cpu
    threads: int | None = None  # torch.set_num_threads (None: leave torch's default)
    text_tokens: int = 40  # text tokens of the single-sample prompt (>= PREFIX_TOKENS + 1)
    seed: int = 0
    progress: bool = True
    save: str | None = None  # save_pretrained the built model here

    def check(self) -> None:
        """Raise BenchOptionError naming the argument, its value and what is accepted."""
        from vlmeff.loading import DTYPES

        checks = [
            ("runs", self.runs, self.runs >= 1, "an integer >= 1"),
            ("warmup", self.warmup, self.warmup >= 0, "an integer >= 0"),
            ("new_tokens", self.new_tokens, self.new_tokens >= 2, "an integer >= 2 (decode time needs 2 tokens)"),
            ("batch_size", self.batch_size, self.batch_size == 0 or self.batch_size >= 2,
             "0 (skip the batch test) or an integer >= 2"),
            ("text_tokens", self.text_tokens, self.text_tokens > PREFIX_TOKENS, f"an integer > {PREFIX_TOKENS}"),
            ("dtype", self.dtype, self.dtype in DTYPES and self.dtype != "auto",
             ", ".join(k for k in DTYPES if k != "auto")),
            ("threads", self.threads, self.threads is None or self.threads >= 1, "an integer >= 1"),
            ("budgets", self.budgets, self.budgets is None or (len(self.budgets) > 0 and min(self.budgets) >= 1),
             "a non-empty list of integers >= 1"),
        ]
        for name, value, ok, accepted in checks:
            if not ok:
                raise BenchOptionError(f"{name}={value!r}: expected {accepted}")
        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise BenchOptionError(f"device={self.device!r}: expected cpu, cuda or cuda:N")

    @property
    def budget_list(self) -> list[int]:
        return list(self.budgets) if self.budgets else list(QUICK_BUDGETS if self.quick else DEFAULT_BUDGETS)


# -------------------------------------------------------------------------------------------------------- model


def bench_model_config(quick: bool = False):
    """The LlavaConfig of the benchmark model (see the module docstring); quick: a tiny one of the same classes."""
    from transformers import CLIPVisionConfig, LlavaConfig, Qwen2Config

    if quick:
        vocab, specials = 1024, {"bos": 1000, "eos": 1001, "pad": 1002, "image": 1003}
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                  image_size=112, patch_size=14, projection_dim=64)
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=2048)  # 4 layers: room for in-LLM pruning
    else:  # CLIP ViT-L/14-336 + Qwen2-0.5B shapes; special ids where Qwen2's tokenizer keeps them
        vocab, specials = 151936, {"bos": 151643, "eos": 151645, "pad": 151643, "image": 151646}
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                                  hidden_act="quick_gelu", layer_norm_eps=1e-5)
        text = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6)
    text_config = Qwen2Config(**text, vocab_size=vocab, tie_word_embeddings=False, bos_token_id=specials["bos"],
                              eos_token_id=specials["eos"], pad_token_id=specials["pad"])
    return LlavaConfig(vision_config=vision, text_config=text_config, image_token_id=specials["image"],
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", tie_word_embeddings=False)


def resolve_device(device: str | None) -> torch.device:
    """--device (None: auto) through `vlmeff.loading.resolve_device`, its refusal as a bench option error."""
    from vlmeff.loading import resolve_device as resolve

    try:
        return torch.device(resolve(device or "auto"))
    except ValueError as e:
        raise BenchOptionError(str(e)) from None


def build_bench_model(quick: bool = False, dtype: str = "bfloat16", device: str | torch.device = "cpu",
                      seed: int = 0):
    """Seeded random-init LLaVA of `bench_model_config(quick)` in `dtype` on `device`; returns (model, info)."""
    from transformers import LlavaForConditionalGeneration

    from vlmeff.loading import DTYPES

    config = bench_model_config(quick)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=DTYPES[dtype], attn_implementation="sdpa")
    model.eval()

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    inner = model.model
    params = {"vision_tower": count(inner.vision_tower), "projector": count(inner.multi_modal_projector),
              "language_model": count(inner.language_model), "lm_head": count(model.lm_head)}
    params["lm_total"] = params["language_model"] + params["lm_head"]
    params["total"] = count(model)
    vc = config.vision_config
    info = {
        "name": "llava-1.5-shape tiny (quick)" if quick else "llava-1.5-shape: CLIP ViT-L/14-336 + Qwen2-0.5B LM",
        "params": params, "dtype": str(model.dtype).replace("torch.", ""), "device": str(model.device),
        "visual_tokens": visual_tokens_per_image(config), "image_size": vc.image_size, "seed": seed,
        "vision": {k: getattr(vc, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                               "intermediate_size", "image_size", "patch_size")},
        "text": {k: getattr(config.text_config, k) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                             "num_attention_heads", "num_key_value_heads",
                                                             "intermediate_size", "vocab_size")},
    }
    return model, info


def visual_tokens_per_image(config) -> int:
    """Placeholder tokens per image of a LLaVA config: (image_size / patch_size)^2 (+1 [CLS] for "full")."""
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n + (1 if config.vision_feature_select_strategy == "full" else 0)


def build_inputs(config, text_lengths: Sequence[int], images_per_sample: Sequence[int], *, seed: int = 0,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Prompt tensors without a processor, left-padded like a processor with padding_side="left".

    Sample i: PREFIX_TOKENS random text ids, then its images (each a run of `visual_tokens_per_image` placeholders
    `config.image_token_id`, one text id between two images), then random text up to `text_lengths[i]` text tokens.
    Returns input_ids [B, L] (int64), attention_mask [B, L] (1 = token, 0 = left padding) and
    pixel_values [sum(images_per_sample), 3, S, S] (standard normal, `dtype`), all on `device`.
    """
    if len(text_lengths) != len(images_per_sample):
        raise ValueError(f"text_lengths has {len(text_lengths)} entries but images_per_sample {len(images_per_sample)}")
    tc = config.text_config
    specials = {i for i in (tc.bos_token_id, tc.eos_token_id, tc.pad_token_id, config.image_token_id) if i is not None}
    high = min(specials | {tc.vocab_size})  # random text ids stay below every special id
    per_image = visual_tokens_per_image(config)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n_text, n_img in zip(text_lengths, images_per_sample):
        separators = max(0, n_img - 1)
        if n_img < 0 or n_text < PREFIX_TOKENS + separators + 1:
            raise ValueError(f"text_lengths entry {n_text} with {n_img} images: expected images >= 0 and at least "
                             f"{PREFIX_TOKENS + separators + 1} text tokens")
        text = torch.randint(0, high, (n_text,), generator=gen)
        parts = [text[:PREFIX_TOKENS]]
        for j in range(n_img):
            if j:
                parts.append(text[PREFIX_TOKENS + j - 1:PREFIX_TOKENS + j])
            parts.append(torch.full((per_image,), config.image_token_id))
        parts.append(text[PREFIX_TOKENS + separators:])
        rows.append(torch.cat(parts))
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), tc.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, length - len(r):] = r
        attention_mask[i, length - len(r):] = 1
    size = config.vision_config.image_size
    pixel_values = torch.randn(sum(images_per_sample), 3, size, size, generator=gen).to(dtype)
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if sum(images_per_sample):
        out["pixel_values"] = pixel_values
    return {k: v.to(device) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------------- memory


def _rss_reader():
    """A function returning the process RSS in bytes (psutil, else /proc/self/statm), or None if neither works."""
    try:
        import psutil

        proc = psutil.Process()
        return lambda: proc.memory_info().rss
    except ImportError:
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/statm") as f:
            f.read()

        def statm() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

        return statm
    except (OSError, ValueError, AttributeError):
        return None


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so that a later RSS increase shows the call's own peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of the block it wraps, in bytes: `peak` (absolute) and `delta` (increase over the start).

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats; delta = peak - memory_allocated at entry.
    CPU: process RSS sampled every `interval_s` by a daemon thread; delta = max RSS - RSS at entry (after
    gc.collect and malloc_trim): a lower bound of the block's peak allocation. `method` names what was used;
    peak and delta stay None when nothing can measure memory here.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.001):
        self.device = device
        self.interval_s = interval_s
        self.peak: int | None = None
        self.delta: int | None = None
        self.method = "none"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._max = 0
        self._read = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        _malloc_trim()
        self._read = _rss_reader()
        if self._read is None:
            return self
        self.method = f"RSS sampled every {self.interval_s * 1e3:g} ms"
        self._base = self._max = self._read()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._read())
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.delta = self.peak - self._base
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, self._read())
            self.peak, self.delta = self._max, self._max - self._base


# ------------------------------------------------------------------------------------------------- measurements


def strategy_stages(spec: str) -> list[str]:
    """Stage values of the strategies in `spec` ([] for vanilla)."""
    from vlmeff.spec import parse_spec

    return [s.stage.value for s in parse_spec(spec)]


def measure_call(model, spec: str, inputs: dict[str, torch.Tensor], new_tokens: int,
                 memory: bool = False) -> dict[str, Any]:
    """One `vm.generate` of `spec` on `inputs`; returns the call's numbers (times in s, FLOPs, tokens, memory)."""
    import vlmeff

    tc = model.config.text_config
    vm = vlmeff.wrap(model, None, spec)
    tracker = PeakMemory(model.device) if memory else None
    try:
        if tracker is not None:
            tracker.__enter__()
        try:
            vm.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                        pad_token_id=tc.pad_token_id)
        finally:
            if tracker is not None:
                tracker.__exit__(None, None, None)
        stats, records = vm.stats, vm.last_record
    finally:
        vm.unwrap()
    images = max(1, len(records))
    per_sample_kept: dict[int, int] = {}
    for r in records:
        per_sample_kept[r.sample] = per_sample_kept.get(r.sample, 0) + r.num_kept
    out = {
        "prefill_s": stats.prefill_s, "encode_s": stats.encode_s, "strategy_s": stats.strategy_s,
        "llm_prefill_s": stats.llm_prefill_s, "total_s": stats.total_s, "new_tokens": stats.new_tokens,
        "decode_s_per_token": (stats.total_s - stats.prefill_s) / max(1, stats.new_tokens - 1),
        "flops": dict(stats.flops), "flops_vanilla": dict(stats.flops_vanilla),
        "images": len(records), "visual_tokens_in": stats.visual_tokens_in,
        "visual_tokens_kept": stats.visual_tokens_kept, "kept_per_image": stats.visual_tokens_kept / images,
        "kept_per_sample": [per_sample_kept.get(i, 0) for i in range(inputs["input_ids"].shape[0])],
        "text_tokens": stats.text_tokens,
    }
    equivalent = float(stats.equivalent_tokens)  # layer-averaged visual tokens, summed over the batch
    out["equivalent_total"] = equivalent
    out["equivalent_per_image"] = equivalent / images
    if tracker is not None:
        out.update({"peak_bytes": tracker.peak, "peak_delta_bytes": tracker.delta, "memory_method": tracker.method})
    return out


@dataclass
class SpecPlan:
    spec: str
    budget: int | None  # the --budgets value it was expanded with (None: vanilla or an explicit budget)
    stages: list[str] = field(default_factory=list)


def plan_specs(strategies: Sequence[str] | None, budgets: Sequence[int]) -> list[SpecPlan]:
    """vanilla first, then every strategy once per budget (`vlmeff.eval.runner.budgeted`), without duplicates.

    A spec that sets its first strategy's budget (one of its `budget_params`: keep=, ratio=, ...), a YAML file, a
    preset, or a strategy without a `keep` budget (e.g. atp, whose counts are instance-adaptive) runs once as given."""
    from vlmeff.eval.runner import budgeted, takes_budget

    plans = [SpecPlan("vanilla", None, [])]
    seen = {"vanilla"}
    for strategy in strategies or DEFAULT_STRATEGIES:
        per_budget = takes_budget(strategy)
        for i, spec in enumerate(budgeted(strategy, budgets)):
            if spec in seen:
                continue
            seen.add(spec)
            stages = strategy_stages(spec)
            plans.append(SpecPlan(spec, budgets[i] if per_budget and stages else None, stages))
    return plans


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summarize_spec(plan: SpecPlan, calls: list[dict], memory_call: dict | None) -> dict[str, Any]:
    """Medians over the timed calls of one spec (seconds, FLOPs, tokens; memory in bytes)."""
    first = calls[0]
    row: dict[str, Any] = {
        "spec": plan.spec, "stages": plan.stages, "budget": plan.budget, "runs": len(calls),
        "kept_per_image": first["kept_per_image"], "visual_tokens_in": first["visual_tokens_in"],
        "equivalent_per_image": first["equivalent_per_image"], "text_tokens": first["text_tokens"],
        "flops_total": first["flops"].get("total", 0), "flops_vanilla_total": first["flops_vanilla"].get("total", 0),
        "flops": first["flops"],
    }
    for key in ("prefill_s", "encode_s", "strategy_s", "llm_prefill_s", "total_s", "decode_s_per_token"):
        row[key] = _median([c[key] for c in calls])
    row["prefill_min_s"] = min(c["prefill_s"] for c in calls)  # the fastest run: least disturbed by other load
    row["flop_ratio"] = row["flops_vanilla_total"] / row["flops_total"] if row["flops_total"] else float("nan")
    row["overhead_frac"] = row["strategy_s"] / row["prefill_s"] if row["prefill_s"] else float("nan")
    row["peak_bytes"] = None if memory_call is None else memory_call["peak_bytes"]
    row["peak_delta_bytes"] = None if memory_call is None else memory_call["peak_delta_bytes"]
    row["memory_method"] = None if memory_call is None else memory_call["memory_method"]
    row["calls"] = calls
    return row


def add_targets(rows: list[dict], smallest_budget: int) -> None:
    """Speedup vs vanilla and the issue's targets (True = met, False = missed, None = not applicable)."""
    vanilla = next(r for r in rows if r["spec"] == "vanilla")
    for r in rows:
        r["speedup"] = vanilla["prefill_s"] / r["prefill_s"] if r["prefill_s"] else float("nan")
        r["speedup_min"] = vanilla["prefill_min_s"] / r["prefill_min_s"] if r["prefill_min_s"] else float("nan")
        r["speedup_over_flop_ratio"] = r["speedup"] / r["flop_ratio"] if r["flop_ratio"] else float("nan")
        # paired per pass (strategies are interleaved run by run): vanilla's prefill / this row's, same pass
        paired = [v["prefill_s"] / c["prefill_s"] for v, c in zip(vanilla["calls"], r["calls"]) if c["prefill_s"]]
        r["speedup_paired"], low, high = ratio_interval(paired)
        r["speedup_ci95"] = [low, high]
        stages = set(r["stages"])
        at_target_budget = r["budget"] == smallest_budget or (
            r["budget"] is None and r["kept_per_image"] <= smallest_budget)
        if r["spec"] != "vanilla" and stages and stages <= REDUCE_BEFORE_LLM and at_target_budget:
            target = SPEEDUP_TARGET * r["flop_ratio"]
            r["speedup_target_met"] = bool(r["speedup"] >= target)
            low, high = r["speedup_ci95"]
            # the paired interval straddles the target: this run cannot tell met from missed
            r["speedup_undecided"] = bool(math.isfinite(low) and math.isfinite(high) and low < target < high)
        else:
            r["speedup_target_met"] = None
        if r["spec"] == "vanilla" or "vision" in stages:  # vision-stage work is inside encode_s
            r["overhead_target_met"] = None
        else:
            r["overhead_target_met"] = bool(r["overhead_frac"] <= OVERHEAD_TARGET)


def batch_plan(batch_size: int, text_tokens: int) -> tuple[list[int], list[int]]:
    """Ragged batch: images per sample cycle 1,2,1,1,2,1,2,1; text lengths text_tokens + (11 i mod 37)."""
    pattern = [1, 2, 1, 1, 2, 1, 2, 1]
    images = [pattern[i % len(pattern)] for i in range(batch_size)]
    texts = [text_tokens + (11 * i) % 37 for i in range(batch_size)]
    return texts, images


def pick_batch_strategy(requested: str | None, smallest_budget: int) -> tuple[str, str]:
    """(spec, why): the requested spec, else `atp` when registered (its kept count varies per sample), else
    fastervlm at the smallest budget."""
    from vlmeff.registry import STRATEGIES
    from vlmeff.spec import build_pipeline, describe, parse_spec
    from vlmeff.strategy import StrategyError

    if requested:
        return describe(parse_spec(requested)), "requested"
    if "atp" in STRATEGIES.items():
        try:
            return describe(build_pipeline(parse_spec("atp"))), "atp is registered (per-sample kept counts)"
        except StrategyError as e:
            fallback = f"atp is registered but cannot run with its defaults ({e})"
    else:
        fallback = "atp is not registered"
    return (describe(parse_spec(f"fastervlm:keep={smallest_budget}")),
            f"{fallback}; ragged kept counts from 1 or 2 images per sample")


def sub_batch(batch: dict[str, torch.Tensor], images_per_sample: Sequence[int], rows: Sequence[int]
              ) -> dict[str, torch.Tensor]:
    """The samples `rows` of a left-padded batch as a batch of their own: their rows, left padding trimmed to the
    longest of them, and their images (in `rows` order)."""
    index = torch.tensor(list(rows), device=batch["input_ids"].device)
    mask = batch["attention_mask"][index]
    first = int((mask.sum(0) > 0).nonzero()[0])  # columns before it are padding in every row
    out = {"input_ids": batch["input_ids"][index][:, first:], "attention_mask": mask[:, first:]}
    starts = [0]
    for n in images_per_sample:
        starts.append(starts[-1] + n)
    images = [batch["pixel_values"][starts[i]:starts[i + 1]] for i in rows if images_per_sample[i]]
    if images:
        out["pixel_values"] = torch.cat(images)
    return out


def run_batch_test(model, spec: str, cfg: BenchConfig, bar: tqdm | None = None) -> dict[str, Any]:
    """The same `batch_size` samples three ways, interleaved run by run: as one left-padded batch, as length
    buckets (`vlmeff.batching.length_batches`, at most BUCKET_PADDING extra padded tokens per batch) and one by one;
    throughput ratios (samples/s) against one by one."""
    from vlmeff.batching import length_batches

    texts, images = batch_plan(cfg.batch_size, cfg.text_tokens)
    batch = build_inputs(model.config, texts, images, seed=cfg.seed + 1, device=model.device, dtype=model.dtype)
    lengths = batch["attention_mask"].sum(1).tolist()
    buckets = length_batches(lengths, cfg.batch_size, max_padding=BUCKET_PADDING)
    bucketed = [sub_batch(batch, images, rows) for rows in buckets]
    singles = [sub_batch(batch, images, [i]) for i in range(len(texts))]  # row i without its padding
    for _ in range(cfg.warmup):
        measure_call(model, spec, batch, cfg.new_tokens)
        measure_call(model, spec, singles[0], cfg.new_tokens)
        if bar is not None:
            bar.update(2)
    batched_calls, bucket_calls, sequential = [], [], []
    for _ in range(cfg.runs):
        batched_calls.append(measure_call(model, spec, batch, cfg.new_tokens))
        bucket_calls.append([measure_call(model, spec, inputs, cfg.new_tokens) for inputs in bucketed])
        calls = []
        for one in singles:
            calls.append(measure_call(model, spec, one, cfg.new_tokens))
        sequential.append(calls)
        if bar is not None:
            bar.update(1)

    def total(calls: list[dict], key: str) -> float:
        return sum(c[key] for c in calls)

    batched_s = _median([c["total_s"] for c in batched_calls])
    bucketed_s = _median([total(calls, "total_s") for calls in bucket_calls])
    one_by_one_s = _median([total(calls, "total_s") for calls in sequential])
    batched_prefill = _median([c["prefill_s"] for c in batched_calls])
    bucketed_prefill = _median([total(calls, "prefill_s") for calls in bucket_calls])
    one_by_one_prefill = _median([total(calls, "prefill_s") for calls in sequential])
    # paired per run: one by one / batched within the same run, with a 95 % interval over runs
    paired = ratio_interval([total(one, "total_s") / total(calls, "total_s")
                             for one, calls in zip(sequential, bucket_calls)])
    kept = batched_calls[0]["kept_per_sample"]
    kept_single = [c["kept_per_sample"][0] for c in sequential[0]]
    equiv_single = [c["equivalent_total"] for c in sequential[0]]
    n = cfg.batch_size
    padded_tokens = [len(rows) * max(lengths[i] for i in rows) for rows in buckets]
    return {
        "spec": spec, "samples": n, "images_per_sample": images, "text_tokens_per_sample": texts,
        "kept_per_sample": kept, "kept_per_sample_one_by_one": kept_single, "ragged": len(set(kept)) > 1,
        "equivalent_tokens_batched": batched_calls[0]["equivalent_total"],
        "equivalent_tokens_one_by_one": sum(equiv_single),
        "new_tokens": cfg.new_tokens, "batched_s": batched_s, "one_by_one_s": one_by_one_s,
        "batched_samples_per_s": n / batched_s, "one_by_one_samples_per_s": n / one_by_one_s,
        "throughput_ratio": one_by_one_s / batched_s,
        "prefill_throughput_ratio": one_by_one_prefill / batched_prefill,
        "batching_wins": bool(one_by_one_s > batched_s),
        "padding": len(lengths) * max(lengths) / sum(lengths) - 1,
        "bucketed": {
            "buckets": buckets, "padding": sum(padded_tokens) / sum(lengths) - 1, "s": bucketed_s,
            "samples_per_s": n / bucketed_s, "throughput_ratio": one_by_one_s / bucketed_s,
            "throughput_ratio_paired": paired[0], "throughput_ratio_ci95": [paired[1], paired[2]],
            "prefill_throughput_ratio": one_by_one_prefill / bucketed_prefill,
            "throughput_target_met": bool(one_by_one_s / bucketed_s >= BATCH_THROUGHPUT_TARGET),
            "prefill_target_met": bool(one_by_one_prefill / bucketed_prefill >= BATCH_PREFILL_TARGET),
            "kept_per_sample": [k for calls in bucket_calls[:1] for c in calls for k in c["kept_per_sample"]],
            "calls": bucket_calls,
        },
        "batched_calls": batched_calls, "one_by_one_calls": sequential,
    }


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Build the model, measure every spec (and the batch test); returns the results (see `write_outputs`).

    `cfg.threads` applies for the run only (torch's thread count is restored afterwards)."""
    cfg.check()
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_bench(cfg)
    finally:
        torch.set_num_threads(threads_before)


def _run_bench(cfg: BenchConfig) -> dict[str, Any]:
    import vlmeff
    from vlmeff.spec import describe, parse_spec
    from vlmeff.strategy import StrategyError

    device = resolve_device(cfg.device)
    budgets = cfg.budget_list
    plans = plan_specs(cfg.strategies, budgets)  # parses every spec first: a typo fails before the model is built
    batch_spec, batch_why = pick_batch_strategy(cfg.batch_strategy, min(budgets)) if cfg.batch_size else ("", "")
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    model, info = build_bench_model(cfg.quick, cfg.dtype, device, cfg.seed)
    info["build_s"] = time.perf_counter() - t0
    if cfg.progress:
        p = info["params"]
        print(f"model: {info['name']}, {p['total'] / 1e6:.1f}M parameters (vision {p['vision_tower'] / 1e6:.1f}M, "
              f"projector {p['projector'] / 1e6:.1f}M, LM {p['lm_total'] / 1e6:.1f}M incl. head "
              f"{p['lm_head'] / 1e6:.1f}M), {info['dtype']} on {info['device']}, built in {info['build_s']:.1f} s",
              file=sys.stderr)
    if cfg.save:
        model.save_pretrained(cfg.save)
    inputs = build_inputs(model.config, [cfg.text_tokens], [1], seed=cfg.seed, device=device, dtype=model.dtype)

    # specs the wrapper refuses on this model (at wrap time or in the first call: e.g. a prune layer beyond the
    # LLM's depth) are reported, not fatal; the first call is the first warm-up call, or the first timed one
    skipped: dict[str, str] = {}
    runnable = []
    for plan in plans:
        try:
            vlmeff.wrap(model, None, plan.spec).unwrap()
            runnable.append(plan)
        except StrategyError as e:
            skipped[plan.spec] = str(e)
    batch_calls = (cfg.warmup * 2 + cfg.runs) if cfg.batch_size else 0  # one tick per run of all three ways
    total = len(runnable) * (cfg.warmup + cfg.runs + 1) + batch_calls
    bar = tqdm(total=total, desc="vlmeff bench", disable=not cfg.progress, file=sys.stderr)
    calls: dict[str, list[dict]] = {p.spec: [] for p in runnable}
    memory: dict[str, dict] = {}
    t_bench = time.perf_counter()
    try:
        for w in range(cfg.warmup + cfg.runs):
            timed = w >= cfg.warmup
            for plan in list(runnable):
                bar.set_postfix_str(f"{f'run {w - cfg.warmup + 1}' if timed else 'warm-up'} {plan.spec[:30]}")
                try:
                    call = measure_call(model, plan.spec, inputs, cfg.new_tokens)
                except StrategyError as e:
                    if calls[plan.spec] or w:  # it ran before: a real failure
                        raise
                    skipped[plan.spec] = str(e)
                    runnable.remove(plan)
                    bar.total -= cfg.warmup + cfg.runs + 1
                    continue
                if timed:
                    calls[plan.spec].append(call)
                bar.update(1)
        for plan in runnable:
            bar.set_postfix_str(f"memory {plan.spec[:30]}")
            memory[plan.spec] = measure_call(model, plan.spec, inputs, cfg.new_tokens, memory=True)
            bar.update(1)
        rows = [summarize_spec(p, calls[p.spec], memory[p.spec]) for p in runnable]
        add_targets(rows, min(budgets))
        batch = None
        if cfg.batch_size:
            bar.set_postfix_str(f"batch {batch_spec[:30]}")
            try:
                batch = run_batch_test(model, batch_spec, cfg, bar)
                batch["why"] = batch_why
            except StrategyError as e:  # report it; the per-strategy rows are still worth writing
                fallback = describe(parse_spec(f"fastervlm:keep={min(budgets)}"))
                if cfg.batch_strategy is not None or batch_spec == fallback:
                    batch = {"spec": batch_spec, "why": batch_why, "error": str(e)}
                else:  # the automatic choice (atp) cannot run on this model: fall back, say why
                    batch_spec = fallback
                    bar.total += cfg.warmup * 2 + cfg.runs * (1 + cfg.batch_size)
                    batch = run_batch_test(model, batch_spec, cfg, bar)
                    batch["why"] = f"atp failed here ({e}); ragged kept counts from 1 or 2 images per sample"
    finally:
        bar.close()
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"model": info, "config": asdict(cfg), "budgets": budgets, "rows": rows, "skipped": skipped,
            "batch": batch, "bench_s": time.perf_counter() - t_bench,
            "load_average": {"start": load_start, "end": load_end},
            "device": device_name(device), "threads": torch.get_num_threads()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {model} ({os.cpu_count()} logical cores)"


# ------------------------------------------------------------------------------------------------------ reports

TABLE_COLUMNS = ("strategy", "stage", "kept tokens", "equiv. tokens", "prefill GFLOPs", "FLOP ratio",
                 "prefill ms", "encode ms", "vision GFLOPs", "LLM prefill ms", "LLM GFLOPs", "speedup",
                 "speedup / FLOP ratio", "speedup (fastest runs)", "paired speedup (95% CI)", "overhead ms",
                 "overhead %", "decode ms/token", "peak MiB", "peak +MiB", "speedup target", "overhead target")
BATCH_COLUMNS = ("strategy", "batching", "padding", "samples", "images / sample", "kept tokens / sample",
                 "text tokens / sample", "batched s", "one by one s", "batched samples/s", "one by one samples/s",
                 "throughput ratio", "prefill ratio", "equiv. tokens batched / one by one", "batching wins",
                 "throughput target", "prefill target")


def _mark(value: bool | None, missing: str = "-") -> str:
    return missing if value is None else ("met" if value else "MISSED")


def _millions(n: int) -> str:
    return f"{n / 1e6:.0f}M" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _gflops(flops: int) -> str:
    g = flops / 1e9
    return f"{g:.1f}" if g >= 10 else f"{g:.4f}"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.0f}"


def _paired(row: dict[str, Any]) -> str:
    low, high = row.get("speedup_ci95", [math.nan, math.nan])
    if not math.isfinite(row.get("speedup_paired", math.nan)):
        return "-"
    interval = f" ({low:.2f}-{high:.2f})" if math.isfinite(low) and math.isfinite(high) else ""
    return f"{row['speedup_paired']:.2f}{interval}"


def table_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    for r in results["rows"]:
        stages = set(r["stages"])
        equiv = f"{r['equivalent_per_image']:.1f}"
        overhead = _mark(r["overhead_target_met"], "n/a (in encode)" if "vision" in stages else "-")
        out.append({
            "strategy": r["spec"], "stage": "+".join(r["stages"]) or "-", "kept tokens": f"{r['kept_per_image']:.1f}",
            "equiv. tokens": equiv, "prefill GFLOPs": _gflops(r["flops_total"]),
            "FLOP ratio": f"{r['flop_ratio']:.2f}", "prefill ms": f"{r['prefill_s'] * 1e3:.1f}",
            # where the prefill time goes, next to where the FLOPs go (a rate that differs between the parts moves
            # the speedup away from the FLOP ratio)
            "encode ms": f"{r['encode_s'] * 1e3:.1f}", "vision GFLOPs": _gflops(r["flops"].get("vision", 0)),
            "LLM prefill ms": f"{r['llm_prefill_s'] * 1e3:.1f}", "LLM GFLOPs": _gflops(r["flops"].get("llm", 0)),
            "speedup": f"{r['speedup']:.2f}", "speedup / FLOP ratio": f"{r['speedup_over_flop_ratio']:.2f}",
            "speedup (fastest runs)": f"{r['speedup_min']:.2f}",
            "paired speedup (95% CI)": _paired(r),
            "overhead ms": f"{r['strategy_s'] * 1e3:.1f}", "overhead %": f"{100 * r['overhead_frac']:.2f}",
            "decode ms/token": f"{r['decode_s_per_token'] * 1e3:.1f}", "peak MiB": _mib(r["peak_bytes"]),
            "peak +MiB": _mib(r["peak_delta_bytes"]),
            "speedup target": _mark(r["speedup_target_met"]) + (" (CI too wide)" if r.get("speedup_undecided") else ""),
            "overhead target": overhead,
        })
    return out


def batch_rows(batch: dict[str, Any]) -> list[dict[str, str]]:
    """Two table rows: one left-padded batch, and the length buckets (with the targets)."""
    def listing(values: Sequence[Any]) -> str:
        return " ".join(str(v) for v in values)

    bucketed = batch["bucketed"]
    low, high = bucketed["throughput_ratio_ci95"]
    common = {
        "strategy": batch["spec"], "samples": str(batch["samples"]),
        "images / sample": listing(batch["images_per_sample"]), "kept tokens / sample": listing(batch["kept_per_sample"]),
        "text tokens / sample": listing(batch["text_tokens_per_sample"]),
        "one by one s": f"{batch['one_by_one_s']:.2f}",
        "one by one samples/s": f"{batch['one_by_one_samples_per_s']:.3f}",
        "equiv. tokens batched / one by one": (
            "n/a" if batch["equivalent_tokens_batched"] is None or batch["equivalent_tokens_one_by_one"] is None
            else f"{batch['equivalent_tokens_batched']:.1f} / {batch['equivalent_tokens_one_by_one']:.1f}"),
    }
    padded = {**common, "batching": "one padded batch", "padding": f"{batch['padding']:.0%}",
              "batched s": f"{batch['batched_s']:.2f}", "batched samples/s": f"{batch['batched_samples_per_s']:.3f}",
              "throughput ratio": f"{batch['throughput_ratio']:.2f}",
              "prefill ratio": f"{batch['prefill_throughput_ratio']:.2f}", "batching wins": _mark(batch["batching_wins"]),
              "throughput target": "-", "prefill target": "-"}
    buckets = {**common, "batching": f"{len(bucketed['buckets'])} length buckets: "
               + " / ".join(listing(rows) for rows in bucketed["buckets"]),
               "padding": f"{bucketed['padding']:.0%}", "batched s": f"{bucketed['s']:.2f}",
               "batched samples/s": f"{bucketed['samples_per_s']:.3f}",
               "throughput ratio": f"{bucketed['throughput_ratio']:.2f} (paired {bucketed['throughput_ratio_paired']:.2f}, "
                                   f"{low:.2f}-{high:.2f})",
               "prefill ratio": f"{bucketed['prefill_throughput_ratio']:.2f}",
               "batching wins": _mark(bucketed["throughput_ratio"] > 1),
               "throughput target": _mark(bucketed["throughput_target_met"]),
               "prefill target": _mark(bucketed["prefill_target_met"])}
    return [padded, buckets]


def _markdown(rows: list[dict[str, str]], columns: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    return lines


def markdown_report(results: dict[str, Any]) -> str:
    info, cfg = results["model"], results["config"]
    p = info["params"]
    lines = [
        f"Model: {info['name']} ({_millions(p['total'])} parameters: vision {_millions(p['vision_tower'])}, "
        f"LM {_millions(p['lm_total'])} incl. its untied head), random weights, {info['dtype']}, "
        f"{results['device']}, {results['threads']} threads; {info['visual_tokens']} visual tokens + "
        f"{cfg['text_tokens']} text tokens, {cfg['new_tokens']} new tokens; median of {cfg['runs']} runs after "
        f"{cfg['warmup']} warm-up.", "",
    ]
    lines += _markdown(table_rows(results), TABLE_COLUMNS)
    smallest = min(results["budgets"])
    lines += ["", f"prefill = encode + strategy + first LLM forward (time to first token), median over the runs; "
              "speedup = vanilla prefill / strategy prefill (medians; the target uses these); speedup (fastest runs) "
              "= the same from each row's fastest run, less sensitive to other load on a shared machine; paired speedup = "
              "geometric mean of vanilla / strategy prefill within each pass, with the 95 % t-interval over passes; "
              "FLOP "
              "ratio = vanilla / strategy prefill FLOPs; speedup target: speedup >= "
              f"{SPEEDUP_TARGET} x FLOP ratio at {smallest} tokens for methods that reduce before the LLM; overhead "
              f"= stats.strategy_s (scores, selection, splice), target <= {OVERHEAD_TARGET:.0%} of prefill "
              "(FlowCut's work runs inside the encoder and is part of encode time); kept tokens = visual tokens per "
              "image entering the LLM; equiv. tokens = their average over the LLM layers (smaller only for in-LLM "
              "methods). Peak memory: "
              f"{results['rows'][0]['memory_method']} (peak +MiB = increase over the start of the call)."]
    undecided = [r["spec"] for r in results["rows"] if r.get("speedup_undecided")]
    if undecided:
        lines.append(f"- WARNING: the 95 % interval of the paired speedup contains the target for {', '.join(undecided)}: "
                     "more --runs (or a quieter machine) are needed to judge it.")
    for spec, why in results["skipped"].items():
        lines.append(f"- skipped `{spec}`: {why}")
    b = results["batch"]
    if b is not None and "error" in b:
        lines += ["", f"Batch test with `{b['spec']}` failed: {b['error']}"]
    elif b is not None:
        lines += ["", "Batch test (the same samples as one left-padded batch, as length buckets and one by one, "
                  f"interleaved run by run, {b['new_tokens']} new tokens each; {b['why']}):", ""]
        lines += _markdown(batch_rows(b), BATCH_COLUMNS)
        lines += ["", "throughput ratio = batched samples/s / one-by-one samples/s (wall time of the generate calls, "
                  "prepare included; paired: the geometric mean of the per-run ratios with its 95 % interval); "
                  "prefill ratio: the same for prefill time only; padding = padded / real tokens - 1; length buckets: "
                  f"`vlmeff.batching.length_batches` with at most {BUCKET_PADDING:.0%} padding per batch; targets "
                  f"(length buckets): throughput ratio >= {BATCH_THROUGHPUT_TARGET}, prefill ratio >= "
                  f"{BATCH_PREFILL_TARGET}."]
    load = results["load_average"]
    if load["start"] is not None:
        lines += ["", f"Load average (1 min) at start / end: {load['start'][0]:.2f} / {load['end'][0]:.2f}."]
    return "\n".join(lines) + "\n"


def plot_speedups(results: dict[str, Any], path: Path) -> None:
    """Measured prefill speedup vs FLOP ratio (both vs vanilla), one point per strategy row with the 95 % t-interval
    of its paired per-pass speedups, and the y = x line where time falls exactly as FLOPs do."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlmeff.eval.runner import save_figure, short_label

    rows = [r for r in results["rows"] if r["spec"] != "vanilla" and math.isfinite(r.get("flop_ratio", math.nan))]
    fig, ax = plt.subplots(figsize=(8.5, 4.8), dpi=120)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*Xh<>"
    top = 1.0
    families = list(dict.fromkeys(short_label(r["spec"]) for r in rows))  # one colour per method
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None}, reverse=True)  # one marker per budget
    for r in rows:
        i = families.index(short_label(r["spec"]))
        marker = markers[budgets.index(r["budget"]) % len(markers)] if r["budget"] in budgets else "*"
        centre = r.get("speedup_paired", r["speedup"])
        low, high = r.get("speedup_ci95", [math.nan, math.nan])
        err = None if not (math.isfinite(low) and math.isfinite(high)) else [[centre - low], [high - centre]]
        ax.errorbar([r["flop_ratio"]], [centre], yerr=err, marker=marker,
                    color=cycle[i % len(cycle)], linestyle="none", capsize=2, markersize=6,
                    label=short_label(r["spec"], budgets=True))
        top = max(top, r["flop_ratio"], high if math.isfinite(high) else centre)
    ax.plot([1, top * 1.05], [1, top * 1.05], linestyle="--", color="black", linewidth=1, label="y = x (time ∝ FLOPs)")
    ax.set_xlabel("FLOP ratio (vanilla / strategy prefill FLOPs)")
    ax.set_ylabel("prefill speedup vs vanilla (95% CI over paired passes)")
    info, cfg = results["model"], results["config"]
    title = (f"vlmeff bench: {info['name']}, {info['dtype']}, {results['device']}, {info['visual_tokens']} visual + "
             f"{cfg['text_tokens']} text tokens, {cfg['runs']} interleaved passes per strategy")
    ax.grid(alpha=0.3)
    save_figure(fig, ax, path, title, width=100)


def write_outputs(results: dict[str, Any], output: str | Path, argv: Sequence[str]) -> dict[str, Path]:
    """table.md, speedup.png, results.json and run.json in `output` (created)."""
    from vlmeff.eval.runner import environment

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown_report(results))
    plot_speedups(results, out / "speedup.png")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    run = environment(argv, results["config"]["seed"])  # command, seed, time, versions, platform
    run.update({"device": results["device"], "dtype": results["model"]["dtype"], "threads": results["threads"],
                "cpu_count": os.cpu_count(), "load_average": results["load_average"], "bench_s": results["bench_s"],
                "build_s": results["model"]["build_s"], "config": results["config"]})
    (out / "run.json").write_text(json.dumps(run, indent=1, default=str))
    return {"table": out / "table.md", "plot": out / "speedup.png", "results": out / "results.json",
            "run": out / "run.json"}


def run_bench_cli(args, argv: Sequence[str]) -> dict[str, Path]:
    """`vlmeff bench`: argparse namespace -> BenchConfig -> run -> write and print the table."""
    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.force:
        raise FileExistsError(f"output folder {output} is not empty: pass --force to overwrite, or a new --output")
    if args.kernels:
        return run_kernel_bench_cli(args, output, argv)
    budgets = None
    if args.budgets:
        try:
            budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
        except ValueError:
            raise BenchOptionError(f"--budgets={args.budgets!r}: expected comma-separated integers, "
                                   "e.g. 192,128,64") from None
    cfg = BenchConfig(strategies=args.strategy, budgets=budgets, runs=args.runs, warmup=args.warmup,
                      new_tokens=args.new_tokens, batch_size=args.batch_size, batch_strategy=args.batch_strategy,
                      quick=args.quick, dtype=args.dtype, device=args.device, threads=args.threads,
                      text_tokens=args.text_tokens, seed=args.seed, save=args.save)
    results = run_bench(cfg)
    paths = write_outputs(results, output, argv)
    print(paths["table"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return paths


def run_kernel_bench_cli(args, output: Path, argv: Sequence[str]) -> dict[str, Path]:
    """`vlmeff bench --kernels`: the token gather's bandwidth (vlmeff.eval.kernel_bench) instead of the model bench."""
    from vlmeff.eval.kernel_bench import QUICK_SHAPES, SHAPES, kernel_table, run_kernel_bench
    from vlmeff.loading import DTYPES

    if args.dtype not in DTYPES or args.dtype == "auto":
        raise BenchOptionError(f"--dtype={args.dtype!r}: expected bfloat16, float16 or float32")
    device = resolve_device(args.device)
    threads_before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        results = run_kernel_bench(device, DTYPES[args.dtype], runs=args.runs,
                                   shapes=QUICK_SHAPES if args.quick else SHAPES)
    finally:
        torch.set_num_threads(threads_before)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"table": output / "kernels.md", "results": output / "kernels.json"}
    paths["table"].write_text(kernel_table(results))
    paths["results"].write_text(json.dumps({**results, "command": list(argv)}, indent=1))
    print(paths["table"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return paths
