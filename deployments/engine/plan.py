"""What the scheduler and a model runner exchange: plain data, no model.

The scheduler (scheduler.py) decides; a runner (runner.py) computes. Per step the scheduler
hands the runner ``StepPlan``s (which sequences leave the batch, which prompt chunks to
prefill, which rows decode) and the runner answers each with a ``RunnerOutput`` (the next
token's logits, or the tokens themselves, of every row that needs one). Sequences travel
as ``SequenceState`` objects that only the scheduler changes: a runner reads them.

Imports neither ray nor torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from deployments.contract import TokenLogprob
from deployments.engine.detokenizer import StopStringTextStream
from deployments.engine.protocol import FinishReason, GenerationRequest

if TYPE_CHECKING:
    import numpy as np


@dataclass(eq=False)
class SequenceState:
    """One request's state inside the engine; identity is the object (``eq=False``)."""

    request: GenerationRequest
    text_stream: StopStringTextStream
    generated: list[int] = field(default_factory=list)
    num_prefilled: int = 0  # prompt tokens whose KV exists (computed or from a prompt cache)
    num_cached: int = 0  # leading prompt tokens whose KV a runner's prompt cache supplied
    finish_reason: FinishReason | None = None
    # Logprobs of tokens sampled since the last output (text may be held back a while).
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.request.prompt_token_ids

    @property
    def total_tokens(self) -> int:
        return len(self.prompt) + len(self.generated)

    def final_length(self, max_context_tokens: int) -> int:
        """Prompt plus answer when this sequence ends: max_tokens, or the context, if sooner."""
        return min(len(self.prompt) + self.request.params.max_tokens, max_context_tokens)


@dataclass(frozen=True)
class PrefillWork:
    """Compute the KV of prompt positions [start, end) of ``seq``; positions before
    ``start`` are already held (a prompt cache's, or earlier chunks'). When ``end`` is the
    prompt's length (``complete``) the runner returns the logits that follow the prompt and
    the sequence joins the running batch."""

    seq: SequenceState
    start: int
    end: int

    @property
    def complete(self) -> bool:
        return self.end == len(self.seq.prompt)


@dataclass(frozen=True)
class StepPlan:
    """One piece of a step, executed in field order.

    - ``leaving``: let go of every row, chunk state and cache claim held for these sequences
      (finished or aborted); a runner may keep what it needs for its prompt cache.
    - ``prefill``: in order; complete ones then join the running batch in this order, in
      front of the running rows if the runner's limits say ``joins_in_front``, else after.
    - ``decode``: one token for each of these running rows, in batch order.
    """

    leaving: tuple[SequenceState, ...] = ()
    prefill: tuple[PrefillWork, ...] = ()
    decode: tuple[SequenceState, ...] = ()

    @property
    def num_prefill_tokens(self) -> int:
        return sum(work.end - work.start for work in self.prefill)

    @property
    def sampled(self) -> list[SequenceState]:
        """The sequences that get a token from this plan, in the order of the runner's rows
        of output: every complete prefill, then every decoded row."""
        return [*(work.seq for work in self.prefill if work.complete), *self.decode]


@dataclass(frozen=True)
class RunnerOutput:
    """A runner's answer to a plan: one row per ``plan.sampled`` sequence, in that order;
    either float ``logits`` (rows x vocabulary) for the shared sampler, or the ``tokens`` of
    a runner that picks them itself (the model-free echo runner)."""

    logits: np.ndarray | None = None
    tokens: list[int] | None = None
