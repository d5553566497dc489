"""Token-for-token parity of vlmeff's vLLM plugin with vlmeff's transformers path, on tiny saved models.

    python -m vlmeff.serve.parity --out results.json [--models llava,qwen2.5-vl] [--workdir DIR]

Runs inside the vLLM environment (scripts/vllm_env.sh). Per model it saves a tiny checkpoint
(`vlmeff.serve.testing`), computes the reference with `vlmeff.wrap(model, processor, spec).generate` (float32,
greedy) and runs ONE in-process vLLM engine (float32, eager, chunked prefill with a small token budget, prefix
caching) for all cases, the strategy chosen per request (`mm_processor_kwargs={"vlmeff_strategy": spec}`). Each case
(spec x 1 or 2 images) uses its own images, so vLLM's encoder cache cannot answer it from another case; the first
case is then sent again to hit the prefix cache. Kept indices come from the plugin's records
(VLMEFF_SERVE_RECORDS). Refused specs are sent too, and their error messages recorded. Writes one JSON document;
tests/test_vllm.py asserts on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "llava": ["vanilla", "random:keep=10", "pool:keep=10", "fastervlm:keep=10", "visionzip:keep=12",
              "divprune:keep=10"],
    "qwen2.5-vl": ["vanilla", "random:keep=6", "pool:keep=6", "fastervlm:keep=6,scorer=global_query",
                   "divprune:keep=6"],
    "qwen2-vl": ["random:keep=6", "fastervlm:keep=6,scorer=global_query"],
}
REFUSED = ["fastv:keep=8", "random:keep=8+fastervlm:keep=6", "cdpruner:keep=8"]
MAX_NEW_TOKENS = 8
TOKEN_BUDGET = 32  # max_num_batched_tokens: prompts are 40-90 tokens, so prefill is chunked, images split


def _image(seed: int, size=(84, 70)):
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8"))


def _prompt(kind: str, processor, count: int, text: str) -> str:
    content = [{"type": "image"}] * count + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _reference(kind: str, path: Path, cases: list[tuple[str, list, str]]) -> list[dict]:
    import torch
    from transformers import AutoConfig, AutoProcessor

    import vlmeff

    config = AutoConfig.from_pretrained(path)
    import transformers

    model = getattr(transformers, config.architectures[0]).from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    out = []
    for spec, images, prompt in cases:
        vm = vlmeff.wrap(model, processor, spec)
        inputs = processor(images=images, text=[prompt], return_tensors="pt")
        with torch.no_grad():
            ids = vm.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            prepared = vm.prepare(**inputs)
        new = ids[0, -MAX_NEW_TOKENS:].tolist()
        records = [r.kept_indices.tolist() for r in (vm.last_record or [])]
        positions = None
        if vm.connector.rope == "mrope":  # (t, h, w) ids of the reduced prompt, as the LLM gets them
            given = prepared.get("position_ids")
            positions = (given[1:, 0] if given is not None else vm.connector.original_positions(inputs)[:, 0]).tolist()
        out.append({"tokens": new, "kept": records, "mrope_positions": positions})
    return out


def _read_records(path: str, start: int) -> tuple[list[dict], int]:
    if not os.path.exists(path):
        return [], start
    with open(path) as f:
        lines = f.readlines()
    return [json.loads(line) for line in lines[start:]], len(lines)


def _vllm(kind: str, path: Path, cases: list[tuple[str, list, str]], records_path: str) -> dict:
    from vllm import LLM, SamplingParams

    from vlmeff.serve import vllm_kwargs

    positions: dict[tuple[int, ...], list] = {}  # prompt ids -> M-RoPE ids after the plugin's last recompute
    if kind.startswith("qwen"):
        from vlmeff.serve.models import _VlmeffQwen

        original = _VlmeffQwen.recompute_mrope_positions

        def observed(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
            out = original(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens)
            key = tuple(int(i) for i in input_ids)
            positions[key] = out[1][:, : len(key)].tolist()
            return out

        _VlmeffQwen.recompute_mrope_positions = observed
    started = time.time()
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
              limit_mm_per_prompt={"image": 2, "video": 0}, enable_chunked_prefill=True,
              max_num_batched_tokens=TOKEN_BUDGET, enable_prefix_caching=True, block_size=32, **vllm_kwargs(None))
    init_s = time.time() - started
    params = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0)
    _, seen = _read_records(records_path, 0)  # skip the records of vLLM's profiling run (dummy images)
    results = []

    def run(spec, images, prompt):
        nonlocal seen
        request = {"prompt": prompt, "multi_modal_data": {"image": images if len(images) > 1 else images[0]},
                   "mm_processor_kwargs": {"vlmeff_strategy": spec}}
        output = llm.generate([request], params, use_tqdm=False)[0]
        records, seen = _read_records(records_path, seen)
        return {"tokens": list(output.outputs[0].token_ids), "kept": [r["kept_indices"] for r in records],
                "mrope_positions": positions.get(tuple(output.prompt_token_ids)),
                "records": records, "prompt_tokens": len(output.prompt_token_ids),
                "cached_tokens": output.num_cached_tokens or 0}

    for spec, images, prompt in cases:
        results.append(run(spec, images, prompt))
    spec, images, prompt = cases[-1]
    repeat = run(spec, images, prompt)  # same request again: its prefix (images included) comes from the cache
    refused = {}
    for spec in REFUSED:
        try:
            run(spec, cases[0][1], cases[0][2])
            refused[spec] = None
        except Exception as e:  # vLLM re-raises the processor's error for the request
            refused[spec] = f"{type(e).__name__}: {e}"
    return {"init_s": init_s, "cases": results, "repeat": repeat, "refused": refused}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vlmeff-vllm-"))
    records_path = str(workdir / "records.jsonl")
    os.environ["VLMEFF_SERVE_RECORDS"] = records_path
    from transformers import AutoProcessor

    from vlmeff.serve.testing import save_tiny

    report = {}
    for m, kind in enumerate(args.models.split(",")):
        started = time.time()
        path = save_tiny(kind, workdir / kind)
        processor = AutoProcessor.from_pretrained(path)
        cases = []
        for c, spec in enumerate(CASES[kind]):
            for count in (1, 2):
                images = [_image(1000 * m + 10 * c + count + i) for i in range(count)]
                cases.append((spec, images, _prompt(kind, processor, count, "What is in the image? Describe it.")))
        reference = _reference(kind, path, cases)
        ref_s = time.time() - started
        served = _vllm(kind, path, cases, records_path)
        report[kind] = {
            "cases": [{"spec": spec, "images": len(images), "reference": ref, "vllm": got}
                      for (spec, images, _), ref, got in zip(cases, reference, served["cases"])],
            "repeat": {"spec": cases[-1][0], "reference": reference[-1], "vllm": served["repeat"]},
            "refused": served["refused"], "init_s": served["init_s"], "reference_s": ref_s,
            "total_s": time.time() - started,
        }
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
