"""The self-distillation set drafters train on: the target's own greedy answers, kept as token ids.

Drafters imitate the target (Medusa, Cai et al. 2024; EAGLE, Li et al. 2024, train on the
target's own outputs), so the set is the target's greedy answers to prompts from eight families
(:mod:`specdec.training.prompts`: chat, writing, coding, extraction, qa, summarise, translate,
math), never the benchmark's. Every stage is greedy, decoded with specdec's engine on left-padded
batches: greedy speculative output equals ``model.generate`` token for token whatever the batch
size or drafter, so the set depends only on the target, the seed and the sizes, and the engine
settings (``batch_size``, ``drafter``) only set the speed.

Kept on disk as ids (a few MB: one flat uint16/int32 tensor, row offsets, prompt lengths, family
names) under ``$SPECDEC_CACHE/distill``, keyed by the target's fingerprint and the settings. The
teacher pass (:func:`teacher_pass`: per position the target's final hidden state, the hidden
state after chosen layers, the greedy label) is recomputed from the ids and cached separately.

    python -m specdec.training.distill                     # the full set (the defaults below)
    python -m specdec.training.distill --self-prompts 40 --gsm8k-prompts 10 --no-cache   # rate only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from math import ceil
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specdec.models import cache_dir
from specdec.text import encode, left_pad
from specdec.training.checkpoint import fingerprint
from specdec.training.prompts import FAMILIES, Conversation

FORMAT = 2  # bump when prompts.py or the layout changes what a given setting builds
# rows of the seven self-made families per unit weight, set so each gets a similar share of answer tokens:
# a 50-row build measured mean answers of chat 200, writing 227, coding 160, extraction 207, qa 175,
# summarise 218, translate 133 tokens (math 150), so the short-answer families get more rows
FAMILY_WEIGHTS = {"chat": 1.0, "writing": 0.9, "coding": 1.25, "extraction": 1.0, "qa": 1.15, "summarise": 0.95,
                  "translate": 1.5}
BUILD_DRAFTERS = ("none", "prompt_lookup")
_SAVE_EVERY_S = 300.0  # a long build keeps its finished answers on disk this often (it resumes from them)


@dataclass(frozen=True)
class DistillSettings:
    """What the set is made of.

    Attributes:
        gsm8k_prompts: rows of the math family (GSM8K training questions).
        self_prompts: rows of the seven other families together, split by :data:`FAMILY_WEIGHTS`.
        rag_prompts: rows of the retrieval family (several passages the target wrote, then a question),
            apart like math (0 keeps the cache key of sets built before the family existed).
        max_new_tokens: longest answer of any stage.
        batch_size: rows per engine call (speed only: not part of the cache key).
        seed: every family's draws.
        drafter: the engine's drafter while building, ``"none"`` or ``"prompt_lookup"``
            (speed only: greedy output is the same).
    """

    gsm8k_prompts: int = 800
    self_prompts: int = 5400
    rag_prompts: int = 0
    max_new_tokens: int = 256
    batch_size: int = 32
    seed: int = 0
    drafter: str = "none"

    def key(self) -> dict:
        """What the set depends on (the cache key): the sizes, the answer length, the seed."""
        return {"format": FORMAT, "gsm8k_prompts": self.gsm8k_prompts, "self_prompts": self.self_prompts,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed} | (
                    {"rag_prompts": self.rag_prompts} if self.rag_prompts else {})

    def family_sizes(self) -> dict[str, int]:
        """Rows per family: ``self_prompts`` split by weight (largest remainder), math and rag apart."""
        total = sum(FAMILY_WEIGHTS.values())
        exact = {f: self.self_prompts * w / total for f, w in FAMILY_WEIGHTS.items()}
        sizes = {f: int(x) for f, x in exact.items()}
        for f in sorted(exact, key=lambda f: sizes[f] - exact[f])[: self.self_prompts - sum(sizes.values())]:
            sizes[f] += 1
        return sizes | {"math": self.gsm8k_prompts} | ({"rag": self.rag_prompts} if self.rag_prompts else {})


@dataclass
class DistillSet:
    """Sequences (prompt + the target's greedy answer) and, after :func:`teacher_pass`, per position
    the target's final hidden state, its hidden state after chosen layers, and its greedy label.

    Attributes:
        sequences: per sequence ``(n,)`` token ids.
        prompt_lens: per sequence, where the answer starts.
        features: per sequence ``(n, H)`` final hidden states (float16), or empty before the teacher pass.
        layer_features: layer index -> per sequence ``(n, H)`` hidden state after that many layers.
        labels: per sequence ``(n,)`` the target's greedy next token at each position.
        families: per sequence its prompt family (``specdec.training.prompts.FAMILIES``), or empty.
        info: how the ids were built (settings; tokens generated, seconds, tokens/s, threads), or empty.
    """

    sequences: list[Tensor]
    prompt_lens: list[int]
    features: list[Tensor]
    layer_features: dict[int, list[Tensor]]
    labels: list[Tensor]
    families: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def split(self, holdout: int) -> tuple[DistillSet, DistillSet]:
        """The last ``holdout`` sequences apart (validation)."""
        def part(sl):
            return DistillSet(self.sequences[sl], self.prompt_lens[sl], self.features[sl],
                              {k: v[sl] for k, v in self.layer_features.items()}, self.labels[sl],
                              self.families[sl])
        return part(slice(None, len(self.sequences) - holdout)), part(slice(len(self.sequences) - holdout, None))

    def rows(self, keep: list[int], lengths: list[int] | None = None) -> DistillSet:
        """The sequences ``keep`` (in that order), each cut to ``lengths[i]`` positions when given."""
        n = lengths or [len(self.sequences[i]) for i in keep]

        def take(per_row: list) -> list:
            return [per_row[i][:m] for i, m in zip(keep, n)] if per_row else []

        return DistillSet(take(self.sequences), [self.prompt_lens[i] for i in keep], take(self.features),
                          {k: take(v) for k, v in self.layer_features.items()}, take(self.labels),
                          [self.families[i] for i in keep] if self.families else [], self.info)

    def without(self, families: Sequence[str]) -> DistillSet:
        """The set without the rows of ``families`` (an ablation: what a family adds)."""
        unknown = sorted(set(families) - set(FAMILIES))
        if unknown:
            raise ValueError(f"skip_families names {unknown[0]!r}, not a prompt family: use names from {sorted(FAMILIES)}")
        return self.rows([i for i, f in enumerate(self.families) if f not in set(families)])

    def loops_cut(self, ngram: int) -> DistillSet:
        """Each answer cut where the target starts repeating itself: before the first answer position whose
        next ``ngram`` tokens already began at an earlier answer position (:func:`loop_start`). The looping
        tail is what prompt lookup drafts anyway, and it would make the set's labels easy and alike."""
        cuts = [loop_start(seq, plen, ngram) for seq, plen in zip(self.sequences, self.prompt_lens)]
        return self.rows(list(range(len(self.sequences))), cuts)

    def check_enough(self, batch_size: int, seq_len: int, holdout: int, processes: int = 1) -> None:
        """Raise ``ValueError`` unless, after ``holdout`` sequences go to validation, the rest cut into
        ``seq_len``-token chunks (as :func:`specdec.training.train.chunks` cuts them) fill one batch of
        ``batch_size`` chunks on each of ``processes``."""
        rows = len(self.sequences)
        fix = ("build a larger set (data.gsm8k_prompts, data.self_prompts, data.max_new_tokens) or lower "
               "drafter.train.batch_size / drafter.train.seq_len / drafter.train.holdout")
        if holdout < 1:
            raise ValueError(f"holdout={holdout}: keep at least one sequence for validation (drafter.train.holdout)")
        if rows <= holdout:
            raise ValueError(f"the distillation set has {rows} sequences and holdout={holdout} keeps them all for "
                             f"validation, leaving none to train on: {fix}")
        chunks = sum(ceil((len(s) - 1) / seq_len) for s in self.sequences[: rows - holdout])
        if chunks < batch_size * processes:
            per = f" x {processes} processes" if processes > 1 else ""
            raise ValueError(f"the distillation set's {rows - holdout} training sequences (after holdout={holdout}) "
                             f"make {chunks} chunks of seq_len={seq_len}, fewer than one batch of batch_size="
                             f"{batch_size}{per}: {fix}")

    def tokens_by_family(self) -> dict[str, dict[str, int]]:
        """Per family: rows, answer tokens (after the prompt), all tokens."""
        out: dict[str, dict[str, int]] = {}
        for seq, plen, fam in zip(self.sequences, self.prompt_lens, self.families or ["?"] * len(self.sequences)):
            row = out.setdefault(fam, {"rows": 0, "answer_tokens": 0, "tokens": 0})
            row["rows"] += 1
            row["answer_tokens"] += len(seq) - plen
            row["tokens"] += len(seq)
        return out


def loop_start(seq: Tensor, prompt_len: int, ngram: int) -> int:
    """Where ``seq``'s answer (from ``prompt_len``) first repeats one of its own ``ngram``-grams: the length to
    keep (at least ``prompt_len + ngram``; ``len(seq)`` when it never loops)."""
    answer = seq[prompt_len:].tolist()
    seen = set()
    for j in range(len(answer) - ngram + 1):
        gram = tuple(answer[j : j + ngram])
        if gram in seen:
            return prompt_len + max(j, ngram)
        seen.add(gram)
    return len(seq)


class _Answerer:
    """The target's greedy replies, memoised by prompt ids and generated by the engine in left-padded
    batches of similar prompt lengths; a long build saves its replies now and then and resumes from them."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: DistillSettings,
                 partial: Path | None = None, progress: bool = True) -> None:
        from specdec.drafters import PromptLookup

        if settings.drafter not in BUILD_DRAFTERS:
            raise ValueError(f"distill drafter={settings.drafter!r} is unknown: use one of {BUILD_DRAFTERS}")
        self.model, self.tokenizer, self.settings, self.partial, self.progress = (
            model, tokenizer, settings, partial, progress)
        self.drafter = PromptLookup(k=5, min_ngram=2) if settings.drafter == "prompt_lookup" else None
        eos = model.generation_config.eos_token_id
        self.eos = {eos} if isinstance(eos, int) else set(eos or [])
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (min(self.eos) if self.eos else 0)
        self.window = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 10**9
        self.replies: dict[tuple[int, ...], list[int]] = {}
        if partial is not None and partial.is_file():
            self.replies = torch.load(partial)
        self.generated, self.seconds, self.too_long, self._saved = 0, 0.0, 0, time.monotonic()

    def prompt(self, conversation: Conversation) -> Tensor:
        return encode(self.tokenizer, conversation)

    def fits(self, prompt: Tensor) -> bool:
        return len(prompt) + self.settings.max_new_tokens <= self.window

    def __call__(self, conversations: list[Conversation], desc: str = "target answers") -> list[str]:
        """The target's greedy reply to each conversation, decoded (special tokens dropped)."""
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in self.reply_ids(conversations, desc)]

    @torch.inference_mode()
    def reply_ids(self, conversations: list[Conversation], desc: str = "target answers") -> list[list[int]]:
        """The target's greedy reply ids (EOS included when hit); ``[]`` for a prompt past the context window."""
        from specdec.generate import generate

        prompts = [self.prompt(c) for c in conversations]
        keys = [tuple(p.tolist()) for p in prompts]
        todo = {}
        for key, p in zip(keys, prompts):
            if key in self.replies or key in todo:
                continue
            if self.fits(p):
                todo[key] = p
            else:
                self.too_long += 1
        order = sorted(todo, key=len)  # similar lengths share a batch: less padding
        bar = tqdm(total=len(order), desc=desc, disable=not self.progress or not order)
        for lo in range(0, len(order), self.settings.batch_size):
            batch = order[lo : lo + self.settings.batch_size]
            ids, mask = left_pad([todo[k] for k in batch], self.pad)  # (B, n)
            start = time.perf_counter()
            out = generate(self.model, ids, self.drafter, attention_mask=mask, do_sample=False,
                           max_new_tokens=self.settings.max_new_tokens, pad_token_id=self.pad)  # (B, n + new)
            self.seconds += time.perf_counter() - start
            for key, row in zip(batch, out[:, ids.shape[1]:].tolist()):
                cut = next((i + 1 for i, tok in enumerate(row) if tok in self.eos), len(row))
                self.replies[key] = row[:cut]
                self.generated += cut
            bar.update(len(batch))
            bar.set_postfix(tok_s=round(self.generated / max(self.seconds, 1e-9)))
            if self.partial is not None and time.monotonic() - self._saved > _SAVE_EVERY_S:
                _atomic_save(self.replies, self.partial)
                self._saved = time.monotonic()
        bar.close()
        return [self.replies.get(k, []) for k in keys]


