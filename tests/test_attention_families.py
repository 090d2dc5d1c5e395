"""The engine on the attention features the architecture sweep covers with the torch reference, here
through the Triton kernel (under TRITON_INTERPRET=1 on CPU): sliding windows shorter than the prompt,
Gemma-2's softcap, gpt-oss's sinks, DeepSeek's value head dim; and the up-front refusals."""

import os

import pytest
import torch

import specdec
from specdec import DraftModel, PromptLookup

from architectures import build, draft_for
from conftest import tiny_llama

PROMPT = [11, 23, 5, 42, 17, 8, 11, 23, 5, 42, 17, 8, 11, 23]


def reference(model, row, n):
    ids = torch.tensor([row])
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                          pad_token_id=0, eos_token_id=None)[0, len(row):].tolist()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the kernel runs on CPU under TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", ["mistral", "gemma2", "gpt_oss", "deepseek_v3", "llama4_text", "cohere2"])
def test_kernel_backend_is_exact_on_attention_features(name):
    model = build(name).model
    assert model is not None
    expected = reference(model, PROMPT, 10)
    for drafter in (PromptLookup(k=3), DraftModel(draft_for(96), k=2, top_k=2)):
        out = specdec.generate(model, torch.tensor([PROMPT]), drafter, attention_backend="triton", max_new_tokens=10,
                               eos_token_id=None, pad_token_id=0)
        assert out[0, len(PROMPT):].tolist() == expected


def test_eager_models_prefill_with_their_own_attention():
    """Gemma-2 loads with eager attention (softcap): prefill and plain steps run its own eager function."""
    eager = build("gemma2").model
    eager.set_attn_implementation("eager")
    expected = reference(eager, PROMPT, 8)
    out = specdec.generate(eager, torch.tensor([PROMPT]), PromptLookup(k=3), max_new_tokens=8, eos_token_id=None)
    assert out[0, len(PROMPT):].tolist() == expected
    assert specdec.attention.installed_name(eager) == "eager"


@pytest.mark.parametrize("name,message", [("mamba", "MambaForCausalLM has state-space or linear-attention layers"),
                                          ("jamba", "JambaForCausalLM has state-space or linear-attention layers"),
                                          ("bart", "does not honour the tree mask or the position ids")])
def test_refused_before_any_forward_or_token(name, message):
    model = build(name).model
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            specdec.generate(model, torch.tensor([PROMPT]), PromptLookup(k=3), max_new_tokens=4)
    finally:
        handle.remove()
    if name in ("mamba", "jamba"):
        assert calls == []  # refused from the cache's layer types, before the model ran at all
    assert specdec.attention.installed_name(model) is None  # nothing left installed


def test_a_refused_model_is_left_as_it_was():
    model = build("bart").model
    before = reference(model, PROMPT, 6)
    with pytest.raises(ValueError):
        specdec.generate(model, torch.tensor([PROMPT]), PromptLookup(k=3), max_new_tokens=4)
    assert reference(model, PROMPT, 6) == before


def test_llama_still_exact_after_the_probe():
    model = tiny_llama(seed=3)
    ids = torch.tensor([[5, 6, 7, 5, 6, 7]])
    expected = reference(model, ids[0].tolist(), 12)
    assert specdec.generate(model, ids, PromptLookup(k=3), max_new_tokens=12, eos_token_id=None)[0, 6:].tolist() \
        == expected
