"""SuffixDecoding: the suffix automaton and the trees it grows equal brute-force scans; greedy output
equals model.generate; sampling keeps the target's law; the cache stays whole; the shared corpus
gives drafts to later calls and serves threads."""

import itertools
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import specdec
import specdec.engine
from specdec.drafters.base import DecodeState, TargetView, Verified
from specdec.drafters.suffix import SuffixAutomaton, SuffixCorpus, SuffixDecoding, grow
from specdec.engine import SpeculativeDecoder, prepare_target
from specdec.options import Options
from specdec.sampling import Sampling

from conftest import attentive, tiny_llama
from test_cache import assert_kv_close, fresh_prefill, kv
from test_generate import assert_rows_match_alone, reference
from test_lossless_sampling import accept_every_draft, chi2_pvalue, exact_joint, sample_counts
from test_lossless_sampling import every_step, small_target  # noqa: F401 - fixtures
from concurrency import interleaved


# --- brute-force references: O(n^2) scans of the documents ---------------------------------------

def ends(docs, w):
    """1-based end positions (over the documents laid end to end) of every occurrence of ``w``."""
    out, offset = [], 0
    for doc in docs:
        out += [offset + j + len(w) for j in range(len(doc) - len(w) + 1) if doc[j : j + len(w)] == w]
        offset += len(doc)
    return out


def own_match_length(text):
    """Longest suffix of ``text`` that also starts earlier (so a token followed it)."""
    n = len(text)
    return max(m for m in range(n) if m == 0 or any(text[j : j + m] == text[n - m :] for j in range(n - m)))


def corpus_match_length(docs, query):
    """Longest suffix of ``query`` that occurs in a document with a token after it."""
    return max(m for m in range(len(query) + 1)
               if m == 0 or any(doc[j : j + m] == query[len(query) - m :] for doc in docs for j in range(len(doc) - m)))


def brute_tree(docs, s, max_nodes, max_depth, min_prob):
    """Every continuation of ``s`` with its path probability, sorted by (-p, depth, ranks), cut by the rule."""
    vocab = sorted({t for doc in docs for t in doc})
    nodes = []

    def expand(path, prob, ranks):
        if len(path) == max_depth:
            return
        follow = {}
        for tok in vocab:
            e = ends(docs, s + path + [tok])
            if e:
                follow[tok] = (len(e), max(e))
        total = sum(c for c, _ in follow.values())
        for rank, tok in enumerate(sorted(follow, key=lambda t: (-follow[t][0], -follow[t][1]))):
            p = prob * (follow[tok][0] / total)
            if p >= min_prob:
                nodes.append((-p, len(path) + 1, ranks + (rank,), path + [tok]))
                expand(path + [tok], p, ranks + (rank,))

    expand([], 1.0, ())
    chosen = sorted(nodes)[:max_nodes]
    paths = [tuple(node[3]) for node in chosen]
    parents = [paths.index(p[:-1]) if len(p) > 1 else -1 for p in paths]
    score = 0.0
    for node in chosen:
        score -= node[0]
    return [p[-1] for p in paths], parents, score


def automaton(docs):
    sam = SuffixAutomaton()
    for doc in docs:
        sam.new_document()
        sam.extend(doc)
    return sam


random_docs = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=14), min_size=1, max_size=4)


@settings(max_examples=150, deadline=None)
@given(docs=random_docs, split=st.integers(0, 14))
def test_automaton_counts_equal_a_scan(docs, split):
    """Every string up to length 4: occurs iff the automaton has it, with the same count and latest end;
    a document appended in two pieces is the same as in one."""
    sam = SuffixAutomaton()
    for doc in docs:
        sam.new_document()
        sam.extend(doc[:split])
        sam.extend(doc[split:])
    assert sam.states <= 2 * sum(map(len, docs)) + 1
    for length in range(1, 5):
        for w in itertools.product(range(4), repeat=length):
            e, v = ends(docs, list(w)), sam.find(w)
            assert (v is None) == (not e)
            if e:
                assert (sam.count[v], sam.last[v]) == (len(e), max(e))


