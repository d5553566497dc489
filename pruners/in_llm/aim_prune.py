"""AIM, in-LLM half: progressive pruning of visual tokens by PageRank-style importance (arXiv 2412.03248; docs/methods.md
"AIM").

At each prefill layer l >= l1, from that layer's attention logits (scaled q.k, causal / padding mask applied):
  M = softmax(logits / temperature) per head (temperature 0.1); d = uniform over the sample's tokens;
  repeat `iterations` (5) times: d = d M;  importance = sqrt(mean over heads of d^2).
Text tokens are never pruned. The layers after l keep round(V0 * rate(l)) visual tokens by importance (V0 = visual
tokens entering the LLM), rate(l) = max(0, 1 - (l - l1 + 1) / span) (span 8), kept in sequence order with their
original positions. Defaults: l1 = 13 of 32 layers (LLaVA-1.5-7B), 14 of 28 (Qwen2-VL-7B); other depths scale both:
l1 = round(13 L / 32), span = max(1, round(8 L / 32)); the last possible pruning point is layer L - 2.

Deviation from the reference code, stated: the reference only masks pruned tokens (no speedup); vlmeff removes them
(hidden states gathered, later layers' KV caches shrink). Combine with the merge half as ``aim+aim-prune``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmeff.registry import register_strategy
from vlmeff.strategy import LLMPruner, StrategyError

PUBLISHED_START = {32: 13, 28: 14}


@register_strategy
@dataclass
class AIMPrune(LLMPruner):
    """AIM's progressive in-LLM pruning: fewer visual tokens after every layer from `start` (l1) over `span` layers."""

    name = "aim-prune"
    summary = "in-LLM: PageRank-style importance (T=0.1, 5 iterations), linear schedule from l1 to zero visual tokens"
    paper = "arXiv 2412.03248"
    budget_params = ("start", "span")  # the schedule; `iterations` are PageRank steps

    start: int | None = None
    span: int | None = None
    temperature: float = 0.1
    iterations: int = 5

    def __post_init__(self):
        LLMPruner.__post_init__(self)
        if self.start is not None and self.start < 0:
            raise StrategyError(f"aim-prune.start={self.start}: must be >= 0 (a decoder layer index)")
        if self.span is not None and self.span < 1:
            raise StrategyError(f"aim-prune.span={self.span}: must be >= 1")
        if self.temperature <= 0:
            raise StrategyError(f"aim-prune.temperature={self.temperature}: must be > 0")
        if self.iterations < 1:
            raise StrategyError(f"aim-prune.iterations={self.iterations}: must be >= 1")

    def schedule(self, num_layers: int) -> tuple[int, int]:
        """(l1, span) for an LLM of `num_layers` layers."""
        start = self.start if self.start is not None else PUBLISHED_START.get(num_layers, round(13 * num_layers / 32))
        span = self.span if self.span is not None else max(1, round(8 * num_layers / 32))
        return start, span

    def rate(self, layer: int, num_layers: int) -> float:
        """Kept fraction of V0 for the layers after `layer`."""
        start, span = self.schedule(num_layers)
        return 1.0 if layer < start else max(0.0, 1.0 - (layer - start + 1) / span)

    def prune_layers(self, num_layers: int) -> list[int]:
        start, span = self.schedule(num_layers)
        return [layer for layer in range(start, start + span) if layer <= num_layers - 2]

    def observe(self, layer, attention, view, state) -> None:
        length = attention.query.shape[2]
        rows = torch.arange(length, device=attention.query.device)
        # M [B, H, S, S] in row blocks, each only up to its last attendable key (M is zero beyond)
        blocks = list(attention.probability_chunks(rows, temperature=self.temperature))
        real = view.valid.float().to(rows.device)  # [B, S] uniform start over the sample's real tokens
        d = (real / real.sum(-1, keepdim=True))[:, None].expand(-1, attention.query.shape[1], -1)  # [B, H, S]
        for _ in range(self.iterations):  # d <- d M, block by block: d M = sum_blocks d[rows] M[rows, :horizon]
            step = torch.zeros_like(d)
            for start, horizon, block in blocks:
                part = d[:, :, None, start:start + block.shape[2]]  # [B, H, 1, r]
                step[:, :, :horizon] += torch.matmul(part, block)[:, :, 0]
            d = step
        state["importance"] = d.pow(2).mean(1).sqrt()  # [B, S]

    def select(self, layer, view, state) -> list[torch.Tensor | None]:
        rate = self.rate(layer, view.num_layers)
        return [self.keep_top(state["importance"][row, sample.visual], round(sample.num_visual * rate))
                for row, sample in enumerate(view.samples)]
