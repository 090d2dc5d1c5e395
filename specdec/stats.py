"""SpecStats: what a speculative run did, step by step, in Spec-Bench's terms."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepTimes:
    """Seconds a call's decoding steps spent in each phase (prefill excluded).

    ``propose + verify + accept + commit`` is every step's whole time. Within ``verify``, ``forward`` is the
    target's forward alone (the rest builds its inputs and checks q); within ``commit``, ``cache`` moves the
    accepted keys and values into place and drops finished rows; within ``forward``, ``linear`` and
    ``attention`` are its linear products and its attention layers, timed only when the call is profiled
    (``Options(profile=True)``: ``experiments.profile_step``), else 0. ``wall`` is the decode loop's own
    wall time, measured around it: the phases add up to it when nothing outside them costs time.
    """

    steps: int = 0
    propose: float = 0.0
    verify: float = 0.0
    accept: float = 0.0
    commit: float = 0.0
    forward: float = 0.0
    cache: float = 0.0
    linear: float = 0.0
    attention: float = 0.0
    wall: float = 0.0

    def add(self, propose: float, verify: float, accept: float, commit: float) -> None:
        """One step's phases."""
        self.steps += 1
        self.propose += propose
        self.verify += verify
        self.accept += accept
        self.commit += commit

    @property
    def total(self) -> float:
        """Seconds of every step, all phases."""
        return self.propose + self.verify + self.accept + self.commit


@dataclass
class SpecStats:
    """Counters of one speculative generation (all rows of a batch together).

    Attributes:
        steps: decoding steps, one per batch row per target verification forward, prefill excluded.
        drafted: draft tokens proposed.
        accepted: draft tokens accepted by the rule.
        new_tokens: tokens added to the output (accepted + one per step, less any cut
            by EOS or ``max_new_tokens``).
        drafted_at: ``drafted_at[d]`` = steps whose draft reached depth ``d + 1``.
        accepted_at: ``accepted_at[d]`` = steps whose accepted path reached depth ``d + 1``.
        accept_lengths: ``accept_lengths[b]`` = tokens added at each step of batch row ``b``, in order
            (Spec-Bench's per-step ``accept_lengths``); ``tau`` is their mean, pooled over rows.
        prefill_time, draft_time, verify_time: seconds in each phase (verify includes
            acceptance and cache commit).
        times: the steps' seconds phase by phase (:class:`StepTimes`).
    """

    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    new_tokens: int = 0
    drafted_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)
    accept_lengths: list[list[int]] = field(default_factory=list)
    prefill_time: float = 0.0
    draft_time: float = 0.0
    verify_time: float = 0.0
    times: StepTimes = field(default_factory=StepTimes)

    def record(self, depth_drafted: int, n_drafted: int, n_accepted: int, n_new: int, row: int = 0) -> None:
        """Add one step of batch row ``row``: deepest drafted depth, nodes drafted, drafts accepted,
        tokens added."""
        self.accept_lengths.extend([] for _ in range(row + 1 - len(self.accept_lengths)))
        self.accept_lengths[row].append(n_new)
        self.steps += 1
        self.drafted += n_drafted
        self.accepted += n_accepted
        self.new_tokens += n_new
        _bump(self.drafted_at, depth_drafted)
        _bump(self.accepted_at, n_accepted)

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / drafted tokens (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tau(self) -> float:
        """Mean accepted tokens: tokens added per decoding step, pooled over every step of every row
        (Spec-Bench's tau)."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def position_acceptance(self) -> list[float]:
        """Per depth d: steps accepting a token at depth d / steps drafting depth d."""
        accepted = self.accepted_at + [0] * (len(self.drafted_at) - len(self.accepted_at))
        return [a / d for a, d in zip(accepted, self.drafted_at)]

    def as_dict(self) -> dict:
        """Plain numbers for logging."""
        return {
            "steps": self.steps,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "new_tokens": self.new_tokens,
            "acceptance_rate": self.acceptance_rate,
            "tau": self.tau,
            "position_acceptance": self.position_acceptance,
            "drafted_at": self.drafted_at,
            "accepted_at": self.accepted_at,
            "accept_lengths": self.accept_lengths,
            "prefill_time": self.prefill_time,
            "draft_time": self.draft_time,
            "verify_time": self.verify_time,
        }


def _bump(counts: list[int], depth: int) -> None:
    """Count one step at every depth 1..depth."""
    counts.extend([0] * (depth - len(counts)))
    for d in range(depth):
        counts[d] += 1
