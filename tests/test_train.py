"""Training drafters on a tiny target: the loss falls, checkpoints round-trip, another target is refused,
and the training command runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import specdec
from specdec.training.checkpoint import fingerprint, save_checkpoint
from specdec.training.distill import DistillSet, loop_start, teacher_pass
from specdec.drafters import BlockDrafter, Distilled, Eagle, EarlyExit, Medusa
from specdec.drafters.base import DecodeState
from specdec.drafters.eagle import EagleHead, ReferenceEagle3Head
from specdec.drafters.pard import Pard, mask_blocks
from specdec.drafters.prompt_lookup import PromptLookup, lookup_hits
from specdec.sampling import Sampling
from specdec.drafters.vocab import ReducedHead, frequent_tokens
from specdec.training.train import (KINDS, Chunk, Objective, TrainSettings, aimed, collate, chunks, evaluate,
                                    length_batched, module_settings, train, trained_weights, ttt_unroll)
from specdec.tree import TreeSpec

from conftest import save_with_tokenizer, tiny_llama

ROOT = Path(__file__).resolve().parent.parent
FROM_CHECKPOINT = {"eagle": Eagle, "medusa": Medusa, "early_exit": EarlyExit, "draft_model": Distilled, "pard": Pard,
                   "block": BlockDrafter}
EAGLE3 = {"fused_layers": (1, 2, 3), "unroll": 3}  # the tiny teacher's hidden states after layers 1, 2, 3
BLOCK = {"fused_layers": (1, 2, 3), "block": 4, "anchors": 8, "lr": 1e-2}  # the block head reads the layers EAGLE-3 does
VARIANTS = [(kind, BLOCK if kind == "block" else {}) for kind in KINDS] + [("eagle", EAGLE3)]  # eagle alone: EAGLE-1 (feature regression)
VARIANT_IDS = [kind for kind in KINDS] + ["eagle3"]


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(seed=3, layers=3, scale=3.0)


@pytest.fixture(scope="module")
def distill_set(teacher):
    """The teacher's greedy answers to 40 random prompts, and its hidden states over them."""
    gen = torch.Generator().manual_seed(0)
    sequences, prompt_lens = [], []
    for _ in range(40):
        prompt = torch.randint(3, 64, (1, 6), generator=gen)
        out = teacher.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=40,
                               eos_token_id=None, pad_token_id=0)
        sequences.append(out[0])
        prompt_lens.append(6)
    return teacher_pass(teacher, sequences, prompt_lens, layers=(1, 2, 3))


def quick(kind: str, **overrides) -> TrainSettings:
    base = dict(epochs=12, lr=3e-3, batch_size=4, seq_len=32, vocab=48, holdout=4, eval_every=1000, heads=3,
                layers=1, init_layers=(0, 2), eval_depths=3)
    return TrainSettings(**(base | overrides))


FAST = {"bf16": True, "answer_only": True}  # the settings the shipped configs train EAGLE-3 and PARD with


@pytest.mark.parametrize("kind, extra", VARIANTS + [("eagle", EAGLE3 | FAST), ("pard", FAST)],
                         ids=VARIANT_IDS + ["eagle3-bf16", "pard-bf16"])
def test_training_lowers_the_loss(teacher, distill_set, kind, extra):
    losses = []
    module, vocab, metrics = train(kind, teacher, distill_set, quick(kind, **extra),
                                   log=lambda m, step: losses.append(m["train/loss"]))
    assert len(losses) >= 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert vocab is not None and len(vocab) == 48
    assert 0.0 <= metrics["val/top1_depth1"] <= 1.0
    if kind == "medusa":
        assert torch.tensor(metrics["rank_accuracy"]).shape == (3, 8)


def test_eagle_per_depth_accuracy_is_logged(teacher, distill_set):
    logged = []
    train("eagle", teacher, distill_set, quick("eagle", epochs=1, eval_every=5),
          log=lambda m, step: logged.append(m))
    evals = [m for m in logged if "val/top1_depth3" in m]
    assert evals and all(0.0 <= m["val/top1_depth2"] <= 1.0 for m in evals)


