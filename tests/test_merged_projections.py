"""Merged projections (specdec/backends/cpu_linear.py's Group, native.py's ``many``): a layer's q/k/v and gate/up
products in one native call, each output to the bit the product of its own weight, taken only inside a routed call
with the native library, for members called in step on one input; everything else as before."""

import threading

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import specdec
from specdec import PromptLookup
from specdec.backends import cpu_linear, native
from specdec.backends.cpu_linear import Route, install_linears, routed, uninstall_linears

from architectures import tiny_config
from concurrency import interleaved
from conftest import tiny_llama


@pytest.fixture(scope="module")
def library(native_library):
    return native_library


class Counting:
    """The native library, counting its products: ``many`` calls by their number of weights, single ones by rows."""

    def __init__(self, library) -> None:
        self.library = library
        self.many_calls: list[int] = []
        self.single_calls = 0
        self.lock = threading.Lock()

    def __call__(self, *args):
        with self.lock:
            self.single_calls += 1
        return self.library(*args)

    def many(self, x, weights, biases):
        with self.lock:
            self.many_calls.append(len(weights))
        return self.library.many(x, weights, biases)

    def rms_norm(self, *args):
        return self.library.rms_norm(*args)

    def rope(self, *args):
        return self.library.rope(*args)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", range(1, native.MAX_ROWS + 1))
def test_many_is_each_product_to_the_bit(library, rows, threads):
    """Every weight's rows come out as the single product computes them, whatever the weights' sizes (odd ones,
    ones under a thread's share, the default's q/k/v and gate/up) and however the rows are shared among threads."""
    generator = torch.Generator().manual_seed(rows)
    own = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for width, outs in [(576, (576, 192, 192)), (576, (1536, 1536)), (33, (7, 64, 5)), (16, (3,)),
                            (40, (1, 2, 3, 130))]:
            x = torch.randn(rows, width, generator=generator)
            weights = [torch.randn(o, width, generator=generator) for o in outs]
            biases = [torch.randn(o, generator=generator) if i % 2 else None for i, o in enumerate(outs)]
            got = library.many(x, weights, biases)
            assert [g.shape for g in got] == [(rows, o) for o in outs]
            for g, w, b in zip(got, weights, biases):
                assert torch.equal(g, library(x, w, b))
    finally:
        torch.set_num_threads(own)


def test_a_wrong_merge_fails_the_bit_check(library):
    """The check above can fail: the rows of a neighbouring weight, or a sum in another order, are not equal."""
    x, w = torch.randn(2, 576), torch.randn(576 + 192, 576)
    q, k = library.many(x, [w[:576], w[576:]], [None, None])
    assert not torch.equal(k, library(x, w[:192]))
    assert not torch.equal(q, nn.functional.linear(x, w[:576]))  # F.linear's order differs from the kernel's


def test_rows_out_of_range_are_refused(library):
    with pytest.raises(ValueError, match="takes 1..8"):
        library.many(torch.randn(native.MAX_ROWS + 1, 16), [torch.randn(4, 16)], [None])


def grouped(model) -> list[tuple[str, ...]]:
    """The names of the layers of each installed group."""
    names = {m: n for n, m in model.named_modules()}
    groups = {vars(m)["forward"].group for m in model.modules() if getattr(vars(m).get("forward"), "group", None)}
    return sorted(tuple(names[m] for m in g.layers) for g in groups)


@pytest.mark.parametrize("name,attention,mlp", [("llama", True, True), ("qwen2", True, True),
                                                ("phi3", False, False), ("gpt2", False, False)])
