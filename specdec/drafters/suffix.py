"""Suffix-structure drafting: continue the longest suffix of the text that occurred before, as a
tree of the continuations seen there, scored by how often each occurred.

SuffixDecoding (Oliaro et al. 2024, "SuffixDecoding: Extreme Speculative Decoding for Emerging AI
Applications") keeps suffix trees over each request's prompt and output and over the outputs of
earlier requests, matches the text's last tokens in them, and drafts a tree of the continuations
below the match: each branch's score is the product of empirical probabilities along its path
(how often a continuation followed, over all that followed), nodes under ``min_prob`` are pruned,
and the tree grows to at most ``max_spec_factor * match_length`` nodes, so a long match (a
confident one) gets a big tree and a short one a small tree. SAM Decoding (Hu et al. 2024, "SAM
Decoding: Speculative Decoding via Suffix Automaton") finds the longest match with a suffix
automaton in amortised O(1) per token. This file does both:

* :class:`SuffixAutomaton`: an online (generalised, several documents) suffix automaton
  (Blumer et al. 1985) whose states carry occurrence counts and the end of the latest occurrence.
  Appending a token costs O(1) amortised plus one step per state on the new text's suffix-link
  path (the suffixes with distinct occurrence sets: about the length of the longest repeated
  suffix, so amortised O(match length)).
* each row of a call gets its own automaton over prompt + output (the proposer's, per call); the
  longest earlier-occurring suffix of the row is the suffix link of the whole text's state, O(1);
* :class:`SuffixCorpus`: one automaton over many documents that the drafter shares across calls
  and threads (behind a lock): the outputs of finished rows are added at their last commit, and
  a user may fill it beforehand. Each row follows its longest suffix found there with the usual
  matching-statistics walk (amortised O(1) per token; a walk from the start when the corpus changed).

Each step the row's match and the corpus's match each grow a tree (:func:`grow`), and the one with
the larger score (the sum of its nodes' path probabilities: the expected number of accepted tokens
if the probabilities were right) is proposed. Siblings are ordered by count, then recency (the
latest occurrence first, as prompt lookup prefers recent text). Deterministic: ``q`` is ``None``.
"""

from __future__ import annotations

import heapq
import math
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from specdec.checks import as_int, as_number
from specdec.drafters.base import DecodeState, Drafter, Proposer, TargetView, Verified
from specdec.tree import DraftTree
from specdec.verify import Acceptance


