"""The benchmark runner behind `vlmeff eval --benchmark pope`.

For each strategy spec the runner answers every question (greedy, batched), appends one JSON line per question to
`<output>/samples/<spec>.jsonl` as it goes, and on a rerun skips what is already there (a torn last line from an
interrupted run is dropped), so no sample is lost or duplicated. It then writes summary.json / summary.csv, a
Markdown table, a plot (metric vs kept visual tokens, one line per method, vanilla dashed) and run.json (the exact
command, seed, package versions).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import platform
import re
import sys
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from vlmeff.eval.intervals import bootstrap_interval, wilson_interval
from vlmeff.eval.metrics import pope_summary
from vlmeff.eval.parsers import PARSERS, metric_options
from vlmeff.eval.pope import LLAVA_PROMPT_SUFFIX, PopeSample
from vlmeff.eval.runfolder import RunFolder
from vlmeff.images import load_image
from vlmeff.registry import STRATEGIES
from vlmeff.spec import build_items, describe, parse_spec, preset_names, spec_items


def takes_budget(spec: str) -> bool:
    """Whether `spec` runs once per --budgets value: its first strategy declares `keep` among its `budget_params`
    and the spec gives none of that strategy's budget parameters; YAML files and presets never do."""
    text = spec.strip()
    if text.lower() in ("vanilla", "none", "", BLIND) or text.endswith((".yaml", ".yml")) or text in preset_names():
        return False
    name, given = spec_items(text)[0]
    declared = STRATEGIES.get(name).budget_params  # atp, aim-prune: no keep
    return "keep" in declared and not set(given) & set(declared)


def budgeted(spec: str, budgets: Sequence[int]) -> list[str]:
    """"fastervlm" + budgets [64, 32] -> ["fastervlm:keep=64", "fastervlm:keep=32"]; specs with a budget, presets,
    YAML files and strategies without a per-image budget (atp, aim-prune) stay as given."""
    text = spec.strip()
    if text.lower() in ("vanilla", "none", ""):
        return ["vanilla"]
    if text.lower() == BLIND:
        return [BLIND]
    if not takes_budget(text):
        return [describe(parse_spec(text))]
    (name, params), *rest = spec_items(text)
    return [describe(build_items([(name, {"keep": b, **params}), *rest])) for b in budgets]


def family(spec: str) -> str:
    """The plot line of a canonical spec: each strategy's `family()` (its spec without budget parameters)."""
    return "+".join(s.family() for s in parse_spec(spec))


def short_label(spec: str, budgets: bool = False) -> str:
    """A plot legend label: each strategy's name with only the parameters that differ from its defaults (budget
    parameters dropped unless `budgets`), e.g. ``fastervlm+paint`` or ``fastervlm:keep=64+paint``."""
    import dataclasses

    parts = []
    for strategy in parse_spec(spec):
        defaults = {f.name: f.default for f in dataclasses.fields(strategy) if f.init}
        changed = [f"{k}={v}" for k, v in strategy.params().items()
                   if (budgets or k not in strategy.budget_params) and v != defaults.get(k)]
        parts.append(strategy.name + (":" + ",".join(changed) if changed else ""))
    return "+".join(parts)


# Reserved spec: the same questions WITHOUT the image (text-only prompt): measures the language prior.
BLIND = "blind"
METRIC_NAMES = {"f1": "F1", "accuracy": "accuracy", "precision": "precision", "recall": "recall", "yes_ratio": "yes %"}


def safe_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec)[:150] or "vanilla"


@dataclass
class SampleResult:
    question_id: str
    split: str
    image_id: str
    label: str
    answer: str
    kept_tokens: int
    visual_tokens: int
    prefill_flops: int
    prefill_s: float
    total_s: float


def read_done(path: Path) -> dict[str, dict]:
    """Completed records of a samples file; a torn last line (interrupted write) is removed from the file. Any
    other bad line (not JSON, not UTF-8, not a sample record) is a ValueError naming the file and the line."""
    if not path.is_file():
        return {}
    done, good = {}, []
    lines = path.read_bytes().splitlines(keepends=True)
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if i == len(lines) - 1:
                break  # torn write at the end: drop it and redo that sample
            raise ValueError(f"{path}, line {i + 1}: not valid JSON; delete the file or fix the line") from None
        if not line.endswith(b"\n"):
            break
        if not isinstance(rec, dict) or "question_id" not in rec or "split" not in rec:
            raise ValueError(f"{path}, line {i + 1}: not a vlmeff sample record (it needs question_id and split); "
                             "delete the file or fix the line")
        done[f"{rec['question_id']}|{rec['split']}"] = rec
        good.append(line)
    if len(good) != len(lines):
        path.write_bytes(b"".join(good))
    return done


