"""Every Prometheus metric of the service, defined once, under vLLM's names with our prefix.

Each metric is recorded twice, through one call:
- into prometheus-client, in multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` is set
  (our deployments set it in their processes from the directory ``build_app`` hands
  them, ``prepare_multiprocess_dir``), so ``GET /metrics`` on the
  HTTP port returns these names aggregated over every replica process of the node;
- into ``ray.util.metrics`` when running inside Ray, so a cluster's Prometheus scrapes
  them from Ray's per-node metrics agent (exported with Ray's ``ray_`` prefix).

Labels: ``model``, ``device`` (cpu, xpu, or router for the ingress) and ``slot``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, multiprocess, values

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LABELS = ("model", "device", "slot")

# Latencies from milliseconds (a decode step of a small model) to minutes (a long answer).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                     1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
REQUEST_STATUSES = ("finished", "error", "rejected", "cancelled", "timeout")


class _Metric:
    """One metric in prometheus-client and, inside Ray, in ray.util.metrics."""

    def __init__(self, kind: str, name: str, documentation: str, *,
                 extra_labels: Sequence[str] = (), buckets: Sequence[float] = (),
                 counter_as_gauge: bool = False):
        labels = (*LABELS, *extra_labels)
        if kind == "histogram":
            self._prom: Any = prometheus_client.Histogram(name, documentation, labels,
                                                          buckets=buckets)
        elif kind == "gauge" or counter_as_gauge:
            # A counter named X_total beside a histogram named X cannot be registered in
            # prometheus-client (both claim family X); exposed as a gauge that only grows
            # and sums over dead processes too, it keeps the name users chart.
            self._prom = prometheus_client.Gauge(
                name, documentation, labels,
                multiprocess_mode="sum" if counter_as_gauge else "livesum")
        else:
            self._prom = prometheus_client.Counter(name.removesuffix("_total"), documentation,
                                                   labels)
        self._kind, self._name, self._doc, self._labels = kind, name, documentation, labels
        self._buckets = buckets
        self._ray: Any = None

    def _ray_metric(self) -> Any:
        if self._ray is None:
            import ray
            from ray.util import metrics as ray_metrics

            if not ray.is_initialized():
                return None
            if self._kind == "histogram":
                self._ray = ray_metrics.Histogram(self._name, self._doc,
                                                  boundaries=list(self._buckets),
                                                  tag_keys=self._labels)
            else:
                cls = ray_metrics.Counter if self._kind == "counter" else ray_metrics.Gauge
                self._ray = cls(self._name, self._doc, tag_keys=self._labels)
        return self._ray

    def record(self, value: float, labels: Mapping[str, str]) -> None:
        if self._kind == "counter" and value <= 0:
            return  # nothing to count (and ray.util.metrics refuses inc(0))
        child = self._prom.labels(**labels)
        if self._kind == "counter":
            child.inc(value)  # Counter.inc and Gauge.inc alike
        elif self._kind == "gauge":
            child.set(value)
        else:
            child.observe(value)
        ray_metric = self._ray_metric()
        if ray_metric is not None:
            tags = dict(labels)
            if self._kind == "counter":
                ray_metric.inc(value, tags=tags)
            elif self._kind == "gauge":
                ray_metric.set(value, tags=tags)
            else:
                ray_metric.observe(value, tags=tags)


TIME_TO_FIRST_TOKEN = _Metric(
    "histogram", "llm_time_to_first_token_seconds",
    "Arrival at the replica to the first generated token, streamed or not.",
    buckets=LATENCY_BUCKETS_S)
INTER_TOKEN_LATENCY = _Metric(
    "histogram", "llm_inter_token_latency_seconds",
    "Time between successive generated tokens of a request.", buckets=LATENCY_BUCKETS_S)
E2E_REQUEST_LATENCY = _Metric(
    "histogram", "llm_e2e_request_latency_seconds",
    "Arrival at the replica to the last token.", buckets=LATENCY_BUCKETS_S)
REQUEST_QUEUE_TIME = _Metric(
    "histogram", "llm_request_queue_time_seconds",
    "Arrival at the replica to the start of the step that prefilled the request.",
    buckets=LATENCY_BUCKETS_S)
BATCH_SIZE = _Metric("histogram", "llm_batch_size",
                     "Sequences decoded together in one engine step.", buckets=BATCH_BUCKETS)
PROMPT_TOKENS = _Metric("histogram", "llm_prompt_tokens", "Prompt tokens per request.",
                        buckets=TOKEN_BUCKETS)
GENERATION_TOKENS = _Metric("histogram", "llm_generation_tokens",
                            "Generated tokens per request.", buckets=TOKEN_BUCKETS)
PROMPT_TOKENS_TOTAL = _Metric("counter", "llm_prompt_tokens_total",
                              "Prompt tokens of finished requests.", counter_as_gauge=True)
PROMPT_CACHED_TOKENS_TOTAL = _Metric(
    "counter", "llm_prompt_cached_tokens_total",
    "Prompt tokens of finished requests whose KV the prompt cache supplied (not computed); "
    "over llm_prompt_tokens_total, the cache's hit rate.", counter_as_gauge=True)
GENERATION_TOKENS_TOTAL = _Metric("counter", "llm_generation_tokens_total",
                                  "Generated tokens, of every request that ended.",
                                  counter_as_gauge=True)
REQUESTS_TOTAL = _Metric("counter", "llm_requests_total",
                         "Requests by how they ended: " + ", ".join(REQUEST_STATUSES) + ".",
                         extra_labels=("status",))
NUM_REQUESTS_RUNNING = _Metric("gauge", "llm_num_requests_running",
                               "Sequences in the running batch.")
NUM_REQUESTS_WAITING = _Metric("gauge", "llm_num_requests_waiting",
                               "Requests waiting for a batch slot.")
REPLICA_LOADED = _Metric("gauge", "llm_replica_loaded",
                         "1 when the replica's model is loaded and serving.")


def labels_for(model: str, device: str, slot: str) -> dict[str, str]:
    return {"model": model, "device": device, "slot": slot}


def prepare_multiprocess_dir(directory: str | None = None) -> None:
    """Record this process's metrics into ``directory`` (default: ``PROMETHEUS_MULTIPROC_DIR``
    if set, else nothing to do), create it, and drop the live-gauge files of dead processes
    (a replica killed by -9 never cleans up after itself). Counters of dead processes stay:
    totals survive replica restarts.

    Each deployment calls this in its constructor, before its first sample, with the
    directory build_app handed it. Not a runtime_env: that rules out Ray's prestarted worker
    processes, and each replica would start in a new one (0.8 s instead of 0.15 s for a
    trivial actor, bench/RESULTS.md). prometheus-client chooses its value class when it is
    imported, so setting the variable later means choosing again (``get_value_class``).
    """
    if directory:
        os.environ[MULTIPROC_ENV] = directory
        values.ValueClass = values.get_value_class()
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    for path in Path(directory).glob("*.db"):
        match = re.search(r"_(\d+)\.db$", path.name)
        if match is None:
            continue
        pid = int(match.group(1))
        if not _pid_alive(pid):
            multiprocess.mark_process_dead(pid, directory)


def exposition() -> tuple[bytes, str]:
    """The node's metrics in Prometheus text format, aggregated over its processes."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = prometheus_client.REGISTRY
    return prometheus_client.generate_latest(registry), prometheus_client.CONTENT_TYPE_LATEST


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # somebody else's live process
    return True
