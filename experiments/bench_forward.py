"""What one verification forward costs by the number of tokens it carries: the cost model behind
the draft sizes in configs/ (a draft of T - 1 tokens pays off only if tau grows more than the
forward's cost does).

    python -m experiments.bench_forward                       # embedded default, 2 threads
    python -m experiments.bench_forward --cached 1000 --tokens 1 4 8 --repeats 20
    python -m experiments.bench_forward --linear-free    # also with every linear layer free

Times the target's forward over a chain of T tokens below a cached prefix, through the engine's
tree attention, for each linear backend (``torch``: ``F.linear``; ``skinny``: :mod:`specdec.backends.cpu_linear`'s
torch products; ``auto``: the same with :mod:`specdec.backends.native`'s product for 1-8 rows),
interleaved (each backend's first forward in a round untimed: it checks the packed weight copies,
which the engine does once per ``generate`` call); and a prefill of the prefix with each. Prints a
Markdown table of median milliseconds and the ratio to the same backend's 1-token forward.
``--linear-free`` adds a column where every linear layer returns zeros without computing anything:
what the rest of the forward (norms, rotary embeddings, attention, the cache, the modules' Python)
costs on its own (with ``auto``'s native norms and rotary embeddings, :mod:`specdec.backends.fused`).
``--unfused`` adds, interleaved with the rest, ``auto`` and the linear-free column with the model's own
norms and rotary embeddings (``Route(fused=False)``): an A/B of the fused ops in one process.
``--backends`` picks the columns (default all three); ``--stat min`` prints the best run instead of the
median (on a loaded machine the best is the steadier figure).
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager, nullcontext

import torch

from specdec import load_model
from specdec.attention import TreeMask, layer_overlays
from specdec.backends import native
from specdec.backends.cpu_linear import Route, packed_weights, routed
from specdec.cache import new_cache, truncate
from specdec.compat import checked_forward, tree_inputs
from specdec.engine import prepare_target
from specdec.options import Options

from .roofline import floor_line

BACKENDS = ("torch", "skinny", "auto")
UNFUSED = " unfused"  # a column's suffix: the same route with fused=False


@contextmanager
def linear_free(model: torch.nn.Module):
    """Every ``nn.Linear`` of ``model`` returns zeros of its output shape (made once per shape)."""
    zeros: dict[tuple, torch.Tensor] = {}
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]

    def free(layer: torch.nn.Linear):
        def forward(x: torch.Tensor) -> torch.Tensor:
            shape = (*x.shape[:-1], layer.out_features)
            if shape not in zeros:
                zeros[shape] = x.new_zeros(shape)
            return zeros[shape]

        return forward

    own = [vars(layer).get("forward") for layer in layers]  # the installed routed forwards, put back after
    for layer in layers:
        layer.forward = free(layer)
    try:
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cached", type=int, default=200, help="prefix length S in the cache")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--linear-free", action="store_true", help="also time the forward with free linear layers")
    parser.add_argument("--unfused", action="store_true",
                        help="also time auto and linear-free with the model's own norms and rotary embeddings")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--stat", default="median", choices=("median", "min"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    prefix = torch.randint(0, model.config.vocab_size, (1, args.cached), generator=torch.Generator().manual_seed(0))
    S = args.cached
    backends = tuple(args.backends) + (("linear-free",) if args.linear_free else ())
    if args.unfused:
        backends += tuple(b + UNFUSED for b in backends if b in ("auto", "linear-free"))
    times: dict[tuple[str, int | str], list[float]] = {}
    prepare_target(model, Options())  # tree attention and the CPU products, as the engine installs them
    overlays = layer_overlays(model)
    with torch.inference_mode():
        cache = new_cache(model)
        model(input_ids=prefix, cache=cache, use_cache=True)

        def chain(T: int) -> None:
            """One forward of T random tokens below the prefix, then the cache back to the prefix."""
            ids = torch.randint(0, model.config.vocab_size, (1, T))
            positions = torch.arange(S, S + T)[None]
            tree = TreeMask(torch.tensor([0]), torch.tensor([S]), torch.ones(1, T, T, dtype=torch.bool).tril(),
                            positions=positions, layers=overlays)
            with checked_forward(model, tree):  # as the engine's verification: the model's masks made for the tree
                model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, **tree_inputs(model, tree, S))
            truncate(cache, S)

        for _ in range(args.repeats + 1):  # the first round warms up (allocations, packed weights)
            for backend in backends:
                name = backend.removesuffix(UNFUSED)
                route = None  # a call's own route
                if name in ("skinny", "auto", "linear-free"):
                    route = Route(packed_weights(model), native.load() if name != "skinny" else None,
                                  fused=not backend.endswith(UNFUSED))
                with routed(route), linear_free(model) if name == "linear-free" else nullcontext():
                    chain(max(args.tokens))  # untimed: a block's first packed product checks the copies (once per call)
                    for T in args.tokens:
                        t0 = time.perf_counter()
                        chain(T)
                        times.setdefault((backend, T), []).append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    model(input_ids=prefix, cache=new_cache(model), use_cache=True, logits_to_keep=1)
                    times.setdefault((backend, "prefill"), []).append(time.perf_counter() - t0)
    stat = statistics.median if args.stat == "median" else min
    ms = {key: 1e3 * stat(values[1:]) for key, values in times.items()}
    print(f"{args.model}, {args.threads} threads, {S} cached tokens: {args.stat} ms of one forward "
          f"({args.repeats} runs)\n")
    print(floor_line(model)[1] + "\n")
    print("| tokens | " + " | ".join(f"{b} ms | {b} / 1 token" for b in backends) + " |")
    print("|---|" + "---|---|" * len(backends))
    for T in args.tokens:
        cells = [f"{ms[(b, T)]:.1f} | {ms[(b, T)] / ms[(b, 1)]:.2f}x" if (b, 1) in ms else f"{ms[(b, T)]:.1f} | -"
                 for b in backends]
        print(f"| {T} | " + " | ".join(cells) + " |")
    print(f"| prefill of {S} | " + " | ".join(f"{ms[(b, 'prefill')]:.1f} | -" for b in backends) + " |")


if __name__ == "__main__":
    main()