class PopeRunner:
    """Answers POPE questions per strategy spec. generation: extra generate kwargs (sampling: do_sample,
    temperature, top_p, top_k); with sampling each batch is seeded from `seed` and its first question's id, so a
    resumed run draws what an uninterrupted one would."""

    def __init__(self, model, processor, samples: list[PopeSample], output: Path, *,
                 image_loader: Callable[[PopeSample], Image.Image], batch_size: int = 8, max_new_tokens: int = 8,
                 prompt_suffix: str = LLAVA_PROMPT_SUFFIX, progress: bool = True,
                 generation: dict | None = None, seed: int = 0, group_by_length: bool = True):
        self.generation = dict(generation or {})
        # batches of similar prompt length: less left padding per batch (greedy answers do not change, tested)
        self.group_by_length = group_by_length
        self.seed = seed
        self.model = model
        self.processor = processor
        self.samples = samples
        self.output = Path(output) if output is not None else None
        self.image_loader = image_loader
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.prompt_suffix = prompt_suffix
        self.progress = progress
        processor.tokenizer.padding_side = "left"  # batched greedy generation needs left padding

    def samples_path(self, spec: str) -> Path:
        return self.output / "samples" / f"{safe_name(spec)}.jsonl"

    def prompt(self, sample: PopeSample, with_image: bool = True) -> str:
        content = [{"type": "image"}] if with_image else []
        content.append({"type": "text", "text": sample.text + self.prompt_suffix})
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def run(self, spec: str) -> list[dict]:
        import vlmeff

        path = self.samples_path(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        done = read_done(path)
        order = self.batch_order(blind=spec == BLIND)  # fixed by the data, so a resumed run forms the same batches
        todo = [s for s in order if f"{s.question_id}|{s.split}" not in done]
        vm = vlmeff.wrap(self.model, self.processor, None if spec == BLIND else spec)
        bar = tqdm(total=len(self.samples), initial=len(self.samples) - len(todo), desc=spec[:40],
                   disable=not self.progress, file=sys.stderr)
        try:
            with path.open("a") as f:
                for start in range(0, len(todo), self.batch_size):
                    batch = todo[start:start + self.batch_size]
                    for rec in self._answer(vm, batch, blind=spec == BLIND):
                        f.write(json.dumps(rec) + "\n")
                        done[rec["question_id"] + "|" + rec["split"]] = rec
                    f.flush()
                    bar.update(len(batch))
        finally:
            bar.close()
            vm.unwrap()
        return [done[f"{s.question_id}|{s.split}"] for s in self.samples]

    def batch_order(self, blind: bool = False) -> list:
        """The samples in the order they are batched: by prompt length in tokens (stable: ties keep the data's
        order) when group_by_length, else as given."""
        if not self.group_by_length:
            return list(self.samples)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        texts = [self.prompt(s, with_image=not blind) for s in self.samples]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]
        return [s for _, s in sorted(zip(lengths, self.samples), key=lambda pair: pair[0])]

    def _generate(self, vm, batch: list, blind: bool = False) -> list[str]:
        """The batch's decoded answers (greedy, or seeded sampling)."""
        images = None if blind else [self.image_loader(s) for s in batch]
        texts = [self.prompt(s, with_image=not blind) for s in batch]
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True).to(self.model.device)
        kwargs = {"do_sample": False, **self.generation}
        if kwargs["do_sample"]:
            torch.manual_seed(self.seed * 1_000_003 + zlib.crc32(f"{batch[0].question_id}|{batch[0].split}".encode()))
        with torch.no_grad():
            out = vm.generate(**inputs, max_new_tokens=self.max_new_tokens, **kwargs)
        return [a.strip() for a in
                self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]

    def _answer(self, vm, batch: list[PopeSample], blind: bool = False) -> list[dict]:
        answers = self._generate(vm, batch, blind)
        return [{"question_id": s.question_id, "split": s.split, "image_id": s.image_id, "label": s.label,
                 "answer": a, **cost} for s, a, cost in zip(batch, answers, batch_costs(vm, len(batch)))]


class ChairRunner(PopeRunner):
    """Captions every image per strategy spec (same resumable sample files as POPE, keyed by image)."""

    def __init__(self, *args, prompt_text: str, **kwargs):
        super().__init__(*args, prompt_suffix="", **kwargs)
        self.prompt_text = prompt_text

    def prompt(self, sample, with_image: bool = True) -> str:
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": self.prompt_text}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def _answer(self, vm, batch, blind: bool = False) -> list[dict]:
        captions = self._generate(vm, batch, blind)
        return [{"question_id": s.question_id, "split": s.split, "image_id": s.image_id, "caption": c, **cost}
                for s, c, cost in zip(batch, captions, batch_costs(vm, len(batch)))]


