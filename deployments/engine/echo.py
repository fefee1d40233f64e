"""EchoEngine: a deterministic model-free engine behind the same batching code.

It exists for two jobs that must not depend on a model: tests of the serving layers (Ray
Serve real, model fake: routing, streaming, cancellation, backpressure, faults) and
benchmarks of the serving overhead alone. Tokens are Unicode code points, and the answer
repeats the prompt's characters from its last word on, so every answer shows which
request it belongs to. ``step_delay_s`` makes each step take time, like a model would.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from deployments.engine.batching import ContinuousBatchingEngine, Sequence_
from deployments.engine.options import EchoOptions

ECHO_EOS_TOKEN = 0  # never produced: answers end by max_tokens or stop strings
ECHO_VOCAB_SIZE = 0xD800  # code points below the surrogates: every id decodes to text


class EchoEngine(ContinuousBatchingEngine):
    decodes_row_subsets = True  # no tensors: any rows will do

    def __init__(self, *, max_batch_size: int, max_prefill_tokens_per_step: int,
                 options: EchoOptions | None = None):
        options = options or EchoOptions()
        super().__init__(max_batch_size=max_batch_size,
                         max_prefill_tokens_per_step=max_prefill_tokens_per_step,
                         max_context_tokens=options.max_context_tokens,
                         eos_token_ids=[ECHO_EOS_TOKEN], max_kv_tokens=options.max_kv_tokens,
                         short_first=options.short_first)
        self.step_delay_s = options.step_delay_s

    @classmethod
    def load(cls, checkpoint_path: str, *, device: str, max_batch_size: int,
             max_prefill_tokens_per_step: int, options: EchoOptions | None = None,
             hashes_verified: bool = False) -> EchoEngine:
        return cls(max_batch_size=max_batch_size,
                   max_prefill_tokens_per_step=max_prefill_tokens_per_step, options=options)

    @property
    def vocab_size(self) -> int:
        return ECHO_VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return [min(ord(c), ECHO_VOCAB_SIZE - 1) for c in text]

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        turns = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return turns + "assistant:"

    def _decode_text(self, token_ids: Sequence[int]) -> str:
        return "".join(chr(t) for t in token_ids)

    def _prefill(self, sequences: Sequence[Sequence_]) -> list[int]:
        self._sleep()
        return [self._token(seq, 0) for seq in sequences]

    def _prefill_chunk(self, sequence: Sequence_, end: int) -> int | None:
        self._sleep()
        return self._token(sequence, 0) if end == len(sequence.prompt) else None

    def _join_pending(self) -> None:
        """Nothing to join: the echo engine keeps no tensors."""

    def _decode(self, sequences: Sequence[Sequence_]) -> list[int]:
        self._sleep()
        return [self._token(seq, len(seq.generated)) for seq in sequences]

    def _drop_rows(self, rows: Sequence[int]) -> None:
        """Nothing to drop: the echo engine keeps no tensors."""

    def _sleep(self) -> None:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)

    @staticmethod
    def _token(seq: Sequence_, index: int) -> int:
        text = seq.prompt
        start = max((i + 1 for i, t in enumerate(text) if t == ord(" ")), default=0)
        tail = text[start:] if start < len(text) else text
        return tail[index % len(tail)]
