"""The block drafter on the target's features: greedy equality with model.generate alone and with DDTree trees
(single prompts, left-padded batches, EOS inside a block), the sampling law (a wrong rule fails), threads and
interrupts, its training layout, training lowering the loss on a tiny model, and a checkpoint made for another
target refused."""

from __future__ import annotations


import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import specdec
import specdec.engine
from specdec.drafters import BlockDrafter, BlockHead
from specdec.drafters.block import BlockNet, anchor_blocks, chain_weights
from specdec.drafters.ddtree import BlockProposer
from specdec.drafters.network import GrowingProposer
from specdec.engine import decode
from specdec.options import Options
from specdec.text import left_pad
from specdec.training.checkpoint import save_checkpoint
from specdec.training.distill import teacher_pass
from specdec.training.train import TrainSettings, module_settings, train, trained_weights

from concurrency import ROWS, alone, interrupted_calls, new_tokens, thread_failures
from conftest import attentive, tiny_llama
from test_generate import assert_rows_match_alone
from test_lossless_sampling import N_TOKENS, PROMPT, SAMPLING, V, accept_every_draft, chi2_pvalue, exact_joint

FUSED = (0, 1, 2)  # of a 2-layer target: the embeddings, after layer 1, after layer 2
STATIC = [[0], [1], [0, 0], [0, 1], [0, 0, 0], [0, 0, 1], [0, 0, 0, 0]]  # the top-2 at each depth


def reference(model, ids, **kwargs):
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, **kwargs)


def own_outputs(model, n=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [reference(model, torch.randint(3, 64, (1, 6), generator=gen), max_new_tokens=40, eos_token_id=None)[0]
            for _ in range(n)]


def quick(**overrides) -> TrainSettings:
    base = dict(epochs=8, lr=1e-2, batch_size=4, seq_len=32, vocab=0, holdout=4, eval_every=1000, fused_layers=FUSED,
                block=4, anchors=8, eval_depths=4)
    return TrainSettings(**(base | overrides))


@pytest.fixture(scope="module")
def trained(target):
    """A block head trained briefly on the target's own greedy outputs (drafts often accepted, so accepted
    blocks and the features they commit are exercised), with its losses."""
    data = teacher_pass(target, own_outputs(target), [6] * 40, layers=FUSED)
    losses = []
    head, vocab, metrics = train("block", target, data, quick(), log=lambda m, step: losses.append(m["train/loss"]))
    return head, losses, data


SHAPES = {"chain": dict(), "tree": dict(top_k=2, width=2), "static": dict(tree=STATIC), "ddtree": dict(tree="ddtree")}


def block(target, shape, k, head=None, quantize=False, vocab=None, budget=None):
    head = head if head is not None else BlockHead.from_target(target, FUSED)
    extra = SHAPES[shape] | ({} if budget is None and shape != "tree" else {"budget": budget or 2 * k})
    return BlockDrafter(head, vocab, k=k, quantize=quantize, **extra)


# --- greedy equality ------------------------------------------------------------------------------------

prompts = st.lists(st.integers(3, 63), min_size=1, max_size=24).map(lambda xs: torch.tensor([xs]))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=prompts, shape=st.sampled_from(sorted(SHAPES)), k=st.integers(1, 8), max_new=st.integers(1, 32),
       quantize=st.booleans(), reduced=st.booleans(), is_trained=st.booleans(), goodput=st.booleans())
def test_greedy_equals_generate(target, trained, ids, shape, k, max_new, quantize, reduced, is_trained, goodput):
    vocab = torch.arange(0, target.config.vocab_size, 2) if reduced else None
    drafter = block(target, shape, k, trained[0] if is_trained else None, quantize, vocab)
    expected = reference(target, ids, max_new_tokens=max_new, eos_token_id=None)
    got = specdec.generate(target, ids, drafter, max_new_tokens=max_new, eos_token_id=None, goodput=goodput)
    assert torch.equal(got, expected)


