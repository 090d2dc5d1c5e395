"""Bad input gets a ValueError that names the value and the fix, before any step runs."""

import pytest
import torch

import specdec
from specdec import DraftModel, PromptLookup

from conftest import Recorder, tiny_llama

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
    with pytest.raises(ValueError, match="backend .cuda. is not one of"):
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


@pytest.mark.parametrize("value", [2, -1])
def test_attention_mask_values_other_than_0_and_1(target, value):
    mask = torch.tensor([[1, value, 1]])
    with pytest.raises(ValueError, match=f"attention_mask holds the value {value}"):
        specdec.generate(target, IDS, PromptLookup(), attention_mask=mask, max_new_tokens=5)


@pytest.mark.parametrize("bad", [64, -1, 1000])
def test_out_of_vocabulary_ids(target, bad):
    with pytest.raises(ValueError, match=f"token id {bad}, outside the model's vocabulary \\[0, 64\\)"):
        specdec.generate(target, torch.tensor([[5, bad, 7]]), PromptLookup(), max_new_tokens=5)
    with pytest.raises(ValueError, match="pass token ids as torch.long"):
        specdec.generate(target, IDS.float(), PromptLookup(), max_new_tokens=5)


def test_greedy_ignores_sampling_only_settings_as_transformers_does(target):
    expected = target.generate(IDS, attention_mask=torch.ones_like(IDS), do_sample=False, temperature=0.0,
                               top_p=5.0, max_new_tokens=8, pad_token_id=0, eos_token_id=None)
    got = specdec.generate(target, IDS, PromptLookup(), do_sample=False, temperature=0.0, top_p=5.0,
                           max_new_tokens=8, pad_token_id=0, eos_token_id=None)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="temperature=0.0 must be > 0 when sampling"):
        specdec.generate(target, IDS, PromptLookup(), do_sample=True, temperature=0.0, max_new_tokens=8)


def test_drafter_given_as_a_class_a_string_or_a_bare_model(target, draft):
    with pytest.raises(ValueError, match=r"drafter=PromptLookup is a class: pass an instance, e.g. drafter=PromptLookup\(\)"):
        specdec.generate(target, IDS, PromptLookup, max_new_tokens=5)
    with pytest.raises(ValueError, match="drafter='prompt_lookup' is a string"):
        specdec.generate(target, IDS, "prompt_lookup", max_new_tokens=5)
    with pytest.raises(ValueError, match=r"bare LlamaForCausalLM: wrap a draft model as specdec.DraftModel\(model\)"):
        specdec.generate(target, IDS, draft, max_new_tokens=5)
    with pytest.raises(ValueError, match="has no propose"):
        specdec.generate(target, IDS, object(), max_new_tokens=5)


class Fixed(specdec.Drafter):
    """A custom drafter returning what it is told to."""

    def __init__(self, make):
        self.make = make

    def propose(self, states):
        return self.make(states)


def chain(tokens, q=None):
    return specdec.DraftTree.chain(torch.tensor(tokens), q)


def q_rows(T, fill):
    q = torch.full((T, 64), fill)
    return q


CUSTOM = {
    "wrong count": (lambda states: [chain([5])] * (len(states) + 1), "returned 2 trees for 1 rows"),
    "not a tree": (lambda states: [[5, 6]], "returned a list for row 0"),
    "out of vocabulary": (lambda states: [chain([5, 70])], "proposed token 70 for row 0, outside"),
    "too deep": (lambda states: [chain([5] * 40)], "tree 40 deep for row 0, past its budget"),
    "q not summing to 1": (lambda states: [chain([5, 6], q_rows(2, 0.9 / 64))], "sums to 0.900000, not 1"),
    "q negative": (lambda states: [chain([5], torch.cat([torch.full((1, 63), 2 / 63), -torch.ones(1, 1)], 1))],
                   "negative or non-finite"),
    "q nan": (lambda states: [chain([5], torch.full((1, 64), float("nan")))], "negative or non-finite"),
    "q wrong vocab": (lambda states: [chain([5], torch.full((1, 32), 1 / 32))], r"shape \(1, 32\), must be"),
}


@pytest.mark.parametrize("case", list(CUSTOM))
def test_a_custom_drafters_bad_trees_are_refused_before_any_token(target, case):
    make, message = CUSTOM[case]
    streamer = Recorder()
    with pytest.raises(ValueError, match=message):
        specdec.generate(target, IDS, Fixed(make), max_new_tokens=10, do_sample=case.startswith("q"),
                         streamer=streamer)
    assert streamer.chunks == [IDS[0].tolist()]  # the prompt only: no new token was returned


def test_a_q_that_does_not_sum_to_one_is_refused_not_silently_used(target):
    """Within 1e-4 is accepted: the check is not so tight that rounding trips it."""
    near = torch.full((1, 64), 1 / 64) * (1 + 5e-5)
    out = specdec.generate(target, IDS, Fixed(lambda states: [chain([5], near) for _ in states]), max_new_tokens=4,
                           do_sample=True, eos_token_id=None, pad_token_id=0)
    assert out.shape == (1, 7)
