"""`vlmeff.wrap(model, processor, spec)`: run a stock HF VLM with visual-token strategies.

The wrapper never patches model code. For each call it
1. finds the image spans and encodes the images through the connector (one tower pass, same as HF's; with
   vision-stage strategies an explicit block loop that prunes inside the encoder),
2. runs the pre-LLM strategies on per-image tokens (records kept indices per image),
3. projects and splices the reduced features back (placeholders, masks, positions shrink with them),
4. calls the model's own `forward` / `generate` with the reduced inputs and `mm_encoder_outputs`.

`generate` returns what `model.generate` returns for the ORIGINAL prompt: the prompt ids as given, followed by
the new tokens, so `out[:, inputs["input_ids"].shape[1]:]` are the new tokens as usual.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from vlmeff.connector import Connector
from vlmeff.decoding import BranchPlan, BranchRowsDone, ContrastLogits, stack_batches
from vlmeff.flops import FlopsBreakdown, prefill_flops
from vlmeff.llm_stage import LLMSession
from vlmeff.registry import CONNECTORS
from vlmeff.router import call_phase
from vlmeff.spec import build_pipeline, describe, parse_spec
from vlmeff.strategy import (
    AttentionStrategy,
    ImageTokens,
    NotApplicableError,
    ProbeUnavailableError,
    PromptText,
    SelectionRecord,
    Stage,
    StrategyError,
    TokenReducer,
)
from vlmeff.timing import Clock

# Keys of processor output that describe the prompt and images (everything else goes to generate as is).
INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids", "image_sizes",
              "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


@dataclass
class RunStats:
    """Numbers of the last call. Times in seconds; FLOPs of the prefill (see vlmeff.flops)."""

    visual_tokens_in: int = 0
    visual_tokens_kept: int = 0  # visual tokens entering the LLM
    # layer-averaged visual tokens inside the LLM (= visual_tokens_kept without in-LLM removal), summed over the batch
    equivalent_tokens: float = 0.0
    text_tokens: int = 0
    flops: dict[str, int] = field(default_factory=dict)
    flops_vanilla: dict[str, int] = field(default_factory=dict)
    per_sample_flops: list[int] = field(default_factory=list)  # total prefill FLOPs of each batch row
    per_sample_equivalent_tokens: list[float] = field(default_factory=list)  # layer-averaged visual tokens per row
    encode_s: float = 0.0  # vision encoder
    # the strategies' own work in the prefill: before the LLM (scores, selection, splice) plus inside the LLM's prefill
    # forward (in-LLM scoring and compaction, masks; that part is also inside llm_prefill_s)
    strategy_s: float = 0.0
    llm_strategy_s: float = 0.0  # the in-LLM part of strategy_s
    decode_strategy_s: float = 0.0  # strategy work during the decode steps (e.g. score edits), inside total_s only
    llm_prefill_s: float = 0.0  # first LLM forward over the prompt (in-LLM strategy work included)
    prefill_s: float = 0.0  # encode + pre-LLM strategy work + LLM prefill (time to first token)
    total_s: float = 0.0
    new_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_connector(model, processor=None, name: str | None = None) -> Connector:
    """The connector of `model`: found by its model class, or named, with options as in a spec item
    ("llava-next:budget=per_image"; ":budget=per_image" keeps the automatic choice and sets an option)."""
    options: dict[str, str] = {}
    if name is not None:
        from vlmeff.spec import parse_item

        head, _, _ = name.partition(":")
        name, options = parse_item(name) if head.strip() else (None, parse_item("connector" + name)[1])
    if name is not None:
        return _connector_with(CONNECTORS.get(name), model, processor, options)
    for cls in CONNECTORS.items().values():
        if cls.matches(model):
            return _connector_with(cls, model, processor, options)
    names = ", ".join(f"{n} ({', '.join(c.__name__ for c in cls.model_classes)})" for n, cls in CONNECTORS.items().items())
    raise TypeError(f"no vlmeff connector for {type(model).__name__}; supported: {names}")


class VLMWrapper:
    """A model + processor + strategy pipeline. Also a context manager: leaving it unwraps the model."""

    def __init__(self, model, processor=None, spec=None, connector: str | None = None):
        self.model = model
        self.processor = processor
        self.connector = find_connector(model, processor, connector)
        self.strategies = build_pipeline(parse_spec(spec))
        for strategy in self.strategies:
            strategy.check_applicable(self.connector)
        # a method acting at several stages on this model (FlowCut on Qwen: encoder + LLM) expands into its parts
        expanded = [part for strategy in self.strategies for part in strategy.expand(self.connector)]
        if len(expanded) != len(self.strategies) or any(a is not b for a, b in zip(expanded, self.strategies)):
            self.strategies = build_pipeline(expanded)
            for strategy in self.strategies:
                strategy.check_applicable(self.connector)
        modes = {s.positions for s in self.strategies if isinstance(s, TokenReducer)} - {"auto"}
        self.positions = modes.pop() if modes else self.connector.default_positions
        if self.positions not in self.connector.supported_positions:
            raise ValueError(
                f"positions={self.positions!r} is not supported on {self.connector.name}; "
                f"supported: {', '.join(self.connector.supported_positions)}"
            )
        self.last_record: list[SelectionRecord] = []
        self.stats = RunStats()
        self._clock = Clock(model.device)
        self._marks: dict[str, Any] = {}  # the current call's clock points (vlmeff.timing)
        self._hooks = [
            model.model.language_model.register_forward_pre_hook(self._on_llm_start, with_kwargs=True),
            model.model.language_model.register_forward_hook(self._on_llm_end, with_kwargs=True),
        ]
        self._timing = False
        self._prefills = 0  # prefill calls of the language model in this call (phase from the cache length)
        self._session: LLMSession | None = None
        self._layout = None  # TokenLayout of the current call's LLM input
        self._plan: BranchPlan | None = None  # contrast branches of the current call (decoding stage)

    # --- context manager / unwrap ------------------------------------------------------------------------------
    def __enter__(self) -> VLMWrapper:
        return self

    def __exit__(self, *exc) -> None:
        self.unwrap()

    def unwrap(self):
        """Remove everything the wrapper installed; the model is exactly as it was given."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        return self.model

    @property
    def spec(self) -> str:
        return describe(self.strategies)

    # --- timing hooks (the first prefill of a call, known from its empty cache) -------------------------------
    def _on_llm_start(self, module, args, kwargs):
        self._timing = call_phase(kwargs) == "prefill" and self._prefills == 0
        if self._timing:
            self._prefills += 1
            self._marks["llm_start"] = self._clock.now()

    def _on_llm_end(self, module, args, kwargs, output):
        if self._timing and "llm_start" in self._marks:
            self._timing = False
            self._marks["llm_end"] = self._clock.now()

    def _finish_times(self, start, end) -> None:
        """RunStats' times from the call's clock points (CUDA: read once, after the call; vlmeff.timing)."""
        stats, marks, seconds = self.stats, self._marks, self._clock.seconds
        stats.total_s = seconds(start, end)
        if "llm_end" in marks:
            stats.llm_prefill_s = seconds(marks["llm_start"], marks["llm_end"])
        if self._session is not None:
            stats.llm_strategy_s = self._session.prefill_strategy_s
            stats.decode_strategy_s = self._session.decode_strategy_s
            stats.strategy_s += stats.llm_strategy_s
        stats.prefill_s = stats.encode_s + (stats.strategy_s - stats.llm_strategy_s) + stats.llm_prefill_s

    # --- the pipeline ------------------------------------------------------------------------------------------
    def prepare(self, frames: Sequence[int | None] | None = None, **inputs) -> dict[str, Any]:
        """Model kwargs for the reduced batch (also fills `last_record` and the token/FLOP stats).

        frames: one entry per image of `pixel_values` (in order): its frame index when the images are the frames of
        a video fed one image per frame (LLaVA), None for a still image; sets `ImageTokens.frame` and
        `SelectionRecord.frame` (see `_mark_frames`). `generate` and `__call__` accept it too.
        """
        self.stats = RunStats()
        self.last_record = []
        self._session = None
        self._plan = None
        self._clock = Clock(self.model.device)
        self._marks = {}
        if inputs.get("pixel_values") is None and inputs.get("pixel_values_videos") is None:  # text only
            self.stats.text_tokens = int(_mask(inputs).sum())
            self._count(inputs, [], [])
            return {k: v for k, v in inputs.items() if v is not None}
        start = self._clock.now()
        with torch.no_grad():
            decoding = [s for s in self.strategies if s.stage is Stage.DECODING]
            if decoding:  # contrast branches: extra rows of the same batch
                branches = decoding[0].branches(inputs, self.connector)
                self._plan = BranchPlan(decoding[0], int(inputs["input_ids"].shape[0]), branches)
                inputs = stack_batches([inputs, *[b.inputs for b in branches]], self.connector.pad_token_id)
            vision = [s for s in self.strategies if s.stage is Stage.VISION]
            slots, images = self.connector.prepare_tokens(inputs, vision)  # vision-stage strategies prune inside
            images = self._mark_frames(inputs, slots, images, frames)
            encoded = self._clock.now()
            images = self._attach_prompts(inputs, images)
            images = self._pre_llm(images)
            model_kwargs = self.connector.assemble(inputs, slots, images, self.positions)
            assembled = self._clock.now()
        self.stats.encode_s = self._clock.seconds(start, encoded)  # CUDA: waits for the encoder and the splice
        self.stats.strategy_s = self._clock.seconds(encoded, assembled)
        records = [img.finish_record() for img in images]
        self.last_record = [r for r in records if r.sample < self._main_rows(inputs)]
        self._layout = self.connector.layout(model_kwargs, images)  # what reaches the LLM: counts, masks, positions
        self._count(inputs, slots, images)
        self._slots, self._images = slots, images
        self._session = self._llm_session(model_kwargs, images)
        return model_kwargs

    def _main_rows(self, inputs: dict[str, Any]) -> int:
        """Rows of the caller's batch (the first rows of `inputs`; contrast branch rows follow them)."""
        return self._plan.rows if self._plan is not None else int(inputs["input_ids"].shape[0])

    def _pre_llm(self, images: list[ImageTokens]) -> list[ImageTokens]:
        """The pre-LLM strategies, in order, on every image; the images of a contrast branch with its own reducers
        go through those instead (e.g. DAMRO's outlier tokens)."""
        pipelines: dict[int, list] = {0: [s for s in self.strategies if s.stage is Stage.PRE_LLM]}
        if self._plan is not None:
            for i, branch in enumerate(self._plan.branches):
                if branch.reducers is not None:
                    pipelines[i + 1] = list(branch.reducers)
        groups: dict[int, list[int]] = {}
        for i, img in enumerate(images):
            key = 0 if self._plan is None else self._plan.branch_of(img.record.sample)
            groups.setdefault(key if key in pipelines else 0, []).append(i)
        out = list(images)
        for key, members in groups.items():
            part = [images[i] for i in members]
            for strategy in pipelines[key]:
                if strategy.token_space == "llm":
                    part = self.connector.project_images(part)
                try:
                    part = strategy.reduce(part)
                except ProbeUnavailableError as e:
                    raise ProbeUnavailableError(f"{strategy.name} cannot follow a vision-stage reduction: {e}") from None
            for i, img in zip(members, part):
                out[i] = img
        return out

    def _attach_prompts(self, inputs: dict[str, Any], images: list[ImageTokens]) -> list[ImageTokens]:
        """Give every image the text of its sample (`PromptText`), for strategies conditioned on the instruction."""
        ids, mask = inputs["input_ids"], _mask(inputs).bool()
        connector = self.connector
        span_ids = torch.tensor(connector.image_span_ids(), dtype=ids.dtype, device=ids.device)
        control_ids = torch.tensor(connector.control_token_ids(), dtype=ids.dtype, device=ids.device)
        opener = connector.answer_opener_ids()
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        embed = self.model.get_input_embeddings()
        prompts: dict[int, PromptText] = {}
        out = []
        for img in images:
            sample = img.record.sample
            if sample not in prompts:
                row = ids[sample][mask[sample]]
                prompts[sample] = PromptText(row, torch.isin(row, span_ids), torch.isin(row, control_ids),
                                             None if opener is None else tuple(opener), embed, tokenizer)
            out.append(dataclasses.replace(img, prompt=prompts[sample]))
        return out

    def _mark_frames(self, inputs: dict[str, Any], slots, images: list[ImageTokens],
                     frames: Sequence[int | None] | None) -> list[ImageTokens]:
        """The one place that says which token sets are video frames: the connector's native video frames
        (Qwen2-VL's temporal patches), then `frames` for the other images (a video fed one image per frame)."""
        marks = self.connector.frame_indices(inputs, slots)
        if frames is not None:
            free = [i for i, mark in enumerate(marks) if mark is None]  # images not already marked by the connector
            frames = list(frames)
            if len(frames) != len(free) or any(
                    f is not None and (isinstance(f, bool) or not isinstance(f, numbers.Integral) or f < 0)
                    for f in frames):
                raise ValueError(f"frames={frames!r}: expected one entry per image ({len(free)} here), each a frame "
                                 "index >= 0 (the image is that frame of a video) or None (a still image)")
            for i, frame in zip(free, frames):
                marks[i] = None if frame is None else int(frame)
        out = []
        for img, mark in zip(images, marks):
            img.record.frame = mark
            out.append(img if img.frame == mark else dataclasses.replace(img, frame=mark))
        return out

    def _llm_session(self, model_kwargs: dict[str, Any], images) -> LLMSession | None:
        """The session inside the LLM for this call (in-LLM removal, attention-stage masks / positions / score
        edits), or None when no such strategy runs (or no image). Position rules of attention strategies are applied
        here, to the layout and to the model kwargs (generate continues them in every decode step)."""
        inside = [s for s in self.strategies if s.stage in (Stage.IN_LLM, Stage.ATTENTION)]
        if not (inside or self._plan is not None) or not images:
            return None
        ids = model_kwargs["input_ids"]
        video_token = getattr(self.connector, "video_token_id", None)
        if video_token is not None and bool((ids == video_token).any()):
            raise NotApplicableError(
                f"{', '.join(s.name for s in inside)}: in-LLM removal does not handle {self.connector.name} video "
                "tokens yet (nor do attention-stage strategies); use a pre-LLM strategy (it reduces per frame) or feed the frames as images")
        layout = self._layout
        attention = [s for s in inside if s.stage is Stage.ATTENTION]
        for strategy in attention:
            moved = strategy.positions(layout)
            if moved is not layout:
                layout = moved
                model_kwargs["position_ids"] = self.connector.model_positions(layout)
        session = LLMSession(self.model, [s for s in inside if s.stage is Stage.IN_LLM], layout, images, attention)
        if self._plan is not None:
            session.router.on_call(self._plan.follow_main)  # decode steps: branch rows take their main row's token
        return session

    def _run_llm(self, fn, *args, **kwargs):
        """Call the model (forward or generate) inside the in-LLM session when there is one; update the stats."""
        session = self._session
        if session is None:
            return fn(*args, **kwargs)
        with session:
            out = fn(*args, **kwargs)
        self._count(self._inputs, self._slots, self._images, session.layer_lengths)
        main = self._main_rows(self._inputs)
        self.stats.per_sample_equivalent_tokens = session.per_sample_equivalent_tokens()[:main]
        self.stats.equivalent_tokens = sum(self.stats.per_sample_equivalent_tokens)
        return out

    def _count(self, inputs, slots, images, layer_lengths: list[list[int]] | None = None) -> None:
        """Token and FLOP stats; `layer_lengths[b][l]`: real tokens entering LLM layer l of row b (in-LLM removal).
        Token counts are those of the caller's rows; FLOPs include the contrast branch rows (the cost paid: row b's
        per-sample FLOPs add its branch rows'), the vanilla FLOPs are those of the caller's rows alone."""
        self._inputs = inputs
        stats = self.stats
        rows = int(inputs["input_ids"].shape[0])
        main = self._main_rows(inputs)
        mask = _mask(inputs)
        # the LLM side from the token layout of what reaches the LLM (real and visual tokens per row)
        real, visual = self._layout.counts() if images else (mask.sum(1).tolist(), [0] * rows)
        stats.visual_tokens_in = sum(s.length for s in slots if s.sample < main)
        stats.visual_tokens_kept = sum(visual[:main])
        stats.text_tokens = int(mask[:main].sum()) - stats.visual_tokens_in
        vanilla, reduced = FlopsBreakdown(0, 0, 0), FlopsBreakdown(0, 0, 0)
        stats.per_sample_flops = [0] * main
        for row in range(rows):
            mine = [(s, img) for s, img in zip(slots, images) if s.sample == row]
            text, kept = int(real[row]) - int(visual[row]), int(visual[row])
            encoder = [self.connector.encoder_tokens(s) for s, _ in mine]
            full = sum(s.length for s, _ in mine)
            projected = sum(img.record.projected_tokens for _, img in mine)
            if row < main:
                vanilla += prefill_flops(self.config, image_tokens=encoder, projected_tokens=full,
                                         tokens_per_layer=text + full)
            layer_tokens = [self.connector.encoder_layer_tokens(s, img.record) for s, img in mine]
            row_flops = prefill_flops(self.config, image_tokens=encoder, projected_tokens=projected,
                                      tokens_per_layer=text + kept if layer_lengths is None else layer_lengths[row],
                                      vision_layer_tokens=None if None in layer_tokens else layer_tokens)
            for strategy in self.strategies:  # a strategy that changes the LLM's computation counts its own
                llm_side = strategy.llm_flops(self.config, text, kept) if mine else None
                if llm_side is not None:
                    row_flops = FlopsBreakdown(row_flops.vision, row_flops.projector + llm_side.projector,
                                               llm_side.llm)
            stats.per_sample_flops[row % main] += row_flops.total
            reduced += row_flops
        stats.flops, stats.flops_vanilla = reduced.to_dict(), vanilla.to_dict()
        stats.equivalent_tokens = float(stats.visual_tokens_kept)
        stats.per_sample_equivalent_tokens = [float(v) for v in visual[:main]]

    @property
    def config(self):
        return self.model.config

    def __call__(self, **inputs):
        """One forward (prefill) of the reduced batch; returns the model's output (logits over the reduced sequence)."""
        frames = inputs.pop("frames", None)
        start = Clock(self.model.device).now()
        model_kwargs = self.prepare(frames, **{k: v for k, v in inputs.items() if k in INPUT_KEYS})
        extra = {k: v for k, v in inputs.items() if k not in INPUT_KEYS}
        self._prefills = 0
        with torch.no_grad():
            out = self._run_llm(self.model, **model_kwargs, **extra)
        plan = self._plan
        if plan is not None:  # the caller's rows; their last position carries the combined scores
            logits = out.logits[: plan.rows].clone()
            logits[:, -1] = plan.combined(out.logits[:, -1].float())[: plan.rows].to(logits.dtype)
            out.logits = logits
        self._finish_times(start, self._clock.now())  # prefill: logits over all positions
        return out

    forward = __call__

    def train_forward(self, **inputs):
        """One forward WITH gradients under the strategies' masks and positions: how vlmeff trains a model with an
        attention-stage strategy active (`vlmeff reference train --attention`). The image features are computed by
        the model's own forward from `pixel_values` (so the projector and adapters get gradients), not by `prepare`;
        hence only attention-stage strategies qualify (a strategy with its own layer, SAISA, trains that layer's
        modules on the prepared features). Other kwargs (labels, logits_to_keep) go to the model. Equals
        `vm(**inputs)` in eval mode (tested)."""
        if not all(s.stage is Stage.ATTENTION for s in self.strategies):
            raise NotApplicableError(
                f"train_forward trains with attention-stage strategies only; {self.spec} removes or replaces tokens "
                "before or inside the LLM (its features come from prepare, without gradients)")
        # an attention strategy that installs its own computation (the SAISA layer) drops the stock projector's
        # output and trains its own modules: the prepared features serve as they are
        own = any(type(s).install is not AttentionStrategy.install for s in self.strategies)
        model_inputs = {k: v for k, v in inputs.items() if k in INPUT_KEYS}
        extra = {k: v for k, v in inputs.items() if k not in INPUT_KEYS}
        model_kwargs = self.prepare(**model_inputs)
        if not own:
            model_kwargs.pop("mm_encoder_outputs", None)  # recomputed with gradients by the model from its inputs
            model_kwargs.update({k: v for k, v in model_inputs.items() if k not in model_kwargs})
        self._prefills = 0
        return self._run_llm(self.model, **model_kwargs, **extra)

    def generate(self, **kwargs):
        """Like `model.generate(**processor_outputs, **generation_kwargs)`, with the strategies applied."""
        inputs = {k: kwargs.pop(k) for k in INPUT_KEYS if k in kwargs}
        frames = kwargs.pop("frames", None)
        start = Clock(self.model.device).now()
        model_kwargs = self.prepare(frames, **inputs)
        plan = self._plan
        if plan is not None:
            self._branch_generate_kwargs(plan, kwargs)
        self._prefills = 0
        out = self._run_llm(self.model.generate, **model_kwargs, **kwargs)
        self._finish_times(start, self._clock.now())
        stats = self.stats
        sequences = out.sequences if hasattr(out, "sequences") else out
        rows = inputs["input_ids"].shape[0]
        new = sequences[:rows, model_kwargs["input_ids"].shape[1]:]  # the caller's rows (branch rows follow them)
        stats.new_tokens = int(new.shape[1])
        full = torch.cat([inputs["input_ids"], new], dim=1)
        if hasattr(out, "sequences"):
            out.sequences = full
            for name in ("scores", "logits"):
                if plan is not None and getattr(out, name, None) is not None:
                    setattr(out, name, tuple(x[:rows] for x in getattr(out, name)))
            return out
        return full

    def _branch_generate_kwargs(self, plan: BranchPlan, kwargs: dict[str, Any]) -> None:
        """generate kwargs for a call with contrast branches: the combination first among the caller's logits
        processors (so before temperature / top-k / top-p), branch rows finished from the first step."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        config = kwargs.get("generation_config") or self.model.generation_config
        for name in ("num_beams", "num_return_sequences"):
            value = kwargs.get(name, getattr(config, name, 1)) or 1
            if value > 1:
                raise StrategyError(f"{plan.strategy.name}: {name}={value} is not supported with contrast branches "
                                    "(the branch rows would have to follow every beam / sequence); use greedy or "
                                    "sampling with one sequence per prompt")
        kwargs["logits_processor"] = LogitsProcessorList([ContrastLogits(plan), *(kwargs.get("logits_processor") or [])])
        kwargs["stopping_criteria"] = StoppingCriteriaList([BranchRowsDone(plan.rows),
                                                            *(kwargs.get("stopping_criteria") or [])])

    def chat(self, image, text: str, max_new_tokens: int = 64, **generate_kwargs) -> str:
        """Ask one question about one image (path, PIL image or array); returns the decoded answer."""
        from vlmeff.images import load_image

        if self.processor is None:
            raise ValueError("chat() needs the processor: vlmeff.wrap(model, processor, spec)")
        content = [{"type": "text", "text": text}]
        images = None
        if image is not None:
            images = load_image(image)
            content.insert(0, {"type": "image"})
        prompt = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = self.processor(images=images, text=prompt, return_tensors="pt")
        return self._answer(inputs, max_new_tokens, **generate_kwargs)

    def _answer(self, inputs, max_new_tokens: int, **generate_kwargs) -> str:
        """Greedy by default: generate for one prompt's processor outputs and decode only the new tokens."""
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        generate_kwargs.setdefault("do_sample", False)
        out = self.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
        new = out[0, inputs["input_ids"].shape[1]:]
        return self.processor.decode(new, skip_special_tokens=True).strip()

    def chat_video(self, video, text: str, num_frames: int | None = 8, sampling: str = "uniform",
                   max_new_tokens: int = 64, *, fps: float | None = None, start: float | None = None,
                   end: float | None = None, backend: str = "auto", **generate_kwargs) -> str:
        """Ask one question about one video; returns the decoded answer.

        video: a file path (frames sampled by `vlmeff.video.load_video(path, num_frames, sampling, fps, start, end,
        backend)`) or its frames (a list of paths / PIL images / arrays, used as given). A model with its own video
        path (Qwen2-VL: `connector.video_inputs`) gets the frames as one video ({"type": "video"} in the chat
        template), reduced per temporal patch; any other (LLaVA) gets one {"type": "image"} per frame in one prompt,
        marked as frames 0..n-1 (`frames=`), so every pre-LLM strategy reduces per frame (AIM: video defaults).
        """
        from vlmeff.images import load_image
        from vlmeff.video import load_video

        if self.processor is None:
            raise ValueError("chat_video() needs the processor: vlmeff.wrap(model, processor, spec)")
        if isinstance(video, (str, os.PathLike)):
            frames = load_video(video, num_frames, sampling, fps=fps, start=start, end=end, backend=backend)
        else:
            frames = [load_image(f) for f in video]
            if not frames:
                raise ValueError("video=[]: give a video file or at least one frame")
        native = getattr(self.connector, "video_inputs", None)
        entries = [{"type": "video"}] if native is not None else [{"type": "image"} for _ in frames]
        messages = [{"role": "user", "content": [*entries, {"type": "text", "text": text}]}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        if native is not None:
            inputs, marks = native(frames, prompt), None  # the connector marks its temporal patches as frames
        else:
            inputs, marks = self.processor(images=frames, text=prompt, return_tensors="pt"), list(range(len(frames)))
        return self._answer(inputs, max_new_tokens, frames=marks, **generate_kwargs)


def _mask(inputs: dict[str, Any]) -> torch.Tensor:
    mask = inputs.get("attention_mask")
    return torch.ones_like(inputs["input_ids"]) if mask is None else mask


def _connector_with(cls, model, processor, options: dict[str, str]) -> Connector:
    import inspect

    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model", "processor")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise StrategyError(f"connector {cls.name!r} has no option {', '.join(unknown)}; options: "
                            f"{', '.join(accepted) or 'none'}")
    try:
        return cls(model, processor, **options)
    except ValueError as e:  # the connector's own check of an option's value
        raise StrategyError(f"connector {cls.name!r}: {e}") from None


def wrap(model, processor=None, spec=None, *, connector: str | None = None) -> VLMWrapper:
    """Wrap a transformers VLM with a strategy spec ("fastervlm:keep=64", a YAML path, a preset, or Strategy objects).
    connector: a connector name, optionally with options ("llava-next:budget=per_image", or ":budget=per_image" to
    keep the automatic choice)."""
    return VLMWrapper(model, processor, spec, connector=connector)
