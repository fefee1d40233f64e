"""EngineLoop: runs an engine's steps on a thread of its own and routes outputs back.

The replica's asyncio event loop must stay free to accept, batch and cancel requests while
the model computes (docs/architecture.md, "Threading"), so one thread owns the engine: it takes new
requests and aborts from an inbox between steps (continuous batching) and hands each
step's outputs to the event loop in one call, where they land in per-request queues.

Liveness for ``check_health``: the thread is alive, and when it has work it finishes a
step at least every ``stall_timeout_s``. Nothing here runs a generation just to check.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from deployments.constants import ENGINE_IDLE_POLL_S
from deployments.contract import ErrorKind
from deployments.engine.protocol import (
    EngineError,
    GenerationOutput,
    GenerationRequest,
    LLMEngine,
    StepResult,
)

logger = logging.getLogger(__name__)



@dataclass
class Delivery:
    """An output (or failure) with the engine step that made it, in time.monotonic()."""

    item: GenerationOutput | EngineFailure
    step_started: float
    step_finished: float


@dataclass
class EngineFailure:
    """Delivered instead of an output when the engine refused or failed a request."""

    request_id: str
    message: str
    kind: ErrorKind
    field: str | None = None


class OutputStream:
    """One request's deliveries, as its replica coroutine reads them.

    ``take`` paces the reader: tokens that arrive before ``not_before`` wait and go out
    together, but the request's last delivery (finished, or a failure) is taken at once,
    so pacing never delays an answer's end. Waking only for the last delivery or the
    interval's end keeps a streaming request from costing the replica a wake-up (and the
    Ray hops behind it a message) per decode step.

    Waits are one future woken by ``put`` or a timer, not an ``asyncio.timeout`` of its own:
    the caller's deadline (its ``asyncio.timeout`` around ``take``) is then the only
    cancellation in play, and a cancelled take leaves the deliveries for the next one.
    """

    def __init__(self) -> None:
        self._items: collections.deque[Delivery] = collections.deque()
        self._ended = False  # the last delivery is in
        self._pacing = False  # a take is waiting out its interval
        self._wake: asyncio.Future[None] | None = None

    def put(self, delivery: Delivery, last: bool) -> None:
        self._items.append(delivery)
        self._ended = self._ended or last
        if last or not self._pacing:
            self._wake_up()

    async def take(self, not_before: float = 0.0) -> list[Delivery]:
        """Everything delivered and not yet taken (waiting for at least one), no earlier
        than ``not_before`` (time.monotonic()) unless the last delivery is in."""
        wait_s = not_before - time.monotonic()
        if wait_s > 0 and not self._ended:
            self._pacing = True
            try:
                await self._sleep(wait_s)
            finally:
                self._pacing = False
        while not self._items:
            await self._sleep(None)
        items = list(self._items)
        self._items.clear()
        return items

    async def _sleep(self, timeout_s: float | None) -> None:
        loop = asyncio.get_running_loop()
        self._wake = loop.create_future()
        timer = loop.call_later(timeout_s, self._wake_up) if timeout_s is not None else None
        try:
            await self._wake
        finally:
            if timer is not None:
                timer.cancel()
            self._wake = None

    def _wake_up(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)


class EngineLoop:
    def __init__(self, engine: LLMEngine, *, stall_timeout_s: float,
                 on_step: Callable[[StepResult, float], None] | None = None,
                 on_thread_start: Callable[[], None] | None = None):
        self._engine = engine
        self._stall_timeout_s = stall_timeout_s
        self._on_step = on_step
        self._on_thread_start = on_thread_start
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._streams: dict[str, OutputStream] = {}
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._fatal: BaseException | None = None
        self._busy_since: float | None = None
        self._started = threading.Event()  # on_thread_start has returned (or raised)
        self._thread = threading.Thread(target=self._run, name="llm-engine-loop", daemon=True)

    def start(self, event_loop: asyncio.AbstractEventLoop) -> None:
        self._event_loop = event_loop
        self._thread.start()

    def wait_started(self, timeout_s: float) -> None:
        """Block until the thread's ``on_thread_start`` (the engine's warm-up among it) is
        done; raise RuntimeError if it failed or took longer than ``timeout_s``."""
        if not self._started.wait(timeout_s):
            raise RuntimeError(f"the engine thread did not start within {timeout_s:.0f} s")
        if self._fatal is not None:
            raise RuntimeError(f"the engine thread failed to start: {self._fatal!r}")

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)

    # ---- event-loop side -----------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> OutputStream:
        """Queue ``request``; its outputs arrive on the returned stream, the last one
        finished (or a failure)."""
        if self._fatal is not None:
            raise RuntimeError(f"the engine loop has failed: {self._fatal!r}")
        outputs = OutputStream()
        self._streams[request.request_id] = outputs
        self._inbox.put(("add", request))
        return outputs

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self._inbox.put(("abort", request_id))

    def check_alive(self) -> None:
        """Raise when the loop died or is stuck in a step while work waits."""
        if self._fatal is not None or not self._thread.is_alive():
            raise RuntimeError(f"the engine loop is not running: {self._fatal!r}")
        busy_since = self._busy_since
        if busy_since is not None and time.monotonic() - busy_since > self._stall_timeout_s:
            raise RuntimeError(
                f"the engine loop made no step for {time.monotonic() - busy_since:.0f} s")

    def _deliver(self, items: list[GenerationOutput | EngineFailure], started: float,
                 finished: float) -> None:
        for item in items:
            stream = self._streams.get(item.request_id)
            if stream is None:
                continue  # aborted meanwhile
            last = isinstance(item, EngineFailure) or item.finished
            stream.put(Delivery(item, started, finished), last)
            if last:
                del self._streams[item.request_id]

    # ---- engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self._on_thread_start is not None:
                self._on_thread_start()
            self._started.set()
            while not self._stopping.is_set():
                failures = self._drain_inbox(block=not self._engine.has_unfinished_requests())
                if failures:
                    now = time.monotonic()
                    self._send(failures, now, now)
                if not self._engine.has_unfinished_requests():
                    self._busy_since = None
                    continue
                started = time.monotonic()
                self._busy_since = self._busy_since or started
                result = self._engine.step(
                    early=lambda outputs, t0=started: self._send(outputs, t0, time.monotonic()))
                self._busy_since = time.monotonic()
                if result.outputs:
                    self._send(list(result.outputs), started, self._busy_since)
                if self._on_step is not None:
                    self._on_step(result, self._busy_since - started)
        except BaseException as error:  # the replica must report it, not hang requests
            logger.exception("engine loop failed")
            self._fatal = error
            self._started.set()  # after _fatal: a waiting constructor must see the failure
            self._fail_everyone(error)

    def _drain_inbox(self, *, block: bool) -> list[GenerationOutput | EngineFailure]:
        failures: list[GenerationOutput | EngineFailure] = []
        try:
            command, value = self._inbox.get(timeout=ENGINE_IDLE_POLL_S) if block else \
                self._inbox.get_nowait()
        except queue.Empty:
            return failures
        while True:
            if command == "add":
                assert isinstance(value, GenerationRequest)
                try:
                    self._engine.add_request(value)
                except EngineError as error:
                    failures.append(EngineFailure(value.request_id, error.message,
                                                  error.kind, error.field))
            else:
                self._engine.abort(str(value))
            try:
                command, value = self._inbox.get_nowait()
            except queue.Empty:
                return failures

    def _send(self, items: list[GenerationOutput | EngineFailure], started: float,
              finished: float) -> None:
        assert self._event_loop is not None
        self._event_loop.call_soon_threadsafe(self._deliver, items, started, finished)

    def _fail_everyone(self, error: BaseException) -> None:
        if self._event_loop is None or self._event_loop.is_closed():
            return
        message = f"the model replica failed: {type(error).__name__}: {error}"
        now = time.monotonic()
        self._send([EngineFailure(rid, message, ErrorKind.UNAVAILABLE)
                    for rid in list(self._streams)], now, now)
