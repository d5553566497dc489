"""Table and plot of issue 17's comparison: each attention variant training-free on the shipped reference model vs
fine-tuned with it, alone and after fastervlm at 64 tokens, against the control (docs/results.md, "Trained attention
variants"). Reads the `vlmeff eval` run folders the commands there write; prints the markdown table and writes the
plot.

    python scripts/attention_variants.py --runs runs --plot assets/results/attention_variants_reference.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FASTERVLM = "fastervlm:keep=64,positions=auto,scorer=cls"
SAISA_FREE = "saisa:weights=runs/saisa-training-free.safetensors"
SAISA_TRAINED = "saisa:weights=runs/attn-saisa/saisa_projectors.safetensors"
# variant -> (spec training-free, run folder of the fine-tune, spec fine-tuned)
VARIANTS = {
    "none (causal)": ("vanilla", "attn-pope-control", "vanilla"),
    "cca": ("cca", "attn-pope-cca", "cca"),
    "mma": ("mma", "attn-pope-mma", "mma"),
    "naavit": ("naavit", "attn-pope-naavit", "naavit"),
    "saisa": (SAISA_FREE, "attn-pope-saisa", SAISA_TRAINED),
}


def with_fastervlm(spec: str) -> str:
    return FASTERVLM if spec == "vanilla" else f"{FASTERVLM}+{spec}"


def summary(runs: Path, folder: str) -> dict:
    path = runs / folder / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def f1(rows: dict, spec: str):
    """(mean F1 %, low, high, yes-ratio %, prefill GFLOPs) or None."""
    row = rows.get(spec)
    if row is None:
        return None
    mean = row["metrics"]["mean"]
    low, high = row["ci95"]["f1"]
    return 100 * mean["f1"], 100 * low, 100 * high, 100 * mean["pred_yes_ratio"], row["prefill_gflops"]


def cell(value) -> str:
    return "-" if value is None else f"{value[0]:.1f} ({value[1]:.0f}-{value[2]:.0f}), yes {value[3]:.0f} %, {value[4]:.1f} GF"


def collect(runs: Path) -> dict:
    free = summary(runs, "attn-pope-free")
    out = {}
    for name, (free_spec, folder, trained_spec) in VARIANTS.items():
        trained = summary(runs, folder)
        out[name] = {"free": f1(free, free_spec), "trained": f1(trained, trained_spec),
                     "free+fastervlm": f1(free, with_fastervlm(free_spec)),
                     "trained+fastervlm": f1(trained, with_fastervlm(trained_spec))}
    return out


def chair_table(runs: Path) -> str:
    """CHAIR_S / CHAIR_I / recall (%) per variant, training-free (attn-chair-free) and fine-tuned (attn-chair-<v>)."""
    folders = {"none (causal)": "attn-chair-control", "cca": "attn-chair-cca", "mma": "attn-chair-mma",
               "naavit": "attn-chair-naavit", "saisa": "attn-chair-saisa"}
    free = summary(runs, "attn-chair-free")

    def cell(rows, spec):
        row = rows.get(spec)
        if row is None:
            return "-"
        m = row["metrics"]
        return f"{100 * m['chair_s']:.0f} / {100 * m['chair_i']:.1f} / {100 * m['recall']:.1f}"

    lines = ["| attention | training-free: CHAIR_S / CHAIR_I / recall | fine-tuned: CHAIR_S / CHAIR_I / recall |",
             "|---|---|---|"]
    for name, (free_spec, _, trained_spec) in VARIANTS.items():
        trained = summary(runs, folders[name])
        lines.append(f"| {name} | {cell(free, free_spec)} | {cell(trained, trained_spec)} |")
    return "\n".join(lines)


def table(results: dict) -> str:
    lines = ["| attention | training-free (shipped weights) | fine-tuned with it | + fastervlm:keep=64, training-free "
             "| + fastervlm:keep=64, fine-tuned |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {cell(r['free'])} | {cell(r['trained'])} | {cell(r['free+fastervlm'])} | "
                     f"{cell(r['trained+fastervlm'])} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
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
    ax.set_xticks(range(len(results)), list(results))
    ax.set_ylabel("POPE mean F1 (%), 95 % CI")
    ax.set_ylim(0, 100)
    save_figure(fig, ax, path, "Attention variants on the reference model: applied training-free vs fine-tuned "
                               "with the same data, steps and seed as the causal control (180 questions)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    results = collect(Path(args.runs))
    print(table(results))
    print()
    print(chair_table(Path(args.runs)))
    if args.plot:
        plot(results, Path(args.plot))
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
