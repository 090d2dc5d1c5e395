"""Speculative sampling is lossless: the joint law of the first three sampled tokens is the
target's, for chains and trees from a draft model and from prompt lookup, and a deliberately
wrong rule fails the same test (so the test has the power to catch a broken rule).
"""

import itertools

import dataclasses
import sys

import pytest
import torch
from scipy.stats import chisquare

import specdec.engine
from specdec.drafters import (Adaptive, Combined, DraftModel, Eagle, EagleHead, EarlyExit, Medusa, MedusaHeads,
                              PromptLookup)
from specdec.control import CostModel
from specdec.engine import decode
from specdec.options import Options
from specdec.sampling import Sampling
from specdec.verify import Acceptance

from conftest import tiny_llama

V, N_TOKENS, N_SAMPLES = 6, 3, 3000
PROMPT = torch.tensor([[1, 3, 4, 5, 3, 4, 5, 3, 4]])  # repeats, so lookup has matches to offer
SAMPLING = Sampling(do_sample=True, temperature=0.9, top_k=5, eos_token_ids=())
# the goodput controller on, with a fixed cost curve where drafting pays (a measured one would make the
# drafted depths, and so the wrong rule's chance to show, depend on the machine's load)
FLAT = CostModel((1, 2, 4, 8), (1.0, 1.0, 1.05, 1.1), draft_seconds=0.0)
OPTIONS = Options(max_new_tokens=N_TOKENS, sampling=SAMPLING, cost_model=FLAT)


@pytest.fixture
def every_step(monkeypatch):
    """These helpers' options with a tree at every step (no goodput controller): the draws do not depend on
    measured costs, and the wrong rule meets drafts at every step."""
    monkeypatch.setattr(sys.modules[__name__], "OPTIONS", dataclasses.replace(OPTIONS, goodput=False))


@pytest.fixture(scope="module")
def small_target():
    return tiny_llama(vocab=V, seed=10, scale=4.0)


@pytest.fixture(scope="module")
def small_draft():
    return tiny_llama(vocab=V, seed=11, layers=1, scale=4.0)


def exact_joint(model) -> torch.Tensor:
    """``(V ** N_TOKENS,)`` the target's probability of every continuation, enumerated."""
    seqs = torch.tensor(list(itertools.product(range(V), repeat=N_TOKENS)))  # (V^3, 3)
    ids = torch.cat([PROMPT.expand(len(seqs), -1), seqs], dim=1)
    with torch.no_grad():
        logits = model(ids).logits[:, PROMPT.shape[1] - 1 : -1]  # (V^3, 3, V)
    probs = SAMPLING.probs(logits.reshape(-1, V), 0).reshape(len(seqs), N_TOKENS, V)
    return probs.gather(-1, seqs[..., None]).squeeze(-1).prod(dim=-1)