def _batch(teacher, distill_set, kind, **extra):
    settings = quick(kind, **extra)
    objective = Objective(kind, teacher, ReducedHead(teacher.lm_head), settings)
    fused = settings.fused_layers if kind == "eagle" else None
    batch = collate(chunks(distill_set, 32, None, fused)[:4], lambda labels: labels)
    return objective, batch


@pytest.mark.parametrize("max_ngram, min_ngram", [(3, 2), (4, 1), (2, 2)])
def test_lookup_hits_are_what_prompt_lookup_drafts_first(max_ngram, min_ngram):
    """Position i is a hit exactly when PromptLookup over tokens[:i] drafts tokens[i] first (the drafter
    itself is the reference), on sequences of a small vocabulary that repeat often, and loop."""
    gen = torch.Generator().manual_seed(0)
    drafter = PromptLookup(k=1, max_ngram=max_ngram, min_ngram=min_ngram)
    loop = torch.tensor([5, 6, 7, 8] * 6)
    found = []
    for tokens in [torch.randint(0, 4, (60,), generator=gen), torch.randint(0, 9, (60,), generator=gen), loop]:
        want = []
        for i in range(len(tokens)):
            tree = drafter.propose([DecodeState(0, tokens[None, :i], 0, i + 4, Sampling())])[0] if i else None
            want.append(bool(tree is not None and len(tree.tokens) and tree.tokens[0] == tokens[i]))
        got = lookup_hits(tokens, max_ngram, min_ngram)
        assert got.tolist() == want
        found += want
    assert 0 < sum(found) < len(found)
    assert lookup_hits(loop, max_ngram, min_ngram)[8:].all()  # a loop is found from its second lap on


def test_validation_separates_the_labels_lookup_misses(teacher, distill_set):
    """Chunks flag label j where lookup drafts token j + 1 of the whole sequence; the lookup-miss accuracy
    is the accuracy over those labels alone (the same as evaluating a set with the others removed)."""
    objective, _ = _batch(teacher, distill_set, "eagle", **EAGLE3)
    cut = chunks(distill_set, 16, None, EAGLE3["fused_layers"], lookup=True)
    sequence = iter(distill_set.sequences)
    flagged = 0
    for chunk in cut:  # each sequence's chunks in order, starting at 0
        if chunk.start == 0:
            seq = next(sequence)
            hits = lookup_hits(seq)
        n = len(chunk.tokens)
        assert torch.equal(chunk.tokens, seq[chunk.start : chunk.start + n])
        assert chunk.lookup[: n - 1].tolist() == hits[chunk.start + 1 : chunk.start + n].tolist()
        assert chunk.lookup[n - 1] == (hits[chunk.start + n] if chunk.start + n < len(seq) else False)
        flagged += int(chunk.lookup.sum())
    assert flagged > 0
    batches = [collate(cut[lo : lo + 4], lambda labels: labels) for lo in range(0, 24, 4)]
    metrics = evaluate(objective, batches)
    assert metrics["val/top1_depth1"] != metrics["val/top1_depth1_lookup_miss"]
    removed = [b | {"labels": b["labels"].masked_fill(b["lookup"], -100), "lookup": torch.zeros_like(b["lookup"])}
               for b in batches]
    again = evaluate(objective, removed)
    for d in (1, 2, 3):
        assert again[f"val/top1_depth{d}"] == pytest.approx(metrics[f"val/top1_depth{d}_lookup_miss"])


def test_loops_are_cut_where_the_answer_first_repeats_itself():
    # prompt [9, 9], answer [1 2 3 4 1 2 3 4 1 2]: the 3-gram (1 2 3) begins again at answer index 4
    assert loop_start(torch.tensor([9, 9, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2]), 2, 3) == 6
    assert loop_start(torch.tensor([9, 1, 2, 3, 4, 5]), 1, 2) == 6  # never repeats: all of it
    assert loop_start(torch.tensor([9, 7, 7, 7, 7]), 1, 2) == 3  # at least the first n-gram stays
    assert loop_start(torch.tensor([1, 2, 3, 1, 2, 3, 1]), 3, 3) == 7  # the prompt's own n-grams do not count


