"""Modality-mutual attention (MMA, from AKI, arXiv 2503.02597; docs/methods.md "4. Attention masks, positions and scores").

EXPERIMENTAL: the paper trains with this mask; vlmeff applies it training-free to a causally trained model.

Prefill mask: causal OR (query is a visual token AND key is a text token after it, up to and including the token
that opens the assistant turn), as the reference code lets image rows see that token too. The opener is what the
chat template's generation prompt adds (LLaVA-1.5: the first token of "ASSISTANT:"; Qwen2-VL and SmolLM2: the
<|im_start|> of the assistant turn), found by the connector from the processor's template; its last occurrence in a
row counts. A row without it keeps plain causal attention. Padding is never attended. Decode steps are plain causal.
No FLOP saving (dense mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmeff.layout import TEXT
from vlmeff.registry import register_strategy
from vlmeff.strategy import AttentionStrategy


@register_strategy
@dataclass
class MMA(AttentionStrategy):
    """Image tokens also attend the question after them (through the assistant-turn opener); prefill mask."""

    name = "mma"
    summary = "attention: image rows also see the question up to the assistant opener; EXPERIMENTAL (paper trains)"
    paper = "arXiv 2503.02597"
    training_free = False
    experimental = True

    def mask_functions(self, layout, state):
        if layout.opens_answer is None or not bool(layout.opens_answer.any()):
            return [], []  # no assistant turn known: plain causal
        visual, text = layout.visual, layout.kind == TEXT
        opens = layout.opens_answer
        end = torch.where(opens.any(1), opens.long().argmax(1), -1)  # [B] position of the opener, -1 none

        def image_sees_question(batch, head, q, kv):
            return visual[batch, q] & text[batch, kv] & (kv > q) & (kv <= end[batch])

        return [image_sees_question], []
