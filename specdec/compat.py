"""Which models specdec serves exactly: checked once per model, before its first token is returned.

A model is served when three things hold, and refused with a ``ValueError`` naming the model class
and the reason otherwise (never a silent wrong answer):

1. **its cache is attention only**: every decoder layer keeps keys and values (full, sliding-window
   or chunked attention; layers that share another layer's K/V are fine). Recurrent state
   (Mamba-style state-space layers, linear attention, hybrids such as Jamba) cannot be rolled back to
   an accepted path, and is refused before anything runs;
2. **tree attention can be installed** (:func:`specdec.attention.install_tree_attention`): the model
   routes its attention through transformers' ``AttentionInterface``;
3. **a probe verifies exactly**: a left-padded batch of two prompts is prefilled into specdec's cache
   and a tree that branches at the root is verified in one forward; every node's logits must equal a
   plain forward of its own path without a cache (computed before the install, with the model's own
   attention), and a plain forward after the install must equal the one before. This catches what no
   static check can: a decoder layer that drops the tree keyword (stablelm), a model that computes its
   positions itself instead of reading ``position_ids`` (the encoder-decoder families' decoders), code
   that branches on the attention implementation's name, or a forward that fails with specdec's cache.

The probe costs a few forwards of a dozen tokens, once per model object.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from torch import Tensor
from transformers import PreTrainedModel

from specdec.attention import (TreeMask, install_tree_attention, installed_name, layer_overlays, tree_forward,
                               uninstall_tree_attention)
from specdec.cache import RaggedCache, new_cache, zero_positions
from specdec.text import left_pad
from specdec.tree import DraftTree, batch_trees

_MODE = "_specdec_servable"  # set on a model once it passed: "tree" (tree attention) or "mask" (its own 4-D masks)
_PROBE = threading.Lock()  # one probe at a time: it switches the model's attention while it runs


def check_servable(model: PreTrainedModel, backend: str = "auto") -> None:
    """Raise ``ValueError`` unless specdec can serve ``model`` exactly (see the module docstring); on
    success the model is set up for verification (tree attention installed, or for a model outside the
    attention interface the tree given as its own 4-D attention mask) and the result is remembered."""
    if _ready(model):
        return
    with _PROBE:
        if _ready(model):
            return
        new_cache(model)  # 1. attention layers only (raises for recurrent state)
        if installed_name(model) is not None:  # an earlier probe was interrupted: start from the model's own
            uninstall_tree_attention(model)
        reference = _reference(model)
        try:
            install_tree_attention(model)  # 2. raises for models outside the attention interface
            mode = "tree"
        except ValueError as outside:
            if any(w is not None or c is not None for w, c in layer_overlays(model)):
                raise  # per-layer windows cannot be one 4-D mask
            mode = "mask"
            model.__dict__[_MODE] = mode
            try:
                _probe(model, reference, backend)
            except ValueError as err:
                del model.__dict__[_MODE]
                raise ValueError(f"{outside} (nor does a 4-D attention mask give exact verification: {err})") from err
        if mode == "tree":
            try:
                _probe(model, reference, backend)  # 3.
            except BaseException:
                uninstall_tree_attention(model)
                raise
        model.__dict__[_MODE] = mode


def through_masks(model: PreTrainedModel) -> bool:
    """Whether ``model`` is served through its own 4-D attention masks (not tree attention)."""
    return model.__dict__.get(_MODE) == "mask"


def _ready(model: PreTrainedModel) -> bool:
    mode = model.__dict__.get(_MODE)
    return mode == "mask" or (mode == "tree" and installed_name(model) is not None)


def tree_inputs(model: PreTrainedModel, tree: TreeMask, cached: int) -> dict:
    """The keyword arguments that give ``model`` the tree in a forward: ``tree=`` through tree attention,
    or for a model served through its own masks the tree as a 4-D additive ``attention_mask`` over the
    ``cached`` columns and the tree's keys."""
    if model.__dict__.get(_MODE) == "mask":
        return {"attention_mask": tree.additive(cached + tree.ancestors.shape[2], model.dtype)}
    return {"tree": tree}


@contextmanager
def checked_forward(model: PreTrainedModel, tree: TreeMask):
    """Around a verification forward: the arrival check of :func:`~specdec.attention.tree_forward`
    (a model served through its own masks was checked by its probe instead)."""
    if model.__dict__.get(_MODE) == "mask":
        yield
        return
    with tree_forward(model, tree):
        yield