def test_training_rows_are_aimed_where_drafting_pays(teacher, distill_set):
    """skip_families drops a family's rows, loop_ngram cuts every per-position field at the same place, and
    validation keeps the set as it is (only the training split is aimed)."""
    rows = len(distill_set.sequences)
    data = DistillSet(distill_set.sequences, distill_set.prompt_lens, distill_set.features,
                      distill_set.layer_features, distill_set.labels, ["rag" if i % 3 == 0 else "qa" for i in range(rows)])
    kept = aimed(data, TrainSettings(skip_families=("rag",)))
    assert len(kept.sequences) == rows - len(range(0, rows, 3)) and set(kept.families) == {"qa"}
    assert all(torch.equal(a, b) for a, b in zip(kept.sequences, [s for i, s in enumerate(data.sequences) if i % 3]))
    with pytest.raises(ValueError, match="'ragg'.*prompt family"):
        aimed(data, TrainSettings(skip_families=("ragg",)))
    cut = aimed(data, TrainSettings(loop_ngram=4))
    lengths = [loop_start(s, p, 4) for s, p in zip(data.sequences, data.prompt_lens)]
    assert any(n < len(s) for n, s in zip(lengths, data.sequences))  # the tiny teacher loops too
    for i, n in enumerate(lengths):
        assert len(cut.sequences[i]) == len(cut.labels[i]) == len(cut.features[i]) == n
        assert all(len(v[i]) == n for v in cut.layer_features.values())
        assert torch.equal(cut.labels[i], data.labels[i][:n]) and torch.equal(cut.features[i], data.features[i][:n])


def test_lookup_weight_downweights_the_labels_lookup_drafts(teacher, distill_set):
    """The block loss is a weighted mean: lookup_weight=0 is the loss without the labels lookup drafts (with
    confidence=0 the other weights do not depend on them), a uniform lookup_weight changes nothing, and
    validation (eval mode) ignores it."""
    def loss(batch, weight, training=True):
        objective = Objective("block", teacher, ReducedHead(teacher.lm_head),
                              quick("block", **BLOCK, confidence=0.0, lookup_weight=weight))
        objective.train(training)
        torch.manual_seed(0)
        with torch.no_grad():
            return float(objective(batch)[0])

    batch = collate(chunks(distill_set, 32, None, BLOCK["fused_layers"], lookup=True)[:4], lambda labels: labels)
    assert 0 < int(batch["lookup"].sum()) < int(batch["mask"].sum())
    dropped = batch | {"labels": batch["labels"].masked_fill(batch["lookup"], -100)}
    assert loss(batch, 0.0) == pytest.approx(loss(dropped, 1.0), rel=1e-5)
    assert loss(batch, 0.0) != pytest.approx(loss(batch, 1.0), rel=1e-3)
    every = batch | {"lookup": batch["mask"]}
    assert loss(every, 0.3) == pytest.approx(loss(every, 1.0), rel=1e-5)
    assert loss(batch, 0.0, training=False) == pytest.approx(loss(batch, 1.0, training=False), rel=1e-6)


def test_eagle3_unroll_shapes_and_gradients(teacher, distill_set):
    """One state per step and position; every step's loss reaches fuse, fc and the layer; the step weights
    decay; the head reads the fused layers side by side."""
    objective, batch = _batch(teacher, distill_set, "eagle", **EAGLE3)
    B, T = batch["tokens"].shape
    assert batch["fused"].shape == (B, T, 3 * teacher.config.hidden_size)
    steps = ttt_unroll(objective.module, teacher.get_input_embeddings(), batch["fused"], batch["tokens"],
                       batch["positions"], batch["mask"], 3)
    assert [s.shape for s in steps] == [(B, T - 1, teacher.config.hidden_size)] * 3
    loss, hits = objective(batch)
    assert len(hits) == 3 and all(int(c) <= int(n) for c, n in hits) and int(hits[2][1]) < int(hits[0][1])
    loss.backward()
    head = objective.module
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (head.fuse.weight, head.fc.weight,
                                                                      head.body.layers[0].mlp.up_proj.weight))


