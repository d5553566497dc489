"""AIM, merge half: iterative bipartite token merging before the LLM (arXiv 2412.03248; docs/methods.md "AIM").

One iteration over the current sequence of N tokens (raster order of their representatives):
1. split alternately: A = even positions 0, 2, 4, ... (sources), B = odd positions 1, 3, 5, ... (destinations);
2. cosine similarity between every A and every B token on the metric; each A token picks its most similar B token
   (ties: the lowest B position);
3. merge: a B token becomes the plain mean of itself and every A token that picked it (no size weighting, so over
   several iterations the means nest: mean(mean(...), mean(...)), as in the reference);
4. output = the B tokens (plus any A token left unmerged) in sequence order.
At most min(|A|, |B|) = N // 2 A tokens merge per iteration, as in the reference's ``r = min(r, t // 2)``. For odd N,
A holds one token more than B, so the A token with the lowest best-match similarity (ties: the later one) stays
unmerged at its own raster position and ceil(N / 2) tokens remain. I iterations keep about (1/2)^I of the tokens
(576 -> 288 -> 144 -> 72 for the LLaVA-1.5 default I = 3).

Metric. ``metric="keys"`` (default; the reference's image rule): attention keys of the vision encoder's LAST block
(k_proj(ln1(input of that block)), heads concatenated, [CLS] dropped), merged alongside the features with the same
assignment so that later iterations compare merged keys. ``metric="features"`` (the reference's video rule): the
tokens themselves. Towers without a keys API (Qwen2-VL) need ``metric=features``. Video
frames (``ImageTokens.frame`` set) default to ``metric="features"`` and I = 2 when the user left them unset (see
the class docstring).

Space. The reference for LLaVA-1.5 (LaVi-Lab/AIM, LLaVA-PruMerge/.../clip_encoder.py) merges inside the CLIP tower's
forward, i.e. the feature-layer (-2) vision features BEFORE the mm projector; encode_images projects the merged
tokens afterwards. So ``token_space = "vision"``: merged tokens are projected, and only they cost projector FLOPs.
(On Qwen2-VL the connector's tokens are already the PatchMerger output, the LLM space.)

Deviations from the reference code, stated:
- Partial iterations (fewer than N // 2 merges, only with ``keep`` / ``ratio``): the reference emits the unmerged A
  tokens first, in descending-similarity order, then the B tokens; vlmeff keeps raster order (unmerged A tokens stay
  where they were). The same holds for the one unmerged A token of an odd-length full iteration.
- Ties (equal similarities) are broken deterministically (lowest B position; merge order by (-similarity, A
  position)); the reference uses unstable max / argsort.
- Means are computed in float32 (cast back to the features' dtype); the reference merges in the model dtype.
- Optional budgets: ``keep`` (tokens per image) or ``ratio`` (kept fraction, k = round(V * ratio)) instead of
  ``iterations``: full iterations while the result stays >= k, then one partial iteration that merges only the
  (N - k) A tokens with the highest best-match similarity, so that exactly k tokens remain.

Record. ``index`` / ``kept_indices`` = the original grid index of each output token's representative (the surviving B
token, or an unmerged A token), ascending; no extra tokens. ``merge_groups[j]`` = the original indices folded into
output token j (ascending), so the groups partition the tokens that reached AIM. Position ids of a merged token are
its representative's ("preserve") or contiguous ("reindex", the default on LLaVA).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vlmeff.registry import register_strategy
from vlmeff.strategy import Budget, ImageTokens, NotApplicableError, Stage, StrategyError, TokenReducer

METRICS = ("keys", "features")
DEFAULT_ITERATIONS = 3
VIDEO_ITERATIONS = 2  # the reference's default for video frames (docs/methods.md "AIM")


def merge_schedule(num_tokens: int, iterations: int | None = None, keep: int | None = None) -> list[int]:
    """Number of A tokens merged at each iteration, for `iterations` full iterations or down to exactly `keep` tokens.

    A full iteration merges num_tokens // 2 tokens; with `keep`, full iterations run while the result stays >= keep
    and a last partial one merges only what is needed to reach keep.
    """
    plan, n = [], num_tokens
    if keep is None:
        for _ in range(iterations):
            r = n // 2
            if r == 0:
                break
            plan.append(r)
            n -= r
        return plan
    while n > keep and n // 2 > 0:
        r = min(n // 2, n - keep)
        plan.append(r)
        n -= r
    return plan


def bipartite_assignment(metric: torch.Tensor, num_merge: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One AIM iteration's matching: which output token each current token goes to.

    metric: [N, M] similarity features of the current tokens (cosine similarity is used).
    num_merge: A tokens to merge (None = all that can: N // 2); the ones with the highest best-match similarity merge.
    Returns dest [N] (output slot of every current token) and kept [N_out] (positions of the surviving tokens, i.e.
    every B token and the unmerged A tokens, ascending; output slot j is represented by position kept[j]).
    """
    n = metric.shape[0]
    device = metric.device
    a_pos = torch.arange(0, n, 2, device=device)  # sources: even positions
    b_pos = torch.arange(1, n, 2, device=device)  # destinations: odd positions
    r = n // 2 if num_merge is None else min(num_merge, n // 2)
    if r <= 0:
        every = torch.arange(n, device=device)
        return every, every
    unit = F.normalize(metric.float(), dim=-1)
    sim = unit[a_pos] @ unit[b_pos].T  # [|A|, |B|] cosine similarity
    target = sim.argmax(dim=-1)  # [|A|] best B for each A; argmax returns the first maximum: lowest B on ties
    best = sim.gather(-1, target[:, None])[:, 0]  # [|A|]
    merged = torch.sort(best, descending=True, stable=True).indices[:r]  # rank by (-similarity, A position)
    survives = torch.ones(n, dtype=torch.bool, device=device)
    survives[a_pos[merged]] = False
    kept = survives.nonzero()[:, 0]  # [N - r] ascending: raster order is kept
    slot = torch.full((n,), -1, dtype=torch.long, device=device)
    slot[kept] = torch.arange(kept.numel(), device=device)
    dest = slot.clone()
    dest[a_pos[merged]] = slot[b_pos[target[merged]]]
    return dest, kept


