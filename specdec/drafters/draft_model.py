"""An independent draft model: any causal LM sharing the target's vocabulary (Leviathan et al. 2023;
Chen et al. 2023), drafting chains or trees for every row at once, with its own ragged KV cache.

Each step the draft first catches up on the committed tokens it has not seen (one forward for all
rows, left-padded), then grows the tree level by level with :func:`~specdec.drafters.growth.grow`:
one forward per depth for all rows, through tree attention. On commit the draft cache keeps the
accepted nodes it fed, moved next to the prefix, and drops the rest.

The machinery here (:class:`GrowingProposer`, the per-call rows of a ragged draft cache) is what
the other model drafters compose with their own networks: EAGLE's head, early exit's first layers,
the distilled draft.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from transformers import PreTrainedModel

from specdec.attention import TreeMask, install_tree_attention, layer_overlays
from specdec.backends.cpu_linear import install_linears
from specdec.cache import RaggedCache
from specdec.compat import check_servable, tree_inputs
from specdec.drafters.base import DecodeState, Drafter, Proposer, TargetView
from specdec.drafters.growth import Growth, Level, TreeShape, grow
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

    ``full(states)`` lists every held row in order, rows not asked this step as stand-ins that draft
    nothing (``max_depth=0``), so one forward serves them all.
    """

    def __init__(self) -> None:
        self.order: list[int] = []
        self.latest: dict[int, DecodeState] = {}

    def add(self, states: list[DecodeState]) -> None:
        for s in states:
            if s.row not in self.latest and s.row not in self.order:
                self.order.append(s.row)
            self.latest[s.row] = s

    def full(self, states: list[DecodeState]) -> tuple[list[DecodeState], list[int]]:
        """Every held row's state (in order) and the position in it of each of ``states``."""
        self.add(states)
        asked = {s.row: s for s in states}
        full = [asked.get(row) or dataclasses.replace(self.latest[row], max_depth=0) for row in self.order]
        where = {row: a for a, row in enumerate(self.order)}
        return full, [where[s.row] for s in states]

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


class GrowingProposer(Proposer):
    """A model drafter's proposer: :func:`grow` over a batched network (see :class:`LMNet` for the
    interface a network gives: ``root``, ``expand``, ``commit``)."""

    def __init__(self, net, shape: TreeShape) -> None:
        self.net, self.shape = net, shape
        self.needs_hidden = getattr(net, "needs_hidden", False)
        self.growth: Growth | None = None
        self.where: list[int] = []

    def prefill(self, states: list[DecodeState]) -> None:
        self.net.prefill(states)

    @torch.no_grad()
    def propose(self, states: list[DecodeState]) -> list[DraftTree]:
        full, self.where = self.net.rows.full(states)
        self.growth = grow(self.shape, self.net, full)
        return [self.growth.trees[a] for a in self.where]

    def commit(self, states: list[DecodeState], results: list[Acceptance]) -> None:
        fed: dict[int, list[int]] = {}
        if self.growth is not None:
            asked = {self.net.rows.order[a]: a for a in self.where}
            for state, result in zip(states, results):
                if state.row in asked:
                    fed[state.row] = self.growth.fed_index(asked[state.row], result.path)
        self.growth = None
        self.net.commit(states, fed)


