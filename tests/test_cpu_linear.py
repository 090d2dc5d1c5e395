"""The CPU linear products: same values as F.linear, used only inside a routed call, installed once."""

import threading

import pytest
import torch
from torch import nn

import specdec
from specdec import PromptLookup
from specdec.backends import cpu_linear
from specdec.backends.cpu_linear import (MAX_ROWS, MIN_PACKED, PackedWeights, Route, install_linears, is_installed,
                                         linear, packed_weights, routed, uninstall_linears)
from specdec.drafters import Eagle, EagleHead

from conftest import tiny_llama


@pytest.mark.parametrize("shape", [(1, 24), (1, 1, 24), (2, 3, 24), (MAX_ROWS, 24), (MAX_ROWS + 1, 24), (2, 0, 24)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_f_linear(shape, bias):
    torch.manual_seed(0)
    x, weight = torch.randn(*shape), torch.randn(40, 24)
    b = torch.randn(40) if bias else None
    want = nn.functional.linear(x, weight, b)
    with routed(Route(PackedWeights())):
        got = linear(x, weight, b)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(linear(x, weight, b), want)  # outside a routed call: F.linear itself


def assert_float32_product(got, x, weight, bias=None):
    """Within the worst-case float32 rounding bound of a dot product (Higham's gamma_K) of the exact
    float64 result; a product computed in lower precision (bf16, tf32) is far outside it."""
    exact = nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
    K = x.shape[-1] + (bias is not None)
    gamma = K * 2.0**-24 / (1 - K * 2.0**-24)
    scale = nn.functional.linear(x.double().abs(), weight.double().abs(),
                                 None if bias is None else bias.double().abs())
    assert ((got.double() - exact).abs() <= gamma * scale).all()


@pytest.mark.parametrize("rows", [1, 2, 3, 8, MAX_ROWS, MAX_ROWS + 1])
def test_large_weights_are_float32_products_and_packed_copies_follow_every_write(rows):
    """Weights past MIN_PACKED take oneDNN on a packed copy for 3+ rows in a routed call: float32
    products of the current weight, after an in-place change, a write through ``.data`` (which
    keeps no version) and a change of an inference tensor (which has no version counter)."""
    torch.manual_seed(0)
    weight, bias = torch.randn(MIN_PACKED // 256, 256), torch.randn(2 * MIN_PACKED // 256)[::2]  # a strided bias
    x = torch.randn(rows, 256)
    with torch.inference_mode():
        frozen = torch.randn(MIN_PACKED // 256, 256)  # an inference tensor
    packs = PackedWeights()
    for change in (lambda: None, lambda: weight.mul_(-2), lambda: weight.data.mul_(0.5), lambda: frozen.add_(1)):
        with torch.inference_mode():
            change()
        with routed(Route(packs)), torch.inference_mode():  # a new call: the copies are checked once
            got = linear(x, weight, bias)
            assert got.shape == (rows, weight.shape[0])
            assert_float32_product(got, x, weight, bias)
            assert_float32_product(linear(x, frozen), x, frozen)
        assert (weight in packs) == (rows > 2)  # the packed product ran
    assert (packs.nbytes >= weight.numel() * 4) == (rows > 2)
    packs.clear()
    assert len(packs) == 0 and packs.nbytes == 0


def test_no_packed_products_outside_a_route_or_with_packing_off():
    weight, x = torch.randn(MIN_PACKED // 256, 256), torch.randn(4, 256)
    packs = PackedWeights()
    with torch.inference_mode():
        assert_float32_product(linear(x, weight), x, weight)
        with routed(Route(None)):  # generate(..., pack_weights=False)
            assert_float32_product(linear(x, weight), x, weight)
    assert weight not in packs and len(packs) == 0


def test_packed_copies_go_with_their_weights():
    packs = PackedWeights()
    weight = torch.randn(MIN_PACKED // 256, 256)
    with routed(Route(packs)), torch.inference_mode():
        linear(torch.randn(4, 256), weight)
    assert len(packs) == 1
    del weight
    assert len(packs) == 0


def test_linear_gradients_equal_f_linear():
    weight = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(2, 4, requires_grad=True)
    with routed(Route(PackedWeights())):
        linear(x, weight).square().sum().backward()
    got = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    nn.functional.linear(x, weight).square().sum().backward()
    torch.testing.assert_close(got, (x.grad, weight.grad))


@pytest.mark.parametrize("rows", [3, MAX_ROWS + 1])
@pytest.mark.parametrize("trained", ["input", "bias"])
def test_gradients_flow_past_a_frozen_large_weight(rows, trained):
    """Training under the target's frozen output head (ReducedHead), or a bias alone: the gradient
    must come back, so the packed product (which has no backward) is not used, even when routed.
    Both products sum in their own order, so each is held to float64: at most twice F.linear's error."""
    torch.manual_seed(0)
    weight = torch.randn(MIN_PACKED // 256, 256)  # frozen: requires_grad False
    grads = {}
    for name, fn, dtype in (("ours", linear, torch.float32), ("torch", nn.functional.linear, torch.float32),
                            ("exact", nn.functional.linear, torch.float64)):
        torch.manual_seed(1)
        x = torch.randn(rows, 256, dtype=torch.float64).to(dtype)
        bias = torch.randn(weight.shape[0], dtype=torch.float64).to(dtype)
        leaf = x if trained == "input" else bias
        leaf.requires_grad_()
        with routed(Route(PackedWeights())):
            fn(x, weight.to(dtype), bias).square().sum().backward()
        grads[name] = leaf.grad
    assert grads["ours"] is not None
    error = (grads["ours"].double() - grads["exact"]).abs().max()
    assert error <= 2 * (grads["torch"].double() - grads["exact"]).abs().max()


def calls_of_mm(monkeypatch):
    calls = []
    real = torch.mm

    def counting(a, b):
        calls.append(tuple(a.shape))
        return real(a, b)

    monkeypatch.setattr(torch, "mm", counting)
    return calls


def test_installed_layers_route_only_inside_a_call(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    hooked = nn.Linear(6, 6)
    hooked.forward = lambda x: x  # an instance forward (as accelerate's hooks set) is left alone
    x = torch.randn(2, 6)
    want = model(x)
    install_linears(model)
    install_linears(model)  # idempotent
    install_linears(hooked)
    assert is_installed(model) and not is_installed(hooked) and hooked(x) is x
    calls = calls_of_mm(monkeypatch)
    assert torch.equal(model(x), want)  # outside a call: exactly F.linear (which does not go through torch.mm)
    assert calls == []
    with routed(Route(None)):
        got = model(x)
    assert calls == [(5, 6), (3, 5)]  # (W @ x.T) per layer, weight first
    torch.testing.assert_close(got, want)
    uninstall_linears(model)
    assert not is_installed(model) and all("forward" not in vars(layer) for layer in (model[0], model[2]))


def test_a_route_is_the_calling_contexts_only():
    """Another thread's forward, while a call routes its own, is exactly F.linear: no process-wide switch."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 64)
    install_linears(layer)
    x = torch.randn(2, 64)
    want = nn.functional.linear(x, layer.weight, layer.bias)
    inside, outside = threading.Event(), threading.Event()
    seen = []

    def other():
        inside.wait()
        seen.append(torch.equal(layer(x), want))
        outside.set()

    thread = threading.Thread(target=other)
    thread.start()
    with routed(Route(None)):
        inside.set()
        outside.wait()
    thread.join()
    assert seen == [True]


@pytest.mark.parametrize("backend", ["skinny", "torch", "packed", "unpacked"])
def test_generate_equal_under_each_backend(backend, monkeypatch):
    """``packed``: every weight counts as large, so the tiny model's 3+ token forwards (trees,
    EAGLE's nodes) take oneDNN on packed copies as the real model's MLP and head do."""
    target = tiny_llama(seed=0, layers=2)
    if backend in ("packed", "unpacked"):
        monkeypatch.setattr(cpu_linear, "MIN_PACKED", 0)
    ids = torch.tensor([[5, 9, 2, 5, 9, 2, 7, 1]])
    want = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                           pad_token_id=0, eos_token_id=None)
    head = EagleHead.from_target(target)
    for drafter in (PromptLookup(k=4), Eagle(head, k=3, top_k=2, budget=5)):
        got = specdec.generate(target, ids, drafter, max_new_tokens=20, eos_token_id=None, pad_token_id=0,
                               linear_backend="torch" if backend == "torch" else "auto",
                               pack_weights=backend != "unpacked")
        assert got.tolist() == want.tolist()
    assert (target.lm_head.weight in packed_weights(target)) == (backend == "packed")
    assert is_installed(target) == (backend != "torch")
    after = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                            pad_token_id=0, eos_token_id=None)
    assert torch.equal(after, want)  # the installed model's own generate is unchanged


def test_engine_routes_the_drafters_networks(monkeypatch):
    target = tiny_llama(seed=0, layers=2)
    head = EagleHead.from_target(target)
    seen = []
    real = Route.linear

    def spy(self, x, weight, bias=None):
        seen.append(weight.data_ptr())
        return real(self, x, weight, bias)

    monkeypatch.setattr(Route, "linear", spy)
    ids = torch.tensor([[5, 9, 2, 5, 9, 2, 7, 1]])
    specdec.generate(target, ids, Eagle(head, k=3), max_new_tokens=6, eos_token_id=None, pad_token_id=0,
                     goodput=False)  # always draft: the head must run
    assert head.fc.weight.data_ptr() in seen  # the EAGLE head's own layer
    assert target.model.layers[0].mlp.up_proj.weight.data_ptr() in seen  # the target's


def test_bad_backend_is_refused_before_decoding(target):
    ids = torch.tensor([[5, 9, 2]])
    with pytest.raises(ValueError, match="linear_backend='gemv'"):
        specdec.generate(target, ids, None, max_new_tokens=4, linear_backend="gemv")
