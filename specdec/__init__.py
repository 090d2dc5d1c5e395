"""specdec: lossless speculative decoding for Hugging Face causal LMs.

A drafter proposes a tree of tokens, the target verifies all of them in one forward pass, and
an acceptance rule keeps the output exactly the target's (Leviathan et al. 2023, "Fast Inference
from Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating LLM Decoding with
Speculative Sampling"; Miao et al. 2024, "SpecInfer").
"""

from specdec.backends.cpu_linear import PackedWeights, packed_weights
from specdec.drafters import (
    Adaptive,
    BlockDrafter,
    Combined,
    DecodeState,
    Distilled,
    Drafter,
    DraftModel,
    Eagle,
    EarlyExit,
    Medusa,
    Pard,
    PromptLookup,
    Proposer,
    SuffixCorpus,
    SuffixDecoding,
    TargetView,
    TokenRecycling,
)
from specdec.generate import SpecDecodeOutput, generate, speculative
from specdec.models import DEFAULT_MODEL, load_model
from specdec.options import Options
from specdec.sampling import Sampling
from specdec.stats import SpecStats
from specdec.tree import DraftTree, TreeSpec
from specdec.verify import Acceptance, accept_greedy, accept_sampling

__all__ = [
    "DEFAULT_MODEL",
    "Acceptance",
    "Adaptive",
    "BlockDrafter",
    "Combined",
    "DecodeState",
    "Distilled",
    "DraftModel",
    "DraftTree",
    "Drafter",
    "Eagle",
    "EarlyExit",
    "Medusa",
    "Options",
    "Pard",
    "PackedWeights",
    "PromptLookup",
    "Proposer",
    "Sampling",
    "SpecDecodeOutput",
    "SpecStats",
    "SuffixCorpus",
    "SuffixDecoding",
    "TargetView",
    "TokenRecycling",
    "TreeSpec",
    "accept_greedy",
    "accept_sampling",
    "generate",
    "load_model",
    "packed_weights",
    "speculative",
]
__version__ = "0.1.0"
