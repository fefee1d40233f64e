"""RequestTrace: one request's timeline in a replica, recorded as metrics and one log line.

Times come from the engine steps that produced the tokens (``Delivery``), not from when
the event loop got around to them, so coalescing chunks does not distort the latencies.
The log line is structured JSON (request id, status, tokens in/out, TTFT, total time,
replica slot); prompt text only when the config asks for it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from deployments import metrics
from deployments.engine.protocol import GenerationOutput
from deployments.engine_loop import Delivery

logger = logging.getLogger("ray.serve")


class RequestTrace:
    def __init__(self, request_id: str, labels: dict[str, str], slot: str,
                 prompt: str | None = None):
        self.request_id = request_id
        self._labels = labels
        self._slot = slot
        self._prompt = prompt
        self._arrived = time.monotonic()
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None
        self._tokens_seen = 0
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.generated_tokens = 0
        self._ended = False

    def on_delivery(self, delivery: Delivery) -> None:
        item = delivery.item
        if not isinstance(item, GenerationOutput):
            return
        self.prompt_tokens = item.num_prompt_tokens
        self.cached_prompt_tokens = item.num_cached_prompt_tokens
        new_tokens = item.num_generated_tokens - self._tokens_seen
        if new_tokens <= 0:
            return
        produced_at = delivery.step_finished
        if self._first_token_at is None:
            self._first_token_at = produced_at
            metrics.REQUEST_QUEUE_TIME.record(max(delivery.step_started - self._arrived, 0.0),
                                              self._labels)
            metrics.TIME_TO_FIRST_TOKEN.record(produced_at - self._arrived, self._labels)
            new_tokens -= 1
        if new_tokens > 0 and self._last_token_at is not None:
            gap = (produced_at - self._last_token_at) / new_tokens
            for _ in range(new_tokens):
                metrics.INTER_TOKEN_LATENCY.record(gap, self._labels)
        self._last_token_at = produced_at
        self._tokens_seen = item.num_generated_tokens
        self.generated_tokens = item.num_generated_tokens

    def end(self, status: str, detail: str | None = None) -> None:
        """Record how the request ended (once): one of metrics.REQUEST_STATUSES."""
        if self._ended:
            return
        self._ended = True
        now = time.monotonic()
        labels = self._labels
        metrics.REQUESTS_TOTAL.record(1, {**labels, "status": status})
        metrics.GENERATION_TOKENS_TOTAL.record(self.generated_tokens, labels)
        if status == "finished":
            metrics.E2E_REQUEST_LATENCY.record(now - self._arrived, labels)
            metrics.PROMPT_TOKENS.record(self.prompt_tokens, labels)
            metrics.PROMPT_TOKENS_TOTAL.record(self.prompt_tokens, labels)
            metrics.PROMPT_CACHED_TOKENS_TOTAL.record(self.cached_prompt_tokens, labels)
            metrics.GENERATION_TOKENS.record(self.generated_tokens, labels)
        record: dict[str, Any] = {
            "event": "request_end", "request_id": self.request_id, "status": status,
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "ttft_s": _rounded(self._first_token_at - self._arrived
                               if self._first_token_at is not None else None),
            "total_s": _rounded(now - self._arrived), "slot": self._slot}
        if detail:
            record["detail"] = detail
        if self._prompt is not None:
            record["prompt"] = self._prompt
        logger.info(json.dumps(record))


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
