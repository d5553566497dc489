"""CDPruner: instruction-conditioned diversity by a DPP's greedy MAP (arXiv 2506.10967, NeurIPS 2025; official code
Theia-4869/CDPruner; docs/methods.md "CDPruner").

Per image with V projected tokens x_i (LLM input space, float32), at budget k:
    sim[i, j] = cos(x_i, x_j)
    rel_i     = mean over the text embeddings t_m of ( s cos(e_i, t_m) )       (s = -1: the released code's sign, the
                default with text_encoder; s = +1: the paper's written sign, the default of the substitute; `negate`)
    r         = (rel - min(rel) + 1e-6) / (max(rel) - min(rel))                 (min-max over the image's tokens)
    L         = diag(r) sim diag(r)
and the fast greedy MAP of the DPP with kernel L (Chen et al. 2018, `dpp_order`): g = diag(L); for t = 0..k-1:
j = argmax g over unpicked tokens (ties: lowest index), e = (L[j] - sum_{s<t} c_s[j] c_s) / sqrt(g[j]), c_t = e,
g -= e^2. g_i is then det(L_{S+i}) / det(L_S), so each pick maximises the log-determinant gain. Kept tokens reach the
LLM in raster order.

The text side (`relevance`), two paths:
- text_encoder=<CLIPModel folder or hub id> (the paper's): e_i = visual_projection(post_layernorm(v_i)) of the
  tokens' vision features v_i (the tower's feature layer, [CLS] dropped, before LLaVA's projector), t_m = CLIP text
  embeddings (text_projection of the pooled output) of the instruction, tokenised by the CLIP model's tokenizer
  with its specials, zero-padded to a multiple of the text model's max_position_embeddings (77) and cut into
  segments of that length, one embedding per segment. Needs a CLIP vision tower whose features the CLIPModel's
  post_layernorm / visual_projection accept (LLaVA-1.5 with openai/clip-vit-large-patch14-336) and the processor.
- default (vlmeff's substitute, works on every model): e_i = x_i, the projected token itself, and t_m = the LLM's
  input embedding (embed_tokens) of each instruction token. HF's LLaVA carries no CLIP text tower, the reference
  model's tower is DINOv2 and Qwen2-VL's has no text counterpart, so the paper's relevance is not available in
  general. It is not CDPruner's published method, and it uses the paper's written sign (`negate` unset = false
  here, see below).

The instruction (what is read from the prompt, `PromptText.instruction`): the user's text of the turn that holds
the sample's images, i.e. the tokens after the last image placeholder up to the first control token or the assistant
opener (when the text precedes the images: the text run just before the first placeholder). With a tokenizer (a
processor was given) it is decoded without specials, a trailing answer-format instruction of the reference's
evaluation scripts (`ANSWER_SUFFIXES`) is removed (`strip_suffix`, as the reference strips them before the CLIP text
tower), whitespace is trimmed, and the text is re-encoded without specials; without one, its prompt ids are used.
Every image of a sample gets its sample's instruction; each sample of a batch its own. An empty instruction gives
r = 1 for every token (the DPP on similarity alone).

Deviations from the released code (llava/model/llava_arch.py `encode_images`, clip_encoder.py):
- the relevance is the NEGATED similarity in the released code (the least instruction-like tokens score highest);
  it produced the published numbers, so the CLIP path keeps it (`negate` unset = true there). The authors describe
  it as a phenomenon they saw with CLIP only (issues #9, #14), and on vlmeff's reference model the negated
  substitute collapses (POPE mean F1 11.3 at 32 of 256 tokens, 3 % "yes", against 62.4 with the written sign,
  64.3 for divprune, 33.0 for random, 83.0 unpruned; 300 questions), so the substitute's default is the written sign
  (`negate` unset = false there); `negate=true` / `false` sets either path explicitly;
- min-max per image (per reduction unit: a view on LLaVA-NeXT's per_view budget) instead of over the whole batch,
  so that a sample's selection does not depend on the other samples (batch == one by one); for a single image on
  LLaVA-1.5 this is the reference's rule; on LLaVA-NeXT the reference normalises over all views of the batch;
- max(rel) == min(rel) (constant relevance, e.g. no instruction) gives r = 1 where the released code divides by 0;
- a numerically exhausted kernel (g[j] <= 0 at a pick, only when k exceeds L's rank) adds no update (e = 0) where
  the released code takes sqrt of a negative number and continues with NaN;
- the CLIP path uses the text_encoder's own post_layernorm (the released code: the LLaVA tower's, the same weights
  for LLaVA-1.5, whose tower is that CLIP model frozen); everything in float32;
- the reference's batch > 1 path (4-D, NeXT) is not reproduced: vlmeff runs each image alone; LLaVA-NeXT runs per
  view with k per view (the reference's visual_token_num per view), newlines always kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from vlmeff.registry import register_strategy
from vlmeff.strategy import BudgetReducer, ImageTokens, NotApplicableError, PromptText, Stage, StrategyError

# answer-format instructions the reference's evaluation scripts remove before the CLIP text tower
ANSWER_SUFFIXES = ("\nAnswer the question using a single word or phrase.",
                   "\nAnswer with the option's letter from the given choices directly.")
EPS = 1e-6  # the released code's min-max offset


def cosine_similarity(features: torch.Tensor) -> torch.Tensor:
    """[V, D] -> [V, V] float32 cosine similarities."""
    unit = F.normalize(features.float(), dim=-1)
    return unit @ unit.T


def minmax(rel: torch.Tensor) -> torch.Tensor:
    """(rel - min + 1e-6) / (max - min) over the last axis; 1 everywhere when max == min."""
    low, high = rel.min(-1, keepdim=True).values, rel.max(-1, keepdim=True).values
    span = high - low
    return torch.where(span > 0, (rel - low + EPS) / span.clamp_min(torch.finfo(rel.dtype).tiny), torch.ones_like(rel))


def relevance_from(image_embeds: torch.Tensor, text_embeds: torch.Tensor, negate: bool) -> torch.Tensor:
    """[V, C], [M, C] -> [V]: min-max of the mean over m of (-)cos(e_i, t_m); r = 1 when M == 0."""
    if text_embeds.shape[0] == 0:
        return image_embeds.new_ones(image_embeds.shape[0], dtype=torch.float32)
    cos = F.normalize(image_embeds.float(), dim=-1) @ F.normalize(text_embeds.float(), dim=-1).T  # [V, M]
    return minmax((-cos if negate else cos).mean(-1))


def dpp_order(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """The first k picks [k] of the fast greedy MAP of a DPP with kernel [V, V] (float32, symmetric PSD), in pick
    order; see the module docstring. k sequential steps of a few O(k V) tensor operations each (launch-bound on a
    GPU)."""
    gain = torch.diagonal(kernel).clone()  # g_i = det(L_{S+i}) / det(L_S), S empty; -inf marks a picked token
    rows = kernel.new_zeros(k, kernel.shape[0])  # c_t: the incremental Cholesky rows (zero until written)
    picks = []
    for t in range(k):
        j = torch.argmax(gain)  # first maximum: lowest index on ties
        picks.append(j)
        scale = torch.nan_to_num(gain[j].rsqrt(), nan=0.0, posinf=0.0)  # g <= 0 (exhausted kernel): no update
        e = torch.addmv(kernel[j], rows.T, rows[:, j], alpha=-1) * scale  # (L[j] - sum_s c_s[j] c_s) / sqrt(g_j)
        rows[t] = e
        gain = torch.addcmul(gain, e, e, value=-1)
        gain[j] = float("-inf")
    return torch.stack(picks)


def instruction_ids(prompt: PromptText, strip_suffix: bool) -> tuple[torch.Tensor, str | None]:
    """(ids [n], text) of a sample's instruction (`PromptText.instruction`). With a tokenizer: its text, decoded
    without specials, the reference's answer-format suffix removed (`strip_suffix`), surrounding whitespace trimmed,
    and the ids of that text re-encoded without specials. Without a tokenizer: the prompt's ids as they are, no text."""
    ids = prompt.input_ids[prompt.instruction()]
    if prompt.tokenizer is None:
        return ids, None
    text = prompt.tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()
    if strip_suffix:
        for suffix in ANSWER_SUFFIXES:
            if text.endswith(suffix.strip()):
                text = text[: -len(suffix.strip())].strip()
                break
    encoded = prompt.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    return torch.tensor(encoded, dtype=ids.dtype, device=ids.device), text


