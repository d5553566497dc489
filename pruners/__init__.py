"""vlmeff.pruners: one module per token-reduction method; importing this package registers them."""

from vlmeff.pruners.aim import AIM
from vlmeff.pruners.aim_prune import AIMPrune
from vlmeff.pruners.atp import ATP
from vlmeff.pruners.atp_learned import ATPLearned
from vlmeff.pruners.fastervlm import FasterVLM
from vlmeff.pruners.fastv import FastV
from vlmeff.pruners.flowcut import FlowCut, FlowCutLLM
from vlmeff.pruners.pool import Pool
from vlmeff.pruners.random import RandomPruner
from vlmeff.pruners.visionzip import VisionZip

__all__ = ["AIM", "AIMPrune", "ATP", "ATPLearned", "FasterVLM", "FastV", "FlowCut", "FlowCutLLM", "Pool", "RandomPruner", "VisionZip"]
