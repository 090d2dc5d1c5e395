"""Tree-attention kernel benchmark: the Triton kernel vs the torch reference (SDPA with a dense
mask; transformers' eager softmax with softcap or sinks) and FlexAttention where it runs, over
batch 1-16, 16-128 tree nodes and prefixes 512-8192; optionally with a layer's sliding window,
attention chunks, logit softcap, attention sinks, or a value head dim of its own.

    python -m experiments.bench_kernel [--dtype bfloat16] [--window 4096] [--softcap 50]
        [--chunk 8192] [--sinks] [--head-dim 192 --value-head-dim 128] [--out kernel_bench.md]

With any of those on, the table also times the kernel without them (``plain``), which shows
what the feature costs, and with a window what skipping the blocks outside it saves. The dense
mask is built once, outside the timing, as a model's layers share it.

Needs CUDA; on a machine without it, says so and exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from specdec_kernels.tree_attention import tree_attention
from specdec_kernels.tree_attention.reference import dense_tree_mask


def _random_tree(T: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random tree of T nodes (parents at most 4 back): its ``(T, T)`` ancestor mask and depths."""
    parents = [-1] + [int(torch.randint(max(0, i - 4), i, (), generator=gen)) for i in range(1, T)]
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        mask[i, i] = True
        if parents[i] >= 0:
            mask[i] |= mask[parents[i]]
    return mask, mask.sum(1) - 1


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
    parser.add_argument("--head-dim", type=int, default=128, help="Dk, the query/key head dim")
    parser.add_argument("--value-head-dim", type=int, default=None, help="Dv (default: Dk)")
    parser.add_argument("--window", type=int, default=None, help="sliding window W (Mistral, Gemma-2, gpt-oss)")
    parser.add_argument("--chunk", type=int, default=None, help="attention chunk size C (Llama-4)")
    parser.add_argument("--softcap", type=float, default=None, help="logit softcap (Gemma-2: 50)")
    parser.add_argument("--sinks", action="store_true", help="per-head attention sinks (gpt-oss)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: the Triton tree-attention kernel is benchmarked on a GPU only (nothing to do)")
        return 0
    from triton.testing import do_bench

    dtype, dev = getattr(torch, args.dtype), "cuda"
    H, Hk, Dk = args.heads, args.kv_heads, args.head_dim
    Dv = args.value_head_dim or Dk
    overlay = {"sliding_window": args.window, "chunk_size": args.chunk}
    featured = any(value is not None for value in overlay.values()) or args.softcap is not None or args.sinks
    gen = torch.Generator().manual_seed(0)
    sinks = torch.randn(H, generator=gen).to(dev, dtype) if args.sinks else None
    settings = ", ".join(f"{name}={value}" for name, value in [*overlay.items(), ("softcap", args.softcap)]
                         if value is not None) + (", sinks" if args.sinks else "")
    lines = [f"tree attention, {torch.cuda.get_device_name()}, {args.dtype}, H={H} Hk={Hk} Dk={Dk} Dv={Dv}"
             f"{'; ' + settings if settings else ''}; microseconds (median of do_bench)", "",
             "| B | nodes | prefix | triton us | plain triton us | torch ref us | flex us | ref / triton |",
             "|---|---|---|---|---|---|---|---|"]
    for B, T, S in itertools.product([1, 4, 16], [16, 64, 128], [512, 2048, 8192]):
        q = torch.randn(B, H, T, Dk, device=dev, dtype=dtype)
        k = torch.randn(B, Hk, S + T, Dk, device=dev, dtype=dtype)
        v = torch.randn(B, Hk, S + T, Dv, device=dev, dtype=dtype)
        start = torch.zeros(B, dtype=torch.long, device=dev)
        end = torch.full((B,), S, device=dev)
        trees = [_random_tree(T, gen) for _ in range(B)]
        mask = torch.stack([m for m, _ in trees]).to(dev)
        k_positions = torch.cat([torch.arange(S).expand(B, S), S + torch.stack([d for _, d in trees])], 1).to(dev)
        features = dict(k_positions=k_positions, softcap=args.softcap, sinks=sinks, **overlay)
        dense = dense_tree_mask(start, end, mask, S, k_positions=k_positions, **overlay)
        t_kernel = do_bench(lambda: tree_attention(q, k, v, start, end, mask, backend="triton", check_ranges=False,
                                                   **features))
        t_plain = (f"{1000 * do_bench(lambda: tree_attention(q, k, v, start, end, mask, backend='triton')):.1f}"
                   if featured else "-")
        t_ref = do_bench(lambda: tree_attention(q, k, v, start, end, mask, backend="reference", dense_mask=dense,
                                                check_ranges=False, **features))
        if args.softcap is not None or args.sinks:
            t_flex = "n/a (softcap/sinks)"
        else:
            try:
                t_flex = f"{1000 * do_bench(_flex(q, k, v, dense)):.1f}"
            except Exception as err:  # FlexAttention needs a recent GPU and compiler; report, don't fail
                t_flex = f"n/a ({type(err).__name__})"
        lines.append(f"| {B} | {T} | {S} | {1000 * t_kernel:.1f} | {t_plain} | {1000 * t_ref:.1f} | {t_flex} | "
                     f"{t_ref / t_kernel:.2f}x |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
