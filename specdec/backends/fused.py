"""The rest of a decoding step's forward in native code: RMSNorm and rotary embeddings, one call each.

A 1-token forward of a small model is mostly not arithmetic: each of SmolLM2-135M's 61 RMSNorms runs
seven torch operations and each of its 30 rotary embeddings about fifteen, a few microseconds of
dispatch apiece for a few hundred numbers. :mod:`specdec.backends.native`'s ``rms_norm`` and ``rope``
do each in one call, with the same float32 operations each rounded as transformers rounds them: the
rotary embedding to the bit, the norm but for the order in which its sum of squares is added (as any
change of reduction kernel does).

Nothing is forked or patched on a class. :func:`install_fused` gives, once, on the instance:

- every RMSNorm whose class ``forward`` is transformers' ``LlamaRMSNorm.forward`` (the same bytecode,
  names and constants: the Llama, Mistral, Qwen2, ... families, copied from it) a routed ``forward``;
- every attention layer that holds a private ``rotary_pos_emb`` wrapper (the hook transformers opens to
  the ``kernels`` package, ``use_kernelized_func(apply_rotary_pos_emb)``) whose function is Llama's
  ``apply_rotary_pos_emb`` (with Llama's ``rotate_half``) a routed ``forward`` on that wrapper.

Each runs the native op only inside a routed call (:func:`specdec.backends.cpu_linear.routed`) whose route
holds the native library (``linear_backend="auto"``), for float32 CPU inputs of at most
:data:`MAX_ROWS` rows with no gradient to record; everywhere else, including the user's own
``model.generate``, it is the model's own code. Where the library cannot be built, the route holds none
and :func:`specdec.backends.native.load` has said so once.

Measured here (SmolLM2-135M, float32, 200 cached tokens, 1 thread on a loaded machine, best of 30, every
column interleaved: ``python -m experiments.bench_forward --backends auto --linear-free --unfused --threads 1
--stat min``): a 1-token forward 36.6 -> 34.7 ms (with every linear layer free 8.0 -> 6.5), an 8-token one
53.8 -> 51.4 (10.4 -> 8.4); see docs/benchmarks.md.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn
from transformers.models.llama import modeling_llama

from specdec.backends.cpu_linear import current_route

MAX_ROWS = 64  # tokens of a forward (rows of a norm) up to which the native ops are taken: decoding, not prefill
_ROPE = "rotary_pos_emb"  # the name transformers' attention layers give their rotary-embedding wrapper


def _same_code(a, b) -> bool:
    """Whether two functions run the same bytecode on the same names and constants."""
    a, b = getattr(a, "__code__", None), getattr(b, "__code__", None)
    return (a is not None and b is not None and a.co_code == b.co_code and a.co_consts == b.co_consts
            and a.co_names == b.co_names)


def is_llama_norm(module: nn.Module) -> bool:
    """Whether ``module`` computes transformers' ``LlamaRMSNorm`` (its class's forward is that one's)."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    return (isinstance(weight, Tensor) and isinstance(eps, float)
            and _same_code(type(module).forward, modeling_llama.LlamaRMSNorm.forward))


def _llama_rope() -> object | None:
    """Llama's own ``apply_rotary_pos_emb`` function (inside the ``kernels`` wrapper when that is installed)."""
    return _wrapped_function(modeling_llama.apply_rotary_pos_emb)


def _wrapped_function(wrapper) -> object | None:
    """The function a ``kernels`` function wrapper (an ``nn.Module``) calls, or the function itself."""
    if isinstance(wrapper, types.FunctionType):
        return wrapper
    forward = getattr(type(wrapper), "forward", None)
    names = getattr(getattr(forward, "__code__", None), "co_freevars", ())
    if "func" not in names:
        return None
    return forward.__closure__[names.index("func")].cell_contents


