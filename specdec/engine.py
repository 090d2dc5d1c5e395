"""The decode loop: propose -> verify -> accept -> commit, for a batch of rows.

The target's KV cache holds every committed token of a row except the last, the
*root* of the row's next draft (see :mod:`specdec.cache` for the ragged layout).
Each step:

1. **propose**: the call's proposer returns one :class:`~specdec.tree.DraftTree` per active row
   (checked: one per row, in-vocabulary tokens, within the row's budget, q rows that are
   distributions);
2. **verify**: one target forward over ``[root, *nodes]`` of every row (padded to the
   largest tree) at positions ``root_position + depth``, through tree attention: each
   node sees its row's prefix and its own ancestors; this gives p at every node;
3. **accept**: a pure rule (:mod:`specdec.verify`) keeps a path per row and draws one
   more token;
4. **commit**: each row's root and accepted nodes move to contiguous cache positions,
   tokens are appended (cut at EOS / ``max_new_tokens`` exactly where plain decoding
   stops), streamed and counted; finished rows leave the batch.

Everything a call changes is its own (cache, proposer, row states): the model and the drafter
object are only read, and the CPU products' route lives in a context of the call's own
(:func:`decode` runs in a copy of the caller's ``contextvars`` context), so no exception or
interrupt can leave anything behind that changes a later call.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel

from specdec.attention import TreeMask, layer_overlays
from specdec.backends import native
from specdec.backends.cpu_linear import Route, install_linears, packed_weights, routed
from specdec.cache import RaggedCache, zero_positions
from specdec.compat import check_servable, checked_forward, tree_inputs
from specdec.control import Controller, CostModel, DepthPolicy, GoodputPolicy
from specdec.drafters.base import DecodeState, Drafter, Proposer, TargetView, Verified
from specdec.options import Options
from specdec.stats import SpecStats
from specdec.tree import DraftTree, batch_trees
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


def check_trees(trees, states: list[DecodeState], vocab: int, where: str, depths: list[int] | None = None) -> None:
    """Raise ``ValueError`` unless ``trees`` holds one well-formed tree per row within its budget (``depths``:
    the step's caps; default each row's ``budget``)."""
    if not isinstance(trees, (list, tuple)) or len(trees) != len(states):
        got = len(trees) if isinstance(trees, (list, tuple)) else type(trees).__name__
        raise ValueError(f"drafter {where} returned {got} trees for {len(states)} rows: return one DraftTree per "
                         "state, in the order of the states (DraftTree.empty() for a row with no draft)")
    for state, tree, cap in zip(states, trees, depths or [s.budget for s in states]):
        if not isinstance(tree, DraftTree):
            raise ValueError(f"drafter {where} returned a {type(tree).__name__} for row {state.row}: return DraftTree "
                             "objects")
        if not len(tree):
            continue
        bad = (tree.tokens < 0) | (tree.tokens >= vocab)
        if bad.any():
            raise ValueError(f"drafter {where} proposed token {int(tree.tokens[bad][0])} for row {state.row}, outside "
                             f"the target's vocabulary [0, {vocab}): draft ids must be target token ids")
        depth = int(tree.depths.max())
        if depth > cap:
            raise ValueError(f"drafter {where} proposed a tree {depth} deep for row {state.row}, past its budget "
                             f"{cap}: keep drafts at most depths[i] (simple path: state.budget) deep")


def check_q(tree: DraftTree, vocab: int, row: int, where: str, sampled: bool = True) -> None:
    """Raise ``ValueError`` unless the tree's q rows are distributions over the target's vocabulary and, when
    ``sampled`` (the only case where the rule reads q), give each node's own token a positive probability."""
    q = tree.q
    if q is None:
        return
    if q.shape != (len(tree), vocab):
        raise ValueError(f"drafter {where}: q of row {row} has shape {tuple(q.shape)}, must be (T, V) = "
                         f"({len(tree)}, {vocab}): one distribution over the target's vocabulary per node")
    if not torch.isfinite(q).all() or (q < 0).any():
        raise ValueError(f"drafter {where}: q of row {row} has negative or non-finite entries: q rows must be "
                         "probabilities (e.g. a softmax)")
    total = q.double().sum(dim=1)
    if ((total - 1).abs() > 1e-4).any():
        i = int(((total - 1).abs() > 1e-4).nonzero()[0])
        raise ValueError(f"drafter {where}: q of node {i} of row {row} sums to {float(total[i]):.6f}, not 1 (within "
                         "1e-4): normalise q rows (softmax over the processed logits)")
    if not sampled:
        return
    own = q.gather(1, tree.tokens.long().unsqueeze(1)).squeeze(1)  # (T,) q of each node's own token
    if (own <= 0).any():
        i = int((own <= 0).nonzero()[0])
        raise ValueError(f"drafter {where}: node {i} of row {row} drafted token {int(tree.tokens[i])}, to which its "
                         "own q gives probability 0: a sampled draft token must be drawn from its q (q is the "
                         "distribution each token was drawn from; the rule would reject it always and bias the "
                         "output)")


