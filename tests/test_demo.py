"""`vlmeff demo`: the engine behind the page, and the page itself in a real headless Chromium (Playwright).

The browser test runs on the tiny LLaVA (answers are noise, the mechanics are real). With VLMEFF_DEMO_SCREENSHOT set
to a .png path, `test_reference_screenshot` serves the reference model and saves the README screenshot there.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vlmeff
from vlmeff.images import ImageError
from vlmeff.registry import UnknownNameError
from vlmeff.strategy import StrategyError

pytest.importorskip("gradio", reason="the demo needs gradio: pip install 'vlmeff[demo]'")

from vlmeff import demo  # noqa: E402  (after the gradio check)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000


def chromium_path() -> str | None:
    for candidate in (os.environ.get("VLMEFF_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def noise_png(path: Path, size=(120, 80), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def tiny(loaded):
    return loaded("llava-clip")


# --- the engine, without a browser ---------------------------------------------------------------------------------
def test_bad_uploads_raise_image_errors_that_say_why(tiny, tmp_path):
    engine = demo.DemoEngine(*tiny, max_upload_bytes=50_000, max_upload_pixels=100_000)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 10)
    with pytest.raises(ImageError, match="'corrupt.png' is not an image") as info:
        engine.open_upload(corrupt)
    assert str(tmp_path) not in str(info.value)  # the server's upload folder is not shown to the user
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ImageError, match="'notes.txt' is not an image"):
        engine.open_upload(text)
    huge = tmp_path / "huge.png"
    Image.new("RGB", (400, 300), "white").save(huge)  # 120000 pixels, a tiny file
    with pytest.raises(ImageError, match="400x300 pixels .* accepts up to 0.1 MP"):
        engine.open_upload(huge)
    heavy = noise_png(tmp_path / "heavy.png", size=(200, 150))  # ~90 KB of noise
    with pytest.raises(ImageError, match="'heavy.png' is .* MiB; this demo accepts files up to"):
        engine.open_upload(heavy)
    with pytest.raises(ImageError, match="no file"):
        engine.open_upload(None)
    assert engine.open_upload(noise_png(tmp_path / "ok.png")).size == (120, 80)


def test_answer_checks_the_spec_before_any_model_call_and_leaves_the_model_unwrapped(tiny):
    model, processor = tiny
    engine = demo.DemoEngine(model, processor)
    image = engine.scene(demo.scene_choices(1)[0][1])
    lm = model.model.language_model
    hooks = (dict(lm._forward_pre_hooks), dict(lm._forward_hooks))
    calls = []
    handle = lm.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(UnknownNameError, match="nosuch"):
            engine.answer(image, "What is this?", "nosuch:keep=3")
        with pytest.raises(StrategyError, match="fastervlm"):
            engine.answer(image, "What is this?", "fastervlm:keep=0")
        with pytest.raises(StrategyError, match="not YAML files"):
            engine.answer(image, "What is this?", "/etc/some.yaml")
        with pytest.raises(ValueError, match="question is empty"):
            engine.answer(image, "  ", "vanilla")
        assert calls == []
        vanilla, reduced = engine.answer(image, "What is this?", "fastervlm:keep=16", max_new_tokens=2)
    finally:
        handle.remove()
    assert calls and (dict(lm._forward_pre_hooks), dict(lm._forward_hooks)) == hooks  # both wrappers removed theirs
    assert (vanilla.stats.visual_tokens_in, vanilla.stats.visual_tokens_kept) == (64, 64)
    assert (reduced.stats.visual_tokens_in, reduced.stats.visual_tokens_kept) == (64, 16)
    assert reduced.records[0].kept_indices.numel() == 16 and reduced.spec.startswith("fastervlm")
    assert "16 of 64" in demo.stats_table(vanilla, reduced)
    with vlmeff.wrap(model, processor, "fastervlm:keep=16") as vm:  # the same answer as the wrapper gives alone
        torch.manual_seed(0)
        assert vm.chat(image, "What is this?", max_new_tokens=2) == reduced.answer


def test_every_offered_strategy_parses():
    for label, spec in demo.strategy_choices():
        assert vlmeff.parse_spec(spec) is not None, label


# --- the page in a real browser -------------------------------------------------------------------------------------
def browser_or_skip():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright: pip install "
                                   "playwright (its own browser download is not needed)")
    executable = chromium_path()
    if executable is None:
        pytest.skip("the browser test needs Chromium (apt-get install -y chromium, or set VLMEFF_CHROMIUM)")
    return sync_api, executable


def upload(page, path: Path) -> None:
    with page.expect_file_chooser() as chooser:
        page.click("#upload")
    chooser.value.set_files(str(path))


def wait_text(page, selector: str, text: str) -> None:
    page.wait_for_function("([s, t]) => { const e = document.querySelector(s); return e && e.innerText.includes(t); }",
                           arg=[selector, text], timeout=TIMEOUT_MS)


def wait_count(page, selector: str, count: int) -> None:
    page.wait_for_function("([s, n]) => document.querySelectorAll(s).length >= n", arg=[selector, count],
                           timeout=TIMEOUT_MS)


def fill(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(value)


def test_browser_upload_ask_overlay_and_bad_upload(tiny, tmp_path):
    sync_api, executable = browser_or_skip()
    model, processor = tiny
    app = demo.build_app(model, processor, strategy="fastervlm:keep=16", max_new_tokens=3)
    url = demo.launch(app, port=free_port(), block=False)
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.wait_for_selector("#ask")

            upload(page, noise_png(tmp_path / "good.png"))
            wait_text(page, "#status", "Loaded good.png (120x80)")
            fill(page, "spec", "fastv:ratio=0.25,layer=1")
            page.click("#ask")
            wait_count(page, "#vanilla-chat [data-testid=bot]", 1)
            wait_count(page, "#strategy-chat [data-testid=bot]", 1)
            page.wait_for_selector("#overlay img")
            for chat in ("#vanilla-chat", "#strategy-chat"):
                assert page.locator(f"{chat} [data-testid=bot]").first.inner_text().strip()  # an answer, shown
            wait_text(page, "#stats", "visual tokens into the LLM")
            assert "fastv" in page.locator("#stats").inner_text()
            # the overlay shown is the engine's drawing: 80 px high, scaled to OVERLAY_MIN_SIDE
            natural = page.eval_on_selector("#overlay img", "img => [img.naturalWidth, img.naturalHeight]")
            assert natural == [round(120 * demo.OVERLAY_MIN_SIDE / 80), demo.OVERLAY_MIN_SIDE]
            wait_text(page, "#overlay-caption", "at the LLM input: 64 of 64 cells")
            fill(page, "layer", "1")  # the slider's number box: FastV removed 3/4 of the tokens after layer 0
            page.locator("#layer input[type=number]").press("Enter")
            wait_text(page, "#overlay-caption", "at LLM layer 1: 16 of 64 cells")
            page.screenshot(path=str(tmp_path / "answered.png"), full_page=True)

            corrupt = tmp_path / "corrupt.png"
            corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
            upload(page, corrupt)
            wait_text(page, "#status", "'corrupt.png' is not an image this demo can read")
            page.screenshot(path=str(tmp_path / "bad-upload.png"), full_page=True)

            fill(page, "spec", "nosuch:keep=3")
            page.click("#ask")
            wait_text(page, "#status", "Strategy spec rejected")
            assert "unknown strategy 'nosuch'" in page.locator("#status").inner_text()

            page.click("#pick input")  # picking from the list writes the spec into the text box
            page.get_by_role("option", name="preset: fastervlm-64", exact=True).click()
            page.wait_for_function("() => document.querySelector('#spec textarea, #spec input').value === "
                                   "'fastervlm-64'", timeout=TIMEOUT_MS)

            fill(page, "spec", "fastervlm:keep=16")  # still serving, with the last good image
            page.click("#ask")
            wait_count(page, "#vanilla-chat [data-testid=bot]", 2)
            wait_count(page, "#strategy-chat [data-testid=bot]", 2)
            wait_text(page, "#stats", "16 of 64")
            browser.close()
    finally:
        app.close()


@pytest.mark.skipif(not os.environ.get("VLMEFF_DEMO_SCREENSHOT"), reason="set VLMEFF_DEMO_SCREENSHOT=<file.png> to "
                    "make the README screenshot with the reference model")
def test_reference_screenshot():
    sync_api, executable = browser_or_skip()
    target = Path(os.environ["VLMEFF_DEMO_SCREENSHOT"])
    model, processor, name = demo.load_model("reference")
    engine = demo.DemoEngine(model, processor)
    engine.warm_up()
    app = demo.build_app(model, processor, model_name=name, engine=engine, strategy="fastervlm:keep=64")
    url = demo.launch(app, port=free_port(), block=False)
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(120_000)
            page.goto(url)
            page.click("#scene input")
            page.get_by_role("option").nth(1).click()
            wait_text(page, "#status", "Synthetic scene")
            page.click("#ask")
            wait_count(page, "#strategy-chat [data-testid=bot]", 1)
            wait_text(page, "#overlay-caption", "cells reach the LLM")
            page.wait_for_timeout(500)
            raw = target.with_suffix(".raw.png")
            page.screenshot(path=str(raw), full_page=True)
            browser.close()
    finally:
        app.close()
    shot = Image.open(raw).convert("RGB")
    shot.quantize(colors=96, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)  # a README-sized PNG
    raw.unlink()
    assert target.stat().st_size < 200_000
