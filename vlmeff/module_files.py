"""Trained strategy modules on disk: safetensors files with their shapes and provenance as JSON metadata.

One format for every strategy that ships or loads learned weights (atp-learned's threshold MLPs, SAISA's layer
projectors): tensors in float32 (float16 where a shipped file was checked lossless enough), metadata under the
strategy's own key, written atomically (a temporary file renamed into place, so an interrupted save never leaves a
torn file), loaded once per file and modification time. Never pickle.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmeff.strategy import StrategyError

_LOADED: dict[tuple[str, str, float], tuple[nn.Module, dict[str, Any]]] = {}


def save_module_file(path: str | Path, module: nn.Module, key: str, meta: dict[str, Any],
                     dtype: torch.dtype = torch.float32) -> Path:
    """Write `module`'s state dict (float32, or `dtype` for a shipped file) with `meta` as JSON under metadata `key`;
    atomic. Loading casts back to the module's float32 parameters."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(dtype).cpu().contiguous() for k, v in module.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={key: json.dumps(meta)})
    tmp.replace(path)
    return path


def load_module_file(path: str | Path, key: str, build: Callable[[dict[str, Any]], nn.Module], *, owner: str,
                     what: str, kind: str, missing_hint: str = "") -> tuple[nn.Module, dict[str, Any]]:
    """(module in eval mode, metadata) from a file written by `save_module_file`; `build(meta)` makes the empty
    module. A missing file raises `StrategyError` "<owner>: no <what> at <path><hint>", a foreign or corrupt one
    "<owner>: <path> is not <kind> (...)"."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise StrategyError(f"{owner}: no {what} at {path}{missing_hint}")
    cache_key = (key, str(path.resolve()), path.stat().st_mtime)
    if cache_key not in _LOADED:
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})[key])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            module = build(meta)
            module.load_state_dict(tensors)
        except Exception as e:  # safetensors raises its own error type for a corrupt header
            raise StrategyError(f"{owner}: {path} is not {kind} ({type(e).__name__}: {e})") from None
        _LOADED[cache_key] = (module.eval(), meta)
    return _LOADED[cache_key]
