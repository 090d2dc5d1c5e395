"""specdec.export: EAGLE-3 heads out to vLLM's speculators format and back (the same draft logits, bit for
bit, at every depth of the training-time test; greedy decoding unchanged), the config and weights the format
expects, int8 checkpoints dequantized on the way out, clear refusals for what does not map (specdec's own
EAGLE-3 layout, the block drafter, Medusa), and the check against the real speculators package in its own
environment (.venv-speculators; skipped with one line where it is not built)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import specdec
from specdec.drafters.block import BlockDrafter, BlockHead
from specdec.drafters.eagle import Eagle, EagleHead, ReferenceEagle3Head, ttt_mask
from specdec.drafters.medusa import Medusa, MedusaHeads
from specdec.export import (BLOCK_GAP, MEDUSA_GAP, UnsupportedExport, export_checkpoint, export_speculators,
                            load_speculators, main)
from specdec.tooling import speculators_check
from specdec.training.checkpoint import load_checkpoint, save_checkpoint
from specdec.training.train import ttt_unroll

from conftest import attentive, save_with_tokenizer, tiny_llama

FUSED = (1, 2, 3)  # of a 4-layer target: after layers 1, 2 and 3 (not the last, which HF returns normed)
OPTIONS = [{}, {"norm_before_residual": True}, {"norm_output": True}, {"fc_norm": True}, {"norm_before_fc": True}]


@pytest.fixture(scope="module")
def target4():
    return attentive(tiny_llama(layers=4, scale=3.0))


@pytest.fixture(scope="module")
def target_dir(target4, tmp_path_factory):
    """The target as a Hugging Face directory: the verifier speculators reads, and a --target for the CLI."""
    return save_with_tokenizer(target4, tmp_path_factory.mktemp("target"))


def reference_head(target, seed: int = 0, **options) -> ReferenceEagle3Head:
    """A reference-layout head from the target with every weight moved (no identity, no zero half)."""
    return speculators_check.perturbed(ReferenceEagle3Head.from_target(target, FUSED, **options), 0.3, seed)


def sequence(n: int = 40, seed: int = 0):
    return torch.randint(3, 64, (1, n), generator=torch.Generator().manual_seed(seed))


def draft_logits(drafter: Eagle, target, tokens, steps: int = 3):
    """``(steps, n - 1, V)``: the drafter's logits as it binds to ``target``, at every depth of EAGLE-3's
    training-time test over ``tokens (1, n)`` (depth ``s`` reads its own depth ``s - 1`` states)."""
    head, lm = drafter.bind(target)
    with torch.no_grad():
        hidden = target(tokens, output_hidden_states=True).hidden_states
        fused = torch.cat([hidden[layer] for layer in head.fused_layers], dim=-1)
        positions = torch.arange(tokens.shape[1])[None]
        states = ttt_unroll(head, target.get_input_embeddings(), fused, tokens, positions,
                            torch.ones_like(tokens, dtype=torch.bool), steps, mask=ttt_mask)
        return torch.stack([lm(head.logit_states(s))[0] for s in states])


# --- round trip -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: next(iter(o), "plain"))
@pytest.mark.parametrize("reduced", [True, False], ids=["reduced", "full"])
def test_round_trip_gives_the_same_draft_logits(target4, tmp_path, options, reduced):
    vocab = torch.arange(1, 64, 3) if reduced else None
    drafter = Eagle(reference_head(target4, **options), vocab, k=3)
    export_speculators(drafter, target4, tmp_path)
    back = load_speculators(tmp_path, target4)
    assert isinstance(back.head, ReferenceEagle3Head) and back.head.options == drafter.head.options
    assert back.k == 3
    assert (back.vocab is None) == (vocab is None) and (vocab is None or torch.equal(back.vocab, vocab))
    tokens = sequence()
    mine, theirs = draft_logits(drafter, target4, tokens), draft_logits(back, target4, tokens)
    assert torch.isfinite(mine).sum() == 3 * 39 * (64 if vocab is None else len(vocab))
    assert torch.equal(mine, theirs)


def test_imported_head_drafts_like_the_original(target4, tmp_path):
    """Greedy decoding with the imported drafter equals model.generate, step for step as the original (the
    untrained head is rarely accepted on a random target: what it drafts is the logits test's)."""
    head = reference_head(target4)
    original = Eagle(head, torch.arange(0, 64, 2), k=4)
    export_speculators(original, target4, tmp_path)
    back = load_speculators(tmp_path)  # no target at hand: checked when bound
    ids = torch.tensor([[5, 9, 13, 7, 11, 3]])
    expected = target4.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=30,
                                pad_token_id=0, eos_token_id=None)
    runs = [specdec.generate(target4, ids, d, max_new_tokens=30, eos_token_id=None, goodput=False,
                             return_dict_in_generate=True) for d in (original, back)]
    for run in runs:
        assert torch.equal(run.sequences, expected)
    assert runs[0].stats.accept_lengths == runs[1].stats.accept_lengths
    assert runs[0].stats.drafted_at == runs[1].stats.drafted_at and runs[1].stats.drafted > 30


