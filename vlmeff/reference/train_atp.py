"""Train `atp-learned`'s threshold MLPs on the reference model with the LLM frozen (`vlmeff reference train-atp`).

Each step is one synthetic training scene (the reference world's training seeds, disjoint from the benchmark's) and
one of its turns, asked as at evaluation: the image, a yes/no question (or, with probability `caption_share`, the
caption request) and its supervised answer. The model runs whole, with `SoftATP`'s soft masks in the layers after
each point (the hard cut forward, the soft masks' gradient); the loss is the answer's LM loss +
lambda (E - target / V)^2 (docs/methods.md "ATP"). Only the MLPs train.

Two choices of vlmeff's, because one sample makes a step here (the paper's batches are large):
- E is the batch mean of the paper's loss, estimated as a running mean over steps (EMA, decay `budget_decay`) in
  which the current sample enters with weight 1 - decay; penalising each sample's own count instead would push
  every instance to the same count and undo the adaptivity.
- The value of E is the hard cut's (tokens with m > 0.5 at every point, as inference keeps them) with the soft
  mask's gradient (straight-through), like the forward pass (`SoftATP`): the product of soft masks over points is
  lower than the hard count (a token at m = 0.7 at four points has 0.24 in the product and is kept), so a soft-only
  budget overshoots at inference.
Seeded and resumable like `vlmeff reference train` (`ResumableTrainer`): checkpoints every `checkpoint_every`
steps; the threshold weights (`atp_learned.safetensors`) are written with every checkpoint.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vlmeff.pruners.in_llm.atp import ATPScores
from vlmeff.pruners.in_llm.atp.learned import WEIGHTS_NAME, SoftATP, ThresholdMLPs, save_thresholds
from vlmeff.reference.train import CAPTION_PROMPT, POPE_SUFFIX, ResumableTrainer


@dataclass
class ATPTrainConfig:
    out: str = "runs/atp-learned"
    target_tokens: float = 64.0  # equivalent visual tokens (layer average) the budget term aims at
    budget_weight: float = 50.0  # lambda
    temperature: float = 10.0  # soft mask sharpness t
    width: int = 64  # MLP hidden width
    points: str | None = None  # '/'-separated decoder layers; default: atp's (scaled from 2/6/12/18 of 32)
    steps: int = 400
    num_scenes: int = 8000
    caption_share: float = 0.2
    budget_decay: float = 0.9  # EMA of the budget term's batch mean (see the module docstring)
    lr: float = 5e-4
    warmup: int = 20
    checkpoint_every: int = 25
    seed: int = 0
    max_hours: float | None = None

    def to_dict(self):
        return asdict(self)


def example_for(step: int, cfg: ATPTrainConfig) -> tuple[object, str, str]:
    """(image, question, answer) of a training step: a seeded scene and one of its turns."""
    from vlmeff.reference import world

    epoch, index = divmod(step, cfg.num_scenes)
    order = torch.randperm(cfg.num_scenes, generator=torch.Generator().manual_seed(cfg.seed + epoch))
    example = world.training_examples(int(order[index]))
    rng = random.Random(cfg.seed * 7919 + step)
    if rng.random() < cfg.caption_share:
        return example.image, CAPTION_PROMPT, example.caption
    question, answer = rng.choice(example.questions)
    return example.image, question + POPE_SUFFIX, answer


class ATPTrainer(ResumableTrainer):
    """Trains one `ThresholdMLPs` for a (LLaVA-style) model whose weights stay frozen."""

    compat_keys = ("target_tokens", "budget_weight", "temperature", "width", "points", "num_scenes", "seed",
                   "caption_share", "budget_decay")

    def __init__(self, model, processor, cfg: ATPTrainConfig, model_name: str = "reference"):
        self.cfg, self.model, self.processor, self.model_name = cfg, model, processor, model_name
        for p in model.parameters():
            p.requires_grad_(False)
        text_config = model.config.text_config
        self.num_layers = text_config.num_hidden_layers
        self.points = ATPScores(points=cfg.points).prune_layers(self.num_layers)
        torch.manual_seed(cfg.seed)
        device = next(model.parameters()).device
        self.module = ThresholdMLPs(text_config.hidden_size, len(self.points), cfg.width).to(device)
        self.params = dict(self.module.named_parameters())
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.base_lrs = [cfg.lr]
        self.soft = SoftATP(model, self.module, self.points, cfg.temperature)
        self.budget_mean: float | None = None  # running mean of the hard kept fraction E
        self._start()

    def extra_state(self) -> dict:
        return {"budget_mean": self.budget_mean}

    def load_extra_state(self, state: dict) -> None:
        self.budget_mean = state.get("budget_mean")

    def inputs_for(self, step: int):
        """(model inputs, prompt length): chat prompt with the image, then the answer and the end-of-turn token."""
        image, question, answer = example_for(step, self.cfg)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        tokenizer = self.processor.tokenizer
        prompt_len = self.processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
        inputs = self.processor(images=[image], text=[prompt + answer + tokenizer.eos_token], return_tensors="pt")
        return inputs.to(next(self.model.parameters()).device), prompt_len

    def step_loss(self, step: int) -> tuple[torch.Tensor, dict]:
        inputs, prompt_len = self.inputs_for(step)
        ids = inputs["input_ids"]  # [1, S]
        visual = ids[0] == self.model.config.image_token_id
        side = int(round(float(visual.sum()) ** 0.5))
        grid = (1, side, side) if side * side == int(visual.sum()) else (1, 1, int(visual.sum()))
        targets = ids[0, prompt_len:]  # the answer tokens, predicted from positions prompt_len - 1 ...
        keep = torch.arange(prompt_len - 1, ids.shape[1] - 1, device=ids.device)
        with self.soft:
            self.soft.prepare(visual, prompt_len, grid)
            logits = self.model(**inputs, logits_to_keep=keep).logits[0]  # [A, vocab]
        lm = torch.nn.functional.cross_entropy(logits.float(), targets)
        fraction = self.soft.expected_fraction()  # the hard cut's value, the soft masks' gradient
        decay = self.cfg.budget_decay if self.budget_mean is not None else 0.0
        mean = decay * (self.budget_mean or 0.0) + (1 - decay) * fraction
        self.budget_mean = float(mean.detach())
        num = float(visual.sum())
        loss = lm + self.cfg.budget_weight * (mean - min(1.0, self.cfg.target_tokens / num)) ** 2
        return loss, {"lm": round(lm.item(), 5), "hard_tokens": round(float(fraction.detach()) * num, 2),
                      "mean_tokens": round(self.budget_mean * num, 2)}

    def save_weights(self) -> None:
        save_thresholds(Path(self.cfg.out) / WEIGHTS_NAME, self.module, {
            "points": self.points, "num_layers": self.num_layers, "model": self.model_name, "step": self.step,
            "cpu_seconds_total": round(self.cpu_seconds, 1), "config": self.cfg.to_dict()})
