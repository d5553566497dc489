"""Connector base: how strategies reach one model family's visual tokens.

A connector finds the visual spans in `input_ids` (from the config's image token id, never hard-coded offsets),
encodes images into per-image token features plus a `VisionProbe` for cheap access to encoder internals, projects
reduced features into the LLM space, and splices them back: placeholders, attention mask and mm_token_type_ids
shrink with the features, and position ids are rebuilt ("reindex" or "preserve"). The reduced inputs are handed to
the stock model as `mm_encoder_outputs`, which transformers' `forward` and `generate` accept, so no model code is
patched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlmeff.kernels import compact, gather_tokens
from vlmeff.layout import TokenLayout
from vlmeff.strategy import (
    ImageTokens,
    NotApplicableError,
    ProbeUnavailableError,
    SelectionRecord,
    TokenReducer,
)


@dataclass(frozen=True)
class ImageSlot:
    """The placeholder span of one image in the LLM sequence."""

    sample: int  # batch row
    start: int  # position of the first placeholder in the (unreduced) row
    length: int  # number of placeholders = visual tokens V of this image
    grid: tuple[int, int, int]  # (t, h, w) token grid, raster order


class VisionProbe:
    """Lazy, cheap access to vision-encoder internals for the images of one batch.

    Methods return per-image tensors over the image's ORIGINAL tokens (before any reduction), in float32.
    Connectors subclass it; a method a tower cannot provide raises `NotApplicableError` naming alternatives.
    """

    def cls_attention(self, image: int, block: int | None = None) -> torch.Tensor:
        """[heads, V]: softmax attention of the [CLS] query over all keys inside encoder block `block` (default: the
        block whose output is the feature layer), patch columns."""
        raise NotApplicableError(
            "this vision tower has no [CLS] token, so [CLS]-attention scores are not defined; use a substitute "
            "score (fastervlm:scorer=global_query, FlowCut's mean-query global token)"
        )

    def cls_attention_one_head(self, image: int, block: int | None = None) -> torch.Tensor:
        """[V]: the [CLS] row as ONE head over the full width (DAMRO's reading of the tower), patch columns."""
        raise NotApplicableError("this vision tower has no [CLS] token, so DAMRO's [CLS]-attention outliers are not "
                                 "defined")

    def keys(self, image: int, block: int | None = None) -> torch.Tensor:
        """[T, H * head_dim]: attention keys of one encoder block (default: the feature block) for all T tokens
        of the image (with [CLS] first when the tower has one), heads concatenated."""
        raise NotApplicableError("this connector does not provide encoder keys")

    def global_query_attention(self, image: int) -> torch.Tensor:
        """[V]: attention of the mean query of the image's patches over its tokens at the feature layer."""
        raise NotApplicableError("this connector does not provide a global-query attention score")


class ReducedVisionProbe(VisionProbe):
    """The probe after a vision-stage reduction: the original tokens' attention at the feature layer was never
    computed (most of them were dropped inside the encoder), so every query raises `ProbeUnavailableError`; the
    wrapper re-raises it naming the strategy that asked ("X cannot follow a vision-stage reduction")."""

    def __init__(self, reducers: str):
        self.reducers = reducers

    def _unavailable(self, *args, **kwargs):
        raise ProbeUnavailableError(
            f"encoder attention scores of the original tokens do not exist after the vision-stage reduction by "
            f"{self.reducers}; put a strategy that needs no encoder attention (e.g. random) "
            "after it, or drop the vision-stage strategy"
        )

    cls_attention = cls_attention_one_head = keys = global_query_attention = _unavailable


def find_runs(is_token: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs of True per row. is_token: [B, S] bool -> [(row, start, length)] in row-major order."""
    padded = torch.nn.functional.pad(is_token.int(), (1, 1))
    edges = padded[:, 1:] - padded[:, :-1]  # +1 at a run start, -1 one past its end
    starts = (edges == 1).nonzero().tolist()
    ends = (edges == -1).nonzero().tolist()
    return [(b, s, e - s) for (b, s), (_, e) in zip(starts, ends)]


def grid_boxes(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """[h * w, 4] boxes (x0, y0, x1, y1), raster order, of the rectilinear grid with column edges xs [w + 1] and row
    edges ys [h + 1] (what `Connector.cell_boxes` returns)."""
    x0, x1 = xs[:-1].expand(len(ys) - 1, -1), xs[1:].expand(len(ys) - 1, -1)  # [h, w]
    y0, y1 = ys[:-1, None].expand_as(x0), ys[1:, None].expand_as(x0)
    return torch.stack([x0, y0, x1, y1], dim=-1).reshape(-1, 4)


def assign_slots(runs: list[tuple[int, int, int]], grids: list[tuple[int, int, int]]) -> list[ImageSlot]:
    """Split placeholder runs into per-image slots, images in row-major order of appearance (as HF scatters them)."""
    slots, image = [], 0
    for row, start, length in runs:
        offset = 0
        while offset < length:
            if image >= len(grids):
                raise ValueError(f"input_ids hold more image placeholders than the {len(grids)} image(s) given")
            t, h, w = grids[image]
            count = t * h * w
            if offset + count > length:
                raise ValueError(
                    f"image {image}: expects {count} placeholder tokens but its span in row {row} has "
                    f"{length - offset}; was the prompt built by the model's processor?"
                )
            slots.append(ImageSlot(row, start + offset, count, grids[image]))
            offset += count
            image += 1
    if image != len(grids):
        raise ValueError(f"{len(grids)} image(s) given but input_ids hold placeholders for {image}")
    return slots


class Connector:
    """Base class; one subclass per model family, registered by name."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    model_classes: ClassVar[tuple[type, ...]] = ()
    # position ids used when a strategy says positions="auto"
    default_positions: ClassVar[str] = "reindex"
    supported_positions: ClassVar[tuple[str, ...]] = ("reindex", "preserve")
    # "1d": one position id per token; "mrope": Qwen2-VL's (t, h, w) ids (strategies that rewrite positions refuse)
    rope: ClassVar[str] = "1d"
    # True when each row's visual tokens are its reduction units' tokens concatenated in unit order (as the base
    # `assemble` splices them); False where the connector re-arranges them (LLaVA-NeXT: crops interleave row by row,
    # tokens over padding are dropped). A strategy pairing unit tokens with positions by concatenation reads it.
    splices_in_unit_order: ClassVar[bool] = True

    def __init__(self, model, processor=None):
        self.model = model
        self.processor = processor
        self.config = model.config

    @classmethod
    def matches(cls, model) -> bool:
        return isinstance(model, cls.model_classes)

    # --- what strategies may ask -------------------------------------------------------------------------------
    @property
    def has_cls(self) -> bool:
        raise NotImplementedError

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    def image_span_ids(self) -> list[int]:
        """Token ids that make up an image in the prompt (what a text-only contrast branch drops): the placeholders,
        and where the family wraps them, the wrapping tokens."""
        ids = [self.image_token_id]
        video = getattr(self, "video_token_id", None)
        return ids if video is None else [*ids, video]

    @property
    def pad_token_id(self) -> int:
        pad = self.config.text_config.pad_token_id
        return 0 if pad is None else pad

    @property
    def attn_implementation(self) -> str:
        return self.config.text_config._attn_implementation

    @property
    def runs_vision_stage(self) -> bool:
        """True when `encode_reduced` can run vision-stage strategies inside this model's encoder. A method with a
        stage to fall back on (FlowCut's LLM stage) reads it to choose where it runs; a connector whose encoder
        cannot be pruned from inside (LLaVA-NeXT) says False."""
        return type(self).encode_reduced is not Connector.encode_reduced

    # --- family specific ---------------------------------------------------------------------------------------
    def image_grids(self, inputs: dict[str, Any]) -> list[tuple[int, int, int]]:
        """(t, h, w) token grid of each image, in order."""
        raise NotImplementedError

    def encoder_layer_tokens(self, slot: ImageSlot, record: SelectionRecord) -> list[int] | None:
        """Sequence length entering each encoder block that ran, when a vision-stage strategy pruned inside the
        encoder (from record.per_layer_kept); None when every block ran on the full sequence."""
        if not record.per_layer_kept:
            return None
        first = self.encoder_tokens(slot)
        prefix = first - slot.length  # [CLS] (and registers) ride along with the patches
        last = max(record.per_layer_kept)
        return [first] + [record.per_layer_kept[b] + prefix for b in range(last)]

    def encoder_tokens(self, slot: ImageSlot) -> int | tuple[int, int, int]:
        """Sequence length inside the vision encoder for this image, or its patch grid (for vlmeff.flops)."""
        raise NotImplementedError

    def encode(self, inputs: dict[str, Any]) -> tuple[list[torch.Tensor], VisionProbe]:
        """Run the vision encoder: per-image token features [V_i, D] in the reduction space, and a probe."""
        raise NotImplementedError

    def encode_reduced(self, inputs: dict[str, Any], strategies: list[TokenReducer]
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[dict[int, int]]]:
        """Run the vision encoder with vision-stage strategies pruning inside it: per-image features [V'_i, D],
        their original grid indices [V'_i] (ascending) and, per image, the token count after each block
        {block: count} (in the units of the grid the indices refer to)."""
        names = ", ".join(s.name for s in strategies)
        raise NotApplicableError(f"{names}: the {self.name} connector cannot run strategies inside its vision encoder")

    def project(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Map per-image reduced features into the LLM embedding space."""
        raise NotImplementedError

    def original_positions(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Position ids of the unreduced sequence: [B, S] (1-D RoPE) or [3, B, S] (M-RoPE)."""
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(inputs["input_ids"])
        return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)

    def finish_positions(self, positions: torch.Tensor, text_positions: torch.Tensor) -> dict[str, Any]:
        """Model kwargs carrying the gathered positions of the reduced sequence."""
        return {"position_ids": positions}

    def passthrough_kwargs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Model kwargs to keep when nothing was reduced (beyond input_ids / attention_mask)."""
        return {}

    def layout(self, model_kwargs: dict[str, Any], images: list[ImageTokens]) -> TokenLayout:
        """The token layout of the spliced LLM input (`assemble`'s output and the tokens that reach the LLM)."""
        ids = [self.image_token_id]
        video = getattr(self, "video_token_id", None)
        if video is not None:
            ids.append(video)
        positions = model_kwargs.get("position_ids")
        layout = TokenLayout.from_splice(model_kwargs["input_ids"], model_kwargs.get("attention_mask"), ids, images,
                                         None if positions is None else self.layout_positions(positions))
        return layout.mark_answer(model_kwargs["input_ids"], self.answer_opener_ids())

    def layout_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """The layout's position ids from the model's `position_ids` kwarg (1-D RoPE: as they are)."""
        return position_ids

    def model_positions(self, layout: TokenLayout) -> torch.Tensor:
        """The model's `position_ids` kwarg for a layout whose positions a strategy rewrote."""
        if layout.position_ids is None or layout.position_ids.dim() != 2:
            raise NotApplicableError(f"the {self.name} connector takes 1-D position ids only")
        return layout.position_ids

    def answer_opener_ids(self) -> list[int] | None:
        """Token ids the chat template puts where the assistant turn opens (the generation prompt, e.g. LLaVA-1.5's
        "ASSISTANT:", Qwen's "<|im_start|>assistant\n"): the ids that `add_generation_prompt=True` adds to a user
        turn. None without a processor or chat template."""
        if getattr(self, "_opener", False) is not False:
            return self._opener
        self._opener = None
        processor = self.processor
        tokenizer = getattr(processor, "tokenizer", processor)
        if processor is None or getattr(processor, "chat_template", None) is None:
            return None
        turn = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
        try:
            plain = processor.apply_chat_template(turn, add_generation_prompt=False)
            opened = processor.apply_chat_template(turn, add_generation_prompt=True)
        except Exception:  # a template that cannot render a bare turn: no opener known
            return None
        a, b = tokenizer(plain, add_special_tokens=False).input_ids, tokenizer(opened, add_special_tokens=False).input_ids
        common = 0
        while common < min(len(a), len(b)) and a[common] == b[common]:
            common += 1
        self._opener = b[common:] or None
        return self._opener

    def control_token_ids(self) -> list[int]:
        """Token ids that never carry the user's words (`PromptText.control`): the image-span ids, the text config's
        bos / eos / pad ids and, with a processor, its tokenizer's special tokens (registered ones and added tokens
        marked special, e.g. Qwen's <|im_start|>, <|vision_end|>)."""
        if getattr(self, "_control", None) is not None:
            return self._control
        ids = set(self.image_span_ids())
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self.config.text_config, name, None)
            ids.update(value if isinstance(value, (list, tuple)) else [] if value is None else [value])
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        if tokenizer is not None:
            ids.update(getattr(tokenizer, "all_special_ids", None) or [])
            added = getattr(tokenizer, "added_tokens_decoder", None) or {}
            ids.update(i for i, token in added.items() if getattr(token, "special", False))
        self._control = sorted(int(i) for i in ids)
        return self._control

    def frame_indices(self, inputs: dict[str, Any], slots: list[ImageSlot]) -> list[int | None]:
        """Per slot: its frame index within a video the model reads natively (Qwen2-VL's temporal patches), or None
        (a still image, or a frame the caller feeds as an image: the wrapper's `frames=` marks those)."""
        return [None] * len(slots)

    def cell_boxes(self, image_size: tuple[int, int], record: SelectionRecord) -> torch.Tensor:
        """[h * w, 4] float64 boxes (x0, y0, x1, y1), raster order, one per cell of the record's (1, h, w) token grid,
        in pixels of the image as the processor received it (`image_size` = (width, height), after
        `vlmeff.images.load_image`): the part of the image each visual token was made from, after the processor's
        resize / crop / pad. Boxes may reach outside the image (padding the processor added). The record, not only
        its grid, is passed so that multi-view families can tell which view it is. Overlays (`vlmeff.viz`) draw
        with them."""
        raise NotApplicableError(f"the {self.name} connector does not map its token grid to image boxes")

    # --- shared mechanics --------------------------------------------------------------------------------------
    def project_images(self, images: list[ImageTokens]) -> list[ImageTokens]:
        """Project the tokens of images not projected yet (batched by the connector's `project`)."""
        todo = [i for i, img in enumerate(images) if not img.projected]
        if not todo:
            return images
        embeds = self.project([images[i].features for i in todo])
        out = list(images)
        for i, emb in zip(todo, embeds):
            images[i].record.projected_tokens = emb.shape[0]
            out[i] = dataclasses.replace(images[i], features=emb, projected=True, vision_features=images[i].features)
        return out

    def slots(self, inputs: dict[str, Any]) -> list[ImageSlot]:
        runs = find_runs(inputs["input_ids"] == self.image_token_id)
        return assign_slots(runs, self.image_grids(inputs))

    def prepare_tokens(self, inputs: dict[str, Any], vision_strategies: list[TokenReducer] | None = None
                       ) -> tuple[list[ImageSlot], list[ImageTokens]]:
        """Encode the images into per-image tokens. With vision-stage strategies the encoder prunes inside itself
        (`encode_reduced`): each image's index then holds the original grid indices of the tokens that survived."""
        slots = self.slots(inputs)
        per_layer: list[dict[int, int]] = [{} for _ in slots]
        if vision_strategies:
            features, indices, per_layer = self.encode_reduced(inputs, vision_strategies)
            probe: VisionProbe = ReducedVisionProbe(", ".join(s.name for s in vision_strategies))
        else:
            features, probe = self.encode(inputs)
            indices = [torch.arange(slot.length, device=f.device) for slot, f in zip(slots, features)]
        images = []
        for i, (slot, feats, index) in enumerate(zip(slots, features, indices)):
            if feats.shape[0] != index.numel() or index.numel() > slot.length:
                raise ValueError(f"image {i}: encoder gave {feats.shape[0]} tokens for {index.numel()} tracked "
                                 f"indices, prompt has {slot.length} placeholders")
            if not vision_strategies and feats.shape[0] != slot.length:
                raise ValueError(f"image {i}: encoder gave {feats.shape[0]} tokens, prompt has {slot.length}")
            record = SelectionRecord(sample=slot.sample, image=i, grid=slot.grid, num_tokens=slot.length,
                                     kept_indices=index, per_layer_kept=dict(per_layer[i]),
                                     strategies=[s.name for s in vision_strategies or []])
            images.append(ImageTokens(features=feats, index=index, probe=probe, image=i, record=record))
        return slots, images

    def assemble(self, inputs: dict[str, Any], slots: list[ImageSlot], images: list[ImageTokens],
                 positions: str) -> dict[str, Any]:
        """Model kwargs for the reduced batch: shrunk input_ids / attention_mask / mm_token_type_ids, position ids
        and the reduced image features as `mm_encoder_outputs`.

        Within each image span the first n_kept placeholders are kept (features are scattered in sequence order);
        their position ids come from the ORIGINAL ids of the kept grid indices ("preserve") or are contiguous
        ("reindex"). The batch is re-padded on the left, as decoder-only generation needs.
        """
        if positions not in self.supported_positions:
            raise NotApplicableError(
                f"positions={positions!r} is not supported by the {self.name} connector; "
                f"supported: {', '.join(self.supported_positions)}"
            )
        input_ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask
        embeds = [img.features for img in self.project_images(images)]
        mm = {"image": BaseModelOutputWithPooling(pooler_output=tuple(embeds))}
        reduced = any(img.features.shape[0] != slot.length for img, slot in zip(images, slots))
        if not reduced:  # nothing removed: hand the model its own inputs (exactly the unwrapped computation)
            return {"input_ids": input_ids, "attention_mask": mask, "mm_encoder_outputs": mm,
                    **self.passthrough_kwargs(inputs)}

        keep = mask.bool().clone()  # [B, S]
        src_positions = self.original_positions(inputs).clone()  # [B, S] or [3, B, S]
        orig_positions = src_positions.clone()
        for slot, img in zip(slots, images):
            n_kept = img.features.shape[0]
            real = img.index[img.index >= 0]
            n_extra = n_kept - real.numel()
            span = slice(slot.start, slot.start + n_kept)
            keep[slot.sample, slot.start + n_kept: slot.start + slot.length] = False
            first = orig_positions[..., slot.sample, slot.start]
            if n_extra and src_positions.dim() == 3:
                raise NotApplicableError("merged (synthetic) tokens have no M-RoPE position on this connector")
            # real tokens: original ids of their grid cells; extra (merged) tokens continue after the last kept one
            offsets = torch.cat([real, real.max(0, keepdim=True).values + 1 + torch.arange(n_extra, device=real.device)]
                                if n_extra else [real])
            src_positions[..., slot.sample, span] = orig_positions[..., slot.sample, slot.start + offsets] \
                if src_positions.dim() == 3 else first + offsets
        idx = compact(keep, pad_side="left")  # index [B, S'] of kept positions, -1 for pads
        out = {
            "input_ids": gather_tokens(input_ids, idx.index, fill_value=self.pad_token_id),
            "attention_mask": idx.attention_mask.to(mask.dtype),
            "mm_encoder_outputs": mm,
        }
        if "mm_token_type_ids" in inputs:
            out["mm_token_type_ids"] = gather_tokens(inputs["mm_token_type_ids"], idx.index, fill_value=0)
        if positions == "preserve":
            if src_positions.dim() == 3:
                gathered = torch.stack([gather_tokens(p, idx.index, fill_value=0) for p in src_positions])
            else:
                gathered = gather_tokens(src_positions, idx.index, fill_value=0)
            out.update(self.finish_positions(gathered, idx.position_ids))
        return out
