"""Attention rows recomputed from captured vision-encoder inputs: the shared math behind connectors' probes and
the strategies that score with them (one place; no strategy imports a connector for it).

Scores are float32 softmax rows; only the rows a method needs are computed (docs/methods.md, "Shared rules").
"""

from __future__ import annotations

import torch


def cls_attention_row(q_cls: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Softmax attention of the [CLS] query over all keys, per head, in float32.

    q_cls: [I, 1, H*hd], keys: [I, T, H*hd] -> [I, H, T] (column 0 is the [CLS] key itself).
    """
    num_images, num_keys, width = keys.shape
    head_dim = width // num_heads
    q = q_cls.float().view(num_images, 1, num_heads, head_dim).transpose(1, 2)  # [I, H, 1, hd]
    k = keys.float().view(num_images, num_keys, num_heads, head_dim).transpose(1, 2)  # [I, H, T, hd]
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)[:, :, 0]  # [I, H, T]


def global_query_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """FlowCut's "global token" row: softmax attention of the mean query of one image's patches over its patches.

    q, k: [n, H, hd] (one image) -> [n], mean over heads.
    """
    q_global = q.mean(0)  # [H, hd]
    return torch.softmax(torch.einsum("hd,nhd->hn", q_global, k) * scale, dim=-1).mean(0)


def cls_attention_one_head(q_cls: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """DAMRO's [CLS] row: ONE softmax over the full width (all heads' q / k concatenated), scale 1 / sqrt(width).

    q_cls: [I, 1, W], keys: [I, T, W] -> [I, T] float32 (column 0 is the [CLS] key itself).
    """
    width = keys.shape[-1]
    scores = torch.einsum("iw,itw->it", q_cls[:, 0].float(), keys.float()) / width ** 0.5
    return torch.softmax(scores, dim=-1)