class SuffixAutomaton:
    """An online suffix automaton over one or more documents, with occurrence counts.

    State 0 is the root (the empty string). Each state ``v`` is a class of substrings with the same
    set of end positions: ``length[v]`` is the longest of them, ``link[v]`` the state of the longest
    suffix outside the class, ``next[v]`` maps a token to the state of the class's strings followed
    by it, ``count[v]`` is how many times the class's strings occur (end positions, over all
    documents) and ``last[v]`` the latest end position (1-based over all tokens ever appended).
    """

    __slots__ = ("next", "link", "length", "count", "last", "end", "size")

    def __init__(self) -> None:
        self.next: list[dict[int, int]] = [{}]
        self.link, self.length, self.count, self.last = [-1], [0], [0], [0]
        self.end = 0  # the state of the current document so far
        self.size = 0  # tokens appended, over all documents

    def __len__(self) -> int:
        return self.size

    @property
    def states(self) -> int:
        """States held (at most twice the tokens appended)."""
        return len(self.length)

    def new_document(self) -> None:
        """Start a new document: later tokens extend nothing appended before (no match spans two)."""
        self.end = 0

    def extend(self, tokens: Iterable[int]) -> None:
        """Append ``tokens`` to the current document."""
        nxt, link, length, count, last = self.next, self.link, self.length, self.count, self.last
        end, n = self.end, self.size
        for c in tokens:
            n += 1
            q = nxt[end].get(c)
            if q is not None:  # another document already has (current document + c): no new state
                if length[end] + 1 == length[q]:
                    cur = q
                else:
                    cur = self._clone(end, c, q)
            else:
                cur = len(length)
                nxt.append({})
                length.append(length[end] + 1)
                link.append(0)
                count.append(0)
                last.append(0)
                p = end
                while p != -1 and c not in nxt[p]:
                    nxt[p][c] = cur
                    p = link[p]
                if p != -1:
                    q = nxt[p][c]
                    link[cur] = q if length[p] + 1 == length[q] else self._clone(p, c, q)
            # every suffix of the document so far now also ends at n: the states on cur's link path
            v = cur
            while v > 0:
                count[v] += 1
                last[v] = n
                v = link[v]
            end = cur
        self.end, self.size = end, n

    def _clone(self, p: int, c: int, q: int) -> int:
        """Split ``q``: its strings of length <= length[p] + 1 move to a new state (which also gets the
        next occurrence); transitions to them from p's link path are redirected."""
        nxt, link, length = self.next, self.link, self.length
        clone = len(length)
        nxt.append(dict(nxt[q]))
        length.append(length[p] + 1)
        link.append(link[q])
        self.count.append(self.count[q])
        self.last.append(self.last[q])
        while p != -1 and nxt[p].get(c) == q:
            nxt[p][c] = clone
            p = link[p]
        link[q] = clone
        return clone

    def find(self, tokens: Iterable[int]) -> int | None:
        """The state of ``tokens`` as a substring, or ``None`` when it never occurred."""
        v = 0
        for c in tokens:
            v = self.next[v].get(c)
            if v is None:
                return None
        return v

    def walk(self, state: int, matched: int, tokens: Iterable[int]) -> tuple[int, int]:
        """Matching statistics: from ``(state, matched)``, the longest suffix of the text read so far
        that occurs here, after reading ``tokens`` too: ``(its state, its length)``."""
        nxt, link, length = self.next, self.link, self.length
        for c in tokens:
            while state and c not in nxt[state]:
                state = link[state]
                matched = length[state]
            t = nxt[state].get(c)
            if t is None:  # at the root, and c never occurred
                continue
            state, matched = t, matched + 1
        return state, matched

    def own_match(self) -> tuple[int, int]:
        """For a single-document automaton: the longest suffix of the text that also occurs earlier
        (so a continuation followed it), as ``(state, length)``; ``(0, 0)`` when none does."""
        if self.end == 0:
            return 0, 0
        u = self.link[self.end]  # the whole text occurs once; its link is the longest suffix seen before
        return u, self.length[u]

    def continued(self, state: int, matched: int) -> tuple[int, int]:
        """``(state, matched)``, or the longest suffix of it that some token followed (a match at the
        very end of a document has no continuation there)."""
        while state and not self.next[state]:
            state = self.link[state]
            matched = self.length[state]
        return state, matched

    def children(self, state: int) -> list[tuple[int, int]]:
        """``(token, state)`` of every continuation of ``state``, most frequent first, then latest."""
        count, last = self.count, self.last
        return sorted(self.next[state].items(), key=lambda kv: (-count[kv[1]], -last[kv[1]]))


