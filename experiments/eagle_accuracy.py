"""Where an EAGLE-3 head or a block drafter is right on the benchmark: its teacher-forced top-1 at each draft
step on the target's own greedy answers to the Spec-Bench prompts, per task, split by whether prompt lookup
already drafts the token, and the chain it would get accepted.

    python -m experiments.eagle_accuracy                              # the shipped head, 3 prompts per task
    python -m experiments.eagle_accuracy --checkpoint path.pt --per-task 5 --steps 5
    python -m experiments.eagle_accuracy --untrained                  # the head training starts from
    python -m experiments.eagle_accuracy --kind block --checkpoint block-smollm2-135m --steps 8

For a block drafter (``--kind block``), step ``s`` is mask ``s`` of the block rooted ``s`` tokens before the
token: every root in the answer gets its own block over the true prefix's fused features, all in one
forward (the training layout, :func:`~specdec.drafters.block.anchor_blocks`, with every anchor).
``chain`` is the teacher-forced mean accepted length of a greedy chain of ``--steps`` from each root,
counting the bonus token (1 + the leading run of right steps; a pooled tau without the engine), over
every root and over the roots whose next token lookup misses (where a lookup-else drafter runs it).

The target answers each prompt with ``model.generate`` (greedy, ``--max-new-tokens``); one forward over
prompt + answer gives the fused features; :func:`~specdec.training.train.ttt_unroll` runs the head as
training's validation does (step ``s`` reads its own states of step ``s - 1``), so each row is directly
comparable with the ``val/top1_depth{s}`` and ``val/top1_depth{s}_lookup_miss`` of training. A head whose
held-out accuracy is far above its benchmark accuracy is out of its training distribution; the columns
split by lookup show whether it fails where a ``Combined`` lookup-else-head drafter needs it.
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

from specdec import load_model
from specdec.drafters import BlockDrafter, Eagle
from specdec.drafters.block import BlockHead, anchor_blocks, features_before
from specdec.drafters.eagle import EagleHead, default_fused_layers
from specdec.drafters.prompt_lookup import lookup_hits
from specdec.drafters.vocab import ReducedHead
from specdec.text import encode
from specdec.tooling.data import SPEC_BENCH, load_prompts
from specdec.training.train import LOOKUP_NGRAM, attention_bias, ttt_unroll


@torch.inference_mode()
def answer_hits(model, head: EagleHead, lm: ReducedHead, seq: Tensor, prompt_len: int,
                steps: int) -> tuple[Tensor, Tensor]:
    """For the answer tokens ``seq[prompt_len:]`` (the target's greedy output): ``(n,)`` whether prompt lookup
    drafts each, and ``(steps, n)`` whether the head's step-``s`` prediction is it (``False`` where the step
    has no position to predict from)."""
    out = model(seq[None], output_hidden_states=True)
    fused = torch.cat([out.hidden_states[layer] for layer in head.fused_layers], dim=-1)
    T = len(seq)
    states = ttt_unroll(head, model.get_input_embeddings(), fused, seq[None], torch.arange(T)[None],
                        torch.ones(1, T, dtype=torch.bool), steps)
    answer = torch.arange(prompt_len, T)
    correct = torch.zeros(steps, len(answer), dtype=torch.bool)
    for s, state in enumerate(states):  # index j of step s predicts token j + 2 + s
        pred = lm(head.logit_states(state[0])).argmax(-1)  # (T - 1,)
        j = answer - 2 - s
        ok = j >= 0
        correct[s, ok] = pred[j[ok]] == seq[answer[ok]]
    return lookup_hits(seq, *LOOKUP_NGRAM)[prompt_len:], correct


@torch.inference_mode()
def block_answer_hits(model, head: BlockHead, lm: ReducedHead, seq: Tensor, prompt_len: int,
                      steps: int) -> tuple[Tensor, Tensor]:
    """:func:`answer_hits` for a block drafter: ``(steps, n)`` whether mask ``s + 1`` of the block rooted at
    the token ``s + 1`` before answer token ``j`` is it (roots from the prompt's last token on)."""
    out = model(seq[None], output_hidden_states=True)
    fused = torch.cat([out.hidden_states[layer] for layer in head.fused_layers], dim=-1).float()  # (1, T, F)
    T = len(seq)
    layout = anchor_blocks(torch.arange(T)[None], torch.ones(1, T, dtype=torch.bool),
                           torch.tensor([prompt_len - 1]), steps, anchors=T)  # every root, in order
    anchor = layout["anchor"]  # (1, C)
    roots = model.get_input_embeddings()(seq[None].gather(1, anchor.clamp(min=0))).float()  # (1, C, H)
    blocks = head.block_inputs(roots, steps, features_before(fused, anchor))
    x = torch.cat([head.context(fused), blocks.flatten(1, 2)], dim=1)
    hidden = head.hidden(x, layout["positions"], attention_mask=attention_bias(layout["visible"], head.body.config))
    pred = lm(hidden[0, T:].unflatten(0, (anchor.shape[1], steps + 1))[:, 1:]).argmax(-1)  # (C, steps)
    correct = torch.zeros(steps, T - prompt_len, dtype=torch.bool)
    for c, n in enumerate(anchor[0].tolist()):
        for s in range(steps):
            a = n + 1 + s - prompt_len  # the answer token mask s + 1 of root n drafts
            if 0 <= a < T - prompt_len:
                correct[s, a] = pred[c, s] == seq[n + 1 + s]
    return lookup_hits(seq, *LOOKUP_NGRAM)[prompt_len:], correct


def chains(correct: Tensor) -> Tensor:
    """``(steps, n)`` per-step hits -> ``(n,)`` the greedy chain accepted from the root before each answer token:
    1 (the target's own token) + the leading run of steps ``s`` right about token ``j + s``."""
    steps, n = correct.shape
    length = torch.ones(n)
    alive = torch.ones(n, dtype=torch.bool)
    for s in range(steps):
        right = torch.zeros(n, dtype=torch.bool)
        right[: n - s] = correct[s, s:]
        alive &= right
        length += alive.float()
    return length


def table(rows: dict[str, list[tuple[Tensor, Tensor]]], steps: int) -> str:
    """Markdown: per task (and all), answer tokens, lookup's share, top-1 per step over all / hits / misses."""
    def rate(correct: Tensor, where: Tensor) -> str:
        return " ".join(f"{correct[s, where].float().mean():.2f}" if where.any() else "-" for s in range(steps))

    lines = [f"| task | answer tokens | lookup drafts | top-1 step 1..{steps} | where lookup drafts it | "
             "where lookup misses | chain | chain where lookup misses |", "|---|---|---|---|---|---|---|---|"]
    rows = rows | {"all": [pair for task in rows.values() for pair in task]}
    for task, pairs in rows.items():
        hits = torch.cat([h for h, _ in pairs])
        correct = torch.cat([c for _, c in pairs], dim=1)
        every = torch.ones_like(hits)
        chain = torch.cat([chains(c) for _, c in pairs])
        missed = chain[~hits].mean() if (~hits).any() else float("nan")
        lines.append(f"| {task} | {len(hits)} | {hits.float().mean():.2f} | {rate(correct, every)} | "
                     f"{rate(correct, hits)} | {rate(correct, ~hits)} | {chain.mean():.2f} | {missed:.2f} |")
    return "\n".join(lines)


def load_head(model, kind: str, checkpoint: str | None, untrained: bool) -> tuple[torch.nn.Module, Tensor | None]:
    """The head to measure and its reduced vocabulary: a checkpoint of ``kind`` (``None``: the shipped one), or
    the untrained head training starts from."""
    fused = default_fused_layers(model.config.num_hidden_layers)
    if untrained:
        head = BlockHead.from_target(model, fused) if kind == "block" else EagleHead.from_target(model, fused)
        return head.float(), None
    if kind == "block":
        drafter = BlockDrafter.from_checkpoint(checkpoint)
        return drafter.head.float(), drafter.vocab
    drafter = Eagle.from_checkpoint(checkpoint)
    if not drafter.head.eagle3:
        raise ValueError(f"checkpoint {checkpoint!r} is an EAGLE-1 head: this measures EAGLE-3 heads "
                         "(trained with drafter.train.fused_layers=[])")
    return drafter.head, drafter.vocab


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--kind", choices=("eagle", "block"), default="eagle", help="an EAGLE-3 head or a block drafter")
    parser.add_argument("--checkpoint", nargs="+", default=[None],
                        help="checkpoints of --kind, names or paths (default: the shipped one); several share the "
                             "target's answers and print one table each")
    parser.add_argument("--untrained", action="store_true", help="the head from the target's last layer instead")
    parser.add_argument("--prompts", default=str(SPEC_BENCH))
    parser.add_argument("--per-task", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    answers = []
    for prompt in load_prompts(args.prompts, per_task=args.per_task):
        ids = encode(tokenizer, [{"role": "user", "content": prompt.turns[0]}])
        seq = model.generate(ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                             max_new_tokens=args.max_new_tokens)[0]
        answers.append((prompt.task, seq, len(ids)))
    hits = block_answer_hits if args.kind == "block" else answer_hits
    for checkpoint in [None] if args.untrained else args.checkpoint:
        head, vocab = load_head(model, args.kind, checkpoint, args.untrained)
        lm = ReducedHead(model.get_output_embeddings(), vocab)
        rows: dict[str, list[tuple[Tensor, Tensor]]] = {}
        for task, seq, prompt_len in answers:
            rows.setdefault(task, []).append(hits(model, head, lm, seq, prompt_len, args.steps))
        if len(args.checkpoint) > 1:
            print(f"\n{checkpoint}:")
        print(table(rows, args.steps))


if __name__ == "__main__":
    main()
