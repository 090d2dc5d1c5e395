"""Tree attention: the Triton kernel (under TRITON_INTERPRET=1 on CPU) equals the torch
reference within the precision rule (at most ~2x torch's own error against float64, as in
flash-attention's tests), and every root-to-leaf path equals plain causal attention: SDPA, or
transformers' own eager attention (Gemma-2 softcap, gpt-oss sinks) under transformers' own
sliding-window / chunked mask functions over the plain sequence prefix + path.

The trees, positions and ragged rows are built here (no import of ``specdec``: the kernels
package stands alone)."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.masking_utils import (
    and_masks,
    causal_mask_function,
    chunked_overlay,
    sliding_window_causal_mask_function,
)
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager

from specdec_kernels.tree_attention import (
    dense_tree_mask,
    pack_tree_mask,
    tree_attention,
    tree_attention_reference,
    unpack_tree_mask,
)
from specdec_kernels.tree_attention.kernel import _tanh
from specdec_kernels.tree_attention.ops import kernel_available

needs_kernel = pytest.mark.skipif(
    not kernel_available(torch.device("cpu")), reason="set TRITON_INTERPRET=1 to run the kernel on CPU"
)


# ---- trees, ragged rows, positions -------------------------------------------------------------

def random_parents(T: int, gen: torch.Generator) -> list[int]:
    """A random forest: node i's parent is in [-1, i) (-1: a root)."""
    return [int(torch.randint(-1, i, (), generator=gen)) if i else -1 for i in range(T)]


def ancestors(parents: list[int]) -> torch.Tensor:
    """``(T, T)`` bool ancestor-or-self mask."""
    T = len(parents)
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return mask


def root_to_leaf_paths(parents: list[int]) -> list[list[int]]:
    leaves = sorted(set(range(len(parents))) - set(parents))
    paths = []
    for leaf in leaves:
        path, j = [], leaf
        while j >= 0:
            path.append(j)
            j = parents[j]
        paths.append(path[::-1])
    return paths


