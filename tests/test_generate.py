"""Greedy equality with model.generate, and the drop-in API's contract, on tiny models."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig, TextIteratorStreamer

import specdec
from specdec.text import left_pad
from specdec import Combined, DraftModel, Drafter, PromptLookup, Proposer
from specdec.drafters import (Adaptive, Eagle, EagleHead, EarlyExit, Medusa, MedusaHeads, Pard, PardDraft,
                              SuffixDecoding, TokenRecycling)


def reference(model, ids, **kwargs):
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, **kwargs)


def assert_rows_match_alone(model, rows, drafter, max_new_tokens, eos, **kwargs):
    """Left-padded rows verified together: each row's output equals model.generate on it alone, then padding."""
    ids, mask = left_pad([torch.tensor(r) for r in rows], pad_id=0)
    got = specdec.generate(model, ids, drafter, attention_mask=mask, max_new_tokens=max_new_tokens,
                           eos_token_id=eos, pad_token_id=0, **kwargs)
    assert got.shape[0] == len(rows)
    for i, row in enumerate(rows):
        alone = reference(model, torch.tensor([row]), max_new_tokens=max_new_tokens, eos_token_id=eos)
        alone = alone[0, len(row):].tolist()
        produced = got[i, ids.shape[1]:].tolist()
        assert produced[: len(alone)] == alone
        assert all(t == 0 for t in produced[len(alone):])


KINDS = ["lookup", "lookup-tree", "draft", "draft-tree", "draft-static", "combined", "eagle", "eagle-tree",
         "medusa", "early-exit", "early-exit-tree", "adaptive", "lookup-eagle",
         "lookup-else-eagle", "suffix", "recycling", "eagle3-tree", "pard", "lookup-else-eagle3"]
STATIC = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0, 0]]


def medusa_heads(hidden, heads, seed=0):
    """Randomised heads (trained ones are not zero), so proposals vary."""
    torch.manual_seed(seed)
    out = MedusaHeads(hidden, heads)
    for block in out.blocks:
        torch.nn.init.normal_(block.weight, std=0.3)
    return out


def make_drafter(kind, k, draft, target):
    hidden = target.config.hidden_size
    half = torch.arange(0, target.config.vocab_size, 2)  # a reduced vocabulary: every other token
    return {
        "lookup": lambda: PromptLookup(k=k, max_ngram=3),
        "lookup-tree": lambda: PromptLookup(k=k, max_ngram=3, branches=3),
        "draft": lambda: DraftModel(draft, k=k),
        "draft-tree": lambda: DraftModel(draft, k=k, top_k=3, width=2, budget=2 * k + 1),
        "draft-static": lambda: DraftModel(draft, k=k, tree=STATIC),
        "combined": lambda: Combined(PromptLookup(k=k, max_ngram=3), DraftModel(draft, k=k, top_k=2)),
        "eagle": lambda: Eagle(EagleHead.from_target(target), k=k),
        "eagle-tree": lambda: Eagle(EagleHead.from_target(target), vocab=half, k=k, top_k=3, width=2, budget=2 * k),
        "medusa": lambda: Medusa(medusa_heads(hidden, 4), vocab=half, k=k, budget=3 * k,
                                 rank_accuracy=torch.tensor([[0.6, 0.2, 0.1]] * 4)),
        "early-exit": lambda: EarlyExit(layers=1, k=k),
        "early-exit-tree": lambda: EarlyExit(layers=1, vocab=half, k=k, top_k=2, width=2, budget=2 * k),
        "adaptive": lambda: Adaptive(DraftModel(draft, k=k, top_k=2), start=1),
        "lookup-eagle": lambda: Combined(PromptLookup(k=k, max_ngram=3), Eagle(EagleHead.from_target(target), k=k)),
        "lookup-else-eagle": lambda: Combined(PromptLookup(k=k, max_ngram=3),
                                              Eagle(EagleHead.from_target(target), k=k, top_k=2), fallback=True),
        "suffix": lambda: SuffixDecoding(k=k, max_nodes=2 * k),
        "eagle3-tree": lambda: Eagle(EagleHead.from_target(target, (0, 1, 2)), vocab=half, k=k, top_k=2, width=2,
                                     budget=2 * k, quantize=True),
        "pard": lambda: Pard(PardDraft.from_target(target, [0]), k=k, quantize=True),
        "lookup-else-eagle3": lambda: Combined(PromptLookup(k=k, max_ngram=3),
                                               Adaptive(Eagle(EagleHead.from_target(target, (0, 1, 2)), k=k), start=1),
                                               fallback=True),
        "recycling": lambda: TokenRecycling(shared=True),
    }[kind]()


