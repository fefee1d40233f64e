"""Statistics of benchmark runs: percentiles, per-request timings, run summaries.

Pure Python, no numpy: the load generator and the report import it without the model stack,
and tests/unit/test_bench_stats.py checks it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks
    (numpy's default method); NaN for no values."""
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


@dataclass
class RequestRecord:
    """One request as the client saw it; times in seconds from time.perf_counter()."""

    started: float
    chunk_times: list[float] = field(default_factory=list)  # content-bearing chunks only
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
        """Gaps between successive content chunks (vLLM's "ITL"); a chunk carries one token
        unless the server coalesced several."""
        return [b - a for a, b in itertools.pairwise(self.chunk_times)]

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (None for one-token answers)."""
        if self.completion_tokens < 2 or self.finished is None:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.completion_tokens - 1)


@dataclass(frozen=True)
class RunSummary:
    """Closed-loop run of ``clients`` concurrent clients, as the report shows it."""

    clients: int
    requests: int
    errors: int
    duration_s: float
    tokens_per_s: float
    requests_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    itl_p50_s: float
    itl_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    e2e_p50_s: float
    e2e_p99_s: float
    completion_tokens: int
    prompt_cached_share: float  # of the prompt tokens, those the server's prompt cache held

    def as_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def summarize(records: Sequence[RequestRecord], clients: int) -> RunSummary:
    """Throughput over the run's wall time (first start to last finish) and latency
    percentiles over the successful requests."""
    good = [r for r in records if r.ok]
    duration = (max(r.e2e + r.started for r in good) - min(r.started for r in good)
                if good else math.nan)
    tokens = sum(r.completion_tokens for r in good)
    prompt_tokens = sum(r.prompt_tokens for r in good)
    gaps = [g for r in good for g in r.inter_chunk_gaps]
    tpots = [t for r in good if (t := r.tpot) is not None]
    ttfts = [r.ttft for r in good]
    e2es = [r.e2e for r in good]
    rate = (lambda n: n / duration) if good and duration > 0 else (lambda n: math.nan)
    return RunSummary(
        clients=clients, requests=len(good), errors=len(records) - len(good),
        duration_s=duration, tokens_per_s=rate(tokens), requests_per_s=rate(len(good)),
        ttft_p50_s=percentile(ttfts, 50), ttft_p99_s=percentile(ttfts, 99),
        itl_p50_s=percentile(gaps, 50), itl_p99_s=percentile(gaps, 99),
        tpot_p50_s=percentile(tpots, 50), tpot_p99_s=percentile(tpots, 99),
        e2e_p50_s=percentile(e2es, 50), e2e_p99_s=percentile(e2es, 99),
        completion_tokens=tokens,
        prompt_cached_share=sum(r.cached_prompt_tokens for r in good) / prompt_tokens
        if prompt_tokens else math.nan)


def ratio(numerator: float | None, denominator: float | None) -> float:
    """numerator / denominator, NaN when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return math.nan
    if math.isnan(numerator) or math.isnan(denominator):
        return math.nan
    return numerator / denominator