def grow(sam: SuffixAutomaton, state: int, max_nodes: int, max_depth: int,
         min_prob: float) -> tuple[list[int], list[int], float]:
    """The continuation tree below ``state``: best-first by path probability (SuffixDecoding).

    A child's probability is its parent's times ``count(child) / sum of count over the parent's
    children``; nodes come in the order of ``(-probability, depth, sibling ranks along the path)``
    (so parents before children), keeping those with probability >= ``min_prob``, at most
    ``max_nodes`` of them and at most ``max_depth`` deep.

    Returns:
        ``(tokens, parents, score)``: the nodes' tokens and parent indices (``-1``: the root), and
        the sum of their probabilities.
    """
    if max_nodes <= 0 or max_depth <= 0:
        return [], [], 0.0
    nxt, count, last = sam.next, sam.count, sam.last
    heap: list[tuple[float, int, tuple[int, ...], int, int, int]] = []

    def push(v: int, prob: float, depth: int, ranks: tuple[int, ...], index: int) -> None:
        kids = nxt[v]
        if not kids:
            return
        total = 0
        for child in kids.values():
            total += count[child]
        floor = min_prob / prob * total * (1 - 1e-9)  # a child below this count falls under min_prob
        big = [(tok, child) for tok, child in kids.items() if count[child] >= floor]
        big.sort(key=lambda kv: (-count[kv[1]], -last[kv[1]]))
        for rank, (tok, child) in enumerate(big):
            p = prob * (count[child] / total)
            if p >= min_prob:  # the floor is exact up to rounding: the rule is this comparison
                heapq.heappush(heap, (-p, depth, ranks + (rank,), child, tok, index))

    tokens: list[int] = []
    parents: list[int] = []
    score = 0.0
    push(state, 1.0, 1, (), -1)
    while heap and len(tokens) < max_nodes:
        neg, depth, ranks, v, tok, parent = heapq.heappop(heap)
        tokens.append(tok)
        parents.append(parent)
        score -= neg
        if depth < max_depth:
            push(v, -neg, depth + 1, ranks, len(tokens) - 1)
    return tokens, parents, score


