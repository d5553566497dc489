"""Declared budget parameters (`Strategy.budget_params`) and what eval derives from them (budget sweep, plot
families), the structural spec parser, and the shared keep-everything rules of the pre-LLM loop and `keep_top`."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlmeff.eval.runner import budgeted, family, takes_budget
from vlmeff.registry import STRATEGIES
from vlmeff.spec import parse_spec, spec_items
from vlmeff.strategy import ImageTokens, LLMPruner, SelectionRecord, TokenReducer


@pytest.mark.parametrize("name", sorted(STRATEGIES.items()))
def test_budget_params_are_fields(name):
    cls = STRATEGIES.get(name)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    if issubclass(cls, TokenReducer):  # a reducer has something that sets how many tokens survive
        assert cls.budget_params, f"{name} declares no budget parameter"
    assert set(cls.budget_params) <= fields, f"{name}: {set(cls.budget_params) - fields} are not fields"
    assert len(set(cls.budget_params)) == len(cls.budget_params)


def test_spec_items_are_the_given_parameters():
    assert spec_items("fastervlm:keep=64, scorer=cls+fastv") == [("fastervlm", {"keep": "64", "scorer": "cls"}),
                                                                 ("fastv", {})]


@pytest.mark.parametrize(("spec", "expected"), [
    ("fastervlm", True), ("fastervlm:scorer=global_query", True), ("aim", True), ("visionzip", True),
    ("fastv", True), ("flowcut", True),
    ("fastervlm:keep=16", False), ("fastervlm:ratio=0.5", False), ("aim:iterations=2", False),
    ("visionzip:dominant=54,contextual=10", False),
    ("atp", False), ("atp-learned", False), ("aim-prune", False),  # no per-image keep
    ("fastervlm-64", False), ("vanilla", False), ("blind", False),  # a preset; no strategy
    ("fastervlm+fastv:ratio=0.3", True),  # the sweep sets the first strategy's budget
])
def test_takes_budget(spec, expected):
    assert takes_budget(spec) is expected


def test_budgeted_keeps_given_budgets_and_later_items():
    assert budgeted("aim:iterations=2", [64, 32]) == ["aim:positions=auto,iterations=2"]
    assert budgeted("fastervlm:keep=16", [64, 32]) == ["fastervlm:keep=16,positions=auto,scorer=cls"]
    assert budgeted("fastervlm+fastv:ratio=0.3", [8]) == [
        "fastervlm:keep=8,positions=auto,scorer=cls+fastv:ratio=0.3,positions=auto,layer=2"]


def test_family_drops_only_budget_parameters():
    assert family("fastervlm:keep=64,positions=auto,scorer=cls") == "fastervlm:positions=auto,scorer=cls"
    assert family("fastervlm:ratio=0.5,positions=auto,scorer=cls") == "fastervlm:positions=auto,scorer=cls"
    assert family("pool:keep=4,positions=auto+fastv:ratio=0.5,positions=auto,layer=2") == (
        "pool:positions=auto+fastv:positions=auto,layer=2")
    assert family("atp:positions=auto,shift=-0.2,k_min=1") == "atp:positions=auto,k_min=1"
    assert family(budgeted("aim", [64])[0]) == family(budgeted("aim", [32])[0]) == "aim:positions=auto"
    (strategy,) = parse_spec("visionzip:dominant=54,contextual=10")
    assert strategy.family() == "visionzip:positions=auto"


def tokens(num: int, grid: tuple[int, int, int]) -> ImageTokens:
    index = torch.arange(num)
    record = SelectionRecord(sample=0, image=0, grid=grid, num_tokens=num, kept_indices=index)
    return ImageTokens(features=torch.randn(num, 4), index=index, probe=None, image=0, record=record)


@pytest.mark.parametrize("spec", ["random:keep=6", "random:ratio=1.0", "pool:keep=100", "pool:ratio=1.0",
                                  "fastervlm:keep=6", "fastervlm:ratio=1.0", "visionzip:keep=6", "aim:keep=6"])
def test_budget_at_least_the_token_count_returns_the_same_object(spec):
    (strategy,) = parse_spec(spec)
    image = tokens(6, (1, 2, 3))
    (out,) = strategy.reduce([image])
    assert out is image  # identity: no probe read, nothing gathered
    assert out.record.strategies == [strategy.name]


def test_keep_top_keeps_all_when_k_reaches_the_count():
    score = torch.tensor([0.1, 0.9, 0.5, 0.9])
    assert LLMPruner.keep_top(score, 4) is None and LLMPruner.keep_top(score, 9) is None
    assert LLMPruner.keep_top(score, 2).tolist() == [1, 3]
