"""Every field of transformers' ``GenerationConfig``: honoured by :func:`specdec.generate`, or refused.

One table, three kinds, read by ``generate`` (which refuses before any token), by the test that walks
every field of the installed ``GenerationConfig`` (a field added upstream fails it until it is
classified here), and by the README's settings table (:func:`markdown`):

- **honoured**: applied exactly as ``model.generate`` applies it (greedy output equal token for token,
  sampling with the target's distribution);
- **no effect**: accepted at any value, because it changes nothing in greedy or sampled decoding of a
  decoder-only model, in transformers as here (beam-search-only knobs, metadata, the settings of
  transformers' own assistant that only apply with ``assistant_model``, which is refused);
- **refused**: a ``ValueError`` naming the field unless it is left at its off value.

A field of the installed ``GenerationConfig`` that is in none of them is refused at any value but
``None``, so an upstream addition can never be silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

HONOURED = {
    "max_new_tokens": "output budget per row",
    "max_length": "prompt (padded) + new tokens, as transformers counts it",
    "min_new_tokens": "EOS masked at every position that would end the output too early",
    "min_length": "EOS masked while prompt (padded) + new tokens < min_length",
    "max_time": "stops after the first step that ends past max_time seconds from the start of decoding "
                "(a prefix of the output; its length depends on timing, in transformers as here)",
    "do_sample": "greedy, or lossless speculative sampling",
    "temperature": "transformers' own warper on p and q",
    "top_k": "transformers' own warper on p and q",
    "top_p": "transformers' own warper on p and q",
    "eos_token_id": "an int or a list of ints; ids outside the vocabulary never occur, as in transformers",
    "pad_token_id": "fills finished rows",
    "suppress_tokens": "masked at every position",
    "begin_suppress_tokens": "masked at the first new token",
    "bad_words_ids": "single-token entries masked at every position, EOS ids excepted as in transformers "
                     "(longer sequences are refused)",
    "renormalize_logits": "p is a softmax of the processed scores either way",
    "return_dict_in_generate": "returns SpecDecodeOutput (sequences and stats)",
}

NO_EFFECT = {
    "bos_token_id": "metadata: the prompt already holds it",
    "decoder_start_token_id": "encoder-decoder models only",
    "transformers_version": "metadata",
    "_from_model_config": "metadata",
    "early_stopping": "beam search only",
    "length_penalty": "beam search only",
    "low_memory": "beam search only",
    "compile_config": "transformers' compiled static cache, not used here",
    "disable_compile": "transformers' compiled static cache, not used here",
    "num_assistant_tokens": "transformers' assisted generation only (assistant_model is refused)",
    "num_assistant_tokens_schedule": "transformers' assisted generation only",
    "assistant_confidence_threshold": "transformers' assisted generation only",
    "assistant_lookbehind": "transformers' universal assisted generation only",
    "target_lookbehind": "transformers' universal assisted generation only",
    "max_matching_ngram_size": "transformers' prompt lookup only (prompt_lookup_num_tokens is refused)",
    "assistant_ensemble_weight": "transformers' assisted generation only",
}

REFUSED: dict[str, tuple[Any, str]] = {  # field -> (the value that means off, why)
    "num_beams": (1, "beam search keeps several hypotheses; use model.generate"),
    "num_beam_groups": (1, "group beam search; use model.generate"),
    "num_return_sequences": (1, "repeat the prompt in the batch instead"),
    "diversity_penalty": (0.0, "group beam search; use model.generate"),
    "penalty_alpha": (None, "contrastive search; use model.generate"),
    "dola_layers": (None, "DoLa contrasts layers; use model.generate"),
    "constraints": (None, "constrained beam search; use model.generate"),
    "force_words_ids": (None, "constrained beam search; use model.generate"),
    "repetition_penalty": (1.0, "depends on each draft path's history; not yet applied per tree node"),
    "encoder_repetition_penalty": (1.0, "encoder-decoder only"),
    "no_repeat_ngram_size": (0, "depends on each draft path's history; not yet applied per tree node"),
    "encoder_no_repeat_ngram_size": (0, "encoder-decoder only"),
    "sequence_bias": (None, "depends on each draft path's history; not yet applied per tree node"),
    "exponential_decay_length_penalty": (None, "not yet applied per tree node"),
    "forced_bos_token_id": (None, "not yet applied per tree node"),
    "forced_eos_token_id": (None, "not yet applied per tree node"),
    "min_p": (None, "not yet a warper here"),
    "top_h": (None, "not yet a warper here"),
    "typical_p": (1.0, "not yet a warper here"),
    "epsilon_cutoff": (0.0, "not yet a warper here"),
    "eta_cutoff": (0.0, "not yet a warper here"),
    "guidance_scale": (None, "classifier-free guidance runs a second, unconditional pass"),
    "watermarking_config": (None, "watermarking depends on each draft path's history"),
    "stop_strings": (None, "needs the tokenizer's view of each draft path; stop on eos_token_id instead"),
    "remove_invalid_values": (False, "not yet applied per tree node"),
    "token_healing": (None, "rewrites the prompt; use model.generate"),
    "output_scores": (False, "scores per token are not collected"),
    "output_logits": (False, "logits per token are not collected"),
    "output_attentions": (False, "attentions are not collected"),
    "output_hidden_states": (False, "hidden states are not collected"),
    "prompt_lookup_num_tokens": (None, "transformers' own speculation: pass specdec.PromptLookup as the drafter"),
    "assistant_early_exit": (None, "transformers' own speculation: pass specdec.EarlyExit as the drafter"),
    "speculation_type": (None, "transformers' own speculation: pass a specdec drafter"),
    "use_mtp": (None, "transformers' own multi-token prediction: pass a specdec drafter"),
    "use_cache": (True, "speculative decoding verifies against the KV cache"),
    "cache_implementation": (None, "specdec keeps its own ragged dynamic cache"),
    "cache_config": (None, "specdec keeps its own ragged dynamic cache"),
    "max_cache_len": (None, "specdec keeps its own ragged dynamic cache"),
    "prefill_chunk_size": (None, "chunked prefill changes the prompt's float sums"),
    "continuous_batching_config": (None, "transformers' continuous batching"),
    "is_assistant": (False, "makes model.generate an assistant's (it stops on confidence); use model.generate"),
}


ALSO_OFF = {"cache_implementation": ("dynamic",)}  # what specdec does anyway (Gemma's "hybrid" transformers unsets)


@dataclass(frozen=True)
class Verdict:
    """What ``generate`` does with one field: ``kind`` is honoured, no effect or refused."""

    field: str
    kind: str
    note: str


def verdict(field: str) -> Verdict:
    """The table's entry for ``field`` (an unknown field is refused at any value but ``None``)."""
    if field in HONOURED:
        return Verdict(field, "honoured", HONOURED[field])
    if field in NO_EFFECT:
        return Verdict(field, "no effect", NO_EFFECT[field])
    if field in REFUSED:
        off, why = REFUSED[field]
        return Verdict(field, "refused", f"unless {off!r}: {why}")
    return Verdict(field, "refused", "unknown to specdec (new in transformers?): unless None")


def refusal(field: str, value: Any) -> str | None:
    """Why ``field=value`` is refused, or ``None`` when it is honoured or has no effect."""
    if field in HONOURED or field in NO_EFFECT or value is None:
        return None
    if field in REFUSED:
        off, why = REFUSED[field]
        if value == off or value in ALSO_OFF.get(field, ()):
            return None
        return f"{field}={value!r} is not supported by specdec.generate ({why}): leave it at {off!r}"
    return (f"{field}={value!r} is a GenerationConfig field specdec does not know (new in transformers?): "
            "leave it unset, or call model.generate without specdec")


def markdown(fields) -> str:
    """The README's settings table: one row per field of ``fields`` (the installed GenerationConfig's)."""
    lines = ["| setting | specdec.generate | how, or why not |", "|---|---|---|"]
    order = {"honoured": 0, "no effect": 1, "refused": 2}
    for v in sorted((verdict(f) for f in fields), key=lambda v: (order[v.kind], v.field)):
        lines.append(f"| `{v.field}` | {v.kind} | {v.note.replace('|', '/')} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m specdec.settings: the README's table for the installed transformers
    from transformers import GenerationConfig

    print(markdown(sorted(GenerationConfig().to_dict())))
