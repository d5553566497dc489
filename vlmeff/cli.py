"""`vlmeff` command line: list strategies/connectors/presets, run one image + prompt with a strategy."""

from __future__ import annotations

import argparse
import json
import sys

from vlmeff.registry import CONNECTORS
from vlmeff.spec import preset_names, strategy_table


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

    model, processor = vlmeff.load(args.model, dtype=args.dtype, device=args.device)
    image = load_image(args.image) if args.image else None
    vm = vlmeff.wrap(model, processor, args.strategy)
    torch.manual_seed(args.seed)
    answer = vm.chat(image, args.prompt, max_new_tokens=args.max_new_tokens)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmeff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="strategies, connectors and presets, one line each").set_defaults(fn=_cmd_list)
    run = sub.add_parser("run", help="answer one prompt about one image with a strategy, and print the stats")
    run.add_argument("--model", required=True, help="model folder or hub id (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL)")
    run.add_argument("--image", help="image file (any mode; see vlmeff.images for odd sizes)")
    run.add_argument("--prompt", required=True)
    run.add_argument("--strategy", default="vanilla",
                     help='strategy spec, e.g. "fastervlm:keep=64", a YAML file, or a preset from `vlmeff list`')
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    run.add_argument("--device", default=None, help="e.g. cuda, cpu (default: where from_pretrained puts it)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--json", action="store_true", help="print one JSON object (answer, stats, records)")
    run.set_defaults(fn=_cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vlmeff.images import ImageError
    from vlmeff.registry import UnknownNameError
    from vlmeff.strategy import StrategyError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (StrategyError, UnknownNameError, ImageError, FileNotFoundError) as e:
        print(f"vlmeff: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
