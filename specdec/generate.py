"""Drop-in ``generate()``: the arguments of ``model.generate`` in, what it returns out.

``specdec.generate(model, input_ids, drafter=..., **kwargs)`` resolves its settings
exactly as transformers does (the model's ``generation_config``, then a
``generation_config`` argument, then keyword arguments), refuses what speculative
decoding cannot honour with a ``ValueError`` naming the argument, and returns the
same tensor (or, with ``return_dict_in_generate=True``, the same output class plus
``stats``). :func:`speculative` makes one model instance's own ``.generate()`` do this.
"""

from __future__ import annotations

import copy
import numbers
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation.utils import GenerateDecoderOnlyOutput

from specdec.checks import as_int, as_number
from specdec.drafters.base import Drafter, as_drafter
from specdec.engine import NO_DRAFT, decode, prepare_target
from specdec.options import Options
from specdec.sampling import Sampling
from specdec.settings import refusal
from specdec.stats import SpecStats



@dataclass
class SpecDecodeOutput(GenerateDecoderOnlyOutput):
    """``model.generate``'s dict output plus ``stats``, the run's :class:`~specdec.stats.SpecStats`."""

    stats: SpecStats | None = None


def _resolve_config(model: PreTrainedModel, generation_config: GenerationConfig | None,
                    kwargs: dict) -> tuple[GenerationConfig, bool]:
    """transformers' own resolution (``model._prepare_generation_config``: the call's ``generation_config``
    or keywords, over the model's ``generation_config``, over transformers' global defaults), then every
    field checked against :mod:`specdec.settings`: honoured, no effect, or a ``ValueError`` naming it.
    Returns the config and whether ``max_length`` is transformers' default (20 new tokens)."""
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise ValueError(f"generation_config is a {type(generation_config).__name__}, not a "
                         "transformers.GenerationConfig: pass GenerationConfig(**settings), or the settings as "
                         "keyword arguments")
    kwargs = {k: as_int(k, v, optional=True) if k in _INTEGERS else v for k, v in kwargs.items()}  # before
    default_length = (kwargs.get("max_length") is None  # as transformers' generate decides it
                      and (generation_config is None or generation_config.max_length is None)
                      and model.generation_config.max_length is None)
    config, unused = model._prepare_generation_config(generation_config, **kwargs)  # it validates them as numbers
    unused = {k for k in unused if k not in ("output_attentions", "output_hidden_states")}  # refused below
    if unused:
        names = ", ".join(sorted(unused))
        raise ValueError(
            f"generate() argument(s) {names} are not supported by specdec.generate: "
            "pass generation settings only (see GenerationConfig) or call model.generate without specdec"
        )
    for name in GenerationConfig().to_dict():
        why = refusal(name, getattr(config, name, None))
        if why:
            raise ValueError(why)
    for name in _INTEGERS:
        setattr(config, name, as_int(name, getattr(config, name, None), optional=True))
    config.eos_token_id = _token_ids("eos_token_id", config.eos_token_id)
    for name in ("suppress_tokens", "begin_suppress_tokens"):
        setattr(config, name, _token_ids(name, getattr(config, name, None)))
    config.max_time = as_number("max_time", config.max_time, optional=True)
    if config.max_time is not None and not config.max_time > 0:
        raise ValueError(f"max_time={config.max_time!r} must be a number of seconds > 0 (or None)")
    return config, default_length


def _new_tokens(model: PreTrainedModel, config: GenerationConfig, default_length: bool, width: int) -> int:
    """``max_new_tokens`` as transformers derives it: given, else ``max_length`` less the (padded) prompt,
    else transformers' default of ``max_length`` (20) new tokens, within the model's window."""
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    if not default_length:
        return config.max_length - width
    window = getattr(model.config, "max_position_embeddings", None)
    return config.max_length if window is None else min(config.max_length, window - width)


_INTEGERS = ("max_new_tokens", "max_length", "min_new_tokens", "min_length", "top_k", "pad_token_id")