def make_case(B, H, Hk, T, S, Dk, Dv, dtype, seed, Tk=None, shuffle=False, ranges=None):
    """Ragged rows (left padding, garbage after each row's end), random trees, and position ids:
    row b's prefix counts from a random offset (a cache that dropped older tokens), tree node j
    sits at offset + prefix length + depth; ``shuffle`` permutes the prefix's slots (a rolling buffer);
    ``ranges`` = (starts, ends) fixes the prefix ranges."""
    Tk = T if Tk is None else Tk
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, Dk, generator=gen).to(dtype)
    k = torch.randn(B, Hk, S + Tk, Dk, generator=gen).to(dtype)
    v = torch.randn(B, Hk, S + Tk, Dv, generator=gen).to(dtype)
    start = torch.randint(0, S // 2 + 1, (B,), generator=gen)
    end = torch.stack([torch.randint(int(s), S + 1, (), generator=gen) for s in start])
    if ranges is not None:
        start, end = torch.tensor(ranges[0]), torch.tensor(ranges[1])
    parents = [random_parents(Tk, gen) for _ in range(B)]
    full = torch.stack([ancestors(p) for p in parents])  # (B, Tk, Tk)
    k_positions = torch.randint(-50, 50, (B, S + Tk), generator=gen)  # junk outside the visible range
    for b in range(B):
        n, offset = int(end[b] - start[b]), int(torch.randint(0, 20, (), generator=gen))
        slots = torch.arange(n)[torch.randperm(n, generator=gen)] if shuffle else torch.arange(n)
        k_positions[b, int(start[b]):int(end[b])] = offset + slots
        k_positions[b, S:] = offset + n + full[b].sum(1) - 1  # depth
    return SimpleNamespace(q=q, k=k, v=v, start=start, end=end, mask=full[:, Tk - T:], parents=parents,
                           k_positions=k_positions, q_positions=k_positions[:, S + Tk - T:], S=S)


def run(case, backend="triton", dtype=None, **kw):
    """tree_attention on ``case`` (optionally cast to ``dtype``; sinks take the inputs' dtype)."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    if kw.get("sinks") is not None:
        kw["sinks"] = kw["sinks"].to(dtype or case.q.dtype)
    args = (cast(case.q), cast(case.k), cast(case.v), case.start, case.end, case.mask)
    kw.update(q_positions=case.q_positions, k_positions=case.k_positions)
    if backend == "reference":  # directly: tree_attention takes no float64
        return tree_attention_reference(*args, kw.pop("scale", None), kw.pop("dense_mask", None), **kw)
    return tree_attention(*args, backend=backend, **kw)


def errors(case, **kw):
    """(kernel, torch-at-the-same-precision) max error against the float64 reference."""
    exact = run(case, "reference", torch.float64, **kw)
    kernel = run(case, "triton", **kw)
    torch_same = run(case, "reference", **kw)
    assert kernel.dtype == case.q.dtype and kernel.shape == (*case.q.shape[:3], case.v.shape[3])
    return (kernel.double() - exact).abs().max().item(), (torch_same.double() - exact).abs().max().item()


# ---- plain attention on one path, computed independently ---------------------------------------

def path_attention(case, b, path, sliding_window=None, chunk_size=None, softcap=None, sinks=None, scale=None):
    """Prefix + path as a plain left-to-right sequence at positions offset + index: transformers'
    mask functions on that sequence, then SDPA or transformers' own eager attention."""
    start, end, S = int(case.start[b]), int(case.end[b]), case.S
    keys = torch.cat([torch.arange(start, end), S + torch.tensor(path)])
    n, L = end - start, len(path)
    offset = int(case.k_positions[b, S + path[0]]) - n  # the root's position is offset + n
    kv_idx = torch.arange(n + L)[None, :]
    q_idx = (n + torch.arange(L))[:, None]  # cache positions of the path's queries
    if sliding_window is not None:
        mask_fn = sliding_window_causal_mask_function(sliding_window)
    else:
        mask_fn = causal_mask_function
    if chunk_size is not None:  # positions are offset + idx: left_padding = -offset
        mask_fn = and_masks(mask_fn, chunked_overlay(chunk_size, torch.tensor([-offset])))
    allowed = mask_fn(torch.tensor(0), torch.tensor(0), q_idx, kv_idx)  # (L, n + L)
    q, kk, vv = case.q[b:b + 1, :, path], case.k[b:b + 1, :, keys], case.v[b:b + 1, :, keys]
    H, Hk = q.shape[1], kk.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed, scale=scale, enable_gqa=H != Hk)[0]
    additive = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill(~allowed, torch.finfo(q.dtype).min)
    module = SimpleNamespace(num_key_value_groups=H // Hk, training=False, head_dim=q.shape[-1], sinks=sinks)
    if sinks is not None:
        assert softcap is None, "gpt-oss has no softcap"
        out, _ = gpt_oss_eager(module, q, kk, vv, additive[None, None], scaling=scale)
    else:
        out, _ = gemma2_eager(module, q, kk, vv, additive[None, None], scaling=scale, softcap=softcap)
    return out[0].transpose(0, 1)  # (H, L, Dv)


FEATURES = {
    "plain": {},
    "window": {"sliding_window": 3},
    "chunk": {"chunk_size": 5},
    "softcap": {"softcap": 0.7},
    "sinks": {"sinks": True},
    "window+softcap": {"sliding_window": 4, "softcap": 1.3},
    "window+sinks": {"sliding_window": 2, "sinks": True},
    "chunk+window": {"chunk_size": 6, "sliding_window": 4},
}


def _features(name, H, seed, dtype=torch.float64):
    kw = dict(FEATURES[name])
    if kw.get("sinks"):
        kw["sinks"] = torch.randn(H, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype) * 2
    return kw


# ---- tests --------------------------------------------------------------------------------------

def test_pack_roundtrip():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 70, 70, generator=gen) > 0.5
    bits = pack_tree_mask(mask)
    assert bits.shape == (3, 70, 3) and bits.dtype == torch.int32
    assert torch.equal(unpack_tree_mask(bits, 70), mask)


