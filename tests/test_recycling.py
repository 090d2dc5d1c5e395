"""Token Recycling: the adjacency table and the retrieved trees equal brute-force references; greedy
output equals model.generate; sampling keeps the target's law; the cache stays whole; a shared
table warms later calls and serves threads."""

import random
from collections import deque

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import specdec
import specdec.engine
from specdec.drafters.base import DecodeState, TargetView, Verified
from specdec.drafters.recycling import DEFAULT_TREE, RecyclingTable, TokenRecycling
from specdec.engine import SpeculativeDecoder, prepare_target
from specdec.options import Options
from specdec.sampling import Sampling
from specdec.verify import Acceptance

from conftest import attentive, tiny_llama
from test_cache import assert_kv_close, fresh_prefill, kv
from test_generate import assert_rows_match_alone, reference
from test_lossless_sampling import accept_every_draft, chi2_pvalue, exact_joint, sample_counts
from test_lossless_sampling import every_step, small_target  # noqa: F401 - fixtures
from concurrency import interleaved


# --- brute-force references --------------------------------------------------------------------------

def brute_table(updates, k):
    """The table rebuilt from scratch: every verified position of every update, in order."""
    table = {}
    for verified, logits in updates:
        for tok, row in zip(verified.tolist(), logits):
            table[tok] = torch.argsort(row, descending=True, stable=True)[:k].tolist()
    return table


def brute_bfs(table, root, paths, max_depth):
    """Breadth-first from the root: a template path's node holds its parent's table row at its rank."""
    shape, out, queue = {tuple(p) for p in paths}, [], deque([((), root)])
    widest = max(r for p in paths for r in p)
    while queue:
        path, tok = queue.popleft()
        for rank in range(widest + 1):
            child = path + (rank,)
            if child in shape and len(child) <= max_depth and tok in table and rank < len(table[tok]):
                out.append((child, table[tok][rank]))
                queue.append(out[-1])
    paths_out = [p for p, _ in out]
    return [t for _, t in out], [paths_out.index(p[:-1]) if len(p) > 1 else -1 for p, _ in out]


TREES = [DEFAULT_TREE, [[0], [0, 0], [1], [0, 1], [0, 0, 0], [2], [1, 0], [1, 1], [0, 0, 1], [0, 0, 0, 0]],
         [[1], [0], [1, 2], [1, 2, 0], [0, 1]]]  # the last one is listed neither breadth-first nor in rank order


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10**6), steps=st.integers(1, 12), vocab=st.integers(3, 9), tree=st.sampled_from(TREES),
       max_depth=st.integers(0, 5))
def test_table_and_retrieval_equal_brute_force(seed, steps, vocab, tree, max_depth):
    """Random verification results through the proposer's commit: the table equals the one rebuilt from
    scratch, and every retrieved tree equals a brute-force BFS over it, at every step."""
    gen = torch.Generator().manual_seed(seed)
    drafter = TokenRecycling(tree=tree)
    k = drafter.top_k
    proposer = drafter.proposer(TargetView(torch.nn.Linear(1, 1), Options()))
    assert proposer.needs.logits
    updates = []
    for _ in range(steps):
        root = int(torch.randint(vocab, (1,), generator=gen))
        state = DecodeState(0, torch.tensor([[1, root]]), 1, 1 + max_depth + 1, Sampling())
        tree_out = proposer.propose([state], [state.budget])[0]
        expected = brute_bfs(brute_table(updates, k), root, tree, state.budget)
        assert (tree_out.tokens.tolist(), tree_out.parents.tolist()) == expected
        T = int(torch.randint(0, 7, (1,), generator=gen))
        verified = torch.randint(vocab, (T + 1,), generator=gen)  # (T + 1,) repeats overwrite
        seen = Verified(logits=torch.randn(T + 1, vocab, generator=gen), tokens=verified)  # logits (T + 1, V)
        updates.append((seen.tokens, seen.logits))
        proposer.commit([state], [Acceptance([], 0)], [seen])
        assert proposer.table.rows == brute_table(updates, k)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="top_k=1 is smaller than the tree's widest rank"):
        TokenRecycling(tree=[[0], [1]], top_k=1)
    with pytest.raises(ValueError, match="comes before its parent"):
        TokenRecycling(tree=[[0, 0], [0]])
    with pytest.raises(ValueError, match="k=0"):
        RecyclingTable(0)


# --- through the engine -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return attentive(tiny_llama(seed=0, layers=2))


def kinds():
    return {
        "per-call": lambda: TokenRecycling(),
        "wide": lambda: TokenRecycling(tree=TREES[1], top_k=4),
        "shared": lambda: TokenRecycling(shared=True),
    }


SHARED = {name: make() for name, make in kinds().items()}  # the shared tables warm over the examples
prompts = st.lists(st.integers(3, 63), min_size=1, max_size=24).map(lambda xs: torch.tensor([xs]))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=prompts, kind=st.sampled_from(sorted(SHARED)), max_new=st.integers(1, 40), fresh=st.booleans(),
       goodput=st.booleans())
def test_greedy_equals_generate(model, ids, kind, max_new, fresh, goodput):
    drafter = kinds()[kind]() if fresh else SHARED[kind]
    expected = reference(model, ids, max_new_tokens=max_new, eos_token_id=None)
    got = specdec.generate(model, ids, drafter, max_new_tokens=max_new, eos_token_id=None, goodput=goodput)
    assert torch.equal(got, expected)


