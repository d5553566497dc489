"""Spec strings, YAML files, presets, parameter validation and composition rules."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from vlmeff.registry import STRATEGIES, Registry, UnknownNameError
from vlmeff.spec import build_pipeline, describe, parse_spec, preset_names
from vlmeff.strategy import ScorePruner, Stage, StrategyError


def test_parse_string_coerces_types():
    (s,) = parse_spec("fastervlm:keep=64")
    assert (s.name, s.keep, s.ratio, s.positions, s.scorer) == ("fastervlm", 64, None, "auto", "cls")
    (s,) = parse_spec(" fastervlm : ratio=0.25 , positions=preserve ")
    assert (s.ratio, s.keep, s.positions) == (0.25, None, "preserve")


def test_spec_round_trip():
    (s,) = parse_spec("fastervlm:ratio=0.5,scorer=global_query")
    assert parse_spec(s.spec()) == [s]
    assert describe([]) == "vanilla"


@pytest.mark.parametrize("spec", ["", "none", "vanilla", None, "  Vanilla "])
def test_no_strategy(spec):
    assert parse_spec(spec) == []


@pytest.mark.parametrize("spec, message", [
    ("fastervlm:keep=0", "keep=0: must be >= 1"),
    ("fastervlm:keep=-3", "must be >= 1"),
    ("fastervlm:ratio=1.5", "ratio=1.5: must be in (0, 1]"),
    ("fastervlm:ratio=0", "must be in (0, 1]"),
    ("fastervlm", "exactly one of keep"),
    ("fastervlm:keep=64,ratio=0.5", "exactly one of keep"),
    ("fastervlm:keep=abc", "fastervlm.keep='abc': expected an integer"),
    ("fastervlm:keep=6.5", "expected an integer"),
    ("fastervlm:keep", "not of the form key=value"),
    ("fastervlm:keep=1,keep=2", "given twice"),
    ("fastervlm:kep=64", "unknown parameter(s) kep"),
    ("fastervlm:keep=64,positions=gapped", "positions='gapped'"),
    ("fastervlm:keep=64,scorer=l2", "scorer='l2'"),
    (":keep=3", "empty strategy name"),
])
def test_bad_parameters_give_precise_errors(spec, message):
    with pytest.raises(StrategyError) as err:
        parse_spec(spec)
    assert message in str(err.value)


def test_unknown_strategy_names_close_matches():
    with pytest.raises(UnknownNameError) as err:
        parse_spec("fastvlm:keep=3")
    assert "unknown strategy 'fastvlm'" in str(err.value) and "'fastervlm'" in str(err.value)


def test_yaml_file_forms(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("strategies:\n  - name: fastervlm\n    keep: 32\n")
    b = tmp_path / "b.yml"
    b.write_text("spec: fastervlm:ratio=0.5\n")
    assert parse_spec(str(a))[0].keep == 32
    assert parse_spec(str(b))[0].ratio == 0.5
    bad = tmp_path / "bad.yaml"
    bad.write_text("strategies:\n  - keep: 3\n")
    with pytest.raises(StrategyError, match=r"strategies\[0\] must be a mapping with a 'name'"):
        parse_spec(str(bad))
    bad.write_text("spec: a\nstrategies: []\n")
    with pytest.raises(StrategyError, match="exactly one of 'spec'"):
        parse_spec(str(bad))
    bad.write_text("strategies: [\n")
    with pytest.raises(StrategyError, match="not valid YAML"):
        parse_spec(str(bad))
    with pytest.raises(StrategyError, match="does not exist"):
        parse_spec(str(tmp_path / "missing.yaml"))


def test_presets_all_parse():
    names = preset_names()
    assert {"fastervlm-64", "fastervlm-128", "fastervlm-192"} <= set(names)
    for name in names:
        assert parse_spec(name), name
    assert parse_spec("fastervlm-64")[0].keep == 64


def test_composition_rules():
    (s,) = parse_spec("fastervlm:keep=8")
    with pytest.raises(StrategyError, match="appears twice"):
        build_pipeline([s, s])

    @dataclass
    class Pool(ScorePruner):  # a strategy needing the full grid, registered nowhere
        name = "test-fullgrid"
        stage = Stage.PRE_LLM
        needs_full_grid = True

    with pytest.raises(StrategyError, match="needs the full token grid"):
        build_pipeline([s, Pool(keep=4)])
    assert [x.name for x in build_pipeline([Pool(keep=4), s])] == ["test-fullgrid", "fastervlm"]

    @dataclass
    class Later(ScorePruner):
        name = "test-decoding"
        stage = Stage.DECODING

    with pytest.raises(StrategyError, match="a decoding-stage strategy must subclass"):  # every stage now runs
        build_pipeline([Later(keep=3)])

    @dataclass
    class NotAttention(ScorePruner):
        name = "test-attention"
        stage = Stage.ATTENTION

    with pytest.raises(StrategyError, match="subclass vlmeff.AttentionStrategy"):
        build_pipeline([NotAttention(keep=3)])

    @dataclass
    class NotLLM(ScorePruner):
        name = "test-inllm"
        stage = Stage.IN_LLM

    with pytest.raises(StrategyError, match="subclass vlmeff.LLMPruner"):
        build_pipeline([NotLLM(keep=3)])
    with pytest.raises(StrategyError, match="different position modes"):
        build_pipeline([Pool(keep=4, positions="reindex"), parse_spec("fastervlm:keep=2,positions=preserve")[0]])


def test_kept_count_budget():
    (s,) = parse_spec("fastervlm:ratio=0.25")
    assert s.kept_count(576) == 144 and s.kept_count(3) == 1
    (s,) = parse_spec("fastervlm:keep=64")
    assert s.kept_count(576) == 64 and s.kept_count(10) == 10


def test_registry_rejects_duplicate_names():
    reg = Registry("thing")
    reg._builtins = lambda: None

    class A:
        name = "a"

    class B:
        name = "a"

    reg.register(A)
    reg.register(A)  # idempotent
    with pytest.raises(ValueError, match="already registered"):
        reg.register(B)
    assert "fastervlm" in STRATEGIES.items()
