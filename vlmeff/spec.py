"""Strategy specs: strings ("fastervlm:keep=64+other:x=1"), YAML files, and bundled presets (configs/*.yaml).

Grammar: ``spec := item ("+" item)*``, ``item := name [":" key=value ("," key=value)*]``. The empty spec, "none"
and "vanilla" mean no strategy. A spec that names an existing .yaml/.yml file, or a preset shipped in configs/
(`vlmeff list` shows them), is read as YAML with either a ``spec:`` string or a ``strategies:`` list of mappings
(``- {name: fastervlm, keep: 64}``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from vlmeff.decoding import DecodingStrategy
from vlmeff.registry import STRATEGIES
from vlmeff.strategy import (
    IMPLEMENTED_STAGES,
    AttentionStrategy,
    LLMPruner,
    Stage,
    Strategy,
    StrategyError,
    TokenReducer,
)

NO_STRATEGY = ("", "none", "vanilla")
STAGE_ORDER = list(Stage)


def preset_names() -> list[str]:
    root = resources.files("vlmeff.configs")
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def _preset_path(name: str):
    candidate = resources.files("vlmeff.configs") / f"{name}.yaml"
    return candidate if candidate.is_file() else None


def parse_item(text: str) -> tuple[str, dict[str, str]]:
    """(name, {key: raw value as given}) of one spec item ``name[:key=value,...]``; the syntax is checked, the
    strategy is not built."""
    name, _, args = text.strip().partition(":")
    name = name.strip()
    if not name:
        raise StrategyError(f"empty strategy name in spec item {text!r}")
    params: dict[str, str] = {}
    for pair in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise StrategyError(f"{name}: parameter {pair!r} is not of the form key=value")
        if key.strip() in params:
            raise StrategyError(f"{name}: parameter {key.strip()!r} given twice")
        params[key.strip()] = value.strip()
    return name, params


def spec_items(spec: str) -> list[tuple[str, dict[str, str]]]:
    """`parse_item` of every item of a spec string: which parameters the user gave (vs defaults), e.g. for the eval
    budget sweep. The string grammar only: YAML files, presets and "vanilla" are not items."""
    return [parse_item(item) for item in spec.strip().split("+")]


def build_items(items: Iterable[tuple[str, dict[str, Any]]]) -> list[Strategy]:
    """Validated strategies from (name, raw params) pairs, built in order."""
    return [STRATEGIES.get(str(name)).from_params(params) for name, params in items]


def _from_yaml(text: str, source: str) -> list[Strategy]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise StrategyError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or ("spec" in data) == ("strategies" in data):
        raise StrategyError(f"{source}: expected a mapping with exactly one of 'spec' (a string) or 'strategies' (a list)")
    if "spec" in data:
        return parse_spec(str(data["spec"]))
    items = data["strategies"] or []
    if not isinstance(items, list):
        raise StrategyError(f"{source}: 'strategies' must be a list of mappings with a 'name'")
    return build_items(_yaml_item(i, item, source) for i, item in enumerate(items))


def _yaml_item(i: int, item: Any, source: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(item, dict) or "name" not in item:
        raise StrategyError(f"{source}: strategies[{i}] must be a mapping with a 'name'")
    return item["name"], {k: v for k, v in item.items() if k != "name"}


def parse_spec(spec: str | Strategy | Sequence[Strategy | str] | None) -> list[Strategy]:
    """Turn a spec (string, YAML path, preset name, Strategy or list of them) into validated Strategy objects."""
    if spec is None:
        return []
    if isinstance(spec, Strategy):
        return [spec]
    if not isinstance(spec, str):
        return [s for item in spec for s in parse_spec(item)]
    text = spec.strip()
    if text.lower() in NO_STRATEGY:
        return []
    if text.endswith((".yaml", ".yml")):
        path = Path(text)
        if not path.is_file():
            raise StrategyError(f"strategy file {text!r} does not exist")
        return _from_yaml(path.read_text(), text)
    if (preset := _preset_path(text)) is not None:
        return _from_yaml(preset.read_text(), f"preset {text!r}")
    return build_items(map(parse_item, text.split("+")))  # lazy: items fail in order, syntax and parameters


def build_pipeline(strategies: list[Strategy]) -> list[Strategy]:
    """Order strategies by stage (stable) and check the composition rules; raise StrategyError saying why."""
    seen: set[str] = set()
    for s in strategies:
        if s.name in seen:
            raise StrategyError(f"strategy {s.name!r} appears twice; give it once with the parameters you want")
        seen.add(s.name)
        if s.stage not in IMPLEMENTED_STAGES:
            raise StrategyError(
                f"{s.name}: stage {s.stage.value!r} is not executed by this vlmeff release "
                f"(executed: {', '.join(st.value for st in IMPLEMENTED_STAGES)})"
            )
        if s.stage is Stage.IN_LLM and not isinstance(s, LLMPruner):
            raise StrategyError(f"{s.name}: an in-LLM strategy must subclass vlmeff.LLMPruner (prune_layers / select)")
        if s.stage is Stage.DECODING and not isinstance(s, DecodingStrategy):
            raise StrategyError(f"{s.name}: a decoding-stage strategy must subclass vlmeff.decoding.DecodingStrategy "
                                "(branches / combine)")
        if s.stage is Stage.ATTENTION and not isinstance(s, AttentionStrategy):
            raise StrategyError(f"{s.name}: an attention-stage strategy must subclass vlmeff.AttentionStrategy "
                                "(positions / mask_functions / edit_scores)")
    ordered = sorted(strategies, key=lambda s: STAGE_ORDER.index(s.stage))
    for i, s in enumerate(ordered):
        s.check_after(ordered[:i])
        s.check_before(ordered[i + 1:])
    positions = {s.positions for s in ordered if isinstance(s, TokenReducer) and s.positions != "auto"}
    if len(positions) > 1:
        raise StrategyError(f"strategies ask for different position modes {sorted(positions)}; set one positions=")
    return ordered


def describe(strategies: list[Strategy]) -> str:
    return "+".join(s.spec() for s in strategies) or "vanilla"


def strategy_table() -> list[dict[str, Any]]:
    """One row per registered strategy (for `vlmeff list` and the README)."""
    rows = []
    for name, cls in STRATEGIES.items().items():
        rows.append({"name": name, "stage": cls.stage.value, "summary": cls.summary, "paper": cls.paper,
                     "training_free": cls.training_free, "experimental": cls.experimental})
    return rows