def test_groups_where_the_layers_are_llamas(name, attention, mlp):
    """Phi-3 has one qkv_proj and one gate_up_proj already; GPT-2 its own Conv1D layers: nothing to group."""
    model = AutoModelForCausalLM.from_config(tiny_config(name))
    layers = model.config.num_hidden_layers
    install_linears(model)
    install_linears(model)  # idempotent
    found = grouped(model)
    want = ([("model.layers.%d.self_attn.q_proj" % i, "model.layers.%d.self_attn.k_proj" % i,
              "model.layers.%d.self_attn.v_proj" % i) for i in range(layers)] if attention else [])
    want += ([("model.layers.%d.mlp.gate_proj" % i, "model.layers.%d.mlp.up_proj" % i) for i in range(layers)]
             if mlp else [])
    assert found == sorted(want)
    assert cpu_linear.is_installed(model)  # GPT-2's output head at least
    uninstall_linears(model)
    assert not grouped(model) and not cpu_linear.is_installed(model)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("tokens", [1, 2, 5, native.MAX_ROWS, native.MAX_ROWS + 1])
def test_merged_forward_is_the_unmerged_one_to_the_bit(library, name, tokens):
    """A routed forward with merged groups equals the same route without them, logits and every layer's output to
    the bit, with 2 merged products a layer (q/k/v, gate/up) up to the native row limit and none past it."""
    if name == "llama":
        model = tiny_llama(seed=5, layers=3, hidden=48)
    else:
        model = AutoModelForCausalLM.from_config(tiny_config(name)).eval()  # q/k/v with biases
    layers = model.config.num_hidden_layers
    install_linears(model)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    with torch.inference_mode():
        plain = Counting(library)
        with routed(Route(None, plain, merged=False)):
            want = model(ids, output_hidden_states=True)
        counting = Counting(library)
        with routed(Route(None, counting)):
            got = model(ids, output_hidden_states=True)
    uninstall_linears(model)
    assert torch.equal(got.logits, want.logits)
    assert all(torch.equal(g, w) for g, w in zip(got.hidden_states, want.hidden_states))
    assert not plain.many_calls
    if tokens <= native.MAX_ROWS:
        assert counting.many_calls == [3, 2] * layers
        assert counting.single_calls == 2 * layers + 1  # o_proj, down_proj, the output head
        assert plain.single_calls == 7 * layers + 1
    else:
        assert not counting.many_calls and not counting.single_calls