def _atomic_save(value, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").rename(path)  # a concurrent reader sees all of it or nothing


def _key(value) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:10]


def sequences_file(model: PreTrainedModel, settings: DistillSettings, directory: Path | None = None) -> Path:
    """Where the set of ``settings`` for ``model`` is cached (``$SPECDEC_CACHE/distill`` by default)."""
    return Path(directory or cache_dir() / "distill") / f"sequences-{fingerprint(model)}-{_key(settings.key())}.pt"


def build(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: DistillSettings,
          directory: Path | None = None, progress: bool = True, cache: bool = True) -> DistillSet:
    """The set's ids: every family's prompts (:mod:`specdec.training.prompts`) and the target's greedy answers.

    Read from the cache when built before with these settings (any batch size or drafter); else built
    (resuming a partial build of the same settings) and cached, unless ``cache=False``.

    Returns:
        A :class:`DistillSet` with ``sequences``, ``prompt_lens`` and ``families`` (no features yet),
        rows in a seeded random order (so a holdout mixes the families).
    """
    path = sequences_file(model, settings, directory)
    if cache and path.is_file():
        return _from_saved(torch.load(path))
    partial = path.with_name("partial-" + path.name) if cache else None
    answer = _Answerer(model, tokenizer, settings, partial, progress)
    rows: list[tuple[str, Conversation]] = []
    for family, size in settings.family_sizes().items():
        if size:
            made = FAMILIES[family](size, settings.seed, lambda convs, f=family: answer(convs, f"{f} (material)"))
            rows += [(family, c) for c in made]
    replies = answer.reply_ids([c for _, c in rows])
    saved = _to_saved(answer, rows, replies, settings)
    if cache:
        _atomic_save(saved, path)
        if partial.is_file():
            partial.unlink()
    return _from_saved(saved)