@dataclass(frozen=True)
class _Verification:
    """What a step's verification forward gave: the cache length before it, its inputs ``ids`` and
    ``positions`` ``(A, T)``, the target's ``logits`` ``(A, T, V)``, and the hidden ``features`` ``(A, T, H * L)``
    the proposer reads (``None`` when it reads none)."""

    S: int
    ids: Tensor
    positions: Tensor
    logits: Tensor
    features: Tensor | None


class SpeculativeDecoder:
    """One call's loop state: target cache, per-row decoding states, the proposer, stats.

    ``prefill`` once, then ``step`` until ``done``; :func:`decode` does both.

    Args:
        model: the target causal LM (tree attention installed).
        drafter: the drafter whose proposer this call uses (``NO_DRAFT`` = plain decoding).
        options: the call's settings.
        generator: random generator for every draw (``None``: torch's global one).
    """

    def __init__(self, model: PreTrainedModel, drafter: Drafter, options: Options,
                 generator: torch.Generator | None = None) -> None:
        self.model, self.options, self.generator = model, options, generator
        self.sampling = options.sampling
        self.stats = SpecStats()
        self.cache: RaggedCache | None = None
        self.states: list[DecodeState] = []  # active rows, in cache order
        self.finished: dict[int, DecodeState] = {}
        self.vocab = model.get_input_embeddings().weight.shape[0]
        self.overlays = layer_overlays(model)
        self.name = type(drafter).__name__
        self.view = TargetView(model, options, self._cache_rows)
        self.proposer: Proposer = drafter.proposer(self.view)
        self.needs = self.proposer.needs
        self.route: Route | None = None  # the call's CPU products (decode sets it), timed when profiled
        self.policy = self._policy(drafter)

    def _policy(self, drafter: Drafter) -> DepthPolicy:
        """The goodput controller's policy, unless turned off or the drafter has no depth to choose."""
        depth = drafter.draft_depth if isinstance(drafter, Drafter) else None
        if not self.options.goodput or not depth:
            return DepthPolicy()
        model = self.model
        costs = self.options.cost_model or (lambda rows: CostModel.for_model(model, rows, measure=False))
        return GoodputPolicy(Controller(costs, depth))

    def _cache_rows(self):
        return self.cache.cache, self.cache.start, self.cache.end, [s.row for s in self.states]

    @property
    def done(self) -> bool:
        return not self.states

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, attention_mask: Tensor | None) -> None:
        """Fill the cache with each row's prompt less its last token (the first root).

        Args:
            input_ids: ``(B, n)`` left-padded prompts.
            attention_mask: ``(B, n)`` 0 on padding, or ``None``.
        """
        t0 = time.perf_counter()
        device = self.model.device
        input_ids = input_ids.to(device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
        B, n = input_ids.shape
        pad = (n - mask.sum(dim=1)).cpu()  # (B,) left padding per row
        self.states = [
            DecodeState(b, input_ids[b : b + 1, int(pad[b]) :], n - int(pad[b]), self.options.max_new_tokens,
                        self.sampling, self.generator)
            for b in range(B)
        ]
        self.cache = RaggedCache(self.model, B)
        self.cache.start, self.cache.end = pad.clone(), torch.full_like(pad, n - 1)
        needs = self.needs
        hidden = needs.hidden
        verified = [Verified() for _ in self.states]
        if hidden:  # one-token prompts: nothing cached, no hidden states
            width = self.model.config.get_text_config().hidden_size * len(needs.layers)
            verified = [Verified(hidden=torch.empty(0, width, device=device)) for _ in self.states]
        if n > 1:
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, n)
            out = self.model(input_ids=input_ids[:, :-1], attention_mask=mask[:, :-1] if (pad > 0).any() else None,
                             position_ids=positions[:, :-1], cache=self.cache.cache, use_cache=True, logits_to_keep=1,
                             output_hidden_states=hidden)
            if (pad > 0).any():
                zero_positions(self.cache.cache, self.cache.start)
            if hidden:
                features = self._features(out.hidden_states)
                verified = [Verified(hidden=features[b, int(pad[b]) :]) for b in range(B)]
        self.proposer.prefill(self.states, verified)
        if isinstance(self.policy, GoodputPolicy) and self.options.cost_model is None:  # this batch's curve, once
            CostModel.for_model(self.model, len(self.states))
        self.stats.prefill_time += time.perf_counter() - t0

    @torch.no_grad()
    def step(self) -> dict[int, list[int]]:
        """One propose -> verify -> accept -> commit; returns each active row's new tokens."""
        times, t0 = self.stats.times, time.perf_counter()
        trees, drafted_depth = self._propose(self.states)
        t1 = time.perf_counter()
        verification = self._verify(self.states, trees)
        t2 = time.perf_counter()
        acceptances = self._accept_all(self.states, trees, verification)
        t3 = time.perf_counter()
        new_tokens = self._commit(self.states, trees, verification, acceptances, t1 - t0, drafted_depth)
        t4 = time.perf_counter()
        times.add(t1 - t0, t2 - t1, t3 - t2, t4 - t3)
        self.stats.draft_time += t1 - t0
        self.stats.verify_time += t4 - t1
        return new_tokens

    def _propose(self, states: list[DecodeState]) -> tuple[list[DraftTree], int]:
        """1. propose: each row's tree, no deeper than the policy's cap, then cut to what pays; and the
        deepest depth drafted (before the cut)."""
        rows = [s.row for s in states]
        caps = self.policy.cap(rows, [s.budget for s in states])
        trees = self.proposer.propose(states, caps)
        check_trees(trees, states, self.vocab, self.name, caps)
        drafted_depth = max(int(tree.depths.max()) if len(tree) else 0 for tree in trees)
        trees = self.policy.trim(rows, trees, self.sampling.do_sample, self.options.min_verify_tokens)
        return trees, drafted_depth

    def _verify(self, states: list[DecodeState], trees: list[DraftTree]) -> _Verification:
        """2. verify: the target's logits at every root and node of every row, in one forward."""
        cache, times = self.cache, self.stats.times
        S = cache.length
        roots = torch.cat([s.tokens[0, -1:] for s in states])  # (A,)
        ids, positions, ancestors = batch_trees(trees, roots, cache.lengths, self.options.min_verify_tokens)
        device = self.model.device
        tree_mask = TreeMask(cache.start.to(device), cache.end.to(device), ancestors, self.options.attention_backend,
                             positions, self.overlays, timer=times if self.options.profile else None)
        hidden = self.needs.hidden
        profiled = self.route if self.options.profile else None  # its products timed in this forward only
        try:
            if profiled is not None:
                profiled.timer = times
            t0 = time.perf_counter()
            with checked_forward(self.model, tree_mask):
                out = self.model(input_ids=ids, position_ids=positions, cache=cache.cache, use_cache=True,
                                 output_hidden_states=hidden, **tree_inputs(self.model, tree_mask, S))
            times.forward += time.perf_counter() - t0
            logits = out.logits  # (A, T, V)
            for state, tree in zip(states, trees):
                check_q(tree, logits.shape[-1], state.row, self.name, self.sampling.do_sample)
        except BaseException:
            cache.truncate(S)  # layers that ran already appended the tree: undo, keep the cache whole
            raise
        finally:
            if profiled is not None:
                profiled.timer = None
        return _Verification(S, ids, positions, logits, self._features(out.hidden_states) if hidden else None)

    def _accept_all(self, states: list[DecodeState], trees: list[DraftTree],
                    verification: _Verification) -> list[Acceptance]:
        """3. accept, row by row (nothing changes until every row has its outcome)."""
        acceptances = []
        for a, (state, tree) in enumerate(zip(states, trees)):
            positions = verification.positions[a, : len(tree) + 1]
            n_before = state.n_generated + positions - positions[0]  # (T_a + 1,)
            acceptances.append(self._accept(tree, verification.logits[a, : len(tree) + 1], n_before))
        return acceptances

    def _commit(self, states: list[DecodeState], trees: list[DraftTree], verification: _Verification,
                acceptances: list[Acceptance], draft_seconds: float, drafted_depth: int) -> dict[int, list[int]]:
        """4. commit: tokens (cut at EOS / budget), each row's root and accepted path to contiguous cache
        positions, the proposer and the policy told; finished rows leave the batch."""
        S, logits, features, ids = verification.S, verification.logits, verification.features, verification.ids
        logits_seen = self.needs.logits
        new_tokens, kept, finished, verified = {}, [], [], []
        for a, (state, tree, acceptance) in enumerate(zip(states, trees, acceptances)):
            room = state.max_new_tokens - state.n_generated
            new, done = _cut(acceptance.tokens(tree), self.sampling.eos_token_ids, room)
            state.tokens = torch.cat([state.tokens, state.tokens.new_tensor([new])], dim=1)
            new_tokens[state.row] = new
            kept.append(S + torch.tensor([0] + [1 + node for node in acceptance.path]))
            verified.append(Verified(features[a, kept[-1] - S] if features is not None else None,
                                     logits[a, : len(tree) + 1] if logits_seen else None,
                                     ids[a, : len(tree) + 1] if logits_seen else None))
            state.finished = done
            finished.append(done)
        depths = [int(tree.depths.max()) if len(tree) else 0 for tree in trees]
        for state, tree, acceptance, depth, new in zip(states, trees, acceptances, depths, new_tokens.values()):
            self.stats.record(depth, len(tree), len(acceptance.path), len(new), state.row)
        self.policy.record([s.row for s in states], depths, [len(x.path) for x in acceptances],
                           [len(tree) for tree in trees], draft_seconds, drafted_depth)
        t0 = time.perf_counter()
        self.cache.commit(kept)
        self.stats.times.cache += time.perf_counter() - t0
        self.proposer.commit(states, acceptances, verified)
        if any(finished):  # finished rows leave the batch
            keep = torch.tensor([a for a, done in enumerate(finished) if not done], dtype=torch.long)
            for state, done in zip(states, finished):
                if done:
                    self.finished[state.row] = state
            self.states = [states[a] for a in keep.tolist()]
            if self.states:
                t0 = time.perf_counter()
                self.cache.select(keep)
                self.stats.times.cache += time.perf_counter() - t0
        return new_tokens

    def stop(self) -> None:
        """End every active row where it stands (``max_time`` ran out)."""
        for state in self.states:
            state.finished = True
            self.finished[state.row] = state
        self.states = []

    def _features(self, hidden_states: tuple[Tensor, ...]) -> Tensor:
        """``(A, T, H * L)`` the requested layers' hidden states side by side."""
        layers = self.needs.layers
        if layers == (-1,):
            return hidden_states[-1]
        return torch.cat([hidden_states[layer] for layer in layers], dim=-1)

    def _accept(self, tree: DraftTree, logits: Tensor, n_before: Tensor) -> Acceptance:
        """Run the acceptance rule on ``(T + 1, V)`` target logits."""
        if self.sampling.do_sample:
            return accept_sampling(tree, self.sampling.probs(logits, n_before), self.generator)
        return accept_greedy(tree, self.sampling.process(logits, n_before).argmax(dim=-1))