def test_pard_objective_shapes_and_gradients(teacher, distill_set):
    """Depth 1 scores every token's next-token guess, depths 2.. the masks; the mask embedding learns."""
    objective, batch = _batch(teacher, distill_set, "pard", block=3, retain=1.0)
    loss, hits = objective(batch)
    assert len(hits) == 3
    tokens = int((batch["labels"] != -100).sum())
    assert int(hits[0][1]) == tokens and 0 < int(hits[2][1]) < int(hits[1][1]) < tokens
    loss.backward()
    assert objective.module.mask.grad.abs().sum() > 0
    assert objective.module.lm.model.embed_tokens.weight.grad is None  # the target's embedding stays frozen
    block = mask_blocks(batch["tokens"], batch["labels"], batch["positions"], batch["mask"], batch["answer"], 3, 1.0)
    assert block["visible"].shape[-1] == block["ids"].shape[1] > batch["tokens"].shape[1]


def test_length_batches_are_a_seeded_permutation_of_similar_lengths():
    import random

    items = [Chunk(torch.zeros(n), torch.zeros(n, 1), None, torch.zeros(n), 0) for n in range(1, 257)]
    order = length_batched(items, 8, random.Random(0))
    assert sorted(map(id, order)) == sorted(map(id, items))  # every chunk once
    assert [len(c.tokens) for c in order] == [len(c.tokens) for c in length_batched(items, 8, random.Random(0))]
    spread = [max(len(c.tokens) for c in order[i : i + 8]) - min(len(c.tokens) for c in order[i : i + 8])
              for i in range(0, 256, 8)]
    assert max(spread) < 64  # a random batch of 8 out of 1..256 spreads over ~200


@pytest.mark.parametrize("overrides, match", [({"layout": "midlayer", "fused_layers": (1, 2, 3)}, "'midlayer' is not a layout"),
                                               ({"layout": "reference"}, "EAGLE-3 only, but fused_layers is None")])
def test_eagle_layout_is_checked(teacher, distill_set, overrides, match):
    with pytest.raises(ValueError, match=match):
        train("eagle", teacher, distill_set, quick("eagle", **overrides))


def test_eagle3_needs_its_layers_in_the_set(teacher, distill_set):
    with pytest.raises(ValueError, match=r"holds only \[1, 2, 3\].*data.teacher_layers=\[0, 1, 2\]"):
        train("eagle", teacher, distill_set, quick("eagle", fused_layers=(0, 1, 2)))


def test_a_set_too_small_for_one_batch_is_refused(teacher, distill_set):
    from specdec.training.distill import DistillSet

    tiny = DistillSet(distill_set.sequences[:5], distill_set.prompt_lens[:5], distill_set.features[:5],
                      {k: v[:5] for k, v in distill_set.layer_features.items()}, distill_set.labels[:5])
    with pytest.raises(ValueError, match="fewer than one batch of batch_size=4"):
        train("pard", teacher, tiny, quick("pard"))


@pytest.fixture(scope="module")
def eagle3_trained(teacher, distill_set):
    """An EAGLE-3 head trained for 3 epochs on the tiny set, with its held-out loss at every step."""
    settings = quick("eagle", epochs=3, eval_every=1, **EAGLE3)
    fresh = []
    module, vocab, metrics = train("eagle", teacher, distill_set, settings, log=lambda m, s: fresh.append(m["val/loss"]))
    return module, vocab, metrics, settings, fresh


def test_eagle_training_continues_from_its_checkpoint(teacher, distill_set, eagle3_trained, tmp_path):
    """init_from starts EAGLE-3 from a trained head (its held-out loss after one step is the trained head's, not
    a fresh start's); a head of other fused layers is refused, naming the setting."""
    module, vocab, metrics, settings, fresh = eagle3_trained
    path = save_checkpoint(tmp_path / "eagle.pt", "eagle", trained_weights("eagle", module),
                           module_settings("eagle", teacher, settings), teacher, vocab, "tiny-teacher", metrics)
    resumed = []
    train("eagle", teacher, distill_set, quick("eagle", epochs=0.1, eval_every=1, init_from=str(path), **EAGLE3),
          log=lambda m, s: resumed.append(m["val/loss"]))
    start, end = fresh[0], metrics["val/loss"]  # held-out loss after one step from the target's layer, and trained
    assert end < start - 0.5, (start, end)
    assert resumed[0] < end + 0.25 * (start - end), (start, end, resumed[0])  # one step after the trained head
    with pytest.raises(ValueError, match=r"reads target layers \[1, 2, 3\].*drafter.train.fused_layers"):
        train("eagle", teacher, distill_set, quick("eagle", init_from=str(path), fused_layers=(0, 1, 2)))