@dataclass
class ClipParts:
    """What the CLIP path reads from a CLIPModel: its text tower and projections, its tokenizer."""

    model: Any
    tokenizer: Any

    def image_embeds(self, vision_features: torch.Tensor) -> torch.Tensor:
        """[V, D_vis] feature-layer patch features -> [V, C]: visual_projection(post_layernorm(v))."""
        model = self.model.to(vision_features.device)
        return model.visual_projection(model.vision_model.post_layernorm(vision_features.float()))

    def text_embeds(self, text: str, device: torch.device) -> torch.Tensor:
        """[M, C]: one CLIP text embedding per max_position_embeddings-token segment of the tokenised text."""
        model = self.model.to(device)
        tokens = self.tokenizer(text=[text], return_tensors="pt")
        span = model.config.text_config.max_position_embeddings
        ids = tokens["input_ids"]
        mask = tokens.get("attention_mask", torch.ones_like(ids))
        pad = -ids.shape[1] % span
        ids = F.pad(ids, (0, pad)).reshape(-1, span).to(device)  # zeros, as the released code pads
        mask = F.pad(mask, (0, pad)).reshape(-1, span).to(device)
        pooled = model.text_model(input_ids=ids, attention_mask=mask).pooler_output
        return model.text_projection(pooled)


