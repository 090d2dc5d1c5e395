"""The self-distillation set: prompt families deterministic per seed, the builder's rows the target's exact
greedy answers, the cache keyed by what the set depends on, and a set too small for one batch refused."""

from __future__ import annotations

import copy
import hashlib
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from specdec.training import prompts
from specdec.training.distill import DistillSet, DistillSettings, build, report, sequences_file, teacher_pass
from specdec.training.train import chunks

from conftest import tiny_llama

ROOT = Path(__file__).resolve().parent.parent
CODE = "```python\ndef f(x):\n    if x > 1:\n        return x + 1\n    return 0\n```"


def fake_ask(conversations):
    """A stand-in target: a reply that depends only on the conversation (a code block when asked for code)."""
    out = []
    for conv in conversations:
        digest = hashlib.sha1(repr(conv).encode()).hexdigest()[:8]
        code = CODE if "code" in conv[-1]["content"].lower() or "function" in conv[-1]["content"] else ""
        out.append(f"Why is {digest} the answer? Because {digest[::-1]}.\n{code}")
    return out


@pytest.mark.parametrize("family", list(prompts.FAMILIES))
def test_families_are_deterministic_per_seed_and_well_formed(family):
    make = prompts.FAMILIES[family]
    first, again, other = make(30, 0, fake_ask), make(30, 0, fake_ask), make(30, 1, fake_ask)
    assert first == again
    assert first != other
    assert len(first) == 30  # every reply is usable here, so every family returns exactly n rows
    for conv in first:
        assert conv[-1]["role"] == "user" and all(m["content"].strip() for m in conv)
        assert [m["role"] for m in conv] == ["user", "assistant"] * (len(conv) // 2) + ["user"]
    assert len({repr(c) for c in first}) >= 20  # diverse, not one prompt repeated
    assert make(1, 0, fake_ask) and make(0, 0, fake_ask) == []


def test_families_cover_what_they_promise():
    chat = prompts.chat(30, 0, fake_ask)
    assert {len(c) for c in chat} == {1, 3, 5}  # first turns, 2-turn and 3-turn conversations
    coding = prompts.coding(30, 0, fake_ask)
    derived = [c for c in coding if "```" in c[0]["content"]]
    assert derived and any("bug" in c[0]["content"] for c in derived)
    planted = [c for c in derived if "bug" in c[0]["content"]]
    assert all(CODE.split("\n", 1)[1].rsplit("\n", 1)[0] not in c[0]["content"] for c in planted)  # a bug planted
    translate = " ".join(c[0]["content"] for c in prompts.translate(40, 0, fake_ask))
    assert "into English" in translate or "to English" in translate
    math = prompts.math(5, 0)
    questions = [line for line in prompts.GSM8K_TRAIN.read_text().splitlines()]
    assert all(any(m[0]["content"].startswith(q[14:40]) or q[14:40] in m[0]["content"] for q in questions)
               for m in math)
    # a reply the target left empty gives no derived rows, never an empty prompt
    assert all(c[-1]["content"].strip() for f in prompts.FAMILIES.values() for c in f(12, 0, lambda cs: [""] * len(cs)))


def test_family_sizes_and_config_agree():
    sizes = DistillSettings(self_prompts=4, gsm8k_prompts=10).family_sizes()
    assert sum(sizes.values()) == 14 and sizes["math"] == 10 and sum(1 for v in sizes.values() if v) == 5
    full = DistillSettings(rag_prompts=5).family_sizes()
    assert set(full) == set(prompts.FAMILIES) and all(full.values()) and full["rag"] == 5
    assert "rag" not in DistillSettings().family_sizes()  # rag_prompts=0: the sets built before it, same keys
    assert "rag_prompts" not in DistillSettings().key()
    assert DistillSettings(rag_prompts=5).key()["rag_prompts"] == 5
    # the config's data block is the library's defaults, so `python -m specdec.training.distill` builds the very
    # set `python -m experiments.train_drafter` reads from the cache
    data = yaml.safe_load((ROOT / "configs" / "train_drafter.yaml").read_text())["data"]
    defaults = DistillSettings()
    assert {k: v for k, v in data.items() if k != "teacher_layers"} == {
        k: getattr(defaults, k) for k in data if k != "teacher_layers"}


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer like conftest's (``w0`` ... ``w63``) plus one id per word of the prompt templates,
    so that different prompts get different ids (with ``w0`` for every unknown word, most would collide)."""
    words = set()
    for value in vars(prompts).values():
        texts = value if isinstance(value, tuple) else (value,)
        words.update(w for text in texts if isinstance(text, str) for w in re.findall(r"\w+|[^\w\s]+", text))
    vocab = {f"w{i}": i for i in range(64)}
    vocab |= {w: 64 + i for i, w in enumerate(sorted(words - set(vocab)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w0")


@pytest.fixture(scope="module")
def tiny():
    tokenizer = word_tokenizer()
    return tiny_llama(vocab=len(tokenizer), seed=3, layers=3, scale=3.0), tokenizer


SMALL = DistillSettings(gsm8k_prompts=3, self_prompts=21, rag_prompts=12, max_new_tokens=12, batch_size=4,
                        drafter="prompt_lookup")


def assert_greedy_answers(model, data, max_new_tokens, rows=8):
    """The first ``rows`` rows' answers equal model.generate on their prompts, up to and with EOS."""
    eos = model.generation_config.eos_token_id
    for seq, plen in list(zip(data.sequences, data.prompt_lens))[:rows]:
        prompt = seq[None, :plen]
        want = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=max_new_tokens, pad_token_id=0)[0, plen:].tolist()
        if eos in want:  # EOS kept, nothing after it
            want = want[: want.index(eos) + 1]
        assert seq[plen:].tolist() == want


