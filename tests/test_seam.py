"""The drafter seam: one proposer per call, so threads, interrupts and reuse never change a result."""

import copy
import random
import signal
import threading

import pytest
import torch
from torch import nn

import specdec
from specdec import Combined, DraftModel, DraftTree, Drafter, PromptLookup
from specdec.attention import installed_name
from specdec.backends.cpu_linear import _ROUTE, _RoutedForward
from specdec.drafters import Adaptive, Eagle, EagleHead, EarlyExit, Medusa
from specdec.text import left_pad

from conftest import attentive, tiny_llama
from test_generate import medusa_heads
from concurrency import interleaved


def reference(model, row, max_new):
    ids = torch.tensor([row])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(row):].tolist()


def run(model, rows, drafter, max_new):
    """specdec.generate on left-padded ``rows``: each row's new tokens."""
    ids, mask = left_pad([torch.tensor(r) for r in rows], pad_id=0)
    out = specdec.generate(model, ids, drafter, attention_mask=mask, max_new_tokens=max_new, eos_token_id=None,
                           pad_token_id=0)
    return [out[i, ids.shape[1]:].tolist() for i in range(len(rows))]


ROWS = [[5, 9, 13, 7, 5, 9, 13], [3, 4, 5, 3, 4], [12, 40, 41, 12, 40], [7, 7, 8, 9], [20, 21, 22, 20, 21, 22, 20]]


@pytest.fixture(scope="module")
def models():
    target = attentive(tiny_llama(seed=0, layers=2))
    draft = attentive(tiny_llama(seed=1, layers=1))
    return target, draft


def shared_drafters(target, draft):
    """One object each, shared by every thread and call below."""
    hidden = target.config.hidden_size
    return {
        "lookup": PromptLookup(k=4),
        "draft-chain": DraftModel(draft, k=3),
        "draft-tree": DraftModel(draft, k=3, top_k=2, budget=5),
        "eagle": Eagle(EagleHead.from_target(target), k=3, top_k=2, width=2),
        "medusa": Medusa(medusa_heads(hidden, 3), k=3, budget=4, rank_accuracy=torch.tensor([[0.6, 0.2]] * 3)),
        "early-exit": EarlyExit(layers=1, k=2, top_k=2),
        "combined": Combined(PromptLookup(k=3), DraftModel(draft, k=2, top_k=2), fallback=True),
    }


def test_threads_on_one_model_give_the_single_threaded_outputs(models):
    """4 threads x 10 calls on one model and one set of drafter objects, mixing chains, trees, left-padded
    batches, lookup and model drafters, and plain model.generate; the interpreter switches threads
    every 10 microseconds, so calls interleave inside each other's forwards."""
    target, draft = models
    drafters = shared_drafters(target, draft)
    expected = {tuple(r): reference(target, r, 16) for r in ROWS}
    rng = random.Random(0)
    jobs = [[(rng.choice([*drafters, "generate"]), rng.sample(ROWS, rng.choice([1, 1, 2, 3]))) for _ in range(10)]
            for _ in range(4)]
    failures = []

    def worker(calls):
        for name, rows in calls:
            try:
                if name == "generate":
                    got = [reference(target, rows[0], 16)]
                    rows = rows[:1]
                else:
                    got = run(target, rows, drafters[name], 16)
                for row, new in zip(rows, got):
                    if new != expected[tuple(row)]:
                        failures.append((name, row, new))
            except Exception as err:  # a crash in a thread must fail the test too
                failures.append((name, rows, repr(err)))

    interleaved(worker, jobs)
    assert failures == []


def assert_model_untouched(model, linear_count):
    """What a call may leave on the model: only the once-installed extension points."""
    assert installed_name(model) == "sdpa"
    assert "generate" not in vars(model)
    assert _ROUTE.get() is None
    routed = [m for m in model.modules() if isinstance(vars(m).get("forward"), _RoutedForward)]
    assert len(routed) in (0, linear_count)  # installed whole or (an interrupted install) in part: both exact
    assert all(isinstance(vars(m).get("forward", None), (_RoutedForward, type(None)))
               for m in model.modules() if isinstance(m, nn.Linear))


