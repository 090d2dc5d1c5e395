"""Drop-in means every argument (issue 21): each ``GenerationConfig`` field is honoured exactly or refused
before any token, every input is checked where it enters, and a malformed draft is a ``ValueError``, never
a biased output.

The settings sweep walks the fields of the *installed* ``GenerationConfig``: a field added upstream fails
it until :mod:`specdec.settings` classifies it and this file gives it a value.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CompileConfig, GenerationConfig

import specdec
from specdec import PromptLookup
from specdec.settings import HONOURED, NO_EFFECT, REFUSED, markdown, verdict

from conftest import Recorder, attentive, tiny_llama

IDS = torch.tensor([[5, 9, 12, 5, 9, 12, 5, 9, 30, 11]])  # repeats: prompt lookup drafts


@pytest.fixture(scope="module")
def model():
    return attentive(tiny_llama(seed=3, layers=2))


@pytest.fixture(scope="module")
def plain(model):
    """The reference greedy continuation with no EOS, and its first few tokens (used to pick values that
    change model.generate's output)."""
    out = model.generate(IDS, attention_mask=torch.ones_like(IDS), do_sample=False, max_new_tokens=12,
                         eos_token_id=None, pad_token_id=0)
    return out[0, IDS.shape[1]:].tolist()


def values(plain: list[int]) -> dict:
    """Per field, a value that changes ``model.generate``'s greedy output where one exists (else a value
    other than the off one). ``plain[1]`` is an early token of the plain output, used as EOS."""
    first, early = plain[0], plain[1]
    n = IDS.shape[1]
    return {
        # honoured
        "max_new_tokens": 5, "max_length": n + 4, "min_new_tokens": 6, "min_length": n + 6,
        "max_time": 1e-9, "do_sample": True, "temperature": 1e-4, "top_k": 1, "top_p": 1e-6,
        "eos_token_id": [early, 63], "pad_token_id": 3, "suppress_tokens": [first], "begin_suppress_tokens": [first],
        "bad_words_ids": [[early]], "renormalize_logits": True, "return_dict_in_generate": True,
        # no effect
        "bos_token_id": 7, "decoder_start_token_id": 7, "transformers_version": "4.0.0", "_from_model_config": True,
        "early_stopping": True, "length_penalty": 2.0, "low_memory": True,
        "compile_config": CompileConfig(fullgraph=False), "disable_compile": True, "num_assistant_tokens": 3,
        "num_assistant_tokens_schedule": "constant", "assistant_confidence_threshold": 0.2,
        "assistant_lookbehind": 5, "target_lookbehind": 5, "max_matching_ngram_size": 3,
        "assistant_ensemble_weight": 0.5,
        # refused
        "num_beams": 2, "num_beam_groups": 2, "num_return_sequences": 2, "diversity_penalty": 0.5,
        "penalty_alpha": 0.6, "dola_layers": "low", "constraints": ["c"], "force_words_ids": [[5]],
        "repetition_penalty": 1.3, "encoder_repetition_penalty": 1.3, "no_repeat_ngram_size": 2,
        "encoder_no_repeat_ngram_size": 2, "sequence_bias": {(first,): -10.0},
        "exponential_decay_length_penalty": (2, 1.5), "forced_bos_token_id": 5, "forced_eos_token_id": 5,
        "min_p": 0.1, "top_h": 0.5, "typical_p": 0.5, "epsilon_cutoff": 3e-4, "eta_cutoff": 3e-4,
        "guidance_scale": 1.5, "watermarking_config": {"greenlist_ratio": 0.5}, "stop_strings": "w5",
        "remove_invalid_values": True, "token_healing": True, "output_scores": True, "output_logits": True,
        "output_attentions": True, "output_hidden_states": True, "prompt_lookup_num_tokens": 3,
        "assistant_early_exit": 1, "speculation_type": "mtp", "use_mtp": True, "use_cache": False,
        "cache_implementation": "static", "cache_config": {"max_cache_len": 64}, "max_cache_len": 64,
        "prefill_chunk_size": 4, "continuous_batching_config": {"block_size": 16}, "is_assistant": True,
    }


FIELDS = sorted(GenerationConfig().to_dict())
BASE = {"max_new_tokens": 12, "pad_token_id": 0}  # every call: 12 tokens unless the field says otherwise
SAMPLED_AS_GREEDY = {"do_sample", "temperature", "top_k", "top_p"}  # a value that makes sampling greedy


def test_the_table_knows_every_installed_field_and_nothing_else():
    known = set(HONOURED) | set(NO_EFFECT) | set(REFUSED)
    assert not set(FIELDS) - known, f"new GenerationConfig fields to classify in specdec.settings: {set(FIELDS) - known}"
    assert not known - set(FIELDS), f"fields in specdec.settings that transformers no longer has: {known - set(FIELDS)}"
    assert not (set(HONOURED) & set(NO_EFFECT) or set(HONOURED) & set(REFUSED) or set(NO_EFFECT) & set(REFUSED))


@pytest.mark.parametrize("field", FIELDS)
def test_every_generation_setting_is_honoured_or_refused_before_any_token(model, plain, field):
    value = values(plain)[field]
    kind = verdict(field).kind
    kwargs = {**BASE, field: value}
    if field == "max_length":  # max_new_tokens wins over it, in transformers as here
        kwargs.pop("max_new_tokens")
    if field in SAMPLED_AS_GREEDY:  # sampling so narrow it must give the greedy output, or the setting is lost
        kwargs = {**BASE, "do_sample": True, "top_k": 1} if field == "do_sample" else {**BASE, "do_sample": True,
                                                                                       field: value}
    if kind == "refused":
        streamer = Recorder()
        with pytest.raises(ValueError, match=field):
            specdec.generate(model, IDS, PromptLookup(k=3), streamer=streamer, **kwargs)
        assert streamer.chunks in ([], [IDS[0].tolist()])  # nothing but the prompt was streamed
        return
    got = specdec.generate(model, IDS, PromptLookup(k=3), **kwargs)
    reference_kwargs = {k: v for k, v in kwargs.items() if k not in SAMPLED_AS_GREEDY}
    expected = model.generate(IDS, attention_mask=torch.ones_like(IDS), do_sample=False, **reference_kwargs)
    if field == "return_dict_in_generate":
        got, expected = got.sequences, expected.sequences
    if field == "max_time":  # stops after the first step past the deadline: a prefix, as transformers' is
        full = model.generate(IDS, attention_mask=torch.ones_like(IDS), do_sample=False, **BASE)
        assert expected.shape[1] == IDS.shape[1] + 1
        assert IDS.shape[1] < got.shape[1] < full.shape[1] and torch.equal(got, full[:, : got.shape[1]])
        plain_engine = specdec.generate(model, IDS, None, **kwargs)
        assert torch.equal(plain_engine, expected)  # one token per step: exactly transformers' one token
        return
    assert torch.equal(got, expected), (field, got.tolist(), expected.tolist())


def test_honoured_values_do_change_the_output(model, plain):
    """The sweep's values are not idle: each honoured masking setting changes model.generate's output."""
    v = values(plain)
    base = model.generate(IDS, attention_mask=torch.ones_like(IDS), do_sample=False, eos_token_id=v["eos_token_id"],
                          **BASE)
    for field in ("min_new_tokens", "min_length"):
        changed = model.generate(IDS, attention_mask=torch.ones_like(IDS), do_sample=False,
                                 eos_token_id=v["eos_token_id"], **{**BASE, field: v[field]})
        assert not torch.equal(changed, base), field
    free = model.generate(IDS, attention_mask=torch.ones_like(IDS), do_sample=False, **BASE)
    for field in ("suppress_tokens", "begin_suppress_tokens", "bad_words_ids", "max_new_tokens", "max_length"):
        kwargs = {**BASE, field: v[field]}
        if field == "max_length":
            kwargs.pop("max_new_tokens")
        changed = model.generate(IDS, attention_mask=torch.ones_like(IDS), do_sample=False, **kwargs)
        assert not torch.equal(changed, free), field


def test_min_length_with_eos_masked_as_transformers_does(model, plain):
    """The probe's repro: EOS early in the output, ``min_length`` past the prompt + 20 tokens."""
    eos = [plain[0], 7]
    for config in (dict(min_length=IDS.shape[1] + 20), dict(generation_config=GenerationConfig(
            min_length=IDS.shape[1] + 20, max_new_tokens=30, eos_token_id=eos, pad_token_id=0))):
        kw = dict(max_new_tokens=30, eos_token_id=eos, pad_token_id=0) | config
        got = specdec.generate(model, IDS, PromptLookup(k=3), **kw)
        expected = model.generate(IDS, attention_mask=torch.ones_like(IDS), do_sample=False, **kw)
        assert torch.equal(got, expected) and got.shape[1] > IDS.shape[1] + 20


def test_the_readme_settings_table_is_generated_from_the_table():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown(FIELDS) in readme, "README's settings table is stale: paste `python -m specdec.settings`"


# --- values and types, checked where they enter -------------------------------------------------------


def test_eos_token_id_as_a_string_is_refused(model):
    with pytest.raises(ValueError, match="eos_token_id='2' must be a token id"):
        specdec.generate(model, IDS, PromptLookup(), max_new_tokens=5, eos_token_id="2")


def test_out_of_vocabulary_eos_is_ignored_as_transformers_does(model, plain):
    kw = dict(max_new_tokens=12, eos_token_id=[plain[2], 1000], min_new_tokens=4, pad_token_id=0)
    got = specdec.generate(model, IDS, PromptLookup(k=3), **kw)
    expected = model.generate(IDS, attention_mask=torch.ones_like(IDS), do_sample=False, **kw)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("value", [np.int64(5), 5.0, np.int32(5)])
def test_integer_settings_take_numpy_and_whole_floats_as_transformers_does(model, value):
    got = specdec.generate(model, IDS, PromptLookup(), max_new_tokens=value, pad_token_id=0)
    expected = model.generate(IDS, attention_mask=torch.ones_like(IDS), do_sample=False, max_new_tokens=5,
                              pad_token_id=0)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("value, message", [("8", "max_new_tokens='8' must be an integer"),
                                            (5.5, "max_new_tokens=5.5 must be an integer")])
def test_integer_settings_of_another_type_are_refused(model, value, message):
    with pytest.raises(ValueError, match=message):
        specdec.generate(model, IDS, PromptLookup(), max_new_tokens=value)


@pytest.mark.parametrize("ids, message", [
    ([[5, 9, 12]], "input_ids is a list, not a torch.Tensor"),
    (np.array([[5, 9, 12]]), "input_ids is a ndarray, not a torch.Tensor"),
    (None, "input_ids is a NoneType, not a torch.Tensor"),
    (torch.empty(0, 5, dtype=torch.long), r"input_ids of shape \(0, 5\) is empty"),
    (torch.tensor([[5, 9, 12]], dtype=torch.uint8), "input_ids have dtype torch.uint8: pass token ids as torch.long"),
    (torch.tensor([[5, 9, 12]], dtype=torch.int16), "input_ids have dtype torch.int16"),
])
def test_bad_input_ids_are_refused_naming_them(model, ids, message):
    with pytest.raises(ValueError, match=message):
        specdec.generate(model, ids, PromptLookup(), max_new_tokens=5)


def test_attention_mask_as_a_list_is_refused(model):
    with pytest.raises(ValueError, match="attention_mask is a list, not a torch.Tensor"):
        specdec.generate(model, IDS, PromptLookup(), attention_mask=[[1] * IDS.shape[1]], max_new_tokens=5)


def test_generation_config_as_a_dict_is_refused(model):
    with pytest.raises(ValueError, match="generation_config is a dict, not a transformers.GenerationConfig"):
        specdec.generate(model, IDS, PromptLookup(), generation_config={"max_new_tokens": 5})


def test_generator_of_another_type_is_refused_before_decoding(model):
    streamer = Recorder()
    with pytest.raises(ValueError, match="generator=123 must be a torch.Generator"):
        specdec.generate(model, IDS, PromptLookup(), max_new_tokens=5, do_sample=True, generator=123,
                         streamer=streamer)
    assert streamer.chunks == []


@pytest.mark.parametrize("k", [2.5, None, "4", True])
def test_prompt_lookup_k_is_checked_in_the_constructor(k):
    with pytest.raises(ValueError, match="PromptLookup k=.* must be an integer"):
        PromptLookup(k=k)


@pytest.mark.parametrize("make, message", [
    (lambda: specdec.DraftTree(torch.tensor([5, 6]), torch.tensor([-1.0, 0.0])), "tree parents of torch.float32"),
    (lambda: specdec.DraftTree(torch.tensor([5.7, 6.2]), torch.tensor([-1, 0])), "tree tokens of torch.float32"),
    (lambda: specdec.DraftTree([5, 6], torch.tensor([-1, 0])), "tree tokens of list"),
    (lambda: specdec.DraftTree(torch.tensor([5]), torch.tensor([-1]), torch.ones(1, 64, dtype=torch.long)),
     "tree q of torch.int64"),
])
def test_draft_tree_dtypes_are_checked_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


class _ZeroOwnQ(specdec.Drafter):
    """Drafts token 5 with a q that gives 5 probability 0 (impossible if 5 was drawn from q)."""

    def propose(self, states):
        q = torch.full((1, 64), 1 / 63)
        q[0, 5] = 0.0
        return [specdec.DraftTree.chain(torch.tensor([5]), q) for _ in states]


def test_a_q_giving_the_drafted_token_zero_is_refused_not_biased(model):
    streamer = Recorder()
    with pytest.raises(ValueError, match="drafted token 5, to which its own q gives probability 0"):
        specdec.generate(model, IDS, _ZeroOwnQ(), max_new_tokens=10, do_sample=True, streamer=streamer,
                         generator=torch.Generator().manual_seed(0))
    assert streamer.chunks == [IDS[0].tolist()]  # the prompt only
    again = specdec.generate(model, IDS, PromptLookup(k=3), max_new_tokens=10, pad_token_id=0)  # nothing corrupted
    assert torch.equal(again, model.generate(IDS, attention_mask=torch.ones_like(IDS), do_sample=False,
                                             max_new_tokens=10, pad_token_id=0))


# --- checkpoints: the file named, and what is wrong with it -----------------------------------------------


def _copy_shipped(tmp_path, name="medusa-smollm2-135m"):
    from specdec.training.checkpoint import checkpoint_path

    path = tmp_path / f"{name}.pt"
    path.write_bytes(checkpoint_path(name).read_bytes())
    return path


def test_truncated_corrupted_and_text_checkpoints_name_the_file(tmp_path):
    good = _copy_shipped(tmp_path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    corrupted = tmp_path / "corrupted.pt"
    data = bytearray(good.read_bytes())
    data[100:4000] = bytes(3900)
    corrupted.write_bytes(bytes(data))
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint\n")
    for path in (truncated, corrupted, text):
        with pytest.raises(ValueError, match=f"{path.name}' cannot be read .*truncated, corrupted or not a torch "):
            specdec.drafters.Medusa.from_checkpoint(str(path))


def test_a_checkpoint_missing_a_weight_or_a_setting_names_the_file_and_the_problem(tmp_path):
    good = _copy_shipped(tmp_path, "eagle-smollm2-135m")
    ckpt = torch.load(good, weights_only=True)
    missing = dict(ckpt, state_dict={k: v for i, (k, v) in enumerate(ckpt["state_dict"].items()) if i})
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="missing.pt' does not fit its eagle drafter .*Missing key"):
        specdec.drafters.Eagle.from_checkpoint(str(tmp_path / "missing.pt"))
    torch.save(dict(ckpt, settings={}), tmp_path / "settings.pt")
    with pytest.raises(ValueError, match="settings.pt' has bad settings: a eagle checkpoint needs target_config"):
        specdec.drafters.Eagle.from_checkpoint(str(tmp_path / "settings.pt"))
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt' is not a specdec drafter checkpoint"):
        specdec.drafters.Eagle.from_checkpoint(str(tmp_path / "other.pt"))


# --- the masking settings keep the target's law when sampling -------------------------------------------


MASKED = dict(do_sample=True, temperature=0.9, eos_token_ids=(5,), min_new_tokens=2, banned=(1,), banned_first=(3,))


def _masked_joint(model, sampling) -> torch.Tensor:
    """The target's exact law of the first three tokens under ``sampling`` (position-dependent masks)."""
    import itertools

    from test_lossless_sampling import N_TOKENS, PROMPT, V

    seqs = torch.tensor(list(itertools.product(range(V), repeat=N_TOKENS)))  # (V^3, 3)
    ids = torch.cat([PROMPT.expand(len(seqs), -1), seqs], dim=1)
    with torch.no_grad():
        logits = model(ids).logits[:, PROMPT.shape[1] - 1 : -1]  # (V^3, 3, V)
    probs = torch.stack([sampling.probs(logits[:, t], t) for t in range(N_TOKENS)], dim=1)  # (V^3, 3, V)
    return probs.gather(-1, seqs[..., None]).squeeze(-1).prod(dim=-1)


@pytest.mark.parametrize("name", ["draft_tree"])  # sampled siblings: the masks act on q as on p
def test_masking_settings_keep_the_target_law_when_sampling(name):
    """min_new_tokens with EOS, suppress_tokens / bad_words_ids (``banned``) and begin_suppress_tokens
    (``banned_first``), sampled through trees: the chi-square test of the lossless-sampling suite passes,
    and ignoring the masks (a plain Sampling) fails it."""
    import test_lossless_sampling as law
    from specdec.engine import decode
    from specdec.options import Options
    from specdec.sampling import Sampling

    target, small = tiny_llama(vocab=law.V, seed=10, scale=4.0), tiny_llama(vocab=law.V, seed=11, layers=1, scale=4.0)
    drafter = law.drafters(small, target)[name]
    sampling = Sampling(**MASKED)
    exact = _masked_joint(target, sampling)

    def counts(used, n):
        gen = torch.Generator().manual_seed(99)
        out = torch.zeros(law.V ** law.N_TOKENS)
        options = Options(max_new_tokens=law.N_TOKENS, sampling=used, goodput=False)
        for _ in range(n):
            (tokens,), _ = decode(target, law.PROMPT, drafter, options, gen)
            tokens = tokens + [5] * (law.N_TOKENS - len(tokens))  # an EOS-ended row: padded with EOS (prob 1 after)
            index = 0
            for tok in tokens[: law.N_TOKENS]:
                index = index * law.V + tok
            out[index] += 1
        return out

    assert law.chi2_pvalue(counts(sampling, 2000), exact) > 1e-3
    unmasked = Sampling(do_sample=True, temperature=0.9, eos_token_ids=(5,))
    assert law.chi2_pvalue(counts(unmasked, 400), exact) < 1e-6  # banned tokens appear: impossible under the law


# --- settings resolved as transformers resolves them ------------------------------------------------------


def _both(model, drafter=None, **kw):
    got = specdec.generate(model, IDS, drafter or PromptLookup(k=3), **kw)
    expected = model.generate(IDS, attention_mask=torch.ones_like(IDS), **kw)
    return got, expected


def test_bad_words_never_ban_an_eos_id_as_transformers(model, plain):
    got, expected = _both(model, max_new_tokens=12, eos_token_id=plain[1], bad_words_ids=[[plain[1]]],
                          pad_token_id=0, do_sample=False)
    assert torch.equal(got, expected) and expected.shape[1] < IDS.shape[1] + 12  # EOS still ends it


@pytest.mark.parametrize("min_new", [0, 1, 3])
def test_min_new_tokens_takes_precedence_over_min_length(model, plain, min_new):
    got, expected = _both(model, max_new_tokens=12, eos_token_id=plain[1], min_new_tokens=min_new,
                          min_length=IDS.shape[1] + 8, pad_token_id=0, do_sample=False)
    assert torch.equal(got, expected)


def test_a_generation_config_without_eos_takes_the_models(model, plain):
    """transformers fills a given generation_config's unset fields from model.generation_config."""
    import copy

    mine = copy.deepcopy(model)
    mine.generation_config = GenerationConfig(eos_token_id=plain[1], pad_token_id=0)
    got, expected = _both(mine, generation_config=GenerationConfig(max_new_tokens=12, do_sample=False))
    assert torch.equal(got, expected) and expected.shape[1] == IDS.shape[1] + 2  # stopped at the model's EOS


def test_default_length_is_transformers_twenty_new_tokens(model):
    got, expected = _both(model, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(got, expected) and got.shape[1] == IDS.shape[1] + 20


@pytest.mark.parametrize("kw", [{}, {"temperature": 0.7}, {"top_p": 0.8, "top_k": 5}])
def test_sampling_defaults_are_transformers_same_seed_same_tokens(model, kw):
    """Plain decoding through the engine draws as transformers does (one multinomial per token from the same
    processed p): with the same seed the same tokens, so transformers' defaults (top_k=50 when unset)
    are applied here too. A missing default would change p, and the draws with it."""
    for seed in range(3):
        torch.manual_seed(seed)
        got = specdec.generate(model, IDS, None, do_sample=True, max_new_tokens=10, eos_token_id=None,
                               pad_token_id=0, **kw)
        torch.manual_seed(seed)
        expected = model.generate(IDS, attention_mask=torch.ones_like(IDS), do_sample=True, max_new_tokens=10,
                                  eos_token_id=None, pad_token_id=0, **kw)
        assert torch.equal(got, expected), (seed, kw)


def test_gemma_hybrid_cache_implementation_from_the_hub_is_accepted(model):
    """Gemma-2/3 hub configs carry cache_implementation="hybrid", which transformers unsets."""
    import copy

    mine = copy.deepcopy(model)
    mine.generation_config.cache_implementation = "hybrid"
    got, expected = _both(mine, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)
