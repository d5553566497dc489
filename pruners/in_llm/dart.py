"""DART: duplication-aware reduction of tokens (arXiv 2502.11494; ZichenWen1/DART, `get_retained_image_token` in
llava/model/language_model/modeling_llama_self.py and the Qwen2-VL / Qwen2.5-VL copies; docs/methods.md "DART").

`dart` (in-LLM, the paper's place): before decoder layer K (default 2; 0-based, so layers 0 and 1 see everything),
from the output of layer K - 1, per sample and per image (reduction unit) with n visual tokens (at layer K - 1):
1. pivots: the `pivot_image` image tokens and the `pivot_text` text tokens with the largest L1 norm of layer K - 1's
   keys (after RoPE, kv heads repeated per query head, heads concatenated); text candidates are the sample's real
   tokens after its last visual token (for one image: every token after the image, as in the reference);
2. per-pivot count T = keep // P (the LLaVA scripts' `max_num_trunction`) or int(n * ratio / P) (the Qwen code's
   `image_token_length * (1 - reduction_ratio) / P`), P = pivot_image + pivot_text;
3. for each pivot in turn, the T not yet chosen, non-pivot image tokens LEAST cosine-similar to it, on layer K - 1's
   output passed through the model's final RMSNorm (as the reference compares `self.norm(hidden)`), are kept;
4. kept = image pivots + chosen (P_img + P T tokens: "keep=128" keeps 132), original positions, from layer K on.
Pivot order (`pivot_order`): "reference" (default) processes the pivots in the order the official code does, the
iteration order of a Python set of their indices in the sample's unpadded sequence (built from the image pivots, then
the text pivots, each by descending norm); "sequence" processes them by position. The order changes a few tokens.

`dart-embed` (also `dart:layer=0`): vlmeff's variant before the LLM, on the projected visual tokens (neither the
paper nor the official code defines one: the reference's hook reads layer K - 1 and needs K >= 1). No text exists
there, so the P = `pivots` (default 8 = 4 + 4) pivots are image tokens, the largest by L1 norm of the projected token;
similarity is the cosine of projected tokens; each pivot, in position order, keeps its T = keep // P (or
int(n * ratio / P)) least similar tokens; kept = P + P T tokens per image, raster order.

Deviations from the reference code: it runs per sample (the reference asserts batch size 1) and per image unit
(several images or LLaVA-NeXT views each get their own pivots and budget; the reference treats its one image span,
on LLaVA-NeXT all views and newline tokens together, as one unit; vlmeff's newline tokens are text and never
removed); ties are broken by the lower position (stable sorts; torch.topk's tie order is unspecified); norms and
similarities in float32; a unit whose candidates run out keeps them all (the reference's topk would fail).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmeff.registry import register_strategy
from vlmeff.strategy import Budget, BudgetReducer, ImageTokens, LLMPruner, Stage, StrategyError

PIVOT_ORDERS = ("reference", "sequence")
DEFAULT_RATIO = 0.222  # 1 - the official scripts' reduction_ratio 0.778


def per_pivot_count(budget: Budget, num_tokens: int, pivots: int) -> int:
    """T: tokens each pivot keeps for an image of `num_tokens` tokens (keep // P, or int(n * ratio / P))."""
    if budget.keep is not None:
        return budget.keep // pivots
    return int(num_tokens * budget.ratio / pivots)


def least_duplicated(features: torch.Tensor, pivots: torch.Tensor, candidates: torch.Tensor, per_pivot: int
                     ) -> torch.Tensor:
    """DART's greedy step: for each pivot in the order of `pivots` [P] (rows of `features` [N, D]), the `per_pivot`
    rows of `candidates` [n] (ascending) not chosen yet with the lowest cosine similarity to it (ties: the earlier
    candidate). Returns the chosen rows, in choice order. A short loop over pivots, none over tokens."""
    unit = features.float()
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    similarity = unit[pivots] @ unit[candidates].T  # [P, n]
    taken = torch.zeros(candidates.numel(), dtype=torch.bool, device=candidates.device)
    chosen, left = [], candidates.numel()
    for p in range(pivots.numel()):
        take = min(per_pivot, left)
        if take == 0:
            break
        order = torch.sort(similarity[p].masked_fill(taken, float("inf")), stable=True).indices[:take]
        taken[order] = True
        chosen.append(order)
        left -= take
    if not chosen:
        return candidates[:0]
    return candidates[torch.cat(chosen)]


def top_by_norm(norm: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the `count` largest entries of `norm` [n], largest first (ties: the earlier position)."""
    return torch.sort(norm, descending=True, stable=True).indices[:count]


def reference_order(positions: list[int]) -> list[int]:
    """The official code's pivot processing order: iteration order of a Python set built from `positions` (its
    sequence indices of the image pivots, then the text pivots). Deterministic for ints (hash(i) == i)."""
    return list(set(positions))


@register_strategy
@dataclass
class DART(LLMPruner, Budget):
    """Keep the image tokens least duplicated with a few pivot tokens, from decoder layer `layer` on."""

    name = "dart"
    summary = ("in-LLM: pivots by key L1 norm at layer K-1, keep tokens least similar to them (layer=K, keep/ratio); "
               "layer=0 = dart-embed")
    paper = "arXiv 2502.11494"
    budget_params = ("keep", "ratio")
    param_ranges = {"pivot_image": "[1, inf)", "pivot_text": "[0, inf)"}

    layer: int = 2
    pivot_image: int = 4
    pivot_text: int = 4
    pivot_order: str = "reference"

    def __post_init__(self):
        LLMPruner.__post_init__(self)
        if self.keep is None and self.ratio is None:
            self.ratio = DEFAULT_RATIO
        self._check_budget(self.name)
        if self.layer < 0:
            raise StrategyError(f"dart.layer={self.layer}: must be >= 1 (tokens are dropped after layer K - 1), or 0 "
                                "for the variant before the LLM (dart-embed)")
        if self.pivot_order not in PIVOT_ORDERS:
            raise StrategyError(f"dart.pivot_order={self.pivot_order!r}: expected one of {', '.join(PIVOT_ORDERS)}")

    def expand(self, connector) -> list:
        if self.layer == 0:  # before the LLM: the embedding-level variant
            return [DARTEmbed(positions=self.positions, keep=self.keep, ratio=self.ratio,
                              pivots=self.pivot_image + self.pivot_text)]
        return [self]

    def prune_layers(self, num_layers: int) -> list[int]:
        return [self.layer - 1]

    def observe(self, layer, attention, view, state) -> None:
        state["key_norm"] = attention.keys.abs().sum(dim=(1, 3))  # [B, S] L1 over heads x head_dim, post-RoPE

    def select(self, layer, view, state) -> list[torch.Tensor | None]:
        return [self._select_sample(view, row, sample, state["key_norm"][row])
                for row, sample in enumerate(view.samples)]

    def _select_sample(self, view, row: int, sample, key_norm: torch.Tensor) -> torch.Tensor | None:
        if sample.visual.numel() == 0:
            return None
        visual = sample.visual
        text = sample.text_after[sample.text_after > visual[-1]]  # the text after the (last) image
        text_pivots = text[top_by_norm(key_norm[text], self.pivot_text)]  # sequence positions
        rows = torch.cat([visual, text_pivots])  # the hidden states the similarity needs
        hidden = view.hidden[row, rows]
        normed = hidden if view.final_norm is None else view.final_norm(hidden[None])[0]
        real_index = view.valid[row].long().cumsum(0) - 1  # index in the unpadded sequence (the reference's)
        kept, changed = [], False
        for unit in sample.images.unique(sorted=True).tolist():
            members = (sample.images == unit).nonzero().squeeze(1)  # positions into sample.visual, ascending
            keep = self._select_unit(members, visual, text_pivots, normed, key_norm, real_index)
            changed |= keep.numel() < members.numel()
            kept.append(keep)
        return torch.cat(kept).sort().values if changed else None

    def _select_unit(self, members: torch.Tensor, visual: torch.Tensor, text_pivots: torch.Tensor,
                     normed: torch.Tensor, key_norm: torch.Tensor, real_index: torch.Tensor) -> torch.Tensor:
        """Kept members (positions into the sample's visual tokens) of one image unit."""
        n = members.numel()
        if (self.keep is not None and self.keep >= n) or (self.ratio is not None and self.ratio >= 1.0):
            return members
        per_pivot = per_pivot_count(self, n, self.pivot_image + self.pivot_text)
        order = top_by_norm(key_norm[visual[members]], self.pivot_image)  # positions into members
        image_pivots = members[order]
        is_pivot = torch.zeros(n, dtype=torch.bool, device=members.device)
        is_pivot[order] = True
        candidates = members[~is_pivot]
        # rows of `normed`: visual token j is row j, text pivot t is row len(visual) + t
        pivot_rows = torch.cat([image_pivots, visual.numel() + torch.arange(text_pivots.numel(),
                                                                            device=members.device)])
        sequence = torch.cat([visual[image_pivots], text_pivots])  # the pivots' positions, images then text
        if self.pivot_order == "reference":
            index = real_index[sequence].tolist()
            where = {value: i for i, value in enumerate(index)}
            pivot_rows = pivot_rows[torch.tensor([where[v] for v in reference_order(index)], device=members.device)]
        else:
            pivot_rows = pivot_rows[torch.argsort(sequence)]
        chosen = least_duplicated(normed, pivot_rows, candidates, per_pivot)
        return torch.cat([image_pivots, chosen])


@register_strategy
@dataclass
class DARTEmbed(BudgetReducer):
    """DART's duplication-aware selection before the LLM, on the projected visual tokens (vlmeff's variant)."""

    name = "dart-embed"
    stage = Stage.PRE_LLM
    token_space = "llm"
    summary = "pre-LLM DART variant: image pivots by embedding L1 norm, keep tokens least similar (keep/ratio, pivots)"
    paper = "arXiv 2502.11494 (vlmeff variant)"
    param_ranges = {"pivots": "[1, inf)"}

    pivots: int = 8

    def __post_init__(self):
        if self.keep is None and self.ratio is None:
            self.ratio = DEFAULT_RATIO
        super().__post_init__()

    def target_count(self, image: ImageTokens) -> int:
        """pivots + pivots x T (T from the original count for `ratio`); >= the current count keeps the image."""
        current = image.features.shape[0]
        if (self.keep is not None and self.keep >= current) or (self.ratio is not None and self.ratio >= 1.0):
            return current
        return self.pivots + self.pivots * per_pivot_count(self, image.num_original, self.pivots)

    def reduce_image(self, image: ImageTokens, k: int, position: int) -> ImageTokens:
        features = image.features
        pivots = top_by_norm(features.float().abs().sum(-1), self.pivots)  # [P] by L1 norm
        is_pivot = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
        is_pivot[pivots] = True
        candidates = (~is_pivot).nonzero().squeeze(1)
        per_pivot = (k - self.pivots) // self.pivots
        chosen = least_duplicated(features, pivots.sort().values, candidates, per_pivot)  # pivots in position order
        return image.keep(torch.cat([pivots, chosen]).sort().values)