def test_interrupts_at_random_moments_leave_nothing_behind():
    """Hundreds of calls, each interrupted by a timer signal at a random moment (KeyboardInterrupt, as
    Ctrl-C gives): afterwards model.generate and specdec.generate, with the same drafter objects, give
    the reference outputs. Fresh models along the way, so installs are interrupted too."""
    rng = random.Random(1)
    draft = attentive(tiny_llama(seed=1, layers=1))

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    interrupted = calls = 0
    try:
        for epoch in range(3):
            target = attentive(tiny_llama(seed=0, layers=2))
            linears = sum(isinstance(m, nn.Linear) for m in target.modules())
            expected = {tuple(r): reference(target, r, 12) for r in ROWS}
            drafters = shared_drafters(target, draft)
            names = list(drafters)
            for _ in range(110):
                name = rng.choice(names)
                rows = rng.sample(ROWS, rng.choice([1, 2]))
                calls += 1
                try:
                    signal.setitimer(signal.ITIMER_REAL, rng.uniform(0, 0.03))
                    try:
                        if rng.random() < 0.2:
                            with specdec.speculative(target, drafters[name]) as m:
                                m.generate(torch.tensor([rows[0]]), max_new_tokens=12, eos_token_id=None,
                                           pad_token_id=0)
                        else:
                            run(target, rows, drafters[name], 12)
                    finally:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                except KeyboardInterrupt:
                    interrupted += 1
            assert_model_untouched(target, linears)
            for name, drafter in drafters.items():  # the same objects, after all the interrupted calls
                assert run(target, ROWS[:3], drafter, 12) == [expected[tuple(r)] for r in ROWS[:3]], name
            assert [reference(target, r, 12) for r in ROWS] == [expected[tuple(r)] for r in ROWS]
            with specdec.speculative(target, drafters["draft-tree"]) as m:
                out = m.generate(torch.tensor([ROWS[0]]), max_new_tokens=12, eos_token_id=None, pad_token_id=0)
            assert out[0, len(ROWS[0]):].tolist() == expected[tuple(ROWS[0])]
            assert "generate" not in vars(target)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert calls >= 300 and interrupted >= 100  # most calls were cut short somewhere
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()  # no autograd mode leaked either


def test_one_drafter_serves_two_targets_and_dtypes(models):
    """A drafter binds per call: two targets at once, and a target cast to bfloat16 and back."""
    target, draft = models
    other = attentive(tiny_llama(seed=7, layers=3))
    for drafter in (Eagle(EagleHead.from_target(target), k=3), DraftModel(draft, k=3, top_k=2),
                    Medusa(medusa_heads(target.config.hidden_size, 2), k=2)):
        for model in (target, other, target):
            assert run(model, ROWS[:2], drafter, 12) == [reference(model, r, 12) for r in ROWS[:2]]
    eagle = Eagle(EagleHead.from_target(target), k=3)
    medusa = Medusa(medusa_heads(target.config.hidden_size, 2), k=2)
    cast = copy.deepcopy(target).to(torch.bfloat16)
    for drafter in (eagle, medusa):
        assert run(target, ROWS[:1], drafter, 8) == [reference(target, ROWS[0], 8)]
        new = run(cast, ROWS[:1], drafter, 8)[0]  # bfloat16: runs (exactness is promised in float32)
        assert len(new) == 8 and all(0 <= t < 64 for t in new)
        assert run(target, ROWS[:1], drafter, 8) == [reference(target, ROWS[0], 8)]
    assert next(eagle.head.parameters()).dtype == torch.float32  # the drafter's own weights never moved


def test_the_same_drafter_twice_in_combined(models):
    target, draft = models
    d = DraftModel(draft, k=3, top_k=2)
    e = Eagle(EagleHead.from_target(target), k=2)
    for combined in (Combined(d, d), Combined(d, d, fallback=True), Combined(e, PromptLookup(k=3), e),
                     Adaptive(Combined(d, d), start=1, max_depth=3)):
        assert run(target, ROWS[:3], combined, 14) == [reference(target, r, 14) for r in ROWS[:3]]