def batch_costs(vm, n: int) -> list[dict]:
    """Per batch row of the last `vm` call: kept / visual / equivalent tokens, prefill FLOPs and per-question times
    (what `vlmeff eval` and the lmms-eval model record per question)."""
    stats = vm.stats
    kept = defaultdict(int)
    total = defaultdict(int)
    for r in vm.last_record:
        kept[r.sample] += r.num_kept
        total[r.sample] += r.num_tokens
    return [{"kept_tokens": kept[i], "visual_tokens": total[i],
             "equivalent_tokens": round(stats.per_sample_equivalent_tokens[i], 3)
             if stats.per_sample_equivalent_tokens else kept[i],
             "prefill_flops": stats.per_sample_flops[i] if stats.per_sample_flops else 0,
             "prefill_s": round(stats.prefill_s / n, 5), "total_s": round(stats.total_s / n, 5),
             "batch_size": n} for i in range(n)]


def summarize(results: dict[str, list[dict]], parser: str) -> dict:
    """Per spec: metrics per split + mean under every parser, and mean kept tokens / FLOPs / times."""
    summary = {}
    for spec, records in results.items():
        by_split: dict[str, list[dict]] = defaultdict(list)
        for r in records:
            by_split[r["split"]].append(r)
        # each parser with its source's aggregation ("lmms-eval": lmms-eval's recall and yes_ratio)
        metrics = {name: pope_summary({split: ([fn(r["answer"]) for r in rs], [r["label"] for r in rs])
                                       for split, rs in by_split.items()}, **metric_options(name))
                   for name, fn in PARSERS.items()}
        n = max(1, len(records))
        summary[spec] = {
            "spec": spec, "parser": parser, "metrics": metrics[parser], "metrics_all_parsers": metrics,
            "ci95": pope_intervals(by_split, PARSERS[parser], options=metric_options(parser)),
            "n": len(records),
            "kept_tokens": sum(r["kept_tokens"] for r in records) / n,
            # layer-averaged visual tokens inside the LLM (= kept tokens for methods acting before the LLM)
            "equivalent_tokens": sum(r.get("equivalent_tokens", r["kept_tokens"]) for r in records) / n,
            "visual_tokens": sum(r["visual_tokens"] for r in records) / n,
            "prefill_gflops": sum(r["prefill_flops"] for r in records) / n / 1e9,
            "prefill_ms": 1e3 * sum(r["prefill_s"] for r in records) / n,
            "total_ms": 1e3 * sum(r["total_s"] for r in records) / n,
        }
    return summary


def pope_intervals(by_split: dict[str, list[dict]], parse: Callable[[str], str],
                   keys: Sequence[str] = ("accuracy", "f1"), options: dict | None = None) -> dict[str, list[float]]:
    """95 % bootstrap intervals of the mean-over-splits metrics (questions resampled within each split)."""
    parsed = {split: [(parse(r["answer"]), r["label"]) for r in rs] for split, rs in by_split.items()}
    out = {}
    for key in keys:
        def statistic(groups, key=key):
            return pope_summary({g: ([p for p, _ in items], [lab for _, lab in items])
                                 for g, items in groups.items()}, **(options or {}))["mean"][key]
        out[key] = list(bootstrap_interval(parsed, statistic))
    return out


def table_rows(summary: dict) -> list[dict]:
    rows = []
    for spec, s in summary.items():
        m = s["metrics"]
        row = {"strategy": spec, "kept tokens": round(s["kept_tokens"], 1),
               "equiv. tokens": round(s.get("equivalent_tokens", s["kept_tokens"]), 1),
               "prefill GFLOPs": round(s["prefill_gflops"], 2)}
        for split in [k for k in m if k != "mean"]:
            row[f"{split} F1"] = round(100 * m[split]["f1"], 1)
        ci = s.get("ci95", {}).get("f1")
        row.update({"mean acc": round(100 * m["mean"]["accuracy"], 1), "mean F1": round(100 * m["mean"]["f1"], 1),
                    "F1 95% CI": "-" if not ci else f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}",
                    "yes %": round(100 * m["mean"]["pred_yes_ratio"], 1), "prefill ms": round(s["prefill_ms"], 1),
                    "n": s["n"]})
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], parser: str) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines) + (f"\n\nParser: {parser}. Metrics in %, positive = yes; times are per question. "
                                "kept tokens = visual tokens entering the LLM; equiv. tokens = visual tokens averaged "
                                "over the LLM's layers (differs only for in-LLM methods); F1 95% CI = percentile bootstrap "
                                "of the mean F1 (1000 resamples of the questions within each split).\n")


