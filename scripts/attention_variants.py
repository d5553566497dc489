"""Table and plot of issue 17's comparison: each attention variant training-free on the shipped reference model vs
fine-tuned with it, alone and after fastervlm at 64 tokens, against the control (docs/results.md, "Trained attention
variants"). Reads the `vlmeff eval` run folders the commands there write; prints the markdown tables of one
training recipe (b: projector learning rate 1e-4, the shipped fine-tunes, run folders ending in -lr4; a: 1e-3) and
writes its plot.

    python scripts/attention_variants.py --runs runs --recipe b --plot assets/results/attention_variants_reference.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FASTERVLM = "fastervlm:keep=64,positions=auto,scorer=cls"
SAISA_FREE = "saisa:weights=runs/saisa-training-free.safetensors"
SAISA_FITTED = "saisa:weights=runs/saisa-init/saisa_init.safetensors"
# variant -> (run folder and spec applied to the shipped model, run folder and spec of the fine-tune); SAISA's
# training-free runs have their own folder (its projector files are written by the commands in docs/results.md)
VARIANTS = {
    "none (causal)": ("attn-pope-free", "vanilla", "attn-pope-control", "vanilla"),
    "cca": ("attn-pope-free", "cca", "attn-pope-cca", "cca"),
    "mma": ("attn-pope-free", "mma", "attn-pope-mma", "mma"),
    "naavit": ("attn-pope-free", "naavit", "attn-pope-naavit", "naavit"),
    "saisa": ("attn-pope-saisa-free", SAISA_FREE, "attn-pope-saisa", "saisa"),
    "saisa, fitted start (no gradient step)": ("attn-pope-saisa-free", SAISA_FITTED, None, None),
}
CHAIR = {  # variant -> (run folder applied to the shipped model, run folder of the fine-tune)
    "none (causal)": ("attn-chair-free", "attn-chair-control"),
    "cca": ("attn-chair-free", "attn-chair-cca"),
    "mma": ("attn-chair-free", "attn-chair-mma"),
    "naavit": ("attn-chair-free", "attn-chair-naavit"),
    "saisa": ("attn-chair-saisa-free", "attn-chair-saisa"),
    "saisa, fitted start (no gradient step)": ("attn-chair-saisa-free", None),
}


def with_fastervlm(spec: str) -> str:
    return FASTERVLM if spec == "vanilla" else f"{FASTERVLM}+{spec}"


def summary(runs: Path, folder: str | None) -> dict:
    path = runs / folder / "summary.json" if folder else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def f1(rows: dict, spec: str | None):
    """(mean F1 %, low, high, yes-ratio %, prefill GFLOPs) or None."""
    row = rows.get(spec) if spec else None
    if row is None:
        return None
    mean = row["metrics"]["mean"]
    low, high = row["ci95"]["f1"]
    return 100 * mean["f1"], 100 * low, 100 * high, 100 * mean["pred_yes_ratio"], row["prefill_gflops"]


def cell(value) -> str:
    return "-" if value is None else f"{value[0]:.1f} ({value[1]:.0f}-{value[2]:.0f}), yes {value[3]:.0f} %, {value[4]:.1f} GF"


RECIPES = {"a": "", "b": "-lr4"}  # recipe -> suffix of its fine-tunes' run folders (the training-free ones are shared)
LR = {"a": "1e-3", "b": "1e-4"}


def collect(runs: Path, recipe: str) -> dict:
    out = {}
    for name, (free_folder, free_spec, folder, trained_spec) in VARIANTS.items():
        free, trained = summary(runs, free_folder), summary(runs, folder and folder + RECIPES[recipe])
        out[name] = {"free": f1(free, free_spec), "trained": f1(trained, trained_spec),
                     "free+fastervlm": f1(free, with_fastervlm(free_spec)),
                     "trained+fastervlm": f1(trained, trained_spec and with_fastervlm(trained_spec))}
    return out


def chair_table(runs: Path, recipe: str) -> str:
    """CHAIR_S / CHAIR_I / recall (%) per variant, applied to the shipped model and fine-tuned."""

    def chair_cell(rows, spec):
        row = rows.get(spec) if spec else None
        if row is None:
            return "-"
        m = row["metrics"]
        return f"{100 * m['chair_s']:.0f} / {100 * m['chair_i']:.1f} / {100 * m['recall']:.1f}"

    lines = ["| attention | training-free: CHAIR_S / CHAIR_I / recall | fine-tuned: CHAIR_S / CHAIR_I / recall |",
             "|---|---|---|"]
    for name, (_, free_spec, _, trained_spec) in VARIANTS.items():
        free_folder, folder = CHAIR[name]
        lines.append(f"| {name} | {chair_cell(summary(runs, free_folder), free_spec)} | "
                     f"{chair_cell(summary(runs, folder and folder + RECIPES[recipe]), trained_spec)} |")
    return "\n".join(lines)


def loss_gap(runs: Path, run: str, control: str = "attn-control", window: int = 25) -> str:
    """Mean per-step training-loss difference run - control over windows of `window` steps: a paired comparison,
    since every run sees the same scenes in the same order."""
    def losses(folder):
        path = runs / folder / "train_log.jsonl"
        if not path.is_file():
            return {}
        return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}

    a, b = losses(run), losses(control)
    steps = sorted(set(a) & set(b))
    if not steps:
        return f"{run} - {control}: no common steps"
    cells = []
    for start in range(steps[0], steps[-1] + 1, window):
        w = [s for s in steps if start <= s < start + window]
        if w:
            cells.append(f"{w[0]}-{w[-1]}: {sum(a[s] - b[s] for s in w) / len(w):+.3f}")
    return f"training loss, {run} - {control}, per {window} steps: " + ", ".join(cells)


def training_summary(runs: Path, recipe: str) -> str:
    """Per fine-tune of the recipe: CPU minutes (state.json) and the mean loss of the first 20 and last 50 steps."""
    lines = ["| run | CPU min | loss, first 20 steps -> last 50 |", "|---|---|---|"]
    for variant in ("control", "cca", "mma", "naavit", "saisa"):
        folder = f"attn-{variant}{RECIPES[recipe] or ('-fit' if variant == 'saisa' else '')}"
        log, state = runs / folder / "train_log.jsonl", runs / folder / "state.json"
        if not log.is_file() or not state.is_file():
            continue
        loss = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
        minutes = json.loads(state.read_text())["cpu_seconds_total"] / 60
        lines.append(f"| {folder} | {minutes:.1f} | {sum(loss[:20]) / 20:.3f} -> {sum(loss[-50:]) / 50:.3f} |")
    return "\n".join(lines)


def table(results: dict) -> str:
    lines = ["| attention | training-free (shipped weights) | fine-tuned with it | + fastervlm:keep=64, training-free "
             "| + fastervlm:keep=64, fine-tuned |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {cell(r['free'])} | {cell(r['trained'])} | {cell(r['free+fastervlm'])} | "
                     f"{cell(r['trained+fastervlm'])} |")
    return "\n".join(lines)


def plot(results: dict, path: Path, recipe: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlmeff.eval.runner import save_figure

    fig, ax = plt.subplots(figsize=(8, 3.6))
    columns = [("free", "training-free"), ("trained", "fine-tuned"), ("free+fastervlm", "training-free + fastervlm@64"),
               ("trained+fastervlm", "fine-tuned + fastervlm@64")]
    width = 0.2
    for k, (key, label) in enumerate(columns):
        xs, ys, errs = [], [], [[], []]
        for i, r in enumerate(results.values()):
            if r[key] is None:
                continue
            value, low, high = r[key][:3]
            xs.append(i + (k - 1.5) * width)
            ys.append(value)
            errs[0].append(value - low)
            errs[1].append(high - value)
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=label)
    ax.set_xticks(range(len(results)), [name.split(",")[0] + ("\nfitted start" if "," in name else "")
                                        for name in results])
    ax.set_ylabel("POPE mean F1 (%), 95 % CI")
    ax.set_ylim(0, 100)
    save_figure(fig, ax, path, "Attention variants on the reference model: applied training-free vs fine-tuned "
                               "with the same data, steps, seed and learning rates as the causal control (projector "
                               f"learning rate {LR[recipe]}; 180 questions)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="b")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    results = collect(Path(args.runs), args.recipe)
    print(table(results))
    print()
    print(chair_table(Path(args.runs), args.recipe))
    print()
    suffix = RECIPES[args.recipe]
    print(loss_gap(Path(args.runs), f"attn-saisa{suffix or '-fit'}", f"attn-control{suffix}"))
    print()
    print(training_summary(Path(args.runs), args.recipe))
    if args.plot:
        plot(results, Path(args.plot), args.recipe)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