def test_a_failed_call_changes_no_later_call(models):
    """A drafter that raises in the middle of a call: the next calls with the same objects are exact."""
    target, draft = models
    shared = DraftModel(draft, k=3, top_k=2)

    class Flaky(Drafter):
        def __init__(self):
            self.calls = 0

        def propose(self, states):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("drafter failed")
            return [DraftTree.empty() for _ in states]

    with pytest.raises(RuntimeError, match="drafter failed"):
        run(target, ROWS[:2], Combined(shared, Flaky()), 12)
    assert run(target, ROWS[:2], shared, 12) == [reference(target, r, 12) for r in ROWS[:2]]


class RepeatLast(Drafter):
    """The README's custom drafter: propose the last token again, as a chain of k (today's protocol)."""

    def __init__(self, k=2):
        self.k = k

    def propose(self, states):
        trees = []
        for state in states:
            depth = min(self.k, state.budget)  # never deeper than the row's budget
            last = state.tokens[0, -1]
            trees.append(DraftTree.chain(last.repeat(depth)))
        return trees


def test_an_old_style_custom_drafter_works_unchanged(models):
    target, _ = models
    rows = [[5, 5, 5, 5], [9, 9, 3]]
    for drafter in (RepeatLast(), RepeatLast(4), Combined(RepeatLast(), PromptLookup(k=2)), Adaptive(RepeatLast(3))):
        assert run(target, rows, drafter, 16) == [reference(target, r, 16) for r in rows]


def test_a_duck_typed_drafter_with_hooks(models):
    """Any object with propose(states), and the old optional prefill/commit hooks, on the simple path."""
    target, _ = models

    class Counting:
        def __init__(self):
            self.prefills, self.commits = 0, 0

        def prefill(self, states):
            self.prefills += 1

        def propose(self, states):
            return [DraftTree.chain(s.tokens[0, -1:].repeat(min(1, s.budget))) for s in states]

        def commit(self, states, results):
            self.commits += 1

    duck = Counting()
    assert run(target, ROWS[:2], duck, 10) == [reference(target, r, 10) for r in ROWS[:2]]
    assert duck.prefills == 1 and duck.commits >= 1


def test_overlapping_speculative_blocks_restore_the_models_generate(models):
    target, draft = models
    a, b = PromptLookup(k=3), DraftModel(draft, k=2)
    ids = torch.tensor([ROWS[0]])
    outer = specdec.speculative(target, a)
    inner = specdec.speculative(target, b)
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # closed out of order
    assert "generate" in vars(target)  # the inner block is still open
    out = target.generate(ids, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
    assert out[0, len(ROWS[0]):].tolist() == reference(target, ROWS[0], 8)
    inner.__exit__(None, None, None)
    assert "generate" not in vars(target)
    beams = target.generate(ids, attention_mask=torch.ones_like(ids), num_beams=2, max_new_tokens=4,
                            pad_token_id=0, eos_token_id=None)  # transformers' own generate again
    assert beams.shape == (1, len(ROWS[0]) + 4)


def test_speculative_blocks_in_threads(models):
    target, draft = models
    barrier = threading.Barrier(3)
    failures = []

    def worker(drafter):
        try:
            with specdec.speculative(target, drafter) as m:
                barrier.wait()
                for row in ROWS[:3]:
                    out = m.generate(torch.tensor([row]), max_new_tokens=10, eos_token_id=None, pad_token_id=0)
                    if out[0, len(row):].tolist() != reference(target, row, 10):
                        failures.append(row)
                barrier.wait()
        except Exception as err:
            failures.append(repr(err))

    threads = [threading.Thread(target=worker, args=(d,)) for d in (PromptLookup(k=3), DraftModel(draft, k=2),
                                                                      PromptLookup(k=2, branches=2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == [] and "generate" not in vars(target)
