"""The decode loop: propose -> verify -> accept -> commit, for a batch of rows.

The target's KV cache holds every committed token of a row except the last, the
*root* of the row's next draft (see :mod:`specdec.cache` for the ragged layout).
Each step:

1. **propose**: the drafter returns one :class:`~specdec.tree.DraftTree` per active row;
2. **verify**: one target forward over ``[root, *nodes]`` of every row (padded to the
   largest tree) at positions ``root_position + depth``, through tree attention: each
   node sees its row's prefix and its own ancestors; this gives p at every node;
3. **accept**: a pure rule (:mod:`specdec.verify`) keeps a path per row and draws one
   more token;
4. **commit**: each row's root and accepted nodes move to contiguous cache positions,
   tokens are appended (cut at EOS / ``max_new_tokens`` exactly where plain decoding
   stops), streamed and counted; finished rows leave the batch.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor
from transformers import PreTrainedModel

from specdec.attention import TreeMask, tree_attention_enabled
from specdec.cache import commit_rows, new_cache, select_rows, truncate, zero_positions
from specdec.drafters.base import DecodeState, Drafter
from specdec.sampling import Sampling
from specdec.skinny import BACKENDS as LINEAR_BACKENDS
from specdec.skinny import skinny_linears
from specdec.stats import SpecStats
from specdec.tree import DraftTree
from specdec.verify import Acceptance, accept_greedy, accept_sampling


class NoDraft(Drafter):
    """Plain decoding through the same engine: every tree is empty."""

    def propose(self, states: list[DecodeState]) -> list[DraftTree]:
        return [DraftTree.empty(s.tokens.device) for s in states]


NO_DRAFT = NoDraft()


def _cut(tokens: list[int], eos: tuple[int, ...], room: int) -> tuple[list[int], bool]:
    """Tokens up to and including the first EOS, at most ``room`` of them; and whether the row ends."""
    for i, tok in enumerate(tokens[:room]):
        if tok in eos:
            return tokens[: i + 1], True
    return tokens[:room], len(tokens) >= room


def _accept(tree: DraftTree, logits: Tensor, n_before: Tensor, sampling: Sampling, generator) -> Acceptance:
    """Run the acceptance rule on ``(T + 1, V)`` target logits."""
    if sampling.do_sample:
        return accept_sampling(tree, sampling.probs(logits, n_before), generator)
    return accept_greedy(tree, sampling.process(logits, n_before).argmax(dim=-1))


def batch_trees(trees: list[DraftTree], roots: Tensor, root_positions: Tensor,
                min_width: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Pack the roots and trees of A rows into one verification input.

    Args:
        trees: one tree per row (``T_a`` nodes).
        roots: ``(A,)`` each row's root token.
        root_positions: ``(A,)`` each root's position id.
        min_width: pad a forward of 2 or more columns to at least this many (a plain step stays 1).

    Returns:
        ids ``(A, T)``, position ids ``(A, T)`` and the ancestor mask ``(A, T, T)``, where
        ``T = 1 + max T_a``: column 0 is the root, column ``1 + i`` node i; padding columns
        attend to themselves only.
    """
    A, width = len(trees), 1 + max(len(t) for t in trees)
    if width > 1:
        width = max(width, min_width)
    device = roots.device
    ids = torch.zeros(A, width, dtype=torch.long, device=device)
    positions = root_positions[:, None].repeat(1, width)  # (A, T)
    mask = torch.eye(width, dtype=torch.bool, device=device).repeat(A, 1, 1)  # (A, T, T); padding: itself only
    ids[:, 0] = roots
    for a, tree in enumerate(trees):
        n = len(tree)
        if n:
            ids[a, 1 : n + 1] = tree.tokens
            positions[a, : n + 1] = tree.positions(int(root_positions[a]))
            mask[a, 1 : n + 1, 0] = True  # every node sees the root
            mask[a, 1 : n + 1, 1 : n + 1] = tree.ancestors
    return ids, positions, mask


