"""Medusa heads (Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with
Multiple Decoding Heads").

K small residual blocks read the target's final hidden state of the last committed position
(the one whose logits chose the root) and, through the target's output head (optionally reduced
to its frequent tokens), guess the tokens 2 ... K+1 ahead: head d proposes depth d of the tree.
There is no draft forward at all; the tree is a static shape over the heads' ranked candidates,
by default the ``budget`` nodes of greatest expected acceptance under the per-rank accuracies
measured when the heads were trained (:meth:`TreeSpec.from_accuracies`); or, with ``tree="ddtree"``,
the ``budget`` likeliest prefixes under the heads' distributions, best-first (:mod:`specdec.drafters.ddtree`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from specdec.backends.cpu_linear import install_linears
from specdec.drafters.base import DecodeState, Drafter, PerTarget, Proposer, TargetView, module_for
from specdec.drafters.ddtree import DDTree, as_ddtree
from specdec.training.checkpoint import check_target, load_checkpoint, load_weights
from specdec.drafters.vocab import ReducedHead
from specdec.tree import DraftTree, TreeSpec
from specdec.verify import Acceptance


class MedusaHeads(nn.Module):
    """``K`` residual SiLU blocks: ``(..., H) -> (..., K, H)``; zero-initialised, so an untrained head
    repeats the target's own next-token guess."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(heads))
        for block in self.blocks:
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)

    def __len__(self) -> int:
        return len(self.blocks)

    def forward(self, features: Tensor) -> Tensor:
        return torch.stack([features + nn.functional.silu(block(features)) for block in self.blocks], dim=-2)


class Medusa(Drafter):
    """Proposes a static tree over the heads' top candidates.

    Args:
        heads: the trained :class:`MedusaHeads`.
        vocab: token ids the output head scores (``None``: all).
        tree: the shape (``TreeSpec`` or paths of ranks, node depth d = head d); default: the best
            ``budget``-node tree under ``rank_accuracy``, or a chain when there is none; ``"ddtree"`` (or a
            :class:`~specdec.drafters.ddtree.DDTree`): each step's best-first tree over the heads' marginals.
        budget: nodes of the default tree (of the DDTree: the most nodes).
        rank_accuracy: ``(K, R)`` how often head d's rank-r candidate was right (from training).
        k: cap on the depth (default: all heads).
        checkpoint: the loaded checkpoint, whose target fingerprint is enforced.
    """

    def __init__(self, heads: MedusaHeads, vocab: Tensor | None = None,
                 tree: TreeSpec | list | str | DDTree | None = None, budget: int = 16,
                 rank_accuracy: Tensor | None = None, k: int | None = None, checkpoint: dict | None = None) -> None:
        if not isinstance(heads, MedusaHeads):
            raise ValueError(f"Medusa needs MedusaHeads, got {type(heads).__name__}: use Medusa.from_checkpoint(...)")
        depth = len(heads) if k is None else min(k, len(heads))
        if depth < 1:
            raise ValueError(f"Medusa k={k} must be >= 1")
        self.ddtree = as_ddtree(tree, budget)
        if self.ddtree is not None:  # the static shape is then only the heads' depth
            tree = TreeSpec.from_paths([[0] * d for d in range(1, depth + 1)])
        if isinstance(tree, list):
            tree = TreeSpec.from_paths(tree)
        if tree is None:
            tree = (TreeSpec.from_accuracies(rank_accuracy[:depth], budget) if rank_accuracy is not None
                    else TreeSpec.from_paths([[0] * d for d in range(1, depth + 1)]))
        spec_depths = DraftTree(torch.zeros(len(tree), dtype=torch.long), torch.tensor(tree.parents)).depths
        if int(spec_depths.max()) > len(heads):
            raise ValueError(f"Medusa tree is {int(spec_depths.max())} deep but there are only {len(heads)} heads")
        self.heads, self.vocab, self.checkpoint, self.spec = heads.eval(), vocab, checkpoint, tree
        self.k = depth
        self.spec_depths = spec_depths.tolist()
        self._bound = PerTarget()

    @classmethod
    def from_checkpoint(cls, checkpoint: str = "medusa-smollm2-135m", **kwargs) -> Medusa:
        """A shipped checkpoint by name, or a ``.pt`` path written by ``experiments.train_drafter``."""
        ckpt = load_checkpoint(checkpoint, "medusa")
        settings = ckpt["settings"]
        heads = MedusaHeads(settings["hidden"], settings["heads"])
        load_weights(heads, ckpt)
        accuracy = ckpt["metrics"].get("rank_accuracy")
        kwargs.setdefault("rank_accuracy", None if accuracy is None else torch.tensor(accuracy))
        return cls(heads, ckpt["vocab"], checkpoint=ckpt, **kwargs)

    def _bind(self, target: torch.nn.Module) -> tuple[MedusaHeads, ReducedHead]:
        if self.checkpoint is not None:
            check_target(self.checkpoint, target)
        return module_for(self.heads, target), ReducedHead(target.get_output_embeddings(), self.vocab)

    def check(self, target: torch.nn.Module) -> None:
        self._bound.get(target, lambda: self._bind(target))

    def proposer(self, view: TargetView) -> Proposer:
        heads, lm = self._bound.get(view.model, lambda: self._bind(view.model))
        if view.options.linear_backend != "torch":
            install_linears(heads)
        return _MedusaProposer(self, heads, lm, None if self.ddtree is None else self.ddtree.builder(view))


