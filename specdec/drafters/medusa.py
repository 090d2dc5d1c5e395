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
from specdec.drafters.base import DecodeState, Needs, Proposer, TargetView, Verified, module_for
from specdec.drafters.ddtree import DDTree, as_ddtree
from specdec.drafters.network import ModelDrafter
from specdec.training.checkpoint import load_weights
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


class Medusa(ModelDrafter):
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
        super().__init__(depth, checkpoint=checkpoint)  # the shape's depth; the static tree is ``spec``
        self.heads, self.vocab, self.spec = heads.eval(), vocab, tree
        self.spec_depths = spec_depths.tolist()

    kind = "medusa"
    default_checkpoint = "medusa-smollm2-135m"

    @classmethod
    def from_loaded(cls, checkpoint: dict, **kwargs) -> Medusa:
        settings = checkpoint["settings"]
        heads = MedusaHeads(settings["hidden"], settings["heads"])
        load_weights(heads, checkpoint)
        accuracy = checkpoint["metrics"].get("rank_accuracy")
        kwargs.setdefault("rank_accuracy", None if accuracy is None else torch.tensor(accuracy))
        return cls(heads, checkpoint["vocab"], checkpoint=checkpoint, **kwargs)

    @classmethod
    def checkpoint_settings(cls, target, settings) -> dict:
        return {"hidden": target.config.hidden_size, "heads": settings.heads}

    def bind(self, target: torch.nn.Module) -> tuple[MedusaHeads, ReducedHead]:
        return module_for(self.heads, target), ReducedHead(target.get_output_embeddings(), self.vocab)

    def proposer(self, view: TargetView) -> Proposer:
        heads, lm = self.bound(view.model)
        if view.options.linear_backend != "torch":
            install_linears(heads)
        return _MedusaProposer(self, heads, lm, None if self.ddtree is None else self.ddtree.builder(view))


class _MedusaProposer(Proposer):
    """Each row's last target feature, and the heads' static tree over it."""

    needs = Needs(hidden=True)

    def __init__(self, medusa: Medusa, heads: MedusaHeads, lm: ReducedHead, builder=None) -> None:
        self.medusa, self.heads, self.lm, self.builder = medusa, heads, lm, builder  # builder: DDTree trees
        self.last: dict[int, Tensor | None] = {}

    def prefill(self, states: list[DecodeState], verified: list[Verified]) -> None:
        self.last = {s.row: seen.hidden[-1] if len(seen.hidden) else None for s, seen in zip(states, verified)}

    @torch.no_grad()
    def propose(self, states: list[DecodeState], depths: list[int]) -> list[DraftTree]:
        cap = {s.row: d for s, d in zip(states, depths)}
        ready = [s for s in states if self.last.get(s.row) is not None and min(self.medusa.k, cap[s.row]) > 0]
        logits = {}
        if ready:
            out = self.lm(self.heads(torch.stack([self.last[s.row] for s in ready])))  # (A, K, V)
            logits = {s.row: out[a] for a, s in enumerate(ready)}
        if self.builder is not None:
            k = self.medusa.k
            return self.builder.trees([logits[s.row][:k] if s.row in logits else None for s in states], states,
                                      depths)
        return [self._tree(s, logits[s.row], cap[s.row]) if s.row in logits else DraftTree.empty(s.tokens.device)
                for s in states]

    def _tree(self, state: DecodeState, logits: Tensor, depth: int) -> DraftTree:
        """The static shape filled from the heads' candidates: greedy takes ranks, sampling draws from q."""
        m = self.medusa
        depth = min(m.k, depth)
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

    def commit(self, states: list[DecodeState], results: list[Acceptance], verified: list[Verified]) -> None:
        for state, seen in zip(states, verified):
            self.last[state.row] = None if state.finished else seen.hidden[-1]