@settings(max_examples=150, deadline=None)
@given(text=st.lists(st.integers(0, 3), min_size=1, max_size=30), docs=random_docs,
       query=st.lists(st.integers(0, 3), min_size=1, max_size=12))
def test_longest_matches_equal_a_scan(text, docs, query):
    """The row's own longest earlier suffix (suffix link of the whole text), and a query's longest suffix
    with a continuation in a corpus (matching-statistics walk, token by token or in one go)."""
    _, m = automaton([text]).own_match()
    assert m == own_match_length(text)
    sam = automaton(docs)
    state, matched = 0, 0
    for tok in query:  # one token at a time, as steps feed it
        state, matched = sam.walk(state, matched, [tok])
    assert (state, matched) == sam.walk(0, 0, query)
    assert sam.continued(state, matched)[1] == corpus_match_length(docs, query)


@settings(max_examples=120, deadline=None)
@given(docs=random_docs, text=st.lists(st.integers(0, 3), min_size=2, max_size=24), max_nodes=st.integers(1, 10),
       max_depth=st.integers(1, 5), min_prob=st.sampled_from([0.01, 0.1, 0.25, 0.5]))
def test_grown_tree_equals_brute_force(docs, text, max_nodes, max_depth, min_prob):
    """Trees from the row's own match and from a corpus match equal the brute-force rule."""
    sam = automaton([text])
    u, m = sam.own_match()
    if m:
        assert grow(sam, u, max_nodes, max_depth, min_prob) == brute_tree([text], text[-m:], max_nodes, max_depth,
                                                                           min_prob)
    sam = automaton(docs)
    v, m = sam.continued(*sam.walk(0, 0, text))
    if m:
        assert grow(sam, v, max_nodes, max_depth, min_prob) == brute_tree(docs, text[-m:], max_nodes, max_depth,
                                                                          min_prob)


@pytest.fixture(scope="module")
def model():
    return attentive(tiny_llama(seed=0, layers=2))


def test_proposer_equals_brute_force_over_steps(model):
    """The proposer over random steps (tokens appended, documents added to the corpus mid-call): each
    tree is the brute-force tree of the row's own match or of the corpus match, whichever scores
    higher (the row's on a tie), sized by ceil(factor * match length), capped by the budget."""
    rng = random.Random(3)
    for trial in range(40):
        docs = [[rng.randrange(4) for _ in range(rng.randint(1, 12))] for _ in range(rng.randint(0, 3))]
        drafter = SuffixDecoding(k=4, max_nodes=rng.choice([3, 6, 10]), max_spec_factor=rng.choice([0.5, 1.0, 3.0]),
                                 min_prob=rng.choice([0.05, 0.2]), min_match=rng.choice([1, 2]),
                                 corpus=SuffixCorpus(docs))
        proposer = drafter.proposer(TargetView(model, Options()))
        tokens = [rng.randrange(4) for _ in range(rng.randint(1, 10))]
        state = DecodeState(0, torch.tensor([tokens]), len(tokens), 12, Sampling())
        proposer.prefill([state], [Verified()])
        while state.budget > 0:
            tree = proposer.propose([state], [state.budget])[0]
            depth = min(drafter.k, state.budget)
            best = ([], [], 0.0)
            m = own_match_length(tokens)
            if m >= drafter.min_match:
                best = brute_tree([tokens], tokens[-m:], drafter.limit(m), depth, drafter.min_prob)
            m = corpus_match_length(docs, tokens) if docs else 0
            if m >= drafter.min_match:
                found = brute_tree(docs, tokens[-m:], drafter.limit(m), depth, drafter.min_prob)
                best = found if found[2] > best[2] else best
            assert (tree.tokens.tolist(), tree.parents.tolist()) == best[:2]
            if docs:
                row = proposer.rows[0]
                with drafter.corpus.read() as (sam, _):
                    assert sam.continued(row.state, row.matched)[1] == m
            tokens = tokens + [rng.randrange(4) for _ in range(rng.randint(1, 3))]
            state.tokens = torch.tensor([tokens])
            if rng.random() < 0.4:  # often a longer match than the row's walk so far has seen
                docs.append(tokens[-rng.randint(1, 6):] + [rng.randrange(4) for _ in range(rng.randint(0, 6))])
                drafter.corpus.add(docs[-1])


