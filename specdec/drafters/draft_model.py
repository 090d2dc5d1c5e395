"""An independent draft model: any causal LM sharing the target's vocabulary
(Leviathan et al. 2023; Chen et al. 2023), with its own KV cache kept across steps.

With ``top_k > 1`` it grows a tree level by level (SpecInfer, Miao et al. 2024;
EAGLE-2's dynamic trees, Li et al. 2024): at each depth the ``width`` most probable
frontier nodes (by cumulative draft log-probability) are fed in one forward through
tree attention, each gets ``top_k`` children, and greedy trees are reranked to a
node ``budget`` at the end. With ``tree=TreeSpec`` (or a list of paths) the shape is
static instead (Medusa / EAGLE-1): node ``[0, 1]`` is the second candidate below the
first. The draft cache holds the nodes it fed; on commit it keeps
the accepted ones, moved next to the prefix.

Greedy trees take the top-k tokens (point masses, ``q=None``). Sampled trees draw each
node's children i.i.d. from q (after the target's temperature / top-k / top-p), which
recursive rejection sampling needs to stay lossless; they are never pruned by value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from specdec.attention import TreeMask, tree_attention_enabled
from specdec.cache import commit_rows, new_cache
from specdec.drafters.base import DecodeState, Drafter
from specdec.tree import DraftTree, TreeSpec
from specdec.verify import Acceptance


def vocab_size(model: PreTrainedModel) -> int:
    """Size of the distribution the model's output head scores (a reduced head still spans the vocabulary)."""
    head = model.get_output_embeddings()
    return getattr(head, "vocab_size", None) or head.weight.shape[0]


