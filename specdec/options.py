"""The settings of one decode call, validated once and passed whole.

:func:`specdec.generate` resolves its keyword arguments into one frozen :class:`Options`; the
engine, the verification forward and every proposer (their own tree forwards too) read the same
object, so a setting given to ``generate`` reaches every forward that needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specdec.sampling import Sampling

ATTENTION_BACKENDS = ("auto", "triton", "reference")
LINEAR_BACKENDS = ("auto", "skinny", "torch")


@dataclass(frozen=True)
class Options:
    """How one call decodes.

    Attributes:
        max_new_tokens: each row's output budget (>= 1).
        sampling: how p (and a drafter's q) are made from logits; see :class:`~specdec.sampling.Sampling`.
        attention_backend: tree attention: ``"auto"`` (the Triton kernel on CUDA, the torch reference
            elsewhere), ``"triton"`` or ``"reference"``; the target's verification and the drafters'
            tree forwards alike.
        linear_backend: the CPU linear products of the target and the drafter's networks:
            ``"auto"`` (:mod:`specdec.backends.cpu_linear` with the native product of
            :mod:`specdec.backends.native` for 1-8 rows, where it builds, and that library's RMSNorm and
            rotary embedding for the Llama-code norms and rotary embeddings of a step of up to 64 tokens,
            :mod:`specdec.backends.fused`), ``"skinny"`` (the torch products, and the model's own norms and
            rotary embeddings) or ``"torch"`` (``F.linear``).
        pack_weights: let the CPU products keep oneDNN-packed copies of large weights (faster for
            3+ rows, costs the weights' memory once more; see :class:`~specdec.backends.cpu_linear.PackedWeights`).
        min_verify_tokens: pad verification forwards that carry drafts to at least this many tokens
            (padding is discarded); a speed knob for CPUs whose products are slow for 2-4 rows.
        goodput: let the goodput controller choose each step's draft depth from the cost curve and the
            rows' acceptance (:mod:`specdec.control`); ``False`` drafts the drafter's fixed depth.
        cost_model: the verification cost curve the controller uses (``None``: measured once per model,
            device and thread count).
        max_time: seconds after which no new step starts, counted from the start of the decode (before
            prefill), as transformers' ``MaxTimeCriteria``; ``None``: no limit.
        profile: also time the target forward's linear products and attention layers
            (:class:`~specdec.stats.StepTimes`; ``experiments.profile_step``): a clock read around each.
    """

    max_new_tokens: int = 20
    sampling: Sampling = field(default_factory=Sampling)
    attention_backend: str = "auto"
    linear_backend: str = "auto"
    pack_weights: bool = True
    min_verify_tokens: int = 1
    goodput: bool = True
    cost_model: object | None = None
    max_time: float | None = None
    profile: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1 "
                             "(or max_length must exceed the prompt length)")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"tree attention backend {self.attention_backend!r} is not one of {ATTENTION_BACKENDS}")
        if self.linear_backend not in LINEAR_BACKENDS:
            raise ValueError(f"linear_backend={self.linear_backend!r} is not one of {LINEAR_BACKENDS}")
        if not isinstance(self.min_verify_tokens, int) or self.min_verify_tokens < 1:
            raise ValueError(f"min_verify_tokens={self.min_verify_tokens} must be >= 1")
        from specdec.control import CostModel

        if self.cost_model is not None and not isinstance(self.cost_model, CostModel):
            raise ValueError(f"cost_model={self.cost_model!r} must be a specdec.control.CostModel or None")
        if not isinstance(self.sampling, Sampling):
            raise ValueError(f"sampling={self.sampling!r} must be a specdec.Sampling")
