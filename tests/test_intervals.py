"""The 95 % intervals behind the plots: Wilson (CHAIR_S), bootstrap over questions (POPE), t on log ratios (bench)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlmeff.eval.intervals import bootstrap_interval, ratio_interval, wilson_interval
from vlmeff.eval.metrics import pope_summary
from vlmeff.eval.runner import pope_intervals


def test_wilson_matches_the_closed_form():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_bootstrap_is_seeded_and_contains_the_estimate():
    rng = np.random.default_rng(3)
    groups = {"a": list(rng.random(40)), "b": list(rng.random(30) + 1)}

    def mean_of_means(g):
        return sum(np.mean(v) for v in g.values()) / len(g)

    low, high = bootstrap_interval(groups, mean_of_means)
    assert (low, high) == bootstrap_interval(groups, mean_of_means)  # seeded
    assert low < mean_of_means(groups) < high
    # the spread is that of a mean of two independent means: about 2 * 1.96 * sqrt(var_a/40 + var_b/30) / 2
    expected = 1.96 * math.sqrt(np.var(groups["a"]) / 40 + np.var(groups["b"]) / 30) / 2
    assert (high - low) / 2 == pytest.approx(expected, rel=0.2)


def test_pope_interval_of_a_perfect_model_is_a_point_and_widens_with_errors():
    labels = ["yes", "no"] * 10
    perfect = {"random": [{"answer": lab.capitalize(), "label": lab} for lab in labels]}
    assert pope_intervals(perfect, lambda t: t.lower())["f1"] == [1.0, 1.0]
    noisy = {"random": [{"answer": ("no" if i % 4 == 0 else lab), "label": lab} for i, lab in enumerate(labels)]}
    low, high = pope_intervals(noisy, lambda t: t.lower())["f1"]
    point = pope_summary({"random": ([r["answer"] for r in noisy["random"]], labels)})["mean"]["f1"]
    assert low < point < high < 1.0


def test_ratio_interval_is_the_t_interval_of_log_ratios():
    ratios = [1.8, 2.0, 2.2, 1.9]
    centre, low, high = ratio_interval(ratios)
    logs = np.log(ratios)
    half = 3.182 * logs.std(ddof=1) / 2  # t(0.975, df=3) * s / sqrt(4)
    assert centre == pytest.approx(math.exp(logs.mean()))
    assert (low, high) == pytest.approx((math.exp(logs.mean() - half), math.exp(logs.mean() + half)))
    assert math.isnan(ratio_interval([2.0])[1])