def test_benchmark_accuracy_is_what_eagle_drafting_gets_accepted(teacher, distill_set, eagle3_trained):
    """experiments.eagle_accuracy's step-1 hit at each answer token is whether EAGLE drafting from the prefix
    before it gets that token accepted (the engine drafting one token from each prefix)."""
    from experiments.eagle_accuracy import answer_hits

    module, vocab = eagle3_trained[:2]
    seq, prompt_len = distill_set.sequences[-1], distill_set.prompt_lens[-1]  # held out: the teacher's greedy answer
    hits, correct = answer_hits(teacher, module, ReducedHead(teacher.lm_head, vocab), seq, prompt_len, 2)
    n = len(seq) - prompt_len
    assert hits.shape == (n,) and correct.shape == (2, n)
    assert hits.tolist() == lookup_hits(seq)[prompt_len:].tolist()
    drafter, accepted = Eagle(module, vocab, k=1), []
    for m in range(n):  # the first step's root is the prompt's last token; its one draft guesses seq[prompt_len + m]
        out = specdec.generate(teacher, seq[None, : prompt_len + m], drafter, max_new_tokens=2, eos_token_id=None,
                               return_dict_in_generate=True, goodput=False)
        assert out.stats.drafted == 1
        assert torch.equal(out.sequences[0, : len(seq)], seq[: prompt_len + m + 2])  # lossless, as ever
        accepted.append(out.stats.accepted == 1)
    assert correct[0].tolist() == accepted
    assert 0 < sum(accepted) < len(accepted)


def test_benchmark_accuracy_is_what_block_drafting_gets_accepted(teacher, distill_set):
    """experiments.eagle_accuracy --kind block: the step-1 hit at each answer token is whether the block drafter
    drafting one token from the prefix before it gets that token accepted; ``chains`` counts the leading run."""
    from experiments.eagle_accuracy import block_answer_hits, chains

    module, vocab, _ = train("block", teacher, distill_set, quick("block", **BLOCK, epochs=6))
    seq, prompt_len = distill_set.sequences[-1], distill_set.prompt_lens[-1]  # held out
    hits, correct = block_answer_hits(teacher, module, ReducedHead(teacher.lm_head, vocab), seq, prompt_len, 2)
    n = len(seq) - prompt_len
    assert hits.shape == (n,) and correct.shape == (2, n)
    drafter, accepted, two = BlockDrafter(module, vocab, k=2), [], []
    for m in range(n - 2):  # the first step's root is the prefix's last token
        out = specdec.generate(teacher, seq[None, : prompt_len + m], drafter, max_new_tokens=3, eos_token_id=None,
                               return_dict_in_generate=True, goodput=False)
        assert torch.equal(out.sequences[0], seq[: prompt_len + m + 3])  # lossless, as ever
        first = out.stats.accept_lengths[0][0] - 1  # drafts the first step (2 deep) got accepted
        accepted.append(first >= 1)
        two.append(first)
    assert correct[0, : n - 2].tolist() == accepted
    assert 0 < sum(accepted) < len(accepted)
    assert (chains(correct)[: n - 2] - 1).tolist() == two  # the chain the engine accepts from each root
    assert chains(torch.tensor([[True, True, False], [True, False, True]])).tolist() == [2.0, 3.0, 1.0]


@pytest.mark.parametrize("kind, extra", VARIANTS + [("eagle", EAGLE3 | {"layout": "reference"})],
                         ids=VARIANT_IDS + ["eagle3-reference"])