def test_reference_on_a_hand_made_case():
    """One query, no prefix, a root-and-child tree: the child averages the two values."""
    q = torch.zeros(1, 1, 2, 4)
    k = torch.zeros(1, 1, 2, 4)
    v = torch.tensor([[[[1.0, 0, 0, 0], [3.0, 0, 0, 0]]]])
    mask = torch.tensor([[[True, False], [True, True]]])
    out = tree_attention_reference(q, k, v, torch.tensor([0]), torch.tensor([0]), mask)
    assert out[0, 0, :, 0].tolist() == [1.0, 2.0]


def _one_query_case(prefix_positions, query_position):
    """Prefix keys at the given positions, one tree node (the query) at ``query_position``;
    q = 0, so the output is the mean of the visible keys' values, value j = j."""
    S = len(prefix_positions)
    q, k = torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, S + 1, 16)
    v = torch.zeros(1, 1, S + 1, 16)
    v[0, 0, :, 0] = torch.arange(S + 1, dtype=torch.float32)
    k_positions = torch.tensor([[*prefix_positions, query_position]])
    return q, k, v, torch.tensor([0]), torch.tensor([S]), torch.ones(1, 1, 1, dtype=torch.bool), k_positions


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_kernel)])
def test_window_boundary(backend):
    """W = 3, query at position 9: the key 2 (= W-1) back is visible, the key 3 (= W) back is not,
    as transformers' ``kv_idx > q_idx - sliding_window``; positions, not slots, count."""
    prefix = [5, 6, 7, 8, 30, 2]  # slot order is not position order; 30 is past the query (caller's business)
    q, k, v, start, end, mask, kpos = _one_query_case(prefix, 9)
    dense = dense_tree_mask(start, end, mask, len(prefix), k_positions=kpos, sliding_window=3)
    assert dense[0, 0].tolist() == [False, False, True, True, True, False, True]  # positions 7, 8, 30, 9
    hf = sliding_window_causal_mask_function(3)(0, 0, torch.tensor(9), torch.tensor([6, 7, 8, 9]))
    assert hf.tolist() == [False, True, True, True]  # transformers agrees: 6 (W back) out, 7 (W-1 back) in
    out = tree_attention(q, k, v, start, end, mask, backend=backend, k_positions=kpos, sliding_window=3)
    assert out[0, 0, 0, 0].item() == pytest.approx((2 + 3 + 4 + 6) / 4)
    wide = tree_attention(q, k, v, start, end, mask, backend=backend, k_positions=kpos, sliding_window=4)
    assert wide[0, 0, 0, 0].item() == pytest.approx((1 + 2 + 3 + 4 + 6) / 5)  # W + 1 lets position 6 in


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_kernel)])
def test_chunk_boundary(backend):
    """C = 4: position 8 starts a chunk, so a query at 9 sees 8 and itself; negative positions
    floor (-1 is in the chunk [-4, 0)), as transformers' ``//``."""
    q, k, v, start, end, mask, kpos = _one_query_case([6, 7, 8, 3, 11, 12], 9)
    dense = dense_tree_mask(start, end, mask, 6, k_positions=kpos, chunk_size=4)
    assert dense[0, 0].tolist() == [False, False, True, False, True, False, True]
    out = tree_attention(q, k, v, start, end, mask, backend=backend, k_positions=kpos, chunk_size=4)
    assert out[0, 0, 0, 0].item() == pytest.approx((2 + 4 + 6) / 3)
    q, k, v, start, end, mask, kpos = _one_query_case([-5, -4, -3, 0, -1, 1], -1)
    hf = chunked_overlay(4, torch.tensor([0]))(0, 0, torch.tensor(-1), torch.tensor([-5, -4, -3, 0, -1, 1]))
    dense = dense_tree_mask(start, end, mask, 6, k_positions=kpos, chunk_size=4)
    assert dense[0, 0, :6].tolist() == hf.tolist() == [False, True, True, False, True, False]
    out = tree_attention(q, k, v, start, end, mask, backend=backend, k_positions=kpos, chunk_size=4)
    assert out[0, 0, 0, 0].item() == pytest.approx((1 + 2 + 4 + 6) / 4)


