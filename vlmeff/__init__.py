"""vlmeff: visual-token strategies (pruning, merging, masks, hallucination mitigation) for HF vision-language models.

    import vlmeff
    vm = vlmeff.wrap(model, processor, "fastervlm:keep=64")
    answer = vm.chat("image.jpg", "What is in the image?")
    vm.last_record, vm.stats
"""

from vlmeff.loading import load
from vlmeff.registry import CONNECTORS, STRATEGIES, register_connector, register_strategy
from vlmeff.spec import parse_spec
from vlmeff.strategy import (
    AttentionStrategy,
    Budget,
    ImageTokens,
    LLMPruner,
    NotApplicableError,
    ScorePruner,
    SelectionRecord,
    Stage,
    Strategy,
    StrategyError,
    TokenReducer,
)
from vlmeff.wrapper import RunStats, VLMWrapper, wrap

__version__ = "0.1.0"

__all__ = [
    "AttentionStrategy", "CONNECTORS", "STRATEGIES", "Budget", "ImageTokens", "LLMPruner", "NotApplicableError", "RunStats", "ScorePruner",
    "SelectionRecord", "Stage", "Strategy", "StrategyError", "TokenReducer", "VLMWrapper", "load", "parse_spec",
    "register_connector", "register_strategy", "wrap",
]
