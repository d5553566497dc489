"""POPE answer parsers: free-form model output -> ``"yes" | "no" | "other"``.

POPE numbers depend on how the generated text is turned into a yes/no decision, and the common code
bases disagree. Each parser below states the rule it follows and where that rule comes from; always
report the parser's name next to POPE results (docs/methods.md, "6. Benchmarks").

``PARSERS`` maps a name to a function ``fn(text: str) -> "yes" | "no" | "other"``:

* ``"official"``  - LLaVA ``llava/eval/eval_pope.py`` (never returns ``"other"``).
* ``"lmms-eval"`` - lmms-eval ``lmms_eval/tasks/pope/utils.py`` (exact match, strict).
* ``"substring"`` - a label-free version of the substring test of VCD / DAMRO ``eval_pope.py``.

A parser's name covers its source's aggregation too: :data:`METRIC_OPTIONS` holds, per parser, the
keyword arguments of :func:`vlmeff.eval.metrics.binary_metrics` / ``pope_summary`` that reproduce how that
source turns parsed answers into precision, recall and yes-ratio. Only lmms-eval differs from the defaults
(``"other"`` answers left out of recall, yes-ratio over the labels); vlmeff's own prediction yes-ratio is
``pred_yes_ratio`` under every parser.

The VCD / DAMRO scripts decide *given the ground-truth label*; :func:`substring_vcd` reproduces that
label-conditioned rule exactly, for when their numbers must be matched to the digit.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = [
    "PARSERS",
    "get_parser",
    "parse_official",
    "parse_lmms_eval",
    "parse_substring",
    "substring_vcd",
    "METRIC_OPTIONS",
    "metric_options",
]

YES, NO, OTHER = "yes", "no", "other"


def parse_official(text: str) -> str:
    """LLaVA's official POPE rule (haotian-liu/LLaVA, ``llava/eval/eval_pope.py``, ``eval_pope``).

    1. ``strip()`` the text: LLaVA's ``model_vqa_loader.py`` stores ``batch_decode(...)[0].strip()``, so
       ``eval_pope.py`` only ever sees stripped answers;
    2. keep only the first sentence: if the text contains a ``"."``, keep ``text.split(".")[0]``;
    3. delete every ``","``;
    4. split on single spaces (``str.split(" ")``, not on arbitrary whitespace) and answer ``"no"`` if
       one of the words is exactly ``"No"``, ``"not"`` or ``"no"`` (case-sensitive: ``"NO"``, ``"Not"``,
       ``"No!"`` do not count); otherwise ``"yes"``.

    Everything that is not recognised as a denial is therefore a ``"yes"``: ``""``, ``"I don't know"``,
    ``"Maybe"``. This parser never returns ``"other"``.
    """
    s = text.strip()
    if "." in s:
        s = s.split(".")[0]
    words = s.replace(",", "").split(" ")
    if "No" in words or "not" in words or "no" in words:
        return NO
    return YES


def parse_lmms_eval(text: str) -> str:
    """lmms-eval's strict rule (EvolvingLMMs-Lab/lmms-eval, ``lmms_eval/tasks/pope/utils.py``,
    ``pope_process_results``): ``pred = text.lower().strip()``; the answer is ``"yes"`` if ``pred ==
    "yes"``, ``"no"`` if ``pred == "no"``, and ``"other"`` for anything else.

    No punctuation is removed: ``"Yes."`` and ``"No, there is not."`` are ``"other"``. lmms-eval then
    scores ``pred == ground_truth`` for accuracy (a non-exact answer is wrong whatever the label), and its
    aggregation functions count an ``"other"`` neither as a false negative (``pope_aggregate_recall``
    counts ``pred == "no"`` only) nor anywhere in ``pope_aggregate_yes_ratio``, which counts the
    ground-truth labels; ``METRIC_OPTIONS["lmms-eval"]`` reproduces both.
    """
    pred = text.lower().strip()
    if pred == YES:
        return YES
    if pred == NO:
        return NO
    return OTHER


def parse_substring(text: str) -> str:
    """Label-free substring rule derived from VCD / DAMRO ``eval_pope.py``.

    Source: DAMO-NLP-SG/VCD ``experiments/eval/eval_pope.py`` (DAMRO's ``evaluation/eval_pope/
    eval_pope.py`` is the same code). There, after ``lower().strip()``, a ``"yes"``-labelled question is
    a true positive iff ``"yes" in answer`` (else a false negative) and a ``"no"``-labelled question is a
    true negative iff ``"no" in answer`` (else a false positive): the decision depends on the label.

    Label-free version used here, on ``t = text.lower().strip()``:

    1. ``"yes"`` if the substring ``"yes"`` occurs in ``t`` (checked first: it wins when both occur);
    2. else ``"no"`` if the substring ``"no"`` occurs in ``t``;
    3. else ``"other"``.

    Substrings, not words: ``"no"`` matches inside ``"not"``, ``"know"``, ``"snowboard"``, ``"nothing"``,
    so ``"I don't know"`` is ``"no"`` and ``"Yes, there is a snowboard."`` contains both strings; ``"yes"``
    goes first because it rarely occurs by accident (``"eyes"``) while ``"no"`` often does.

    Agreement with VCD: identical whenever exactly one of the two substrings occurs. When both occur,
    VCD counts the answer correct whatever the label (this parser says ``"yes"``); when neither occurs,
    VCD counts it wrong whatever the label, as a false negative for a ``"yes"`` label and a false positive
    for a ``"no"`` label (this parser says ``"other"``, which :func:`vlmeff.eval.metrics.binary_metrics`
    counts wrong but never as a false positive). Use :func:`substring_vcd` to reproduce VCD exactly.
    """
    t = text.lower().strip()
    if YES in t:
        return YES
    if NO in t:
        return NO
    return OTHER


def substring_vcd(text: str, label: str) -> str:
    """VCD / DAMRO's label-conditioned decision, reproduced exactly (see :func:`parse_substring`).

    Returns the prediction VCD effectively counts: for label ``"yes"``, ``"yes"`` iff ``"yes"`` occurs in
    ``text.lower().strip()`` (else ``"no"``: a false negative); for label ``"no"``, ``"no"`` iff ``"no"``
    occurs in it (else ``"yes"``: a false positive). Feeding these predictions to
    :func:`vlmeff.eval.metrics.binary_metrics` gives VCD's precision, recall, F1, accuracy and yes
    proportion. Not a parser (it needs the label), hence not in :data:`PARSERS`.
    """
    t = text.lower().strip()
    lab = label.lower().strip()
    if lab == YES:
        return YES if YES in t else NO
    if lab == NO:
        return NO if NO in t else YES
    raise ValueError(f"label must be 'yes' or 'no', got {label!r}")


PARSERS: dict[str, Callable[[str], str]] = {
    "official": parse_official,
    "lmms-eval": parse_lmms_eval,
    "substring": parse_substring,
}


# binary_metrics / pope_summary keyword arguments that reproduce each parser's source aggregation
METRIC_OPTIONS: dict[str, dict[str, str]] = {
    # eval_pope.py: recall = TP / (TP + FN) with every answer a yes or a no; yes_ratio over predictions
    "official": {},
    # pope_aggregate_recall: TP / (TP + #(gt yes, pred "no")); pope_aggregate_yes_ratio: #(gt yes) / n
    "lmms-eval": {"other_policy": "exclude", "yes_ratio": "labels"},
    # vlmeff's own reading of a label-free parser: "other" on a yes question is a miss
    "substring": {},
}


def metric_options(name: str) -> dict[str, str]:
    """Keyword arguments for :func:`vlmeff.eval.metrics.binary_metrics` / ``pope_summary`` under the parser
    ``name``, e.g. ``pope_summary(per_split, **metric_options("lmms-eval"))`` (a KeyError lists the names)."""
    get_parser(name)
    return dict(METRIC_OPTIONS[name])


def get_parser(name: str) -> Callable[[str], str]:
    """The parser registered under ``name`` (a KeyError lists the known names)."""
    try:
        return PARSERS[name]
    except KeyError:
        raise KeyError(f"unknown POPE parser {name!r}; known: {sorted(PARSERS)}") from None