def _to_saved(answer: _Answerer, rows: list[tuple[str, Conversation]], replies: list[list[int]],
              settings: DistillSettings) -> dict:
    """The compact form on disk: flat ids, offsets, prompt lengths, families, how it was built."""
    seqs, plens, fams, seen = [], [], [], set()
    for (family, conv), reply in zip(rows, replies):
        prompt = answer.prompt(conv)
        key = tuple(prompt.tolist())
        if not reply or key in seen:  # past the context window, or drawn twice
            continue
        seen.add(key)
        seqs.append(prompt.tolist() + reply)
        plens.append(len(prompt))
        fams.append(family)
    order = random.Random(settings.seed).sample(range(len(seqs)), len(seqs))  # mixed for the holdout
    vocab = answer.model.get_input_embeddings().weight.shape[0]
    flat = torch.tensor([t for i in order for t in seqs[i]], dtype=torch.uint16 if vocab <= 2**16 else torch.int32)
    lengths = torch.tensor([len(seqs[i]) for i in order], dtype=torch.long)
    return {"format": FORMAT, "tokens": flat, "offsets": torch.cat([torch.zeros(1, dtype=torch.long),
                                                                    lengths.cumsum(0)]),
            "prompt_lens": torch.tensor([plens[i] for i in order], dtype=torch.int32),
            "families": [fams[i] for i in order], "settings": asdict(settings),
            "build": {"generated_tokens": answer.generated, "seconds": answer.seconds,
                      "tokens_per_s": answer.generated / max(answer.seconds, 1e-9), "too_long": answer.too_long,
                      "threads": torch.get_num_threads()}}


