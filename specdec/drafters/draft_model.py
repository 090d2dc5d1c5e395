"""An independent draft model: any causal LM sharing the target's vocabulary
(Leviathan et al. 2023; Chen et al. 2023), with its own KV cache kept across steps.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from specdec.cache import crop_to, new_cache
from specdec.drafters.base import DecodeState, Drafter
from specdec.tree import DraftTree
from specdec.verify import Acceptance


def vocab_size(model: PreTrainedModel) -> int:
    """Rows of the model's output head: the size of its distribution."""
    return model.get_output_embeddings().weight.shape[0]


class DraftModel(Drafter):
    """Drafts a chain of ``k`` tokens auto-regressively with a small causal LM.

    With sampling, each draft is drawn from q, the draft's distribution after the
    same temperature / top-k / top-p as the target's p; greedy drafts take the argmax.

    Args:
        model: the draft LM; must share the target's tokenizer.
        k: draft tokens per step.
    """

    def __init__(self, model: PreTrainedModel, k: int = 4) -> None:
        if k < 1:
            raise ValueError(f"DraftModel k={k} must be >= 1")
        self.model, self.k = model.eval(), k
        self.cache = None
        self.cached = 0  # positions of state.tokens held in self.cache
        self._drafted_from = 0

    def check(self, target: torch.nn.Module) -> None:
        mine, theirs = vocab_size(self.model), vocab_size(target)
        if mine != theirs:
            raise ValueError(
                f"drafter vocab {mine} != target vocab {theirs}: draft and target must share a tokenizer"
            )

    def prefill(self, state: DecodeState) -> None:
        self.cache, self.cached = new_cache(self.model), 0

    @torch.inference_mode()
    def propose(self, state: DecodeState) -> DraftTree:
        k = min(self.k, state.budget)
        device = self.model.device
        if k == 0:
            return DraftTree.empty(state.tokens.device)
        n = state.tokens.shape[1]
        x = state.tokens[:, self.cached :].to(device)  # (1, new) not yet in the draft cache
        tokens, qs = [], []
        for i in range(k):
            pos = torch.arange(n + i - x.shape[1], n + i, device=device)[None]  # (1, new)
            logits = self.model(input_ids=x, position_ids=pos, cache=self.cache, use_cache=True, logits_to_keep=1).logits
            tok, q = state.sampling.choose(logits[0, -1:], state.n_generated + i, state.generator)
            tokens.append(tok)
            qs.append(q)
            x = tok.view(1, 1)
        self.cached, self._drafted_from = n + k - 1, n  # the last draft was never fed back
        q = torch.cat(qs).to(state.tokens.device) if state.sampling.do_sample else None
        return DraftTree.chain(torch.cat(tokens).to(state.tokens.device), q)

    def commit(self, state: DecodeState, result: Acceptance) -> None:
        valid = min(self.cached, self._drafted_from + len(result.path))
        crop_to(self.cache, valid)
        self.cached = valid
