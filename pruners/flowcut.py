"""FlowCut: progressive information-flow pruning inside the vision encoder (arXiv 2505.19536; METHODS.md "FlowCut").

After each encoder block l (0-based), while more than T patches remain, from the block's INPUT (its ln1, q, k, v):
  rel  = [CLS] attention row over the current patches (mean over heads), normalised to sum 1;
  sem  = per-head softmax over all keys of v_CLS . v_j (unscaled unless `semantic_scale`), mean over heads, patch
         columns, normalised to sum 1;
  dens = L1 norm of the head-averaged value vector of each patch;
  S_cur = (rel + sem) * dens; S = S_cur at the first scored block, then 0.5 S + 0.5 S_cur (S follows the tokens).
rpl = (feature_layer - 1) - l; only when rpl >= 0 is even: r_H = entropy(rel) / log N,
P = round((N - T) / sqrt(rpl) * (1 - r_H^2)) (rpl = 0: P = N - T), P = max over the batch, keep max(N - P, T)
patches by top-k of S (ties by lower index, raster order), [CLS] always kept. The feature layer has T patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from vlmeff.registry import register_strategy
from vlmeff.strategy import Budget, NotApplicableError, Stage, TokenReducer, topk_sorted


def flowcut_scores(q_cls: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, num_heads: int, scale: float,
                   semantic_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """FlowCut's per-block score of the current patches, in float32.

    q_cls: [I, 1, H*hd], keys / values: [I, T, H*hd] ([CLS] first) -> (S_cur [I, N], rel [I, N]) with N = T - 1.
    """
    num_images, num_tokens, width = keys.shape
    head_dim = width // num_heads
    q = q_cls.float().view(num_images, 1, num_heads, head_dim).transpose(1, 2)  # [I, H, 1, hd]
    k = keys.float().view(num_images, num_tokens, num_heads, head_dim).transpose(1, 2)  # [I, H, T, hd]
    v = values.float().view(num_images, num_tokens, num_heads, head_dim).transpose(1, 2)  # [I, H, T, hd]
    rel = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)[:, :, 0, 1:].mean(1)  # [I, N]
    rel = rel / rel.sum(-1, keepdim=True)
    sem_logits = v[:, :, :1] @ v.transpose(-1, -2)  # [I, H, 1, T]: v_CLS . v_j
    if semantic_scale:
        sem_logits = sem_logits * head_dim**-0.5
    sem = torch.softmax(sem_logits, dim=-1)[:, :, 0, 1:].mean(1)  # [I, N]
    sem = sem / sem.sum(-1, keepdim=True)
    dens = v.mean(1)[:, 1:].abs().sum(-1)  # [I, N]: L1 of the head-averaged value vector
    return (rel + sem) * dens, rel


@register_strategy
@dataclass
class FlowCut(TokenReducer, Budget):
    """Prune patches progressively inside the vision encoder so that the feature layer holds keep (or ratio * V).

    Batch: the prune count P of a block is the maximum over the images of the batch (so every image keeps the
    same count and the batch stays rectangular); an image's result can therefore depend on its batch mates.
    """

    name = "flowcut"
    stage = Stage.VISION
    summary = "information-flow pruning inside the vision encoder (CLS relevance + value semantics x density)"
    paper = "arXiv 2505.19536"

    semantic_scale: bool = False  # scale v_CLS . v_j by 1/sqrt(head_dim) (the LLM/Qwen reference code does)

    def __post_init__(self):
        TokenReducer.__post_init__(self)
        self._check_budget(self.name)

    def check_applicable(self, connector) -> None:
        if connector.name.startswith("qwen"):
            raise NotApplicableError(
                "FlowCut's Qwen2-VL variant is not implemented yet; alternatives: fastervlm:scorer=global_query, "
                "random, pool"
            )
        if not connector.has_cls:
            raise NotApplicableError(f"flowcut needs a [CLS] token; the {connector.name} vision tower has none")

    def prune_layer(self, layer_index: int, layer: torch.nn.Module, hidden_in: torch.Tensor,
                    hidden_out: torch.Tensor, state: dict[str, Any]) -> torch.Tensor | None:
        target = self.kept_count(state["num_patches"])  # T
        num_patches = hidden_out.shape[1] - 1  # N
        remaining = (state["feature_layer"] - 1) - layer_index  # rpl
        if num_patches <= target or remaining < 0:
            return None
        q_cls, keys, values, heads, scale = state["attention_inputs"](layer, hidden_in)
        current, rel = flowcut_scores(q_cls, keys, values, heads, scale, self.semantic_scale)  # [I, N]
        score = current if "score" not in state else 0.5 * state["score"] + 0.5 * current
        state["score"] = score
        if remaining % 2:
            return None
        if remaining == 0:
            prune = num_patches - target
        else:
            entropy = -(rel * torch.log(rel + 1e-7)).sum(-1)  # [I]
            ratio = entropy / math.log(num_patches)
            per_image = torch.round((num_patches - target) / math.sqrt(remaining) * (1 - ratio**2))  # [I]
            prune = max(int(per_image.max()), 0)  # batch: max over images
        kept = max(num_patches - prune, target)
        if kept == num_patches:
            return None
        patches = topk_sorted(score, kept)  # [I, kept] ascending patch indices
        state["score"] = score.gather(1, patches)
        cls = torch.zeros_like(patches[:, :1])
        return torch.cat([cls, patches + 1], dim=1)  # [I, kept + 1] token positions, [CLS] first
