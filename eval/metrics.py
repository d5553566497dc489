"""Binary (yes/no) metrics for POPE-style benchmarks.

Positive class = ``"yes"``. Predictions are parsed answers (``"yes" | "no" | "other"``, see
:mod:`vlmeff.eval.parsers`); labels are ``"yes" | "no"``.

Conventions (each parser in :mod:`vlmeff.eval.parsers` names the options of its source, see
:func:`vlmeff.eval.parsers.metric_options`):

* ``accuracy = (tp + tn) / n``: an ``"other"`` prediction is always wrong.
* ``precision = tp / (tp + fp)``: only ``"yes"`` predictions are positive predictions, so an ``"other"``
  never counts as a false positive.
* ``recall``: with ``other_policy="miss"`` (default) an ``"other"`` on a ``"yes"`` question is a miss,
  ``recall = tp / (tp + fn + other_pos) = tp / #(label == "yes")``; for precision/recall an ``"other"``
  then behaves exactly like a ``"no"`` prediction. With ``other_policy="exclude"`` it is left out, ``recall
  = tp / (tp + fn)``, as lmms-eval's ``pope_aggregate_recall`` does (it counts only ``pred == "no"`` as a
  false negative), which inflates recall when many answers are unparsable.
* ``yes_ratio``: with ``yes_ratio="predictions"`` (default) the share of *predictions* that are ``"yes"``
  (LLaVA's ``eval_pope.py``); with ``yes_ratio="labels"`` the share of *labels* that are ``"yes"``, which is
  what lmms-eval's ``pope_aggregate_yes_ratio`` computes (it reads only ``ground_truth``: about 0.5 on POPE
  whatever the model answers). Both are always reported under their own names as well:
  ``pred_yes_ratio`` (vlmeff's own number, the one to read for a model's yes-bias) and ``label_yes_ratio``.
* ``f1 = 2 p r / (p + r)``. Every ratio with a zero denominator is 0.0.

The output keeps the confusion counts ``tp, fp, tn, fn`` (``"yes"``/``"no"`` predictions only) and the
``"other"`` predictions: ``other`` (= ``n_other``, the same number under both names), split into
``other_pos`` (label ``"yes"``) and ``other_neg`` (label ``"no"``); ``n = tp + fp + tn + fn + other``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["MEAN_KEYS", "RATE_KEYS", "binary_metrics", "pope_summary"]

RATE_KEYS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
# averaged over splits by pope_summary: the rates plus both unambiguous yes-ratios
MEAN_KEYS = (*RATE_KEYS, "pred_yes_ratio", "label_yes_ratio")
_OTHER_POLICIES = ("miss", "exclude")
_YES_RATIOS = ("predictions", "labels")


def _div(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def binary_metrics(preds: Sequence[str], labels: Sequence[str], *, other_policy: str = "miss",
                   yes_ratio: str = "predictions") -> dict:
    """Accuracy, precision, recall, F1, yes-ratio and confusion counts (positive = ``"yes"``).

    ``preds[i]`` must be ``"yes"``, ``"no"`` or ``"other"`` (parse raw text first); ``labels[i]`` must be
    ``"yes"`` or ``"no"`` (case and surrounding blanks ignored). ``other_policy`` is ``"miss"`` or
    ``"exclude"``, ``yes_ratio`` is ``"predictions"`` or ``"labels"`` (module docstring). Returns a dict with
    ``accuracy, precision, recall, f1, yes_ratio, pred_yes_ratio, label_yes_ratio`` (floats), ``n, tp, fp, tn,
    fn, other, n_other, other_pos, other_neg`` (ints).
    """
    if other_policy not in _OTHER_POLICIES:
        raise ValueError(f"other_policy must be one of {_OTHER_POLICIES}, got {other_policy!r}")
    if yes_ratio not in _YES_RATIOS:
        raise ValueError(f"yes_ratio must be one of {_YES_RATIOS}, got {yes_ratio!r}")
    preds = list(preds)
    labels = list(labels)
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions but {len(labels)} labels")
    tp = fp = tn = fn = other_pos = other_neg = 0
    for i, (pred, label) in enumerate(zip(preds, labels)):
        lab = label.lower().strip() if isinstance(label, str) else label
        if lab not in ("yes", "no"):
            raise ValueError(f"label {i}: {label!r} is not 'yes' or 'no'")
        if pred == "yes":
            if lab == "yes":
                tp += 1
            else:
                fp += 1
        elif pred == "no":
            if lab == "no":
                tn += 1
            else:
                fn += 1
        elif pred == "other":
            if lab == "yes":
                other_pos += 1
            else:
                other_neg += 1
        else:
            raise ValueError(
                f"prediction {i}: {pred!r} is not 'yes', 'no' or 'other' (parse the raw text with "
                "vlmeff.eval.parsers first)"
            )
    other = other_pos + other_neg
    n = tp + fp + tn + fn + other
    precision = _div(tp, tp + fp)
    recall_den = tp + fn + (other_pos if other_policy == "miss" else 0)
    recall = _div(tp, recall_den)
    f1 = _div(2.0 * precision * recall, precision + recall)
    pred_yes_ratio = _div(tp + fp, n)  # share of PREDICTIONS answering "yes"
    label_yes_ratio = _div(tp + fn + other_pos, n)  # share of LABELS that are "yes" (lmms-eval's yes_ratio)
    return {
        "accuracy": _div(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": pred_yes_ratio if yes_ratio == "predictions" else label_yes_ratio,
        "pred_yes_ratio": pred_yes_ratio,
        "label_yes_ratio": label_yes_ratio,
        "n": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "other": other,
        "n_other": other,
        "other_pos": other_pos,
        "other_neg": other_neg,
    }


def pope_summary(
    per_split: Mapping[str, tuple[Sequence[str], Sequence[str]]], *, other_policy: str = "miss",
    yes_ratio: str = "predictions",
) -> dict:
    """Metrics per split plus their unweighted mean.

    ``per_split`` maps a split name (``"random"``, ``"popular"``, ``"adversarial"``, ...) to
    ``(preds, labels)``; ``other_policy`` and ``yes_ratio`` go to :func:`binary_metrics` (pass
    ``**vlmeff.eval.parsers.metric_options(parser)``). Returns ``{split: binary_metrics(...), ...,
    "mean": {...}}`` where ``"mean"`` holds the unweighted mean over splits of each rate in
    :data:`MEAN_KEYS` (the usual POPE headline, e.g. "mean F1"), plus ``n`` (the total number of
    questions) and ``n_splits``. lmms-eval's ``pope`` task pools its three categories into one set
    instead; its ``pope_random`` / ``pope_pop`` / ``pope_adv`` tasks are the per-split numbers.
    """
    if not per_split:
        raise ValueError("pope_summary needs at least one split")
    if "mean" in per_split:
        raise ValueError("'mean' is reserved for the mean over splits; rename that split")
    out: dict = {}
    for split, pair in per_split.items():
        try:
            preds, labels = pair
        except (TypeError, ValueError):
            raise TypeError(f"split {split!r}: expected a (preds, labels) pair") from None
        out[split] = binary_metrics(preds, labels, other_policy=other_policy, yes_ratio=yes_ratio)
    splits = [out[s] for s in per_split]
    mean = {k: sum(m[k] for m in splits) / len(splits) for k in MEAN_KEYS}
    mean["n"] = sum(m["n"] for m in splits)
    mean["n_splits"] = len(splits)
    out["mean"] = mean
    return out