prompts = st.lists(st.integers(3, 63), min_size=1, max_size=24).map(lambda xs: torch.tensor([xs]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=prompts, kind=st.sampled_from(KINDS), k=st.integers(1, 8), max_new=st.integers(1, 40))
def test_greedy_equals_generate(target, draft, ids, kind, k, max_new):
    expected = reference(target, ids, max_new_tokens=max_new, eos_token_id=None)
    got = specdec.generate(target, ids, make_drafter(kind, k, draft, target), max_new_tokens=max_new, eos_token_id=None)
    assert torch.equal(got, expected)


batches = st.lists(st.lists(st.integers(3, 63), min_size=1, max_size=16), min_size=1, max_size=8)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=batches, kind=st.sampled_from(KINDS), k=st.integers(1, 6), eos=st.sampled_from([None, 7, 30]))
def test_batch_rows_equal_generate_alone(target, draft, rows, kind, k, eos):
    """Left-padded rows of different lengths, verified together: each row equals model.generate on it alone."""
    assert_rows_match_alone(target, rows, make_drafter(kind, k, draft, target), max_new_tokens=24, eos=eos)


def test_tree_beats_chain_on_acceptance(target, draft):
    """Same draft, same depth: a top-3 tree accepts at least as much per step as the chain."""
    ids = torch.tensor([[5, 9, 13, 7, 11, 3]])
    chain = specdec.generate(target, ids, DraftModel(draft, k=4), max_new_tokens=40, eos_token_id=None,
                             return_dict_in_generate=True, goodput=False)
    tree = specdec.generate(target, ids, DraftModel(draft, k=4, top_k=3, width=3), max_new_tokens=40,
                            eos_token_id=None, return_dict_in_generate=True, goodput=False)
    assert torch.equal(chain.sequences, tree.sequences)
    assert tree.stats.tau >= chain.stats.tau