def test_interrupted_add_leaves_the_corpus_whole(monkeypatch):
    """An add cut short inside the automaton (a KeyboardInterrupt half-way) is rebuilt at the next read."""
    docs = [[0, 1, 2, 1, 2], [2, 1, 0]]
    corpus = SuffixCorpus(docs[:1])
    extend = SuffixAutomaton.extend

    def half(self, tokens):
        tokens = list(tokens)
        extend(self, tokens[: len(tokens) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(SuffixAutomaton, "extend", half)
    with pytest.raises(KeyboardInterrupt):
        corpus.add(docs[1])
    monkeypatch.setattr(SuffixAutomaton, "extend", extend)
    with corpus.read() as (sam, _):
        for w in ([1, 0], [2, 1], [1], [0]):
            assert sam.count[sam.find(w)] == len(ends(docs, w))


def test_bad_arguments_are_refused(model):
    with pytest.raises(ValueError, match="max_nodes=0"):
        SuffixDecoding(max_nodes=0)
    with pytest.raises(ValueError, match="learn='prompt'"):
        SuffixDecoding(learn="prompt")
    with pytest.raises(ValueError, match="token id -1"):
        SuffixCorpus([[3, -1]])
    with pytest.raises(ValueError, match="token id 70, outside the target's vocabulary of 64"):
        specdec.generate(model, torch.tensor([[5, 6]]), SuffixDecoding(corpus=SuffixCorpus([[70]])), max_new_tokens=2)


# --- through the engine -----------------------------------------------------------------------------

def kinds():
    return {
        "default": lambda: SuffixDecoding(),
        "own-text": lambda: SuffixDecoding(k=5, corpus=None),
        "wide": lambda: SuffixDecoding(k=6, max_nodes=12, max_spec_factor=4.0, min_prob=0.02, min_match=1),
    }


SHARED = {name: make() for name, make in kinds().items()}  # corpora that grow over the examples below
prompts = st.lists(st.integers(3, 12), min_size=1, max_size=24).map(lambda xs: torch.tensor([xs]))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=prompts, kind=st.sampled_from(sorted(SHARED)), max_new=st.integers(1, 40), shared=st.booleans(),
       goodput=st.booleans())
def test_greedy_equals_generate(model, ids, kind, max_new, shared, goodput):
    drafter = SHARED[kind] if shared else kinds()[kind]()
    expected = reference(model, ids, max_new_tokens=max_new, eos_token_id=None)
    got = specdec.generate(model, ids, drafter, max_new_tokens=max_new, eos_token_id=None, goodput=goodput)
    assert torch.equal(got, expected)


batches = st.lists(st.lists(st.integers(3, 12), min_size=1, max_size=16), min_size=1, max_size=6)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=batches, kind=st.sampled_from(sorted(SHARED)), eos=st.sampled_from([None, 7, 30]))
def test_batch_rows_equal_generate_alone(model, rows, kind, eos):
    assert_rows_match_alone(model, rows, SHARED[kind], max_new_tokens=24, eos=eos)


def test_eos_inside_a_block_stops_exactly_there(model):
    """The corpus holds the prompt and its greedy continuation, so whole blocks are accepted; an EOS
    inside one ends the output exactly where model.generate does."""
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    plain = reference(model, ids, max_new_tokens=40, eos_token_id=None)[0].tolist()
    for eos in sorted(set(plain[9:26])):
        expected = reference(model, ids, max_new_tokens=40, eos_token_id=eos)
        drafter = SuffixDecoding(k=8, corpus=SuffixCorpus([plain]), learn="none")
        out = specdec.generate(model, ids, drafter, max_new_tokens=40, eos_token_id=eos, return_dict_in_generate=True,
                               goodput=False)
        assert torch.equal(out.sequences, expected)
        assert out.sequences[0, -1] == eos and out.stats.accepted > out.stats.steps  # whole blocks taken