def prepare_target(model: PreTrainedModel, options: Options) -> None:
    """Install what the engine needs on the target, once: tree attention (after :mod:`specdec.compat`'s
    checks), and the CPU products unless ``linear_backend="torch"``. Raises ``ValueError`` for a model
    that cannot be served."""
    grad = torch.is_grad_enabled()
    try:
        check_servable(model, options.attention_backend)  # installs tree attention, or refuses the model
        if options.linear_backend != "torch":
            install_linears(model)
    finally:
        torch.set_grad_enabled(grad)


def decode(
    model: PreTrainedModel,
    input_ids: Tensor,
    drafter: Drafter,
    options: Options,
    generator: torch.Generator | None = None,
    streamer=None,
    attention_mask: Tensor | None = None,
) -> tuple[list[list[int]], SpecStats]:
    """Generate up to ``options.max_new_tokens`` tokens after each prompt, speculatively.

    Args:
        model: the target causal LM.
        input_ids: ``(B, n)`` left-padded prompts, each at least one token.
        drafter: makes the call's proposer (``NO_DRAFT`` = plain decoding).
        options: the call's settings (sampling, backends, budget).
        generator: random generator for every draw (``None``: torch's global one).
        streamer: a transformers streamer (batch size 1); gets each step's new tokens.
        attention_mask: ``(B, n)`` 0 on padding.

    Returns:
        Each row's new tokens (EOS included when hit) and the run's statistics.
    """
    grad = torch.is_grad_enabled()  # an interrupt inside a no_grad block (ours or transformers') must not leak it
    try:
        prepare_target(model, options)
        return contextvars.copy_context().run(_decode, model, input_ids, drafter, options, generator, streamer,
                                              attention_mask)
    finally:
        torch.set_grad_enabled(grad)


def _decode(model, input_ids, drafter, options, generator, streamer, attention_mask):
    deadline = None if options.max_time is None else time.perf_counter() + options.max_time
    route = None
    if options.linear_backend != "torch":
        route = Route(packed_weights(model) if options.pack_weights else None,
                      native.load() if options.linear_backend == "auto" else None)
    with routed(route):
        decoder = SpeculativeDecoder(model, drafter, options, generator)
        decoder.route = route
        decoder.prefill(input_ids, attention_mask)
        t0 = time.perf_counter()
        while not decoder.done:
            new = decoder.step()
            if streamer is not None:
                streamer.put(torch.tensor(next(iter(new.values()))))
            if deadline is not None and time.perf_counter() > deadline:
                decoder.stop()  # max_time: as transformers' MaxTimeCriteria, checked after each step
        decoder.stats.times.wall = time.perf_counter() - t0
    rows = sorted(decoder.finished.values(), key=lambda s: s.row)
    return [s.tokens[0, s.prompt_len :].tolist() for s in rows], decoder.stats
