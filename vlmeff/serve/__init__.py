"""vlmeff inside vLLM: a general plugin that registers vlmeff's model classes (docs/serving.md).

    from vllm import LLM
    from vlmeff.serve import vllm_kwargs
    llm = LLM(model="llava-hf/llava-1.5-7b-hf", **vllm_kwargs("fastervlm:keep=64"))

`register` is the `vllm.general_plugins` entry point (vLLM calls it in every process it starts); it registers
`VlmeffLlavaForConditionalGeneration`, `VlmeffQwen2VLForConditionalGeneration` and
`VlmeffQwen2_5_VLForConditionalGeneration` lazily (nothing heavy is imported until vLLM builds one), and enables
vLLM's multimodal M-RoPE recompute for them in the model runner. `vllm_kwargs(spec)` gives the `LLM(...)` arguments
that select them: `hf_overrides` swapping the architecture and storing the spec as the config's `vlmeff_strategy`.
A request may override the spec with `mm_processor_kwargs={"vlmeff_strategy": "..."}`.

Written against vLLM 0.32.0 (`VLLM_VERSION`); the model classes refuse another version at startup.
"""

from __future__ import annotations

from typing import Any

VLLM_VERSION = "0.32.0"

# original architecture -> vlmeff's class (same weights, same processor + the strategy)
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "VlmeffLlavaForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "VlmeffQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "VlmeffQwen2_5_VLForConditionalGeneration",
}
SPEC_KEY = "vlmeff_strategy"

_registered = False


def register() -> None:
    """The `vllm.general_plugins` entry point: register vlmeff's model classes with vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    for name in ARCHITECTURES.values():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"vlmeff.serve.models:{name}")
    _enable_mrope_recompute()
    _registered = True


def _enable_mrope_recompute() -> None:
    """vLLM 0.32's model runners enable the multimodal M-RoPE recompute (`recompute_mrope_positions`) only for a
    `video_pruning_rate`, and the CPU runner never (its `load_model` does not set the flag). Wrap
    `GPUModelRunner._gather_mm_embeddings` (inherited by the CPU runner) so that it is on for vlmeff's Qwen classes,
    whose image embeddings always carry their kept cells' M-RoPE ids."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._gather_mm_embeddings
    if getattr(original, "_vlmeff", False):
        return

    def _gather_mm_embeddings(self, *args, **kwargs):
        if not self.is_multimodal_pruning_enabled and getattr(self.get_model(), "vlmeff_positions_in_embeddings",
                                                               False):
            self.is_multimodal_pruning_enabled = True
        return original(self, *args, **kwargs)

    _gather_mm_embeddings._vlmeff = True
    GPUModelRunner._gather_mm_embeddings = _gather_mm_embeddings


class _Overrides:
    """`hf_overrides` callable: swap the architecture for vlmeff's class and store the spec (picklable, so it crosses
    vLLM's process boundary)."""

    def __init__(self, spec: str):
        self.spec = spec

    def __call__(self, config):
        architectures = list(getattr(config, "architectures", None) or [])
        if not any(architectures):  # vLLM also calls it on a bare config, to see whether it changes model_type
            return config
        swapped = [ARCHITECTURES.get(a, a) for a in architectures]
        if not any(a in ARCHITECTURES.values() for a in swapped):
            raise ValueError(f"vlmeff's vLLM plugin serves {', '.join(ARCHITECTURES)}; this model is "
                             f"{', '.join(architectures) or 'of unknown architecture'}")
        config.architectures = swapped
        setattr(config, SPEC_KEY, self.spec)
        return config

    def __repr__(self) -> str:  # shown in vLLM's config log
        return f"vlmeff.serve.vllm_kwargs({self.spec!r})"


def vllm_kwargs(spec: str | None = None, **extra: Any) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(...)` / `AsyncEngineArgs(...)` that serve the model with vlmeff's class and
    `spec` as its default strategy (a spec string or preset, e.g. "fastervlm:keep=64", "fastervlm-64"; None or
    "vanilla": no default, requests may still name one). The spec is parsed and checked now; whether it applies to
    the model (e.g. fastervlm's [CLS] on Qwen) is checked when vLLM builds the model. `extra` is merged in."""
    from vlmeff.serve.policy import canonical, check_servable

    text = canonical(spec)
    check_servable(text)
    register()
    return {"hf_overrides": _Overrides(text), **extra}


def serve_overrides(architecture: str, spec: str | None = None) -> dict[str, Any]:
    """The JSON-able `--hf-overrides` for `vllm serve` (which takes no callable): e.g.
    serve_overrides("LlavaForConditionalGeneration", "fastervlm:keep=64")."""
    from vlmeff.serve.policy import canonical, check_servable

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r}: vlmeff serves {', '.join(ARCHITECTURES)}")
    text = canonical(spec)
    check_servable(text)
    return {"architectures": [ARCHITECTURES[architecture]], SPEC_KEY: text}
