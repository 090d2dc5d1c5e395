"""Goodput control: each step, how deep every row drafts, to maximise expected tokens per second.

Speculation pays only when the tokens a step is expected to add outgrow what the step costs. A
verification forward over ``A`` rows of ``T`` columns costs ``c(A * T)`` (the measured cost by width,
:class:`CostModel`), and each depth of a model drafter's tree one draft forward more; a row drafting
``L`` tokens deep adds in expectation ``E(L) = 1 + sum_{d<=L} prod_{j<=d} alpha_j`` tokens, where
``alpha_j`` is the row's running acceptance at depth ``j`` (accepted at depth j / drafted to depth j,
with a prior). The controller picks the depth ``W`` (0 = plain decoding) maximising

    goodput(W) = sum_rows E_row(W) / (c(A * (1 + W * nodes_per_depth)) + W * draft_cost_per_depth)

and caps every row's draft at ``W`` (the depth cap the engine passes to ``propose(states, depths)``, through :class:`GoodputPolicy`); a row whose
expected gain is below what its columns cost drafts nothing. This is the per-step decision of
TurboSpec's goodput controller (Liu et al. 2024, "Optimizing Speculative Decoding for Serving Large
Language Models Using Goodput") and vLLM's dynamic speculation, on this engine's cost curve. Rows are
padded to the widest tree, so a row's own columns cost nothing once another row pays for the width;
the controller counts the batch's width, not each row's.

Once drafted, the trees are cut to the common depth that pays for the trees as they are (:meth:`Controller.trim`,
greedy only): a row that found nothing adds one token but still costs the batch's padded columns.

The cost curve is measured once per model, device, thread count and batch size (rounded up to a power
of two: A rows of T columns cost more than one row of A * T, since each row attends to its own cache; a
few forwards of growing width, a second or two for a 135M model on CPU) and kept on the model object;
draft cost per depth is learnt online from the drafter's own timings. Both come from wall-clock time, so
the depths a call drafts (never its output's law, never a greedy output) vary with the machine's noise: a
sampled output repeats under a fixed seed with a fixed ``CostModel(..., draft_seconds=...)`` given as
``cost_model=`` (then nothing is timed), or with ``goodput=False``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from specdec.tree import DraftTree

_COSTS = "_specdec_cost_curve"  # where a model keeps its measured CostModel, per (device, threads)


@dataclass(frozen=True)
class CostModel:
    """Seconds of one verification forward by the number of tokens it carries (all rows together).

    Attributes:
        tokens: ``(N,)`` widths measured, ascending, starting at 1.
        seconds: ``(N,)`` their cost; between and beyond the points the curve is linear.
    """

    tokens: tuple[int, ...]
    seconds: tuple[float, ...]
    draft_seconds: float | None = None  # per draft depth; None: learnt online from the drafter's timings

    def __post_init__(self) -> None:
        if not self.tokens or len(self.tokens) != len(self.seconds) or list(self.tokens) != sorted(self.tokens):
            raise ValueError(f"cost curve needs ascending widths with one cost each, got {self.tokens} / {self.seconds}")
        if any(s <= 0 for s in self.seconds):
            raise ValueError(f"cost curve seconds {self.seconds} must be > 0")
        if self.draft_seconds is not None and self.draft_seconds < 0:
            raise ValueError(f"draft_seconds={self.draft_seconds} must be >= 0 (or None: learnt online)")

    def __call__(self, tokens: int) -> float:
        """Cost of a forward of ``tokens`` tokens (linear interpolation; extrapolated from the last two points)."""
        xs, ys = self.tokens, self.seconds
        if tokens <= xs[0] or len(xs) == 1:
            return ys[0] * max(tokens, 1) / xs[0] if tokens > xs[0] else ys[0]
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            if tokens <= x1:
                return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)
        (x0, y0), (x1, y1) = (xs[-2], ys[-2]), (xs[-1], ys[-1])
        return y1 + (y1 - y0) * (tokens - x1) / (x1 - x0)

    @classmethod
    def measure(cls, model, rows: int = 1, columns: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 32),
                cached: int = 128, repeats: int = 3) -> CostModel:
        """Time the target's tree-attention forward of ``rows`` rows at each width (columns per row) over a
        ``cached``-token prefix per row (median of ``repeats``); the curve is by total tokens, rows x columns.
        Every position stays inside the model's window (``max_position_embeddings``): a model of learned
        positions has no embedding past it, so a short window measures over a shorter prefix and, below
        ``max(columns) + 1`` positions, fewer widths."""
        from specdec.attention import TreeMask  # the engine's own verification path
        from specdec.cache import new_cache, truncate

        window = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if isinstance(window, int) and window > 0:
            columns = tuple(T for T in columns if T < window) or (1,)
            cached = max(1, min(cached, window - max(columns)))

        vocab = model.get_input_embeddings().weight.shape[0]
        device = model.device
        gen = torch.Generator().manual_seed(0)
        prefix = torch.randint(0, vocab, (rows, cached), generator=gen).to(device)
        seconds = []
        with torch.no_grad():
            cache = new_cache(model)
            model(input_ids=prefix, cache=cache, use_cache=True, logits_to_keep=1)
            for T in columns:
                ids = torch.randint(0, vocab, (rows, T), generator=gen).to(device)
                positions = torch.arange(cached, cached + T, device=device)[None].repeat(rows, 1)
                tree = TreeMask(torch.zeros(rows, dtype=torch.long, device=device),
                                torch.full((rows,), cached, device=device),
                                torch.ones(rows, T, T, dtype=torch.bool, device=device).tril(), positions=positions)
                times = []
                for _ in range(repeats + 1):  # the first is a warm-up
                    t0 = time.perf_counter()
                    model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, tree=tree)
                    times.append(time.perf_counter() - t0)
                    truncate(cache, cached)
                seconds.append(sorted(times[1:])[len(times[1:]) // 2])
        for i in range(1, len(seconds)):  # a noisy machine: the curve never falls with width
            seconds[i] = max(seconds[i], seconds[i - 1])
        return cls(tuple(rows * T for T in columns), tuple(seconds))

    @classmethod
    def for_model(cls, model, rows: int = 1, measure: bool = True) -> CostModel:
        """The model's measured curve for this device, thread count and batch size (measured on first use).

        A forward of ``A`` rows costs more than one row of the same total width (each row attends to its own
        cache), so curves are kept per batch size, rounded up to a power of two (1, 2, 4, 8, ...). With
        ``measure=False`` (a batch shrinking as rows finish, mid-call) a missing size takes the nearest larger
        measured one instead of stopping to measure; it measures only when there is none.
        """
        bucket = 1 << max(rows - 1, 0).bit_length()
        curves = model.__dict__.setdefault(_COSTS, {}).setdefault((str(model.device), torch.get_num_threads()), {})
        if bucket not in curves:
            larger = [b for b in curves if b > bucket]
            if larger and not measure:
                return curves[min(larger)]
            curves[bucket] = cls.measure(model, rows=bucket)
        return curves[bucket]


def _count(counts: list[float], depth: int) -> float:
    return counts[depth] if depth < len(counts) else 0.0


@dataclass
class _RowHistory:
    """A row's acceptance so far, fading (weights ``decay`` per step): steps that drafted to depth d,
    and that accepted depth d."""

    drafted: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)


class Controller:
    """Chooses each step's draft depth from the cost curve and every row's acceptance (see module docstring).

    Args:
        costs: the verification cost curve, or a function of the batch's rows giving it
            (``lambda rows: CostModel.for_model(model, rows)``: the measured curve for that batch size).
        max_depth: the deepest draft considered (the drafter's own depth).
        prior: acceptance assumed at a depth with no history yet on any row, with ``prior_weight`` steps'
            weight; a row's own history is smoothed towards the call's pooled acceptance with the same weight.
        decay: weight of a step's evidence after each later step (older steps count less).
        explore: after this many steps without drafting, one step drafts depth 1 to see again.
    """

    def __init__(self, costs: CostModel | Callable[[int], CostModel], max_depth: int, prior: float = 0.6,
                 prior_weight: float = 2.0, decay: float = 0.95, explore: int = 16) -> None:
        if max_depth < 0:
            raise ValueError(f"controller max_depth={max_depth} must be >= 0")
        if not 0 < prior < 1 or prior_weight <= 0 or not 0 < decay <= 1:
            raise ValueError(f"controller prior={prior} must be in (0, 1), prior_weight={prior_weight} > 0, "
                             f"decay={decay} in (0, 1]")
        self.costs, self.max_depth = costs, max_depth
        self.prior, self.prior_weight, self.decay, self.explore = prior, prior_weight, decay, explore
        self.rows: dict[int, _RowHistory] = {}
        self.nodes_per_depth = 1.0  # tree nodes a depth adds, learnt from the trees (1 for chains)
        self.draft_seconds = 0.0  # drafting time and the depths it drafted, for the per-depth cost
        self.draft_depths = 0
        self.idle = 0  # steps in a row that drafted nothing

    def acceptance(self, row: int, pooled: list[float] | None = None) -> list[float]:
        """The row's acceptance at each depth 1..max_depth: its own history, smoothed towards the call's
        pooled acceptance at that depth (:meth:`pooled`, passed in when asked for many rows at once), so a row
        with little history of its own is expected to do what this drafter does on this call's rows."""
        pooled = self.pooled() if pooled is None else pooled
        h = self.rows.get(row, _RowHistory())
        return [(_count(h.accepted, d) + base * self.prior_weight) / (_count(h.drafted, d) + self.prior_weight)
                for d, base in enumerate(pooled)]

    def pooled(self) -> list[float]:
        """Every row's acceptance at each depth together, smoothed towards ``prior``."""
        rows = self.rows.values()
        return [(sum(_count(h.accepted, d) for h in rows) + self.prior * self.prior_weight)
                / (sum(_count(h.drafted, d) for h in rows) + self.prior_weight) for d in range(self.max_depth)]

    @staticmethod
    def expected_tokens(alpha: list[float], depth: int) -> float:
        """``E(L) = 1 + sum_{d<=L} prod_{j<=d} alpha_j``: tokens a step adds drafting ``depth`` deep."""
        total, reach = 1.0, 1.0
        for a in alpha[:depth]:
            reach *= a
            total += reach
        return total

    def curve(self, rows: int) -> CostModel:
        """The cost curve for a batch of ``rows`` rows."""
        return self.costs if isinstance(self.costs, CostModel) else self.costs(rows)

    def draft_cost(self, rows: int = 1) -> float:
        """Seconds of drafting per depth: the cost model's, or learnt from the drafter's timings (0 until seen)."""
        given = self.curve(rows).draft_seconds
        if given is not None:
            return given
        return self.draft_seconds / self.draft_depths if self.draft_depths else 0.0

    def goodput(self, alphas: list[list[float]], depth: int) -> float:
        """Expected tokens per second of a step drafting ``depth`` deep for the rows with these acceptances."""
        tokens = sum(self.expected_tokens(a, depth) for a in alphas)
        width = 1 + depth * self.nodes_per_depth
        rows = len(alphas)
        seconds = self.curve(rows)(max(1, round(rows * width))) + depth * self.draft_cost(rows)
        return tokens / seconds

    def choose(self, rows: list[int], limits: list[int] | None = None) -> int:
        """The depth of greatest goodput for these rows (each also capped at its own ``limits``)."""
        pooled = self.pooled()
        alphas = [self.acceptance(r, pooled) for r in rows]
        if limits is not None:
            alphas = [a[:lim] for a, lim in zip(alphas, limits)]
        best, best_rate = 0, self.goodput(alphas, 0)
        for depth in range(1, self.max_depth + 1):
            rate = self.goodput(alphas, depth)
            if rate > best_rate * (1 + 1e-9):
                best, best_rate = depth, rate
        if best == 0:
            self.idle += 1
            if self.idle >= self.explore:  # acceptance may have changed since: look again
                self.idle = 0
                return 1
        else:
            self.idle = 0
        return best

    def trim(self, rows: list[int], trees: list[DraftTree], min_width: int = 1) -> list[DraftTree]:
        """Once drafted, cut every tree to the depth ``W`` of greatest expected tokens per second for the
        trees as they are: each row's own depth and width (a row without a tree adds its one token and still
        costs the batch's padded columns), the drafting being paid already. A batch where one row found a long
        match and the others none verifies ``A x (1 + T)`` columns for one row's gain; this keeps only what
        pays. Greedy only (a cut that depends on the drafted tokens would bias sampled nodes; the engine does
        not call it when sampling). Only whole depth-prefixes of a tree's node list are cut, so node indices
        stay the proposer's (its commit reads the accepted path by them); a tree not in depth order is kept
        whole.
        """
        depths = [tree.depths.tolist() if len(tree) else [] for tree in trees]
        top = max((max(d) for d in depths if d), default=0)
        if top == 0:
            return trees
        pooled = self.pooled()
        alphas = [self.acceptance(r, pooled) for r in rows]
        costs = self.curve(len(trees))

        def plan(W: int) -> tuple[float, list[int]]:
            tokens, width, cuts = 0.0, 0, []
            for alpha, d in zip(alphas, depths):
                n = sum(1 for x in d if x <= W)
                if any(x > W for x in d[:n]):  # not in depth order: all or nothing
                    n = len(d)
                tokens += self.expected_tokens(alpha, max(d[:n], default=0))
                width, cuts = max(width, n), cuts + [n]
            columns = 1 + width if width == 0 else max(1 + width, min_width)
            return tokens / costs(len(trees) * columns), cuts

        best_rate, best = plan(top)
        for W in range(top - 1, -1, -1):  # shallower only when strictly better
            rate, cuts = plan(W)
            if rate > best_rate * (1 + 1e-9):
                best, best_rate = cuts, rate
        return [tree if n == len(tree) else tree.select(torch.arange(n)) for tree, n in zip(trees, best)]

    def record(self, row: int, drafted_depth: int, accepted_depth: int, nodes: int | None = None) -> None:
        """One step of a row: its tree reached ``drafted_depth`` (``nodes`` nodes), its accepted path
        ``accepted_depth``."""
        h = self.rows.setdefault(row, _RowHistory())
        for counts, depth in ((h.drafted, drafted_depth), (h.accepted, accepted_depth)):
            counts[:] = [c * self.decay for c in counts]
            counts.extend([0.0] * (depth - len(counts)))
            for d in range(depth):
                counts[d] += 1.0
        if nodes and drafted_depth:
            self.nodes_per_depth = 0.9 * self.nodes_per_depth + 0.1 * (nodes / drafted_depth)

    def record_draft_time(self, seconds: float, depth: int) -> None:
        """A step's drafting time, which drafted ``depth`` deep at most."""
        if depth > 0:
            self.draft_seconds += seconds
            self.draft_depths += depth


def analytic_depth(costs: CostModel, alpha: float, rows: int, max_depth: int) -> int:
    """Brute-force optimum for constant acceptance ``alpha`` along a chain (a reference for tests):
    argmax over depth L of ``rows * sum_{d<=L} alpha^d / c(rows * (1 + L))``."""
    def rate(L: int) -> float:
        return rows * sum(alpha**d for d in range(L + 1)) / costs(rows * (1 + L))

    return max(range(max_depth + 1), key=lambda L: (rate(L), -L))


class DepthPolicy:
    """How deep each step drafts: capped before drafting, trimmed after, told the outcome.

    This one drafts every row to its budget and trims nothing (the goodput controller off, or a
    drafter with no depth to choose); :class:`GoodputPolicy` is the controller's.
    """

    def cap(self, rows: list[int], budgets: list[int]) -> list[int]:
        """Each row's depth cap for this step's draft (at most its budget)."""
        return budgets

    def trim(self, rows: list[int], trees: list[DraftTree], sampled: bool, min_width: int) -> list[DraftTree]:
        """The trees to verify, cut to what pays."""
        return trees

    def record(self, rows: list[int], depths: list[int], paths: list[int], nodes: list[int],
               draft_seconds: float, drafted_depth: int) -> None:
        """One step: per row the verified tree's depth, accepted path length and node count; the drafting time."""


class GoodputPolicy(DepthPolicy):
    """The goodput :class:`Controller` as the engine's depth policy (see the module docstring)."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def cap(self, rows: list[int], budgets: list[int]) -> list[int]:
        depth = max(0, self.controller.choose(rows, budgets))
        return [min(b, depth) for b in budgets]

    def trim(self, rows: list[int], trees: list[DraftTree], sampled: bool, min_width: int) -> list[DraftTree]:
        if sampled:  # a cut that depends on the drafted tokens would bias sampled nodes
            return trees
        return self.controller.trim(rows, trees, min_width)

    def record(self, rows: list[int], depths: list[int], paths: list[int], nodes: list[int],
               draft_seconds: float, drafted_depth: int) -> None:
        for row, depth, path, n in zip(rows, depths, paths, nodes):
            self.controller.record(row, depth, path, n)
        self.controller.record_draft_time(draft_seconds, drafted_depth)
