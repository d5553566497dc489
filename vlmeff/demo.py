"""`vlmeff demo`: a Gradio page to ask questions about an image with vanilla and a strategy side by side.

The model loads once. Every question runs twice through `vlmeff.wrap`, once without a strategy and once with the
spec in the page (free text, or picked from the presets and strategy names), and the page shows both answers, the
visual tokens that reached the LLM, prefill FLOPs and times, and an overlay of the kept cells on the image
(`vlmeff.viz.overlay`; a layer slider shows what in-LLM methods leave at a decoder layer). Each question is answered
on its own (one user turn with the image), as the wrapper's `chat` does.

The model-facing part is `DemoEngine` (no Gradio, tested directly); `build_app` puts a page on it; `main` loads the
model from `vlmeff demo` arguments and serves the page (127.0.0.1 unless --host says otherwise; requests are queued
and run one at a time, since the strategies' hooks live on the one shared model). Bad uploads and bad specs show a
message in the page; the app keeps serving.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmeff.images import ImageError, load_image
from vlmeff.registry import STRATEGIES, UnknownNameError
from vlmeff.strategy import Budget, SelectionRecord, StrategyError
from vlmeff.wrapper import RunStats, find_connector

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # uploads above this are refused before decoding
MAX_UPLOAD_PIXELS = 40_000_000  # decoded size limit (checked from the header, before decoding the pixels)
DEFAULT_MAX_NEW_TOKENS = 48
SCENE_COUNT = 6  # bundled synthetic scenes (evaluation seeds of the reference world)
OVERLAY_MIN_SIDE = 448  # overlays of small images are drawn larger, so outlines stay thin and sharp


@dataclass
class SideResult:
    """One side of a comparison: the answer of a wrapper call, its stats and selection records."""

    spec: str
    answer: str
    stats: RunStats
    records: list[SelectionRecord] = field(default_factory=list)


def default_strategy(connector) -> str:
    """A quarter of the visual tokens by FasterVLM: [CLS] attention where the tower has a [CLS], else vlmeff's
    global-query substitute."""
    return "fastervlm:ratio=0.25" if connector.has_cls else "fastervlm:ratio=0.25,scorer=global_query"


def strategy_choices() -> list[tuple[str, str]]:
    """(label, spec) pairs for the strategy picker: bundled presets, then every registered strategy (with a quarter of
    the tokens as its budget where it takes one; the other parameters at their defaults)."""
    from vlmeff.spec import preset_names

    choices = [(f"preset: {name}", name) for name in preset_names()]
    for name, cls in sorted(STRATEGIES.items().items()):
        spec = f"{name}:ratio=0.25" if issubclass(cls, Budget) else name
        choices.append((f"{name} ({cls.stage.value})", spec))
    return [("vanilla (no strategy)", "vanilla"), *choices]


def scene_choices(count: int = SCENE_COUNT) -> list[tuple[str, str]]:
    """(label, seed) pairs of the bundled synthetic scenes, labelled with the objects they show."""
    from vlmeff.reference.world import eval_seeds, layout_scene

    return [(f"scene {i + 1}: {', '.join(layout_scene(seed).present)}", str(seed))
            for i, seed in enumerate(eval_seeds(count))]


class DemoEngine:
    """Loads uploads, answers with vanilla and a strategy, draws overlays; one model call at a time (the lock)."""

    def __init__(self, model, processor, *, max_upload_bytes: int = MAX_UPLOAD_BYTES,
                 max_upload_pixels: int = MAX_UPLOAD_PIXELS):
        self.model = model
        self.processor = processor
        self.connector = find_connector(model, processor)  # cell boxes for the overlay
        self.max_upload_bytes = max_upload_bytes
        self.max_upload_pixels = max_upload_pixels
        self._lock = threading.Lock()

    @property
    def num_layers(self) -> int:
        return int(self.model.config.text_config.num_hidden_layers)

    def open_upload(self, path: str | os.PathLike | None) -> Image.Image:
        """The uploaded file as an RGB image, or ImageError saying why not (missing, too large, not an image)."""
        if path is None:
            raise ImageError("no file was uploaded")
        path = Path(path)
        if not path.is_file():
            raise ImageError(f"the upload {path.name!r} is not a file on the server (was it removed?)")
        size = path.stat().st_size
        if size > self.max_upload_bytes:
            raise ImageError(f"{path.name!r} is {size / 2**20:.1f} MiB; this demo accepts files up to "
                             f"{self.max_upload_bytes / 2**20:.0f} MiB")
        try:
            with Image.open(path) as header:  # reads the header only: refuse huge images before decoding them
                width, height = header.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            reason = str(e).replace(str(path), path.name)  # the server's upload folder is none of the user's business
            raise ImageError(f"{path.name!r} is not an image this demo can read (PNG, JPEG, WebP, GIF, BMP, "
                             f"TIFF, ...): {type(e).__name__}: {reason}") from None
        if width * height > self.max_upload_pixels:
            raise ImageError(f"{path.name!r} is {width}x{height} pixels ({width * height / 1e6:.1f} MP); this demo "
                             f"accepts up to {self.max_upload_pixels / 1e6:g} MP")
        return load_image(path)

    def warm_up(self) -> None:
        """One short vanilla call, so that the first question's timings hold no one-off start-up costs."""
        import vlmeff
        from vlmeff.reference.world import eval_seeds

        with self._lock:
            vm = vlmeff.wrap(self.model, self.processor, None)
            try:
                vm.chat(self.scene(eval_seeds(1)[0]), "Hello.", max_new_tokens=2)
            finally:
                vm.unwrap()

    @staticmethod
    def scene(seed: int | str) -> Image.Image:
        from vlmeff.reference.world import render_scene

        try:
            return render_scene(int(seed)).image
        except ValueError as e:
            raise ImageError(f"scene seed {seed!r}: {e}") from None

    def answer(self, image: Image.Image, question: str, spec: str,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> tuple[SideResult, SideResult]:
        """(vanilla, strategy) answers to `question` about `image`. The spec is checked first, so a bad one costs no
        model call (StrategyError / UnknownNameError name the problem)."""
        import vlmeff

        if not question or not question.strip():
            raise ValueError("the question is empty: type a question about the image")
        if (spec or "").strip().lower().endswith((".yaml", ".yml")):  # the page must not read the server's files
            raise StrategyError(f"spec {spec.strip()!r}: the demo takes spec strings and preset names, not YAML files")
        max_new_tokens = int(max_new_tokens)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: expected at least 1")
        with self._lock:
            reduced = vlmeff.wrap(self.model, self.processor, spec or "vanilla")
            vanilla = vlmeff.wrap(self.model, self.processor, None)
            try:
                results = []
                for vm in (vanilla, reduced):
                    torch.manual_seed(0)  # decoding strategies with noise (VCD) give the same answer every time
                    text = vm.chat(image, question.strip(), max_new_tokens=max_new_tokens)
                    results.append(SideResult(vm.spec, text, vm.stats, list(vm.last_record)))
            finally:
                vanilla.unwrap()
                reduced.unwrap()
        return results[0], results[1]

    def overlay(self, image: Image.Image, records: list[SelectionRecord], layer: int | None = None) -> Image.Image:
        from vlmeff.viz import overlay

        scale = max(1.0, OVERLAY_MIN_SIDE / min(image.size))
        return overlay(image, records, layer, connector=self.connector, scale=scale)


def _visible(record: SelectionRecord, layer: int | None) -> int:
    from vlmeff.viz import cell_states

    return int(cell_states(record, layer)[0].sum())


def overlay_caption(spec: str, record: SelectionRecord, layer: int | None) -> str:
    """One line under the overlay: what it shows and how many cells are present at the layer."""
    from vlmeff.viz import llm_layers

    t, h, w = record.grid
    where = "at the LLM input" if not layer else f"at LLM layer {layer}"
    removal = llm_layers(record)
    steps = (" In-LLM removal from layer " + ", ".join(
        f"{k} ({record.llm_kept[k].numel()} tokens left)" for k in removal) + ".") if removal else ""
    return (f"**{spec}** {where}: {_visible(record, layer)} of {h * w} cells reach the LLM ({record.num_kept} tokens "
            f"enter it).{steps} Faded: pruned; outlined: merged groups; darkened: cut off by the processor.")


def stats_table(vanilla: SideResult, reduced: SideResult) -> str:
    """Markdown table comparing the two sides."""
    def gflops(stats: RunStats) -> float:
        return stats.flops.get("total", 0) / 1e9

    def times(stats: RunStats) -> str:
        return (f"{stats.prefill_s * 1e3:.0f} ({stats.encode_s * 1e3:.0f} + {stats.strategy_s * 1e3:.0f} + "
                f"{stats.llm_prefill_s * 1e3:.0f})")

    v, r = vanilla.stats, reduced.stats
    share = f" ({gflops(r) / gflops(v):.0%})" if gflops(v) else ""
    rows = [
        ("visual tokens into the LLM", f"{v.visual_tokens_kept} of {v.visual_tokens_in}",
         f"{r.visual_tokens_kept} of {r.visual_tokens_in}"),
        ("visual tokens, layer average", f"{v.equivalent_tokens:.1f}", f"{r.equivalent_tokens:.1f}"),
        ("prefill GFLOPs", f"{gflops(v):.2f}", f"{gflops(r):.2f}{share}"),
        ("prefill ms (encode + strategy + LLM)", times(v), times(r)),
        ("new tokens, total ms", f"{v.new_tokens}, {v.total_s * 1e3:.0f}", f"{r.new_tokens}, {r.total_s * 1e3:.0f}"),
    ]
    lines = [f"| | vanilla | `{reduced.spec}` |", "|---|---|---|"]
    lines += [f"| {name} | {a} | {b} |" for name, a, b in rows]
    return "\n".join(lines) + "\n\nTimes are single runs on this machine (the first call also warms up)."


def _shown(answer: str) -> str:
    return answer if answer else "(empty answer: the model ended at once)"


def build_app(model, processor, *, strategy: str | None = None, model_name: str = "model",
              max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, engine: DemoEngine | None = None):
    """The Gradio Blocks of the demo for a loaded model (tests pass a tiny one). Launch it with `launch`."""
    import gradio as gr

    engine = engine or DemoEngine(model, processor)
    strategy = strategy or default_strategy(engine.connector)
    picks = strategy_choices()
    scenes = scene_choices()

    def fresh_image(image: Image.Image, note: str):  # a new image starts new conversations
        return image, image, note, [], [], "", None, "", None

    def failed(message: str):  # the previous image (if any) stays in use
        gr.Warning(message)
        return (gr.skip(), gr.skip(), f"**{message}** The previous image, if any, is still in use.",
                *[gr.skip()] * 6)

    def on_upload(path):
        try:
            image = engine.open_upload(path)
        except ImageError as e:
            return failed(f"Could not use the upload: {e}")
        return fresh_image(image, f"Loaded {Path(path).name} ({image.width}x{image.height}).")

    def on_scene(seed):
        if not seed:
            return gr.skip()
        try:
            image = engine.scene(seed)
        except ImageError as e:
            return failed(str(e))
        return fresh_image(image, f"Synthetic scene {seed} ({image.width}x{image.height}).")

    def on_pick(spec):
        return gr.skip() if spec is None else spec

    def on_ask(image, question, spec, new_tokens, layer, vanilla_chat, strategy_chat):
        keep = (vanilla_chat, strategy_chat, gr.skip(), gr.skip(), gr.skip(), gr.skip())
        if image is None:
            gr.Warning("Upload an image or pick a scene first.")
            return (*keep, "**Upload an image or pick a scene first.**")
        try:
            vanilla, reduced = engine.answer(image, question, spec, new_tokens)
        except (StrategyError, UnknownNameError) as e:
            gr.Warning(f"Strategy spec rejected: {e}")
            return (*keep, f"**Strategy spec rejected:** {e}")
        except (ImageError, ValueError) as e:
            gr.Warning(str(e))
            return (*keep, f"**{e}**")
        except Exception as e:  # the page stays up; the traceback goes to the server log
            log.exception("demo request failed")
            gr.Warning(f"{type(e).__name__}: {e}")
            return (*keep, f"**The model call failed:** {type(e).__name__}: {e}")
        turn = {"role": "user", "content": question.strip()}
        vanilla_chat = [*(vanilla_chat or []), turn, {"role": "assistant", "content": _shown(vanilla.answer)}]
        strategy_chat = [*(strategy_chat or []), turn, {"role": "assistant", "content": _shown(reduced.answer)}]
        run = {"image": image, "records": reduced.records, "spec": reduced.spec}
        picture, caption = draw(run, layer)
        return (vanilla_chat, strategy_chat, stats_table(vanilla, reduced), picture, caption, run,
                f"Answered with `{reduced.spec}` and vanilla.")

    def draw(run, layer):
        if not run or not run["records"]:
            return None, "No visual tokens in the last answer."
        layer = int(layer) if layer else None
        return (engine.overlay(run["image"], run["records"], layer),
                overlay_caption(run["spec"], run["records"][0], layer))

    def on_layer(layer, run):
        if not run:
            return gr.skip(), gr.skip()
        return draw(run, layer)

    with gr.Blocks(title="vlmeff demo", analytics_enabled=False) as app:
        gr.Markdown(f"## vlmeff: vanilla vs a visual-token strategy\nModel: `{model_name}`. Upload an image or pick "
                    "a synthetic scene, choose a strategy, ask. Each question is answered on its own, greedily.")
        image_state = gr.State(None)
        run_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=2):
                upload = gr.UploadButton("Upload an image", file_count="single", type="filepath",
                                         elem_id="upload")
                scene = gr.Dropdown(choices=scenes, value=None, label="...or a bundled synthetic scene",
                                    elem_id="scene")
                preview = gr.Image(label="Image", type="pil", interactive=False, height=220, elem_id="preview")
                question = gr.Textbox(label="Question", value="List the objects in the image.", elem_id="question")
                with gr.Row():
                    spec = gr.Textbox(label="Strategy spec", value=strategy, elem_id="spec", scale=3)
                    pick = gr.Dropdown(choices=picks, value=None, label="presets and strategies", elem_id="pick",
                                       scale=2)
                with gr.Row():
                    new_tokens = gr.Slider(1, 256, value=max_new_tokens, step=1, label="max new tokens",
                                           elem_id="max-new-tokens")
                    layer = gr.Slider(0, engine.num_layers - 1, value=0, step=1, elem_id="layer",
                                      label="overlay at LLM layer (0: LLM input; in-LLM methods drop tokens later)")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                status = gr.Markdown("", elem_id="status")
            with gr.Column(scale=3):
                with gr.Row():
                    vanilla_chat = gr.Chatbot(label="vanilla", height=220, elem_id="vanilla-chat")
                    strategy_chat = gr.Chatbot(label="with the strategy", height=220, elem_id="strategy-chat")
                stats = gr.Markdown("", elem_id="stats")
                overlay = gr.Image(label="kept visual tokens", type="pil", interactive=False, height=360,
                                   elem_id="overlay")
                caption = gr.Markdown("", elem_id="overlay-caption")

        loaded = [image_state, preview, status, vanilla_chat, strategy_chat, stats, overlay, caption, run_state]
        upload.upload(on_upload, inputs=upload, outputs=loaded)
        scene.input(on_scene, inputs=scene, outputs=loaded)
        pick.input(on_pick, inputs=pick, outputs=spec)
        asked = [vanilla_chat, strategy_chat, stats, overlay, caption, run_state, status]
        inputs = [image_state, question, spec, new_tokens, layer, vanilla_chat, strategy_chat]
        ask.click(on_ask, inputs=inputs, outputs=asked, concurrency_limit=1)
        question.submit(on_ask, inputs=inputs, outputs=asked, concurrency_limit=1)
        layer.change(on_layer, inputs=[layer, run_state], outputs=[overlay, caption], trigger_mode="always_last")
    app.queue(default_concurrency_limit=1, max_size=32)
    return app


