"""EchoRunner: a deterministic model-free runner under the shared scheduler.

It exists for two jobs that must not depend on a model: tests of the serving layers (Ray
Serve real, model fake: routing, streaming, cancellation, backpressure, faults) and
benchmarks of the serving overhead alone. Tokens are Unicode code points, and the answer
repeats the prompt's characters from its last word on, so every answer shows which
request it belongs to. ``step_delay_s`` makes each forward pass (a plan that prefills or
decodes) take time, like a model's would.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from deployments.engine.chat_template import uses_tools, with_tools_as_text
from deployments.engine.guided import GuideCompiler
from deployments.engine.options import EchoOptions
from deployments.engine.plan import RunnerOutput, SequenceState, StepPlan
from deployments.engine.runner import ModelRunner, RunnerLimits

ECHO_EOS_TOKEN = 0  # never produced: answers end by max_tokens or stop strings
ECHO_VOCAB_SIZE = 0xD800  # code points below the surrogates: every id decodes to text


class EchoText:
    """Tokens are Unicode code points; a chat is its turns, one per line."""

    def encode(self, text: str) -> list[int]:
        return [min(ord(c), ECHO_VOCAB_SIZE - 1) for c in text]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(chr(t) for t in token_ids)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]],
                            tools: Sequence[dict[str, Any]] = ()) -> str:
        if uses_tools(messages, tools):
            messages = with_tools_as_text(messages, tools)
        turns = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return turns + "assistant:"

    def guides(self, vocab_size: int, eos_token_ids: Sequence[int]) -> GuideCompiler:
        tokens = [chr(t).encode() for t in range(vocab_size)]
        return GuideCompiler.for_token_bytes(tokens, eos_token_ids)


class EchoRunner(ModelRunner):
    """Answers with tokens, not logits: no model, no KV, any rows decode."""

    text = EchoText()

    def __init__(self, *, max_batch_size: int, max_prefill_tokens_per_step: int,
                 options: EchoOptions | None = None):
        options = options or EchoOptions()
        self.limits = RunnerLimits(
            max_batch_size=max_batch_size, max_prefill_tokens_per_step=max_prefill_tokens_per_step,
            max_context_tokens=options.max_context_tokens, vocab_size=ECHO_VOCAB_SIZE,
            eos_token_ids=frozenset({ECHO_EOS_TOKEN}), max_kv_tokens=options.max_kv_tokens,
            short_first=options.short_first, decodes_row_subsets=True)
        self.step_delay_s = options.step_delay_s

    @classmethod
    def load(cls, checkpoint_path: str, *, device: str, max_batch_size: int,
             max_prefill_tokens_per_step: int, options: EchoOptions | None = None,
             hashes_verified: bool = False) -> EchoRunner:
        return cls(max_batch_size=max_batch_size,
                   max_prefill_tokens_per_step=max_prefill_tokens_per_step, options=options)

    def execute(self, plan: StepPlan) -> RunnerOutput:
        if plan.prefill or plan.decode:
            self._sleep()  # one forward pass
        tokens = [_echo_token(work.seq, 0) for work in plan.prefill if work.complete]
        tokens += [_echo_token(seq, len(seq.generated)) for seq in plan.decode]
        return RunnerOutput(tokens=tokens)

    def _sleep(self) -> None:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)


def _echo_token(seq: SequenceState, index: int) -> int:
    """The prompt's characters from its last word on, repeated."""
    text = seq.prompt
    start = max((i + 1 for i, t in enumerate(text) if t == ord(" ")), default=0)
    tail = text[start:] if start < len(text) else text
    return tail[index % len(tail)]
