"""Drafters, all behind one protocol (:class:`Drafter`): one file each."""

from specdec.drafters.base import DecodeState, Drafter
from specdec.drafters.draft_model import DraftModel
from specdec.drafters.prompt_lookup import PromptLookup

__all__ = ["DecodeState", "Drafter", "DraftModel", "PromptLookup"]
