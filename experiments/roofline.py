"""The memory floor a decoding step is measured against: the bytes of the target's weights over the
machine's measured read bandwidth.

A plain decoding step reads every weight once, so it cannot take less than ``weight bytes / read
bandwidth``; :func:`read_bandwidth` measures the bandwidth as the profiler and ``bench_forward`` use it:
a float32 sum over a buffer far larger than the caches, on the threads in use, best of ``repeats``.
"""

from __future__ import annotations

import time

import torch
from torch import nn


def read_bandwidth(megabytes: int = 512, repeats: int = 7) -> float:
    """Bytes per second a float32 sum reads from memory (best of ``repeats``, ``torch.get_num_threads()`` threads)."""
    buffer = torch.ones(megabytes * (1 << 20) // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - t0)
    return buffer.numel() * 4 / best


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights one decoding step reads: every parameter (tied ones once), less the input
    embedding table, of which a step reads one row per token (unless the output head shares it)."""
    seen, total = set(), 0
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    for parameter in model.parameters():
        if id(parameter) in seen or (parameter is embedding and not tied):
            continue
        seen.add(id(parameter))
        total += parameter.numel() * parameter.element_size()
    return total


def floor_line(model: nn.Module, bandwidth: float | None = None) -> tuple[float, str]:
    """The floor in seconds per plain step, and a line saying how it was found."""
    bandwidth = bandwidth or read_bandwidth()
    nbytes = weight_bytes(model)
    seconds = nbytes / bandwidth
    return seconds, (f"memory floor: {nbytes / 1e6:.0f} MB of weights / {bandwidth / 1e9:.1f} GB/s read bandwidth "
                     f"= {1e3 * seconds:.1f} ms per plain step ({1 / seconds:.0f} tokens/s)")
