"""vlmeff.pruners: one module per method, in the folder of its stage; importing this package registers them."""

from vlmeff.pruners.attention.cca import CCA
from vlmeff.pruners.attention.mma import MMA
from vlmeff.pruners.attention.naavit import NAAViT
from vlmeff.pruners.attention.pai import PAI
from vlmeff.pruners.attention.paint import PAINT
from vlmeff.pruners.attention.saisa import SAISA
from vlmeff.pruners.decoding.damro import DAMRO
from vlmeff.pruners.decoding.vcd import VCD
from vlmeff.pruners.in_llm.aim_prune import AIMPrune
from vlmeff.pruners.in_llm.atp import ATP
from vlmeff.pruners.in_llm.atp.learned import ATPLearned
from vlmeff.pruners.in_llm.dart import DART, DARTEmbed
from vlmeff.pruners.in_llm.fastv import FastV
from vlmeff.pruners.pre_llm.aim import AIM
from vlmeff.pruners.pre_llm.cdpruner import CDPruner
from vlmeff.pruners.pre_llm.divprune import DivPrune
from vlmeff.pruners.pre_llm.fastervlm import FasterVLM
from vlmeff.pruners.pre_llm.pool import Pool
from vlmeff.pruners.pre_llm.random import RandomPruner
from vlmeff.pruners.pre_llm.visionzip import VisionZip
from vlmeff.pruners.pre_llm.vispruner import VisPruner
from vlmeff.pruners.vision.flowcut import FlowCut, FlowCutLLM

__all__ = ["CCA", "MMA", "NAAViT", "PAI", "PAINT", "SAISA", "DAMRO", "VCD", "AIM", "AIMPrune", "ATP", "ATPLearned",
           "CDPruner", "DART", "DARTEmbed", "DivPrune", "FasterVLM", "FastV", "FlowCut", "FlowCutLLM", "Pool",
           "RandomPruner", "VisPruner", "VisionZip"]
