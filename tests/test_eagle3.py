"""EAGLE-3 heads: greedy equality with model.generate (single prompts, left-padded batches), the sampling
law with a wrong rule failing, the training-time test's attention (each position sees exactly the true
prefix and its own earlier steps, so training computes what drafting computes), the fused features the
engine hands over, and the int8 draft products."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import specdec
import specdec.engine
from specdec.drafters import DecodeState, Eagle, EagleHead, TargetView
from specdec.drafters.base import Verified
from specdec.drafters.network import GrowingProposer
from specdec.drafters.eagle import DraftLMHead, EagleNet, Int8Linear, default_fused_layers, ttt_mask
from specdec.drafters.vocab import ReducedHead
from specdec.engine import decode
from specdec.options import Options
from specdec.text import left_pad
from specdec.training.train import ttt_unroll

from conftest import tiny_llama
from test_generate import assert_rows_match_alone
from test_lossless_sampling import N_SAMPLES, N_TOKENS, PROMPT, SAMPLING, V, accept_every_draft, chi2_pvalue, exact_joint

OPTIONS = Options(max_new_tokens=N_TOKENS, sampling=SAMPLING, goodput=False)  # always draft: the rule is what is tested

FUSED = (0, 1, 2)  # of a 2-layer target: embeddings, after layer 1, after layer 2 (normed)
STATIC = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0, 0]]


def reference(model, ids, **kwargs):
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, **kwargs)


@pytest.fixture(scope="module")
def trained_head(target):
    """An EAGLE-3 head trained briefly on the target's own greedy outputs: its drafts are often accepted, so
    accepted paths (and the features they commit) are exercised, not only rejections."""
    from specdec.training.distill import teacher_pass
    from specdec.training.train import TrainSettings, train

    gen = torch.Generator().manual_seed(0)
    sequences = []
    for _ in range(40):
        prompt = torch.randint(3, 64, (1, 6), generator=gen)
        sequences.append(reference(target, prompt, max_new_tokens=40, eos_token_id=None)[0])
    data = teacher_pass(target, sequences, [6] * 40, layers=FUSED)
    settings = TrainSettings(epochs=12, lr=3e-3, batch_size=4, seq_len=32, vocab=0, holdout=4, eval_every=1000,
                             fused_layers=FUSED, unroll=3, eval_depths=3)
    head, _, _ = train("eagle", target, data, settings)
    return head


def eagle3(target, shape, k, quantize=True, vocab=None, head=None):
    head = head if head is not None else EagleHead.from_target(target, FUSED)
    shapes = {"chain": dict(k=k), "tree": dict(k=k, top_k=3, width=2, budget=2 * k), "static": dict(k=k, tree=STATIC)}
    return Eagle(head, vocab=vocab, quantize=quantize, **shapes[shape])


prompts = st.lists(st.integers(3, 63), min_size=1, max_size=24).map(lambda xs: torch.tensor([xs]))
shapes = st.sampled_from(["chain", "tree", "static"])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=prompts, shape=shapes, k=st.integers(1, 6), max_new=st.integers(1, 32), quantize=st.booleans(),
       reduced=st.booleans(), trained=st.booleans())
def test_greedy_equals_generate(target, trained_head, ids, shape, k, max_new, quantize, reduced, trained):
    vocab = torch.arange(0, target.config.vocab_size, 2) if reduced else None
    expected = reference(target, ids, max_new_tokens=max_new, eos_token_id=None)
    drafter = eagle3(target, shape, k, quantize, vocab, trained_head if trained else None)
    got = specdec.generate(target, ids, drafter, max_new_tokens=max_new, eos_token_id=None, goodput=False)
    assert torch.equal(got, expected)


batches = st.lists(st.lists(st.integers(3, 63), min_size=1, max_size=16), min_size=1, max_size=6)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=batches, shape=shapes, k=st.integers(1, 5), eos=st.sampled_from([None, 7, 30]), trained=st.booleans())
def test_batch_rows_equal_generate_alone(target, trained_head, rows, shape, k, eos, trained):
    drafter = eagle3(target, shape, k, head=trained_head if trained else None)
    assert_rows_match_alone(target, rows, drafter, max_new_tokens=20, eos=eos, goodput=False)


def test_trained_head_is_accepted(target, trained_head):
    ids = torch.tensor([[5, 9, 13, 7, 11, 3]])
    for shape in ("chain", "tree"):
        out = specdec.generate(target, ids, eagle3(target, shape, 4, head=trained_head), max_new_tokens=30,
                               eos_token_id=None, goodput=False, return_dict_in_generate=True)
        assert torch.equal(out.sequences, reference(target, ids, max_new_tokens=30, eos_token_id=None))
        assert out.stats.tau > 1.5, shape


def _from_scratch(target, head, tokens, k):
    """What the head drafts after ``tokens (1, n)``, recomputed from nothing (target features of the prefix,
    a causal pass over its pairs, then ``k`` greedy steps on its own states): the root's logits ``(V,)``
    and the greedy chain."""
    embed = target.get_input_embeddings()
    with torch.no_grad():
        hidden = target(tokens, output_hidden_states=True).hidden_states
        fused = torch.cat([hidden[layer] for layer in FUSED], dim=-1)
        n = tokens.shape[1]
        cache = DynamicCache(config=head.body.config)
        state = head(head.fuse_features(fused[:, : n - 1]), embed(tokens[:, 1:]), torch.arange(n - 1)[None],
                     cache)[:, -1:]
        root = target.lm_head(head.logit_states(state))[0, -1]
        chain = []
        for s in range(k):
            chain.append(int(target.lm_head(head.logit_states(state))[0, -1].argmax()))
            state = head(state, embed(torch.tensor([[chain[-1]]])), torch.tensor([[n - 1 + s]]), cache)
    return root, chain


def test_every_step_drafts_what_a_fresh_head_would(target, trained_head, monkeypatch):
    """Each step's root logits and chain, for every row of a left-padded batch, equal those recomputed from
    scratch over that row's committed tokens: the head's cache and the features it is handed stay aligned."""
    seen = []
    original = EagleNet.root

    def spy(self, states, depths):
        logits = original(self, states, depths)
        seen.extend((s.tokens.clone(), row) for s, row in zip(states, logits))
        return logits

    monkeypatch.setattr(EagleNet, "root", spy)
    chains = []
    original_propose = GrowingProposer.propose

    def propose(self, states, depths):
        trees = original_propose(self, states, depths)
        chains.extend((s.tokens.clone(), tree.tokens.tolist()) for s, tree in zip(states, trees))
        return trees

    monkeypatch.setattr(GrowingProposer, "propose", propose)
    rows = [[5, 9, 13, 7, 11, 3], [17, 4]]
    ids, mask = left_pad([torch.tensor(r) for r in rows], pad_id=0)
    out = specdec.generate(target, ids, Eagle(trained_head, k=4, quantize=False), attention_mask=mask,
                           max_new_tokens=24, eos_token_id=None, pad_token_id=0, goodput=False,
                           return_dict_in_generate=True)
    assert out.stats.tau > 1.5 and len(seen) > 10
    for tokens, logits in seen:
        assert torch.allclose(logits, _from_scratch(target, trained_head, tokens, 0)[0], atol=1e-4)
    for tokens, chain in chains:
        assert chain == _from_scratch(target, trained_head, tokens, 4)[1][: len(chain)]


def test_proposer_asks_for_the_fused_layers_and_gets_them_side_by_side(target, monkeypatch):
    seen = []
    original = EagleNet.prefill

    def spy(self, states, verified):
        seen.extend(v.hidden.shape for v in verified)
        return original(self, states, verified)

    monkeypatch.setattr(EagleNet, "prefill", spy)
    ids = torch.tensor([[5, 9, 13, 7]])
    specdec.generate(target, ids, eagle3(target, "chain", 2), max_new_tokens=4, eos_token_id=None, goodput=False)
    assert seen == [torch.Size([3, 3 * target.config.hidden_size])]
    assert eagle3(target, "chain", 2).proposer(TargetView(target, OPTIONS)).needs.layers == FUSED


def test_head_refuses_features_of_the_wrong_width(target):
    net = EagleNet(EagleHead.from_target(target, FUSED), target.get_input_embeddings(), ReducedHead(target.lm_head),
                   TargetView(target, OPTIONS))
    state = DecodeState(0, torch.tensor([[5, 6, 7]]), 3, 4, SAMPLING)
    with pytest.raises(ValueError, match=r"side by side \(width 96\) but got width 32.*needs"):
        net.prefill([state], [Verified(hidden=torch.zeros(2, target.config.hidden_size))])


def test_fused_layers_are_checked_against_the_target(target):
    assert default_fused_layers(30) == (2, 15, 27) and default_fused_layers(2) == (0, 1, 2)
    with pytest.raises(ValueError, match=r"fused_layers=\[0, 5\] must be indices in \[0, 2\]"):
        EagleHead(target.config, (0, 5))


# --- the training-time test -------------------------------------------------------------------------


def test_ttt_mask_sees_the_true_prefix_and_its_own_earlier_steps():
    n = 5
    valid = torch.tensor([[True] * 4 + [False]])
    for step in range(4):
        mask = ttt_mask(n, step, valid)[0, 0]  # (n, (step + 1) n)
        assert mask.shape == (n, (step + 1) * n)
        for j in range(n):
            want = {(0, i) for i in range(j + 1) if valid[0, i] or i == j} | {(s, j) for s in range(1, step + 1)}
            got = {(int(c) // n, int(c) % n) for c in mask[j].nonzero().flatten()}
            assert got == want, (step, j)


def _wrong_mask(n, step, valid):
    """A broken training-time test: each step attends causally within every step's keys."""
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None].expand(len(valid), -1, -1)
    return torch.cat([causal] * (step + 1), dim=2)[:, None]


