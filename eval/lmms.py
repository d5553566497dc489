"""lmms-eval plugin: the model ``vlmeff`` runs any lmms-eval generation task with any vlmeff strategy.

    lmms-eval --model vlmeff --model_args "pretrained=reference,strategy='fastervlm:keep=64,scorer=cls'" \\
        --tasks pope --batch_size 8

lmms-eval 0.7 resolves ``--model`` through its manifest registry, which it fills from the entry point group
``lmms_eval.models`` (the old ``@register_model`` decorator alone no longer reaches the CLI). vlmeff declares
``vlmeff = "vlmeff.eval.lmms:manifest"`` there, so installing vlmeff is all the registration needed.

lmms-eval splits ``--model_args`` on commas outside quotes and braces (``utils.simple_parse_args_string``)
and keeps the quotes in the value: a spec whose items carry several parameters is quoted
(``strategy='fastervlm:keep=64,scorer=cls'``) and the plugin removes one pair of surrounding quotes; a preset
name or a YAML path needs no quoting. See docs/lmms-eval.md.

Only ``generate_until`` is implemented (batched, left padding, through ``vlmeff.wrap(...).generate``); the
likelihood request types raise NotImplementedError. Per request the kept visual tokens and prefill FLOPs are
kept in ``VlmeffLMM.sample_costs``, returned to lmms-eval as token counts, logged as a summary, and added to
lmms-eval's ``throughput`` block of the results.

lmms-eval is imported lazily: ``import vlmeff`` never needs it, and this module imports without it (the class
then refuses to start, naming the install command).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

try:
    from lmms_eval.api.model import lmms as _LMMBase

    _LMMS_IMPORT_ERROR: ImportError | None = None
except ImportError as error:  # vlmeff without lmms-eval: the module imports, the model refuses to start
    _LMMBase, _LMMS_IMPORT_ERROR = object, error

__all__ = ["MODEL_NAME", "VlmeffLMM", "generation_settings", "manifest", "unquote"]

MODEL_NAME = "vlmeff"
INSTALL = "pip install --no-deps lmms-eval==0.7.3 (after pip install 'vlmeff[eval]'; see docs/lmms-eval.md)"

# gen_kwargs passed to generate as they are; the others are read by generation_settings or ignored
_PASSED_THROUGH = (
    "top_p",
    "top_k",
    "num_beams",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "min_new_tokens",
)
_READ = ("until", "max_new_tokens", "temperature", "do_sample")


def manifest():
    """The lmms-eval model manifest of ``vlmeff`` (the payload of the ``lmms_eval.models`` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.VlmeffLMM")


def unquote(value: str) -> str:
    """``'x'`` or ``"x"`` -> ``x``: lmms-eval keeps the quotes that protect commas in a model_args value."""
    text = value.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1].strip()
    return text