def write_reports(output: Path, summary: dict, parser: str, metric: str = "f1",
                  title_prefix: str | None = None, budgets: Sequence[int] | None = None) -> dict[str, Path]:
    output.mkdir(parents=True, exist_ok=True)
    rows = table_rows(summary)
    (output / "summary.json").write_text(json.dumps(summary, indent=1))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    (output / "summary.csv").write_text(buf.getvalue())
    table = markdown_table(rows, parser)
    (output / "table.md").write_text(table)
    plot_path = output / f"pope_{metric}.png"
    n = max((x["n"] for x in summary.values()), default=0)
    plot(summary, plot_path, metric, title=f"{title_prefix}parser {parser}, {n} questions per row" if title_prefix
         is not None else None, budgets=budgets)
    return {"summary": output / "summary.json", "csv": output / "summary.csv", "table": output / "table.md",
            "plot": plot_path}


def save_figure(fig, ax, path: Path, title: str | None, *, width: int = 110, fontsize: int = 8) -> None:
    """What every vlmeff plot ends with: the title wrapped to `width` characters, the legend outside the axes (it
    never covers a point), a tight layout, the file written and the figure closed."""
    import textwrap

    import matplotlib.pyplot as plt

    if title:
        ax.set_title("\n".join(textwrap.wrap(title, width)), fontsize=fontsize)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot(summary: dict, path: Path, metric: str = "f1", title: str | None = None,
         budgets: Sequence[int] | None = None) -> None:
    """Mean `metric` vs visual tokens (log2 axis, ticks at the budgets and vanilla's count), one line per method
    family with 95 % bootstrap intervals as error bars; vanilla dashed with its interval as a band, blind (no image)
    dotted; short legend names outside the axes so that no point is covered."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def value_and_error(s):
        value = 100 * s["metrics"]["mean"][metric]
        ci = s.get("ci95", {}).get(metric)
        if not ci:
            return value, (0.0, 0.0), None
        low, high = 100 * ci[0], 100 * ci[1]
        return value, (max(0.0, value - low), max(0.0, high - value)), (low, high)

    families: dict[str, list[tuple[float, float, tuple[float, float]]]] = defaultdict(list)
    vanilla = blind = None
    for spec, s in summary.items():
        value, err, band = value_and_error(s)
        tokens = s.get("equivalent_tokens", s["kept_tokens"])
        if spec == "vanilla":
            vanilla = (tokens, value, band)
        elif spec == BLIND:
            blind = (value, band)
        else:
            families[short_label(spec)].append((tokens, value, err))
    fig, ax = plt.subplots(figsize=(9.5, 4.8), dpi=120)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*Xh<>"
    ordered = sorted(families.items())
    for i, (name, points) in enumerate(ordered):
        points.sort()
        dodge = 1 + 0.012 * (i - (len(ordered) - 1) / 2)  # families side by side on the log axis: bars stay apart
        ax.errorbar([p[0] * dodge for p in points], [p[1] for p in points], yerr=[[p[2][0] for p in points],
                    [p[2][1] for p in points]], marker=markers[(i // len(cycle)) % len(markers)],
                    color=cycle[i % len(cycle)], label=name, markersize=5, linewidth=1.2, capsize=2, elinewidth=0.7)
    if vanilla is not None:
        ax.axhline(vanilla[1], linestyle="--", color="black", label=f"vanilla ({vanilla[0]:.0f} tokens)")
        ax.plot([vanilla[0]], [vanilla[1]], marker="*", color="black", markersize=9, linestyle="none")
        if vanilla[2]:
            ax.axhspan(*vanilla[2], color="black", alpha=0.07, linewidth=0)
    if blind is not None:
        ax.axhline(blind[0], linestyle=":", color="gray", label="blind (no image)")
        if blind[1]:
            ax.axhspan(*blind[1], color="gray", alpha=0.07, linewidth=0)
    ax.set_xscale("log", base=2)
    xs = [p[0] for pts in families.values() for p in pts]
    ticks = set(budgets or []) or {round(x) for x in xs}
    if vanilla:
        ticks.add(round(vanilla[0]))
    ticks |= {round(x) for x in xs if x < 0.9 * min(ticks)}  # e.g. pool's smaller grid below the smallest budget
    ticks = sorted(ticks)
    if ticks:
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel("visual tokens per image (layer-averaged inside the LLM; methods dodged slightly apart)")
    ax.set_ylabel(f"POPE mean {METRIC_NAMES.get(metric, metric)} (%), 95% bootstrap CI")
    ax.grid(alpha=0.3)
    save_figure(fig, ax, path, title)


def environment(argv: Sequence[str], seed: int) -> dict:
    import transformers

    import vlmeff

    return {"command": "vlmeff " + " ".join(argv), "seed": seed, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "versions": {"vlmeff": vlmeff.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
            "platform": platform.platform(), "threads": torch.get_num_threads()}


def default_image_loader(sample: PopeSample) -> Image.Image:
    if getattr(sample, "image_bytes", None) is not None:  # POPE from lmms-eval; CHAIR samples have files only
        return load_image(sample.image_bytes, name=f"embedded in question {sample.question_id}")
    if sample.image is None:
        raise ValueError(f"question {sample.question_id}: no image")
    return load_image(sample.image)


def load_eval_model(args):
    """(model, processor, name) for `vlmeff eval`: the bundled reference model by default (float32 under dtype
    auto: bf16 matmuls were slower than fp32 on the project's CPUs, see the model card), on --device."""
    import vlmeff

    name = args.model or vlmeff.loading.REFERENCE
    model, processor = vlmeff.load(name, dtype=args.dtype, device=args.device)
    return model, processor, name


class EvalOptionError(ValueError):
    """A `vlmeff eval` option, or a combination of options, that cannot run: the message names the option, its value
    and what is accepted. Raised before the model loads."""


def _option(option: str, value, ok: bool, accepted: str) -> None:
    if not ok:
        raise EvalOptionError(f"{option}={value!r}: expected {accepted}")


def check_eval_args(args, benchmark: str) -> str:
    """Every check of `vlmeff eval`'s options that needs no model and no data (numbers, combinations, paths, dtype,
    device), so that a mistake costs no model load; returns the model name ("reference" by default)."""
    import math

    from vlmeff.loading import DTYPES, REFERENCE, resolve_device

    chair = benchmark == "chair"
    _option("--limit", args.limit, args.limit is None or args.limit >= 1,
            "an integer >= 1 (images)" if chair else "an integer >= 1 (questions per split; --full: all of them)")
    _option("--batch-size", args.batch_size, args.batch_size >= 1, "an integer >= 1")
    _option("--max-new-tokens", args.max_new_tokens, args.max_new_tokens is None or args.max_new_tokens >= 1,
            "an integer >= 1")
    if args.sample:
        _option("--temperature", args.temperature, math.isfinite(args.temperature) and args.temperature > 0,
                "a finite number > 0")
        _option("--top-p", args.top_p, 0 < args.top_p <= 1, "a number in (0, 1]")
        _option("--top-k", args.top_k, args.top_k >= 0, "an integer >= 0 (0: off)")
    else:
        for option, value, default in (("--temperature", args.temperature, 1.0), ("--top-p", args.top_p, 1.0),
                                        ("--top-k", args.top_k, 0)):
            if value != default:
                raise EvalOptionError(f"{option}={value!r} applies only with --sample (greedy decoding ignores it)")
    _option("--dtype", args.dtype, args.dtype in DTYPES, ", ".join(DTYPES))
    try:
        resolve_device(args.device)
    except ValueError as e:
        raise EvalOptionError(f"--{e}") from None
    for option, value in (("--data", args.data), ("--image-dir", args.image_dir), ("--captions", args.captions)):
        if value is not None and not Path(value).exists():
            raise FileNotFoundError(f"{option} {value}: no such file or folder")
    if args.image_dir is not None and not Path(args.image_dir).is_dir():
        raise EvalOptionError(f"--image-dir {args.image_dir} is a file; give the folder that holds the images")
    if args.image_dir is not None and not args.data:
        raise EvalOptionError("--image-dir needs --data (the synthetic benchmark renders its own images)")
    if chair:
        for option, given in (("--split", args.split is not None), ("--full", args.full)):
            if given:
                raise EvalOptionError(f"{option} is a POPE option; chair takes --limit <images>")
        if args.captions is not None and not args.data:
            raise EvalOptionError("--captions needs --data (COCO's instances_val2014.json)")
        if args.data and args.image_dir is None:
            raise EvalOptionError(f"--data {args.data} needs --image-dir (the COCO val2014 folder of its images)")
    else:
        if args.full and args.limit is not None:
            raise EvalOptionError(f"--full and --limit={args.limit} contradict each other; give one of them")
        for option, value in (("--prompt", args.prompt), ("--captions", args.captions)):
            if value is not None:
                raise EvalOptionError(f"{option} is a chair option; POPE asks the questions of its data")
    return args.model or REFERENCE


def eval_splits(args, present: Sequence[str]) -> list[str]:
    """The --split names (default: every split `present`), each checked against the splits `present`."""
    if args.split is None:
        return list(present)
    names = [x.strip() for x in args.split.split(",")]
    _option("--split", args.split, all(names), "comma-separated split names, e.g. random,popular")
    unknown = [x for x in dict.fromkeys(names) if x not in present]
    if unknown:
        where = f"--data {args.data}" if args.data else "the synthetic benchmark"
        raise EvalOptionError(f"--split {', '.join(unknown)}: not a split of {where} (splits: {', '.join(present)})")
    return list(dict.fromkeys(names))


def run_budgets(args, model_name: str) -> list[int]:
    """--budgets, or the default: 128,64,32 on the 256-token reference model, 192,128,64 otherwise."""
    from vlmeff.loading import is_reference

    default_budgets = "128,64,32" if is_reference(model_name) else "192,128,64"
    try:
        budgets = [int(b) for b in (args.budgets or default_budgets).split(",")]
    except ValueError:
        budgets = []
    _option("--budgets", args.budgets, bool(budgets) and min(budgets) >= 1,
            "comma-separated integers >= 1 (kept visual tokens per image), e.g. 128,64,32")
    return budgets


def run_specs(args, model_name: str, default: list[str], baselines: Sequence[str] = ("vanilla",)) -> list[str]:
    """The baselines (vanilla; for POPE also blind), then every --strategy (or `default`) once per budget where it
    takes one (`run_budgets`), without repeats. Every spec is parsed and its composition checked here, before the
    model loads: a typo or an impossible combination fails at once, not after the specs before it ran."""
    from vlmeff.spec import build_pipeline

    budgets = run_budgets(args, model_name)
    specs = list(baselines)
    for spec in args.strategy or default:
        specs += [s for s in budgeted(spec, budgets) if s not in specs]
    for spec in specs:
        if spec != BLIND:
            build_pipeline(parse_spec(spec))
    return specs


def check_specs_apply(model, processor, specs: Sequence[str]) -> None:
    """Wrap the loaded model once with every spec (and unwrap it): a strategy that cannot run on this model (e.g.
    one that needs a [CLS] token) fails before the first question, not after hours of other specs."""
    import vlmeff

    for spec in specs:
        if spec not in ("vanilla", BLIND):
            vlmeff.wrap(model, processor, spec).unwrap()


def eval_settings(args, benchmark: str, model_name: str, **extra) -> dict:
    """What decides the answers of a run, recorded in run.json and compared on --resume (`RunFolder`): benchmark,
    model, data files (absolute paths), dtype, decoding, seed and batch size (batching pads rows, and sampling is
    seeded per batch), plus the benchmark's own (`extra`: splits, limit, parser, prompt, max new tokens). The
    strategies are not among them: each spec has its own samples file, so a resume may add or drop specs; nor is
    the device (it changes round-off, not the configuration)."""
    from vlmeff.loading import is_reference

    def where(value):
        return None if value is None else str(Path(value).resolve()) if Path(value).exists() else str(value)

    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    return {"benchmark": benchmark, "model": model_name if is_reference(model_name) else where(model_name),
            "data": where(args.data), "image_dir": where(args.image_dir), "dtype": aliases.get(args.dtype, args.dtype),
            "generation": generation_kwargs(args), "seed": args.seed, "batch_size": args.batch_size, **extra}


def generation_kwargs(args) -> dict:
    """generate kwargs of the decoding setting: {} (greedy) or seeded sampling (`--sample`, the VCD / DAMRO
    papers' setting: temperature 1, top-p 1, no top-k, unless overridden)."""
    if not getattr(args, "sample", False):
        return {}
    return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}