def _from_saved(saved: dict) -> DistillSet:
    flat, offsets = saved["tokens"].to(torch.long), saved["offsets"].tolist()
    sequences = [flat[a:b] for a, b in zip(offsets, offsets[1:])]
    return DistillSet(sequences, saved["prompt_lens"].tolist(), [], {}, [], list(saved["families"]),
                      {"settings": saved["settings"], **saved["build"]})


def build_sequences(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: DistillSettings,
                    directory: Path | None = None) -> tuple[list[Tensor], list[int]]:
    """Prompts + the target's greedy answers (:func:`build`), as ``(sequences, prompt_lens)``."""
    data = build(model, tokenizer, settings, directory)
    return data.sequences, data.prompt_lens


def _cached(path: Path, make):
    if path.is_file():
        return torch.load(path)
    value = make()
    _atomic_save(value, path)
    return value


def distill_set(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: DistillSettings,
                layers: tuple[int, ...] = (), directory: Path | None = None) -> DistillSet:
    """The whole set: the ids (:func:`build`) and the teacher pass over them (each cached)."""
    data = build(model, tokenizer, settings, directory)
    path = Path(directory or cache_dir() / "distill") / (
        f"teacher-{fingerprint(model)}-{_key([settings.key(), list(layers)])}.pt")
    teacher = _cached(path, lambda: vars(teacher_pass(model, data.sequences, data.prompt_lens, layers)))
    return DistillSet(**(teacher | {"families": data.families, "info": data.info}))


