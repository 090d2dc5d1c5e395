"""After any sequence of steps the target's cache equals a fresh prefill of the same tokens."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specdec.cache import GrowingLayer, commit_rows, new_cache, select_rows, truncate
from specdec.drafters import Combined, DraftModel, PromptLookup
from specdec.drafters.draft_model import LMNet  # a DraftNetwork (specdec.drafters.network)
from specdec.engine import SpeculativeDecoder, prepare_target
from specdec.options import Options
from specdec.sampling import Sampling


def fresh_prefill(model, tokens):
    cache = new_cache(model)
    with torch.inference_mode():
        model(input_ids=tokens, cache=cache, use_cache=True)
    return cache


def kv(cache, b=0, start=0, end=None):
    """Row b's keys and values at positions [start, end), per layer."""
    return [(layer.keys[b, :, start:end], layer.values[b, :, start:end]) for layer in cache.layers]


def assert_kv_close(a, b):
    assert len(a) == len(b)
    for (ka, va), (kb, vb) in zip(a, b):
        assert ka.shape == kb.shape
        torch.testing.assert_close(ka, kb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompts=st.lists(st.lists(st.integers(3, 63), min_size=1, max_size=12), min_size=1, max_size=3),
    kind=st.sampled_from(["lookup", "lookup-tree", "draft", "draft-tree", "draft-static", "draft-sampled", "combined"]),
    k=st.integers(1, 5),
    steps=st.integers(1, 6),
)
def test_cache_equals_fresh_prefill_after_steps(target, draft, prompts, kind, k, steps):
    drafter = {
        "lookup": lambda: PromptLookup(k=k),
        "lookup-tree": lambda: PromptLookup(k=k, branches=3),
        "draft": lambda: DraftModel(draft, k=k),
        "draft-tree": lambda: DraftModel(draft, k=k, top_k=2, budget=6),
        "draft-static": lambda: DraftModel(draft, k=k, tree=[[0], [1], [0, 0], [1, 0], [1, 1], [0, 0, 0]]),
        "combined": lambda: Combined(PromptLookup(k=k), DraftModel(draft, k=k)),
        "draft-sampled": lambda: DraftModel(draft, k=k, top_k=2),
    }[kind]()
    sampling = Sampling(do_sample=kind == "draft-sampled", temperature=1.0)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    options = Options(max_new_tokens=64, sampling=sampling)
    prepare_target(target, options)
    decoder = SpeculativeDecoder(target, drafter, options, torch.Generator().manual_seed(0))
    decoder.prefill(ids, mask)
    parts = getattr(decoder.proposer, "parts", [decoder.proposer])
    nets = [p.net for p in parts if isinstance(getattr(p, "net", None), LMNet)]
    for _ in range(steps):
        decoder.step()
        cache = decoder.cache
        for a, state in enumerate(decoder.states):
            tokens = state.tokens
            start, end = int(cache.start[a]), int(cache.end[a])
            assert end - start == tokens.shape[1] - 1  # everything but the root
            assert_kv_close(kv(cache.cache, a, start, end), kv(fresh_prefill(target, tokens[:, :-1])))
        for net in nets:  # each draft row holds exactly the committed tokens it was fed, as a fresh prefill
            if net.cache is None:
                continue
            assert net.cache.length == int(net.cache.end.max())  # no tree columns left behind
            for b, row in enumerate(net.rows.order):
                tokens = net.rows.latest[row].tokens
                start, end = int(net.cache.start[b]), int(net.cache.end[b])
                assert end - start <= tokens.shape[1]
                assert_kv_close(kv(net.cache.cache, b, start, end), kv(fresh_prefill(draft, tokens[:, : end - start])))


def test_commit_gathers_a_branch(target):
    """A non-prefix path (a tree branch) is moved to contiguous positions."""
    prefix = torch.tensor([[5, 6, 7]])
    block = torch.tensor([[8, 9, 10, 11]])
    cache = fresh_prefill(target, torch.cat([prefix, block], 1))
    with torch.inference_mode():
        commit_rows(cache, torch.tensor([3]), [torch.tensor([4, 6])])
    expected_keys = fresh_prefill(target, torch.cat([prefix, block], 1))
    for layer, ref in zip(cache.layers, expected_keys.layers):
        assert layer.keys.shape[-2] == 5
        torch.testing.assert_close(layer.keys, ref.keys[:, :, [0, 1, 2, 4, 6]])