def generation_settings(
    gen_kwargs: dict[str, Any], default_max_new_tokens: int
) -> tuple[dict[str, Any], list[str], list[str]]:
    """(generate kwargs, stop strings, ignored keys) for one lmms-eval ``gen_kwargs`` dict.

    Sampling follows lmms-eval's convention: ``temperature > 0`` samples unless ``do_sample`` is false, and
    ``temperature == 0`` is greedy whatever ``do_sample`` says (transformers refuses sampling at temperature
    0). top_p / top_k only apply when sampling; ``until`` (a string or a list) becomes stop strings, cut from
    the text.
    """
    gen = dict(gen_kwargs)
    until = gen.pop("until", None)
    if until is None:
        until = []
    elif isinstance(until, str):
        until = [until]
    elif not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
        raise ValueError(f"gen_kwargs until={until!r}: expected a string or a list of strings")
    max_new_tokens = gen.pop("max_new_tokens", None)
    max_new_tokens = default_max_new_tokens if max_new_tokens is None else max_new_tokens
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, (int, float))
        or max_new_tokens < 1
        or int(max_new_tokens) != max_new_tokens
    ):
        raise ValueError(f"gen_kwargs max_new_tokens={max_new_tokens!r}: expected a positive integer")
    do_sample = gen.pop("do_sample", None)
    temperature = gen.pop("temperature", None)
    temperature = (1.0 if do_sample else 0.0) if temperature is None else float(temperature)
    if temperature < 0:
        raise ValueError(f"gen_kwargs temperature={temperature!r}: expected a value >= 0 (0 = greedy)")
    sample = temperature > 0 and (do_sample is None or bool(do_sample))
    kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "do_sample": sample}
    if sample:
        kwargs["temperature"] = temperature
    for key in _PASSED_THROUGH:
        value = gen.pop(key, None)
        if value is None or (key in ("top_p", "top_k") and not sample):
            continue
        kwargs[key] = value
    return kwargs, [s for s in until if s], sorted(gen)


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1 or str(number) != str(value).strip():
        raise ValueError(
            f"{name}={value!r}: expected a positive integer"
            + (" ('auto' batch sizes are not supported by the vlmeff model)" if name == "batch_size" else "")
        )
    return number


