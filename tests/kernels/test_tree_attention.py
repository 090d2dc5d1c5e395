"""Tree attention: the Triton kernel (under TRITON_INTERPRET=1 on CPU) equals the torch
reference within the precision rule (at most ~2x torch's own error against float64, as in
flash-attention's tests), and every root-to-leaf path equals plain causal attention."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.tree import DraftTree
from specdec_kernels.tree_attention import (
    pack_tree_mask,
    tree_attention,
    tree_attention_reference,
    unpack_tree_mask,
)
from specdec_kernels.tree_attention.ops import kernel_available

needs_kernel = pytest.mark.skipif(
    not kernel_available(torch.device("cpu")), reason="set TRITON_INTERPRET=1 to run the kernel on CPU"
)


def random_tree_mask(T: int, gen: torch.Generator) -> torch.Tensor:
    parents = torch.tensor([int(torch.randint(-1, i, (), generator=gen)) if i else -1 for i in range(T)])
    return DraftTree(torch.zeros(T, dtype=torch.long), parents).ancestors


def make_inputs(B, H, Hk, T, S, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=gen).to(dtype)
    k = torch.randn(B, Hk, S + T, D, generator=gen).to(dtype)
    v = torch.randn(B, Hk, S + T, D, generator=gen).to(dtype)
    start = torch.randint(0, S // 2 + 1, (B,), generator=gen)
    end = torch.stack([torch.randint(int(s), S + 1, (), generator=gen) for s in start])
    mask = torch.stack([random_tree_mask(T, gen) for _ in range(B)])
    return q, k, v, start, end, mask


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


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3), Hk=st.sampled_from([1, 2]), group=st.sampled_from([1, 3]), T=st.integers(1, 20),
    S=st.integers(0, 40), seed=st.integers(0, 2**16),
)
def test_each_path_is_causal_attention(B, Hk, group, T, S, seed):
    """Reference tree attention on a path's nodes equals plain causal SDPA over prefix + that path."""
    D, H = 16, Hk * group
    q, k, v, start, end, mask = make_inputs(B, H, Hk, T, S, D, torch.float64, seed)
    out = tree_attention_reference(q, k, v, start, end, mask)
    for b in range(B):
        parents = _parents_from_mask(mask[b])
        for path in DraftTree(torch.zeros(T, dtype=torch.long), parents).paths:
            keys = torch.cat([torch.arange(int(start[b]), int(end[b])), S + path])
            kk = k[b, :, keys].repeat_interleave(group, 0)
            vv = v[b, :, keys].repeat_interleave(group, 0)
            n_prefix = int(end[b] - start[b])
            causal = torch.ones(len(path), len(keys), dtype=torch.bool).tril(n_prefix)
            ref = F.scaled_dot_product_attention(q[b, :, path], kk, vv, attn_mask=causal)
            torch.testing.assert_close(out[b, :, path], ref)


def _parents_from_mask(mask):
    depth = mask.sum(1)
    parents = []
    for i in range(mask.shape[0]):
        anc = [j for j in range(i) if mask[i, j] and depth[j] == depth[i] - 1]
        parents.append(anc[0] if anc else -1)
    return torch.tensor(parents)


def _errors(dtype, B, H, Hk, T, S, D, seed):
    q, k, v, start, end, mask = make_inputs(B, H, Hk, T, S, D, dtype, seed)
    exact = tree_attention_reference(q.double(), k.double(), v.double(), start, end, mask)
    kernel = tree_attention(q, k, v, start, end, mask, backend="triton")
    torch_same_dtype = tree_attention_reference(q, k, v, start, end, mask)
    assert kernel.dtype == dtype and kernel.shape == q.shape
    return (kernel.double() - exact).abs().max().item(), (torch_same_dtype.double() - exact).abs().max().item()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_kernel_matches_reference_dtypes_and_head_dims(dtype, D):
    kernel_err, torch_err = _errors(dtype, B=2, H=4, Hk=2, T=9, S=37, D=D, seed=D)
    assert kernel_err <= 2 * torch_err + 1e-6, (kernel_err, torch_err)


@needs_kernel
@settings(max_examples=12, deadline=None)
@given(
    B=st.integers(1, 3), Hk=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 3]), T=st.integers(1, 40),
    S=st.integers(0, 70), seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference_random_shapes(B, Hk, group, T, S, seed):
    kernel_err, torch_err = _errors(torch.float32, B, Hk * group, Hk, T, S, 16, seed)
    assert kernel_err <= 2 * torch_err + 1e-6, (kernel_err, torch_err)


def test_bad_inputs_raise():
    q, k, v, start, end, mask = make_inputs(1, 4, 2, 3, 5, 16, torch.float32, 0)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        tree_attention(q[:, :3], k, v, start, end, mask)
    with pytest.raises(ValueError, match="tree_mask"):
        tree_attention(q, k, v, start, end, mask.float())
    with pytest.raises(ValueError, match="prefix ranges"):
        tree_attention(q, k, v, start, torch.tensor([6]), mask)
    with pytest.raises(ValueError, match="backend 'cuda'"):
        tree_attention(q, k, v, start, end, mask, backend="cuda")


@needs_kernel
def test_kernel_queries_are_the_last_nodes():
    """Tk > T: the queries are the newest T of Tk tree nodes (a drafter growing its tree level by level)."""
    gen = torch.Generator().manual_seed(5)
    B, H, Hk, Tk, T, S, D = 2, 4, 2, 13, 5, 21, 32
    q = torch.randn(B, H, T, D, generator=gen)
    k = torch.randn(B, Hk, S + Tk, D, generator=gen)
    v = torch.randn(B, Hk, S + Tk, D, generator=gen)
    full = torch.stack([random_tree_mask(Tk, gen) for _ in range(B)])  # (B, Tk, Tk)
    mask = full[:, Tk - T:]  # the last T nodes' rows
    start, end = torch.tensor([0, 3]), torch.tensor([S, 17])
    exact = tree_attention_reference(q.double(), k.double(), v.double(), start, end, mask)
    kernel = tree_attention(q, k, v, start, end, mask, backend="triton")
    torch_err = (tree_attention_reference(q, k, v, start, end, mask).double() - exact).abs().max()
    assert (kernel.double() - exact).abs().max() <= 2 * torch_err + 1e-6
