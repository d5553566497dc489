"""Odd images (RGBA, grayscale, 1x1, huge, corrupt) and the `vlmeff` CLI on a tiny model saved to disk."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import vlmeff
from vlmeff.cli import main
from vlmeff.images import MAX_SIDE, MIN_SIDE, ImageError, load_image


def test_rgba_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    path = tmp_path / "a.png"
    rgba.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (40, 30)
    assert out.getpixel((5, 5)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "I;16", "LA"])
def test_any_mode_becomes_rgb(mode):
    assert load_image(Image.new(mode, (33, 31))).mode == "RGB"


def test_tiny_images_are_upscaled_and_huge_downscaled():
    assert load_image(Image.new("RGB", (1, 1), "red")).size == (MIN_SIDE, MIN_SIDE)
    assert load_image(Image.new("RGB", (3, 1))).size == (84, 28)
    assert max(load_image(Image.new("RGB", (MAX_SIDE * 2, 300))).size) == MAX_SIDE
    assert load_image(np.zeros((5, 7), dtype=np.uint8)).size == (MIN_SIDE * 7 // 5, MIN_SIDE)


def test_bad_images_have_clear_errors(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageError, match="broken.jpg' could not be decoded"):
        load_image(bad)
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="aspect ratio"):
        load_image(Image.new("RGB", (5000, 2)))
    with pytest.raises(ImageError, match="unsupported image type"):
        load_image(3)
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((0, 3, 3), dtype=np.uint8))


@pytest.mark.parametrize("kind", ["llava-clip", "qwen2-vl"])
@pytest.mark.parametrize("image", [
    Image.new("RGBA", (50, 40), (0, 255, 0, 128)), Image.new("L", (64, 64), 128), Image.new("RGB", (1, 1)),
    Image.new("RGB", (6000, 4500), "blue"),
], ids=["rgba", "gray", "1x1", "huge"])
def test_odd_images_run_through_chat(loaded, kind, image):
    model, processor = loaded(kind)
    spec = "fastervlm:keep=4" if kind.startswith("llava") else "fastervlm:keep=4,scorer=global_query"
    with vlmeff.wrap(model, processor, spec) as vm:
        answer = vm.chat(image, "What is this?", max_new_tokens=2)
    assert isinstance(answer, str) and vm.stats.visual_tokens_kept == 4


def test_cli_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "fastervlm" in out and "pre_llm" in out and "llava" in out and "qwen2-vl" in out
    assert "fastervlm-64" in out


def test_cli_run_prints_answer_and_stats(saved_models, tmp_path, capsys):
    img = tmp_path / "img.png"
    Image.new("RGB", (60, 50), "red").save(img)
    args = ["run", "--model", saved_models["llava-clip"], "--image", str(img), "--prompt", "What is it?",
            "--strategy", "fastervlm:keep=16", "--max-new-tokens", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "visual tokens: 64 -> 16" in out and "prefill FLOPs" in out and "time: prefill" in out
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stats"]["visual_tokens_kept"] == 16 and len(data["records"][0]["kept_indices"]) == 16


def test_cli_errors_are_clean(saved_models, tmp_path, capsys):
    base = ["run", "--model", saved_models["qwen2-vl"], "--prompt", "Hi"]
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 40)).save(img)
    assert main([*base, "--image", str(img), "--strategy", "fastervlm:keep=4"]) == 2
    assert "needs a [CLS] token" in capsys.readouterr().err
    assert main([*base, "--image", str(img), "--strategy", "nosuch"]) == 2
    assert "unknown strategy 'nosuch'" in capsys.readouterr().err
    assert main([*base, "--image", str(tmp_path / "none.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", "--model", str(tmp_path / "nomodel"), "--prompt", "x"]) == 2


def test_cli_run_saves_the_overlay(saved_models, tmp_path, capsys):
    from vlmeff import viz

    img = tmp_path / "img.png"
    Image.new("RGB", (60, 50), "red").save(img)
    out = tmp_path / "overlay.png"
    args = ["run", "--model", saved_models["llava-clip"], "--image", str(img), "--prompt", "What is it?",
            "--strategy", "fastervlm:keep=16", "--max-new-tokens", "2", "--json", "--overlay", str(out)]
    assert main(args) == 0
    record = json.loads(capsys.readouterr().out)["records"][0]
    drawn = Image.open(out)
    assert drawn.size[0] >= 448 and drawn.size[1] >= 448  # scaled up so that cells are visible
    model, processor = vlmeff.load(saved_models["llava-clip"], dtype="float32")
    with vlmeff.wrap(model, processor, "fastervlm:keep=16") as vm:
        vm.chat(load_image(img), "What is it?", max_new_tokens=2)
        assert vm.last_record[0].kept_indices.tolist() == record["kept_indices"]
        expected = viz.overlay(load_image(img), vm.last_record, None, connector=vm, scale=448 / 50)
    assert np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(expected.convert("RGB")))
    assert main(["run", "--model", saved_models["llava-clip"], "--prompt", "x", "--overlay", str(out)]) == 2
    assert "--overlay needs --image" in capsys.readouterr().err
