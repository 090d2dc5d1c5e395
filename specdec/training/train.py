"""Training drafters on the self-distillation set (:mod:`specdec.training.distill`); the target stays frozen.

One objective per drafter kind, all scored against the target's own greedy labels:

- ``eagle``: feature regression (smooth L1 to the target's next hidden state) plus cross-entropy
  of the target's head on the predicted feature (EAGLE's loss), with the head also trained on its
  own predicted features for ``unroll`` steps, as it drafts (EAGLE-3's training-time test);
- ``medusa``: cross-entropy of head d against the label d + 1 positions on (Medusa-1);
- ``early_exit``: cross-entropy of the exit (layer-L state -> norm -> adapter -> head);
- ``draft_model``: cross-entropy of the small draft on token sequences (distillation on the
  target's greedy outputs).

The output head is the target's, reduced to the ``vocab`` most frequent target tokens, so labels
off that subset are ignored. accelerate places the module and shards the batches over processes
(``accelerate launch -m experiments.train_drafter``). ``log(metrics, step)`` receives the loss and
the per-depth top-1 accuracy.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from specdec.training.distill import DistillSet
from specdec.drafters.distilled import build_draft, own_weights
from specdec.drafters.eagle import EagleHead
from specdec.drafters.early_exit import ExitAdapter
from specdec.drafters.medusa import MedusaHeads
from specdec.drafters.vocab import ReducedHead, frequent_tokens

KINDS = ("eagle", "medusa", "early_exit", "draft_model")


@dataclass
class TrainSettings:
    """Optimisation and model-shape settings (each drafter's config sets its own)."""

    epochs: float = 4.0
    lr: float = 1e-3
    batch_size: int = 8  # chunks per step
    seq_len: int = 256  # tokens per chunk
    vocab: int = 8192  # reduced vocabulary size (0: the full vocabulary)
    holdout: int = 24  # sequences kept for validation
    eval_every: int = 50
    seed: int = 0
    unroll: int = 2  # eagle: steps on its own predicted features (training-time test)
    noise: float = 0.1  # eagle: uniform noise on input features (EAGLE-1)
    ce_weight: float = 0.1  # eagle: cross-entropy weight beside the feature loss
    heads: int = 4  # medusa
    layers: int = 6  # early_exit: exit after this many layers
    init_layers: tuple[int, ...] = (0, 29)  # draft_model: target layers the draft starts from
    eval_depths: int = 5  # depths of the per-depth accuracy


@dataclass
class Chunk:
    """Up to ``seq_len`` consecutive positions of one sequence."""

    tokens: Tensor  # (T,)
    features: Tensor  # (T, H) final hidden states
    exit_features: Tensor | None  # (T, H) after ``layers`` layers (early exit)
    labels: Tensor  # (T,) target's greedy next tokens
    start: int  # position of the first token


def chunks(data: DistillSet, seq_len: int, exit_layer: int | None = None) -> list[Chunk]:
    """Every sequence cut into consecutive pieces of at most ``seq_len`` positions."""
    out = []
    for i, seq in enumerate(data.sequences):
        for lo in range(0, len(seq) - 1, seq_len):
            hi = min(len(seq), lo + seq_len)
            exit_feats = data.layer_features[exit_layer][i][lo:hi] if exit_layer is not None else None
            out.append(Chunk(seq[lo:hi], data.features[i][lo:hi], exit_feats, data.labels[i][lo:hi], lo))
    return out


def _pad(rows: list[Tensor], value=0) -> Tensor:
    return nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)