def test_builder_rows_are_the_targets_greedy_answers(tiny, tmp_path):
    model, tokenizer = tiny
    data = build(model, tokenizer, SMALL, tmp_path, progress=False)
    assert set(data.families) == set(prompts.FAMILIES)
    assert len(data.sequences) == len(data.prompt_lens) == len(data.families) >= 20
    assert_greedy_answers(model, data, SMALL.max_new_tokens)
    assert data.info["generated_tokens"] > 0 and data.info["tokens_per_s"] > 0
    assert "total" in report(data)
    path = sequences_file(model, SMALL, tmp_path)
    assert path.is_file() and path.stat().st_size < 200_000
    assert not list(tmp_path.glob("partial-*"))
    stored = torch.load(path)
    assert stored["tokens"].dtype == torch.uint16 and stored["offsets"][-1] == len(stored["tokens"])

    # with the token found in most answers as EOS, rows stop at it, EOS kept (which rows, and how many, depends
    # on the CPU's float rounding of this random model: 7 of 24 here, 4 on CI's machine with the old choice)
    answers = [s[p:].unique() for s, p in zip(data.sequences, data.prompt_lens)]
    frequent = torch.cat(answers).bincount().argmax().item()
    stopping = copy.deepcopy(model)
    stopping.generation_config.eos_token_id = frequent
    stopped = build(stopping, tokenizer, SMALL, cache=False, progress=False)
    ends = [s[-1].item() for s, p in zip(stopped.sequences, stopped.prompt_lens) if len(s) - p < SMALL.max_new_tokens]
    assert len(ends) >= 3 and set(ends) == {frequent}
    assert_greedy_answers(stopping, stopped, SMALL.max_new_tokens, rows=len(stopped.sequences))


def test_cache_is_keyed_by_what_the_set_depends_on(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    first = build(model, tokenizer, SMALL, tmp_path, progress=False)
    speed_only = DistillSettings(**{**SMALL.__dict__, "batch_size": 2, "drafter": "none"})
    assert sequences_file(model, speed_only, tmp_path) == sequences_file(model, SMALL, tmp_path)
    monkeypatch.setattr(sys.modules["specdec.generate"], "generate", lambda *a, **k: pytest.fail("the cached set was rebuilt"))
    again = build(model, tokenizer, speed_only, tmp_path, progress=False)
    assert [s.tolist() for s in again.sequences] == [s.tolist() for s in first.sequences]
    for change in ({"seed": 1}, {"max_new_tokens": 8}, {"self_prompts": 20}, {"gsm8k_prompts": 4}):
        other = DistillSettings(**{**SMALL.__dict__, **change})
        assert sequences_file(model, other, tmp_path) != sequences_file(model, SMALL, tmp_path), change
    another = tiny_llama(vocab=len(tokenizer), seed=4, layers=3, scale=3.0)
    assert sequences_file(another, SMALL, tmp_path) != sequences_file(model, SMALL, tmp_path)


def test_same_settings_build_the_same_set_whatever_the_engine_settings(tiny, tmp_path):
    model, tokenizer = tiny
    settings = DistillSettings(gsm8k_prompts=2, self_prompts=9, max_new_tokens=10, batch_size=5)
    plain = build(model, tokenizer, settings, cache=False, progress=False)
    other = DistillSettings(**{**settings.__dict__, "batch_size": 1, "drafter": "prompt_lookup"})
    assert [s.tolist() for s in build(model, tokenizer, other, cache=False, progress=False).sequences] == [
        s.tolist() for s in plain.sequences]
    changed = build(model, tokenizer, DistillSettings(**{**settings.__dict__, "seed": 1}), cache=False, progress=False)
    assert [s.tolist() for s in changed.sequences] != [s.tolist() for s in plain.sequences]


def test_unknown_build_drafter_is_refused(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="drafter='eagle' is unknown"):
        build(model, tokenizer, DistillSettings(gsm8k_prompts=1, self_prompts=0, drafter="eagle"), cache=False)


def _set(lengths: list[int]) -> DistillSet:
    model = tiny_llama(seed=3, layers=3, scale=3.0)
    gen = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, 64, (n,), generator=gen) for n in lengths]
    return teacher_pass(model, sequences, [1] * len(lengths))


def test_too_small_a_set_is_refused_with_the_sizes_and_the_fix():
    data = _set([20, 30, 12])
    with pytest.raises(ValueError, match=r"3 sequences and holdout=24 .*data.self_prompts"):
        data.check_enough(batch_size=8, seq_len=32, holdout=24)
    with pytest.raises(ValueError, match=r"2 training sequences .* 2 chunks of seq_len=32, fewer than one batch of "
                                         r"batch_size=8: build a larger set"):
        data.check_enough(batch_size=8, seq_len=32, holdout=1)
    with pytest.raises(ValueError, match="x 2 processes"):
        data.check_enough(batch_size=2, seq_len=32, holdout=1, processes=2)
    with pytest.raises(ValueError, match="holdout=0"):
        data.check_enough(batch_size=1, seq_len=32, holdout=0)
    data.check_enough(batch_size=2, seq_len=32, holdout=1)
    data.check_enough(batch_size=4, seq_len=8, holdout=1)  # 20 -> 3 chunks, 30 -> 4


@pytest.mark.parametrize("seq_len", [2, 5, 8, 33])
def test_check_counts_chunks_as_training_cuts_them(seq_len):
    data = _set([2, 3, 9, 16, 17, 40, 5])
    train_part, _ = data.split(2)
    have = len(chunks(train_part, seq_len))
    data.check_enough(batch_size=have, seq_len=seq_len, holdout=2)
    with pytest.raises(ValueError, match=f"make {have} chunks"):
        data.check_enough(batch_size=have + 1, seq_len=seq_len, holdout=2)