def test_checkpoint_round_trip_is_lossless_and_refuses_another_target(teacher, distill_set, kind, extra, tmp_path):
    settings = quick(kind, epochs=2, **extra)
    module, vocab, metrics = train(kind, teacher, distill_set, settings)
    path = save_checkpoint(tmp_path / f"{kind}.pt", kind, trained_weights(kind, module),
                           module_settings(kind, teacher, settings), teacher, vocab, "tiny-teacher", metrics)
    if kind in ("draft_model", "pard"):  # the borrowed embedding is not saved
        assert not any("embed_tokens" in k for k in torch.load(path)["state_dict"])
    drafter = FROM_CHECKPOINT[kind].from_checkpoint(str(path))
    if kind == "eagle":
        assert drafter.head.fused_layers == extra.get("fused_layers")  # the mode comes back from the checkpoint
        layout = ReferenceEagle3Head if extra.get("layout") == "reference" else EagleHead
        assert type(drafter.head) is layout  # and the layout
    ids = distill_set.sequences[-1][None, :6]
    expected = teacher.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=30,
                                eos_token_id=None, pad_token_id=0)
    out = specdec.generate(teacher, ids, drafter, max_new_tokens=30, eos_token_id=None, return_dict_in_generate=True,
                           goodput=False)
    assert torch.equal(out.sequences, expected)
    assert out.stats.tau > 1.0  # trained on this teacher's own outputs: some drafts are accepted

    other = tiny_llama(seed=4, layers=3, scale=3.0)  # same architecture, other weights
    assert fingerprint(other) != fingerprint(teacher)
    with pytest.raises(ValueError, match="trained for target 'tiny-teacher'"):
        specdec.generate(other, ids, FROM_CHECKPOINT[kind].from_checkpoint(str(path)), max_new_tokens=5)


def test_checkpoint_of_another_kind_is_refused(teacher, distill_set, tmp_path):
    module, vocab, _ = train("medusa", teacher, distill_set, quick("medusa", epochs=1))
    path = save_checkpoint(tmp_path / "m.pt", "medusa", module.state_dict(), {"hidden": 32, "heads": 3}, teacher,
                           vocab, "t")
    with pytest.raises(ValueError, match="holds a 'medusa' drafter, not 'eagle'"):
        Eagle.from_checkpoint(str(path))
    with pytest.raises(FileNotFoundError, match="no shipped drafter checkpoint 'nope'"):
        Eagle.from_checkpoint("nope")


def test_fingerprint_ignores_dtype_but_not_weights(teacher):
    assert fingerprint(teacher) == fingerprint(tiny_llama(seed=3, layers=3, scale=3.0).to(torch.bfloat16))
    changed = tiny_llama(seed=3, layers=3, scale=3.0)
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight.add_(0.5)
    assert fingerprint(changed) != fingerprint(teacher)


def test_reduced_head_scores_only_its_subset(teacher):
    ids = torch.tensor([3, 7, 9])
    head = ReducedHead(teacher.lm_head, ids)
    hidden = torch.randn(2, 32)
    full = head(hidden)
    assert full.shape == (2, 64)
    assert torch.isinf(full[:, [0, 1, 2, 4]]).all() and full[:, ids].isfinite().all()
    assert torch.allclose(full[:, ids], teacher.lm_head(hidden)[:, ids])
    assert head.label_index(torch.tensor([7, 5, 9])).tolist() == [1, -100, 2]
    with pytest.raises(ValueError, match="reduced vocabulary ids"):
        ReducedHead(teacher.lm_head, torch.tensor([64]))


def test_frequent_tokens_counts_and_breaks_ties_by_id():
    labels = [torch.tensor([5, 5, 5, 2, 2, 9]), torch.tensor([9, 1])]
    assert frequent_tokens(labels, 2, 10).tolist() == [2, 5]  # 5 (3x), then 2 and 9 (2x each): 2 wins the tie
    assert frequent_tokens(labels, 3, 10).tolist() == [2, 5, 9]


