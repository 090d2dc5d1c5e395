"""The step profiler: its phases cover the step (they add up to the measured loop time), the forward's
split is inside the forward, and a profiled call decodes what an unprofiled one does."""

import pytest
import torch
from omegaconf import OmegaConf

import specdec
from specdec import PromptLookup
from specdec.engine import NO_DRAFT
from specdec.models import load_model
from specdec.tooling.data import Prompt

from conftest import save_with_tokenizer, tiny_llama
from experiments.profile_step import ROWS, profile, table
from experiments.roofline import floor_line, weight_bytes

CFG = OmegaConf.create({"sampling": {"name": "greedy", "do_sample": False}, "max_new_tokens": 40,
                        "attention_backend": "auto", "linear_backend": "auto", "min_verify_tokens": 1})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(save_with_tokenizer(tiny_llama(layers=4, hidden=64), tmp_path_factory.mktemp("tiny")))


def test_phases_add_up_to_the_measured_step(tiny):
    model, tokenizer = tiny
    prompts = [Prompt(i, "t", "t", (" ".join(f"w{(5 + 7 * i + j) % 60 + 3}" for j in range(12)) * 2,))
               for i in range(3)]
    drafters = {"no drafter": NO_DRAFT, "lookup": PromptLookup(k=4)}
    results = profile(model, tokenizer, prompts, drafters, CFG)
    for name, result in results.items():
        times = result["times"]
        assert result["steps"] == times.steps > 0 and result["tokens"] >= result["steps"]
        assert times.forward <= times.verify and times.cache <= times.commit
        assert 0 < times.linear and 0 < times.attention and times.linear + times.attention < times.forward
        phases = sum(get(times) for _, get in ROWS)
        assert phases == pytest.approx(times.total, rel=1e-9)
        assert abs(times.total - result["measured"]) <= 0.05 * result["measured"], name
    assert results["lookup"]["times"].propose > results["no drafter"]["times"].propose  # lookup's drafting counted
    text = table(results, floor=1e-3)
    assert "| cache commit |" in text and "sum / measured" in text


def test_a_profiled_call_decodes_the_same(tiny):
    model, _ = tiny
    ids = torch.tensor([[5, 9, 12, 5, 9, 12, 7, 30]])
    want = specdec.generate(model, ids, PromptLookup(k=4), max_new_tokens=20, eos_token_id=None, pad_token_id=0)
    from specdec.engine import decode
    from specdec.options import Options

    tokens, stats = decode(model, ids, PromptLookup(k=4), Options(max_new_tokens=20, profile=True))
    assert tokens[0] == want[0, ids.shape[1]:].tolist()
    assert stats.times.linear > 0
    _, unprofiled = decode(model, ids, PromptLookup(k=4), Options(max_new_tokens=20))
    assert unprofiled.times.linear == unprofiled.times.attention == 0 and unprofiled.times.steps > 0


def test_the_floor_counts_every_weight_a_step_reads():
    model = tiny_llama(vocab=64, layers=2, hidden=32)  # untied: the input embedding is not read whole
    expected = sum(p.numel() * 4 for name, p in model.named_parameters() if "embed_tokens" not in name)
    assert weight_bytes(model) == expected
    seconds, line = floor_line(model, bandwidth=1e9)
    assert seconds == pytest.approx(expected / 1e9) and "GB/s" in line