@dataclass
class _Row:
    """One row's draft cache and the tree it last proposed."""

    cache: DynamicCache
    cached: int = 0  # committed tokens held in the cache
    fed: dict[int, int] = field(default_factory=dict)  # proposed node -> its cache position


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
        attention_backend: tree attention backend of the draft's tree forwards.
    """

    def __init__(self, model: PreTrainedModel | None, k: int = 4, top_k: int = 1, width: int | None = None,
                 budget: int | None = None, tree: TreeSpec | list[list[int]] | None = None,
                 attention_backend: str = "auto") -> None:
        if k < 1:
            raise ValueError(f"DraftModel k={k} must be >= 1")
        if top_k < 1:
            raise ValueError(f"DraftModel top_k={top_k} must be >= 1")
        if budget is not None and budget < 1:
            raise ValueError(f"DraftModel budget={budget} must be >= 1 (or None for no limit)")
        self.model, self.k, self.top_k = model.eval() if model is not None else None, k, top_k
        self.width = top_k if width is None else width
        self.budget, self.attention_backend = budget, attention_backend
        self.spec = TreeSpec.from_paths(tree) if isinstance(tree, list) else tree
        self._spec_children: dict[int, list[tuple[int, int]]] = {}  # spec parent -> [(spec node, rank)]
        if self.spec is not None:
            for node, (parent, rank) in enumerate(zip(self.spec.parents, self.spec.ranks)):
                self._spec_children.setdefault(parent, []).append((node, rank))
        self.rows: dict[int, _Row] = {}

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

    def networks(self) -> list[torch.nn.Module]:
        return [] if self.model is None else [self.model]

    def check(self, target: torch.nn.Module) -> None:
        mine, theirs = vocab_size(self.model), vocab_size(target)
        if mine != theirs:
            raise ValueError(
                f"drafter vocab {mine} != target vocab {theirs}: draft and target must share a tokenizer"
            )

    def prefill(self, states: list[DecodeState]) -> None:
        self.rows = {s.row: _Row(new_cache(self.model)) for s in states}

    @torch.inference_mode()
    def propose(self, states: list[DecodeState]) -> list[DraftTree]:
        with tree_attention_enabled(self.model):
            return [self._propose_row(s, self.rows[s.row]) for s in states]

    def _children(self, logits: Tensor, state: DecodeState, n_before: int, base: float, ranks: list[int]):
        """(token, q row or None, cumulative log-prob) of the children of a node with ``logits: (V,)``:
        greedy takes the candidates of the given ranks, sampling draws ``len(ranks)`` i.i.d. from q."""
        scores = state.sampling.process(logits[None], n_before)[0]  # (V,)
        logp = torch.log_softmax(scores, dim=-1)
        if state.sampling.do_sample:
            q = logp.exp()
            toks = torch.multinomial(q, len(ranks), replacement=True, generator=state.generator).tolist()
            return [(t, q, base + float(logp[t])) for t in toks]
        top = logp.topk(max(ranks) + 1)
        return [(int(top.indices[r]), None, base + float(top.values[r])) for r in ranks]

    def _plan(self, node_spec: list[int | None], level: list[int], logps: list[float]) -> list[tuple[int, list]]:
        """Which nodes of the last level to expand, each with (spec node, rank) of its children."""
        if self.spec is None:
            frontier = sorted(sorted(level, key=lambda i: -logps[i])[: self.width])
            return [(node, [(None, r) for r in range(self.top_k)]) for node in frontier]
        return [(node, self._spec_children[node_spec[node]]) for node in level
                if node_spec[node] in self._spec_children]

    def _propose_row(self, state: DecodeState, row: _Row) -> DraftTree:
        depth = min(self.k, state.budget)
        row.fed = {}
        if depth == 0:
            return DraftTree.empty(state.tokens.device)
        root_logits = self._catch_up(state, row)  # (1, V)
        tokens, parents, qs, logps, depths, node_spec = [], [], [], [], [], []
        plan = [(-1, self._spec_children[-1] if self.spec else [(None, r) for r in range(self.top_k)])]
        for d in range(1, depth + 1):
            if d > 1:
                plan = self._plan(node_spec, level, logps)
                if not plan:
                    break
                root_logits = self._feed(row, [node for node, _ in plan], tokens, parents, d - 1)  # (|F|, V)
            level = []
            for f, (node, kids) in enumerate(plan):
                base = logps[node] if node >= 0 else 0.0
                children = self._children(root_logits[f], state, state.n_generated + d - 1, base, [r for _, r in kids])
                for (spec_node, _), (tok, q, lp) in zip(kids, children):
                    level.append(len(tokens))
                    tokens.append(tok), parents.append(node), qs.append(q), logps.append(lp), depths.append(d)
                    node_spec.append(spec_node)
        keep = list(range(len(tokens)))
        if self.spec is None and self.budget is not None and len(tokens) > self.budget and not state.sampling.do_sample:
            # EAGLE-2 rerank: the most probable nodes; a child is never likelier than its parent
            keep = sorted(sorted(keep, key=lambda i: (-logps[i], depths[i]))[: self.budget])
        remap = {old: new for new, old in enumerate(keep)}
        row.fed = {remap[old]: p for old, p in row.fed.items() if old in remap}
        q = torch.stack([qs[i] for i in keep]).to(state.tokens.device) if state.sampling.do_sample else None
        return DraftTree(
            torch.tensor([tokens[i] for i in keep], dtype=torch.long, device=state.tokens.device),
            torch.tensor([remap[parents[i]] if parents[i] >= 0 else -1 for i in keep], dtype=torch.long,
                         device=state.tokens.device),
            q,
        )

    def _catch_up(self, state: DecodeState, row: _Row) -> Tensor:
        """Feed the committed tokens the draft has not seen (the root last), plain causal attention;
        ``(1, V)`` logits of the root's children."""
        device = self.model.device
        n = state.tokens.shape[1]
        x = state.tokens[:, row.cached :].to(device)  # (1, new)
        pos = torch.arange(row.cached, n, device=device)[None]
        logits = self.model(input_ids=x, position_ids=pos, cache=row.cache, use_cache=True, logits_to_keep=1).logits
        row.cached = n
        return logits[0, -1:]

    def _feed(self, row: _Row, frontier: list[int], tokens: list[int], parents: list[int], depth: int) -> Tensor:
        """Run the draft on ``frontier`` nodes (all at ``depth``) through tree attention, after the
        ``row.cached`` committed entries and the nodes fed before; ``(|F|, V)`` logits."""
        device = self.model.device
        for node in frontier:
            row.fed[node] = row.cached + len(row.fed)
        fed = sorted(row.fed, key=row.fed.get)  # nodes in cache order
        tree = DraftTree(torch.tensor(tokens), torch.tensor(parents))
        ancestors = tree.ancestors[frontier][:, fed]  # (|F|, Tk)
        mask = TreeMask(torch.tensor([0], device=device), torch.tensor([row.cached], device=device),
                        ancestors[None].to(device), self.attention_backend)
        pos = torch.full((1, len(frontier)), row.cached - 1 + depth, device=device)
        return self._forward_nodes(row, frontier, tokens, parents, pos, mask)

    def _forward_nodes(self, row: _Row, frontier: list[int], tokens: list[int], parents: list[int], pos: Tensor,
                       mask: TreeMask) -> Tensor:
        """The draft's forward over the frontier nodes; ``(|F|, V)`` logits."""
        ids = torch.tensor([[tokens[i] for i in frontier]], device=pos.device)
        return self.model(input_ids=ids, position_ids=pos, cache=row.cache, use_cache=True, tree=mask).logits[0]

    def commit(self, states: list[DecodeState], results: list[Acceptance]) -> None:
        for state, result in zip(states, results):
            row = self.rows[state.row]
            kept = [row.fed[node] for node in result.path if node in row.fed]  # a prefix of the path
            end = torch.tensor([row.cached])
            row.cached = int(commit_rows(row.cache, end, [torch.tensor(kept, dtype=torch.long)])[0])
            row.fed = {}