@pytest.mark.parametrize("path", [[], [0], [0, 1, 2]])
def test_keep_prefix_is_a_crop(target, path):
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10]])
    cache = fresh_prefill(target, tokens)
    with torch.inference_mode():
        commit_rows(cache, torch.tensor([3]), [torch.tensor([3 + p for p in path], dtype=torch.long)])
    assert_kv_close(kv(cache), kv(fresh_prefill(target, tokens[:, : 3 + len(path)])))


def test_failed_verification_leaves_the_cache_whole(target, monkeypatch):
    """The verify forward fails inside the first attention layer (the Triton kernel is not
    available on CPU without the interpreter): the cache is cut back, nothing is committed."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    options = Options(max_new_tokens=10, attention_backend="triton")
    prepare_target(target, options)
    decoder = SpeculativeDecoder(target, PromptLookup(k=3), options)
    prompt = torch.tensor([[5, 6, 7, 5, 6, 7, 5]])
    decoder.prefill(prompt, None)
    before = [(k.clone(), v.clone()) for k, v in kv(decoder.cache.cache)]  # copies: the cache writes in place
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        decoder.step()
    assert_kv_close(kv(decoder.cache.cache), before)
    assert decoder.states[0].tokens.shape[1] == prompt.shape[1] and decoder.stats.steps == 0


def test_growing_layer_appends_in_place_and_survives_crops_and_row_selection():
    """Every update equals concatenation; steps write into the same buffer; a crop (a view) is
    overwritten by the next update; a batch selection (a new tensor) is copied into fresh buffers."""
    torch.manual_seed(0)
    layer, concat = GrowingLayer(), None
    chunks = [torch.randn(2, 3, t, 4) for t in (5, 1, 3, 1)]
    buffers = set()
    for chunk in chunks:
        keys, values = layer.update(chunk, -chunk)
        concat = chunk if concat is None else torch.cat([concat, chunk], dim=2)
        torch.testing.assert_close(keys, concat, rtol=0, atol=0)
        torch.testing.assert_close(values, -concat, rtol=0, atol=0)
        buffers.add(keys.data_ptr())
    assert len(buffers) == 1 and layer.get_seq_length() == 10  # one allocation, no copies per step
    layer.crop(-4)  # a rejected block
    new = torch.randn(2, 3, 2, 4)
    keys, _ = layer.update(new, new)
    torch.testing.assert_close(keys, torch.cat([concat[:, :, :6], new], dim=2), rtol=0, atol=0)
    assert keys.data_ptr() in buffers
    layer.keys, layer.values = layer.keys[[1]], layer.values[[1]]  # a finished row left the batch
    last = torch.randn(1, 3, 1, 4)
    keys, values = layer.update(last, last)
    torch.testing.assert_close(keys, torch.cat([concat[1:, :, :6], new[1:], last], dim=2), rtol=0, atol=0)
    assert keys.data_ptr() not in buffers and keys.shape == (1, 3, 9, 4)


def test_engine_cache_ops_keep_the_growing_buffers(target):
    """commit_rows and truncate leave views of the same buffer; select_rows hands over a copy."""
    cache = fresh_prefill(target, torch.tensor([[5, 6, 7, 8, 9, 10], [4, 4, 5, 5, 6, 6]]))
    assert all(type(layer) is GrowingLayer for layer in cache.layers)
    start = [layer.keys.data_ptr() for layer in cache.layers]
    with torch.inference_mode():
        commit_rows(cache, torch.tensor([3, 3]), [torch.tensor([4]), torch.tensor([3, 5])])
        truncate(cache, 4)
        assert [layer.keys.data_ptr() for layer in cache.layers] == start
        select_rows(cache, torch.tensor([1]))
    assert cache.get_seq_length() == 4 and cache.layers[0].keys.shape[0] == 1
