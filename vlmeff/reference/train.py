"""Train the reference model's projector and LoRA adapters on the synthetic world (`vlmeff reference train`).

Seeded and resumable: a checkpoint (trainable weights + AdamW state, safetensors) and a JSON state are written
atomically every `checkpoint_every` steps and at the end; a rerun with the same --out resumes from the last one and
sees exactly the data it would have seen. The vision tower and the language model are frozen; the tower runs under
no_grad each step (about 5% of a step), so no feature cache is needed. Uses a GPU (bf16 autocast) when there is one, else fp32
on CPU.

Each training sequence is one scene: a caption turn ("List the objects in the image." -> caption) followed by
yes/no turns with balanced answers (negatives half random, half co-occurring, so no language prior pays off).
Evaluation uses single-question prompts only.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlmeff.reference.model import ReferenceConfig, save_trained, trained_state

POPE_SUFFIX = "\nAnswer the question using a single word or phrase."
CAPTION_PROMPT = "List the objects in the image."


@dataclass
class TrainConfig:
    out: str = "runs/reference"
    steps: int = 3000
    num_scenes: int = 8000  # distinct training scenes (seeds 0..num_scenes-1 of the train range)
    lr_projector: float = 1e-3
    lr_lora: float = 2e-4
    weight_decay: float = 0.0
    warmup: int = 50
    checkpoint_every: int = 50
    seed: int = 0
    max_hours: float | None = None  # stop (with a checkpoint) after this much wall time in this run
    # a fine-tune with an attention-stage strategy active in every training forward ("cca", "mma", "naavit", any
    # spec of them), or "none": the control, the same fine-tuning with plain causal attention; None: plain training
    # (docs/reference-model.md)
    attention: str | None = None
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)

    def to_dict(self):
        return asdict(self)


def chatml_tokens(tokenizer, turns: list[tuple[str, str]], image_token_id: int, num_image_tokens: int):
    """Token ids and labels for a ChatML conversation whose first user turn starts with the image.

    turns: [(user_text, assistant_text), ...]. Labels are -100 except on assistant answers and their <|im_end|>.
    Returns (input_ids [S], labels [S]) as LongTensors.
    """
    ids: list[int] = []
    labels: list[int] = []

    def add(text: str, supervised: bool):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if supervised else [-100] * len(piece))

    for i, (user, answer) in enumerate(turns):
        add("<|im_start|>user\n", False)
        if i == 0:
            ids.extend([image_token_id] * num_image_tokens)
            labels.extend([-100] * num_image_tokens)
            add("\n", False)
        add(f"{user}<|im_end|>\n<|im_start|>assistant\n", False)
        add(f"{answer}<|im_end|>", True)
        add("\n", False)
    return torch.tensor(ids), torch.tensor(labels)


def scene_turns(scene_seed: int, epoch: int) -> tuple[object, list[tuple[str, str]]]:
    """The scene image and its conversation turns (caption and yes/no questions) in a seeded random order.

    The caption turn is shuffled in with the questions, so most sequences open with a yes/no question right after
    the image, the format of evaluation. (With the caption always first, the model learned "first answer after the
    image = a caption" and answered yes/no questions with captions: measured at step 350, see the model card.)
    """
    from vlmeff.reference import world

    example = world.training_examples(scene_seed)
    turns = [(CAPTION_PROMPT, example.caption)] + [(q + POPE_SUFFIX, a) for q, a in example.questions]
    random.Random(scene_seed * 1009 + epoch).shuffle(turns)
    return example.image, turns


class ResumableTrainer:
    """The loop, learning-rate schedule, logging and safetensors checkpoints every vlmeff training command shares.

    A subclass sets `cfg` (with out, steps, warmup, checkpoint_every, max_hours), `params` ({name: trainable
    tensor}), `optimizer` and `base_lrs` (one per param group), and implements `step_loss(step)` -> (loss, extra
    log fields) and `save_weights()`; `compat_keys` name the config entries a resumed run must share.
    """

    compat_keys: tuple[str, ...] = ()

    def _start(self) -> None:
        self.step = 0
        self.log_path = Path(self.cfg.out) / "train_log.jsonl"
        self.cpu_seconds = 0.0

    def step_loss(self, step: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def save_weights(self) -> None:
        raise NotImplementedError

    def extra_state(self) -> dict:
        """JSON-able training state beyond parameters and optimizer (restored by `load_extra_state` on resume)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def lr_factor(self, step: int) -> float:
        if step < self.cfg.warmup:
            return (step + 1) / self.cfg.warmup
        progress = (step - self.cfg.warmup) / max(1, self.cfg.steps - self.cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def train(self) -> None:
        out = Path(self.cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        self.resume()
        start = time.time()
        self.model.train()
        while self.step < self.cfg.steps:
            t0, c0 = time.time(), time.process_time()
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * self.lr_factor(self.step)
            loss, extra = self.step_loss(self.step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), 1.0)
            self.optimizer.step()
            self.step += 1
            self.cpu_seconds += time.process_time() - c0
            with self.log_path.open("a") as f:
                f.write(json.dumps({"step": self.step, "loss": round(loss.item(), 5), **extra,
                                    "step_s": round(time.time() - t0, 3)}) + "\n")
            done = self.step >= self.cfg.steps
            out_of_time = self.cfg.max_hours is not None and time.time() - start > self.cfg.max_hours * 3600
            if done or out_of_time or self.step % self.cfg.checkpoint_every == 0:
                self.checkpoint()
            if out_of_time:
                break
        self.model.eval()

    # --- checkpoints ----------------------------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"param.{n}": p.detach().float().cpu().contiguous() for n, p in self.params.items()}
        index = {id(p): n for n, p in self.params.items()}
        for p, st in self.optimizer.state.items():
            name = index[id(p)]
            for key in ("exp_avg", "exp_avg_sq"):
                tensors[f"adam.{key}.{name}"] = st[key].detach().float().cpu().contiguous()
            tensors[f"adam.step.{name}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
        return tensors

    def checkpoint(self) -> None:
        out = Path(self.cfg.out)
        tmp = out / "checkpoint.safetensors.tmp"
        save_file(self._state_tensors(), str(tmp))
        tmp.replace(out / "checkpoint.safetensors")
        state = {"step": self.step, "cpu_seconds_total": self.cpu_seconds, "config": self.cfg.to_dict(),
                 "extra": self.extra_state()}
        (out / "state.json.tmp").write_text(json.dumps(state, indent=1))
        (out / "state.json.tmp").replace(out / "state.json")
        self.save_weights()

    def resume(self) -> None:
        out = Path(self.cfg.out)
        if not (out / "state.json").is_file():
            return
        state = json.loads((out / "state.json").read_text())
        saved = dict(state["config"])
        for key in self.compat_keys:
            mine = json.loads(json.dumps(self.cfg.to_dict()[key]))  # tuples -> lists, as stored
            if saved.get(key) != mine:
                raise ValueError(f"cannot resume {out}: it was trained with {key}={saved.get(key)!r}, now {mine!r}")
        tensors = load_file(str(out / "checkpoint.safetensors"))
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(tensors[f"param.{n}"].to(p.dtype))
        for name, p in self.params.items():
            if f"adam.step.{name}" not in tensors:
                continue
            self.optimizer.state[p] = {
                "step": tensors[f"adam.step.{name}"][0].clone(),
                "exp_avg": tensors[f"adam.exp_avg.{name}"].to(p.device),
                "exp_avg_sq": tensors[f"adam.exp_avg_sq.{name}"].to(p.device),
            }
        self.step = state["step"]
        self.cpu_seconds = state.get("cpu_seconds_total", 0.0)
        self.load_extra_state(state.get("extra", {}))
        # drop log lines past the checkpoint so an interrupted run never duplicates steps
        if self.log_path.is_file():
            lines = [ln for ln in self.log_path.read_text().splitlines() if json.loads(ln)["step"] <= self.step]
            self.log_path.write_text("".join(ln + "\n" for ln in lines))


class Trainer(ResumableTrainer):
    compat_keys = ("num_scenes", "seed", "reference", "attention")

    def __init__(self, model, processor, cfg: TrainConfig, device: str | None = None):
        from peft import LoraConfig, inject_adapter_in_model

        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.ref = cfg.reference
        for p in model.parameters():
            p.requires_grad_(False)
        lora = LoraConfig(r=self.ref.lora_rank, lora_alpha=self.ref.lora_alpha, lora_dropout=0.0,
                          target_modules=list(self.ref.lora_targets), init_lora_weights=True)
        torch.manual_seed(cfg.seed)
        inject_adapter_in_model(lora, model.model.language_model)
        self.lora_layers = {name: m for name, m in model.model.language_model.named_modules()
                            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
        lora_params = [p for n, p in model.model.language_model.named_parameters() if "lora_" in n]
        for p in lora_params:
            p.requires_grad_(True)
        self.vm = None if cfg.attention is None else attention_wrapper(model, processor, cfg.attention, Path(cfg.out))
        # what maps vision features into the LLM: the stock projector, or SAISA's per-layer projectors (the module
        # its strategy runs; the stock projector's output is then dropped, so it stays frozen)
        self.saisa = saisa_module(self.vm)
        mapper = self.saisa if self.saisa is not None else model.model.multi_modal_projector
        prefix = "saisa." if self.saisa is not None else "projector."
        mapper.requires_grad_(True)
        self.params = {f"{prefix}{n}": p for n, p in mapper.named_parameters()}
        self.params.update({f"lm.{n}": p for n, p in model.model.language_model.named_parameters() if "lora_" in n})
        self.optimizer = torch.optim.AdamW([
            {"params": list(mapper.parameters()), "lr": cfg.lr_projector},
            {"params": lora_params, "lr": cfg.lr_lora},
        ], weight_decay=cfg.weight_decay)
        self.base_lrs = [cfg.lr_projector, cfg.lr_lora]
        self._start()

    # --- data -----------------------------------------------------------------------------------------------
    def batch_for(self, step: int):
        epoch, index = divmod(step, self.cfg.num_scenes)
        order = torch.randperm(self.cfg.num_scenes, generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        scene_seed = int(order[index])
        image, turns = scene_turns(scene_seed, epoch)
        pixel_values = self.processor.image_processor(image, return_tensors="pt")["pixel_values"]
        num = (self.ref.image_size // self.model.config.vision_config.patch_size) ** 2
        ids, labels = chatml_tokens(self.tokenizer, turns, self.model.config.image_token_id, num)
        return pixel_values, ids, labels

    # --- one step -------------------------------------------------------------------------------------------
    def loss(self, pixel_values, ids, labels):
        model = self.model
        dev = self.device
        if self.vm is not None:  # a variant's (or the control's) forward: the wrapper's masks / positions, with gradients
            targets = labels[1:].to(dev)
            keep = (targets != -100).nonzero().squeeze(1)  # positions whose next token is supervised (text tokens)
            rows = keep
            if self.saisa is not None:  # SAISA's residual stream holds the text rows only: their row numbers
                text = ids.to(dev) != model.config.image_token_id
                rows = (text.cumsum(0) - 1)[keep]
            out = self.vm.train_forward(input_ids=ids[None].to(dev), attention_mask=torch.ones_like(ids[None]).to(dev),
                                        pixel_values=pixel_values.to(dev), logits_to_keep=rows, use_cache=False)
            return torch.nn.functional.cross_entropy(out.logits[0].float(), targets[keep])
        # bf16 autocast on GPU only: on these CPUs it is 7x slower than fp32 (measured, see the model card)
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
        with autocast:
            _, embeds = self.stock_inputs(pixel_values, ids)
            hs = model.model.language_model(inputs_embeds=embeds).last_hidden_state[0]  # [S, d]
            targets = labels[1:].to(dev)
            where = targets != -100
            logits = model.lm_head(hs[:-1][where])  # only supervised positions: the 49k-vocab head is costly
        return torch.nn.functional.cross_entropy(logits.float(), targets[where])

    def stock_inputs(self, pixel_values, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw vision features [1, V, D_vis] the projector reads, input embeddings [1, S, d] with the stock
        projector's visual tokens spliced in)."""
        model, dev = self.model, self.device
        with torch.no_grad():
            hidden = model.model.vision_tower(pixel_values.to(dev), output_hidden_states=True).hidden_states
            feats = hidden[self.ref.feature_layer][:, 1:]  # [1, 256, D_vis]
        visual = model.model.multi_modal_projector(feats)  # [1, 256, d]
        embeds = model.model.language_model.embed_tokens(ids[None].to(dev))
        mask = (ids == model.config.image_token_id)[None, :, None].to(dev)
        return feats, embeds.masked_scatter(mask, visual.to(embeds.dtype))

    def distill_saisa(self, scenes: int | None = None) -> dict[str, list[float]]:
        """SAISA's projectors fitted to the visual hidden states this (causally trained) model holds at each
        layer's input, RMS-normalised (what the layer's input norm sees), over the first `scenes` images of the
        training stream (default SAISA_DISTILL_SCENES; `fit_projectors`); returns the fit's explained variance per
        layer."""
        from vlmeff.pruners.attention.saisa import fit_projectors

        model = self.model
        layers = model.config.text_config.num_hidden_layers

        def batches():
            for step in range(SAISA_DISTILL_SCENES if scenes is None else scenes):
                pixel_values, ids, _ = self.batch_for(step)
                with torch.no_grad():
                    feats, embeds = self.stock_inputs(pixel_values, ids)
                    states = model.model.language_model(inputs_embeds=embeds, output_hidden_states=True).hidden_states
                visual = (ids == model.config.image_token_id).to(self.device)
                targets = torch.stack([h[0, visual] for h in states[:layers]])  # [L, V, d], layer l's input
                targets = targets * targets.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()
                yield feats[0].cpu(), targets.cpu()

        return fit_projectors(self.saisa, batches())

    def step_loss(self, step: int) -> tuple[torch.Tensor, dict]:
        return self.loss(*self.batch_for(step)), {}

    def save_weights(self) -> None:
        extra = {"step": self.step, "cpu_seconds_total": round(self.cpu_seconds, 1)}
        if self.cfg.attention is not None:
            extra["attention"] = self.cfg.attention  # `vlmeff reference export` names the variant by it
        save_trained(Path(self.cfg.out) / "reference.safetensors", self.export(), self.ref, extra=extra)
        if self.saisa is not None:
            from vlmeff.pruners.attention.saisa import WEIGHTS_NAME, save_projectors

            # the per-layer projectors (saisa:weights=<file>); `vlmeff reference export` ships them as the default
            save_projectors(Path(self.cfg.out) / WEIGHTS_NAME, self.saisa, {"model": "reference", **extra})

    def init_from(self, path: str | Path) -> None:
        """Start from trained weights in the asset format (e.g. the shipped assets/reference file), with a fresh
        optimizer: how a later session continues training when the run folder (with optimizer state) is gone."""
        state = load_file(str(path))
        with torch.no_grad():
            self.model.model.multi_modal_projector.load_state_dict(
                {k[len("projector."):]: v.float() for k, v in state.items() if k.startswith("projector.")})
            for name, m in self.lora_layers.items():
                m.lora_A["default"].weight.copy_(state[f"lora.{name}.A"].float())
                m.lora_B["default"].weight.copy_(state[f"lora.{name}.B"].float())
        if self.saisa is not None:  # SAISA starts from the trained stock projector, fitted to the model's layers
            from vlmeff.pruners.attention.saisa import save_projectors

            stock = self.model.model.multi_modal_projector
            self.saisa.copy_stock(stock.linear_1, stock.linear_2)
            fit = self.distill_saisa()
            # the fitted start, before any gradient step: SAISA on the shipped model with a closed-form fit only
            save_projectors(Path(self.cfg.out) / SAISA_INIT_NAME, self.saisa,
                            {"model": "reference (fitted init, no gradient steps)", "fit": fit})
            print(f"saisa init: explained variance per layer {min(fit['r2']):.3f}-{max(fit['r2']):.3f} "
                  f"(shared layer alone {min(fit['r2_shared']):.3f}-{max(fit['r2_shared']):.3f}); "
                  f"{self.cfg.out}/{SAISA_INIT_NAME}", flush=True)

    def export(self) -> dict[str, torch.Tensor]:
        """Trainable weights in the asset format (projector.*, lora.<module>.A/.B)."""
        projector = self.model.model.multi_modal_projector.state_dict()
        lora = {name: (m.lora_A["default"].weight, m.lora_B["default"].weight) for name, m in self.lora_layers.items()}
        return trained_state(projector, lora)


SAISA_RANK = 32  # the factored projectors' per-layer rank: 1.7 M parameters (3.4 MB in float16) instead of 16.6 M
SAISA_INIT_NAME = "saisa_init.safetensors"  # the fitted projectors before the first step
SAISA_DISTILL_SCENES = 64  # images of the training stream the projectors' init is fitted on (16k visual tokens)


def attention_wrapper(model, processor, spec: str, out: Path):
    """The wrapper that puts an attention-stage strategy into every training forward (`VLMWrapper.train_forward`),
    "none" for the control; refuses, naming the reason, strategies of other stages. "saisa" without weights gets
    per-layer projectors shaped for the model, written to `out` (their values are set by `init_from` or a resumed
    checkpoint)."""
    import vlmeff
    from vlmeff.spec import parse_spec
    from vlmeff.strategy import Stage, StrategyError

    if spec == "none":
        return vlmeff.wrap(model, processor, None)
    items = parse_spec(spec)
    if len(items) == 1 and items[0].name == "saisa" and items[0].weights is None:
        from vlmeff.pruners.attention.saisa import untrained_projectors

        path = untrained_projectors(model.config, out / "saisa_shape.safetensors", rank=SAISA_RANK)
        spec = f"saisa:weights={path}"
    vm = vlmeff.wrap(model, processor, spec)
    for strategy in vm.strategies:
        if strategy.stage is not Stage.ATTENTION:
            vm.unwrap()
            raise StrategyError(
                f"--attention {spec!r}: {strategy.name} is not an attention-stage strategy; training takes cca, mma, "
                "naavit, saisa (or none, the control)")
    return vm


def saisa_module(vm):
    """The per-layer projectors the wrapper's saisa strategy runs (the cached module of its weights file), or None."""
    for strategy in [] if vm is None else vm.strategies:
        if strategy.name == "saisa":
            return strategy.projectors()[0]
    return None


def saisa_from_stock_projector(model, path: str | Path) -> Path:
    """SAISA applied training-free: per-layer projectors that all equal `model`'s trained stock projector (what a
    SAISA fine-tune copies before its fit), written to `path` for saisa:weights=<path>."""
    from vlmeff.pruners.attention.saisa import SAISAProjectors, save_projectors, vision_feature_size

    text = model.config.text_config
    module = SAISAProjectors(vision_feature_size(model.config), text.hidden_size, text.num_hidden_layers, SAISA_RANK)
    module.copy_stock(model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2)
    return save_projectors(path, module, {"model": "reference (untrained: copies of the stock projector)"})


def set_threads() -> None:
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("VLMEFF_THREADS", os.cpu_count() or 1)))