def test_imported_head_keeps_its_own_output_rows(target4, tmp_path):
    """A head trained with its own lm_head (public EAGLE-3 heads may be) drafts with those rows, not the
    target's: changing them in the file changes the drafts."""
    drafter = Eagle(reference_head(target4), torch.arange(0, 64, 2), k=2)
    export_speculators(drafter, target4, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"].flip(0)
    save_file(weights, str(tmp_path / "model.safetensors"))
    tokens = sequence()
    flipped = draft_logits(load_speculators(tmp_path), target4, tokens, steps=1)
    original = draft_logits(drafter, target4, tokens, steps=1)
    assert not torch.equal(flipped, original)
    assert torch.equal(flipped[..., drafter.vocab], original[..., drafter.vocab.flip(0)])


# --- what is written --------------------------------------------------------------------------------------


def test_config_and_weights_are_what_the_format_expects(target4, tmp_path):
    vocab = torch.tensor([0, 1, 2, 7, 30, 63])
    head = reference_head(target4, norm_before_residual=True)
    export_speculators(Eagle(head, vocab, k=5), target4, tmp_path, verifier="some/verifier")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3" and config["architectures"] == ["Eagle3DraftModel"]
    assert config["eagle_aux_hidden_state_layer_ids"] == list(FUSED)
    assert config["draft_vocab_size"] == len(vocab) and config["dtype"] == "float32"
    assert {k: config[k] for k in ("norm_before_residual", "norm_output", "fc_norm", "norm_before_fc")} == {
        "norm_before_residual": True, "norm_output": False, "fc_norm": False, "norm_before_fc": False}
    layer = config["transformer_layer_config"]
    shape = (layer["model_type"], layer["num_hidden_layers"], layer["hidden_size"], layer["vocab_size"])
    assert shape == ("llama", 1, 32, 64)
    assert layer["tie_word_embeddings"] is False and "architectures" not in layer
    spec = config["speculators_config"]
    assert spec["algorithm"] == "eagle3" and spec["proposal_methods"][0]["speculative_tokens"] == 5
    assert spec["verifier"] == {"name_or_path": "some/verifier", "architectures": ["LlamaForCausalLM"]}

    weights = load_file(tmp_path / "model.safetensors")
    layer0 = {f"layers.0.{n}" for n, _ in head.body.layers[0].named_parameters()}
    assert set(weights) == layer0 | {"layers.0.hidden_norm.weight", "fc.weight", "norm.weight", "lm_head.weight",
                                     "embed_tokens.weight", "d2t", "t2d"}
    assert weights["layers.0.self_attn.q_proj.weight"].shape == (32, 64)  # q/k/v read [embedding ; g]: 2H
    assert torch.equal(weights["d2t"] + torch.arange(len(vocab)), vocab)  # target id = index + d2t[index]
    assert weights["d2t"].dtype == torch.int64 and weights["t2d"].dtype == torch.bool
    assert torch.equal(weights["t2d"].nonzero().flatten(), vocab)
    assert torch.equal(weights["lm_head.weight"], target4.lm_head.weight[vocab])
    assert torch.equal(weights["embed_tokens.weight"], target4.get_input_embeddings().weight)
    assert torch.equal(weights["fc.weight"], head.fuse.weight)
    assert torch.equal(weights["layers.0.hidden_norm.weight"], head.hidden_norm.weight)
    assert all(v.dtype == torch.float32 for k, v in weights.items() if k not in ("d2t", "t2d"))


def test_bfloat16_export(target4, tmp_path):
    export_speculators(Eagle(reference_head(target4), torch.arange(8)), target4, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("fc.weight").dtype == torch.bfloat16 and f.get_tensor("d2t").dtype == torch.int64


def test_cli_exports_an_int8_checkpoint_dequantized(target4, target_dir, tmp_path, capsys):
    """A specdec .pt checkpoint of a reference-layout head: the file holds the dequantized int8 weights specdec
    drafts with (not the float weights before packing), and imports back to the same logits."""
    head, vocab = reference_head(target4), torch.arange(0, 64, 2)
    settings = {"target_config": target4.config.to_dict(), "fused_layers": list(FUSED), "layout": "reference",
                "layout_options": head.options}
    ckpt = save_checkpoint(tmp_path / "ref.pt", "eagle", head.state_dict(), settings, target4, vocab, str(target_dir))
    out = tmp_path / "out"
    assert main([str(ckpt), str(out), "--format", "speculators", "--target", str(target_dir),
                 "--verifier", str(target_dir)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    stored = load_checkpoint(ckpt, "eagle")
    weights = load_file(out / "model.safetensors")
    assert torch.equal(weights["fc.weight"], stored["state_dict"]["fuse.weight"])
    assert not torch.equal(weights["fc.weight"], head.fuse.weight)  # int8 rows differ from the float ones
    source = json.loads((out / "specdec.json").read_text())
    assert source["target_fingerprint"] == stored["target_fingerprint"]
    tokens = sequence()
    assert torch.equal(draft_logits(Eagle.from_loaded(stored, k=3), target4, tokens),
                       draft_logits(load_speculators(out, target4), target4, tokens))


def test_the_vllm_peer_serves_a_checkpoint_exported(target4, target_dir, tmp_path):
    """A vLLM peer method naming a specdec checkpoint gets the export as its ``model``; the file it points at
    imports back to the checkpoint's draft logits, and every other key goes to vLLM unchanged."""
    from specdec.tooling.peers import speculative_config

    head, vocab = reference_head(target4), torch.arange(0, 64, 2)
    settings = {"target_config": target4.config.to_dict(), "fused_layers": list(FUSED), "layout": "reference",
                "layout_options": head.options}
    ckpt = save_checkpoint(tmp_path / "ref.pt", "eagle", head.state_dict(), settings, target4, vocab, str(target_dir))
    spec = speculative_config({"method": "eagle3", "checkpoint": str(ckpt), "num_speculative_tokens": 3}, target4,
                              target_dir, tmp_path / "cache")
    assert set(spec) == {"method", "model", "num_speculative_tokens"} and spec["num_speculative_tokens"] == 3
    config = json.loads((Path(spec["model"]) / "config.json").read_text())
    assert config["speculators_config"]["verifier"]["name_or_path"] == str(target_dir)
    tokens = sequence()
    assert torch.equal(draft_logits(Eagle.from_loaded(load_checkpoint(ckpt, "eagle"), k=3), target4, tokens),
                       draft_logits(load_speculators(spec["model"], target4), target4, tokens))
    plain = {"method": "ngram", "num_speculative_tokens": 5}
    assert speculative_config(plain, target4, target_dir, tmp_path) == plain
    assert speculative_config(None, target4, target_dir, tmp_path) is None


# --- refusals ---------------------------------------------------------------------------------------------


def test_specdec_layout_is_refused_with_the_gap(target4, tmp_path):
    with pytest.raises(UnsupportedExport, match="reference layout") as err:
        export_speculators(Eagle(EagleHead.from_target(target4, FUSED)), target4, tmp_path / "out")
    assert "RMSNorm of the projected pair is not linear" in str(err.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UnsupportedExport, match="EAGLE-1"):
        export_speculators(Eagle(EagleHead.from_target(target4, None)), target4, tmp_path / "out")


def test_shipped_head_is_refused_by_the_cli(tmp_path, capsys):
    """The shipped eagle-smollm2-135m is specdec's layout: one clear line, exit 2, nothing written (and no
    target loaded for nothing)."""
    assert main(["eagle-smollm2-135m", str(tmp_path / "out"), "--format", "speculators"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("specdec.export: not exported:") and "eagle-smollm2-135m.pt" in err
    assert "ReferenceEagle3Head" in err and not (tmp_path / "out").exists()


def test_cli_names_a_bad_checkpoint(tmp_path, capsys):
    assert main(["no-such-head", str(tmp_path / "out")]) == 1
    assert "no shipped drafter checkpoint 'no-such-head'" in capsys.readouterr().err
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    assert main([str(tmp_path / "broken.pt"), str(tmp_path / "out")]) == 1
    assert "cannot be read" in capsys.readouterr().err


def test_block_drafter_and_medusa_are_refused(target4, tmp_path, capsys):
    block = BlockDrafter(BlockHead.from_target(target4, FUSED), k=4)
    with pytest.raises(UnsupportedExport, match="dflash") as err:
        export_speculators(block, target4, tmp_path)
    assert str(err.value) == BLOCK_GAP
    with pytest.raises(UnsupportedExport, match="no Medusa type"):
        export_speculators(Medusa(MedusaHeads(32, 2)), target4, tmp_path)
    settings = {"target_config": target4.config.to_dict(), "fused_layers": list(FUSED), "layers": 1, "block": 4}
    path = save_checkpoint(tmp_path / "block.pt", "block", block.head.state_dict(), settings, target4, None, "tiny")
    assert main([str(path), str(tmp_path / "out")]) == 2
    assert "mask_token_id" in capsys.readouterr().err
    path = save_checkpoint(tmp_path / "medusa.pt", "medusa", MedusaHeads(32, 2).state_dict(),
                           {"hidden": 32, "heads": 2}, target4, None, "tiny")
    with pytest.raises(UnsupportedExport, match=MEDUSA_GAP.split(" (")[0]):
        export_checkpoint(path, tmp_path / "out")
    with pytest.raises(ValueError, match="format 'onnx'"):
        export_checkpoint(path, tmp_path / "out", format="onnx")


def test_import_refuses_what_it_cannot_load(target4, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_speculators(tmp_path / "missing")
    (tmp_path / "dflash").mkdir()
    (tmp_path / "dflash" / "config.json").write_text(json.dumps({"speculators_model_type": "dflash"}))
    with pytest.raises(ValueError, match="'dflash' checkpoint; specdec imports 'eagle3' only"):
        load_speculators(tmp_path / "dflash")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a speculators checkpoint"):
        load_speculators(tmp_path / "plain")
    good = tmp_path / "good"
    export_speculators(Eagle(reference_head(target4), torch.arange(8)), target4, good)
    with pytest.raises(ValueError, match="hidden 32 / vocab 64, but the target has hidden 48"):
        load_speculators(good, tiny_llama(layers=4, hidden=48))
    weights = load_file(good / "model.safetensors")
    weights["layers.0.self_attn.q_proj.weight"] = weights["layers.0.self_attn.q_proj.weight"][:, :32].contiguous()
    save_file(weights, str(good / "model.safetensors"))
    with pytest.raises(ValueError, match="other shapes.*q_proj"):
        load_speculators(good)


# --- the real speculators package --------------------------------------------------------------------------


def spec_env():
    if not speculators_check.SPEC_PYTHON.exists():
        pytest.skip(speculators_check.MISSING)


def test_speculators_loads_the_export_and_agrees(target4, target_dir, tmp_path):
    """speculators' own Eagle3DraftModel, loaded from the exported directory unchanged, gives specdec's draft
    logits at every position of 3 depths (its default flex attention wants 128-multiple lengths); a file with
    the first layer's [embedding ; g] halves swapped is caught (the check can fail)."""
    spec_env()
    head, vocab = reference_head(target4), torch.arange(1, 64, 2)
    speculators_check.prepare(target4, head, vocab, sequence(129), tmp_path, steps=3, verifier=str(target_dir))
    result = speculators_check.run_compare(tmp_path)
    print(json.dumps(result))
    assert result["ok"] and result["class"] == "Eagle3DraftModel" and result["top1_equal"] == "384/384"
    assert result["max_abs_diff"] <= 1e-4 * max(1.0, result["max_abs_logit"]) and result["d2t_maps_to_specdec_ids"]

    weights = load_file(tmp_path / "head" / "model.safetensors")
    for name in ("q_proj", "k_proj", "v_proj"):
        w = weights[f"layers.0.self_attn.{name}.weight"]
        weights[f"layers.0.self_attn.{name}.weight"] = torch.cat([w[:, 32:], w[:, :32]], dim=1).contiguous()
    save_file(weights, str(tmp_path / "head" / "model.safetensors"))
    swapped = speculators_check.run_compare(tmp_path, attn="eager")
    assert not swapped["ok"] and swapped["max_abs_diff"] > 1e-2


@pytest.mark.slow
def test_speculators_agrees_on_smollm(tmp_path, capsys):
    """The real check: SmolLM2-135M's features, the shipped reference-layout head (trained) and its 8192-token
    vocabulary, 128 positions x 3 depths."""
    spec_env()
    code = speculators_check.main(["smollm", "--out", str(tmp_path), "--tokens", "128",
                                   "--checkpoint", "eagle3-reference-smollm2-135m"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    print(line)
    result = json.loads(line)
    assert code == 0 and result["ok"] and result["draft_vocab"] == 8192