@pytest.mark.parametrize("mask, exact", [(None, True), (ttt_mask, True), (_wrong_mask, False)],
                         ids=["structured", "ttt_mask", "wrong_mask"])
def test_ttt_unroll_computes_what_drafting_computes(mask, exact):
    """Training step s at index j equals the head drafting s steps below position j on its own states (the
    tokens fed are the true ones in both), through the structured attention training uses and through
    ttt_mask as an explicit mask; a mask that lets steps see their neighbours' steps fails."""
    torch.manual_seed(0)
    target = tiny_llama(seed=5, layers=3)
    head = EagleHead.from_target(target, (1, 2, 3))
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.2)  # far from the pass-through start, so every mistake shows
    embed = target.get_input_embeddings()
    tokens = torch.randint(3, 64, (2, 9))
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 7:] = False  # right padding: row 1 has 7 tokens
    with torch.no_grad():
        hidden = target(tokens, output_hidden_states=True).hidden_states
        fused = torch.cat([hidden[1], hidden[2], hidden[3]], dim=-1)
        positions = torch.arange(9).repeat(2, 1)
        steps = ttt_unroll(head, embed, fused, tokens, positions, valid, 4, mask)
        worst = 0.0
        for b in range(2):
            for j in range(int(valid[b].sum()) - 1):
                cache = DynamicCache(config=head.body.config)
                out = head(head.fuse_features(fused[b : b + 1, : j + 1]), embed(tokens[b : b + 1, 1 : j + 2]),
                           positions[b : b + 1, : j + 1], cache)  # the true prefix, causal
                state = out[:, -1:]
                for s in range(4):
                    if j + 1 + s >= int(valid[b].sum()):
                        break
                    if s:  # one draft step: its own previous state, the next true token
                        state = head(state, embed(tokens[b : b + 1, j + 1 + s : j + 2 + s]),
                                     positions[b : b + 1, j : j + 1] + s, cache)
                    worst = max(worst, float((steps[s][b, j] - state[0, -1]).abs().max()))
    assert (worst < 1e-5) == exact, worst


