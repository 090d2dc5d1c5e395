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

import importlib.util
import sys
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, causal_mask_function
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
        prefix_start, prefix_end: ``(B,)`` each row's valid cached keys ``[start, end)``; cache column
            ``c`` of row b holds position ``c - start_b``.
        ancestors: ``(B, T, Tk)`` bool, True where tree key j is query i or its ancestor (the queries
            are the last T of the forward's Tk tree keys; for verification Tk = T and node 0 is the root).
        backend: ``"auto"`` (Triton on CUDA, torch reference elsewhere), ``"triton"``, ``"reference"``.
        positions: ``(B, Tk)`` position id of every tree key; needed by layers with a sliding window or
            attention chunks (they attend by position, not by cache index).
        layers: per decoder layer, its ``(sliding_window, chunk_size)`` from the model's config (see
            :func:`layer_overlays`); a layer may also pass ``sliding_window`` itself.
    """

    prefix_start: Tensor
    prefix_end: Tensor
    ancestors: Tensor
    backend: str = "auto"
    positions: Tensor | None = None
    layers: tuple = ()
    timer: object | None = field(default=None, repr=False, compare=False)  # profiled: its ``attention`` seconds grow
    _dense: dict = field(default_factory=dict, repr=False, compare=False)
    _calls: list = field(default_factory=lambda: [0], repr=False, compare=False)
    _made: dict = field(default_factory=dict, repr=False, compare=False)  # id(mask given to layers) -> its bool mask

    @property
    def calls(self) -> int:
        """Attention layers that ran on this mask so far."""
        return self._calls[0]

    def key_positions(self, keys: int) -> Tensor:
        """``(B, keys)`` the position of every key: the cached prefix's, then the tree's."""
        if ("positions", keys) not in self._dense:
            if self.positions is None:
                raise ValueError("this model has sliding-window or chunked attention layers: the tree forward "
                                 "needs TreeMask(positions=...) of its tree keys")
            cached = keys - self.ancestors.shape[2]
            cols = torch.arange(cached, device=self.prefix_start.device)
            prefix = cols[None, :] - self.prefix_start[:, None]  # (B, S)
            self._dense[("positions", keys)] = torch.cat([prefix, self.positions.to(prefix.device)], dim=1)
        return self._dense[("positions", keys)]

    def dense(self, keys: int, window: int | None, chunk: int | None) -> Tensor:
        """``(B, T, keys)`` dense boolean mask for the torch reference, built once per forward and overlay."""
        key = (keys, window, chunk)
        if key not in self._dense:
            cached = keys - self.ancestors.shape[2]
            k_positions = self.key_positions(keys) if window is not None or chunk is not None else None
            self._dense[key] = dense_tree_mask(self.prefix_start, self.prefix_end, self.ancestors, cached,
                                               k_positions=k_positions, sliding_window=window, chunk_size=chunk)
        return self._dense[key]

    def layer_mask(self, mask_function, kv_length: int, eager: bool, dtype: torch.dtype) -> Tensor:
        """The 4-D mask a layer gets in a tree forward: what the model's own ``mask_function`` (causal,
        sliding window, chunks, ...) allows, evaluated on positions, and only the row's prefix and the
        query's ancestors. ``(B, 1, T, kv_length)``: bool, or for eager attention 0 / the dtype's minimum."""
        T = self.ancestors.shape[1]
        k_positions = self.key_positions(kv_length)  # (B, K)
        q_positions = k_positions[:, -T:]
        rows = torch.arange(len(k_positions), device=k_positions.device)[:, None, None]
        allowed = mask_function(rows, torch.zeros((), dtype=torch.long, device=rows.device),
                                q_positions[:, :, None], k_positions[:, None, :])  # (B, T, K)
        dense = self.dense(kv_length, None, None) & allowed.to(torch.bool)
        mask = dense[:, None]
        if eager:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
        self._made[id(mask)] = (mask, dense)
        return mask

    def additive(self, keys: int, dtype: torch.dtype) -> Tensor:
        """``(B, 1, T, keys)`` the tree as an additive mask (0 where visible, the dtype's minimum elsewhere),
        for a model that takes the tree through its own attention mask."""
        dense = self.dense(keys, None, None)[:, None]
        return torch.zeros(dense.shape, dtype=dtype, device=dense.device).masked_fill_(~dense, torch.finfo(dtype).min)

    def made(self, mask) -> Tensor | None:
        """``(B, T, K)`` bool of a mask from :meth:`layer_mask` (``None`` for any other)."""
        entry = self._made.get(id(mask))
        return entry[1] if entry is not None and entry[0] is mask else None

    def attend(self, module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, scaling: float | None,
               attention_mask=None, **kwargs) -> Tensor:
        """``query (B, H, T, Dk)``, ``key (B, Hk, S + Tk, Dk)``, ``value (B, Hk, S + Tk, Dv)`` -> ``(B, T, H, Dv)``."""
        if self.timer is None:
            return self._attend(module, query, key, value, scaling, attention_mask, **kwargs)
        t0 = time.perf_counter()
        out = self._attend(module, query, key, value, scaling, attention_mask, **kwargs)
        self.timer.attention += time.perf_counter() - t0
        return out

    def _attend(self, module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, scaling: float | None,
                attention_mask=None, **kwargs) -> Tensor:
        self._calls[0] += 1
        window, chunk = None, None
        layer = getattr(module, "layer_idx", None)
        if self.layers and layer is not None and 0 <= layer < len(self.layers):
            window, chunk = self.layers[layer]
        if kwargs.get("sliding_window") is not None:
            window = int(kwargs["sliding_window"])
        sinks = kwargs.get("s_aux")
        softcap = kwargs.get("softcap")
        uses_reference = self.backend == "reference" or (self.backend == "auto" and not (query.is_cuda and _triton()))
        own = self.made(attention_mask)  # the model's own pattern for this layer, when its masks came through us
        if own is not None and own.shape[-1] == key.shape[2]:
            # the cache's window (a sliding layer type) applies too: transformers' own sliding cache keeps
            # only the last entries even where a model's mask does not window
            own = self._combined(own, window, chunk)
            if not uses_reference:
                uses_reference = not self._agrees(own, window, chunk)  # a pattern the kernel cannot express
        else:
            own = None
        overlay = window is not None or chunk is not None
        dense = None
        if uses_reference:
            dense = own if own is not None else self.dense(key.shape[2], window, chunk)
        k_positions = self.key_positions(key.shape[2]) if overlay else None
        out = tree_attention(query, key, value, self.prefix_start, self.prefix_end, self.ancestors, scale=scaling,
                             backend="reference" if uses_reference else "triton", dense_mask=dense, check_ranges=False,
                             k_positions=k_positions,
                             sliding_window=window, chunk_size=chunk, softcap=softcap or None,
                             sinks=None if sinks is None else sinks.to(query.dtype))  # (B, H, T, Dv)
        return out.transpose(1, 2).contiguous()

    def _combined(self, own: Tensor, window: int | None, chunk: int | None) -> Tensor:
        """The model's own layer mask and the layer's ``(window, chunk)``, together."""
        if window is None and chunk is None:
            return own
        key = ("combined", id(own), window, chunk)
        if key not in self._dense:
            self._dense[key] = own & self.dense(own.shape[-1], window, chunk)
        return self._dense[key]

    def _agrees(self, own: Tensor, window: int | None, chunk: int | None) -> bool:
        """Whether the kernel's ``(window, chunk)`` gives the model's own pattern ``own``."""
        key = ("agrees", id(own), window, chunk)
        if key not in self._dense:
            self._dense[key] = bool(torch.equal(self.dense(own.shape[-1], window, chunk), own))
        return self._dense[key]


def _triton() -> bool:
    """Whether the Triton kernel can be imported (the ``[kernels]`` extra); ``auto`` falls back to the reference."""
    return importlib.util.find_spec("triton") is not None


def layer_overlays(model: PreTrainedModel) -> tuple:
    """Per decoder layer ``(sliding_window, chunk_size)`` as the model's own masks apply them."""
    config = model.config.get_text_config(decoder=True)
    try:
        types, kwargs = get_layer_types_and_kwargs(config)
    except Exception:  # configs without per-layer information: layers pass sliding_window themselves
        return ()
    out = []
    for layer_type, layer_kwargs in zip(types, kwargs):
        if layer_type in ("sliding_attention", "hybrid_sliding"):
            out.append((layer_kwargs.get("sliding_window"), None))
        elif layer_type == "chunked_attention":
            out.append((None, getattr(config, "attention_chunk_size", None)))
        else:
            out.append((None, None))
    return tuple(out)


@dataclass
class _Arrivals:
    """One tree forward: its mask, and the attention calls that saw neither the tree nor its layer masks."""

    tree: TreeMask | None = None
    missed: int = 0
    covered: int = 0  # calls without the tree keyword that got a mask made for the tree (exact all the same)


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
            if arrivals is not None:  # a layer that dropped the keyword: exact only with the tree's own mask
                covered = (arrivals.tree is not None and arrivals.tree.made(attention_mask) is not None
                           and implementation in ("sdpa", "eager"))
                arrivals.covered += covered
                arrivals.missed += not covered
            return _own_attention(module, implementation)(module, query, key, value, attention_mask, *args, **kwargs)
        scaling = kwargs.pop("scaling", args[0] if args else None)
        return tree.attend(module, query, key, value, scaling, attention_mask, **kwargs), None

    attention.__name__ = f"specdec_tree_over_{implementation}"
    return attention


def _mask_dispatcher(implementation: str):
    """The registered mask function: the model's own, except in a tree forward, where each mask the
    model asks for (causal, sliding, chunked: its ``mask_function``) is made for the tree."""
    own = ALL_MASK_ATTENTION_FUNCTIONS["eager" if implementation == "eager" else implementation]

    def mask(*args, mask_function=causal_mask_function, **kwargs):
        arrivals = _TREE_FORWARD.get()
        if arrivals is None or arrivals.tree is None or "kv_length" not in kwargs:
            return own(*args, mask_function=mask_function, **kwargs)
        return arrivals.tree.layer_mask(mask_function, kwargs["kv_length"], implementation == "eager",
                                        kwargs.get("dtype") or torch.float32)

    mask.__name__ = f"specdec_tree_masks_over_{implementation}"
    return mask


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
            AttentionMaskInterface.register(name, _mask_dispatcher(original))
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
def tree_forward(model: PreTrainedModel, tree: TreeMask | None = None):
    """Around a forward given ``tree``: the model's masks are made for it, and after the forward a
    ``ValueError`` is raised if any attention layer ran with neither the tree nor a mask made for it
    (its decoder layer dropped the keyword and the mask), before the logits can be used."""
    arrivals = _Arrivals(tree)
    token = _TREE_FORWARD.set(arrivals)
    try:
        yield
    finally:
        _TREE_FORWARD.reset(token)
    if tree is not None and not tree.calls and not arrivals.covered:
        raise ValueError(f"{type(model).__name__}: no attention layer received the tree mask in a verification "
                         "forward, so verification would be wrong; this model cannot be served exactly")
    if arrivals.missed:
        raise ValueError(
            f"{type(model).__name__}: {arrivals.missed} attention call(s) of a verification forward did not receive "
            "the tree mask (a decoder layer does not pass its keyword arguments on to its attention), so "
            "speculative verification would be wrong; this model family cannot be served exactly")