class LMNet:
    """A causal LM as the draft network, with a ragged cache of every row's committed tokens."""

    def __init__(self, model: PreTrainedModel, view: TargetView) -> None:
        self.model, self.backend = model, view.options.attention_backend
        self.overlays = layer_overlays(model)
        self.rows = RowTable()
        self.cache: RaggedCache | None = None
        self.tree_start = 0  # cache columns before this step's tree

    def prefill(self, states: list[DecodeState]) -> None:
        self.rows.add(states)

    def _forward(self, ids: Tensor, positions: Tensor, ancestors: Tensor, key_positions: Tensor,
                 logits_to_keep: int = 0) -> Tensor:
        device = self.model.device
        mask = TreeMask(self.cache.start.to(device), self.cache.end.to(device), ancestors.to(device), self.backend,
                        key_positions.to(device), self.overlays)
        return self.model(input_ids=ids.to(device), position_ids=positions.to(device), cache=self.cache.cache,
                          use_cache=True, logits_to_keep=logits_to_keep,
                          **tree_inputs(self.model, mask, self.cache.length)).logits

    def root(self, states: list[DecodeState]) -> Tensor:
        if self.cache is None:
            self.cache = RaggedCache(self.model, len(states))
        seen = self.cache.lengths  # (A,) tokens of each row already in the draft cache
        counts = torch.tensor([s.tokens.shape[1] for s in states]) - seen  # the root at least
        valid, ancestors, offset = chain_feed(counts)
        ids = torch.zeros(valid.shape, dtype=torch.long)
        for a, s in enumerate(states):
            ids[a, valid[a]] = s.tokens[0, int(seen[a]):].cpu()
        S = self.cache.length
        positions = seen[:, None] + offset
        logits = self._forward(ids, positions, ancestors, positions, logits_to_keep=1)  # (A, 1, V)
        self.cache.commit([S + valid[a].nonzero().flatten() for a in range(len(states))])
        self.tree_start = self.cache.length
        return logits[:, -1]

    def expand(self, level: Level) -> Tensor:
        root = (self.cache.lengths - 1)[:, None]  # the root's position: it sits at lengths - 1
        return self._forward(level.tokens, (root + level.depth).expand_as(level.tokens), level.ancestors,
                             root + level.key_depths)  # (A, F, V)

    def commit(self, states: list[DecodeState], fed: dict[int, list[int]]) -> None:
        if self.cache is None:
            return
        kept = [torch.tensor([self.tree_start + j for j in fed.get(row, [])], dtype=torch.long)
                for row in self.rows.order]
        self.cache.commit(kept)  # accepted fed nodes next to the prefix; the rest of the tree goes
        keep = self.rows.drop_finished(states)
        if keep is not None:
            if len(keep):
                self.cache.select(keep)
            else:
                self.cache = None


class DraftModel(Drafter):
    """Drafts a chain (``top_k=1``) or a tree of depth ``k`` with a small causal LM.

    Args:
        model: the draft LM; must share the target's tokenizer.
        k: draft depth per step.
        top_k: children per expanded node (1 = a chain).
        width: frontier nodes expanded per depth (default ``top_k``).
        budget: greedy trees keep their ``budget`` most probable nodes (default: all).
        tree: a static tree shape (``TreeSpec`` or list of paths of child ranks); overrides
            ``top_k``/``width``/``budget``, and ``k`` caps its depth.
    """

    def __init__(self, model: PreTrainedModel, k: int = 4, top_k: int = 1, width: int | None = None,
                 budget: int | None = None, tree: TreeSpec | list[list[int]] | None = None) -> None:
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"DraftModel needs a causal LM (a transformers model), got {type(model).__name__}: "
                             "for a trained drafter pass it directly as drafter=")
        self.model = model.eval()
        self.shape = TreeShape.make(k, top_k, width, budget, tree)

    @property
    def k(self) -> int:
        return self.shape.k

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: str = "float32", layers: int | None = None,
                        **kwargs) -> DraftModel:
        """Load the draft with :func:`specdec.load_model`; ``layers`` keeps only its first layers."""
        from specdec.models import load_model

        model, _ = load_model(name_or_path, dtype=dtype)
        if layers is not None:
            total = len(model.model.layers)
            if not 1 <= layers <= total:
                raise ValueError(f"DraftModel layers={layers} must be in [1, {total}] for {name_or_path!r}")
            model.model.layers = model.model.layers[:layers]
            model.config.num_hidden_layers = layers
        return cls(model, **kwargs)

    def check(self, target: torch.nn.Module) -> None:
        check_vocab(self.model, target)

    def proposer(self, view: TargetView) -> Proposer:
        self.check(view.model)
        prepare(self.model, view)
        return GrowingProposer(LMNet(self.model, view), self.shape)