class VlmeffLMM(_LMMBase):
    """lmms-eval model ``vlmeff``: a Hugging Face VLM (or vlmeff's reference model) run by ``vlmeff.wrap``.

    model_args: ``pretrained`` (a model folder, a hub id, or ``reference``: the bundled reference model),
    ``strategy`` (a vlmeff spec, preset name or YAML path; ``vanilla`` = none), ``dtype`` (auto, float32,
    bfloat16, float16), ``device`` (auto, cpu, cuda, cuda:N), ``batch_size``, ``attn_implementation``,
    ``connector`` (force a connector by name), ``max_new_tokens`` (used when the task sets none).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str = "reference",
        strategy: str = "vanilla",
        dtype: str = "auto",
        device: str | None = "auto",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        attn_implementation: str = "sdpa",
        connector: str | None = None,
        max_new_tokens: int = 1024,
        **unknown: Any,
    ) -> None:
        if _LMMS_IMPORT_ERROR is not None:
            raise ImportError(
                f"the vlmeff lmms-eval model needs lmms-eval: {INSTALL} ({_LMMS_IMPORT_ERROR})"
            ) from _LMMS_IMPORT_ERROR
        if unknown:
            hint = ""
            if ":" in str(strategy):  # e.g. strategy=fastervlm:keep=64,scorer=cls arrives as two model_args
                hint = (
                    " A comma inside an unquoted strategy spec splits it into separate model_args (strategy="
                    f"{strategy!r} reached the model): quote the spec, e.g. "
                    "strategy='fastervlm:keep=64,scorer=cls'."
                )
            given = ", ".join(f"{k}={v!r}" for k, v in unknown.items())
            raise TypeError(
                f"vlmeff model_args: unknown argument(s) {given}; accepted: pretrained, strategy, dtype, "
                f"device, batch_size, attn_implementation, connector, max_new_tokens.{hint}"
            )
        super().__init__()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError(
                f"WORLD_SIZE={os.environ['WORLD_SIZE']}: the vlmeff lmms-eval model runs in one "
                "process (no data-parallel launch yet); start lmms-eval without accelerate/torchrun"
            )
        import vlmeff

        self.batch_size = _positive_int("batch_size", batch_size)
        self.default_max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        self.pretrained = str(pretrained)
        spec = unquote(str(strategy))
        model, processor = vlmeff.load(
            self.pretrained, dtype=str(dtype), device=device, attn_implementation=str(attn_implementation)
        )
        processor.tokenizer.padding_side = "left"  # batched decoder-only generation pads on the left
        self._model = model.eval()
        self.processor = processor
        self.wrapper = vlmeff.wrap(model, processor, spec, connector=connector)
        self.spec = self.wrapper.spec
        self.sample_costs: list[dict[str, Any]] = []  # one entry per answered request, in answering order
        self._ignored_gen_keys: set[str] = set()

    # --- what lmms-eval reads ------------------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def device(self):
        return self._model.device

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "the vlmeff lmms-eval model implements generate_until only; loglikelihood requests (tasks with "
            "output_type loglikelihood / multiple_choice) are not supported: use a generation variant of the "
            "task"
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(
            "the vlmeff lmms-eval model implements generate_until only (no multi-round tasks)"
        )

    def clean(self):
        """Unwrap the model (removes vlmeff's hooks) and drop it with the wrapper, so that lmms-eval's
        clean-up (before an LLM judge runs) really frees its memory; sample_costs and spec stay."""
        self.wrapper.unwrap()
        del self.wrapper
        super().clean()

    # --- generation ----------------------------------------------------------------------------------------
    def generate_until(self, requests) -> list:
        """Answers in request order. Requests are grouped by gen_kwargs and sorted by prompt length
        (lmms-eval's Collator), then generated ``batch_size`` at a time."""
        from lmms_eval import utils
        from lmms_eval.api.instance import GenerationResult, TokenCounts
        from tqdm import tqdm

        tokenizer = self.processor.tokenizer
        collator = utils.Collator(
            [r.args for r in requests], lambda args: (-len(tokenizer.encode(args[0])), args[0]), grouping=True
        )
        answers: list = []
        costs_before = len(self.sample_costs)
        started = time.perf_counter()
        bar = tqdm(
            total=len(requests), disable=self.rank != 0, desc=f"vlmeff {self.spec}"[:60], file=sys.stderr
        )
        try:
            for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
                contexts, gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
                visuals = [
                    self._visuals(fn, task, split, doc_id)
                    for fn, task, split, doc_id in zip(doc_to_visual, tasks, splits, doc_ids)
                ]
                texts, costs = self._generate(list(contexts), visuals, gen_kwargs[0])
                for text, cost, task, split, doc_id in zip(texts, costs, tasks, splits, doc_ids):
                    self.sample_costs.append({"task": task, "split": split, "doc_id": doc_id, **cost})
                    answers.append(
                        GenerationResult(
                            text,
                            TokenCounts(
                                input_tokens=cost["input_tokens"], output_tokens=cost["output_tokens"]
                            ),
                        )
                    )
                new = self.sample_costs[costs_before:]
                bar.set_postfix(
                    kept=f"{sum(c['kept_tokens'] for c in new) / len(new):.1f}",
                    gflops=f"{sum(c['prefill_flops'] for c in new) / len(new) / 1e9:.2f}",
                )
                bar.update(len(chunk))
        finally:
            bar.close()
        self._report(self.sample_costs[costs_before:], time.perf_counter() - started)
        return collator.get_original(answers)

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        """The request's images, normalised as vlmeff loads every image (RGB, size bounds)."""
        from PIL import Image

        from vlmeff.images import load_image

        items = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        flat, stack = [], list(items or [])[::-1]
        while stack:  # some tasks nest lists of images
            item = stack.pop()
            if isinstance(item, (list, tuple)):
                stack.extend(list(item)[::-1])
            elif isinstance(item, Image.Image):
                flat.append(load_image(item))
            else:
                raise NotImplementedError(
                    f"task {task!r}, doc {doc_id}: a visual of type {type(item).__name__} "
                    f"({str(item)[:80]!r}); the vlmeff lmms-eval model feeds images only (video and audio "
                    "tasks are not supported yet)"
                )
        return flat

    def _prompt(self, context: str, num_images: int) -> str:
        image_token = getattr(self.processor, "image_token", None)
        entries = [] if image_token and image_token in context else [{"type": "image"}] * num_images
        content = [*entries, {"type": "text", "text": context}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )

    def _generate(
        self, contexts: list[str], visuals: list[list], gen_kwargs: dict
    ) -> tuple[list[str], list[dict]]:
        """Decoded answers (cut at the stop strings, stripped) and per-row costs of one batch."""
        import torch

        from vlmeff.eval.runner import batch_costs

        kwargs, until, ignored = generation_settings(gen_kwargs, self.default_max_new_tokens)
        self._warn_ignored(ignored)
        prompts = [self._prompt(c, len(v)) for c, v in zip(contexts, visuals)]
        images = [im for row in visuals for im in row] or None
        inputs = self.processor(images=images, text=prompts, return_tensors="pt", padding=True).to(
            self.device
        )
        if until:
            kwargs.update(stop_strings=until, tokenizer=self.processor.tokenizer)
        with torch.no_grad():
            out = self.wrapper.generate(**inputs, **kwargs)
        new = out[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(new, skip_special_tokens=True)
        for stop in until:
            texts = [t.split(stop)[0] for t in texts]
        # the numbers `vlmeff eval` records per question, plus the tokens entering the LLM and generated
        costs = batch_costs(self.wrapper, len(prompts))
        prompt_tokens = inputs["attention_mask"].sum(1).tolist()
        for cost, prompt_len, output_len in zip(costs, prompt_tokens, self._output_lengths(new)):
            cost["input_tokens"] = int(prompt_len) - cost["visual_tokens"] + cost["kept_tokens"]
            cost["output_tokens"] = output_len
        return [t.strip() for t in texts], costs

    def _output_lengths(self, new) -> list[int]:
        """Generated tokens per row before the first end-of-sequence token or padding (a row that stopped at
        a stop string while others went on is padded)."""
        import torch

        config = self._model.generation_config
        eos = config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        pad = config.pad_token_id
        pad = self.processor.tokenizer.pad_token_id if pad is None else pad
        eos += [pad] if pad is not None else []
        if not eos:
            return [int(new.shape[1])] * int(new.shape[0])
        ended = torch.isin(new, torch.tensor(eos, device=new.device))
        first = ended.int().argmax(1)
        return torch.where(ended.any(1), first, torch.full_like(first, new.shape[1])).tolist()

    def _warn_ignored(self, keys: Sequence[str]) -> None:
        from loguru import logger

        fresh = [k for k in keys if k not in self._ignored_gen_keys and k not in _READ]
        if fresh:
            self._ignored_gen_keys.update(fresh)
            logger.warning(
                f"vlmeff model: gen_kwargs {fresh} are not used (understood: "
                f"{', '.join(_READ + _PASSED_THROUGH)})"
            )

    def _report(self, costs: list[dict], elapsed_s: float) -> None:
        """One summary line, and the means in the results' ``throughput`` block (lmms-eval's log_metrics)."""
        if not costs:
            return
        from lmms_eval.models.model_utils.gen_metrics import log_metrics
        from loguru import logger

        n = len(costs)
        means = {
            key: sum(c[key] for c in costs) / n
            for key in ("kept_tokens", "visual_tokens", "equivalent_tokens", "input_tokens")
        }
        means["prefill_gflops"] = sum(c["prefill_flops"] for c in costs) / n / 1e9
        means["prefill_ms"] = 1e3 * sum(c["prefill_s"] for c in costs) / n
        generated = sum(c["output_tokens"] for c in costs)
        logger.info(
            f"vlmeff {self.spec} on {self.pretrained}: {n} requests, visual tokens kept "
            f"{means['kept_tokens']:.1f} of {means['visual_tokens']:.1f} (layer-averaged "
            f"{means['equivalent_tokens']:.1f}), prefill {means['prefill_gflops']:.3f} GFLOPs and "
            f"{means['prefill_ms']:.1f} ms per request; per-request numbers in sample_costs"
        )
        log_metrics(
            total_elapsed_time=elapsed_s,
            total_gen_tokens=generated,
            avg_speed=generated / elapsed_s if elapsed_s > 0 else 0.0,
            additional_metrics={f"vlmeff_{k}": v for k, v in means.items()},
        )