def _probe_rows(vocab: int) -> tuple[list[Tensor], list[DraftTree]]:
    """Two prompts (7 and 4 tokens) and below each root a tree that branches: [a, c, b], b under a."""
    def tokens(seed: int, n: int) -> Tensor:
        return torch.tensor([(seed + 37 * i) % vocab for i in range(n)], dtype=torch.long)

    prompts = [tokens(11, 7), tokens(29, 4)]
    trees = [DraftTree(tokens(5 + 3 * r, 3), torch.tensor([-1, -1, 0])) for r in range(2)]
    return prompts, trees


def _paths(prompt: Tensor, tree: DraftTree) -> list[tuple[Tensor, int]]:
    """For the root and each node: a plain sequence ending in it, and the index of its last token."""
    out = [(prompt, len(prompt) - 1)]
    for node in range(len(tree)):
        path = tree.ancestors[node].nonzero().flatten()
        seq = torch.cat([prompt, tree.tokens[path]])
        out.append((seq, len(seq) - 1))
    return out


@torch.no_grad()
def _reference(model: PreTrainedModel) -> dict:
    """Logits of every probe position by a plain forward without a cache, with the model's own attention."""
    vocab = model.get_input_embeddings().weight.shape[0]
    prompts, trees = _probe_rows(vocab)
    device = model.device
    try:
        paths = [[_plain(model, seq)[at] for seq, at in _paths(p, t)] for p, t in zip(prompts, trees)]
        plain = _plain(model, prompts[0])
    except Exception as err:
        raise ValueError(f"{type(model).__name__} fails a plain forward of a short prompt ({err}); "
                         "it cannot be served") from err
    return {"paths": paths, "plain": plain}


def _plain(model: PreTrainedModel, seq: Tensor) -> Tensor:
    """``(n, V)`` float32 logits of one sequence without a cache, positions 0..n-1 (as generate passes them)."""
    ids = seq[None].to(model.device)
    positions = torch.arange(len(seq), device=model.device)[None]
    return model(input_ids=ids, position_ids=positions, use_cache=False).logits[0].float().cpu()


def _close(got: Tensor, want: Tensor, dtype: torch.dtype) -> float:
    """Relative distance of two logit vectors (to their scale)."""
    return float((got - want).abs().max() / want.abs().max().clamp(min=1.0))


@torch.no_grad()
def _probe(model: PreTrainedModel, reference: dict, backend: str) -> None:
    name = type(model).__name__
    tolerance = 1e-3 if model.dtype == torch.float32 else 3e-2
    vocab = model.get_input_embeddings().weight.shape[0]
    prompts, trees = _probe_rows(vocab)
    device = model.device
    ids, mask = left_pad(prompts, pad_id=0)
    ids, mask = ids.to(device), mask.to(device)
    B, n = ids.shape
    pad = (n - mask.sum(dim=1)).cpu()
    cache = RaggedCache(model, B)
    cache.start, cache.end = pad.clone(), torch.full_like(pad, n - 1)
    try:
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], cache=cache.cache,
              use_cache=True, logits_to_keep=1)
        zero_positions(cache.cache, cache.start)
        roots = ids[:, -1]
        tree_ids, tree_positions, ancestors = batch_trees(trees, roots, cache.lengths)
        tree = TreeMask(cache.start.to(device), cache.end.to(device), ancestors.to(device), backend,
                        tree_positions.to(device), layer_overlays(model))
        with checked_forward(model, tree):
            logits = model(input_ids=tree_ids, position_ids=tree_positions, cache=cache.cache, use_cache=True,
                           **tree_inputs(model, tree, cache.length)).logits.float().cpu()
        plain = _plain(model, prompts[0])
    except ValueError as err:
        if str(err).startswith(name):  # the tree check's own refusal
            raise
        raise ValueError(f"{name} cannot run with specdec's cache and tree attention: {err}") from err
    except Exception as err:
        raise ValueError(f"{name} cannot run with specdec's cache and tree attention "
                         f"({type(err).__name__}: {err}); it cannot be served") from err
    worst = max(_close(logits[b, i], want, model.dtype)
                for b, row in enumerate(reference["paths"]) for i, want in enumerate(row))
    if worst > tolerance:
        raise ValueError(
            f"{name}: verifying a probe tree in one forward gives logits {worst:.1e} (relative) away from plain "
            "decoding of each path: the model does not honour the tree mask or the position ids it is given "
            "(e.g. it computes positions itself, or drops attention keywords); it cannot be served exactly")
    if _close(plain, reference["plain"], model.dtype) > tolerance / 10:
        raise ValueError(f"{name}: its own forward changes when tree attention is installed (its code depends on "
                         "the attention implementation's name); it cannot be served exactly")