def merge_mean(x: torch.Tensor, dest: torch.Tensor, num_out: int) -> torch.Tensor:
    """Plain mean of the tokens sent to each output slot, in float32: x [N, D], dest [N] -> [num_out, D] (x's dtype).

    A dense [num_out, N] averaging matrix (instead of scatter / index_add, whose atomics are not deterministic on GPU)
    keeps batch and one-by-one results identical.
    """
    weights = F.one_hot(dest, num_out).T.float()  # [num_out, N]
    weights = weights / weights.sum(dim=1, keepdim=True)
    return (weights @ x.float()).to(x.dtype)


def regroup(groups: list[list[int]], dest: torch.Tensor, num_out: int) -> list[list[int]]:
    """Original indices folded into each output slot: the union of the groups of the tokens sent there, ascending."""
    out: list[list[int]] = [[] for _ in range(num_out)]
    for group, slot in zip(groups, dest.tolist()):
        out[slot].extend(group)
    return [sorted(g) for g in out]


@register_strategy
@dataclass
class AIM(TokenReducer, Budget):
    """AIM's pre-LLM merge: `iterations` rounds of bipartite (even -> odd) merging by cosine similarity, mean merge.

    iterations: rounds (default 3: about 1/8 of the tokens kept); give `keep` or `ratio` instead for an exact count.
    metric: "keys" (the vision encoder's last-block keys, [CLS] dropped, the reference's image rule) or "features"
            (the tokens themselves, the reference's video rule; needed on Qwen2-VL, whose tower exposes no keys).
    Video frames (tokens whose `frame` is set: a video fed frame by frame, or Qwen2-VL's temporal patches): when the
    user left them unset (None = auto), `iterations` defaults to 2 (about 1/4 kept; only without keep / ratio) and
    `metric` to "features", the reference's video rules; still images keep 3 and "keys". After construction the
    attributes hold the image values (`AIM().iterations == 3`, `AIM().metric == "keys"`); `spec()` leaves auto
    values out, so "aim" round-trips to auto, while "aim:iterations=3,metric=keys" applies those to frames too.
    Acts on vision features before the projector (token_space "vision"), as the reference does for LLaVA-1.5.
    The in-LLM pruning half of AIM is a separate strategy.
    """

    name = "aim"
    stage = Stage.PRE_LLM
    summary = ("AIM merge: iterative bipartite merging by last-layer key similarity before the LLM "
               "(iterations / keep / ratio; metric=features for towers without keys)")
    paper = "arXiv 2412.03248"
    token_space = "vision"
    budget_params = ("keep", "ratio", "iterations")

    iterations: int | None = None
    metric: str | None = None
    _key_block: int | None = field(default=None, init=False, repr=False, compare=False)
    # True when iterations / metric were left unset (None): frames then get the video defaults
    _auto_iterations: bool = field(default=False, init=False, repr=False)
    _auto_metric: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        TokenReducer.__post_init__(self)
        self._auto_metric = self.metric is None
        self.metric = "keys" if self.metric is None else self.metric
        if self.keep is None and self.ratio is None:
            self._auto_iterations = self.iterations is None
            self.iterations = DEFAULT_ITERATIONS if self.iterations is None else self.iterations
            if self.iterations < 1:
                raise StrategyError(f"aim.iterations={self.iterations}: must be >= 1 (each keeps about half)")
        elif self.iterations is not None:
            raise StrategyError("aim: give one of iterations=<rounds>, keep=<tokens per image> or ratio=<fraction>")
        else:
            self._check_budget(self.name)
        if self.metric not in METRICS:
            raise StrategyError(f"aim.metric={self.metric!r}: expected one of {', '.join(METRICS)}")

    def params(self) -> dict:
        params = super().params()  # auto values stay None, so spec() -> parse_spec round-trips to auto
        if self._auto_iterations:
            params["iterations"] = None
        if self._auto_metric:
            params["metric"] = None
        return params

    def settings(self, image: ImageTokens) -> tuple[int | None, str]:
        """(iterations, metric) for one image: the video defaults for a frame where the user left them unset."""
        frame = image.frame is not None
        iterations = VIDEO_ITERATIONS if frame and self._auto_iterations else self.iterations
        return iterations, "features" if frame and self._auto_metric else self.metric

    def check_applicable(self, connector) -> None:
        # the reference reads keys of the encoder's last block (layers[23] of CLIP-L), not of the feature layer
        self._key_block = connector.config.vision_config.num_hidden_layers - 1

    def schedule(self, num_tokens: int, num_original: int, iterations: int | None = None) -> list[int]:
        """Merges per iteration for an image that now has `num_tokens` tokens (of `num_original` before reduction);
        `iterations` overrides the strategy's own (the frame default)."""
        iterations = self.iterations if iterations is None else iterations
        if iterations is not None:
            return merge_schedule(num_tokens, iterations=iterations)
        return merge_schedule(num_tokens, keep=self.kept_count(num_original))

    def similarity_metric(self, image: ImageTokens) -> torch.Tensor | None:
        """[V_cur, H*hd] float32 last-block keys of the current tokens, or None when the features are the metric."""
        if self.settings(image)[1] == "features":
            return None
        if self._key_block is None:
            raise StrategyError("aim.metric=keys: call check_applicable(connector) first (vlmeff.wrap does)")
        try:
            keys = image.probe.keys(image.image, block=self._key_block)  # [T, H*hd], [CLS] first when present
        except NotApplicableError as err:
            raise NotApplicableError(
                f"aim.metric=keys needs the vision encoder's last-layer attention keys, which this model's connector "
                f"does not provide ({err}). Use 'aim:metric=features' (merge by the tokens' own similarity, the "
                "reference's video rule)."
            ) from err
        num_cls = keys.shape[0] - image.num_original
        if num_cls not in (0, 1):
            raise NotApplicableError(f"aim: {keys.shape[0]} encoder keys for {image.num_original} tokens; "
                                     "expected one key per token (plus [CLS]); use 'aim:metric=features'")
        return keys[num_cls:][image.index].float()  # [V_cur, H*hd]

    def target_count(self, image: ImageTokens) -> int:
        """Tokens left after the image's merge schedule (`schedule`, with the frame defaults of `settings`)."""
        num = image.features.shape[0]
        return num - sum(self.schedule(num, image.num_original, self.settings(image)[0]))

    def reduce_image(self, img: ImageTokens, k: int, position: int) -> ImageTokens:
        if (img.index < 0).any():
            raise NotApplicableError("aim cannot merge synthetic tokens (index -1); put it before such strategies")
        groups = img.groups if img.groups is not None else [[i] for i in img.index.tolist()]
        features, index = img.features, img.index  # [V_cur, D], [V_cur]
        metric = self.similarity_metric(img)
        # merging down to exactly k: for `iterations` rounds k is where they end, so this is the same schedule
        for num_merge in merge_schedule(features.shape[0], keep=k):
            dest, kept = bipartite_assignment(features if metric is None else metric, num_merge)
            features = merge_mean(features, dest, kept.numel())  # [V_next, D]
            if metric is not None:
                metric = merge_mean(metric, dest, kept.numel())  # keys merge alongside the features
            index = index[kept]  # representatives
            groups = regroup(groups, dest, kept.numel())
        return dataclasses.replace(img, features=features, index=index, groups=groups)