class _MedusaProposer(Proposer):
    """Each row's last target feature, and the heads' static tree over it."""

    needs_hidden = True

    def __init__(self, medusa: Medusa, heads: MedusaHeads, lm: ReducedHead, builder=None) -> None:
        self.medusa, self.heads, self.lm, self.builder = medusa, heads, lm, builder  # builder: DDTree trees
        self.last: dict[int, Tensor | None] = {}

    def prefill(self, states: list[DecodeState]) -> None:
        self.last = {s.row: s.hidden[-1] if len(s.hidden) else None for s in states}

    @torch.no_grad()
    def propose(self, states: list[DecodeState]) -> list[DraftTree]:
        ready = [s for s in states if self.last.get(s.row) is not None and min(self.medusa.k, s.budget) > 0]
        logits = {}
        if ready:
            out = self.lm(self.heads(torch.stack([self.last[s.row] for s in ready])))  # (A, K, V)
            logits = {s.row: out[a] for a, s in enumerate(ready)}
        if self.builder is not None:
            k = self.medusa.k
            return self.builder.trees([logits[s.row][:k] if s.row in logits else None for s in states], states)
        return [self._tree(s, logits[s.row]) if s.row in logits else DraftTree.empty(s.tokens.device)
                for s in states]

    def _tree(self, state: DecodeState, logits: Tensor) -> DraftTree:
        """The static shape filled from the heads' candidates: greedy takes ranks, sampling draws from q."""
        m = self.medusa
        depth = min(m.k, state.budget)
        keep = [i for i, d in enumerate(m.spec_depths) if d <= depth]  # a prefix-closed subset, in order
        scores = torch.cat([state.sampling.process(logits[d : d + 1], state.n_generated + d) for d in range(depth)])
        device = state.tokens.device
        remap = {old: new for new, old in enumerate(keep)} | {-1: -1}
        parents = torch.tensor([remap[m.spec.parents[i]] for i in keep], dtype=torch.long, device=device)
        if not state.sampling.do_sample:
            ranked = scores.topk(max(m.spec.ranks[i] for i in keep) + 1, dim=-1).indices  # (depth, R)
            tokens = [int(ranked[m.spec_depths[i] - 1, m.spec.ranks[i]]) for i in keep]
            return DraftTree(torch.tensor(tokens, dtype=torch.long, device=device), parents)
        q = torch.softmax(scores, dim=-1)  # (depth, V); a node's children are i.i.d. draws of the next head
        rows = q[[m.spec_depths[i] - 1 for i in keep]].to(device)
        tokens = torch.multinomial(rows, 1, generator=state.generator)[:, 0]
        return DraftTree(tokens, parents, rows)

    def commit(self, states: list[DecodeState], results: list[Acceptance]) -> None:
        for state in states:
            self.last[state.row] = None if state.finished else state.hidden[-1]