def decoding_label(generation: dict) -> str:
    if not generation.get("do_sample"):
        return "greedy"
    return (f"sampling (temperature {generation['temperature']}, top-p {generation['top_p']}, "
            f"top-k {generation['top_k'] or 'off'})")


@contextlib.contextmanager
def start_run(args, settings: dict, specs: Sequence[str]):
    """The run of `vlmeff eval` once every option, spec and data file was checked: locks the run folder (on
    --resume, refusing settings that differ from the recorded ones; `RunFolder`), checks its samples files, seeds
    torch, loads the model and checks that every spec applies to it. Yields (run folder, model, processor, model
    name); the lock is held until the block ends, however it ends."""
    with RunFolder(args.output, resume=args.resume, settings=settings) as folder:
        for samples_file in sorted((folder.path / "samples").glob("*.jsonl")):
            read_done(samples_file)  # a damaged record fails now, before the model loads or run.json is rewritten
        torch.manual_seed(args.seed)
        model, processor, model_name = load_eval_model(args)
        check_specs_apply(model, processor, specs)
        yield folder, model, processor, model_name


def pope_samples(args) -> tuple[list[PopeSample], Callable, list[str]]:
    """(questions, image loader, splits) of a POPE run: --data (checked: formats, splits, image files) or the
    synthetic benchmark, at most --limit questions per split (default 60; --full: all)."""
    from vlmeff.eval.pope import POPE_SPLITS, load_pope, load_synthetic, synthetic_image

    if args.data:
        one = args.split.strip() if args.split and "," not in args.split else None  # also names a file's split
        samples = load_pope(args.data, one, image_dir=args.image_dir)
        splits = eval_splits(args, present=list(dict.fromkeys(s.split for s in samples)))
        samples = [s for s in samples if s.split in splits]
        named = next((s for s in samples if s.image_bytes is None and s.image is not None), None)
        if args.image_dir is None and named is not None and not Path(named.image).is_file():
            raise EvalOptionError(f"--data {args.data} names image files (first: {named.image}) but no --image-dir "
                                  "was given; pass the folder that holds them (COCO val2014)")
        loader = default_image_loader
    else:
        splits = eval_splits(args, present=POPE_SPLITS)
        samples = [s for s in load_synthetic() if s.split in splits]
        loader = synthetic_image
    limit = None if args.full else 60 if args.limit is None else args.limit
    if limit is not None:
        per_split: dict[str, int] = defaultdict(int)
        kept_samples = []
        for s in samples:
            if per_split[s.split] < limit:
                per_split[s.split] += 1
                kept_samples.append(s)
        samples = kept_samples
    return samples, loader, splits


