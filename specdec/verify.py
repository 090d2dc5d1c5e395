"""Acceptance rules: which drafted tokens to keep so the output is exactly the target's.

Terms, as in vLLM's rejection sampler:

* **accepted** tokens: drafts the rule keeps, a root-to-node path of the tree;
* **recovered** token: drawn from the residual distribution where a draft is rejected;
* **bonus** token: drawn from p after the last accepted node when nothing is rejected
  there (the node has no children, or greedy decoding).

Every step adds the accepted tokens plus exactly one recovered-or-bonus token.

p is the target distribution and q the draft's. Rows of ``p``/``logits`` are indexed
by position: row 0 is the root (the last committed token), row ``1 + i`` is tree node ``i``.

Greedy: follow the child whose token equals the target's argmax, as long as one exists.

Sampling (Leviathan et al. 2023, Chen et al. 2023; for trees SpecInfer, Miao et al.
2024): at a node, try its children in order. Child ``c`` with draft distribution ``q``
is accepted with probability ``min(1, p[c] / q[c])``; if rejected, ``p`` becomes
``norm(max(0, p - q))`` and the next sibling is tried. If all are rejected, the
recovered token is drawn from the final ``p``. A deterministic draft (``q=None``) is
a point mass, so rejection just removes that token from ``p``. Siblings that share
one ``q`` must be independent draws from it for the output to stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.tree import DraftTree


@dataclass(frozen=True)
class Acceptance:
    """The outcome of one step for one row.

    Attributes:
        path: accepted node indices, root side first (possibly empty).
        next_token: the recovered or bonus token appended after the path.
    """

    path: list[int]
    next_token: int

    def tokens(self, tree: DraftTree) -> list[int]:
        """The tokens this step adds: accepted drafts then the next token."""
        return tree.tokens[self.path].tolist() + [self.next_token]


def _children(tree: DraftTree) -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for node, parent in enumerate(tree.parents.tolist()):
        kids.setdefault(parent, []).append(node)
    return kids


def accept_greedy(tree: DraftTree, target_tokens: Tensor) -> Acceptance:
    """Longest path matching the target's choice, plus the target's token after it.

    Args:
        tree: the draft tree (``T`` nodes).
        target_tokens: ``(T + 1,)`` the target's argmax at the root and at every node.
    """
    choice = target_tokens.tolist()
    kids = _children(tree)
    tokens = tree.tokens.tolist()
    path: list[int] = []
    row = 0
    node = -1
    while True:
        nxt = next((c for c in kids.get(node, ()) if tokens[c] == choice[row]), None)
        if nxt is None:
            return Acceptance(path, choice[row])
        path.append(nxt)
        node, row = nxt, nxt + 1


def accept_sampling(tree: DraftTree, p: Tensor, generator: torch.Generator | None = None) -> Acceptance:
    """Lossless recursive rejection sampling over the tree.

    Args:
        tree: the draft tree (``T`` nodes), with ``q: (T, V)`` or ``None`` (point masses).
        p: ``(T + 1, V)`` target probabilities at the root and at every node.
        generator: the random generator used for every draw.
    """
    kids = _children(tree)
    tokens = tree.tokens.tolist()
    path: list[int] = []
    node = -1
    while True:
        p_cur = p[node + 1]
        accepted = None
        for child in kids.get(node, ()):
            tok = tokens[child]
            if tree.q is None:
                q_tok = 1.0
            else:
                q_tok = float(tree.q[child, tok])
            u = float(torch.rand((), generator=generator, device=p.device))
            if q_tok > 0 and u * q_tok < float(p_cur[tok]):  # u < p/q, without dividing by zero
                accepted = child
                break
            if tree.q is None:
                residual = p_cur.clone()
                residual[tok] = 0.0
            else:
                residual = (p_cur - tree.q[child]).clamp_min(0.0)
            total = residual.sum()
            if total <= 0:  # p == q exactly: the rejection had probability 0; keep p
                continue
            p_cur = residual / total
        if accepted is None:
            token = int(torch.multinomial(p_cur, 1, generator=generator))
            return Acceptance(path, token)
        path.append(accepted)
        node = accepted