def test_tree_from_accuracies_keeps_the_likeliest_nodes():
    acc = torch.tensor([[0.6, 0.3, 0.05], [0.5, 0.2, 0.1]])
    spec = TreeSpec.from_accuracies(acc, 4)
    # node probabilities: [0] .6, [0,0] .3, [1] .3, [0,1] .12, [1,0] .15 -> keep .6, .3, .3, .15
    paths = {(0,), (1,), (0, 0), (1, 0)}
    got = set()
    for node, parent in enumerate(spec.parents):
        path = [spec.ranks[node]]
        while parent >= 0:
            path.insert(0, spec.ranks[parent])
            parent = spec.parents[parent]
        got.add(tuple(path))
    assert got == paths
    with pytest.raises(ValueError, match="budget=0"):
        TreeSpec.from_accuracies(acc, 0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny target with a word-level tokenizer, saved as a HF directory."""
    return save_with_tokenizer(tiny_llama(seed=3, layers=3, scale=3.0), tmp_path_factory.mktemp("tiny"))


def train_command(tiny_dir, tmp_path, *launcher, drafter="eagle", extra=()):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT),
           "SPECDEC_CACHE": str(tmp_path / "cache")}
    return subprocess.run(
        [sys.executable, *launcher, "-m", "experiments.train_drafter", f"drafter={drafter}", f"model.name={tiny_dir}",
         f"output={tmp_path / 'drafter.pt'}", "data.gsm8k_prompts=10", "data.self_prompts=4",
         "data.max_new_tokens=16", "data.batch_size=8", "data.teacher_layers=[1]", "drafter.train.epochs=2",
         "drafter.train.vocab=32", "+drafter.train.holdout=3", "drafter.train.seq_len=32", "decode_prompts=2",
         "decode_max_new_tokens=8", f"hydra.run.dir={tmp_path / 'run'}", *extra],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("drafter, extra", [("eagle", []),  # EAGLE-3 on the tiny model's layers 0, 1, 2
                                            ("pard", ["drafter.train.init_from=", "drafter.train.init_layers=[0,2]"])])
def test_train_drafter_command_end_to_end(tiny_dir, tmp_path, drafter, extra):
    """`python -m experiments.train_drafter` on a tiny model with a tokenizer: builds the set, trains, saves,
    decodes held-out prompts, logs to W&B offline."""
    done = train_command(tiny_dir, tmp_path, drafter=drafter, extra=["logger=wandb", *extra])
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "drafter.pt"
    assert out.is_file()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0.0 <= metrics["val/top1_depth1"] <= 1.0 and metrics["decode/tau"] >= 1.0
    assert list((tmp_path / "run").glob("wandb/offline-run-*/run-*.wandb"))
    assert list((tmp_path / "cache" / "distill").glob("sequences-*.pt"))


def test_train_drafter_in_two_processes(tiny_dir, tmp_path):
    """`accelerate launch --num_processes 2`: CPU processes over gloo, gradients synced, one checkpoint."""
    done = train_command(tiny_dir, tmp_path, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                         "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                         drafter="early_exit", extra=["logger=csv", "threads=1", "drafter.train.layers=1"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "drafter.pt").is_file()
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps and all("train/loss" in s or "val/loss" in s for s in steps)


def test_train_drafter_rejects_untrainable_drafters_and_bad_settings(tmp_path):
    from hydra import compose, initialize_config_dir

    from experiments.schema import register, validate_training

    register()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        with pytest.raises(ValueError, match="drafter='prompt_lookup' cannot be trained"):
            validate_training(compose(config_name="train_drafter", overrides=["drafter=prompt_lookup"]))
        with pytest.raises(ValueError, match="drafter.train.lrr is not a training setting"):
            validate_training(compose(config_name="train_drafter", overrides=["+drafter.train.lrr=1"]))
        with pytest.raises(ValueError, match="drafter.train.epochs=0"):
            validate_training(compose(config_name="train_drafter", overrides=["drafter.train.epochs=0"]))
        for kind in KINDS:
            settings = validate_training(compose(config_name="train_drafter", overrides=[f"drafter={kind}"]))
            assert settings.vocab > 0


def test_checkpoint_packing_keeps_weights_within_int8_precision():
    from specdec.training.checkpoint import pack, unpack

    torch.manual_seed(0)
    state = {"w": torch.randn(16, 8), "b": torch.randn(8), "steps": torch.tensor(3)}
    packed = pack(state)
    assert packed["w::int8"].dtype == torch.int8 and packed["b"].dtype == torch.float16
    back = unpack(packed)
    assert set(back) == set(state)
    row_max = state["w"].abs().amax(dim=1, keepdim=True)
    assert ((back["w"] - state["w"]).abs() <= row_max / 127 * 0.51 + 1e-6).all()
    assert torch.allclose(back["b"], state["b"], atol=1e-2) and int(back["steps"]) == 3
