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
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation.utils import GenerateDecoderOnlyOutput

from specdec.drafters.base import Drafter, as_drafter
from specdec.engine import NO_DRAFT, decode, prepare_target
from specdec.options import Options
from specdec.sampling import Sampling
from specdec.stats import SpecStats

# generation settings with no speculative equivalent, and the value that means "off"
_UNSUPPORTED = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "num_return_sequences": 1,
    "penalty_alpha": None,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "force_words_ids": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "min_p": None,
    "top_h": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "diversity_penalty": 0.0,
    "length_penalty": 1.0,
    "exponential_decay_length_penalty": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "guidance_scale": None,
    "watermarking_config": None,
    "stop_strings": None,
    "output_scores": False,
    "output_logits": False,
    "output_attentions": False,
    "output_hidden_states": False,
    "prompt_lookup_num_tokens": None,
    "assistant_early_exit": None,
    "use_cache": True,
    "cache_implementation": None,
}
_DEFAULT_NEW_TOKENS = 20  # transformers' default when neither max_new_tokens nor max_length is set


@dataclass
class SpecDecodeOutput(GenerateDecoderOnlyOutput):
    """``model.generate``'s dict output plus ``stats``, the run's :class:`~specdec.stats.SpecStats`."""

    stats: SpecStats | None = None


def _resolve_config(model: PreTrainedModel, generation_config: GenerationConfig | None, kwargs: dict) -> GenerationConfig:
    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    unused = config.update(**kwargs)
    if unused:
        names = ", ".join(sorted(unused))
        raise ValueError(
            f"generate() argument(s) {names} are not supported by specdec.generate: "
            "pass generation settings only (see GenerationConfig) or call model.generate without specdec"
        )
    for name, off in _UNSUPPORTED.items():
        value = getattr(config, name, None)
        if value is not None and value != off:
            raise ValueError(
                f"{name}={value!r} is not supported by speculative decoding: leave it at {off!r} "
                "or call model.generate without specdec"
            )
    return config


def _sampling(config: GenerationConfig) -> Sampling:
    eos = config.eos_token_id
    eos = () if eos is None else tuple([eos] if isinstance(eos, int) else eos)
    if not config.do_sample:  # greedy ignores the sampling-only settings, as transformers does
        return Sampling(eos_token_ids=eos, min_new_tokens=config.min_new_tokens or 0)
    return Sampling(
        do_sample=True,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        eos_token_ids=eos,
        min_new_tokens=config.min_new_tokens or 0,
    )


def _check_ids(input_ids: Tensor, vocab: int) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids of shape {tuple(input_ids.shape)} is empty or not (batch, length): "
            "give at least one prompt token (e.g. the BOS token)"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids have dtype {input_ids.dtype}: pass token ids as an integer tensor (torch.long)")
    bad = (input_ids < 0) | (input_ids >= vocab)
    if bad.any():
        raise ValueError(f"input_ids holds token id {int(input_ids[bad][0])}, outside the model's vocabulary "
                         f"[0, {vocab}): use the model's own tokenizer (padding with a valid id such as pad_token_id)")


def _check_left_padding(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """``(B,)`` real prompt length of each row; raises unless every row is left-padded and non-empty."""
    if attention_mask is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1])
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
        **kwargs: ``max_new_tokens``, ``max_length``, ``min_new_tokens``, ``eos_token_id``,
            ``pad_token_id``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
            ``return_dict_in_generate``; anything else raises ``ValueError``.

    Returns:
        ``(B, n + new)`` token ids, finished rows padded with ``pad_token_id``; with
        ``return_dict_in_generate=True`` a :class:`SpecDecodeOutput` whose ``stats``
        hold drafted / accepted counts, acceptance rate, tau, per-position acceptance
        and time in prefill / draft / verify.
    """
    config = _resolve_config(model, generation_config, kwargs)
    drafter = NO_DRAFT if drafter is None else as_drafter(drafter)
    _check_ids(input_ids, model.get_input_embeddings().weight.shape[0])
    lengths = _check_left_padding(input_ids, attention_mask)
    if streamer is not None and input_ids.shape[0] > 1:
        raise ValueError(f"streamer needs batch size 1, got {input_ids.shape[0]} rows")
    longest = int(lengths.max())
    max_new = config.max_new_tokens
    if max_new is None:
        max_new = config.max_length - input_ids.shape[1] if config.max_length is not None else _DEFAULT_NEW_TOKENS
    options = Options(max_new_tokens=max_new, sampling=_sampling(config), attention_backend=attention_backend,
                      linear_backend=linear_backend, pack_weights=pack_weights, min_verify_tokens=min_verify_tokens,
                      goodput=goodput, cost_model=cost_model)
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
