"""The decode loop: propose -> verify -> accept -> commit, one row at a time.

The target's KV cache holds every committed token except the last (the *root* of
the next draft). Each step:

1. **propose**: the drafter returns a :class:`~specdec.tree.DraftTree` below the root;
2. **verify**: one target forward over ``[root, *nodes]`` at positions
   ``root_position + depth`` gives p at the root and at every node;
3. **accept**: a pure rule (:mod:`specdec.verify`) keeps a path and draws one more token;
4. **commit**: the cache keeps the root's prefix and the accepted path, the tokens
   are appended (cut at EOS / ``max_new_tokens`` exactly where plain decoding stops),
   streamed and counted.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor
from transformers import PreTrainedModel

from specdec.cache import keep_path, new_cache
from specdec.drafters.base import DecodeState, Drafter
from specdec.sampling import Sampling
from specdec.stats import SpecStats
from specdec.tree import DraftTree
from specdec.verify import Acceptance, accept_greedy, accept_sampling


class _NoDraft(Drafter):
    """Plain decoding through the same engine: every tree is empty."""

    def propose(self, state: DecodeState) -> DraftTree:
        return DraftTree.empty(state.tokens.device)


NO_DRAFT = _NoDraft()


def _verify_logits(model: PreTrainedModel, cache, root: Tensor, tree: DraftTree, root_position: int) -> Tensor:
    """``(T + 1, V)`` target logits at the root and at every node of ``tree``."""
    if not tree.is_chain:
        raise NotImplementedError("branching trees need tree attention; this engine verifies chains only")
    ids = torch.cat([root, tree.tokens]).to(model.device)[None]  # (1, T + 1)
    positions = tree.positions(root_position).to(model.device)[None]  # (1, T + 1)
    out = model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True)
    return out.logits[0]


def _cut(tokens: list[int], eos: tuple[int, ...], room: int) -> tuple[list[int], bool]:
    """Tokens up to and including the first EOS, at most ``room`` of them; and whether the row ends."""
    for i, tok in enumerate(tokens[:room]):
        if tok in eos:
            return tokens[: i + 1], True
    return tokens[:room], len(tokens) >= room


class SpeculativeDecoder:
    """The loop's state for one row: target cache, decoding state, drafter, stats.

    ``prefill`` once, then ``step`` until ``done``; :func:`decode` does both.

    Args:
        model: the target causal LM.
        drafter: proposes the trees (``NO_DRAFT`` = plain decoding).
        sampling: how p (and the drafter's q) are made from logits.
        generator: random generator for every draw (``None``: torch's global one).
    """

    def __init__(
        self, model: PreTrainedModel, drafter: Drafter, sampling: Sampling, generator: torch.Generator | None = None
    ) -> None:
        self.model, self.drafter, self.sampling, self.generator = model, drafter, sampling, generator
        self.stats = SpecStats()
        self.cache = new_cache(model)
        self.state: DecodeState | None = None
        self.done = False

    @torch.inference_mode()
    def prefill(self, prompt: Tensor, max_new_tokens: int) -> None:
        """Fill the cache with ``prompt: (1, n)`` less its last token, the first root."""
        start = time.perf_counter()
        prompt = prompt.to(self.model.device)
        self.state = DecodeState(prompt, prompt.shape[1], max_new_tokens, self.sampling, self.generator)
        if prompt.shape[1] > 1:
            self.model(input_ids=prompt[:, :-1], cache=self.cache, use_cache=True, logits_to_keep=1)
        self.drafter.prefill(self.state)
        self.stats.prefill_time += time.perf_counter() - start

    @torch.inference_mode()
    def step(self) -> list[int]:
        """One propose -> verify -> accept -> commit; returns the tokens it added."""
        state, t0 = self.state, time.perf_counter()
        # 1. propose
        tree = self.drafter.propose(state)
        if len(tree) > state.budget:
            raise RuntimeError(f"drafter proposed {len(tree)} tokens, more than the budget {state.budget}")
        t1 = time.perf_counter()
        # 2. verify: p at the root and at every node, in one forward
        n = state.tokens.shape[1]
        logits = _verify_logits(self.model, self.cache, state.tokens[0, -1:], tree, n - 1)
        zero = torch.zeros(1, dtype=torch.long, device=tree.depths.device)
        n_before = state.n_generated + torch.cat([zero, tree.depths])  # (T + 1,) output length before each row
        # 3. accept
        acceptance = _accept(tree, logits, n_before, self.sampling, self.generator)
        room = state.max_new_tokens - state.n_generated
        new, self.done = _cut(acceptance.tokens(tree), self.sampling.eos_token_ids, room)
        # 4. commit: the cache keeps the root's prefix and the accepted path
        keep_path(self.cache, n, acceptance.path)
        state.tokens = torch.cat([state.tokens, state.tokens.new_tensor([new])], dim=1)
        self.drafter.commit(state, acceptance)
        depth = int(tree.depths.max()) if len(tree) else 0
        self.stats.record(depth, len(tree), len(acceptance.path), len(new))
        self.stats.draft_time += t1 - t0
        self.stats.verify_time += time.perf_counter() - t1
        return new


def decode(
    model: PreTrainedModel,
    prompt: Tensor,
    drafter: Drafter,
    sampling: Sampling,
    max_new_tokens: int,
    generator: torch.Generator | None = None,
    streamer=None,
) -> tuple[list[int], SpecStats]:
    """Generate up to ``max_new_tokens`` tokens after one prompt, speculatively.

    Args:
        model: the target causal LM.
        prompt: ``(1, n)`` token ids, ``n >= 1``, no padding.
        drafter: proposes the trees (``NO_DRAFT`` = plain decoding).
        sampling: how p (and the drafter's q) are made from logits.
        max_new_tokens: output budget.
        generator: random generator for every draw (``None``: torch's global one).
        streamer: a transformers streamer; gets each step's new tokens.

    Returns:
        The new tokens (EOS included when hit) and the run's statistics.
    """
    decoder = SpeculativeDecoder(model, drafter, sampling, generator)
    decoder.prefill(prompt, max_new_tokens)
    out: list[int] = []
    while not decoder.done:
        new = decoder.step()
        out += new
        if streamer is not None:
            streamer.put(torch.tensor(new))
    return out, decoder.stats


def _accept(tree: DraftTree, logits: Tensor, n_before: Tensor, sampling: Sampling, generator) -> Acceptance:
    """Run the acceptance rule on ``(T + 1, V)`` target logits."""
    if sampling.do_sample:
        return accept_sampling(tree, sampling.probs(logits, n_before), generator)
    return accept_greedy(tree, sampling.process(logits, n_before).argmax(dim=-1))
