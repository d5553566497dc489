"""The token layout: what each position of the LLM input is, per batch row, and its position ids.

Created by the splice (`TokenLayout.from_splice`, from the reduced `input_ids` and the per-image tokens that reach
the LLM) and updated by every compaction inside the LLM (`gather`). It is the single source that masks (index
predicates composed with transformers' `masking_utils`), positions, FLOP counts and selection records are derived
from: nothing downstream re-reads `input_ids` to find the images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.masking_utils import and_masks, causal_mask_function, or_masks, sdpa_mask

from vlmeff.kernels import gather_tokens

TEXT, IMAGE, PAD = 0, 1, -1

# transformers' index predicate: (batch [B,1,1,1], head, q [1,1,Q,1], kv [1,1,1,K]) index tensors -> bool
MaskFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TokenLayout:
    """Per position of the current sequence ([B, S] each): kind (TEXT / IMAGE / PAD), the batch image it belongs to
    and its cell in that image's grid (-1 for text and padding), its index in the LLM input (`source`, -1 = pad), and
    the position ids ([B, S], or [3, B, S] for M-RoPE; None = the model's default, contiguous over real tokens)."""

    kind: torch.Tensor
    image: torch.Tensor
    cell: torch.Tensor
    source: torch.Tensor
    grids: list[tuple[int, int, int]]  # (t, h, w) per batch image
    position_ids: torch.Tensor | None = None
    # [B, S] bool: the first token of the assistant turn's opener (the chat template's generation prompt), at most
    # one per row; None when the connector knows no opener
    opens_answer: torch.Tensor | None = None

    @classmethod
    def from_splice(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_ids,
                    images: list, position_ids: torch.Tensor | None = None) -> TokenLayout:
        """The layout of a spliced LLM input: placeholders (`image_token_ids`: one id or several, e.g. image and
        video) take the tokens of `images` (each with `.index` (grid cells) and `.record.sample`) in sequence order."""
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        ids = torch.as_tensor(list(image_token_ids) if not isinstance(image_token_ids, int) else [image_token_ids],
                              device=input_ids.device)
        visual = torch.isin(input_ids, ids) & valid
        kind = torch.full_like(input_ids, TEXT).masked_fill(visual, IMAGE).masked_fill(~valid, PAD)
        cell = torch.full_like(input_ids, -1)
        image = torch.full_like(input_ids, -1)
        for row in range(input_ids.shape[0]):
            mine = [(i, img) for i, img in enumerate(images) if img.record.sample == row]
            positions = visual[row].nonzero().squeeze(1)
            if not mine:
                if positions.numel():
                    raise ValueError(f"row {row}: {positions.numel()} image placeholders but no image tokens")
                continue
            cells = torch.cat([img.index for _, img in mine]).to(input_ids.device)
            owner = torch.cat([torch.full((img.index.numel(),), i, device=input_ids.device) for i, img in mine])
            if cells.numel() != positions.numel():
                raise ValueError(f"row {row}: {positions.numel()} image placeholders for {cells.numel()} tokens")
            cell[row, positions] = cells
            image[row, positions] = owner
        source = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids).masked_fill(~valid, -1)
        return cls(kind, image, cell, source, [img.record.grid for img in images], position_ids)

    def mark_answer(self, input_ids: torch.Tensor, opener: list[int] | None) -> TokenLayout:
        """Mark, per row, the first token of the LAST occurrence of the `opener` id sequence among real tokens."""
        if not opener:
            return self
        n = len(opener)
        marks = torch.zeros_like(self.kind, dtype=torch.bool)
        if input_ids.shape[1] >= n:
            windows = input_ids.unfold(1, n, 1)  # [B, S - n + 1, n]
            hits = (windows == torch.as_tensor(opener, device=input_ids.device)).all(-1) & self.valid[:, : windows.shape[1]]
            last = torch.where(hits.any(1), hits.shape[1] - 1 - hits.flip(1).long().argmax(1), -1)  # [B]
            rows = (last >= 0).nonzero().squeeze(1)
            marks[rows, last[rows]] = True
        return dataclasses.replace(self, opens_answer=marks)

    # --- derived views ------------------------------------------------------------------------------------------
    @property
    def valid(self) -> torch.Tensor:
        """[B, S] bool: real (not padding) tokens."""
        return self.kind != PAD

    @property
    def visual(self) -> torch.Tensor:
        """[B, S] bool: visual tokens."""
        return self.kind == IMAGE

    @staticmethod
    def over_keys(mask: torch.Tensor, num_keys: int) -> torch.Tensor:
        """A [B, S] per-position mask extended with False to `num_keys` keys (decode: the generated tokens)."""
        extra = num_keys - mask.shape[1]
        return torch.nn.functional.pad(mask, (0, extra), value=False) if extra > 0 else mask

    def counts(self) -> tuple[list[int], list[int]]:
        """Per row: real tokens and visual tokens (one host sync)."""
        return self.valid.sum(1).tolist(), self.visual.sum(1).tolist()

    def gather(self, index: torch.Tensor) -> TokenLayout:
        """The layout after a compaction: `index` [B, S'] positions into this sequence, -1 = new padding."""
        real = index >= 0

        def take(x: torch.Tensor, fill: int) -> torch.Tensor:
            return gather_tokens(x, index, fill_value=fill).masked_fill(~real, fill)

        positions = None
        if self.position_ids is not None:
            if self.position_ids.dim() == 3:
                positions = torch.stack([take(p, 0) for p in self.position_ids])
            else:
                positions = take(self.position_ids, 0)
        opens = None if self.opens_answer is None else take(self.opens_answer.long(), 0).bool()
        return TokenLayout(take(self.kind, PAD), take(self.image, -1), take(self.cell, -1), take(self.source, -1),
                           self.grids, positions, opens)

    def default_positions(self) -> torch.Tensor:
        """[B, S] 1-D positions: explicit ones (M-RoPE: the text row) or contiguous over real tokens (what generate
        computes from the 2-D mask)."""
        if self.position_ids is not None:
            return self.position_ids if self.position_ids.dim() == 2 else self.position_ids[0]
        return (self.valid.long().cumsum(-1) - 1).clamp(min=0).masked_fill(~self.valid, 0)

    # --- masks ----------------------------------------------------------------------------------------------------
    def prefill_mask(self, or_functions: list[MaskFunction] = (), and_functions: list[MaskFunction] = ()
                     ) -> torch.Tensor | None:
        """[B, 1, S, S] bool prefill mask: (causal OR any of `or_functions`) AND all `and_functions` AND real keys;
        padding rows attend to themselves (finite, never read). None when that is plain causal without padding."""
        valid = self.valid
        if not or_functions and not and_functions and bool(valid.all()):
            return None
        function = or_masks(causal_mask_function, *or_functions) if or_functions else causal_mask_function
        if and_functions:
            function = and_masks(function, *and_functions)
        num = valid.shape[1]
        mask = sdpa_mask(batch_size=valid.shape[0], q_length=num, kv_length=num, mask_function=function,
                         attention_mask=valid, allow_is_causal_skip=False, device=valid.device)
        pad_rows = torch.eye(num, dtype=torch.bool, device=valid.device)[None] & ~valid[:, :, None]
        return mask | pad_rows[:, None]
