"""NAAViT (No Attention Among Visual Tokens; SAISA paper, arXiv 2502.02458, docs/methods.md "4. Attention masks, positions and scores").

EXPERIMENTAL: the paper trains the model with this mask; vlmeff applies it training-free to a causally trained model.

Prefill mask: causal, except that a visual query may not attend the other visual tokens of its own image (the
diagonal stays, so every softmax is defined). Text rows are unchanged; decode steps are plain causal. With several
images per prompt the rule holds within each image (a token of a later image still sees an earlier image). A dense
mask executes the same attention FLOPs: no saving (the FLOP-saving form is the SAISA layer).
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmeff.registry import register_strategy
from vlmeff.strategy import AttentionStrategy


@register_strategy
@dataclass
class NAAViT(AttentionStrategy):
    """Visual tokens attend only to text before them and to themselves (prefill mask; no FLOP saving)."""

    name = "naavit"
    summary = "attention: no attention among visual tokens of an image (diagonal kept); EXPERIMENTAL (paper trains)"
    paper = "arXiv 2502.02458"
    training_free = False
    experimental = True

    def mask_functions(self, layout, state):
        visual, image = layout.visual, layout.image

        def no_visual_to_visual(batch, head, q, kv):
            return ~(visual[batch, q] & visual[batch, kv] & (image[batch, q] == image[batch, kv]) & (q != kv))

        return [], [no_visual_to_visual]
