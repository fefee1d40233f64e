"""EngineLoop's start: the replica waits for the engine thread's preparation (the engine's
warm-up among it) before it reports ready, and a failed preparation fails the replica."""

from __future__ import annotations

import asyncio
import threading

import pytest

from deployments.engine.batching import BatchingEngine
from deployments.engine.echo import EchoRunner
from deployments.engine_loop import EngineLoop


def echo_engine() -> BatchingEngine:
    return BatchingEngine(EchoRunner(max_batch_size=2, max_prefill_tokens_per_step=64))


def test_wait_started_returns_once_the_thread_prepared_itself_on_that_thread() -> None:
    prepared_on: list[str] = []
    release = threading.Event()

    def prepare() -> None:
        release.wait(5)
        prepared_on.append(threading.current_thread().name)

    event_loop = asyncio.new_event_loop()
    loop = EngineLoop(echo_engine(), stall_timeout_s=10, on_thread_start=prepare)
    loop.start(event_loop)
    try:
        with pytest.raises(RuntimeError, match="did not start within"):
            loop.wait_started(0.2)  # still preparing
        release.set()
        loop.wait_started(5)
        assert prepared_on == ["llm-engine-loop"]
        loop.check_alive()
    finally:
        loop.stop()
        event_loop.close()


def test_a_failed_preparation_fails_the_start() -> None:
    def prepare() -> None:
        raise RuntimeError("kernels failed to compile")

    event_loop = asyncio.new_event_loop()
    loop = EngineLoop(echo_engine(), stall_timeout_s=10, on_thread_start=prepare)
    loop.start(event_loop)
    try:
        with pytest.raises(RuntimeError, match=r"failed to start.*kernels failed to compile"):
            loop.wait_started(5)
    finally:
        loop.stop()
        event_loop.close()