# --- sampling ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_target():
    return tiny_llama(vocab=V, seed=10, scale=4.0)


def sampled_eagle3(small_target):
    torch.manual_seed(5)
    head = EagleHead.from_target(small_target, FUSED)
    return Eagle(head, vocab=torch.tensor([0, 2, 3, 4]), k=2, top_k=2, width=2, quantize=True)  # q from int8


def sample_counts(model, drafter):
    gen = torch.Generator().manual_seed(1234)
    counts = torch.zeros(V**3)
    for _ in range(N_SAMPLES):
        (tokens,), _ = decode(model, PROMPT, drafter, OPTIONS, gen)
        counts[(torch.tensor(tokens) * torch.tensor([V * V, V, 1])).sum()] += 1
    return counts


def test_sampling_matches_target(small_target):
    assert chi2_pvalue(sample_counts(small_target, sampled_eagle3(small_target)), exact_joint(small_target)) > 1e-3


def test_wrong_rule_is_caught(small_target, monkeypatch):
    monkeypatch.setattr(specdec.engine, "accept_sampling", accept_every_draft)
    assert chi2_pvalue(sample_counts(small_target, sampled_eagle3(small_target)), exact_joint(small_target)) < 1e-6


# --- int8 draft products -----------------------------------------------------------------------------


def test_int8_linear_is_close_and_the_head_keeps_the_reduced_vocabulary():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    x = torch.randn(3, 5, 96)
    with torch.no_grad():
        exact, approx = linear(x), Int8Linear(linear)(x)
    assert approx.shape == exact.shape
    assert (approx - exact).abs().max() < 0.03 * exact.abs().max()
    head = torch.nn.Linear(96, 40, bias=False).requires_grad_(False)
    ids = torch.tensor([1, 5, 9])
    lm = DraftLMHead(ReducedHead(head, ids), int8=True)
    out = lm(x)
    assert out.shape == (3, 5, 40) and torch.isinf(out[..., [0, 2, 39]]).all()
    assert torch.allclose(out[..., ids], head(x)[..., ids], atol=0.05 * float(head(x).abs().max()))
