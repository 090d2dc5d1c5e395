"""After any sequence of steps the target's cache equals a fresh prefill of the same tokens."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specdec.cache import keep_path, new_cache
from specdec.drafters import DraftModel, PromptLookup
from specdec.engine import SpeculativeDecoder
from specdec.sampling import Sampling


def fresh_prefill(model, tokens):
    cache = new_cache(model)
    with torch.inference_mode():
        model(input_ids=tokens, cache=cache, use_cache=True)
    return cache


def assert_caches_close(a, b):
    assert a.get_seq_length() == b.get_seq_length()
    for la, lb in zip(a.layers, b.layers):
        torch.testing.assert_close(la.keys, lb.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(la.values, lb.values, rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=st.lists(st.integers(3, 63), min_size=2, max_size=16),
    kind=st.sampled_from(["lookup", "draft", "draft-sampled"]),
    k=st.integers(1, 6),
    steps=st.integers(1, 8),
)
def test_cache_equals_fresh_prefill_after_steps(target, draft, prompt, kind, k, steps):
    drafter = PromptLookup(k=k) if kind == "lookup" else DraftModel(draft, k=k)
    sampling = Sampling(do_sample=kind == "draft-sampled", temperature=1.0)
    decoder = SpeculativeDecoder(target, drafter, sampling, torch.Generator().manual_seed(0))
    decoder.prefill(torch.tensor([prompt]), max_new_tokens=64)
    for _ in range(steps):
        decoder.step()
        tokens = decoder.state.tokens
        assert decoder.cache.get_seq_length() == tokens.shape[1] - 1  # everything but the root
        assert_caches_close(decoder.cache, fresh_prefill(target, tokens[:, :-1]))
        if isinstance(drafter, DraftModel):
            assert_caches_close(drafter.cache, fresh_prefill(draft, tokens[:, : drafter.cached]))


def test_keep_path_gathers_a_branch(target):
    """A non-prefix path (a tree branch) is moved to contiguous positions."""
    prefix = torch.tensor([[5, 6, 7]])
    block = torch.tensor([[8, 9, 10, 11]])
    cache = fresh_prefill(target, torch.cat([prefix, block], 1))
    keep_path(cache, prefix_len=3, path=[1, 3])
    expected_keys = fresh_prefill(target, torch.cat([prefix, block], 1))
    for layer, ref in zip(cache.layers, expected_keys.layers):
        assert layer.keys.shape[-2] == 5
        torch.testing.assert_close(layer.keys, ref.keys[:, :, [0, 1, 2, 4, 6]])


@pytest.mark.parametrize("path", [[], [0], [0, 1, 2]])
def test_keep_path_prefix_is_a_crop(target, path):
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10]])
    cache = fresh_prefill(target, tokens)
    keep_path(cache, prefix_len=3, path=path)
    assert_caches_close(cache, fresh_prefill(target, tokens[:, : 3 + len(path)]))
