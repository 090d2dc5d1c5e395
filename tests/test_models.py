import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from specdec import load_model
from specdec.models import embedded_gguf

from conftest import tiny_llama


def test_load_hf_directory(tmp_path):
    vocab = {f"w{i}": i for i in range(64)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0").save_pretrained(tmp_path)
    original = tiny_llama()
    original.save_pretrained(tmp_path)
    model, tokenizer = load_model(tmp_path, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not model.training
    assert tokenizer("w5 w7").input_ids == [5, 7]
    torch.testing.assert_close(model.lm_head.weight.float(), original.lm_head.weight.bfloat16().float())


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_model(tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="dtype 'float33'"):
        load_model("smollm2-135m", dtype="float33")


def test_embedded_gguf_is_shipped():
    path = embedded_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


@pytest.mark.slow
def test_embedded_default_loads(smollm):
    model, tokenizer = smollm
    config = model.config
    assert (config.vocab_size, config.num_hidden_layers, config.hidden_size) == (49152, 30, 576)
    assert model.dtype == torch.float32
    assert tokenizer.decode(tokenizer("Hello world").input_ids) == "Hello world"


def test_conversion_cache_is_keyed_by_content(tmp_path, monkeypatch):
    """The same GGUF bytes at another path (a new virtualenv) reuse the converted copy; other bytes do not."""
    from specdec.models import _dequantized_dir

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    first, moved, other = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf", tmp_path / "c" / "m.gguf"
    for path, content in ((first, b"GGUF" * 1000), (moved, b"GGUF" * 1000), (other, b"GGUF" * 999 + b"gguf")):
        path.parent.mkdir()
        path.write_bytes(content)
    assert _dequantized_dir(first, torch.float32) == _dequantized_dir(moved, torch.float32)
    assert _dequantized_dir(first, torch.float32) != _dequantized_dir(other, torch.float32)
    assert _dequantized_dir(first, torch.float32) != _dequantized_dir(first, torch.bfloat16)
    assert _dequantized_dir(first, torch.float32).parent == tmp_path / "cache"