batches = st.lists(st.lists(st.integers(3, 63), min_size=1, max_size=16), min_size=1, max_size=5)


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=batches, shape=st.sampled_from(sorted(SHAPES)), k=st.integers(1, 6), eos=st.sampled_from([None, 7, 30]))
def test_batch_rows_equal_generate_alone(target, trained, rows, shape, k, eos):
    """Left-padded rows of different lengths, drafted in one forward and verified together."""
    assert_rows_match_alone(target, rows, block(target, shape, k, trained[0]), max_new_tokens=20, eos=eos,
                            goodput=False)


def test_trained_drafts_are_accepted(target, trained):
    ids = trained[2].sequences[-1][None, :6]  # a held-out prompt
    for shape in ("chain", "ddtree"):
        out = specdec.generate(target, ids, block(target, shape, 4, trained[0], budget=8), max_new_tokens=30,
                               eos_token_id=None, goodput=False, return_dict_in_generate=True)
        assert torch.equal(out.sequences, reference(target, ids, max_new_tokens=30, eos_token_id=None))
        assert out.stats.tau > 1.3, shape


@pytest.mark.parametrize("shape", ["chain", "ddtree"])
def test_eos_inside_a_block_ends_the_row_there(target, monkeypatch, shape):
    """The block holds EOS with drafts after it: the row stops at EOS, as plain decoding does. (The marginals
    get a peak at the target's own continuation, so the blocks reach past the EOS.)"""
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):  # a prompt whose greedy answer writes a new token mid-way: that token is the EOS
        ids = torch.randint(3, 64, (1, 6), generator=gen)
        free = reference(target, ids, max_new_tokens=40, eos_token_id=None)[0, 6:].tolist()
        fresh = [i for i in range(6, 20) if free[i] not in free[:i]]
        if fresh:
            eos = free[fresh[0]]
            break
    marginals = BlockNet.marginals

    def peaked(self, states, depths):
        logits = marginals(self, states, depths)  # (A, K, V)
        for a, state in enumerate(states):
            n = state.tokens.shape[1] - 6
            logits[a, torch.arange(logits.shape[1]), torch.tensor(free[n : n + logits.shape[1]])] += 50.0
        return logits

    below_eos = []
    proposer = BlockProposer if shape == "ddtree" else GrowingProposer
    propose = proposer.propose

    def spy(self, states, *args):
        trees = propose(self, states, *args)
        for tree in trees:
            eos_nodes = (tree.tokens == eos).nonzero().flatten()
            below_eos.append(bool(torch.isin(tree.parents, eos_nodes).any()))
        return trees

    monkeypatch.setattr(BlockNet, "marginals", peaked)
    monkeypatch.setattr(proposer, "propose", spy)
    expected = reference(target, ids, max_new_tokens=30, eos_token_id=eos)
    out = specdec.generate(target, ids, block(target, shape, 4, budget=8), max_new_tokens=30, eos_token_id=eos,
                           pad_token_id=0, goodput=False, return_dict_in_generate=True)
    assert out.sequences.tolist() == expected.tolist()
    assert out.sequences[0, -1] == eos and out.sequences.shape[1] < 6 + 30
    assert any(below_eos)  # EOS proposed with drafts after it
    assert out.stats.tau > 2.5  # the peaks are the target's own tokens: accepted


def test_the_cache_holds_one_context_column_per_committed_token_but_the_root(target, monkeypatch):
    """After every step each row's draft cache holds exactly the tokens before its root (the block dropped),
    and the proposer asks the engine for the fused layers."""
    seen = []
    commit = BlockNet.commit

    def check(self, states, fed, verified):
        assert self.needs.hidden and self.needs.layers == FUSED
        commit(self, states, fed, verified)
        if self.cache is not None:
            for a, row in enumerate(self.rows.order):
                pending = len(self.pending[row])
                assert int(self.cache.lengths[a]) + pending == self.rows.latest[row].tokens.shape[1] - 1
                seen.append(pending)

    monkeypatch.setattr(BlockNet, "commit", check)
    ids, mask = left_pad([torch.tensor(r) for r in [[5, 6, 7, 8, 5, 6, 7], [9, 10, 11], [3]]], pad_id=0)
    specdec.generate(target, ids, block(target, "chain", 3), attention_mask=mask, max_new_tokens=12, eos_token_id=30,
                     pad_token_id=0, goodput=False)
    assert len(seen) > 6