batches = st.lists(st.lists(st.integers(3, 63), min_size=1, max_size=16), min_size=1, max_size=6)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=batches, kind=st.sampled_from(sorted(SHARED)), eos=st.sampled_from([None, 7, 30]))
def test_batch_rows_equal_generate_alone(model, rows, kind, eos):
    assert_rows_match_alone(model, rows, SHARED[kind], max_new_tokens=24, eos=eos)


def test_shared_table_warms_later_calls_and_eos_inside_a_block_stops_there(model):
    """A call on a warm shared table (an earlier call on the same prompt) accepts whole blocks; an EOS
    inside one ends the output exactly where model.generate does. The per-call table starts cold."""
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    plain = reference(model, ids, max_new_tokens=40, eos_token_id=None)
    drafter = TokenRecycling(shared=True)
    cold = specdec.generate(model, ids, drafter, max_new_tokens=40, eos_token_id=None, return_dict_in_generate=True,
                            goodput=False)
    assert torch.equal(cold.sequences, plain) and len(drafter.table(model)) > 0
    warm = specdec.generate(model, ids, drafter, max_new_tokens=40, eos_token_id=None, return_dict_in_generate=True,
                            goodput=False)
    assert torch.equal(warm.sequences, plain) and warm.stats.tau > cold.stats.tau
    per_call = TokenRecycling()
    for _ in range(2):  # nothing carried over: the same (cold) run twice
        again = specdec.generate(model, ids, per_call, max_new_tokens=40, eos_token_id=None,
                                 return_dict_in_generate=True, goodput=False)
        assert again.stats.tau == cold.stats.tau
    for eos in sorted(set(plain[0, 9:26].tolist())):
        expected = reference(model, ids, max_new_tokens=40, eos_token_id=eos)
        out = specdec.generate(model, ids, drafter, max_new_tokens=40, eos_token_id=eos, return_dict_in_generate=True,
                               goodput=False)
        assert torch.equal(out.sequences, expected)
        assert out.sequences[0, -1] == eos and out.stats.accepted > 0


def test_cache_equals_fresh_prefill_after_steps(model):
    rows = [[5, 6, 7, 5, 6, 7], [9, 5, 6], [11]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = (ids != 0).long()
    options = Options(max_new_tokens=40, sampling=Sampling(), goodput=False)  # a tree every step
    prepare_target(model, options)
    drafter = TokenRecycling(tree=TREES[1], top_k=4, shared=True)
    specdec.generate(model, ids, drafter, attention_mask=mask, max_new_tokens=40, eos_token_id=None, pad_token_id=0)
    decoder = SpeculativeDecoder(model, drafter, options)  # warm: trees from the first step on
    decoder.prefill(ids, mask)
    for _ in range(6):
        decoder.step()
        for a, state in enumerate(decoder.states):
            start, end = int(decoder.cache.start[a]), int(decoder.cache.end[a])
            assert end - start == state.tokens.shape[1] - 1
            assert_kv_close(kv(decoder.cache.cache, a, start, end), kv(fresh_prefill(model, state.tokens[:, :-1])))
    assert decoder.stats.drafted > 0


def test_threads_share_one_table(model):
    """Two threads, one drafter with a shared table both write and read, calls interleaved inside each
    other: every output is model.generate's."""
    rows = [[5, 9, 13, 7, 5, 9], [3, 4, 5, 3, 4], [12, 40, 41, 12], [7, 7, 8, 9], [20, 21, 22, 20, 21]]
    expected = {tuple(r): reference(model, torch.tensor([r]), max_new_tokens=20, eos_token_id=None)[0].tolist()
                for r in rows}
    drafter, failures = TokenRecycling(shared=True), []

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(8):
            row = rng.choice(rows)
            try:
                got = specdec.generate(model, torch.tensor([row]), drafter, max_new_tokens=20, eos_token_id=None)
                if got[0].tolist() != expected[tuple(row)]:
                    failures.append((row, got[0].tolist()))
            except Exception as err:  # a crash in a thread must fail the test too
                failures.append((row, repr(err)))

    interleaved(worker, (0, 1))
    assert failures == []


def test_a_table_per_target(model):
    """One shared drafter on two targets keeps two tables (another target's candidates never mix in)."""
    other = tiny_llama(vocab=16, seed=4)
    drafter = TokenRecycling(shared=True)
    for target, ids in ((model, torch.tensor([[40, 50, 60, 40]])), (other, torch.tensor([[3, 4, 5, 3]]))):
        got = specdec.generate(target, ids, drafter, max_new_tokens=12, eos_token_id=None)
        assert torch.equal(got, reference(target, ids, max_new_tokens=12, eos_token_id=None))
    assert drafter.table(model) is not drafter.table(other)
    assert all(t < 16 for row in drafter.table(other).rows.values() for t in row)


# --- sampling keeps the target's law (a warm shared table: trees at every step) ----------------------

def test_speculative_sampling_matches_target(small_target, every_step):
    counts = sample_counts(small_target, TokenRecycling(tree=TREES[1], top_k=4, shared=True))
    assert chi2_pvalue(counts, exact_joint(small_target)) > 1e-3


def test_wrong_rule_is_caught(small_target, every_step, monkeypatch):
    monkeypatch.setattr(specdec.engine, "accept_sampling", accept_every_draft)
    counts = sample_counts(small_target, TokenRecycling(tree=TREES[1], top_k=4, shared=True))
    assert chi2_pvalue(counts, exact_joint(small_target)) < 1e-6
