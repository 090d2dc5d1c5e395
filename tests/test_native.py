"""The native product for a step's few rows: float32 products of every weight shape the engine meets,
built once, and a pure-torch fallback that says so once when it cannot be built."""

import functools
import warnings

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import specdec
from specdec import PromptLookup
from specdec.backends import native
from specdec.backends.cpu_linear import PackedWeights, Route, linear, routed

from architectures import SWEEP, tiny_config
from conftest import tiny_llama
from test_cpu_linear import assert_float32_product

# the embedded default's weights (SmolLM2-135M: q/o, k/v, gate/up, down, the tied output head)
DEFAULT_SHAPES = {(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)}
ROWS = [1, 2, 3, 5, 8, 9, 16, 64]


@functools.cache
def sweep_shapes() -> tuple[tuple[int, int], ...]:
    """Every ``nn.Linear`` weight shape of the architecture sweep's tiny models (those that build)."""
    shapes = set()
    for name in SWEEP:
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(tiny_config(name))
        except Exception:  # families the sweep itself reports as not buildable
            continue
        shapes |= {tuple(m.weight.shape) for m in model.modules() if type(m) is nn.Linear}
    return tuple(sorted(shapes))


@pytest.fixture(scope="module")
def product(native_library):
    return native_library


def test_the_sweep_gives_shapes():
    shapes = sweep_shapes()
    assert len(shapes) >= 20 and any(i % 16 for _, i in shapes)  # and widths that are not multiples of 16


@pytest.mark.parametrize("rows", ROWS)
def test_float32_products_of_every_shape(product, rows):
    """Within float32's rounding bound of the exact product, through a routed call (which takes the native
    product up to its row limit and the torch products past it), for every shape of the sweep and the default
    (every other shape with a bias)."""
    generator = torch.Generator().manual_seed(rows)
    route = Route(PackedWeights(), product)
    for i, (out, width) in enumerate(sorted(set(sweep_shapes()) | DEFAULT_SHAPES)):
        x = torch.randn(rows, width, generator=generator)
        weight = torch.randn(out, width, generator=generator)
        b = torch.randn(out, generator=generator) if i % 2 else None
        with routed(route), torch.inference_mode():
            got = linear(x, weight, b)
        assert got.shape == (rows, out)
        assert_float32_product(got, x, weight, b)


def test_the_native_product_is_called_up_to_its_rows(product, monkeypatch):
    calls = []

    class Counting:
        def __call__(self, x, weight, bias=None):
            calls.append(x.shape[0])
            return product(x, weight, bias)

    weight, x = torch.randn(40, 24), torch.randn(3, 5, 24)  # 15 rows: past the limit
    with routed(Route(None, Counting())), torch.inference_mode():
        for rows in (1, 3, native.MAX_ROWS, native.MAX_ROWS + 1):
            got = linear(x.reshape(-1, 24)[:rows], weight)
            torch.testing.assert_close(got, nn.functional.linear(x.reshape(-1, 24)[:rows], weight))
        linear(x[:, :2], weight)  # a strided view: made contiguous first
    weight.requires_grad_()
    with routed(Route(None, Counting())):
        linear(x[0], weight).sum().backward()  # a gradient to record: the torch product
    assert calls == [1, 3, native.MAX_ROWS, 6]
    assert weight.grad is not None


def test_rows_out_of_range_are_refused(product):
    with pytest.raises(ValueError, match="takes 1..8"):
        product(torch.randn(native.MAX_ROWS + 1, 16), torch.randn(4, 16))


def test_a_built_product_is_reused(product, tmp_path):
    path = native.build(tmp_path)
    mtime = path.stat().st_mtime_ns
    assert native.build(tmp_path) == path and path.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no build leftovers


@pytest.mark.parametrize("why", ["env", "compiler"])
def test_without_the_native_product_the_engine_falls_back_and_says_so_once(why, monkeypatch, tmp_path):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    if why == "env":
        monkeypatch.setenv("SPECDEC_NATIVE", "0")
    else:
        monkeypatch.setenv("CXX", "false")  # a "compiler" that fails every build
    monkeypatch.setattr(native, "load", native._Loader())
    target = tiny_llama(seed=0, layers=2)
    ids = torch.tensor([[5, 9, 2, 5, 9, 2, 7, 1]])
    want = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                           pad_token_id=0, eos_token_id=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            got = specdec.generate(target, ids, PromptLookup(k=4), max_new_tokens=12, eos_token_id=None,
                                   pad_token_id=0)
            assert got.tolist() == want.tolist()
    said = [w for w in caught if "native CPU product is unavailable" in str(w.message)]
    assert len(said) == 1
    assert ("SPECDEC_NATIVE=0" if why == "env" else "false failed") in str(said[0].message)
    assert native.load() is None


def test_generate_equal_under_the_native_product(product):
    target = tiny_llama(seed=1, layers=2, hidden=48)
    ids = torch.tensor([[5, 9, 2, 5, 9, 2, 7, 1], [0, 0, 3, 4, 3, 4, 3, 4]])
    mask = (ids != 0).long()
    want = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=16, pad_token_id=0,
                           eos_token_id=None)
    for backend in ("auto", "skinny"):
        got = specdec.generate(target, ids, PromptLookup(k=4), attention_mask=mask, max_new_tokens=16,
                               eos_token_id=None, pad_token_id=0, linear_backend=backend)
        assert got.tolist() == want.tolist()
