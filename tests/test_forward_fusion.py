"""The fused norms and rotary embeddings (specdec/backends/fused.py): transformers' operations (the rotary
embedding to the bit, the norm within float32's bound for its sum), installed once on the modules whose code
is Llama's, taken only inside a routed call with the native library, and greedy output unchanged."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaConfig, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope

import specdec
from specdec import PromptLookup
from specdec.backends import fused, native
from specdec.backends.cpu_linear import Route, install_linears, routed, uninstall_linears

from architectures import tiny_config
from conftest import tiny_llama

U = 2.0**-24  # float32's unit roundoff


@pytest.fixture(scope="module")
def library(native_library):
    return native_library


def assert_float32_norm(got, x, weight, eps):
    """Within the float32 bound of RMSNorm, of the float64 result: the sum of squares off by at most
    gamma_N of itself (any order), halved by the square root, and a few roundings more."""
    exact = weight.double() * x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps)
    N = x.shape[-1]
    bound = (N * U / (1 - N * U)) / 2 + 8 * U
    assert ((got.double() - exact).abs() <= bound * exact.abs() + 1e-30).all()


@pytest.mark.parametrize("width", [24, 33, 576, 1000])
@pytest.mark.parametrize("rows", [1, 3, 8, 64])
def test_rms_norm_is_llamas_within_the_sums_rounding(library, rows, width):
    generator = torch.Generator().manual_seed(rows * width)
    norm = LlamaRMSNorm(width, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=generator))
    x = 3 * torch.randn(1, rows, width, generator=generator)
    got = library.rms_norm(x, norm.weight.detach(), norm.variance_epsilon)
    assert got.shape == x.shape
    assert_float32_norm(got, x, norm.weight.detach(), norm.variance_epsilon)
    assert_float32_norm(norm(x).detach(), x, norm.weight.detach(), norm.variance_epsilon)  # the bound holds torch's


def test_a_wrong_norm_fails_the_bound(library):
    x, weight = torch.randn(2, 576), torch.randn(576)
    with pytest.raises(AssertionError):
        assert_float32_norm(library.rms_norm(x, 1 + weight, 1e-5), x, weight, 1e-5)  # Gemma's (1 + w)
    with pytest.raises(AssertionError):
        assert_float32_norm(library.rms_norm(x, weight, 1e-5) * (576 / 575) ** 0.5, x, weight, 1e-5)  # mean over N-1


@pytest.mark.parametrize("B,T,Hq,Hk,D,batch_cos", [(1, 1, 9, 3, 64, 1), (1, 8, 9, 3, 64, 1), (3, 5, 4, 2, 8, 3),
                                                   (2, 4, 4, 4, 6, 1), (2, 1, 2, 1, 128, 2)])
def test_rope_is_llamas_to_the_bit(library, B, T, Hq, Hk, D, batch_cos):
    """Inputs laid out as the attention layers make them: projections (B, T, H * D) viewed (B, H, T, D)."""
    generator = torch.Generator().manual_seed(B * T * D)
    config = LlamaConfig(hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=Hk, head_dim=D)
    q = 10 * torch.randn(B, T, Hq * D, generator=generator).view(B, T, Hq, D).transpose(1, 2)
    k = 10 * torch.randn(B, T, Hk * D, generator=generator).view(B, T, Hk, D).transpose(1, 2)
    positions = torch.randint(0, 4000, (batch_cos, T), generator=generator)
    cos, sin = LlamaRotaryEmbedding(config)(q, positions)
    want = llama_rope(q, k, cos, sin)
    got = library.rope(q, k, cos, sin)
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.equal(g, w)
    got = library.rope(q.contiguous(), k.contiguous(), cos, sin)  # any layout
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def modules(model):
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    wrappers = [w for m in model.modules() for name, w in vars(m).get("_kernel_funcs", {}).items()
                if name == "rotary_pos_emb"]
    return norms, wrappers


@pytest.mark.parametrize("name,norms,ropes", [("llama", True, True), ("qwen2", True, True), ("mistral", True, True),
                                              ("gemma", False, True), ("phi3", True, False)])
def test_installed_where_the_code_is_llamas(name, norms, ropes):
    """Gemma's norm scales by 1 + w; Phi-3 rotates part of each head: those keep their own code."""
    model = AutoModelForCausalLM.from_config(tiny_config(name))
    found_norms, wrappers = modules(model)
    assert found_norms and (wrappers or not ropes)
    install_linears(model)
    install_linears(model)  # idempotent
    assert all(fused._installed(n) == norms for n in found_norms)
    assert all(fused._installed(w) == ropes for w in wrappers)
    uninstall_linears(model)
    assert not fused.is_fused(model)


