"""Concentric causal attention (CCA, arXiv 2410.15926; docs/methods.md "4. Attention masks, positions and scores").

EXPERIMENTAL: the paper trains with these positions and this mask; vlmeff applies them training-free.

For a visual token at grid cell (r, c) of an H x W grid, ring = min(r, c, H-1-r, W-1-c) (0 = outermost).
Positions: text before the image as usual; the visual token gets s + ring (s = the position the image starts at; the
token order in the sequence is unchanged); the text after the image continues at s + R, R = ceil(min(H, W) / 2) rings
(for 24 x 24: default - (576 - 12), the paper's shift). Generated tokens continue from the last prompt position, so
decode keeps the same constant delta. With several images each one is folded to its R ring positions in turn. After
a reduction the kept cells keep their own rings (s + ring of their cell) and the text after still starts at s + R.
Mask (prefill, within each image's visual block): query i may attend key j iff ring(j) <= ring(i) (a ring sees itself
both ways and every outer ring); everything else causal. Decode steps are plain causal.
Grid-only: refused on M-RoPE models (Qwen2-VL), whose (t, h, w) position ids have no single ring position to move.
No FLOP saving (dense mask).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from vlmeff.layout import IMAGE, TEXT
from vlmeff.registry import register_strategy
from vlmeff.strategy import AttentionStrategy, NotApplicableError


def rings(cells: torch.Tensor, images: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
    """Ring of each token (-1 where images < 0): min(r, c, h-1-r, w-1-c) of its cell in its image's grid."""
    if not grids:
        return torch.full_like(cells, -1)
    hw = torch.tensor([(h, w) for _, h, w in grids], device=cells.device)  # [I, 2]
    safe = images.clamp(min=0)
    h, w = hw[safe, 0], hw[safe, 1]
    within = cells.clamp(min=0) % (h * w)
    r, c = within // w, within % w
    ring = torch.minimum(torch.minimum(r, c), torch.minimum(h - 1 - r, w - 1 - c))
    return ring.masked_fill(images < 0, -1)


@register_strategy
@dataclass
class CCA(AttentionStrategy):
    """Concentric ring positions and ring-causal mask for the visual tokens (LLaVA grids)."""

    name = "cca"
    summary = "attention: concentric ring positions + ring-causal visual mask; EXPERIMENTAL (paper trains)"
    paper = "arXiv 2410.15926"
    training_free = False
    experimental = True

    def check_applicable(self, connector) -> None:
        if connector.rope != "1d":
            raise NotApplicableError(f"cca: the {connector.name} connector uses M-RoPE (t, h, w) position ids, which "
                                     "have no single ring position; cca runs on 1-D RoPE models (LLaVA)")

    def positions(self, layout):
        ring = rings(layout.cell, layout.image, layout.grids)
        num_rings = torch.tensor([-(-min(h, w) // 2) for _, h, w in layout.grids] or [0], device=ring.device)
        kind, image = layout.kind, layout.image
        # last token of each image run in the row carries the image's R positions; text advances by 1
        nxt = torch.nn.functional.pad(image[:, 1:], (0, 1), value=-1)
        last_of_image = (kind == IMAGE) & (nxt != image)
        advance = (kind == TEXT).long() + last_of_image.long() * num_rings[image.clamp(min=0)]
        start = advance.cumsum(1) - advance  # position at which each token's run starts
        # visual tokens sit at the start of their image (the advance of earlier tokens of the same image is 0)
        positions = start + ring.clamp(min=0) * (kind == IMAGE)
        return dataclasses.replace(layout, position_ids=positions.masked_fill(~layout.valid, 0))

    def mask_functions(self, layout, state):
        ring, visual, image = rings(layout.cell, layout.image, layout.grids), layout.visual, layout.image

        def block(batch, q, kv):
            return visual[batch, q] & visual[batch, kv] & (image[batch, q] == image[batch, kv])

        def outer_or_same_ring(batch, head, q, kv):  # adds the later tokens of outer rings
            return block(batch, q, kv) & (ring[batch, kv] <= ring[batch, q])

        def no_inner_ring(batch, head, q, kv):  # removes the earlier tokens of inner rings
            return ~(block(batch, q, kv) & (ring[batch, kv] > ring[batch, q]))

        return [outer_or_same_ring], [no_inner_ring]