def test_softcap_and_sinks_are_transformers_eager():
    """No tree, a causal sequence: the reference equals Gemma-2's and gpt-oss's eager attention."""
    gen = torch.Generator().manual_seed(3)
    B, H, Hk, L, Dk, Dv = 2, 4, 2, 6, 16, 8
    q, k, v = torch.randn(B, H, L, Dk, generator=gen), torch.randn(B, Hk, L, Dk, generator=gen), torch.randn(
        B, Hk, L, Dv, generator=gen)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    mask = causal[None].expand(B, -1, -1)
    additive = torch.zeros(L, L).masked_fill(~causal, torch.finfo(torch.float32).min)[None, None]
    module = SimpleNamespace(num_key_value_groups=2, training=False, head_dim=Dk, sinks=torch.randn(H, generator=gen))
    zero = torch.zeros(B, dtype=torch.long)
    for softcap in (0.5, 5.0):
        ours = tree_attention_reference(q, k, v, zero, zero, mask, scale=0.3, softcap=softcap)
        hf, _ = gemma2_eager(module, q, k, v, additive, scaling=0.3, softcap=softcap)
        torch.testing.assert_close(ours, hf.transpose(1, 2))
    ours = tree_attention_reference(q, k, v, zero, zero, mask, scale=0.3, sinks=module.sinks)
    hf, _ = gpt_oss_eager(module, q, k, v, additive, scaling=0.3)
    torch.testing.assert_close(ours, hf.transpose(1, 2))


F32_SOFTMAX = {"atol": 1e-6, "rtol": 1e-6}


def _check_paths(case, name, kernel: bool):
    H = case.q.shape[1]
    kw = _features(name, H, 0)
    ref = run(case, "reference", torch.float64, **kw)
    out = run(case, "triton", **kw) if kernel else None
    for b, parents in enumerate(case.parents):
        for path in root_to_leaf_paths(parents):
            plain = path_attention(SimpleNamespace(**{**vars(case), "q": case.q.double(), "k": case.k.double(),
                                                      "v": case.v.double()}), b, path, **kw)
            # transformers' Gemma-2 eager attention (the softcap comparator) takes its softmax in float32
            # whatever the input dtype, so there float64 agreement ends at float32's rounding (seen: 2.7e-7)
            torch.testing.assert_close(ref[b, :, path], plain, **F32_SOFTMAX if kw.get("softcap") else {})
            if kernel:
                torch.testing.assert_close(out[b, :, path].double(), plain, atol=2e-5, rtol=1e-4)


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(sorted(FEATURES)), B=st.integers(1, 3), Hk=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 3]), T=st.integers(1, 12), S=st.integers(0, 30), seed=st.integers(0, 2**16),
)
def test_each_path_is_plain_attention_reference(name, B, Hk, group, T, S, seed):
    """The reference (float64) on a path's nodes equals plain attention over prefix + that path."""
    _check_paths(make_case(B, Hk * group, Hk, T, S, 16, 8, torch.float32, seed), name, kernel=False)


@needs_kernel
@pytest.mark.parametrize("name", sorted(FEATURES))
def test_each_path_is_plain_attention_kernel(name):
    """The kernel (float32) likewise: ragged rows, GQA, Dk != Dv, a forest of random trees."""
    _check_paths(make_case(3, 4, 2, 10, 37, 24, 16, torch.float32, seed=len(name)), name, kernel=True)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("Dk", "Dv", "name"), [(64, 64, "window+softcap"), (128, 128, "sinks"),
                                                 (192, 128, "window"), (24, 16, "chunk+window")])
