"""The self-distillation set drafters train on: the target's own answers and hidden states.

Prompts come from GSM8K's *training* split (``data/gsm8k_train``, MIT) and from questions the
target writes itself on varied topics; never from the benchmark's prompts. The target answers
each prompt greedily (as the benchmark decodes); a teacher pass over prompt + answer then keeps,
at every position, the target's final hidden state (what its output head reads), the hidden
state after any requested layer (early exit), and its greedy next token (the label). Both
steps are cached on disk, keyed by the target's fingerprint and the settings.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specdec.text import encode, left_pad
from specdec.training.checkpoint import fingerprint
from specdec.tooling.data import DATA_DIR
from specdec.models import cache_dir

GSM8K_TRAIN = DATA_DIR / "gsm8k_train" / "train.jsonl"

TOPICS = (
    "cooking", "gardening", "astronomy", "ancient Rome", "machine learning", "personal finance", "climate",
    "football", "music theory", "chess", "the human heart", "volcanoes", "photography", "poetry", "travel in Japan",
    "job interviews", "electric cars", "the ocean", "birds", "coffee", "chemistry", "world history", "painting",
    "programming in Python", "mental health", "architecture", "renewable energy", "dogs", "mathematics", "movies",
    "nutrition", "the stock market", "space exploration", "languages", "friendship", "insects", "medieval castles",
    "video games", "economics", "physics", "philosophy", "small business", "hiking", "the internet", "sleep",
    "writing a resume", "baking bread", "earthquakes", "the moon", "democracy", "recycling", "fashion",
    "first aid", "ancient Egypt", "robots", "cats", "weather", "marketing", "geography", "public speaking",
)
STYLES = (
    "Write one question a curious student might ask about {topic}. Reply with the question only.",
    "Write a short instruction asking an assistant to explain something about {topic}. Reply with the "
    "instruction only.",
    "Write a request for a short piece of writing (an email, a story or a list) about {topic}. Reply with "
    "the request only.",
    "Write a short paragraph about {topic}, then ask the reader to summarize it. Reply with the paragraph and "
    "the request only.",
)


@dataclass(frozen=True)
class DistillSettings:
    """What the set is made of; its hash names the cache file."""

    gsm8k_prompts: int = 400
    self_prompts: int = 240
    max_new_tokens: int = 192
    batch_size: int = 48
    seed: int = 0


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
    """

    sequences: list[Tensor]
    prompt_lens: list[int]
    features: list[Tensor]
    layer_features: dict[int, list[Tensor]]
    labels: list[Tensor]

    def split(self, holdout: int) -> tuple[DistillSet, DistillSet]:
        """The last ``holdout`` sequences apart (validation)."""
        def part(sl):
            return DistillSet(self.sequences[sl], self.prompt_lens[sl], self.features[sl],
                              {k: v[sl] for k, v in self.layer_features.items()}, self.labels[sl])
        return part(slice(None, -holdout)), part(slice(-holdout, None))


def gsm8k_prompts(n: int, seed: int) -> list[str]:
    """``n`` GSM8K training questions, a fixed random sample."""
    rows = [json.loads(line)["question"] for line in GSM8K_TRAIN.read_text().splitlines() if line.strip()]
    return random.Random(seed).sample(rows, min(n, len(rows)))


@torch.inference_mode()
def _generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[Tensor], max_new_tokens: int,
              batch_size: int, desc: str, **sampling) -> list[list[int]]:
    """The target's answers (EOS included when hit) to each prompt, batched and left-padded."""
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    out: list[list[int]] = [[] for _ in prompts]
    for lo in tqdm(range(0, len(order), batch_size), desc=desc):
        idx = order[lo : lo + batch_size]
        ids, mask = left_pad([prompts[i] for i in idx], pad)
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
        for i, row in zip(idx, gen[:, ids.shape[1] :].tolist()):
            for tok in row:
                out[i].append(tok)
                if tok in eos:
                    break
    return out


def self_written_prompts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n: int, batch_size: int,
                         seed: int) -> list[str]:
    """``n`` prompts the target writes itself (sampled, seeded) from topic x style instructions."""
    rng = random.Random(seed)
    asks = [rng.choice(STYLES).format(topic=rng.choice(TOPICS)) for _ in range(n)]
    torch.manual_seed(seed)
    ids = [encode(tokenizer, [{"role": "user", "content": ask}]) for ask in asks]
    answers = _generate(model, tokenizer, ids, 96, batch_size, "target writes prompts", do_sample=True,
                        temperature=0.8, top_p=0.95)
    texts = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
    return [t for t in texts if len(t) > 8]


def _cached(directory: Path | None, name: str, build):
    """``build()``'s result, kept in ``directory/name`` (default ``$SPECDEC_CACHE/distill``)."""
    path = Path(directory or cache_dir() / "distill") / name
    if path.is_file():
        return torch.load(path)
    value = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").rename(path)  # atomic: a concurrent reader sees all of it or nothing
    return value


def _key(value) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:10]


def build_sequences(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: DistillSettings,
                    directory: Path | None = None) -> tuple[list[Tensor], list[int]]:
    """Prompts + the target's greedy answers; read from the cache when built before with these settings."""
    def build():
        texts = gsm8k_prompts(settings.gsm8k_prompts, settings.seed)
        if settings.self_prompts:
            texts += self_written_prompts(model, tokenizer, settings.self_prompts, settings.batch_size, settings.seed)
        prompts = [encode(tokenizer, [{"role": "user", "content": t}]) for t in texts]
        answers = _generate(model, tokenizer, prompts, settings.max_new_tokens, settings.batch_size,
                            "target answers", do_sample=False)
        sequences = [torch.cat([p, torch.tensor(a, dtype=torch.long)]) for p, a in zip(prompts, answers)]
        order = random.Random(settings.seed).sample(range(len(sequences)), len(sequences))  # mixed for the holdout
        return {"sequences": [sequences[i] for i in order], "prompt_lens": [len(prompts[i]) for i in order]}

    saved = _cached(directory, f"sequences-{fingerprint(model)}-{_key(asdict(settings))}.pt", build)
    return saved["sequences"], saved["prompt_lens"]


def distill_set(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: DistillSettings,
                layers: tuple[int, ...] = (), directory: Path | None = None) -> DistillSet:
    """The whole set: sequences and the teacher pass over them (each cached)."""
    sequences, prompt_lens = build_sequences(model, tokenizer, settings, directory)
    name = f"teacher-{fingerprint(model)}-{_key([asdict(settings), list(layers)])}.pt"
    return DistillSet(**_cached(directory, name, lambda: vars(teacher_pass(model, sequences, prompt_lens, layers))))


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
        ids, mask = left_pad([sequences[i] for i in idx], 0)
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
