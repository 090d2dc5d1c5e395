"""Drafters, all behind one protocol (:class:`Drafter`): one file each."""

from specdec.drafters.base import DecodeState, Drafter
from specdec.drafters.combined import Combined
from specdec.drafters.draft_model import DraftModel
from specdec.drafters.prompt_lookup import PromptLookup

__all__ = ["Combined", "DecodeState", "Drafter", "DraftModel", "PromptLookup"]