@register_strategy
@dataclass
class CDPruner(BudgetReducer):
    """Keep k projected tokens per image by the greedy MAP of a DPP whose kernel weighs token similarity by the
    tokens' relevance to the instruction.

    text_encoder: a CLIPModel (folder or hub id, with its tokenizer) for the paper's CLIP relevance (LLaVA with the
    matching CLIP tower); None (default) uses vlmeff's substitute on every model: the LLM's input embeddings of the
    instruction tokens against the projected tokens. negate: relevance = -cos (the released code's sign) or +cos;
    unset: true with text_encoder (the released code), false for the substitute (the paper's written sign).
    strip_suffix: remove the reference's answer-format instruction from the text (needs the processor).
    """

    name = "cdpruner"
    stage = Stage.PRE_LLM
    summary = "conditional DPP: diverse tokens weighted by instruction relevance (keep/ratio; text_encoder=CLIP)"
    paper = "arXiv 2506.10967"
    token_space = "llm"

    text_encoder: str | None = None
    negate: bool | None = None
    strip_suffix: bool = True
    _clip: ClipParts | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        if self.text_encoder is not None and not self.text_encoder.strip():
            raise StrategyError(f"cdpruner.text_encoder={self.text_encoder!r}: expected a CLIPModel folder or hub id "
                                "(or leave it unset for the LLM-embedding relevance)")

    def check_applicable(self, connector) -> None:
        if self.text_encoder is None:
            return
        vision = connector.config.vision_config
        if getattr(vision, "model_type", None) != "clip_vision_model":
            raise NotApplicableError(
                f"cdpruner:text_encoder needs a CLIP vision tower (its features go through the CLIPModel's "
                f"post_layernorm and visual_projection), and the {connector.name} model's tower is "
                f"{getattr(vision, 'model_type', type(vision).__name__)!r}; leave text_encoder unset for vlmeff's "
                "LLM-embedding relevance")
        if connector.processor is None:
            raise NotApplicableError("cdpruner:text_encoder needs the processor (its tokenizer turns the prompt back "
                                     "into text for CLIP's tokenizer): vlmeff.wrap(model, processor, spec)")
        clip = self.clip()
        width = clip.model.config.vision_config.hidden_size
        if width != vision.hidden_size:
            raise NotApplicableError(
                f"cdpruner.text_encoder={self.text_encoder!r}: its vision width {width} differs from the tower's "
                f"{vision.hidden_size}; give the CLIPModel whose vision model is the LLaVA tower")

    def clip(self) -> ClipParts:
        """The CLIPModel and tokenizer at `text_encoder`, loaded once per strategy (float32, eval mode)."""
        if self._clip is None:
            from transformers import AutoTokenizer, CLIPModel

            try:
                model = CLIPModel.from_pretrained(self.text_encoder, dtype=torch.float32).eval()
                tokenizer = AutoTokenizer.from_pretrained(self.text_encoder)
            except (OSError, ValueError) as e:
                raise NotApplicableError(f"cdpruner.text_encoder={self.text_encoder!r}: cannot load a CLIPModel and "
                                         f"its tokenizer there ({e})") from None
            self._clip = ClipParts(model, tokenizer)
        return self._clip

    def relevance(self, image: ImageTokens) -> torch.Tensor:
        """[V] float32 relevance r of the image's current tokens to its sample's instruction (min-max normalised)."""
        prompt = image.prompt
        if prompt is None:
            raise StrategyError("cdpruner reads the instruction from the prompt; run it through vlmeff.wrap, which "
                                "gives every image its sample's PromptText")
        ids, text = instruction_ids(prompt, self.strip_suffix)
        if self.text_encoder is None:
            with torch.no_grad():
                text_embeds = prompt.embed(ids.to(prompt.input_ids.device)) if ids.numel() else image.features[:0]
            negate = False if self.negate is None else self.negate
            return relevance_from(image.features, text_embeds.to(image.features.device), negate)
        vision = image.vision_features
        if vision is None or vision.shape[0] != image.features.shape[0]:
            raise NotApplicableError("cdpruner:text_encoder needs the tokens' vision features (before the projector); "
                                     "a strategy before it replaced the projected tokens without them")
        if not text:
            return torch.ones(vision.shape[0], dtype=torch.float32, device=vision.device)
        clip = self.clip()
        negate = True if self.negate is None else self.negate
        with torch.no_grad():
            return relevance_from(clip.image_embeds(vision), clip.text_embeds(text, vision.device), negate)

    def reduce_image(self, image: ImageTokens, k: int, position: int) -> ImageTokens:
        r = self.relevance(image).to(image.features.device)
        kernel = r[:, None] * cosine_similarity(image.features) * r[None, :]
        return image.keep(dpp_order(kernel, k).sort().values)  # raster order
