"""Tree-attention kernel benchmark: the Triton kernel vs torch SDPA with a dense mask (and
FlexAttention where it runs), over batch 1-16, 16-128 tree nodes and prefixes 512-8192.

    python -m experiments.bench_kernel [--dtype bfloat16] [--out kernel_bench.md]

Needs CUDA; on a machine without it, says so and exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from specdec.tree import DraftTree
from specdec_kernels.tree_attention import tree_attention
from specdec_kernels.tree_attention.reference import dense_tree_mask


def _random_tree(T: int, gen: torch.Generator) -> torch.Tensor:
    parents = [-1] + [int(torch.randint(max(0, i - 4), i, (), generator=gen)) for i in range(1, T)]
    return DraftTree(torch.zeros(T, dtype=torch.long), torch.tensor(parents)).ancestors


def _flex(q, k, v, mask):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, T, _ = q.shape
    block = create_block_mask(lambda b, h, qi, ki: mask[b, qi, ki], B, None, T, k.shape[2], device=q.device)
    fn = torch.compile(flex_attention)
    return lambda: fn(q, k, v, block_mask=block, enable_gqa=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: the Triton tree-attention kernel is benchmarked on a GPU only (nothing to do)")
        return 0
    from triton.testing import do_bench

    dtype, dev = getattr(torch, args.dtype), "cuda"
    H, Hk, D = args.heads, args.kv_heads, args.head_dim
    gen = torch.Generator().manual_seed(0)
    lines = [f"tree attention, {torch.cuda.get_device_name()}, {args.dtype}, H={H} Hk={Hk} D={D}; "
             "microseconds (median of do_bench)", "",
             "| B | nodes | prefix | triton us | sdpa dense us | flex us | sdpa / triton |", "|---|---|---|---|---|---|---|"]
    for B, T, S in itertools.product([1, 4, 16], [16, 64, 128], [512, 2048, 8192]):
        q = torch.randn(B, H, T, D, device=dev, dtype=dtype)
        k = torch.randn(B, Hk, S + T, D, device=dev, dtype=dtype)
        v = torch.randn_like(k)
        start = torch.zeros(B, dtype=torch.long, device=dev)
        end = torch.full((B,), S, device=dev)
        mask = torch.stack([_random_tree(T, gen) for _ in range(B)]).to(dev)
        dense = dense_tree_mask(start, end, mask, S)[:, None]
        t_kernel = do_bench(lambda: tree_attention(q, k, v, start, end, mask, backend="triton"))
        t_sdpa = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense,
                                                                                   enable_gqa=True))
        try:
            t_flex = f"{1000 * do_bench(_flex(q, k, v, dense[:, 0])):.1f}"
        except Exception as err:  # FlexAttention needs a recent GPU and compiler; report, don't fail
            t_flex = f"n/a ({type(err).__name__})"
        lines.append(f"| {B} | {T} | {S} | {1000 * t_kernel:.1f} | {1000 * t_sdpa:.1f} | {t_flex} | "
                     f"{t_sdpa / t_kernel:.2f}x |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