def test_kernel_matches_reference_dtypes_and_head_dims(dtype, Dk, Dv, name):
    case = make_case(2, 4, 2, 9, 37, Dk, Dv, dtype, seed=Dk + Dv)
    kernel_err, torch_err = errors(case, **_features(name, 4, Dk))
    assert kernel_err <= 2 * torch_err + 1e-6, (kernel_err, torch_err)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_kernel_matches_reference_plain_head_dims(dtype, D):
    kernel_err, torch_err = errors(make_case(2, 4, 2, 9, 37, D, D, dtype, seed=D))
    assert kernel_err <= 2 * torch_err + 1e-6, (kernel_err, torch_err)


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 3), Hk=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 3]), T=st.integers(1, 40),
    S=st.integers(0, 90), dims=st.sampled_from([(16, 16), (24, 16), (16, 40), (8, 12)]),
    window=st.one_of(st.none(), st.integers(1, 40)), chunk=st.one_of(st.none(), st.integers(1, 40)),
    softcap=st.one_of(st.none(), st.floats(0.2, 20.0)), sinks=st.booleans(), shuffle=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference_random(B, Hk, group, T, S, dims, window, chunk, softcap, sinks, shuffle, seed):
    """Random shapes and features; long prefixes with small windows skip whole blocks."""
    H = Hk * group
    case = make_case(B, H, Hk, T, S, *dims, torch.float32, seed, shuffle=shuffle)
    kw = {"sliding_window": window, "chunk_size": chunk, "softcap": softcap,
          "sinks": torch.randn(H, generator=torch.Generator().manual_seed(seed)) if sinks else None}
    kernel_err, torch_err = errors(case, **kw)
    assert kernel_err <= 2 * torch_err + 1e-6, (kernel_err, torch_err)


@needs_kernel
@pytest.mark.parametrize("shuffle", [False, True])
def test_kernel_matches_reference_long_prefix_small_window(shuffle):
    """A 90-key prefix, in order or in a rolling buffer's order, a window of 4 or 1 or chunks of 3."""
    case = make_case(2, 2, 1, 5, 90, 16, 16, torch.float32, seed=11, shuffle=shuffle, ranges=([0, 3], [90, 88]))
    for kw in ({"sliding_window": 4}, {"sliding_window": 1}, {"chunk_size": 3, "sinks": torch.zeros(2)}):
        kernel_err, torch_err = errors(case, **kw)
        assert kernel_err <= 2 * torch_err + 1e-6, (kw, kernel_err, torch_err)


@needs_kernel
@pytest.mark.parametrize("kw", [{"sliding_window": 8}, {"chunk_size": 16}], ids=["window", "chunk"])
def test_kernel_reads_no_block_outside_the_window(kw):
    """Prefix blocks (32 keys) that no query's window or chunk reaches are skipped: NaN there does not
    reach the output (a masked block that was read would give 0 * NaN)."""
    S, T = 96, 4
    q, k, v = torch.randn(1, 2, T, 16), torch.randn(1, 1, S + T, 16), torch.randn(1, 1, S + T, 16)
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None]  # a chain at positions 96..99
    k_positions = torch.arange(S + T)[None]
    start, end = torch.tensor([0]), torch.tensor([S])
    expected = tree_attention_reference(q, k, v, start, end, mask, k_positions=k_positions, **kw)
    k[:, :, :64], v[:, :, :64] = float("nan"), float("nan")  # positions 0..63: outside every window / chunk
    out = tree_attention(q, k, v, start, end, mask, backend="triton", k_positions=k_positions, **kw)
    torch.testing.assert_close(out, expected)


@needs_kernel
def test_kernel_reads_nothing_past_the_head_dims():
    """Dk = 24, Dv = 12 padded to 32 and 16: q, k, v are views into wider tensors whose extra
    columns are NaN, which must not be read (0 * NaN would reach the output)."""
    case = make_case(2, 4, 2, 6, 19, 24, 12, torch.float32, seed=4)
    expected = run(case, "reference", sliding_window=5, softcap=2.0)
    wide = {}
    for name in ("q", "k", "v"):
        t = getattr(case, name)
        padded = torch.full((*t.shape[:3], 40), float("nan"))
        padded[..., :t.shape[3]] = t
        wide[name] = padded[..., :t.shape[3]]
    out = run(SimpleNamespace(**{**vars(case), **wide}), "triton", sliding_window=5, softcap=2.0)
    torch.testing.assert_close(out, expected)


@triton.jit
def _tanh_kernel(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, _tanh(tl.load(X + offs)))


