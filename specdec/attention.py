"""Tree attention plugged into transformers through its ``AttentionInterface``, installed once per model.

No model file is forked. :func:`install_tree_attention` registers, for the implementation the
model was loaded with (``sdpa``, ``eager``, ``flex_attention``, ...), a function named
``specdec_tree+<that implementation>`` and selects it on the model, once. Each forward then
picks its path from its own arguments:

- given ``tree=TreeMask(...)`` (a keyword transformers passes down to every attention layer), it
  attends over the draft trees (:mod:`specdec_kernels.tree_attention`);
- without one (prefill, plain steps, the user's own ``model.generate``), it is exactly the model's
  own implementation: transformers' function of that name, or for ``eager`` the modeling file's own
  ``eager_attention_forward`` (Gemma-2's softcapping, gpt-oss's sinks and the like come with it),
  with the masks of that implementation.

Nothing changes per call, so threads and interrupts cannot leave a model half-switched. A model
whose attention never reaches the interface (falcon, bloom) cannot be switched and is refused at
install; a verification forward in which some attention layer did not receive the tree (a decoder
layer that drops ``**kwargs``, e.g. stablelm) raises before its logits are used (:func:`tree_forward`).
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from specdec_kernels.tree_attention import tree_attention
from specdec_kernels.tree_attention.reference import dense_tree_mask

TREE_ATTENTION = "specdec_tree"
_SEPARATOR = "+"
_INSTALL = threading.Lock()  # installs on one model never interleave (the registry itself is append-only)


@dataclass(frozen=True)
class TreeMask:
    """What every attention layer needs to verify a batch of trees.

    Attributes:
        prefix_start, prefix_end: ``(B,)`` each row's valid cached keys ``[start, end)``.
        ancestors: ``(B, T, T)`` bool, True where key node j is query node i or its ancestor
            (T counts the root: node 0 of the forward is the root token).
        backend: ``"auto"`` (Triton on CUDA, torch reference elsewhere), ``"triton"``, ``"reference"``.
    """

    prefix_start: Tensor
    prefix_end: Tensor
    ancestors: Tensor
    backend: str = "auto"
    _dense: dict = field(default_factory=dict, repr=False, compare=False)
    _calls: list = field(default_factory=lambda: [0], repr=False, compare=False)

    @property
    def calls(self) -> int:
        """Attention layers that ran on this mask so far."""
        return self._calls[0]

    def dense(self, keys: int) -> Tensor:
        """``(B, T, keys)`` dense boolean mask for the torch reference, built once per forward."""
        if keys not in self._dense:
            cached = keys - self.ancestors.shape[2]
            self._dense[keys] = dense_tree_mask(self.prefix_start, self.prefix_end, self.ancestors, cached)
        return self._dense[keys]

    def attend(self, query: Tensor, key: Tensor, value: Tensor, scaling: float | None, **kwargs) -> Tensor:
        """``query (B, H, T, D)``, ``key/value (B, Hk, S + T, D)`` -> ``(B, T, H, D)``."""
        self._calls[0] += 1
        unsupported = [name for name in ("softcap", "s_aux", "sliding_window") if kwargs.get(name) is not None]
        if unsupported:
            raise ValueError(f"tree attention does not support {', '.join(unsupported)}: this model needs its own "
                             "attention for those; use a model without them")
        uses_reference = self.backend == "reference" or (self.backend == "auto" and not query.is_cuda)
        dense = self.dense(key.shape[2]) if uses_reference else None
        out = tree_attention(query, key, value, self.prefix_start, self.prefix_end, self.ancestors, scale=scaling,
                             backend=self.backend, dense_mask=dense, check_ranges=False)  # (B, H, T, D)
        return out.transpose(1, 2).contiguous()


@dataclass
class _Arrivals:
    """Attention calls during one tree forward that did not receive the tree."""

    missed: int = 0


_TREE_FORWARD: ContextVar[_Arrivals | None] = ContextVar("specdec_tree_forward", default=None)


def _own_attention(module: torch.nn.Module, implementation: str):
    """The attention function the model would use under ``implementation``."""
    if implementation == "eager":
        own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if own is None:
            raise ValueError(f"{type(module).__name__} has no eager_attention_forward in its modeling file: "
                             "load the model with attn_implementation='sdpa'")
        return own
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _dispatcher(implementation: str):
    """The registered function for models loaded with ``implementation``."""

    def attention(module, query, key, value, attention_mask, *args, tree: TreeMask | None = None, **kwargs):
        if tree is None:
            arrivals = _TREE_FORWARD.get()
            if arrivals is not None:
                arrivals.missed += 1
            return _own_attention(module, implementation)(module, query, key, value, attention_mask, *args, **kwargs)
        scaling = kwargs.pop("scaling", args[0] if args else None)
        return tree.attend(query, key, value, scaling, **kwargs), None

    attention.__name__ = f"specdec_tree_over_{implementation}"
    return attention


def installed_name(model: PreTrainedModel) -> str | None:
    """The implementation tree attention runs over on ``model``, or ``None`` if not installed."""
    current = model.config._attn_implementation or ""
    prefix = TREE_ATTENTION + _SEPARATOR
    return current[len(prefix):] if current.startswith(prefix) else None


def install_tree_attention(model: PreTrainedModel) -> None:
    """Select tree attention on ``model`` once (idempotent); raises ``ValueError`` if it cannot carry it.

    The model's own implementation stays what every forward without a tree runs.
    """
    if installed_name(model) is not None:
        return
    with _INSTALL:
        if installed_name(model) is not None:
            return
        original = model.config._attn_implementation or "sdpa"
        if _SEPARATOR in original or "/" in original or (original != "eager" and original not in ALL_ATTENTION_FUNCTIONS):
            raise ValueError(f"{type(model).__name__} runs attention implementation {original!r}, which specdec "
                             "cannot wrap: load the model with attn_implementation='sdpa' or 'eager'")
        name = TREE_ATTENTION + _SEPARATOR + original
        if name not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(name, _dispatcher(original))
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["eager" if original == "eager"
                                                                               else original])
        model.set_attn_implementation(name)
        if model.config._attn_implementation != name:
            raise ValueError(
                f"{type(model).__name__} does not route its attention through transformers' AttentionInterface "
                "(set_attn_implementation has no effect on it), so tree attention cannot reach its layers and "
                "speculative verification would be wrong: use a model family that does")


def uninstall_tree_attention(model: PreTrainedModel) -> None:
    """Select the model's own implementation again."""
    original = installed_name(model)
    if original is not None:
        with _INSTALL:
            model.set_attn_implementation(original)


@contextmanager
def tree_forward(model: PreTrainedModel):
    """Around a forward given a tree: raises ``ValueError`` after it if any attention layer ran
    without the tree (its decoder layer dropped the keyword), before the logits can be used."""
    arrivals = _Arrivals()
    token = _TREE_FORWARD.set(arrivals)
    try:
        yield
    finally:
        _TREE_FORWARD.reset(token)
    if arrivals.missed:
        raise ValueError(
            f"{type(model).__name__}: {arrivals.missed} attention call(s) of a verification forward did not receive "
            "the tree mask (a decoder layer does not pass its keyword arguments on to its attention), so "
            "speculative verification would be wrong; this model family cannot be served exactly")
