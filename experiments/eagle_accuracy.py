"""Where an EAGLE-3 head is right on the benchmark: its teacher-forced top-1 at each unroll step on the
target's own greedy answers to the Spec-Bench prompts, per task, split by whether prompt lookup
already drafts the token.

    python -m experiments.eagle_accuracy                              # the shipped head, 3 prompts per task
    python -m experiments.eagle_accuracy --checkpoint path.pt --per-task 5 --steps 5
    python -m experiments.eagle_accuracy --untrained                  # the head training starts from

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
from specdec.drafters import Eagle
from specdec.drafters.eagle import EagleHead, default_fused_layers
from specdec.drafters.prompt_lookup import lookup_hits
from specdec.drafters.vocab import ReducedHead
from specdec.text import encode
from specdec.tooling.data import SPEC_BENCH, load_prompts
from specdec.training.train import LOOKUP_NGRAM, ttt_unroll


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


def table(rows: dict[str, list[tuple[Tensor, Tensor]]], steps: int) -> str:
    """Markdown: per task (and all), answer tokens, lookup's share, top-1 per step over all / hits / misses."""
    def rate(correct: Tensor, where: Tensor) -> str:
        return " ".join(f"{correct[s, where].float().mean():.2f}" if where.any() else "-" for s in range(steps))

    lines = [f"| task | answer tokens | lookup drafts | top-1 step 1..{steps} | where lookup drafts it | "
             "where lookup misses |", "|---|---|---|---|---|---|"]
    rows = rows | {"all": [pair for task in rows.values() for pair in task]}
    for task, pairs in rows.items():
        hits = torch.cat([h for h, _ in pairs])
        correct = torch.cat([c for _, c in pairs], dim=1)
        every = torch.ones_like(hits)
        lines.append(f"| {task} | {len(hits)} | {hits.float().mean():.2f} | {rate(correct, every)} | "
                     f"{rate(correct, hits)} | {rate(correct, ~hits)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--checkpoint", default="eagle-smollm2-135m", help="an EAGLE-3 checkpoint, name or path")
    parser.add_argument("--untrained", action="store_true", help="the head from the target's last layer instead")
    parser.add_argument("--prompts", default=str(SPEC_BENCH))
    parser.add_argument("--per-task", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    if args.untrained:
        head, vocab = EagleHead.from_target(model, default_fused_layers(model.config.num_hidden_layers)).float(), None
    else:
        drafter = Eagle.from_checkpoint(args.checkpoint)
        head, vocab = drafter.head, drafter.vocab
        if not head.eagle3:
            raise ValueError(f"checkpoint {args.checkpoint!r} is an EAGLE-1 head: this measures EAGLE-3 heads "
                             "(trained with drafter.train.fused_layers=[])")
    lm = ReducedHead(model.get_output_embeddings(), vocab)
    rows: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for prompt in load_prompts(args.prompts, per_task=args.per_task):
        ids = encode(tokenizer, [{"role": "user", "content": prompt.turns[0]}])
        seq = model.generate(ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                             max_new_tokens=args.max_new_tokens)[0]
        rows.setdefault(prompt.task, []).append(answer_hits(model, head, lm, seq, len(ids), args.steps))
    print(table(rows, args.steps))


if __name__ == "__main__":
    main()