def launch(app, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False, block: bool = True,
           max_file_size: int = MAX_UPLOAD_BYTES) -> str:
    """Serve the app; returns its local URL (with block=False the server runs in a thread: `app.close()` ends it)."""
    _, url, _ = app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                           max_file_size=max_file_size, ssr_mode=False, quiet=not block, show_error=True)
    return url


def load_model(name: str | None, dtype: str = "auto", device: str | None = None) -> tuple[Any, Any, str]:
    """(model, processor, display name) through `vlmeff.load`: the bundled reference model for None / "reference"
    (float32 under dtype auto), else a folder or hub id."""
    import vlmeff
    from vlmeff.loading import REFERENCE

    model, processor = vlmeff.load(name or REFERENCE, dtype=dtype, device=device)
    if name in (None, REFERENCE):
        return model, processor, "reference (DINOv2-S/14 + SmolLM2-135M, synthetic world)"
    return model, processor, name


def main(args) -> int:
    """`vlmeff demo`: args has model, strategy, host, port, share, dtype, device, max_new_tokens."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ImportError("vlmeff demo needs gradio: pip install 'vlmeff[demo]'") from None
    model, processor, name = load_model(args.model, args.dtype, args.device)
    engine = DemoEngine(model, processor)
    engine.warm_up()
    app = build_app(model, processor, strategy=args.strategy, model_name=name, engine=engine,
                    max_new_tokens=getattr(args, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
    launch(app, host=args.host, port=args.port, share=args.share, block=True)
    return 0
