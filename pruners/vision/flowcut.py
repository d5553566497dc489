"""FlowCut: progressive information-flow pruning inside the vision encoder (arXiv 2505.19536; docs/methods.md "FlowCut").

After each encoder block l (0-based), while more than T patches remain, from the block's INPUT (its ln1, q, k, v):
  rel  = [CLS] attention row over the current patches (mean over heads), normalised to sum 1;
  sem  = per-head softmax over all keys of v_CLS . v_j (unscaled unless `semantic_scale`), mean over heads, patch
         columns, normalised to sum 1;
  dens = L1 norm of the head-averaged value vector of each patch;
  S_cur = (rel + sem) * dens; S = S_cur at the first scored block, then 0.5 S + 0.5 S_cur (S follows the tokens).
rpl = (feature_layer - 1) - l; only when rpl >= 0 is even: r_H = entropy(rel) / log N,
P = round((N - T) / sqrt(rpl) * (1 - r_H^2)) (rpl = 0: P = N - T), P = max over the batch, keep max(N - P, T)
patches by top-k of S (ties by lower index, raster order), [CLS] always kept. The feature layer has T patches.

Qwen2-VL / Qwen2.5-VL (no [CLS]; the reference's FlowCut_Qwen): after each vision block l, per image, from the
block's input (q, k with the block's rotary embedding, v):
  rel  = softmax of the "global token" query (mean of q over the image's patches) over the image's patches,
         scaled by 1/sqrt(hd), mean over heads;  dens = L1 norm of the head-averaged v;  S_cur = rel * dens
         (no semantic term, as in the reference).
rpl = (depth - 1) - l (the last block prunes straight to the target, the PatchMerger then runs). Deviations from
the reference code, stated: it scores and drops single patches of the whole packed batch before the 2x2 PatchMerger
(breaking merge groups and the M-RoPE ids of what remains) and computes one global token over all images; vlmeff
scores per image, per 2x2 merge group (S and rel of a group: mean and sum of its 4 patches; r_H over the group
distribution, log N with N groups), prunes whole groups, gathers their rotary rows and attention segments (Qwen2.5:
windows), and the LLM receives the M-RoPE ids of the kept groups. Counts are per image (no batch max: the packed
encoder needs no rectangle), so batched results equal per-image ones. Budget T is in LLM tokens (merge groups).

LLM stage (`flowcut-llm`; on Qwen2-VL `flowcut` runs it by default, `llm_stage=false` turns it off): the encoder
keeps 2T groups (the reference's ``visual.target_num = 2 x target``) and after decoder layer 1 (prefill only), per
sample, from that layer's post-RoPE q, k and v (kv heads repeated):
  rel = softmax over the visual keys of q_last . k_j / sqrt(hd), sem = softmax over the visual values of
  v_last . v_j / sqrt(hd), each mean over heads; dens = L1 norm of the head-averaged v_j; score = (rel + sem) dens;
the top T visual tokens stay (sequence order, original positions), the others are removed for all later layers.
On a connector that cannot prune inside its encoder (`runs_vision_stage` False: LLaVA-NeXT) `flowcut` IS its LLM stage
(the reference for LLaVA-NeXT also prunes every view to T/2 inside the encoder first; not done there).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from vlmeff.attention_rows import global_query_attention
from vlmeff.registry import register_strategy
from vlmeff.strategy import (
    Budget,
    LLMPruner,
    NotApplicableError,
    Stage,
    StrategyError,
    TokenReducer,
    topk_sorted,
)


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

    Batch (LLaVA towers): the prune count P of a block is the maximum over the images of the batch (so every image
    keeps the same count and the batch stays rectangular); an image's result can therefore depend on its batch
    mates. Qwen2-VL / Qwen2.5-VL: the global-token score pruned by 2x2 merge groups, counts per image (module
    docstring); `semantic_scale` does not apply there (the Qwen score has no semantic term).
    """

    name = "flowcut"
    stage = Stage.VISION
    summary = "information-flow pruning inside the vision encoder (CLS relevance + value semantics x density)"
    paper = "arXiv 2505.19536"
    budget_params = ("keep", "ratio")

    semantic_scale: bool = False  # scale v_CLS . v_j by 1/sqrt(head_dim) (the LLM/Qwen reference code does)
    llm_stage: bool | None = None  # None: on for Qwen2-VL (as in the reference), off for LLaVA-1.5

    def __post_init__(self):
        TokenReducer.__post_init__(self)
        self._check_budget(self.name)

    def expand(self, connector) -> list:
        if not connector.runs_vision_stage:  # the encoder cannot be pruned from inside: the LLM stage alone
            if self.llm_stage is False:
                raise NotApplicableError(
                    f"flowcut:llm_stage=false: the {connector.name} connector cannot prune inside its vision encoder, "
                    "so FlowCut's LLM stage is the only one that runs there; drop llm_stage=false")
            return [FlowCutLLM(keep=self.keep, ratio=self.ratio, positions=self.positions)]
        on = connector.name.startswith("qwen") if self.llm_stage is None else self.llm_stage
        if not on:
            return [self]
        encoder = dataclasses.replace(self, llm_stage=False, keep=None if self.keep is None else 2 * self.keep,
                                      ratio=None if self.ratio is None else min(1.0, 2 * self.ratio))
        return [encoder, FlowCutLLM(keep=self.keep, ratio=self.ratio, positions=self.positions)]

    def check_applicable(self, connector) -> None:
        if connector.name.startswith("qwen") or not connector.runs_vision_stage:
            return  # the global-token variant; or the LLM stage alone, which needs no [CLS]
        if not connector.has_cls:
            raise NotApplicableError(f"flowcut needs a [CLS] token; the {connector.name} vision tower has none")

    def prune_layer(self, layer_index: int, layer: torch.nn.Module, hidden_in: torch.Tensor,
                    hidden_out: torch.Tensor, state: dict[str, Any]) -> torch.Tensor | list[torch.Tensor] | None:
        if "image_qkv" in state:  # Qwen: packed patches, merge groups, global token
            return self._prune_groups(layer_index, layer, hidden_in, state)
        target = self.kept_count(state["num_patches"])  # T
        num_patches = hidden_out.shape[1] - 1  # N
        remaining = state["final_block"] - layer_index  # rpl
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
            prune = max(int(adaptive_prune_count(rel, target, remaining).max()), 0)  # batch: max over images
        kept = max(num_patches - prune, target)
        if kept == num_patches:
            return None
        patches = topk_sorted(score, kept)  # [I, kept] ascending patch indices
        state["score"] = score.gather(1, patches)
        cls = torch.zeros_like(patches[:, :1])
        return torch.cat([cls, patches + 1], dim=1)  # [I, kept + 1] token positions, [CLS] first

    def _prune_groups(self, layer_index: int, layer: torch.nn.Module, hidden_in: torch.Tensor,
                      state: dict[str, Any]) -> list[torch.Tensor] | None:
        """Qwen vision block: per image, the current merge groups to keep (ascending), or None for no change."""
        unit, remaining = state["group_size"], state["final_block"] - layer_index
        targets = [self.kept_count(g) for g in state["num_groups"]]
        if remaining < 0 or all(g <= t for g, t in zip(state["current_groups"](), targets)):
            return None  # nothing left to prune: no scores computed
        per_image = state["image_qkv"](layer, hidden_in)  # per image (q, k, v): [n_i, H, hd]
        scores = state.setdefault("score", [None] * len(per_image))
        keep, changed = [], False
        for i, ((q, k, v), target) in enumerate(zip(per_image, targets)):
            groups = q.shape[0] // unit
            keep.append(torch.arange(groups, device=q.device))
            if groups <= target:
                continue
            current, rel = global_token_scores(q, k, v, state["scale"], unit)  # [N] per group
            scores[i] = current if scores[i] is None else 0.5 * scores[i] + 0.5 * current
            if remaining % 2:
                continue
            prune = groups - target if remaining == 0 else max(int(adaptive_prune_count(rel[None], target,
                                                                                          remaining)[0]), 0)
            kept = max(groups - prune, target)
            if kept < groups:
                keep[i] = topk_sorted(scores[i], kept)
                scores[i] = scores[i][keep[i]]
                changed = True
        return keep if changed else None