def test_bad_settings_are_refused(target):
    with pytest.raises(ValueError, match="needs a BlockHead"):
        BlockDrafter(target)
    ckpt = {"settings": {"block": 4}, "path": "b.pt"}
    with pytest.raises(ValueError, match=r"trained for blocks of 4 tokens: k=6"):
        BlockDrafter(BlockHead.from_target(target, FUSED), checkpoint=ckpt, k=6)
    wide = tiny_llama(seed=0, layers=2, hidden=48)
    with pytest.raises(ValueError, match="hidden size 48"):
        specdec.generate(wide, torch.tensor([[3, 4, 5]]), block(target, "chain", 2), max_new_tokens=3)


# --- sampling ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_target():
    return tiny_llama(vocab=V, seed=10, scale=4.0)


ENGINE_SAMPLES = 800  # decodes per law test (CI's budget); test_lossless_sampling takes N_SAMPLES for the rule itself


def sample_counts(model, drafter):
    gen = torch.Generator().manual_seed(1234)
    counts = torch.zeros(V**N_TOKENS)
    options = Options(max_new_tokens=N_TOKENS, sampling=SAMPLING, goodput=False)  # a draft at every step
    for _ in range(ENGINE_SAMPLES):
        (tokens,), _ = decode(model, PROMPT, drafter, options, gen)
        counts[(torch.tensor(tokens) * torch.tensor([V * V, V, 1])).sum()] += 1
    return counts


def sampled(small_target, shape):
    torch.manual_seed(5)
    head = BlockHead.from_target(small_target, FUSED)
    torch.nn.init.normal_(head.mask, std=1.0)
    vocab = torch.tensor([0, 2, 3, 4])  # the drafts never propose 1 or 5
    return BlockDrafter(head, vocab, k=3, quantize=shape == "chain", **({"tree": "ddtree", "budget": 6}
                                                                          if shape == "ddtree" else {}))


@pytest.mark.parametrize("shape", ["chain", "ddtree"])
def test_sampling_matches_target(small_target, shape):
    """Chains draw each position from its q (int8 q here); DDTree nodes are deterministic candidates."""
    counts = sample_counts(small_target, sampled(small_target, shape))
    assert chi2_pvalue(counts, exact_joint(small_target)) > 1e-3


def test_wrong_rule_is_caught(small_target, monkeypatch):
    monkeypatch.setattr(specdec.engine, "accept_sampling", accept_every_draft)
    counts = sample_counts(small_target, sampled(small_target, "chain"))
    assert chi2_pvalue(counts, exact_joint(small_target)) < 1e-6


# --- threads and interrupts ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharp():
    target = attentive(tiny_llama(seed=0, layers=2))
    return target, {"chain": block(target, "chain", 4), "ddtree": block(target, "ddtree", 4, budget=8)}


def test_threads_share_one_drafter_and_give_the_single_threaded_outputs(sharp):
    target, drafters = sharp
    assert thread_failures(target, drafters, calls_per_thread=4) == []


def test_interrupts_at_random_moments_change_no_later_result(sharp):
    """Calls cut short by a timer signal (KeyboardInterrupt) at random moments: the same drafter objects give
    the reference outputs afterwards."""
    target, drafters = sharp
    expected = {tuple(r): alone(target, r) for r in ROWS}
    assert interrupted_calls(target, drafters, calls=40) >= 10
    for name, drafter in drafters.items():
        assert new_tokens(target, ROWS[:3], drafter) == [expected[tuple(r)] for r in ROWS[:3]], name
    assert torch.is_grad_enabled()


