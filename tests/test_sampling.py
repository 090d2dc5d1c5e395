import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from specdec.sampling import Sampling


def test_greedy_is_argmax_and_untouched():
    logits = torch.randn(3, 10)
    tokens, probs = Sampling().choose(logits, 0, None)
    assert probs is None
    assert torch.equal(tokens, logits.argmax(-1))


def test_warpers_match_transformers_order():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    ids = torch.zeros(4, 1, dtype=torch.long)
    expected = TopPLogitsWarper(0.8)(ids, TopKLogitsWarper(10)(ids, TemperatureLogitsWarper(0.7)(ids, logits.clone())))
    got = Sampling(do_sample=True, temperature=0.7, top_k=10, top_p=0.8).process(logits, 0)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.allclose(got[~torch.isinf(got)], expected[~torch.isinf(expected)])


def test_min_new_tokens_masks_eos_per_position():
    logits = torch.zeros(4, 6)
    logits[:, 2] = 10.0  # EOS is everyone's favourite
    sampling = Sampling(eos_token_ids=(2,), min_new_tokens=3)
    tokens, _ = sampling.choose(logits, torch.tensor([1, 2, 3, 4]), None)
    assert tokens[:2].ne(2).all()  # 1 and 2 tokens generated so far: EOS is forbidden
    assert tokens[2:].eq(2).all()  # from the third new token on it is allowed


def test_bad_values_name_themselves():
    import pytest

    with pytest.raises(ValueError, match="temperature=0"):
        Sampling(do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p=1.5"):
        Sampling(do_sample=True, top_p=1.5)