class SpeculativeDecoder:
    """The loop's state: target cache, per-row decoding states, drafter, stats.

    ``prefill`` once, then ``step`` until ``done``; :func:`decode` does both.

    Args:
        model: the target causal LM.
        drafter: proposes the trees (``NO_DRAFT`` = plain decoding).
        sampling: how p (and the drafter's q) are made from logits.
        generator: random generator for every draw (``None``: torch's global one).
        attention_backend: tree attention's ``"auto"`` (Triton on CUDA, torch elsewhere),
            ``"triton"`` or ``"reference"``.
        min_verify_tokens: pad every verification forward that has drafts to at least this many
            tokens with padding columns (discarded): a knob for CPUs whose small matrix products are
            slower for 2-4 rows than for 6-8.
        linear_backend: the linear layers' products, of the target and the drafter's networks:
            ``"auto"``/``"skinny"`` (``(W @ x.T).T`` on CPU, see :mod:`specdec.skinny`) or ``"torch"``.
    """

    def __init__(
        self, model: PreTrainedModel, drafter: Drafter, sampling: Sampling, generator: torch.Generator | None = None,
        attention_backend: str = "auto", min_verify_tokens: int = 1, linear_backend: str = "auto",
    ) -> None:
        if min_verify_tokens < 1:
            raise ValueError(f"min_verify_tokens={min_verify_tokens} must be >= 1")
        if linear_backend not in LINEAR_BACKENDS:
            raise ValueError(f"linear_backend={linear_backend!r} is not one of {LINEAR_BACKENDS}")
        self.model, self.drafter, self.sampling, self.generator = model, drafter, sampling, generator
        self.attention_backend, self.min_verify_tokens = attention_backend, min_verify_tokens
        self.linear_backend = linear_backend
        self.stats = SpecStats()
        self.cache = new_cache(model)
        self.states: list[DecodeState] = []  # active rows, in cache order
        self.finished: dict[int, DecodeState] = {}
        self.start = self.end = None  # (A,) each active row's cached range
        drafter.check(model)  # binds drafters built on the target's weights; raises if it cannot serve it
        drafter.attach(self)

    @property
    def done(self) -> bool:
        return not self.states

    @torch.inference_mode()
    def prefill(self, input_ids: Tensor, attention_mask: Tensor | None, max_new_tokens: int) -> None:
        """Fill the cache with each row's prompt less its last token (the first root).

        Args:
            input_ids: ``(B, n)`` left-padded prompts.
            attention_mask: ``(B, n)`` 0 on padding, or ``None``.
            max_new_tokens: each row's output budget.
        """
        t0 = time.perf_counter()
        device = self.model.device
        input_ids = input_ids.to(device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
        B, n = input_ids.shape
        pad = n - mask.sum(dim=1)  # (B,) left padding per row
        self.states = [
            DecodeState(b, input_ids[b : b + 1, int(pad[b]) :], n - int(pad[b]), max_new_tokens, self.sampling,
                        self.generator)
            for b in range(B)
        ]
        self.start, self.end = pad.clone(), torch.full_like(pad, n - 1)
        if self.drafter.needs_hidden:  # one-token prompts: nothing cached, no hidden states
            for state in self.states:
                state.hidden = torch.empty(0, self.model.config.hidden_size, device=device)
        if n > 1:
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, n)
            out = self.model(input_ids=input_ids[:, :-1], attention_mask=mask[:, :-1] if (pad > 0).any() else None,
                             position_ids=positions[:, :-1], cache=self.cache, use_cache=True, logits_to_keep=1,
                             output_hidden_states=self.drafter.needs_hidden)
            if (pad > 0).any():
                zero_positions(self.cache, self.start)
            if self.drafter.needs_hidden:
                for b, state in enumerate(self.states):
                    state.hidden = out.hidden_states[-1][b, int(pad[b]) :]
        self.drafter.prefill(self.states)
        self.stats.prefill_time += time.perf_counter() - t0

    @torch.inference_mode()
    def step(self) -> dict[int, list[int]]:
        """One propose -> verify -> accept -> commit; returns each active row's new tokens."""
        states, t0 = self.states, time.perf_counter()
        # 1. propose
        trees = self.drafter.propose(states)
        depths = [int(tree.depths.max()) if len(tree) else 0 for tree in trees]
        for state, depth in zip(states, depths):
            if depth > state.budget:
                raise RuntimeError(f"drafter proposed a tree {depth} deep for row {state.row}, past its budget {state.budget}")
        t1 = time.perf_counter()

        # 2. verify: p at every root and node of every row, in one forward
        S = self.cache.get_seq_length()
        roots = torch.cat([s.tokens[0, -1:] for s in states])  # (A,)
        ids, positions, ancestors = batch_trees(trees, roots, self.end - self.start, self.min_verify_tokens)
        tree_mask = TreeMask(self.start, self.end, ancestors, self.attention_backend)
        try:
            out = self.model(input_ids=ids, position_ids=positions, cache=self.cache, use_cache=True, tree=tree_mask,
                             output_hidden_states=self.drafter.needs_hidden)
            logits = out.logits  # (A, T, V)
        except Exception:
            truncate(self.cache, S)  # layers that ran already appended the tree: undo, keep the cache whole
            raise

        # 3. accept, row by row (nothing changes until every row has its outcome)
        acceptances = []
        for a, (state, tree) in enumerate(zip(states, trees)):
            n_before = state.n_generated + positions[a, : len(tree) + 1] - positions[a, 0]  # (T_a + 1,)
            acceptances.append(_accept(tree, logits[a, : len(tree) + 1], n_before, self.sampling, self.generator))

        # 4. commit: tokens (cut at EOS / budget), roots and accepted paths to contiguous positions
        new_tokens, kept, finished = {}, [], []
        for a, (state, tree, acceptance) in enumerate(zip(states, trees, acceptances)):
            room = state.max_new_tokens - state.n_generated
            new, done = _cut(acceptance.tokens(tree), self.sampling.eos_token_ids, room)
            state.tokens = torch.cat([state.tokens, state.tokens.new_tensor([new])], dim=1)
            new_tokens[state.row] = new
            kept.append(S + torch.tensor([0] + [1 + node for node in acceptance.path]))
            if self.drafter.needs_hidden:
                state.hidden = out.hidden_states[-1][a, kept[-1] - S]
            finished.append(done)
            self.stats.record(depths[a], len(tree), len(acceptance.path), len(new))
        self.end = commit_rows(self.cache, self.end, kept)
        self.drafter.commit(states, acceptances)
        if any(finished):  # finished rows leave the batch
            keep = torch.tensor([a for a, done in enumerate(finished) if not done], dtype=torch.long)
            for state, done in zip(states, finished):
                if done:
                    self.finished[state.row] = state
            self.states = [states[a] for a in keep.tolist()]
            if self.states:
                select_rows(self.cache, keep)
                self.start, self.end = self.start[keep], self.end[keep]
        self.stats.draft_time += t1 - t0
        self.stats.verify_time += time.perf_counter() - t1
        return new_tokens