class Projections(nn.Module):
    """q/k/v and gate/up by the Llama names, called as ``forward`` says: out of step, on different inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(24, 40), nn.Linear(24, 16), nn.Linear(24, 16)
        self.gate_proj, self.up_proj = nn.Linear(24, 50, bias=False), nn.Linear(24, 50, bias=False)


@pytest.mark.parametrize("inference", [False, True])
def test_members_called_out_of_step_get_their_own_products(library, inference):
    """Different inputs, another order, a member skipped, the input changed in place between members: each call's
    output is its own layer's product of its own input, the group falls back for the rest of the call, and a new
    call merges again."""
    block = Projections()
    x, y = torch.randn(3, 24), torch.randn(3, 24)
    single = {n: (lambda m: lambda t: library(t, m.weight, m.bias))(m) for n, m in block.named_children()}
    install_linears(block)
    counting = Counting(library)
    mode = torch.inference_mode() if inference else torch.no_grad()
    with mode, routed(Route(None, counting)):
        x, y = x.clone(), y.clone()  # inference tensors under inference_mode (no version counter)
        assert torch.equal(block.v_proj(x), single["v_proj"](x))  # v first: it leads
        assert torch.equal(block.q_proj(x), single["q_proj"](x))  # served from the merged product
        assert torch.equal(block.k_proj(y), single["k_proj"](y))  # another input: its own product
        assert counting.many_calls == [3]
        assert torch.equal(block.q_proj(x), single["q_proj"](x))
        assert torch.equal(block.k_proj(x), single["k_proj"](x))
        assert counting.many_calls == [3]  # the group merges no more in this call
        assert torch.equal(block.gate_proj(x), single["gate_proj"](x))
        if not inference:  # a write the version counter sees
            x.mul_(2)
            assert torch.equal(block.up_proj(x), single["up_proj"](x))
            assert counting.many_calls == [3, 2]
    with torch.no_grad(), routed(Route(None, counting)):
        for name in ("q_proj", "k_proj", "v_proj"):
            assert torch.equal(getattr(block, name)(y), single[name](y))
    assert counting.many_calls == [3, 2, 3]
    uninstall_linears(block)


def test_outside_a_merging_route_nothing_changes(library):
    """Outside a routed call: F.linear; a route with no native library, or one without ``many`` (a bare product),
    or a gradient to record: each layer its own product."""
    model = tiny_llama(seed=6, layers=2, hidden=48)
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.inference_mode():
        want = model(ids).logits
        install_linears(model)
        assert torch.equal(model(ids).logits, want)
        with routed(Route(None)):
            torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
        with routed(Route(None, library.__call__)):  # a bound method: no ``many``
            bare = model(ids).logits
        with routed(Route(None, library, fused=False)):  # the same, merged (the model's own norms, as the bare one)
            assert torch.equal(model(ids).logits, bare)
    counting = Counting(library)
    with routed(Route(None, counting)):
        model(ids).logits.sum().backward()
    assert not counting.many_calls and not counting.single_calls
    assert model.model.layers[0].self_attn.k_proj.weight.grad is not None
    uninstall_linears(model)


def test_threads_sharing_a_route_keep_their_own_outputs(library):
    """One route used from several threads at once (switching every 10 us, inside a layer's q/k/v calls): each
    thread's forward is the single-threaded one."""
    model = tiny_llama(seed=7, layers=2, hidden=48)
    install_linears(model)
    inputs = [torch.tensor([[i + 3, 9, 2, i]]) for i in range(3)]
    counting = Counting(library)
    route = Route(None, counting)
    with torch.inference_mode(), routed(Route(None, library, merged=False)):
        want = [model(ids).logits for ids in inputs]
    failures = []

    def worker(i):
        with torch.inference_mode(), routed(route):
            for _ in range(5):
                if not torch.equal(model(inputs[i]).logits, want[i]):
                    failures.append(i)

    interleaved(worker, range(3))
    uninstall_linears(model)
    assert not failures and not route.unmerged
    assert sorted(counting.many_calls) == [2] * 2 * 3 * 5 + [3] * 2 * 3 * 5  # 2 layers, 3 threads, 5 forwards


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_generate_equal_with_merged_projections(library, name, monkeypatch, tmp_path):
    """Greedy output of the engine, with the merged products taken (counted), equals model.generate, for a chain
    and a left-padded batch; with SPECDEC_NATIVE=0 (no native library) it takes none and is the same."""
    counting = Counting(library)
    monkeypatch.setattr(native, "load", lambda: counting)
    if name == "llama":
        target = tiny_llama(seed=1, layers=2, hidden=48)
    else:
        target = AutoModelForCausalLM.from_config(tiny_config(name)).eval()
    vocab = target.config.vocab_size
    ids = torch.tensor([[5, 9, 2, 5, 9, 2, 7, 1], [0, 0, 3, 4, 3, 4, 3, 4]]) % vocab
    mask = torch.tensor([[1] * 8, [0, 0] + [1] * 6])
    cases = [(ids[:1], mask[:1]), (ids, mask)]
    wants = [target.generate(i, attention_mask=m, do_sample=False, max_new_tokens=16, pad_token_id=0,
                             eos_token_id=None) for i, m in cases]
    for (rows, rows_mask), want in zip(cases, wants):
        got = specdec.generate(target, rows, PromptLookup(k=4), attention_mask=rows_mask, max_new_tokens=16,
                               eos_token_id=None, pad_token_id=0)
        assert got.tolist() == want.tolist()
        assert set(counting.many_calls) == {2, 3}  # taken in this call (a chain: every step up to 8 rows)
        counting.many_calls.clear()
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    monkeypatch.setenv("SPECDEC_NATIVE", "0")
    monkeypatch.setattr(native, "load", native._Loader())
    with pytest.warns(RuntimeWarning, match="SPECDEC_NATIVE=0"):
        for (rows, rows_mask), want in zip(cases, wants):
            got = specdec.generate(target, rows, PromptLookup(k=4), attention_mask=rows_mask, max_new_tokens=16,
                                   eos_token_id=None, pad_token_id=0)
            assert got.tolist() == want.tolist()
