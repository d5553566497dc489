"""Load a model and its processor from a local folder or a hub id (real checkpoints use the same code)."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


REFERENCE = "reference"


def resolve_device(device: str | None) -> str | None:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; None stays None (where from_pretrained puts the model);
    anything else is checked by torch and returned as given."""
    if device is None:
        return None
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: no CUDA device is visible to torch {torch.__version__} "
                         f"(CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
    return device


def is_reference(name: str | None) -> bool:
    """"reference", one of its shipped fine-tuned variants, "reference-<variant>" (e.g. reference-cca), or a training
    run's weights, "reference:<file>" (e.g. reference:runs/attn-cca/reference.safetensors)."""
    return name is not None and (name == REFERENCE or name.startswith((REFERENCE + "-", REFERENCE + ":")))


def reference_weights(name: str):
    """The trained-weights file of a reference name: None for "reference" (the shipped weights), the file of
    "reference:<file>", else assets/reference/attention/<variant>.safetensors, the fine-tunes of `vlmeff reference train --attention`
    (docs/reference-model.md); an unknown variant is refused naming the shipped ones."""
    from vlmeff.reference.model import asset_dir

    if name == REFERENCE:
        return None
    if name.startswith(REFERENCE + ":"):  # a run's weights, evaluated without exporting them over the shipped ones
        path = Path(name[len(REFERENCE) + 1:])
        if not path.is_file():
            raise FileNotFoundError(f"{name!r}: no trained weights file at {path} (a run folder's reference.safetensors)")
        return path
    variant = name[len(REFERENCE) + 1:]
    folder = asset_dir() / "attention"
    path = folder / f"{variant}.safetensors"
    if not path.is_file():
        shipped = sorted(f"{REFERENCE}-{p.stem}" for p in folder.glob("*.safetensors")) if folder.is_dir() else []
        raise FileNotFoundError(f"no reference variant {name!r}: vlmeff ships {', '.join([REFERENCE, *shipped])}")
    return path


def load(name_or_path: str, *, dtype: str = "auto", device: str | None = None, attn_implementation: str = "sdpa"):
    """Return (model, processor) for a LLaVA, LLaVA-NeXT or Qwen2-VL checkpoint (folder or hub id), or for
    `"reference"`: the bundled reference model (its pretrained parts are fetched and converted on first use), or
    `"reference-<variant>"`: the same model with the weights of an attention fine-tune, or `"reference:<file>"`: with
    a training run's weights file (`reference_weights`).

    dtype "auto" is the checkpoint's own dtype (float32 for the reference model). device: "auto" (GPU when visible),
    "cpu", "cuda", "cuda:N", or None (where from_pretrained puts it). The processor falls back to vlmeff's image-only
    Qwen2-VL processor when AutoProcessor cannot build the full one (its video processor needs torchvision, which is
    CUDA-only on PyPI).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    device = resolve_device(device)
    if is_reference(name_or_path):
        from vlmeff.reference.model import load_reference

        model, processor = load_reference(reference_weights(name_or_path),
                                          dtype=torch.float32 if dtype == "auto" else DTYPES[dtype])
        return (model if device is None else model.to(device)), processor
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as e:
        raise FileNotFoundError(f"cannot load a model config from {name_or_path!r}: {e}") from None
    model = AutoModelForImageTextToText.from_pretrained(
        name_or_path, config=config, dtype=DTYPES[dtype], attn_implementation=attn_implementation
    ).eval()
    if device is not None:
        model = model.to(device)
    processor = load_processor(name_or_path, config)
    processor.tokenizer.padding_side = "left"  # decoder-only batched generation pads on the left
    return model, processor


def load_processor(name_or_path: str, config=None):
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.processing_utils import ProcessorMixin

    error = None
    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
        if isinstance(processor, ProcessorMixin):
            return processor
    except (ImportError, OSError, ValueError, TypeError) as e:  # e.g. video processor needs torchvision
        error = e
    if config is not None and config.model_type in ("qwen2_vl", "qwen2_5_vl"):
        from vlmeff.connectors.qwen2_vl import Qwen2VLImageOnlyProcessor

        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        template = getattr(tokenizer, "chat_template", None)
        jinja = Path(name_or_path) / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text()
        return Qwen2VLImageOnlyProcessor(
            image_processor=AutoImageProcessor.from_pretrained(name_or_path), tokenizer=tokenizer,
            chat_template=template,
        )
    raise ValueError(f"could not build a multimodal processor for {name_or_path!r}" + (f": {error}" if error else ""))
