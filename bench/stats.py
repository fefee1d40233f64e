"""Statistics of benchmark runs: percentiles, per-request timings, one level's summary.

Pure Python (no numpy), so the load generator and the report run without the model stack.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100), interpolating linearly between closest ranks (numpy's
    default method); NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Iterable[float]) -> float:
    return percentile(values, 50)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator; None when either is missing or NaN, or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    if math.isnan(numerator) or math.isnan(denominator):
        return None
    return numerator / denominator


def _value(x: float) -> float | None:
    return None if math.isnan(x) else x


@dataclass
class RequestRecord:
    """One request as the client saw it; times in seconds of time.perf_counter()."""

    started: float
    chunk_times: list[float] = field(default_factory=list)  # chunks that carried text
    finished: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finished is not None and bool(self.chunk_times)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.started

    @property
    def e2e(self) -> float:
        assert self.finished is not None
        return self.finished - self.started

    @property
    def inter_chunk_gaps(self) -> list[float]:
        """Gaps between successive text chunks (vLLM's ITL); a chunk carries one token
        unless the server coalesced several."""
        return [b - a for a, b in itertools.pairwise(self.chunk_times)]

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (None for one-token answers)."""
        if self.completion_tokens < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.completion_tokens - 1)


def summarize(records: Sequence[RequestRecord], clients: int, max_tokens: int
              ) -> dict[str, Any]:
    """A level's figures (bench.loadgen.Level's fields but ``foreign_cores``/``attempts``):
    throughput over its wall time (first start to last finish), latency percentiles over
    the successful requests; None where nothing was measured."""
    good = [r for r in records if r.ok]
    duration = (max(r.started + r.e2e for r in good) - min(r.started for r in good)
                if good else math.nan)
    tokens = sum(r.completion_tokens for r in good)
    prompt_tokens = sum(r.prompt_tokens for r in good)
    ttfts, e2es = [r.ttft for r in good], [r.e2e for r in good]
    gaps = [g for r in good for g in r.inter_chunk_gaps]
    tpots = [t for r in good if (t := r.tpot) is not None]
    return {
        "clients": clients, "max_tokens": max_tokens, "requests": len(good),
        "errors": len(records) - len(good),
        "first_error": next((r.error for r in records if not r.ok), None),
        "short_answers": sum(r.completion_tokens < max_tokens for r in good),
        "completion_tokens": tokens, "duration_s": _value(duration),
        "tokens_per_s": tokens / duration if good and duration > 0 else None,
        "ttft_p50_s": _value(percentile(ttfts, 50)), "ttft_p99_s": _value(percentile(ttfts, 99)),
        "tpot_p50_s": _value(percentile(tpots, 50)), "itl_p99_s": _value(percentile(gaps, 99)),
        "e2e_p50_s": _value(percentile(e2es, 50)), "e2e_p99_s": _value(percentile(e2es, 99)),
        "prompt_tokens": round(prompt_tokens / len(good)) if good else None,
        "prompt_cached_share": sum(r.cached_prompt_tokens for r in good) / prompt_tokens
        if prompt_tokens else None}