def collate(batch: list[Chunk], label_index: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """Right-padded tensors; padded labels are -100 (ignored)."""
    lengths = [len(c.tokens) for c in batch]
    out = {
        "tokens": _pad([c.tokens for c in batch]),
        "features": _pad([c.features.float() for c in batch]),
        "labels": _pad([label_index(c.labels) for c in batch], -100),
        "positions": _pad([torch.arange(c.start, c.start + n) for c, n in zip(batch, lengths)]),
        "mask": _pad([torch.ones(n, dtype=torch.bool) for n in lengths], False),
    }
    if batch[0].exit_features is not None:
        out["exit_features"] = _pad([c.exit_features.float() for c in batch])
    return out


class Objective(nn.Module):
    """A drafter kind's trainable module and its loss; ``forward(batch) -> (loss, per-depth top-1 hits)``."""

    def __init__(self, kind: str, target: PreTrainedModel, head: ReducedHead, settings: TrainSettings) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"drafter kind {kind!r} is not trainable: use one of {KINDS}")
        self.kind, self.settings, self.head = kind, settings, head
        self._target = [target]  # frozen, not a submodule (not trained, not saved)
        if kind == "eagle":
            self.module = EagleHead.from_target(target)
        elif kind == "medusa":
            self.module = MedusaHeads(target.config.hidden_size, settings.heads)
        elif kind == "early_exit":
            self.module = ExitAdapter(target.config.hidden_size)
        else:
            self.module = build_draft(target, list(settings.init_layers), head.token_ids)
        self.module.to(dtype=torch.float32)

    def forward(self, batch: dict[str, Tensor], depths: int | None = None) -> tuple[Tensor, list[Tensor]]:
        return getattr(self, f"_{self.kind}")(batch, depths)

    def _ce(self, hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-entropy of the reduced head on ``hidden`` and the top-1 hits ``(correct, counted)``."""
        scores = self.head.reduced(hidden)
        valid = labels != -100
        loss = F.cross_entropy(scores.flatten(0, -2), labels.flatten(), ignore_index=-100)
        hits = torch.stack([((scores.argmax(-1) == labels) & valid).sum(), valid.sum()])
        return loss, hits

    def _eagle(self, batch, depths):
        target, s = self._target[0], self.settings
        feats, labels, pos = batch["features"], batch["labels"], batch["positions"]
        embeds = target.get_input_embeddings()(batch["tokens"][:, 1:]).float()  # x_{j+1}
        inputs = feats[:, :-1]  # f_j
        if self.training and s.noise:
            inputs = inputs + (torch.rand_like(inputs) - 0.5) * 2 * s.noise
        want, want_labels = feats[:, 1:], labels[:, 1:]
        valid = batch["mask"][:, 1:]
        total, hits = 0.0, []
        for step in range(depths or s.unroll):
            pred = self.module(inputs, embeds, pos[:, :-1])
            reg = F.smooth_l1_loss(pred, want, reduction="none").mean(-1)
            ce, hit = self._ce(pred, want_labels)
            total = total + (reg[valid].mean() + s.ce_weight * ce) * (0.5 ** step)
            hits.append(hit)
            # next step: element j reads the feature the head predicted for position j
            inputs = torch.cat([inputs[:, :1], pred[:, :-1]], dim=1)
        return total, hits

    def _medusa(self, batch, depths):
        feats, labels = batch["features"], batch["labels"]
        out = self.module(feats)  # (B, T, K, H)
        total, hits = 0.0, []
        for d in range(len(self.module)):
            # head d at position j guesses label[j + d + 1] (the token d + 2 ahead)
            ce, hit = self._ce(out[:, : out.shape[1] - d - 1, d], labels[:, d + 1 :])
            total = total + ce * (0.8 ** d)
            hits.append(hit)
        return total, hits

    def _early_exit(self, batch, depths):
        target = self._target[0]
        normed = target.model.norm(batch["exit_features"])
        ce, hit = self._ce(self.module(normed), batch["labels"])
        return ce, [hit]

    def _draft_model(self, batch, depths):
        hidden = self.module.model(input_ids=batch["tokens"], position_ids=batch["positions"]).last_hidden_state
        ce, hit = self._ce(hidden, batch["labels"])
        return ce, [hit]


@torch.no_grad()
def rank_accuracy(objective: Objective, batches: list[dict], ranks: int = 8) -> Tensor:
    """Medusa: ``(K, ranks)`` how often head d's rank-r candidate is the label (held-out batches)."""
    heads = objective.module
    counts, total = torch.zeros(len(heads), ranks), torch.zeros(len(heads))
    for batch in batches:
        out = heads(batch["features"])
        for d in range(len(heads)):
            scores = objective.head.reduced(out[:, : out.shape[1] - d - 1, d])
            labels = batch["labels"][:, d + 1 :]
            valid = labels != -100
            top = scores.topk(ranks, dim=-1).indices  # (B, T', R)
            counts[d] += ((top == labels[..., None]) & valid[..., None]).sum(dim=(0, 1)).float()
            total[d] += valid.sum()
    return counts / total.clamp(min=1)[:, None]


def evaluate(objective: Objective, batches: list[dict]) -> dict[str, float]:
    """Held-out loss and top-1 accuracy per depth."""
    objective.eval()
    depth_hits, losses = None, []
    with torch.no_grad():
        for batch in batches:
            loss, hits = objective(batch, depths=objective.settings.eval_depths)
            losses.append(float(loss))
            depth_hits = hits if depth_hits is None else [a + b for a, b in zip(depth_hits, hits)]
    objective.train()
    metrics = {"val/loss": sum(losses) / len(losses)}
    for d, (correct, counted) in enumerate(depth_hits):
        metrics[f"val/top1_depth{d + 1}"] = float(correct) / max(1, float(counted))
    return metrics


def train(kind: str, target: PreTrainedModel, data: DistillSet, settings: TrainSettings,
          log: Callable[[dict, int], None] = lambda metrics, step: None,
          accelerator: Accelerator | None = None) -> tuple[nn.Module, Tensor | None, dict]:
    """Train a drafter of ``kind`` for ``target``.

    Returns:
        The trained module, the reduced vocabulary (``None``: full) and the final metrics
        (held-out loss, top-1 per depth, ``rank_accuracy`` for Medusa).
    """
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(settings.seed)
    for param in target.parameters():
        param.requires_grad_(False)
    train_set, val_set = data.split(settings.holdout)
    vocab = None
    if settings.vocab:
        vocab = frequent_tokens(train_set.labels, settings.vocab, target.get_output_embeddings().weight.shape[0])
    head = ReducedHead(target.get_output_embeddings(), vocab).float()
    objective = Objective(kind, target, head, settings)
    exit_layer = settings.layers if kind == "early_exit" else None
    train_chunks = chunks(train_set, settings.seq_len, exit_layer)
    val_batches = [collate(c, head.label_index) for c in _batched(chunks(val_set, settings.seq_len, exit_layer),
                                                                  settings.batch_size)]
    params = [p for p in objective.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    steps = max(1, math.ceil(settings.epochs * len(train_chunks) / settings.batch_size))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / max(1, steps // 20)) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    objective, optimizer = accelerator.prepare(objective, optimizer)
    inner = accelerator.unwrap_model(objective)
    inner.head.to(accelerator.device)
    rng = random.Random(settings.seed)
    objective.train()
    order: list[Chunk] = []
    bar = tqdm(range(steps), desc=f"train {kind}", disable=not accelerator.is_main_process)
    for step in bar:
        if len(order) < settings.batch_size * accelerator.num_processes:
            refill = list(train_chunks)
            rng.shuffle(refill)
            order += refill
        mine = order[: settings.batch_size * accelerator.num_processes][accelerator.process_index ::
                                                                         accelerator.num_processes]
        del order[: settings.batch_size * accelerator.num_processes]
        batch = {k: v.to(accelerator.device) for k, v in collate(mine, head.label_index).items()}
        loss, hits = objective(batch)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        metrics = {"train/loss": loss.item(), "train/lr": schedule.get_last_lr()[0]}
        metrics |= {f"train/top1_depth{d + 1}": float(c) / max(1, float(n)) for d, (c, n) in enumerate(hits)}
        if (step + 1) % settings.eval_every == 0 or step + 1 == steps:
            metrics |= evaluate(inner, val_batches)
        if accelerator.is_main_process:
            log(metrics, step)
            bar.set_postfix({k.split("/")[-1]: round(v, 3) for k, v in metrics.items() if "loss" in k or "depth1" in k})
    final = evaluate(inner, val_batches)
    if kind == "medusa":
        final["rank_accuracy"] = rank_accuracy(inner, val_batches).tolist()
    return inner.module, vocab, final


def module_settings(kind: str, target: PreTrainedModel, settings: TrainSettings) -> dict:
    """What a checkpoint needs to rebuild the module before its weights load."""
    if kind == "eagle":
        return {"target_config": target.config.to_dict()}
    if kind == "medusa":
        return {"hidden": target.config.hidden_size, "heads": settings.heads}
    if kind == "early_exit":
        return {"hidden": target.config.hidden_size, "layers": settings.layers}
    return {"init_layers": list(settings.init_layers)}


def trained_weights(kind: str, module: nn.Module) -> dict[str, Tensor]:
    """What a checkpoint keeps: the module's own weights (a draft model's borrowed embedding stays out)."""
    return own_weights(module) if kind == "draft_model" else module.state_dict()


def _batched(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