@torch.inference_mode()
def teacher_pass(model: PreTrainedModel, sequences: list[Tensor], prompt_lens: list[int], layers: tuple[int, ...] = (),
                 batch_size: int = 8) -> DistillSet:
    """Run the target over every sequence once; keep final features, ``layers``' features and greedy labels."""
    features, labels = [], []
    layer_features: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    by_index: dict[int, tuple] = {}
    for lo in tqdm(range(0, len(order), batch_size), desc="teacher pass"):
        idx = order[lo : lo + batch_size]
        ids, mask = left_pad([sequences[i] for i in idx], 0)  # (B, n)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
        for b, i in enumerate(idx):
            cols = slice(ids.shape[1] - len(sequences[i]), None)
            by_index[i] = (out.hidden_states[-1][b, cols].half(), out.logits[b, cols].argmax(-1),
                           {layer: out.hidden_states[layer][b, cols].half() for layer in layers})
    for i in range(len(sequences)):
        feat, label, per_layer = by_index[i]
        features.append(feat)
        labels.append(label)
        for layer in layers:
            layer_features[layer].append(per_layer[layer])
    return DistillSet(list(sequences), list(prompt_lens), features, layer_features, labels)


def report(data: DistillSet) -> str:
    """A per-family table: rows, answer tokens (and their share), all tokens."""
    table = data.tokens_by_family()
    answers = sum(r["answer_tokens"] for r in table.values()) or 1
    lines = [f"{'family':<11} {'rows':>6} {'answer tok':>11} {'share':>6} {'mean':>5} {'all tok':>9}"]
    for fam in [f for f in FAMILIES if f in table] + [f for f in table if f not in FAMILIES]:
        r = table[fam]
        lines.append(f"{fam:<11} {r['rows']:>6} {r['answer_tokens']:>11} {r['answer_tokens'] / answers:>6.1%} "
                     f"{r['answer_tokens'] / max(r['rows'], 1):>5.0f} {r['tokens']:>9}")
    total = {k: sum(r[k] for r in table.values()) for k in ("rows", "answer_tokens", "tokens")}
    lines.append(f"{'total':<11} {total['rows']:>6} {total['answer_tokens']:>11} {1:>6.1%} "
                 f"{total['answer_tokens'] / max(total['rows'], 1):>5.0f} {total['tokens']:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m specdec.training.distill``: build (or read) the set and print its per-family table."""
    defaults = DistillSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--directory", type=Path, default=None, help="cache folder (default $SPECDEC_CACHE/distill)")
    parser.add_argument("--no-cache", action="store_true", help="build and report, write nothing (a rate check)")
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args(argv)
    from specdec.models import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    settings = DistillSettings(**{k: getattr(args, k) for k in asdict(defaults)})
    start = time.perf_counter()
    data = build(model, tokenizer, settings, args.directory, cache=not args.no_cache)
    print(report(data))
    print(f"wall {time.perf_counter() - start:.0f} s; generation (this build or the cached one's): "
          f"{json.dumps(data.info)}")
    if not args.no_cache:
        print(f"cached: {sequences_file(model, settings, args.directory)}")


if __name__ == "__main__":
    main()