def test_other_model_family_qwen2(draft):
    """Tree attention reaches any model using the attention interface: a tiny Qwen2."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        use_sliding_window=False)).eval()
    rows = [[5, 6, 7, 8, 5, 6, 7], [9, 10, 11]]
    ids = torch.tensor([[0] * (7 - len(r)) + r for r in rows])
    mask = (ids != 0).long()
    for drafter in (PromptLookup(k=4, branches=2), DraftModel(draft, k=3, top_k=2)):
        got = specdec.generate(qwen, ids, drafter, attention_mask=mask, max_new_tokens=20, eos_token_id=None)
        for i, row in enumerate(rows):
            alone = reference(qwen, torch.tensor([row]), max_new_tokens=20, eos_token_id=None)
            assert got[i, 7:].tolist() == alone[0, len(row):].tolist()


def test_draft_equal_to_target_accepts_everything(target):
    ids = torch.tensor([[5, 9, 13, 7]])
    out = specdec.generate(target, ids, DraftModel(target, k=4), max_new_tokens=30, eos_token_id=None,
                           return_dict_in_generate=True, goodput=False)  # the fixed depth, not the controller's
    assert torch.equal(out.sequences, reference(target, ids, max_new_tokens=30, eos_token_id=None))
    assert out.stats.acceptance_rate == 1.0
    assert out.stats.tau == pytest.approx(30 / out.stats.steps)
    assert out.stats.steps == 6  # 5 tokens a step: 4 accepted + 1 bonus
    assert out.stats.position_acceptance == [1.0] * 4


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [2, 5])
def test_eos_inside_a_block_stops_exactly_there(target, draft, kind, k):
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    plain = reference(target, ids, max_new_tokens=40, eos_token_id=None)[0, ids.shape[1]:].tolist()
    for eos in sorted(set(plain[3:20])):  # tokens the target really emits, mid-output
        expected = reference(target, ids, max_new_tokens=40, eos_token_id=eos)
        drafter = make_drafter(kind, k, target, target)  # the target as draft: whole blocks accepted
        got = specdec.generate(target, ids, drafter, max_new_tokens=40, eos_token_id=eos)
        assert torch.equal(got, expected)
        assert got[0, -1] == eos and got.shape[1] < ids.shape[1] + 40


def test_eos_list_and_min_new_tokens(target):
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    plain = reference(target, ids, max_new_tokens=30, eos_token_id=None)[0, ids.shape[1]:].tolist()
    eos = [plain[2], plain[5]]
    for min_new in (0, 4, 12):
        expected = reference(target, ids, max_new_tokens=30, eos_token_id=eos, min_new_tokens=min_new)
        got = specdec.generate(target, ids, DraftModel(target, k=4), max_new_tokens=30, eos_token_id=eos,
                               min_new_tokens=min_new)
        assert torch.equal(got, expected)


def test_max_length_and_generation_config(target, draft):
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    config = GenerationConfig(max_length=17, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = specdec.generate(target, ids, DraftModel(draft, k=3), generation_config=config)
    assert torch.equal(got, target.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config))
    assert got.shape[1] == 17


def test_left_padded_batch_with_eos(target, draft):
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]
    assert_rows_match_alone(target, rows, PromptLookup(k=4), max_new_tokens=20, eos=7)


def test_streamer_receives_exactly_the_new_tokens(target, draft):
    class Recorder:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    ids = torch.tensor([[5, 9, 13, 7]])
    rec = Recorder()
    got = specdec.generate(target, ids, DraftModel(draft, k=3), max_new_tokens=25, eos_token_id=None, streamer=rec)
    assert rec.chunks[0] == ids[0].tolist()  # the prompt first, as model.generate does
    assert sum(rec.chunks[1:], []) == got[0, 4:].tolist()
    assert rec.ended


def test_text_iterator_streamer_works(smollm):
    model, tokenizer = smollm
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    got = specdec.generate(model, ids, PromptLookup(), max_new_tokens=12, streamer=streamer)
    assert "".join(streamer).strip() == tokenizer.decode(got[0, ids.shape[1]:], skip_special_tokens=True).strip()


test_text_iterator_streamer_works = pytest.mark.slow(test_text_iterator_streamer_works)


def test_speculative_wraps_only_this_instance(target, draft):
    ids = torch.tensor([[5, 9, 13, 7]])
    expected = reference(target, ids, max_new_tokens=20, eos_token_id=None)
    with specdec.speculative(target, DraftModel(draft, k=3)) as model:
        out = model.generate(ids, max_new_tokens=20, eos_token_id=None, return_dict_in_generate=True)
        assert "generate" in vars(target)
    assert isinstance(out, specdec.SpecDecodeOutput) and out.stats.steps > 0
    assert torch.equal(out.sequences, expected)
    assert "generate" not in vars(target)  # restored: the class's own generate again
    assert torch.equal(reference(target, ids, max_new_tokens=20, eos_token_id=None), expected)


def test_return_dict_carries_stats(target, draft):
    ids = torch.tensor([[5, 9, 13, 7, 5, 9, 13]])
    out = specdec.generate(target, ids, DraftModel(draft, k=3), max_new_tokens=20, eos_token_id=None,
                           return_dict_in_generate=True, goodput=False)
    stats = out.stats
    assert stats.new_tokens == 20
    assert stats.drafted >= stats.accepted >= 0
    assert stats.new_tokens == stats.accepted + stats.steps  # no EOS: one extra token per step
    assert 0 <= stats.acceptance_rate <= 1
    assert stats.draft_time > 0 and stats.verify_time > 0
    assert len(stats.position_acceptance) == 3


@pytest.mark.parametrize("kind", ["lookup", "draft-tree", "eagle"])
def test_padded_verification_changes_nothing(target, draft, kind):
    """min_verify_tokens pads forwards with discarded columns: same tokens, same acceptance."""
    rows = [[5, 9, 13, 7, 5, 9, 13], [3, 4, 5, 3, 4], [12, 40]]
    ids, mask = left_pad([torch.tensor(r) for r in rows], pad_id=0)
    outs = [specdec.generate(target, ids, make_drafter(kind, 3, draft, target), attention_mask=mask,
                             max_new_tokens=24, eos_token_id=None, pad_token_id=0, min_verify_tokens=m,
                             return_dict_in_generate=True, goodput=False) for m in (1, 8)]
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert outs[0].stats.accepted == outs[1].stats.accepted
    with pytest.raises(ValueError, match="min_verify_tokens=0"):
        specdec.generate(target, ids, None, attention_mask=mask, max_new_tokens=4, min_verify_tokens=0)


class Spy(Drafter):
    """Wraps a drafter: records how many rows each step asked its proposer for, and the trees' sizes."""

    def __init__(self, inner):
        self.inner, self.asked, self.made = inner, [], []

    def proposer(self, view):
        inner, spy = self.inner.proposer(view), self

        class Recording(Proposer):
            needs = inner.needs

            def prefill(self, states, verified):
                inner.prefill(states, verified)

            def propose(self, states, depths):
                spy.asked.append(len(states))
                trees = inner.propose(states, depths)
                spy.made.append([len(t) for t in trees])
                return trees

            def commit(self, states, results, verified):
                inner.commit(states, results, verified)

        return Recording()


def test_fallback_runs_the_second_drafter_only_where_the_first_has_no_tree(target):
    """Combined(fallback=True): each row's tree is lookup's when it matches, else EAGLE's alone."""
    eagle = Spy(Eagle(EagleHead.from_target(target), k=2))
    combined = Spy(Combined(PromptLookup(k=3, max_ngram=2), eagle, fallback=True))
    rows = [[5, 9, 2, 5, 9, 2, 7], [1, 2, 3, 4, 6, 8, 10]]  # row 0 repeats itself, row 1 not at first
    assert_rows_match_alone(target, rows, combined, max_new_tokens=16, eos=None, goodput=False)
    assert any(n < 2 for n in eagle.asked)  # some steps asked EAGLE for fewer rows than the batch
    assert all(n <= 3 for step in combined.made for n in step)  # never both trees: lookup's k=3 or EAGLE's chain of 2
