"""The skeleton every model drafter shares: a draft network driven by tree growth, and the drafter around it.

Two bases, as vLLM's ``SpecDecodeBaseProposer`` and its subclasses: a subclass supplies only what
differs, never the cache, feed and mask code.

- :class:`DraftNetwork`: what tree growth (:func:`~specdec.drafters.growth.grow`) drives, one per
  call. The base keeps the rows (:class:`RowTable`), the lazily made ragged cache of each row's
  committed tokens, the catch-up feed over the committed tokens a row's cache has not seen
  (:meth:`~DraftNetwork.catch_up`, one left-padded forward for every row), the ONE channel through
  which a tree reaches a forward (:meth:`~DraftNetwork.through_tree`: a :class:`TreeMask`, given as
  :func:`specdec.compat.tree_inputs` makes it for the served model, inside
  :func:`specdec.compat.checked_forward`, exactly as the engine gives the target its tree), and the
  tail that forgets finished rows. A network supplies ``root(states, depths)`` (its forward over the
  catch-up feed: the root's children's logits) and ``expand(level)`` (one level of the tree), and
  overrides ``keep_tree`` when accepted tree entries stay in its cache.
- :class:`ModelDrafter`: the drafter configuration around a network: the tree shape (``k``, ``top_k``,
  ``width``, ``budget``, ``tree``), what it builds per target (:meth:`~ModelDrafter.bind`, cached per
  target, device and dtype, with the checkpoint's target fingerprint enforced first), ``check`` and
  ``proposer``; and its checkpoint settings as a read/write pair (:meth:`~ModelDrafter.checkpoint_settings`
  writes what :meth:`~ModelDrafter.from_loaded` reads back), which training asks the drafter class for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from specdec.attention import TreeMask, install_tree_attention, layer_overlays
from specdec.backends.cpu_linear import install_linears
from specdec.cache import RaggedCache
from specdec.compat import check_servable, checked_forward, through_masks, tree_inputs
from specdec.drafters.base import DecodeState, Drafter, Needs, PerTarget, Proposer, TargetView, Verified
from specdec.drafters.growth import Growth, Level, TreeShape, grow
from specdec.training.checkpoint import check_target, load_checkpoint
from specdec.tree import DraftTree, TreeSpec
from specdec.verify import Acceptance


def vocab_size(model: PreTrainedModel) -> int:
    """Size of the distribution the model's output head scores (a reduced head still spans the vocabulary)."""
    head = model.get_output_embeddings()
    return getattr(head, "vocab_size", None) or head.weight.shape[0]


def check_vocab(draft: PreTrainedModel, target: torch.nn.Module) -> None:
    """Raise unless draft and target score the same vocabulary."""
    mine, theirs = vocab_size(draft), vocab_size(target)
    if mine != theirs:
        raise ValueError(f"drafter vocab {mine} != target vocab {theirs}: draft and target must share a tokenizer")


def prepare(network: torch.nn.Module, view: TargetView) -> None:
    """Set a drafter network up once: a draft LM is checked like a target (tree attention, or its own
    4-D masks; see :mod:`specdec.compat`), a bare decoder gets tree attention; and the CPU products."""
    if isinstance(network, PreTrainedModel):
        if hasattr(network, "get_output_embeddings") and network.get_output_embeddings() is not None:
            check_servable(network, view.options.attention_backend)
        else:
            install_tree_attention(network)
    if view.options.linear_backend != "torch":
        install_linears(network)