# --- training ------------------------------------------------------------------------------------------


def test_anchor_blocks_see_their_prefix_and_their_own_block():
    positions = torch.arange(6)[None] + 40
    valid = torch.tensor([[True] * 5 + [False]])  # 5 real tokens, one padding column
    out = anchor_blocks(positions, valid, torch.tensor([2]), 2, 10)
    assert out["anchor"][0].tolist() == [2, 3, 4]  # at or after the answer, each with a label (n < 5)
    assert out["label_index"][0].tolist() == [[2, 3], [3, 4], [4, -1]]  # mask i: label n + i - 1, none past the end
    assert out["positions"][0, 6:].tolist() == [42, 43, 44, 43, 44, 45, 44, 45, 46]
    visible = out["visible"][0, 0]
    for q in range(5):  # context: its causal prefix
        assert visible[q].nonzero().flatten().tolist() == list(range(q + 1))
    assert visible[5].nonzero().flatten().tolist() == [5]  # padding sees itself
    for c, n in enumerate([2, 3, 4]):  # a block: the context before its root, and all of its own columns
        cols = [6 + 3 * c + i for i in range(3)]
        for q in cols:
            assert visible[q].nonzero().flatten().tolist() == list(range(n)) + cols
    few = anchor_blocks(positions, valid, torch.tensor([0]), 2, 2, torch.Generator().manual_seed(0))
    assert few["anchor"].shape == (1, 2) and len(set(few["anchor"][0].tolist())) == 2
    none = anchor_blocks(positions, valid, torch.tensor([9]), 2, 4)  # a chunk inside the prompt: no anchors
    assert none["anchor"][0].tolist() == [-1] and (none["label_index"] == -1).all()


def test_chain_weights_decay_and_follow_the_chance_of_reaching_a_depth():
    logq = torch.log(torch.tensor([[0.5, 0.25, 0.8]]))
    assert torch.allclose(chain_weights(logq, 0.5, 0.0), torch.tensor([[1.0, 0.5, 0.25]]))
    reach = torch.tensor([[1.0, 0.5, 0.125]])
    assert torch.allclose(chain_weights(logq, 1.0, 1.0), reach)
    assert torch.allclose(chain_weights(logq, 0.5, 0.5), torch.tensor([[1.0, 0.5, 0.25]]) * (0.5 + 0.5 * reach))


def test_training_lowers_the_loss(trained):
    _, losses, _ = trained
    assert len(losses) >= 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.92 * first, (first, last)  # a flat random target: depths past 1 stay hard to guess


def test_checkpoint_round_trip_and_another_target_is_refused(target, trained, tmp_path):
    head, _, data = trained
    settings = quick()
    path = save_checkpoint(tmp_path / "block.pt", "block", trained_weights("block", head),
                           module_settings("block", target, settings), target, None, "tiny-target")
    drafter = BlockDrafter.from_checkpoint(str(path), k=4)
    saved = torch.load(path)["settings"]
    assert saved["block"] == 4 and saved["fused_layers"] == list(FUSED) and saved["history"][-1]["seed"] == 0
    ids = data.sequences[-1][None, :6]
    out = specdec.generate(target, ids, drafter, max_new_tokens=30, eos_token_id=None, goodput=False,
                           return_dict_in_generate=True)
    assert torch.equal(out.sequences, reference(target, ids, max_new_tokens=30, eos_token_id=None))
    assert out.stats.tau > 1.3
    other = tiny_llama(seed=4, layers=2)  # the same architecture, other weights
    with pytest.raises(ValueError, match="trained for target 'tiny-target'"):
        specdec.generate(other, ids, BlockDrafter.from_checkpoint(str(path)), max_new_tokens=5)
    resumed = module_settings("block", target, quick(init_from=str(path), seed=1))
    assert [run["seed"] for run in resumed["history"]] == [0, 1]  # how it was made, run by run
