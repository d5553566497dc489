"""Which image regions a strategy keeps, on the reference model's synthetic scenes (whose objects are known).

    python -m vlmeff.eval.coverage --strategy fastervlm:keep=64 --strategy random:keep=64 --num-images 40

For each strategy and scene: `on objects` = share of the kept tokens (for in-LLM methods: those left after their
last removal) whose 14 px cell overlaps the bounding box of a present object; `objects hit` = share of the present objects with at least one kept token on their box. A
diagnostic of WHY a method ranks where it does on POPE (which asks about objects), not a benchmark.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import vlmeff
from vlmeff.reference import world


def object_cells(scene, grid: int, image_size: int) -> list[set[int]]:
    """Per present object, the grid cells its bounding box overlaps (raster order over grid x grid)."""
    cell = image_size / grid
    out = []
    for obj in scene.objects:
        if not obj.present:
            continue
        x0, y0, x1, y1 = obj.bbox
        cols = range(max(0, int(x0 // cell)), min(grid, int(np.ceil(x1 / cell))))
        rows = range(max(0, int(y0 // cell)), min(grid, int(np.ceil(y1 / cell))))
        out.append({r * grid + c for r in rows for c in cols})
    return out


def coverage(specs: list[str], num_images: int = 40) -> dict[str, tuple[float, float]]:
    from vlmeff.reference.model import load_reference

    model, processor = load_reference()
    seeds = list(world.eval_seeds(num_images))
    scenes = [world.render_scene(seed) for seed in seeds]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": world.CAPTION_PROMPT}]}],
        add_generation_prompt=True)
    results = {}
    for spec in specs:
        on, hit = [], []
        with vlmeff.wrap(model, processor, spec) as vm:
            for scene in scenes:
                inputs = processor(images=[scene.image], text=[prompt], return_tensors="pt")
                with torch.no_grad():
                    vm(**inputs)  # one prefill: in-LLM methods record what they remove inside the LLM
                record = vm.last_record[0]
                grid = record.grid[1]
                boxes = object_cells(scene, grid, scene.image.size[0])
                # the cells that reach the LLM's last layers (in-LLM removal), else those entering the LLM
                cells = record.llm_kept[max(record.llm_kept)] if record.llm_kept else record.kept_indices
                kept = set(cells.tolist())
                union = set().union(*boxes) if boxes else set()
                on.append(len(kept & union) / max(1, len(kept)))
                hit.append(sum(bool(kept & b) for b in boxes) / max(1, len(boxes)))
        results[spec] = (float(np.mean(on)), float(np.mean(hit)))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", action="append", required=True)
    parser.add_argument("--num-images", type=int, default=40)
    args = parser.parse_args(argv)
    rows = coverage(args.strategy, args.num_images)
    print("| strategy | kept tokens on objects | present objects hit |\n|---|---|---|")
    for spec, (on, hit) in rows.items():
        print(f"| {spec} | {100 * on:.1f}% | {100 * hit:.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