def _token_ids(name: str, value) -> tuple[int, ...] | None:
    """A token id or a list of them (Python or numpy integers, or a tensor), as a tuple."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        value = value.flatten().tolist()
    values = [value] if not isinstance(value, (list, tuple)) else list(value)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"{name}={value!r} must be a token id or a list of token ids (non-negative integers), "
                             f"got {v!r}")
    return tuple(int(v) for v in values)


def _banned(config: GenerationConfig) -> tuple[int, ...]:
    """Tokens masked at every position: ``suppress_tokens`` and the single-token ``bad_words_ids``."""
    bad = config.bad_words_ids or []
    if not isinstance(bad, (list, tuple)) or not all(isinstance(w, (list, tuple)) and w for w in bad):
        raise ValueError(f"bad_words_ids={bad!r} must be a list of non-empty lists of token ids")
    longer = [w for w in bad if len(w) > 1]
    if longer:
        raise ValueError(f"bad_words_ids entry {list(longer[0])} has more than one token: specdec masks single "
                         "tokens only (a longer word depends on each draft path's history); use model.generate")
    eos = set(config.eos_token_id or ())  # transformers' NoBadWordsLogitsProcessor never bans an EOS id
    singles = tuple(t for t in _token_ids("bad_words_ids", [w[0] for w in bad]) or () if t not in eos)
    return tuple(dict.fromkeys((config.suppress_tokens or ()) + singles))


def _sampling(config: GenerationConfig, prompt_width: int) -> Sampling:
    """The call's :class:`Sampling`; ``prompt_width`` is the padded prompt length, from which transformers
    counts ``min_length``."""
    if config.min_new_tokens is not None:  # it takes precedence over min_length, in transformers as here
        min_new = config.min_new_tokens
    else:
        min_new = max(0, (config.min_length or 0) - prompt_width)
    masks = dict(eos_token_ids=config.eos_token_id or (), min_new_tokens=min_new, banned=_banned(config),
                 banned_first=config.begin_suppress_tokens or ())
    if not config.do_sample:  # greedy ignores the sampling-only settings, as transformers does
        return Sampling(**masks)
    return Sampling(do_sample=True, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, **masks)


def _check_ids(input_ids: Tensor, vocab: int) -> None:
    if not isinstance(input_ids, Tensor):
        raise ValueError(f"input_ids is a {type(input_ids).__name__}, not a torch.Tensor: pass token ids as a "
                         "(batch, length) integer tensor, e.g. torch.tensor([ids]) or tokenizer(..., "
                         "return_tensors='pt').input_ids")
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids of shape {tuple(input_ids.shape)} is empty or not (batch, length): "
            "give at least one prompt token (e.g. the BOS token)"
        )
    if input_ids.dtype not in (torch.long, torch.int32):
        raise ValueError(f"input_ids have dtype {input_ids.dtype}: pass token ids as torch.long (or torch.int32), "
                         "e.g. input_ids.long()")
    bad = (input_ids < 0) | (input_ids >= vocab)
    if bad.any():
        raise ValueError(f"input_ids holds token id {int(input_ids[bad][0])}, outside the model's vocabulary "
                         f"[0, {vocab}): use the model's own tokenizer (padding with a valid id such as pad_token_id)")


def _check_left_padding(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """``(B,)`` real prompt length of each row; raises unless every row is left-padded and non-empty."""
    if attention_mask is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1])
    if not isinstance(attention_mask, Tensor):
        raise ValueError(f"attention_mask is a {type(attention_mask).__name__}, not a torch.Tensor: pass the "
                         "tokenizer's mask as a tensor (return_tensors='pt'), or torch.tensor(mask)")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
        )
    values = torch.unique(attention_mask)
    odd = [v for v in values.tolist() if v not in (0, 1)]
    if odd:
        raise ValueError(f"attention_mask holds the value {odd[0]!r}: it must hold only 0 (padding) and 1 (a token), "
                         "as the tokenizer returns it")
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    cols = torch.arange(input_ids.shape[1], device=mask.device)
    left_padded = mask == (cols[None, :] >= input_ids.shape[1] - lengths[:, None])
    for i in range(len(mask)):
        if lengths[i] == 0 or not left_padded[i].all():
            raise ValueError(
                f"row {i} of attention_mask is not left-padded (or is all zeros): pad prompts on the left, "
                "e.g. tokenizer.padding_side = 'left'"
            )
    return lengths.cpu()


def generate(
    model: PreTrainedModel,
    input_ids: Tensor,
    drafter: Drafter | None = None,
    *,
    attention_mask: Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    streamer=None,
    generator: torch.Generator | None = None,
    attention_backend: str = "auto",
    min_verify_tokens: int = 1,
    linear_backend: str = "auto",
    pack_weights: bool = True,
    goodput: bool = True,
    cost_model=None,
    **kwargs,
) -> Tensor | SpecDecodeOutput:
    """Speculative ``model.generate``: identical output, fewer target forwards.

    Greedy output equals ``model.generate(do_sample=False)`` token for token; sampled
    output has exactly the target's distribution.

    Args:
        model: the target causal LM.
        input_ids: ``(B, n)`` prompt ids; rows of a batch are left-padded and verified
            together, each row accepting its own number of tokens per step.
        drafter: a :class:`~specdec.drafters.base.Drafter` (or any object with ``propose(states)``);
            ``None`` decodes plainly through the same engine (a baseline). The call makes its own
            proposer from it, so one drafter object may serve concurrent calls.
        attention_mask: ``(B, n)``, 0 on left padding.
        generation_config: as for ``model.generate``; keyword arguments override it.
        streamer: a transformers streamer (``TextStreamer``, ``TextIteratorStreamer``);
            batch size 1 only, as in transformers.
        generator: random generator for sampling (default: torch's global one, so
            ``torch.manual_seed`` works as with ``model.generate``).
        attention_backend: tree attention: ``"auto"`` (the Triton kernel on CUDA, the torch
            reference elsewhere), ``"triton"`` or ``"reference"``.
        min_verify_tokens: pad verification forwards that carry drafts to at least this many
            tokens (padding is discarded); a speed knob for CPUs whose matrix products are slower
            for 2-4 rows than for 6-8 (see :class:`~specdec.engine.SpeculativeDecoder`).
        linear_backend: how the linear layers of the target and the drafter's networks multiply:
            ``"auto"`` or ``"skinny"`` (as ``(W @ x.T).T`` on CPU, 1.6x faster decoding here; see
            :mod:`specdec.backends.cpu_linear`) or ``"torch"`` (``F.linear`` untouched).
        pack_weights: let those products keep oneDNN-packed copies of large weights (faster for 3+
            rows; costs the weights' memory once more, see :func:`specdec.packed_weights`).
        goodput: each step, draft only as deep as the goodput controller expects to pay, from the
            measured forward cost by width and each row's running acceptance (:mod:`specdec.control`);
            ``False`` always drafts the drafter's own depth.
        cost_model: a :class:`~specdec.control.CostModel` for the controller (default: measured once
            per model, device and thread count, about a second).
        **kwargs: ``GenerationConfig`` fields: each is honoured exactly, has no effect on this kind of
            decoding (as in transformers), or raises ``ValueError`` naming it before any token; the
            table is :mod:`specdec.settings` (and the README's "Generation settings").

    Returns:
        ``(B, n + new)`` token ids, finished rows padded with ``pad_token_id``; with
        ``return_dict_in_generate=True`` a :class:`SpecDecodeOutput` whose ``stats``
        hold drafted / accepted counts, acceptance rate, tau, per-position acceptance
        and time in prefill / draft / verify.
    """
    config, default_length = _resolve_config(model, generation_config, kwargs)
    drafter = NO_DRAFT if drafter is None else as_drafter(drafter)
    _check_ids(input_ids, model.get_input_embeddings().weight.shape[0])
    lengths = _check_left_padding(input_ids, attention_mask)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator={generator!r} must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) "
                         "or None")
    if streamer is not None and input_ids.shape[0] > 1:
        raise ValueError(f"streamer needs batch size 1, got {input_ids.shape[0]} rows")
    longest = int(lengths.max())
    max_new = _new_tokens(model, config, default_length, input_ids.shape[1])
    options = Options(max_new_tokens=max_new, sampling=_sampling(config, input_ids.shape[1]),
                      attention_backend=attention_backend, linear_backend=linear_backend, pack_weights=pack_weights,
                      min_verify_tokens=min_verify_tokens, goodput=goodput, cost_model=cost_model,
                      max_time=config.max_time)
    window = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if window is not None and window > 0 and longest + max_new > window:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={max_new} exceeds the model's context window "
            f"of {window} positions: shorten the prompt or lower max_new_tokens"
        )
    prepare_target(model, options)  # refuses a model whose attention cannot carry the tree
    pad = config.pad_token_id
    if pad is None:
        pad = options.sampling.eos_token_ids[0] if options.sampling.eos_token_ids else 0

    if streamer is not None:
        streamer.put(input_ids.cpu())
    try:
        outputs, stats = decode(model, input_ids, drafter, options, generator, streamer, attention_mask)
    finally:
        if streamer is not None:
            streamer.end()  # an iterator streamer's consumer must never wait forever

    width = max(len(new) for new in outputs)
    padded = torch.full((len(outputs), width), pad, dtype=input_ids.dtype)
    for i, new in enumerate(outputs):
        padded[i, : len(new)] = torch.tensor(new, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids, padded.to(input_ids.device)], dim=1)
    if config.return_dict_in_generate:
        return SpecDecodeOutput(sequences=sequences, stats=stats)
    return sequences


class _Speculative:
    """The ``generate`` that :func:`speculative` puts on one model instance: the drafter of the innermost
    open block of the calling thread (else of the latest open block), for as long as any block is open."""

    def __init__(self, model: PreTrainedModel, previous, had_own: bool) -> None:
        self.model, self.previous, self.had_own = weakref.ref(model), previous, had_own
        self.blocks: list[tuple[object, int, Drafter]] = []  # (block, thread id, drafter), oldest first

    def __call__(self, input_ids=None, **kwargs):
        if input_ids is None:
            input_ids = kwargs.pop("inputs")
        blocks = list(self.blocks)
        mine = [b for b in blocks if b[1] == threading.get_ident()]
        drafter = (mine or blocks)[-1][2]
        return generate(self.model(), input_ids, drafter, **kwargs)


_BLOCKS = threading.Lock()  # opening and closing speculative() blocks on any instance never interleave


@contextmanager
def speculative(model: PreTrainedModel, drafter: Drafter):
    """Make ``model.generate`` speculative on this instance, for the ``with`` block.

    >>> with speculative(model, PromptLookup()):
    ...     out = model.generate(input_ids, max_new_tokens=64)

    Only this instance changes (an attribute that shadows the class's method) and only while a
    block is open: blocks may overlap or nest, in one thread or several, and when the last one closes
    the instance's own ``generate`` is back; transformers itself is never patched.
    """
    drafter = as_drafter(drafter)
    drafter.check(model)
    block = object()
    with _BLOCKS:
        current = vars(model).get("generate")
        if not isinstance(current, _Speculative):
            current = _Speculative(model, current, "generate" in vars(model))
            model.generate = current
        current.blocks.append((block, threading.get_ident(), drafter))
    try:
        yield model
    finally:
        with _BLOCKS:
            current.blocks = [b for b in current.blocks if b[0] is not block]
            if not current.blocks and vars(model).get("generate") is current:
                if current.had_own:
                    model.generate = current.previous
                else:
                    del model.generate