@needs_kernel
def test_kernel_tanh_is_within_two_ulps():
    """The softcap's tanh (exp and a Taylor series: the interpreter has no libdevice) against float64."""
    x = torch.cat([torch.linspace(-30, 30, 2048), torch.logspace(-8, 0.5, 1024), -torch.logspace(-8, 0.5, 1024)])
    y = torch.empty_like(x)
    _tanh_kernel[(1,)](x, y, N=x.numel())
    exact = torch.tanh(x.double())
    ulps = (y.double() - exact).abs() / (exact.abs().float().double() * 2.0**-23)
    assert ulps.max() <= 2.0, ulps.max()


@needs_kernel
def test_kernel_queries_are_the_last_nodes():
    """Tk > T: the queries are the newest T of Tk tree nodes (a drafter growing its tree level by
    level); q_positions default to the last T key positions."""
    case = make_case(2, 4, 2, 5, 21, 32, 32, torch.float32, seed=5, Tk=13)
    for kw in ({}, {"sliding_window": 3, "softcap": 2.0}, {"chunk_size": 4, "sinks": torch.randn(4)}):
        kernel_err, torch_err = errors(case, **kw)
        assert kernel_err <= 2 * torch_err + 1e-6, (kw, kernel_err, torch_err)
    explicit = run(case, "triton", sliding_window=3)
    default = tree_attention(case.q, case.k, case.v, case.start, case.end, case.mask, backend="triton",
                             k_positions=case.k_positions, sliding_window=3)
    assert torch.equal(explicit, default)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_kernel)])
def test_a_wrong_setting_gives_a_different_answer(backend):
    """W + 1, another chunk size, no softcap, no sinks: each changes the output, so the tests
    above can fail; the path reference catches the wrong window."""
    case = make_case(2, 4, 2, 6, 20, 16, 16, torch.float32, seed=9, ranges=([0, 4], [20, 17]))
    sinks = torch.full((4,), 1.0)
    pairs = [({"sliding_window": 3}, {"sliding_window": 4}), ({"chunk_size": 4}, {"chunk_size": 5}),
             ({"softcap": 0.5}, {}), ({"sinks": sinks}, {})]
    for right, wrong in pairs:
        a, b = run(case, backend, **right), run(case, backend, **wrong)
        assert (a - b).abs().max() > 1e-3, (right, wrong)
    b, path = 0, root_to_leaf_paths(case.parents[0])[0]
    plain = path_attention(case, b, path, sliding_window=3)
    torch.testing.assert_close(run(case, backend, sliding_window=3)[b, :, path], plain, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(run(case, backend, sliding_window=4)[b, :, path], plain, atol=1e-3)


def test_dense_mask_is_built_once_per_setting():
    """One dense mask per (window, chunk), reused by every layer of that kind, gives what building
    it inside each call gives."""
    case = make_case(2, 4, 2, 7, 25, 16, 8, torch.float32, seed=2)
    for kw in ({"sliding_window": 5}, {"chunk_size": 8}, {}):
        dense = dense_tree_mask(case.start, case.end, case.mask, case.S, q_positions=case.q_positions,
                                k_positions=case.k_positions, **kw)
        for softcap in (None, 3.0):  # two "layers"
            built = run(case, "reference", softcap=softcap, **kw)
            reused = run(case, "reference", softcap=softcap, dense_mask=dense, **kw)
            assert torch.equal(built, reused)
    plain = dense_tree_mask(case.start, case.end, case.mask, case.S)
    assert torch.equal(plain, dense_tree_mask(case.start, case.end, case.mask, case.S, k_positions=case.k_positions))


def test_bad_inputs_raise():
    case = make_case(1, 4, 2, 3, 5, 16, 16, torch.float32, 0)
    q, k, v, start, end, mask, kpos = case.q, case.k, case.v, case.start, case.end, case.mask, case.k_positions
    with pytest.raises(ValueError, match="multiple of KV heads"):
        tree_attention(q[:, :3], k, v, start, end, mask)
    with pytest.raises(ValueError, match="tree_mask"):
        tree_attention(q, k, v, start, end, mask.float())
    with pytest.raises(ValueError, match="prefix ranges"):
        tree_attention(q, k, v, start, torch.tensor([6]), mask)
    with pytest.raises(ValueError, match="backend 'cuda'"):
        tree_attention(q, k, v, start, end, mask, backend="cuda")
    with pytest.raises(ValueError, match=r"Dk=16 \(q's head dim\)"):
        tree_attention(q, k[..., :8], v, start, end, mask)
    with pytest.raises(ValueError, match=r"only the head dim may differ \(Dv=16, Dk=16\)"):
        tree_attention(q, k, v[:, :1], start, end, mask)
    with pytest.raises(ValueError, match=r"sliding_window=4 needs k_positions \(B, S \+ Tk\) = \(1, 8\)"):
        tree_attention(q, k, v, start, end, mask, sliding_window=4)
    with pytest.raises(ValueError, match="chunk_size=8 needs k_positions"):
        dense_tree_mask(start, end, mask, 5, chunk_size=8)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match=f"sliding_window={bad!r} must be a positive int"):
            tree_attention(q, k, v, start, end, mask, k_positions=kpos, sliding_window=bad)
    with pytest.raises(ValueError, match=r"k_positions \(1, 7\) torch.int64 must be integer \(B, S \+ Tk\) = \(1, 8\)"):
        tree_attention(q, k, v, start, end, mask, k_positions=kpos[:, 1:], sliding_window=4)
    with pytest.raises(ValueError, match=r"q_positions \(1, 2\) torch.int64 must be integer \(B, T\) = \(1, 3\)"):
        tree_attention(q, k, v, start, end, mask, q_positions=kpos[:, :2], k_positions=kpos, chunk_size=4)
    with pytest.raises(ValueError, match="q_positions differ from the last T of k_positions"):
        tree_attention(q, k, v, start, end, mask, q_positions=case.q_positions + 1, k_positions=kpos, chunk_size=4)
    with pytest.raises(ValueError, match="softcap=0.0 must be a positive float"):
        tree_attention(q, k, v, start, end, mask, softcap=0.0)
    with pytest.raises(ValueError, match=r"sinks \(2,\) must be a float tensor \(H,\) = \(4,\)"):
        tree_attention(q, k, v, start, end, mask, sinks=torch.zeros(2))


