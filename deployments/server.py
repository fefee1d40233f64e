"""LLMServer: the Ray Serve replica that owns one engine on one device.

It turns a request (prompt text, chat messages or token ids, plus sampling parameters)
into engine tokens, hands it to the engine loop, and streams the answer back in coalesced
chunks: the first as soon as it exists, then paced (``max_stream_chunks_per_s``, shared by
every answer the replica streams) with everything produced since, and the last as soon as
the answer ends. Each chunk costs a Ray message to the router and one on to the HTTP
proxy, CPU that on a small host comes out of the model's cores (bench/RESULTS.md
measures it). Cancelling the call (a client
that hung up, a cancelled handle call) aborts the sequence and frees its batch slot.
Its handle messages are deployments.contract's: a GenerateRequest in, OutputChunks or an
ErrorChunk out (errors travel as data, as ErrorKinds: the router maps them to HTTP).

This module knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve

from deployments import constants, core_reservation, metrics, placement
from deployments.checkpoints import replica_checkpoint
from deployments.config import LLMConfig
from deployments.contract import (
    DetokenizeRequest,
    ErrorChunk,
    ErrorKind,
    GenerateRequest,
    OutputChunk,
    TokenizeRequest,
    TokenizeResult,
)
from deployments.engine.batching import load_engine
from deployments.engine.protocol import (
    EngineError,
    GenerationOutput,
    GenerationRequest,
    SamplingParams,
    StepResult,
)
from deployments.engine_loop import EngineFailure, EngineLoop
from deployments.request_trace import RequestTrace

logger = logging.getLogger("ray.serve")


@serve.deployment(name="LLMServer",
                  max_ongoing_requests=constants.LLM_SERVER_MAX_ONGOING_REQUESTS,
                  max_queued_requests=constants.MAX_QUEUED_REQUESTS,
                  health_check_period_s=constants.HEALTH_CHECK_PERIOD_S,
                  health_check_timeout_s=constants.HEALTH_CHECK_TIMEOUT_S,
                  graceful_shutdown_timeout_s=constants.GRACEFUL_SHUTDOWN_TIMEOUT_S)
class LLMServer:
    def __init__(self, config: LLMConfig, slot_placement: placement.Placement = "host",
                 metrics_dir: str | None = None):
        """Restrict to Ray's GPUs, claim and pin a slot first (before torch runs), then load
        the engine.
        ``metrics_dir``: where this node's processes share their metrics (build_app's)."""
        self._config = config
        started = time.monotonic()
        context = ray.get_runtime_context()
        node_id = context.get_node_id()
        if slot_placement == "xpu":  # first: the XPU runtime reads its mask when it starts
            placement.restrict_to_gpus(context.get_accelerator_ids().get("GPU", []))
        self._cores = core_reservation.node_reservation(config.reserved_cores)
        self._claim = placement.claim_slot(slot_placement, node_id=node_id,
                                           affinity=self._cores.node_cpus)
        self._labels = metrics.labels_for(config.model_name, self._claim.slot.kind,
                                          str(self._claim.slot.index))
        metrics.prepare_multiprocess_dir(metrics_dir)
        self._pinning = placement.pin_to_slot(self._claim.slot,
                                              reserved_cpus=self._cores.reserved_cpus,
                                              xmx_disabled=config.xmx_disabled)
        self._compute_threads: dict[int, int] = {}  # tid -> CPU, set after the warm-up
        self._slot = self._pinning.slot  # with the device's name, for an XPU
        # Resolved once (a later publish under the name reaches new replicas only), through
        # the node cache if set. Echo reads no checkpoint: it resolves one only for a cache.
        self._checkpoint = (
            replica_checkpoint(config.checkpoint_path, config.local_cache_dir)
            if config.engine != "echo" or config.local_cache_dir else None)
        checkpoint = str(self._checkpoint.folder) if self._checkpoint else config.checkpoint_path
        self._engine = load_engine(
            config.runner_class_path, checkpoint, device=self._slot.device,
            max_batch_size=config.max_batch_size,
            max_prefill_tokens_per_step=config.max_prefill_tokens_per_step,
            options=config.engine_options,
            hashes_verified=bool(self._checkpoint and self._checkpoint.hashes_verified))
        self._batch_sizes: collections.Counter[int] = collections.Counter()
        self._engine_thread_niceness: int | None = None  # set by the engine thread
        self._streaming = 0  # answers being streamed (their chunks share a budget)
        self._recorded_counts: tuple[int, int] | None = None  # gauges as last recorded
        self._loop = EngineLoop(
            self._engine, stall_timeout_s=constants.SCHEDULER_STALL_TIMEOUT_S,
            on_step=self._record_step,
            on_thread_start=self._prepare_engine_thread)
        self._loop.start(asyncio.get_event_loop())
        self._loop.wait_started(constants.ENGINE_START_TIMEOUT_S)  # warmed up before ready
        metrics.REPLICA_LOADED.record(1, self._labels)
        logger.info("LLMServer ready in %.1f s: model %s from %s on %s (node %s)",
                    time.monotonic() - started, config.model_name, checkpoint,
                    self._slot.describe(), node_id)

    # ---- handle API ----------------------------------------------------------------------

    async def generate_stream(self, request: GenerateRequest
                              ) -> AsyncIterator[OutputChunk | ErrorChunk]:
        """The answer to ``request`` in OutputChunks (coalesced, paced), or an ErrorChunk
        that ends it; cancelling the call aborts the sequence."""
        trace = RequestTrace(request.request_id, self._labels, self._slot.describe(),
                             request.describe_prompt() if self._config.log_prompts else None)
        try:
            engine_request = self._engine_request(request)
        except EngineError as error:
            trace.end("error", error.message)
            yield ErrorChunk(message=error.message, kind=error.kind, field=error.field)
            return
        deadline = time.monotonic() + request.timeout_s
        try:
            outputs = self._loop.submit(engine_request)
        except RuntimeError as error:  # the engine loop died; check_health gets us replaced
            trace.end("error", str(error))
            yield ErrorChunk(message=f"{error}; retry shortly", kind=ErrorKind.UNAVAILABLE)
            return
        status = "cancelled"
        not_before = 0.0  # the first chunk goes as soon as it exists
        self._streaming += 1
        try:
            while status == "cancelled":
                try:
                    # Not asyncio.wait_for: on Python 3.11 it drops a cancellation that
                    # lands as an output arrives, and the sequence would never be aborted.
                    async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                        batch = await outputs.take(not_before=min(not_before, deadline))
                except TimeoutError:
                    status = "timeout"
                    yield self._timeout_chunk(trace)
                    return
                for delivery in batch:
                    trace.on_delivery(delivery)
                chunk = _coalesce([d.item for d in batch])
                if isinstance(chunk, ErrorChunk):
                    status = "error"
                elif chunk.finish_reason is not None:
                    status = "finished"
                yield chunk
                not_before = time.monotonic() + self._stream_interval_s()
        finally:
            self._streaming -= 1
            if status in ("cancelled", "timeout"):
                self._loop.abort(engine_request.request_id)
            trace.end(status)

    def _stream_interval_s(self) -> float:
        """The pause between one answer's chunks: its share of the replica's chunk budget."""
        budget = self._config.max_stream_chunks_per_s
        if budget is None:
            return 0.0
        return min(self._streaming / budget, constants.MAX_STREAM_INTERVAL_S)

    def _prepare_engine_thread(self) -> None:
        """Runs first on the engine thread: onto the compute CPUs, its torch threads, its
        priority, then the engine's warm-up (the model's first forward pass must run on this
        thread: it starts the OpenMP pool, which inherits all three), then the pool one
        thread per core."""
        # An XPU replica pins no CPUs of its own: its engine thread (host side of every
        # step) leaves the node's reserved cores for the rest, as a CPU slot's does.
        engine_cpus = self._pinning.cpus or self._cores.compute_cpus(self._cores.node_cpus)
        core_reservation.enter_compute_cpus(engine_cpus, self._cores.reserved_cpus)
        placement.apply_torch_threads(self._pinning)
        niceness = self._config.engine_thread_niceness
        self._engine_thread_niceness = (
            os.getpriority(os.PRIO_PROCESS, 0) if niceness is None
            else placement.raise_engine_thread_priority(niceness))
        self._engine.warm_up()
        if self._pinning.reserved_cpus:
            self._compute_threads = core_reservation.pin_compute_pool(
                self._pinning.cpus, threading.get_native_id())

    async def health(self) -> dict[str, Any]:
        """What /health reports for this replica; raises when the engine loop is not alive."""
        self._loop.check_alive()
        return {"model": self._config.model_name, "engine": self._config.engine,
                "slot": self._slot.to_dict(),
                "engine_thread_niceness": self._engine_thread_niceness,
                "cores": {**self._cores.to_dict(),
                          "compute_cpus": placement.format_cpulist(self._pinning.cpus),
                          "compute_threads": {str(tid): cpu for tid, cpu
                                              in self._compute_threads.items()}},
                "pinning": self._pinning.to_dict(), "pid": os.getpid(),
                "checkpoint": self._checkpoint.describe() if self._checkpoint else None,
                "running": getattr(self._engine, "num_running", None),
                "waiting": getattr(self._engine, "num_waiting", None),
                "kv_cache_positions": getattr(self._engine, "max_kv_tokens", None),
                "prompt_cache": self._engine_report("prompt_cache_usage"),
                "heap_trim": self._engine_report("heap_trim_stats"),
                "short_first": getattr(self._engine, "short_first", None)}

    def _engine_report(self, method: str) -> dict[str, Any] | None:
        """An optional report of the engine (``method`` of BatchingEngine), as a dict; None
        when the engine has no such report or its runner keeps none."""
        report = getattr(self._engine, method, lambda: None)()
        return report.to_dict() if report is not None else None

    async def stats(self) -> dict[str, Any]:
        """Counters tests and operators read directly: batch sizes the engine reported, the
        tokens its decode steps produced (engine progress), its running and waiting
        sequences."""
        return {"batch_sizes": dict(self._batch_sizes),
                "max_batch_size_seen": max(self._batch_sizes, default=0),
                "decoded_tokens": sum(size * n for size, n in self._batch_sizes.items()),
                "running": getattr(self._engine, "num_running", None),
                "waiting": getattr(self._engine, "num_waiting", None)}

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResult | ErrorChunk:
        """The request's token ids as this model sees a prompt (special tokens included);
        a chat through the model's chat template, or an ErrorChunk if it has none."""
        try:
            text = request.prompt if request.messages is None else \
                self._engine.apply_chat_template([turn.openai() for turn in request.messages])
        except EngineError as error:
            return ErrorChunk(message=error.message, kind=error.kind, field=error.field)
        token_ids = self._engine.encode(text)
        return TokenizeResult(tokens=token_ids, count=len(token_ids),
                              max_model_len=self._engine.max_context_tokens)

    async def detokenize(self, request: DetokenizeRequest) -> str | ErrorChunk:
        """The text of the request's token ids, or an ErrorChunk naming an id outside the
        vocabulary."""
        vocab = self._engine.vocab_size
        if any(not 0 <= token < vocab for token in request.tokens):
            return ErrorChunk(message=f"token ids must lie in [0, {vocab}) for this model",
                              kind=ErrorKind.INVALID_REQUEST, field="tokens")
        return self._engine.decode(request.tokens)

    async def check_health(self) -> None:
        """Ray's liveness probe: the engine loop is alive and stepping while it has work."""
        self._loop.check_alive()

    def __del__(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None:
            loop.stop()
        labels = getattr(self, "_labels", None)
        if labels is not None:
            metrics.REPLICA_LOADED.record(0, labels)
        claim = getattr(self, "_claim", None)
        if claim is not None:
            claim.release()

    # ---- internals -----------------------------------------------------------------------

    def _engine_request(self, request: GenerateRequest) -> GenerationRequest:
        """The engine's request: the prompt as token ids, checked against the vocabulary and
        the context, and the answer's length (asked for, or what fits up to the default)."""
        engine = self._engine
        if request.messages is not None:
            turns = [turn.openai() for turn in request.messages]
            tools = [tool.openai() for tool in request.tools]
            token_ids = engine.encode(engine.apply_chat_template(turns, tools))
        elif request.prompt_token_ids is not None:
            token_ids = list(request.prompt_token_ids)
            if any(not 0 <= t < engine.vocab_size for t in token_ids):
                raise EngineError(f"token ids must lie in [0, {engine.vocab_size}) for this "
                                  "model", field="prompt")
        else:
            token_ids = engine.encode(request.prompt or "")
        context = engine.max_context_tokens
        if not token_ids:
            raise EngineError("the prompt is empty", field="prompt")
        max_tokens = request.max_tokens or max(
            min(self._config.default_max_tokens, context - len(token_ids)), 1)
        if len(token_ids) + max_tokens > context:
            raise EngineError(
                f"this model's context is {context} tokens; the prompt has {len(token_ids)} "
                f"and max_tokens asks for {max_tokens}: shorten the prompt or lower "
                "max_tokens", field="max_tokens" if len(token_ids) < context else "prompt")
        params = SamplingParams(max_tokens=max_tokens, **request.sampling.model_dump())
        return GenerationRequest(request.request_id, tuple(token_ids), params)

    @staticmethod
    def _timeout_chunk(trace: RequestTrace) -> OutputChunk | ErrorChunk:
        if trace.generated_tokens:
            return OutputChunk(text="", finish_reason="length",
                               prompt_tokens=trace.prompt_tokens,
                               cached_tokens=trace.cached_prompt_tokens,
                               completion_tokens=trace.generated_tokens, timed_out=True)
        return ErrorChunk(message="the request's deadline passed before the model answered; "
                          "retry later or raise `timeout`", kind=ErrorKind.TIMEOUT)

    def _record_step(self, result: StepResult, seconds: float) -> None:
        if result.batch_size:
            self._batch_sizes[result.batch_size] += 1
            metrics.BATCH_SIZE.record(result.batch_size, self._labels)
        # Gauges only when they change: this runs on the engine thread between two model
        # steps, where every microsecond is serial time (a Ray metric record is not free).
        counts = (getattr(self._engine, "num_running", 0), getattr(self._engine, "num_waiting", 0))
        if counts != self._recorded_counts:
            self._recorded_counts = counts
            metrics.NUM_REQUESTS_RUNNING.record(counts[0], self._labels)
            metrics.NUM_REQUESTS_WAITING.record(counts[1], self._labels)


def _coalesce(items: list[GenerationOutput | EngineFailure]) -> OutputChunk | ErrorChunk:
    """One chunk out of everything a request produced since its last chunk."""
    for item in items:
        if isinstance(item, EngineFailure):
            return ErrorChunk(message=item.message, kind=item.kind, field=item.field)
    last = items[-1]
    assert isinstance(last, GenerationOutput)
    outputs = [i for i in items if isinstance(i, GenerationOutput)]
    return OutputChunk(text="".join(o.text for o in outputs),
                       finish_reason=last.finish_reason, prompt_tokens=last.num_prompt_tokens,
                       cached_tokens=last.num_cached_prompt_tokens,
                       completion_tokens=last.num_generated_tokens,
                       logprobs=tuple(lp for o in outputs for lp in o.logprobs))