def is_llama_rope(wrapper: nn.Module) -> bool:
    """Whether a layer's ``rotary_pos_emb`` wrapper runs Llama's ``apply_rotary_pos_emb`` and ``rotate_half``."""
    function, llama = _wrapped_function(wrapper), _llama_rope()
    if not isinstance(function, types.FunctionType) or not _same_code(function, llama):
        return False
    return _same_code(function.__globals__.get("rotate_half"), modeling_llama.rotate_half)


def _library():
    """The current call's native library when its route has one with the fused ops, else ``None``."""
    route = current_route()
    native = None if route is None or not route.fused else route.native
    return native if hasattr(native, "rms_norm") else None


def _plain(*tensors: Tensor) -> bool:
    """float32 CPU tensors, no gradient to record."""
    grad = torch.is_grad_enabled()
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and not (grad and t.requires_grad) for t in tensors)


class _RoutedNorm:
    """The ``forward`` of an installed RMSNorm: the native one inside a routed call that takes it."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, x: Tensor) -> Tensor:
        module = self.module
        library = _library()
        if library is not None:
            weight = module.weight
            width = x.shape[-1] if x.dim() else 0
            if (width and x.numel() <= MAX_ROWS * width and weight.shape == (width,) and _plain(x, weight)
                    and x.is_contiguous() and weight.is_contiguous()):
                return library.rms_norm(x, weight, module.variance_epsilon)
        return type(module).forward(module, x)


def _routed_rope(self: nn.Module, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1):
    """The ``forward`` of an installed rotary-embedding wrapper: the native one inside a routed call that takes it."""
    library = _library()
    if library is not None and unsqueeze_dim == 1 and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3:
        B, _, T, D = q.shape
        if (k.shape[0] == B and k.shape[2:] == (T, D) and cos.shape == sin.shape and cos.shape[1:] == (T, D)
                and cos.shape[0] in (1, B) and D % 2 == 0 and B * T <= MAX_ROWS and q.stride(-1) == 1
                and k.stride(-1) == 1 and cos.is_contiguous() and sin.is_contiguous() and _plain(q, k, cos, sin)):
            return library.rope(q, k, cos, sin)
    if torch.compiler.is_compiling():  # kernels' wrapper dispatches a compiled call back to this forward: call
        return _wrapped_function(self)(q, k, cos, sin, unsqueeze_dim)  # what it calls when nothing is installed
    return type(self).forward(self, q, k, cos, sin, unsqueeze_dim)


def install_fused(module: nn.Module) -> None:
    """Give ``module``'s Llama RMSNorms and Llama rotary-embedding wrappers their routed ``forward``, once
    (idempotent). Modules whose ``forward`` is already replaced on the instance are left alone."""
    for layer in module.modules():
        if "forward" not in vars(layer) and is_llama_norm(layer):
            layer.forward = _RoutedNorm(layer)
        funcs = vars(layer).get("_kernel_funcs")
        wrapper = funcs.get(_ROPE) if isinstance(funcs, dict) else None
        if isinstance(wrapper, nn.Module) and "forward" not in vars(wrapper) and is_llama_rope(wrapper):
            wrapper.forward = types.MethodType(_routed_rope, wrapper)  # a method: kernels reads its __func__


def _installed(layer: nn.Module) -> bool:
    forward = vars(layer).get("forward")
    return isinstance(forward, _RoutedNorm) or getattr(forward, "__func__", None) is _routed_rope


def is_fused(module: nn.Module) -> bool:
    """Whether ``module`` has a norm or rotary embedding routed by :func:`install_fused`."""
    return any(_installed(layer) for layer in _with_wrappers(module))


def uninstall_fused(module: nn.Module) -> None:
    """Undo :func:`install_fused` (the modules' own ``forward`` again)."""
    for layer in _with_wrappers(module):
        if _installed(layer):
            del layer.forward


def _with_wrappers(module: nn.Module):
    """Every submodule, and the ``kernels`` function wrappers the attention layers hold privately."""
    for layer in module.modules():
        yield layer
        funcs = vars(layer).get("_kernel_funcs")
        if isinstance(funcs, dict):
            yield from (f for f in funcs.values() if isinstance(f, nn.Module))
