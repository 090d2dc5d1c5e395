"""Drafters, all behind one protocol (:class:`Drafter`): one file each."""

from specdec.drafters.adaptive import Adaptive
from specdec.drafters.base import DecodeState, Drafter, Proposer, TargetView
from specdec.drafters.block import BlockDrafter, BlockHead
from specdec.drafters.combined import Combined
from specdec.drafters.distilled import Distilled
from specdec.drafters.draft_model import DraftModel
from specdec.drafters.eagle import Eagle, EagleHead
from specdec.drafters.early_exit import EarlyExit, ExitAdapter
from specdec.drafters.medusa import Medusa, MedusaHeads
from specdec.drafters.pard import Pard, PardDraft
from specdec.drafters.prompt_lookup import PromptLookup
from specdec.drafters.recycling import RecyclingTable, TokenRecycling
from specdec.drafters.suffix import SuffixAutomaton, SuffixCorpus, SuffixDecoding

__all__ = [
    "Adaptive",
    "BlockDrafter",
    "BlockHead",
    "Combined",
    "DecodeState",
    "Distilled",
    "DraftModel",
    "Drafter",
    "Eagle",
    "EagleHead",
    "EarlyExit",
    "ExitAdapter",
    "Medusa",
    "MedusaHeads",
    "Pard",
    "PardDraft",
    "PromptLookup",
    "Proposer",
    "RecyclingTable",
    "SuffixAutomaton",
    "SuffixCorpus",
    "SuffixDecoding",
    "TargetView",
    "TokenRecycling",
]