def global_token_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, unit: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """FlowCut's Qwen score of one image's merge groups, in float32.

    q, k, v: [n, H, hd] (n = unit x groups, group-major) -> (S_cur [n / unit] = mean over the group of rel * dens,
    rel [n / unit] = the global token's attention summed over the group; sums to 1).
    """
    rel = global_query_attention(q, k, scale)  # [n]
    dens = v.float().mean(1).abs().sum(-1)  # [n]: L1 of the head-averaged value vector
    return (rel * dens).view(-1, unit).mean(-1), rel.view(-1, unit).sum(-1)


def adaptive_prune_count(rel: torch.Tensor, target: int, remaining: int) -> torch.Tensor:
    """P = round((N - T) / sqrt(rpl) * (1 - (H(rel) / log N)^2)) per row. rel: [I, N] (rows sum to 1) -> [I]."""
    num = rel.shape[-1]
    entropy = -(rel * torch.log(rel + 1e-7)).sum(-1)  # [I]
    ratio = entropy / math.log(num)
    return torch.round((num - target) / math.sqrt(remaining) * (1 - ratio**2))


@register_strategy
@dataclass
class FlowCutLLM(LLMPruner, Budget):
    """FlowCut's LLM stage: after decoder layer `layer` (1), keep the top keep (or ratio x V) visual tokens per image
    budget by (rel + sem) x dens of the last query (module docstring). `flowcut` adds it itself on Qwen2-VL."""

    name = "flowcut-llm"
    summary = "in-LLM stage of FlowCut: last-query relevance + value semantics x density after decoder layer 1"
    paper = "arXiv 2505.19536"
    budget_params = ("keep", "ratio")

    layer: int = 1

    def __post_init__(self):
        LLMPruner.__post_init__(self)
        self._check_budget(self.name)
        if self.layer < 0:
            raise StrategyError(f"flowcut-llm.layer={self.layer}: must be >= 0 (a decoder layer index)")

    def prune_layers(self, num_layers: int) -> list[int]:
        return [self.layer]

    def observe(self, layer, attention, view, state) -> None:
        keys, values = attention.keys, attention.values  # [B, H, S, hd]
        scale = keys.shape[-1] ** -0.5
        scores = []
        for b, sample in enumerate(view.samples):
            visual = sample.visual.to(keys.device)
            q_last = attention.query[b, :, sample.last].float()  # [H, hd]
            v_last = values[b, :, sample.last]  # [H, hd]
            k_vis, v_vis = keys[b][:, visual], values[b][:, visual]  # [H, n, hd]
            rel = torch.softmax(torch.einsum("hd,hnd->hn", q_last, k_vis) * scale, dim=-1).mean(0)  # [n]
            sem = torch.softmax(torch.einsum("hd,hnd->hn", v_last, v_vis) * scale, dim=-1).mean(0)  # [n]
            dens = v_vis.mean(0).abs().sum(-1)  # [n]
            scores.append((rel + sem) * dens)
        state["scores"] = scores

    def select(self, layer, view, state) -> list[torch.Tensor | None]:
        return [self.keep_top(score, sum(self.kept_count(v) for v in sample.original_counts))
                for sample, score in zip(view.samples, state["scores"])]