def sample_counts(model, drafter) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    counts = torch.zeros(V**N_TOKENS)
    for _ in range(N_SAMPLES):
        (tokens,), _ = decode(model, PROMPT, drafter, OPTIONS, gen)
        index = 0
        for tok in tokens:
            index = index * V + tok
        counts[index] += 1
    return counts


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit, cells with expected count < 5 pooled into one."""
    counts, probs = counts.double(), probs.double()
    expected = probs / probs.sum() * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] == 0:  # only impossible continuations pooled: seeing one fails outright
        if obs[-1] > 0:
            return 0.0
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


def accept_every_draft(tree, p, generator=None):
    """A wrong rule: keep every draft, then sample the bonus from p."""
    path = tree.paths[0].tolist() if len(tree) else []
    row = path[-1] + 1 if path else 0
    return Acceptance(path, int(torch.multinomial(p[row], 1, generator=generator)))


def drafters(small_draft, small_target):
    torch.manual_seed(5)
    heads = MedusaHeads(small_target.config.hidden_size, 2)
    for block in heads.blocks:
        torch.nn.init.normal_(block.weight, std=0.5)
    some = torch.tensor([0, 2, 3, 4])  # a reduced vocabulary: the drafts never propose 1 or 5
    return {
        "draft_chain": DraftModel(small_draft, k=2),
        "draft_tree": DraftModel(small_draft, k=2, top_k=3, width=2),  # i.i.d. siblings from q
        "lookup_chain": PromptLookup(k=3, max_ngram=2),
        "lookup_tree": PromptLookup(k=3, max_ngram=2, branches=3),  # point-mass siblings
        # siblings from different proposals: lookup point masses beside sampled model drafts
        "combined": Combined(PromptLookup(k=3, max_ngram=2), DraftModel(small_draft, k=2)),
        "eagle_tree": Eagle(EagleHead.from_target(small_target), vocab=some, k=2, top_k=2, width=2),
        "medusa_tree": Medusa(heads, tree=[[0], [1], [0, 0], [1, 0], [0, 1]]),
        "early_exit_tree": EarlyExit(layers=1, k=2, top_k=2, width=1),
        "adaptive_lookup_eagle": Adaptive(Combined(PromptLookup(k=3, max_ngram=2),
                                                   Eagle(EagleHead.from_target(small_target), k=2)), max_depth=3),
        "lookup_else_eagle": Combined(PromptLookup(k=3, max_ngram=2),
                                      Eagle(EagleHead.from_target(small_target), k=2, top_k=2, width=2), fallback=True),
    }


NAMES = ["draft_chain", "draft_tree", "lookup_chain", "lookup_tree", "combined", "eagle_tree", "medusa_tree",
         "early_exit_tree", "adaptive_lookup_eagle", "lookup_else_eagle"]


@pytest.mark.parametrize("name", NAMES)
def test_speculative_sampling_matches_target(small_target, small_draft, name):
    counts = sample_counts(small_target, drafters(small_draft, small_target)[name])
    assert chi2_pvalue(counts, exact_joint(small_target)) > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_wrong_rule_is_caught(small_target, small_draft, name, monkeypatch):
    monkeypatch.setattr(specdec.engine, "accept_sampling", accept_every_draft)
    counts = sample_counts(small_target, drafters(small_draft, small_target)[name])
    assert chi2_pvalue(counts, exact_joint(small_target)) < 1e-6


def test_plain_engine_sampling_matches_target(small_target):
    """The engine with no drafter is plain ancestral sampling: same law."""
    counts = sample_counts(small_target, specdec.engine.NO_DRAFT)
    assert chi2_pvalue(counts, exact_joint(small_target)) > 1e-3


def test_static_tree_sampling_matches_target(small_target, small_draft):
    drafter = DraftModel(small_draft, k=3, tree=[[0], [1], [0, 0], [0, 1], [1, 0]])
    counts = sample_counts(small_target, drafter)
    assert chi2_pvalue(counts, exact_joint(small_target)) > 1e-3


def test_sampling_in_a_batch_matches_target(small_target, small_draft):
    """Row 0 of a left-padded batch of two keeps the target's law while row 1 decodes beside it, with the
    goodput controller on (the default): each step's depth comes from the rows' acceptance so far."""
    other = torch.tensor([[0, 0, 0, 0, 0, 2, 5, 1, 3]])  # left-padded, a different prompt
    ids = torch.cat([PROMPT, other])
    mask = torch.cat([torch.ones_like(PROMPT), (other != 0).long()])
    gen = torch.Generator().manual_seed(99)
    drafter = DraftModel(small_draft, k=2, top_k=2)
    counts = torch.zeros(V**N_TOKENS)
    drafted = 0
    for _ in range(N_SAMPLES):
        (tokens, _), stats = decode(small_target, ids, drafter, OPTIONS, gen, attention_mask=mask)
        drafted += stats.drafted
        index = 0
        for tok in tokens:
            index = index * V + tok
        counts[index] += 1
    assert OPTIONS.goodput and drafted > 0
    assert chi2_pvalue(counts, exact_joint(small_target)) > 1e-3
