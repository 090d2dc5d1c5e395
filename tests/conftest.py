"""Shared fixtures: tiny random models (fast) and the embedded default (marked slow)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

torch.set_num_threads(int(os.environ.get("SPECDEC_TEST_THREADS", "2")))


def tiny_llama(vocab: int = 64, layers: int = 2, seed: int = 0, hidden: int = 32, scale: float = 1.0) -> LlamaForCausalLM:
    """A random Llama small enough to run hundreds of generations a second.

    ``scale`` multiplies the output head, making distributions peakier (scale > 1).
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def attentive(model, factor: float = 4.0):
    """``model`` with its query and key projections scaled by ``factor``, so attention is far from uniform
    (random init gives near-uniform attention, under which a wrong mask can go unnoticed)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("q_proj", "k_proj")):
                module.weight.mul_(factor)
    return model


def save_with_tokenizer(model, path):
    """``model`` as a HF directory with a word-level tokenizer (``w0`` ... ``w63``), as experiments load it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w0").save_pretrained(path)
    model.save_pretrained(path)
    return path


class Recorder:
    """A streamer that records what it is given."""

    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        pass


@pytest.fixture(scope="session")
def target():
    return tiny_llama(seed=0, layers=2)


@pytest.fixture(scope="session")
def draft():
    return tiny_llama(seed=1, layers=1)


@pytest.fixture(scope="session")
def smollm():
    from specdec import load_model

    return load_model("smollm2-135m")


@pytest.fixture(autouse=True)
def no_autograd_mode_leaks():
    """Every test leaves autograd as it found it (a leaked no_grad would silently break later training)."""
    yield
    leaked = not torch.is_grad_enabled() or torch.is_inference_mode_enabled()
    torch.set_grad_enabled(True)
    assert not leaked, "this test left autograd disabled"


@pytest.fixture(scope="module")
def native_library():
    """The native library (specdec.backends.native), built on first use; skipped where it cannot be built
    (test_native's fallback test covers that case)."""
    from specdec.backends import native

    built = native.load()
    if built is None:
        pytest.skip("the native library cannot be built on this machine (test_native's fallback test covers it)")
    return built