class SuffixCorpus:
    """Token ids shared across calls and threads: documents in one :class:`SuffixAutomaton`.

    Thread-safe: every read and write holds the corpus's lock. A drafter adds the outputs of its
    finished rows; fill it beforehand with :meth:`add` (ids) or :meth:`add_texts` (strings and the
    target's tokenizer). An add cut short by an exception or interrupt leaves the documents list
    whole and the automaton marked stale; the next read or add rebuilds it.

    Args:
        documents: token-id sequences to start with.
        max_tokens: when the corpus passes this many tokens, the oldest documents are dropped down to
            3/4 of it and the automaton rebuilt (amortised O(1) per token); ``None``: no bound. The
            automaton takes about 350 bytes a token (measured on Spec-Bench text): 175 MB at the default.
    """

    def __init__(self, documents: Iterable = (), max_tokens: int | None = 500_000) -> None:
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"SuffixCorpus max_tokens={max_tokens} must be >= 1 (or None for no bound)")
        self.max_tokens = max_tokens
        self._lock = threading.Lock()
        self._sam = SuffixAutomaton()
        self._docs: deque[list[int]] = deque()  # the truth; the automaton is built from it
        self._built = True  # False while an add runs, and after one that an exception or interrupt cut short
        self.version = 0  # changes with every add: a walk over the old automaton must start again
        self.max_token = -1  # the largest id held, to refuse a target with a smaller vocabulary
        for doc in documents:
            self.add(doc)

    def __len__(self) -> int:
        return self._sam.size

    @property
    def documents(self) -> int:
        """Documents held."""
        return len(self._docs)

    def add(self, ids) -> None:
        """Add one document: a sequence of token ids, or a ``(n,)`` / ``(1, n)`` tensor."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() == 2 and ids.shape[0] == 1:
                ids = ids[0]
            if ids.dim() != 1:
                raise ValueError(f"SuffixCorpus.add got a tensor of shape {tuple(ids.shape)}: give one document, "
                                 "(n,) or (1, n); add the rows of a batch one by one")
            ids = ids.tolist()
        doc = [int(t) for t in ids]
        if any(t < 0 for t in doc):
            raise ValueError(f"SuffixCorpus.add got token id {min(doc)}: ids must be >= 0 (strip padding markers)")
        if not doc:
            return
        with self._lock:
            self._fresh()
            self.max_token = max(self.max_token, max(doc))
            self._built = False  # until the automaton holds every document again (an interrupt may come)
            self._docs.append(doc)
            self._sam.new_document()
            self._sam.extend(doc)
            if self.max_tokens is not None and self._sam.size > self.max_tokens:
                self._evict()
            self.version += 1
            self._built = True

    def add_texts(self, texts: Iterable[str], tokenizer) -> None:
        """Add each text, tokenized with ``tokenizer`` (the target's; no special tokens added)."""
        for text in texts:
            self.add(tokenizer(text, add_special_tokens=False)["input_ids"])

    def _evict(self) -> None:
        """Drop the oldest documents down to 3/4 of max_tokens (the newest one's tail at least), rebuild."""
        room, keep, total = max(1, self.max_tokens * 3 // 4), [], 0
        for doc in reversed(self._docs):
            if total + len(doc) > room:
                if not keep:
                    keep.append(doc[-room:])
                break
            keep.append(doc)
            total += len(doc)
        self._docs = deque(reversed(keep))
        self._rebuild()

    def _rebuild(self) -> None:
        sam = SuffixAutomaton()
        for doc in self._docs:
            sam.new_document()
            sam.extend(doc)
        self._sam = sam

    def _fresh(self) -> None:
        """Rebuild the automaton if an add was cut short (it may be half-extended); under the lock."""
        if not self._built:
            self._rebuild()
            self.version += 1
            self._built = True

    @contextmanager
    def read(self) -> Iterator[tuple[SuffixAutomaton, int]]:
        """The automaton and its version, locked for the duration of the block (read it only)."""
        with self._lock:
            self._fresh()
            yield self._sam, self.version


class _Row:
    """One row's automaton over prompt + output, and its walk through the corpus."""

    __slots__ = ("sam", "ids", "version", "state", "matched", "walked")

    def __init__(self) -> None:
        self.sam = SuffixAutomaton()
        self.ids: list[int] = []
        self.version, self.state, self.matched, self.walked = -1, 0, 0, 0  # corpus walk: version, where, how far


class SuffixDecoding(Drafter):
    """Suffix-automaton drafting over the row's own text and a shared corpus (SuffixDecoding, SAM Decoding).

    Args:
        k: deepest draft (a cap; the step's depth cap caps it further).
        max_nodes: most nodes in one tree.
        max_spec_factor: a match of length m gets at most ``ceil(max_spec_factor * m)`` nodes.
        min_prob: nodes whose path probability is below this are pruned.
        min_match: shortest match worth drafting from (1-token matches are mostly wrong on chat).
        corpus: the :class:`SuffixCorpus` shared by every call of this drafter: ``True`` (default) a new
            empty one of its own, or a given one (shared with other drafters too); ``None`` or ``False``:
            draft from each row's own text only.
        learn: what a finished row adds to the corpus: ``"output"`` (its new tokens, as SuffixDecoding
            keeps earlier responses), ``"all"`` (prompt and output) or ``"none"``.
    """

    LEARN = ("output", "all", "none")

    def __init__(self, k: int = 8, max_nodes: int = 8, max_spec_factor: float = 1.0, min_prob: float = 0.1,
                 min_match: int = 2, corpus: SuffixCorpus | bool | None = True, learn: str = "output") -> None:
        k, max_nodes = as_int("SuffixDecoding k", k, 1), as_int("SuffixDecoding max_nodes", max_nodes, 1)
        min_match = as_int("SuffixDecoding min_match", min_match, 1)
        max_spec_factor = as_number("SuffixDecoding max_spec_factor", max_spec_factor)
        min_prob = as_number("SuffixDecoding min_prob", min_prob)
        if not max_spec_factor > 0:
            raise ValueError(f"SuffixDecoding max_spec_factor={max_spec_factor} must be > 0")
        if not 0 < min_prob <= 1:
            raise ValueError(f"SuffixDecoding min_prob={min_prob} must be in (0, 1]")
        if learn not in self.LEARN:
            raise ValueError(f"SuffixDecoding learn={learn!r} must be one of {self.LEARN}")
        if corpus is True:
            corpus = SuffixCorpus()
        elif corpus is False:
            corpus = None
        elif corpus is not None and not isinstance(corpus, SuffixCorpus):
            raise ValueError(f"SuffixDecoding corpus of type {type(corpus).__name__}: pass a SuffixCorpus, True "
                             "(a new one) or None (the row's own text only)")
        self.k, self.max_nodes, self.max_spec_factor = k, max_nodes, max_spec_factor
        self.min_prob, self.min_match, self.corpus, self.learn = min_prob, min_match, corpus, learn

    def check(self, target: torch.nn.Module) -> None:
        vocab = target.get_input_embeddings().weight.shape[0]
        if self.corpus is not None and self.corpus.max_token >= vocab:
            raise ValueError(f"SuffixDecoding corpus holds token id {self.corpus.max_token}, outside the target's "
                             f"vocabulary of {vocab}: fill the corpus with ids from the target's tokenizer")

    def proposer(self, view: TargetView) -> Proposer:
        self.check(view.model)
        return _SuffixProposer(self)

    def limit(self, matched: int) -> int:
        """Most nodes for a match of length ``matched``."""
        return min(self.max_nodes, math.ceil(self.max_spec_factor * matched))


class _SuffixProposer(Proposer):
    """Per call: each row's automaton and corpus walk."""

    def __init__(self, config: SuffixDecoding) -> None:
        self.config = config
        self.rows: dict[int, _Row] = {}

    def prefill(self, states: list[DecodeState], verified: list[Verified]) -> None:
        for state in states:
            self._sync(state)

    def _sync(self, state: DecodeState) -> _Row:
        """The row's structures, fed with its tokens not yet seen."""
        row = self.rows.get(state.row)
        if row is None:
            row = self.rows[state.row] = _Row()
        n = state.tokens.shape[1]
        if n > len(row.ids):
            new = state.tokens[0, len(row.ids):].tolist()
            row.ids.extend(new)
            row.sam.extend(new)
        return row

    def propose(self, states: list[DecodeState], depths: list[int]) -> list[DraftTree]:
        return [self._propose_row(state, depth) for state, depth in zip(states, depths)]

    def _propose_row(self, state: DecodeState, depth: int) -> DraftTree:
        c = self.config
        row = self._sync(state)
        depth = min(c.k, depth)
        device = state.tokens.device
        if depth <= 0:
            return DraftTree.empty(device)
        best: tuple[list[int], list[int], float] = ([], [], 0.0)
        u, m = row.sam.own_match()
        if m >= c.min_match:
            best = grow(row.sam, u, c.limit(m), depth, c.min_prob)
        corpus = c.corpus
        if corpus is not None and len(corpus):
            with corpus.read() as (sam, version):
                if version != row.version:  # the automaton changed (states split): walk again from the start
                    row.version, row.state, row.matched, row.walked = version, 0, 0, 0
                row.state, row.matched = sam.walk(row.state, row.matched, row.ids[row.walked:])
                row.walked = len(row.ids)
                v, m = sam.continued(row.state, row.matched)
                if m >= c.min_match:
                    found = grow(sam, v, c.limit(m), depth, c.min_prob)
                    if found[2] > best[2]:
                        best = found
        tokens, parents, _ = best
        if not tokens:
            return DraftTree.empty(device)
        return DraftTree(torch.tensor(tokens, dtype=torch.long, device=device),
                         torch.tensor(parents, dtype=torch.long, device=device))

    def commit(self, states: list[DecodeState], results: list[Acceptance], verified: list[Verified]) -> None:
        c = self.config
        for state in states:
            if not state.finished:
                continue
            self.rows.pop(state.row, None)
            if c.corpus is not None and c.learn != "none":
                start = state.prompt_len if c.learn == "output" else 0
                c.corpus.add(state.tokens[0, start:])