def chain_feed(counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Left-padded chains of ``counts[a]`` tokens per row, as one tree forward.

    Returns ``valid (A, M)``, the ancestor mask ``(A, M, M)`` (each token sees the row's earlier ones,
    padding only itself) and each column's offset within its chain ``(A, M)`` (padding: 0).
    """
    M = int(counts.max()) if len(counts) else 0
    col = torch.arange(M)
    valid = col[None, :] >= (M - counts)[:, None]  # (A, M)
    causal = torch.ones(M, M, dtype=torch.bool).tril()
    ancestors = (causal[None] & valid[:, None, :] & valid[:, :, None]) | torch.eye(M, dtype=torch.bool)[None]
    offset = (col[None, :] - (M - counts)[:, None]).clamp(min=0)
    return valid, ancestors, offset


class RowTable:
    """The rows a proposer's batched network holds, in its cache order, and the latest state of each.

    ``full(states, depths)`` lists every held row in order, rows not asked this step as stand-ins that
    draft nothing (depth 0), so one forward serves them all.
    """

    def __init__(self) -> None:
        self.order: list[int] = []
        self.latest: dict[int, DecodeState] = {}

    def add(self, states: list[DecodeState]) -> None:
        for s in states:
            if s.row not in self.latest and s.row not in self.order:
                self.order.append(s.row)
            self.latest[s.row] = s

    def full(self, states: list[DecodeState], depths: list[int]) -> tuple[list[DecodeState], list[int], list[int]]:
        """Every held row's state and depth cap (in order), and the position in it of each of ``states``."""
        self.add(states)
        asked = {s.row: (s, d) for s, d in zip(states, depths)}
        full = [asked.get(row, (self.latest[row], 0)) for row in self.order]
        where = {row: a for a, row in enumerate(self.order)}
        return [s for s, _ in full], [where[s.row] for s in states], [d for _, d in full]

    def drop_finished(self, states: list[DecodeState]) -> Tensor | None:
        """Forget rows that finished; the kept rows' indices in the old order (``None``: all kept)."""
        for s in states:
            if s.row in self.latest:
                self.latest[s.row] = s
        done = {s.row for s in states if s.finished}
        if not done & set(self.order):
            return None
        keep = [a for a, row in enumerate(self.order) if row not in done]
        self.order = [self.order[a] for a in keep]
        for row in done:
            self.latest.pop(row, None)
        return torch.tensor(keep, dtype=torch.long)


@dataclass
class Feed:
    """One catch-up forward: each row's unseen committed tokens, left-padded, then ``extra`` slots.

    Attributes:
        counts: ``(A,)`` committed tokens each row feeds.
        valid: ``(A, M)`` real columns (the fed tokens and the extra slots).
        committed: ``(A, M)`` the columns holding committed tokens (what the cache keeps).
        ancestors: ``(A, M, M)`` each column sees its row's earlier ones.
        positions: ``(A, M)`` position ids (padding: the row's first).
        cached: cache columns before the forward.
        extra: trailing slots after each row's tokens (PARD's masks).
    """

    counts: Tensor
    valid: Tensor
    committed: Tensor
    ancestors: Tensor
    positions: Tensor
    cached: int
    extra: int

    def place(self, rows: list[Tensor]) -> Tensor:
        """``(A, M, ...)`` with row ``a``'s ``rows[a]`` ``(counts[a], ...)`` in its token columns, zeros elsewhere."""
        A, M = self.valid.shape
        out = rows[0].new_zeros(A, M, *rows[0].shape[1:])
        for a, values in enumerate(rows):
            out[a, M - self.extra - int(self.counts[a]) : M - self.extra] = values
        return out


class DraftNetwork:
    """The base of draft networks (see the module docstring): rows, a lazy ragged cache, the catch-up
    feed, the tree channel, the finished-row tail. Subclasses give ``root`` and ``expand``.

    Args:
        view: the call's view of the target.
        served: the module whose serving mode decides how a tree reaches it (a draft LM checked like a
            target, a bare decoder with tree attention, or the target itself for early exit).
        cached: the module whose layers the ragged cache mirrors (``None``: no cache of its own).
    """

    needs: Needs = Needs()

    def __init__(self, view: TargetView, served: nn.Module, cached: nn.Module | None = None) -> None:
        self.backend = view.options.attention_backend
        self.served, self.cached = served, cached
        self.overlays = layer_overlays(served)
        self.device = next(served.parameters()).device
        self.rows = RowTable()
        self.cache: RaggedCache | None = None
        self.tree_start = 0  # cache columns before this step's tree

    def prefill(self, states: list[DecodeState], verified: list[Verified]) -> None:
        self.rows.add(states)

    def root(self, states: list[DecodeState], depths: list[int]) -> Tensor:
        """``(A, V)`` logits of each row's root's children (after the catch-up feed)."""
        raise NotImplementedError

    def expand(self, level: Level) -> Tensor:
        """``(A, F, V)`` logits of the children of ``level``'s nodes, in one forward."""
        raise NotImplementedError

    def through_tree(self, call, ancestors: Tensor, key_positions: Tensor, *args, start: Tensor | None = None,
                     end: Tensor | None = None, cached: int | None = None, **kwargs):
        """``call(*args, **kwargs)`` given the tree ``ancestors (A, T, N)`` over keys at ``key_positions (A, N)``
        and each row's cached ``[start, end)`` (default: this network's cache) through the one channel the
        engine uses too (:func:`~specdec.compat.tree_inputs` inside :func:`~specdec.compat.checked_forward`)."""
        device = self.device
        if ancestors.shape[0] > 1 and through_masks(self.served):
            # its masks carry a tree over one row's cache, but a ragged batch of draft rows crashes inside
            # some of these families (gpt_neox_japanese, megatron-bert): refused before any token
            raise ValueError(f"{type(self.served).__name__} is served through its own 4-D attention masks, which "
                             f"do not carry a draft network's batch of {ancestors.shape[0]} ragged rows: draft "
                             "with it one prompt at a time, or use a drafter without a network of its own "
                             "(PromptLookup) for batches")
        start = self.cache.start if start is None else start
        end = self.cache.end if end is None else end
        cached = self.cache.length if cached is None else cached
        tree = TreeMask(start.to(device), end.to(device), ancestors.to(device), self.backend, key_positions.to(device),
                        self.overlays)
        with checked_forward(self.served, tree):
            return call(*args, **kwargs, **tree_inputs(self.served, tree, cached))

    def catch_up(self, counts: Tensor, extra: int = 0) -> Feed:
        """The feed of ``counts (A,)`` committed tokens per row (and ``extra`` slots after them), making the
        cache on first use."""
        if self.cache is None:
            self.cache = RaggedCache(self.cached, len(counts))
        valid, ancestors, offset = chain_feed(counts + extra)
        committed = valid.clone()
        committed[:, valid.shape[1] - extra :] = False
        positions = self.cache.lengths[:, None] + offset
        return Feed(counts, valid, committed, ancestors, positions, self.cache.length, extra)

    def catch_up_tokens(self, states: list[DecodeState], extra: int = 0) -> tuple[Feed, Tensor]:
        """:meth:`catch_up` over each row's tokens its cache has not seen, and their ids ``(A, M)``."""
        seen = self.cache.lengths if self.cache is not None else torch.zeros(len(states), dtype=torch.long)
        feed = self.catch_up(torch.tensor([s.tokens.shape[1] for s in states]) - seen, extra)  # the root at least
        return feed, feed.place([s.tokens[0, int(seen[a]) :].cpu() for a, s in enumerate(states)])

    def keep_fed(self, feed: Feed) -> None:
        """After the catch-up forward: the cache keeps the committed tokens' entries (extra slots dropped)."""
        self.cache.commit([feed.cached + feed.committed[a].nonzero().flatten() for a in range(len(feed.counts))])
        self.tree_start = self.cache.length

    def level_positions(self, level: Level) -> tuple[Tensor, Tensor]:
        """``(A, F)`` positions of ``level``'s nodes and ``(A, N)`` of every fed node (the root sits at
        ``lengths - 1``)."""
        root = (self.cache.lengths - 1)[:, None]
        return (root + level.depth).expand_as(level.tokens), root + level.key_depths

    def keep_tree(self, fed: dict[int, list[int]]) -> None:
        """After a step: the tree's entries leave the cache (default; a draft LM keeps its accepted ones)."""
        if self.cache is not None:
            self.cache.truncate(self.tree_start)

    def commit(self, states: list[DecodeState], fed: dict[int, list[int]], verified: list[Verified]) -> None:
        """Learn the step's outcome (``fed``: per row, the feed indices of the accepted nodes it fed)."""
        self.keep_tree(fed)
        self.drop_finished(states)

    def drop_finished(self, states: list[DecodeState]) -> Tensor | None:
        """Forget finished rows, in the row table and the cache; the kept rows (``None``: all)."""
        keep = self.rows.drop_finished(states)
        if keep is not None and self.cache is not None:
            if len(keep):
                self.cache.select(keep)
            else:
                self.cache = None
        return keep


class GrowingProposer(Proposer):
    """A model drafter's proposer: :func:`grow` over a :class:`DraftNetwork`."""

    def __init__(self, net: DraftNetwork, shape: TreeShape) -> None:
        self.net, self.shape = net, shape
        self.needs = net.needs
        self.growth: Growth | None = None
        self.where: list[int] = []

    def prefill(self, states: list[DecodeState], verified: list[Verified]) -> None:
        self.net.prefill(states, verified)

    @torch.no_grad()
    def propose(self, states: list[DecodeState], depths: list[int]) -> list[DraftTree]:
        full, self.where, full_depths = self.net.rows.full(states, depths)
        self.growth = grow(self.shape, self.net, full, full_depths)
        return [self.growth.trees[a] for a in self.where]

    def commit(self, states: list[DecodeState], results: list[Acceptance], verified: list[Verified]) -> None:
        fed: dict[int, list[int]] = {}
        if self.growth is not None:
            asked = {self.net.rows.order[a]: a for a in self.where}
            for state, result in zip(states, results):
                if state.row in asked:
                    fed[state.row] = self.growth.fed_index(asked[state.row], result.path)
        self.growth = None
        self.net.commit(states, fed, verified)


class ModelDrafter(Drafter):
    """The base of the model drafters (see the module docstring).

    Args:
        k, top_k, width, budget, tree: the tree shape (:class:`~specdec.drafters.growth.TreeShape`): depth
            ``k``; ``top_k`` children per expanded node (1 = a chain); ``width`` frontier nodes expanded per
            depth; greedy trees keep their ``budget`` most probable nodes; or a static ``tree``.
        checkpoint: a loaded checkpoint whose target fingerprint :meth:`bound` enforces (``None``: any target).
    """

    kind: ClassVar[str | None] = None  # the checkpoint kind (``experiments.train_drafter drafter=<kind>``)
    default_checkpoint: ClassVar[str | None] = None  # the shipped checkpoint from_checkpoint() loads

    def __init__(self, k: int = 4, top_k: int = 1, width: int | None = None, budget: int | None = None,
                 tree: TreeSpec | list[list[int]] | None = None, checkpoint: dict | None = None) -> None:
        self.shape = TreeShape.make(k, top_k, width, budget, tree)
        self.checkpoint = checkpoint
        self._bound = PerTarget()

    @property
    def k(self) -> int:
        return self.shape.k

    def bind(self, target: nn.Module) -> Any:
        """What this drafter builds from ``target`` (heads moved to its dtype, a reduced output head, a
        draft LM on its embedding); raise ``ValueError`` when it cannot serve it."""
        return None

    def network(self, bound: Any, view: TargetView) -> DraftNetwork:
        """The call's draft network over what :meth:`bind` built."""
        raise NotImplementedError

    def bound(self, target: nn.Module) -> Any:
        """:meth:`bind`'s result for ``target``, built once per target, device and dtype (the checkpoint's
        target fingerprint checked first)."""
        def build():
            if self.checkpoint is not None:
                check_target(self.checkpoint, target)
            return self.bind(target)

        return self._bound.get(target, build)

    def check(self, target: nn.Module) -> None:
        self.bound(target)

    def proposer(self, view: TargetView) -> Proposer:
        return GrowingProposer(self.network(self.bound(view.model), view), self.shape)

    # checkpoints: what training writes (checkpoint_settings, trained_weights) and from_loaded reads back

    @classmethod
    def checkpoint_settings(cls, target: PreTrainedModel, settings) -> dict:
        """The settings a checkpoint of this drafter keeps to rebuild its module (``settings``: the
        training's :class:`~specdec.training.train.TrainSettings`, resolved)."""
        raise NotImplementedError(f"{cls.__name__} has no trained checkpoints")

    @classmethod
    def trained_weights(cls, module: nn.Module) -> dict[str, Tensor]:
        """What a checkpoint keeps of the trained ``module`` (default: all of it)."""
        return module.state_dict()

    @classmethod
    def from_loaded(cls, checkpoint: dict, **kwargs) -> ModelDrafter:
        """The drafter of a loaded checkpoint (read back what :meth:`checkpoint_settings` wrote)."""
        raise NotImplementedError(f"{cls.__name__} has no trained checkpoints")

    @classmethod
    def from_checkpoint(cls, checkpoint: str | None = None, **kwargs) -> ModelDrafter:
        """A shipped checkpoint by name, or a ``.pt`` path written by ``experiments.train_drafter``."""
        return cls.from_loaded(load_checkpoint(checkpoint or cls.default_checkpoint, cls.kind), **kwargs)