def run_pope_benchmark(args, argv: Sequence[str]) -> dict[str, Path]:
    """`vlmeff eval --benchmark pope`: check options, specs and data, then load the model, run every strategy spec
    in the locked run folder, and write the reports."""
    model_name = check_eval_args(args, "pope")
    # blind (no image) runs by default: the language prior every POPE number should be read against
    specs = run_specs(args, model_name, default=["fastervlm"], baselines=("vanilla", BLIND))
    samples, loader, splits = pope_samples(args)
    generation = generation_kwargs(args)
    max_new = args.max_new_tokens or 8
    settings = eval_settings(args, "pope", model_name, splits=splits, limit=None if args.full else args.limit or 60,
                             parser=args.parser, max_new_tokens=max_new)
    with start_run(args, settings, specs) as (folder, model, processor, model_name):
        output = folder.path
        env = environment(argv, args.seed)
        env.update({"model": model_name, "data": args.data or "synthetic-pope", "splits": splits,
                    "questions_per_split": {s: sum(1 for x in samples if x.split == s) for s in splits},
                    "strategies": specs, "parser": args.parser, "batch_size": args.batch_size,
                    "dtype": str(model.dtype), "generation": generation})
        folder.write_run_json(env)
        runner = PopeRunner(model, processor, samples, output, image_loader=loader, batch_size=args.batch_size,
                            max_new_tokens=max_new, generation=generation, seed=args.seed)
        t0 = time.time()
        results = {spec: runner.run(spec) for spec in specs}
        summary = summarize(results, args.parser)
        title = (f"POPE ({args.data or 'synthetic world'}, splits {', '.join(splits)}) on {model_name}, "
                 f"{decoding_label(generation)}, ")
        paths = write_reports(output, summary, args.parser, title_prefix=title, budgets=run_budgets(args, model_name))
        env["wall_s"] = round(time.time() - t0, 1)
        folder.write_run_json(env)
    print((output / "table.md").read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return paths


# --------------------------------------------------------------------------------------------------- CHAIR


def summarize_chair(results: dict[str, list[dict]], samples: list, vocab) -> dict:
    """Per spec: CHAIR_S / CHAIR_I / recall / mean length and the mean kept tokens, FLOPs and times."""
    from vlmeff.eval.chair import chair_scores, hallucinated_captions, paired_change

    summary = {}
    base = hallucinated_captions([r["caption"] for r in results["vanilla"]], samples, vocab) \
        if "vanilla" in results else None
    for spec, records in results.items():
        n = max(1, len(records))
        flags = hallucinated_captions([r["caption"] for r in records], samples, vocab)
        summary[spec] = {
            "spec": spec, "metrics": chair_scores([r["caption"] for r in records], samples, vocab), "n": len(records),
            "vs_vanilla": None if base is None or spec == "vanilla" else paired_change(base, flags),
            "kept_tokens": sum(r["kept_tokens"] for r in records) / n,
            "equivalent_tokens": sum(r.get("equivalent_tokens", r["kept_tokens"]) for r in records) / n,
            "prefill_gflops": sum(r["prefill_flops"] for r in records) / n / 1e9,
            "prefill_ms": 1e3 * sum(r["prefill_s"] for r in records) / n,
            "total_ms": 1e3 * sum(r["total_s"] for r in records) / n,
        }
    return summary


def chair_table(summary: dict, setting: str) -> str:
    head = ["strategy", "kept tokens", "equiv. tokens", "prefill GFLOPs", "CHAIR_S", "CHAIR_I", "recall",
            "mean length", "vs vanilla: fixed / new (p)", "total ms", "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for spec, s in summary.items():
        m = s["metrics"]
        row = [spec, round(s["kept_tokens"], 1), round(s["equivalent_tokens"], 1), round(s["prefill_gflops"], 2),
               round(100 * m["chair_s"], 1), round(100 * m["chair_i"], 1), round(100 * m["recall"], 1),
               round(m["mean_length"], 1), "-" if not s.get("vs_vanilla") else
               "{} / {} ({:.2f})".format(*s["vs_vanilla"]), round(s["total_ms"], 1), s["n"]]
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines) + (f"\n\n{setting}. CHAIR_S / CHAIR_I / recall in % (lower CHAIR is better); mean length in "
                               "words; vs vanilla = captions that lost / gained a hallucinated object against "
                               "vanilla's caption of the same image, with the two-sided exact sign-test p; total ms = "
                               "generation time per caption.\n")


def plot_chair(summary: dict, path: Path, title: str) -> None:
    """CHAIR_S and CHAIR_I per strategy (horizontal bars; CHAIR_S with its 95 % Wilson interval over captions)."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = list(summary)
    labels = [spec if spec in ("vanilla", BLIND) else short_label(spec, budgets=True) for spec in specs]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(specs) + 1.8), dpi=120)
    y = range(len(specs))
    chair_s = [summary[s]["metrics"]["chair_s"] for s in specs]
    intervals = [wilson_interval(round(p * summary[s]["n"]), summary[s]["n"]) for p, s in zip(chair_s, specs)]
    errors = [[100 * max(0.0, p - lo) for p, (lo, _) in zip(chair_s, intervals)],
              [100 * max(0.0, hi - p) for p, (_, hi) in zip(chair_s, intervals)]]
    ax.barh([i - 0.2 for i in y], [100 * p for p in chair_s], height=0.4, xerr=errors, capsize=2,
            label="CHAIR_S (95% Wilson CI)")
    ax.barh([i + 0.2 for i in y], [100 * summary[s]["metrics"]["chair_i"] for s in specs], height=0.4,
            label="CHAIR_I")
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("% (lower is better)")
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, ax, path, title, width=90, fontsize=7)


def run_chair_benchmark(args, argv: Sequence[str]) -> dict[str, Path]:
    """`vlmeff eval --benchmark chair`: caption held-out synthetic scenes (reference model) or COCO images. Options,
    specs and data are checked before the model loads; the run folder is locked while the run lasts."""
    from vlmeff.eval.chair import (
        COCO_MAX_NEW_TOKENS,
        COCO_PROMPT,
        REFERENCE_MAX_NEW_TOKENS,
        REFERENCE_PROMPT,
        ObjectVocabulary,
        load_coco_chair,
        load_synthetic_chair,
    )
    from vlmeff.eval.pope import synthetic_image

    model_name = check_eval_args(args, "chair")
    specs = run_specs(args, model_name, default=[])
    if args.data:
        limit = args.limit or 500
        samples = load_coco_chair(args.data, args.image_dir, args.captions, num_images=limit, seed=args.seed)
        vocab, loader = ObjectVocabulary.coco(), default_image_loader
        prompt, max_new = args.prompt or COCO_PROMPT, args.max_new_tokens or COCO_MAX_NEW_TOKENS
    else:
        limit = args.limit or 100
        samples = load_synthetic_chair(limit)
        vocab, loader = ObjectVocabulary.reference(), synthetic_image
        prompt, max_new = args.prompt or REFERENCE_PROMPT, args.max_new_tokens or REFERENCE_MAX_NEW_TOKENS
    generation = generation_kwargs(args)
    settings = eval_settings(args, "chair", model_name, captions=args.captions and str(Path(args.captions).resolve()),
                             limit=limit, prompt=prompt, max_new_tokens=max_new)
    with start_run(args, settings, specs) as (folder, model, processor, model_name):
        output = folder.path
        setting = (f"CHAIR on {'COCO val2014' if args.data else 'held-out synthetic scenes'}, {len(samples)} images, "
                   f"model {model_name}, prompt {prompt!r}, max new tokens {max_new}, {decoding_label(generation)}")
        env = environment(argv, args.seed)
        env.update({"model": model_name, "data": args.data or "synthetic-chair", "images": len(samples),
                    "prompt": prompt, "max_new_tokens": max_new, "strategies": specs, "batch_size": args.batch_size,
                    "dtype": str(model.dtype), "generation": generation})
        folder.write_run_json(env)
        runner = ChairRunner(model, processor, samples, output, image_loader=loader, batch_size=args.batch_size,
                             max_new_tokens=max_new, generation=generation, seed=args.seed, prompt_text=prompt)
        t0 = time.time()
        results = {spec: runner.run(spec) for spec in specs}
        summary = summarize_chair(results, samples, vocab)
        (output / "summary.json").write_text(json.dumps(summary, indent=1))
        (output / "table.md").write_text(chair_table(summary, setting))
        plot_chair(summary, output / "chair.png", setting)
        env["wall_s"] = round(time.time() - t0, 1)
        folder.write_run_json(env)
    print((output / "table.md").read_text())
    print(f"wrote {output / 'summary.json'}, {output / 'table.md'}, {output / 'chair.png'}")
    return {"summary": output / "summary.json", "table": output / "table.md", "plot": output / "chair.png"}
