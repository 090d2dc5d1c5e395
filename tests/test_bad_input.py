"""Bad input gets a ValueError that names the value and the fix, before any step runs."""

import pytest
import torch

import specdec
from specdec import DraftModel, PromptLookup

from conftest import tiny_llama

IDS = torch.tensor([[5, 6, 7]])


def test_vocab_mismatch(target):
    other = tiny_llama(vocab=80, seed=3)
    with pytest.raises(ValueError, match="drafter vocab 80 != target vocab 64"):
        specdec.generate(target, IDS, DraftModel(other), max_new_tokens=5)
    with pytest.raises(ValueError, match="drafter vocab 80"):
        with specdec.speculative(target, DraftModel(other)):
            pass
    assert "generate" not in vars(target)


def test_empty_prompt(target):
    with pytest.raises(ValueError, match=r"input_ids of shape \(1, 0\) is empty"):
        specdec.generate(target, torch.empty(1, 0, dtype=torch.long), PromptLookup(), max_new_tokens=5)


def test_prompt_beyond_context_window(target):
    window = target.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"context window of {window}"):
        specdec.generate(target, torch.ones(1, window + 1, dtype=torch.long), PromptLookup(), max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens=100 exceeds"):
        specdec.generate(target, torch.ones(1, window - 10, dtype=torch.long), PromptLookup(), max_new_tokens=100)


@pytest.mark.parametrize("value", [0, -3])
def test_max_new_tokens_not_positive(target, value):
    with pytest.raises(ValueError, match=f"max_new_tokens.* {value}|max_new_tokens={value}"):
        specdec.generate(target, IDS, PromptLookup(), max_new_tokens=value)


def test_num_beams(target):
    with pytest.raises(ValueError, match="num_beams=4 is not supported"):
        specdec.generate(target, IDS, PromptLookup(), max_new_tokens=5, num_beams=4)


def test_unknown_and_unsupported_kwargs(target):
    with pytest.raises(ValueError, match="repetition_penalty=1.2 is not supported"):
        specdec.generate(target, IDS, PromptLookup(), max_new_tokens=5, repetition_penalty=1.2)
    with pytest.raises(ValueError, match="argument\\(s\\) not_a_setting are not supported"):
        specdec.generate(target, IDS, PromptLookup(), max_new_tokens=5, not_a_setting=3)


def test_right_padding(target):
    mask = torch.tensor([[1, 1, 0]])
    with pytest.raises(ValueError, match="row 0 of attention_mask is not left-padded"):
        specdec.generate(target, IDS, PromptLookup(), attention_mask=mask, max_new_tokens=5)


def test_bad_drafter_settings():
    with pytest.raises(ValueError, match="k=0"):
        PromptLookup(k=0)
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookup(max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError, match="k=0"):
        DraftModel(tiny_llama(), k=0)
    with pytest.raises(ValueError, match="budget=0 must be >= 1"):
        DraftModel(tiny_llama(), top_k=2, budget=0)
    with pytest.raises(ValueError, match="top_k=0"):
        DraftModel(tiny_llama(), top_k=0)
    with pytest.raises(ValueError, match="branches=0"):
        PromptLookup(branches=0)
    with pytest.raises(ValueError, match="comes before its parent"):
        DraftModel(tiny_llama(), tree=[[0, 0], [0]])


def test_bad_attention_backend(target):
    with pytest.raises(ValueError, match="backend 'cuda' is not one of"):
        specdec.generate(target, IDS, PromptLookup(), max_new_tokens=3, attention_backend="cuda")


def test_max_length_not_past_the_prompt(target):
    with pytest.raises(ValueError, match="max_new_tokens=-1 must be >= 1"):
        specdec.generate(target, IDS, PromptLookup(), max_length=2)


def test_combined_needs_two_drafters_and_checks_each(target):
    from specdec import Combined

    with pytest.raises(ValueError, match="at least 2 drafters, got 1"):
        Combined(PromptLookup())
    with pytest.raises(ValueError, match="drafter vocab 80 != target vocab 64"):
        specdec.generate(target, IDS, Combined(PromptLookup(), DraftModel(tiny_llama(vocab=80, seed=3))),
                         max_new_tokens=3)