class Counting:
    """The native library, counting its fused calls."""

    def __init__(self, library) -> None:
        self.library, self.calls = library, {"rms_norm": 0, "rope": 0}

    def __call__(self, *args):
        return self.library(*args)

    def rms_norm(self, *args):
        self.calls["rms_norm"] += 1
        return self.library.rms_norm(*args)

    def rope(self, *args):
        self.calls["rope"] += 1
        return self.library.rope(*args)


def test_only_a_routed_call_with_the_library_takes_them(library):
    model = tiny_llama(seed=3, layers=2)
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.inference_mode():
        want = model(ids).logits
        install_linears(model)
        assert torch.equal(model(ids).logits, want)  # outside a routed call: the model's own code
        with routed(Route(None, library.__call__)):  # the native products alone (a bound method: no fused ops)
            products = model(ids).logits
        counting = Counting(library)
        with routed(Route(None, counting, fused=False)):
            assert torch.equal(model(ids).logits, products)
        assert counting.calls == {"rms_norm": 0, "rope": 0}
        with routed(Route(None, counting)):
            got = model(ids).logits
        torch.testing.assert_close(got, products, rtol=1e-5, atol=1e-5)
        assert counting.calls == {"rms_norm": 2 * 2 + 1, "rope": 2}  # two norms a layer and the final one
        with routed(Route(None, counting)):
            model(torch.randint(0, 64, (1, fused.MAX_ROWS + 1)))  # prefill-sized: the model's own
        assert counting.calls == {"rms_norm": 5, "rope": 2}
    uninstall_linears(model)


def test_gradients_take_the_models_own_code(library):
    model = tiny_llama(seed=4, layers=1)
    install_linears(model)
    counting = Counting(library)
    with routed(Route(None, counting)):
        model(torch.tensor([[5, 9, 2]])).logits.sum().backward()
    assert counting.calls == {"rms_norm": 0, "rope": 0}
    assert model.model.layers[0].input_layernorm.weight.grad is not None
    uninstall_linears(model)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_generate_equal_with_the_fused_ops(library, name, monkeypatch):
    """Greedy output of the engine (the fused ops taken: counted) equals model.generate, chain and left-padded batch."""
    counting = Counting(library)
    monkeypatch.setattr(native, "load", lambda: counting)
    if name == "llama":
        target = tiny_llama(seed=1, layers=2, hidden=48)
    else:
        target = AutoModelForCausalLM.from_config(tiny_config(name)).eval()
    vocab = target.config.vocab_size
    ids = torch.tensor([[5, 9, 2, 5, 9, 2, 7, 1], [0, 0, 3, 4, 3, 4, 3, 4]]) % vocab
    mask = torch.tensor([[1] * 8, [0, 0] + [1] * 6])
    want = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=16, pad_token_id=0,
                           eos_token_id=None)
    got = specdec.generate(target, ids, PromptLookup(k=4), attention_mask=mask, max_new_tokens=16,
                           eos_token_id=None, pad_token_id=0)
    assert got.tolist() == want.tolist()
    assert counting.calls["rms_norm"] and counting.calls["rope"]
    again = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=16, pad_token_id=0,
                            eos_token_id=None)
    assert again.tolist() == want.tolist()  # plain decoding afterwards: the model's own code


def test_a_model_specdec_ran_still_compiles_for_transformers_static_generate():
    """After specdec installed its routed norms and rotary wrappers, ``model.generate`` with a static cache and
    ``torch.compile`` (the benchmark's hf_static_compiled) compiles and gives ``model.generate``'s tokens: under
    compile, kernels' wrapper dispatches back to the installed forward, which must not dispatch to it again
    (it recursed without end before)."""
    from specdec.tooling.benchmark import hf_static_compiled

    model = tiny_llama(layers=2, scale=3.0)
    ids = torch.randint(3, 64, (1, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    specdec.generate(model, ids, None, max_new_tokens=8)
    assert fused.is_fused(model)
    compiled = hf_static_compiled(model, 8)
    compiled.prepare(ids, mask)  # compiles
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(compiled.run(ids, mask)[0], expected)
