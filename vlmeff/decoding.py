"""The decoding stage: contrast branches as extra rows of the same forward pass, combined by a logits processor.

A `DecodingStrategy` declares its contrast branches (`branches`: each a transformed copy of the batch's processor
inputs - a noised image, the text alone - and, optionally, its own pre-LLM reducers, e.g. DAMRO's outlier tokens)
and how the next-token scores of the branches combine (`combine`). The wrapper stacks the main rows and every
branch's rows into ONE batch (`stack_batches`: rows re-padded on the left), so prefill and every decode step run
all branches in one forward pass, each row with its own KV cache rows and position ids (generate's own per-row
bookkeeping). Then, during `generate`:
- `ContrastLogits` (a transformers `LogitsProcessor`, placed before the user's processors and before generate's
  temperature / top-k / top-p warpers) replaces the main rows' scores by the combination and gives every branch row
  the same scores;
- `BranchRowsDone` (a `StoppingCriteria`) marks the branch rows finished from the first step, so generate stops when
  the main rows do; `follow_main` (a router `on_call`) feeds each branch row the token its main row just produced,
  whatever generate sampled for it;
- the wrapper returns the main rows only.
Which tokens a branch sees after a reduction: the branch's images go through the same vision and pre-LLM pipeline
as the main images (VCD: the noised image gets its own FasterVLM selection), unless the branch brings its own
reducers (DAMRO: its outlier tokens, from the full grid). Beam search and several returned sequences per prompt are
refused (the branch rows would need to follow beams).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria

from vlmeff.strategy import Stage, Strategy, StrategyError

SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


@dataclass
class Branch:
    """One contrast branch: processor-level inputs for the B main rows (same keys as the main batch, rows in the same
    order) and the pre-LLM reducers its images go through (None: the main pipeline's)."""

    name: str
    inputs: dict[str, Any]
    reducers: list | None = None


@dataclass
class DecodingStrategy(Strategy):
    """Base of decoding-stage strategies: `branches` builds the contrast rows, `combine` mixes the scores."""

    stage = Stage.DECODING

    def branches(self, inputs: dict[str, Any], connector) -> list[Branch]:
        raise NotImplementedError

    def combine(self, scores: torch.Tensor, branch_scores: list[torch.Tensor]) -> torch.Tensor:
        """[B, V] next-token scores of the main rows and of each branch's rows (float32 logits, after generate's
        own processors) -> the scores generate continues with."""
        raise NotImplementedError

    def check_after(self, previous) -> None:
        super().check_after(previous)
        other = [p.name for p in previous if p.stage is Stage.DECODING]
        if other:
            raise StrategyError(f"{self.name} cannot follow {', '.join(other)}: one decoding-stage combination per call "
                                "(two contrast combinations have no defined order)")


def contrast(scores: torch.Tensor, other: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """VCD / DAMRO: (1 + alpha) l - alpha l_o on logits, -inf where l < log(beta) + max l (adaptive plausibility)."""
    cutoff = math.log(beta) + scores.max(dim=-1, keepdim=True).values
    out = (1 + alpha) * scores - alpha * other
    return out.masked_fill((scores < cutoff) | ~torch.isfinite(scores), float("-inf"))


def guidance(scores: torch.Tensor, unconditional: torch.Tensor, gamma: float, beta: float = 0.1) -> torch.Tensor:
    """PAI's CFG on log-probs: gamma lp_c - (gamma - 1) lp_u, -inf where lp_c < log(beta) + max lp_c."""
    lp_c = torch.log_softmax(scores, dim=-1)
    lp_u = torch.log_softmax(unconditional, dim=-1)
    cutoff = math.log(beta) + lp_c.max(dim=-1, keepdim=True).values
    out = gamma * lp_c - (gamma - 1) * lp_u
    return out.masked_fill((lp_c < cutoff) | ~torch.isfinite(lp_c), float("-inf"))


def _check_cutoff(name: str, beta: float) -> None:
    """The plausibility cutoff's beta (a probability ratio to the top token) must be in (0, 1]."""
    if not 0.0 < beta <= 1.0:
        raise StrategyError(f"{name}.beta={beta}: must be in (0, 1]")


@dataclass
class ContrastDecoding(DecodingStrategy):
    """Contrast with one branch on logits (VCD, DAMRO): `contrast(l, l_branch, alpha, beta)`; subclasses build the
    branch and set their defaults."""

    alpha: float = 1.0
    beta: float = 0.1

    def __post_init__(self):
        if self.alpha < 0:
            raise StrategyError(f"{self.name}.alpha={self.alpha}: must be >= 0 (0 is plain decoding)")
        _check_cutoff(self.name, self.beta)

    def combine(self, scores, branch_scores):
        return contrast(scores, branch_scores[0], self.alpha, self.beta)


@dataclass
class TextOnlyGuidance(DecodingStrategy):
    """Classifier-free guidance against the same prompt without its image (PAI's CFG half; PAINT reuses it): the
    text-only branch drops the connector's image span tokens; `guidance` on log-probs with gamma and beta."""

    gamma: float = 1.1
    beta: float = 0.1

    def __post_init__(self):
        if self.gamma < 1:
            raise StrategyError(f"{self.name}.gamma={self.gamma}: must be >= 1 (1 is plain decoding)")
        _check_cutoff(self.name, self.beta)

    def branches(self, inputs, connector):
        return [Branch("text only", drop_tokens(inputs, connector.image_span_ids(), connector.pad_token_id))]

    def combine(self, scores, branch_scores):
        return guidance(scores, branch_scores[0], self.gamma, self.beta)


def stack_batches(batches: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """One batch of the rows of `batches` in order: sequence keys re-padded on the left to the longest row, image
    tensors (pixel_values, grids, sizes) concatenated; keys a batch lacks are skipped for it."""
    width = max(int(b["input_ids"].shape[1]) for b in batches)
    out: dict[str, Any] = {}
    keys = dict.fromkeys(k for b in batches for k in b)
    for key in keys:
        parts = [b[key] for b in batches if b.get(key) is not None]
        if not parts:
            continue
        if key in SEQUENCE_KEYS:
            fill = pad_id if key == "input_ids" else 0
            parts = [torch.nn.functional.pad(p, (width - p.shape[1], 0), value=fill) for p in parts]
        if isinstance(parts[0], torch.Tensor):
            out[key] = torch.cat(parts, dim=0)
        else:
            out[key] = [x for p in parts for x in p]
    if "attention_mask" not in out:
        raise ValueError("contrast branches need the batch's attention_mask")
    return out


def drop_tokens(inputs: dict[str, Any], token_ids, pad_id: int) -> dict[str, Any]:
    """The batch's text rows without the tokens `token_ids` (e.g. the image span), re-padded on the left; no image
    tensors (what a text-only branch gets)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    keep = mask & ~torch.isin(ids, torch.as_tensor(list(token_ids), device=ids.device))
    rows = [ids[b][keep[b]] for b in range(ids.shape[0])]
    width = max(int(r.numel()) for r in rows)
    new_ids = torch.full((ids.shape[0], width), pad_id, dtype=ids.dtype, device=ids.device)
    new_mask = torch.zeros(ids.shape[0], width, dtype=inputs["attention_mask"].dtype, device=ids.device)
    for b, r in enumerate(rows):
        if r.numel():
            new_ids[b, width - r.numel():] = r
            new_mask[b, width - r.numel():] = 1
    out = {"input_ids": new_ids, "attention_mask": new_mask}
    if inputs.get("mm_token_type_ids") is not None:
        out["mm_token_type_ids"] = torch.zeros_like(new_ids)
    return out


@dataclass
class BranchPlan:
    """The rows of one call: rows [0, B) are the main batch, rows [B (i + 1), B (i + 2)) branch i."""

    strategy: DecodingStrategy
    rows: int
    branches: list[Branch] = field(default_factory=list)

    @property
    def total_rows(self) -> int:
        return self.rows * (1 + len(self.branches))

    def branch_of(self, row: int) -> int:
        """0 for a main row, i + 1 for a row of branch i."""
        return row // self.rows

    def combined(self, scores: torch.Tensor) -> torch.Tensor:
        """[N, V] scores of every row -> [N, V]: the combination for the main rows, repeated for the branch rows."""
        b = self.rows
        parts = [scores[b * (i + 1): b * (i + 2)] for i in range(len(self.branches))]
        out = self.strategy.combine(scores[:b], parts)
        return out.repeat(1 + len(self.branches), 1)

    def follow_main(self, phase: str, kwargs: dict[str, Any]) -> None:
        """Router `on_call`: in a decode step every branch row gets its main row's new token embeddings."""
        if phase == "prefill":
            return
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or embeds.shape[0] != self.total_rows:
            raise RuntimeError("contrast branches: the decode step does not carry every branch row")
        kwargs["inputs_embeds"] = embeds[: self.rows].repeat(1 + len(self.branches), 1, 1)


class ContrastLogits(LogitsProcessor):
    """generate's hook for a `BranchPlan`: the main rows' scores become the strategy's combination."""

    def __init__(self, plan: BranchPlan):
        self.plan = plan

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.plan.combined(scores)


class BranchRowsDone(StoppingCriteria):
    """Branch rows count as finished from the first step: generate stops when every main row has."""

    def __init__(self, rows: int):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        done[self.rows:] = True
        return done