def decode(
    model: PreTrainedModel,
    input_ids: Tensor,
    drafter: Drafter,
    sampling: Sampling,
    max_new_tokens: int,
    generator: torch.Generator | None = None,
    streamer=None,
    attention_mask: Tensor | None = None,
    attention_backend: str = "auto",
    min_verify_tokens: int = 1,
    linear_backend: str = "auto",
) -> tuple[list[list[int]], SpecStats]:
    """Generate up to ``max_new_tokens`` tokens after each prompt, speculatively.

    Args:
        model: the target causal LM.
        input_ids: ``(B, n)`` left-padded prompts, each at least one token.
        drafter: proposes the trees (``NO_DRAFT`` = plain decoding).
        sampling: how p (and the drafter's q) are made from logits.
        max_new_tokens: each row's output budget.
        generator: random generator for every draw (``None``: torch's global one).
        streamer: a transformers streamer (batch size 1); gets each step's new tokens.
        attention_mask: ``(B, n)`` 0 on padding.
        attention_backend, min_verify_tokens, linear_backend: see :class:`SpeculativeDecoder`.

    Returns:
        Each row's new tokens (EOS included when hit) and the run's statistics.
    """
    decoder = SpeculativeDecoder(model, drafter, sampling, generator, attention_backend, min_verify_tokens,
                                 linear_backend)
    with tree_attention_enabled(model), skinny_linears([model, *drafter.networks()], linear_backend):
        decoder.prefill(input_ids, attention_mask, max_new_tokens)
        while not decoder.done:
            new = decoder.step()
            if streamer is not None:
                streamer.put(torch.tensor(next(iter(new.values()))))
    rows = sorted(decoder.finished.values(), key=lambda s: s.row)
    return [s.tokens[0, s.prompt_len :].tolist() for s in rows], decoder.stats