def test_cache_equals_fresh_prefill_after_steps(model):
    drafter = SuffixDecoding(k=4, max_nodes=6, min_prob=0.05, min_match=1, corpus=SuffixCorpus([[5, 6, 7, 8, 5, 6]]))
    rows = [[5, 6, 7, 5, 6, 7], [9, 5, 6], [11]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = (ids != 0).long()
    options = Options(max_new_tokens=40, sampling=Sampling(), goodput=False)  # a tree every step
    prepare_target(model, options)
    decoder = SpeculativeDecoder(model, drafter, options)
    decoder.prefill(ids, mask)
    for _ in range(6):
        decoder.step()
        for a, state in enumerate(decoder.states):
            start, end = int(decoder.cache.start[a]), int(decoder.cache.end[a])
            assert end - start == state.tokens.shape[1] - 1
            assert_kv_close(kv(decoder.cache.cache, a, start, end), kv(fresh_prefill(model, state.tokens[:, :-1])))
    assert decoder.stats.drafted > 0


def test_corpus_gives_drafts_to_a_later_call(model):
    """A second call on a prompt whose continuation is an earlier call's output (the first prompt and
    the start of its output) drafts that output from the corpus: more tokens a step than the same
    drafter with an empty corpus, and exact."""
    first = torch.tensor([[3, 17, 29, 41, 5]])
    out = reference(model, first, max_new_tokens=40, eos_token_id=None)[0, 5:].tolist()
    second = torch.tensor([first[0].tolist() + out[:6]])
    expected = reference(model, second, max_new_tokens=30, eos_token_id=None)
    learned = SuffixDecoding(k=6)
    specdec.generate(model, first, learned, max_new_tokens=40, eos_token_id=None)
    assert learned.corpus.documents == 1 and len(learned.corpus) == 40
    taus = []
    for drafter in (learned, SuffixDecoding(k=6)):
        got = specdec.generate(model, second, drafter, max_new_tokens=30, eos_token_id=None,
                               return_dict_in_generate=True, goodput=False)
        assert torch.equal(got.sequences, expected)
        taus.append(got.stats.tau)
    assert taus[0] > taus[1] + 0.5


def test_threads_share_one_drafter(model):
    """Two threads, one drafter (one corpus both learn into and draft from), calls interleaved
    inside each other: every output is model.generate's."""
    rows = [[5, 9, 13, 7, 5, 9], [3, 4, 5, 3, 4], [12, 40, 41, 12], [7, 7, 8, 9], [20, 21, 22, 20, 21]]
    expected = {tuple(r): reference(model, torch.tensor([r]), max_new_tokens=20, eos_token_id=None)[0].tolist()
                for r in rows}
    drafter, failures = SuffixDecoding(k=5, min_match=1), []

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
    assert failures == [] and drafter.corpus.documents == 16


# --- sampling keeps the target's law --------------------------------------------------------------

def sampling_drafter():
    """Trees with siblings: the corpus learns prompt + output of every sample and branches by frequency."""
    return SuffixDecoding(k=3, max_nodes=6, max_spec_factor=2.0, min_prob=0.05, min_match=1, learn="all")


def test_speculative_sampling_matches_target(small_target, every_step):
    counts = sample_counts(small_target, sampling_drafter())
    assert chi2_pvalue(counts, exact_joint(small_target)) > 1e-3


def test_wrong_rule_is_caught(small_target, every_step, monkeypatch):
    monkeypatch.setattr(specdec.engine, "accept_sampling", accept_every_draft)
    counts = sample_counts(small_target, sampling_drafter())
    assert chi2_pvalue(counts, exact_joint(small_target)) < 1e-6