@needs_kernel
def test_kernel_refuses_head_dims_past_256():
    case = make_case(1, 2, 1, 2, 3, 16, 320, torch.float32, 0)
    with pytest.raises(ValueError, match=r"Dk=16, Dv=320: the Triton kernel takes head dims up to 256"):
        run(case, "triton")


_COMPILE_FOR_HOPPER = """
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from specdec_kernels.tree_attention.kernel import _tree_attention_fwd as fn

for dtype, dk, dv, window, chunk, softcap, sinks, ieee in [
    ("*bf16", 128, 128, False, False, False, False, False), ("*bf16", 192, 128, True, True, True, True, False),
    ("*fp16", 24, 16, True, False, False, True, False), ("*fp32", 64, 64, False, True, True, False, True),
]:
    bdk, bdv = (max(16, triton.next_power_of_2(d)) for d in (dk, dv))
    consts = dict(GROUP=2, BLOCK_M=32, BLOCK_N=32 if max(bdk, bdv) <= 64 else 16, HEAD_DK=dk, HEAD_DV=dv,
                  BLOCK_DK=bdk, BLOCK_DV=bdv, IEEE=ieee, HAS_WINDOW=window, HAS_CHUNK=chunk, HAS_SOFTCAP=softcap,
                  HAS_SINKS=sinks)
    kinds = {"Q": dtype, "K": dtype, "V": dtype, "O": dtype, "START": "*i32", "END": "*i32", "BITS": "*i32",
             "QPOS": "*i64", "KPOS": "*i64", "SINKS": "*fp32", "scale": "fp32", "softcap": "fp32"}
    sig = {n: "constexpr" if n in consts else kinds.get(n, "i32") for n in inspect.signature(fn.fn).parameters}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
print("compiled")
"""


def test_kernel_compiles_for_hopper():
    """No GPU needed: the kernel, each feature on, compiles to a cubin for sm_90 (the interpreter
    runs Python and would not catch what the compiler refuses)."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no CUDA backend")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
