"""Batches of similar length: the one place that decides which samples share a padded batch.

A left-padded batch costs every row the longest row's length: on the CPU the bench's ragged batch (1 or 2 images per
sample) paid 1.33 x the linear work and about 1.9 x the attention work of its real tokens, and lost to one-by-one
prefill (docs/benchmarks.md, "Batch test"). Packing rows into one sequence would need a varlen attention kernel that
sdpa does not offer on every device, so vlmeff sorts by length and cuts the sorted list into batches instead:
`vlmeff bench`'s batch test batches through `length_batches`; `vlmeff eval` sorts its questions by prompt length
(`PopeRunner.batch_order`, one image per question) and cuts consecutive batches, i.e. the same rule without a
padding bound.
"""

from __future__ import annotations

from collections.abc import Sequence


def length_batches(lengths: Sequence[int], batch_size: int, max_padding: float | None = None) -> list[list[int]]:
    """Sample indices grouped into batches: sorted by length (stable: ties keep their order), cut into consecutive
    runs of at most `batch_size`; with `max_padding`, a run is also cut before a sample that would make the batch's
    padded tokens (rows x longest length) exceed (1 + max_padding) x its real tokens.

    lengths: tokens per sample as the model will see them (visual placeholders included).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if max_padding is not None and not max_padding >= 0:
        raise ValueError(f"max_padding={max_padding}: must be >= 0 (a fraction of the real tokens) or None")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    real = 0
    for i in order:
        batch = batches[-1] if batches else None
        # sorted ascending: the newcomer is the longest row of the batch it joins
        fits = batch is not None and len(batch) < batch_size and (
            max_padding is None or (len(batch) + 1) * lengths[i] <= (1 + max_padding) * (real + lengths[i]))
        if fits:
            batch.append(i)
            real += lengths[i]
        else:
            batches.append([i])
            real = lengths[i]
    return batches
