"""OutputStream pacing: what a streaming request's coroutine takes, and when."""

from __future__ import annotations

import asyncio
import contextlib
import time

from deployments.engine.protocol import GenerationOutput
from deployments.engine_loop import Delivery, OutputStream


def _delivery(text: str, finished: bool = False) -> Delivery:
    output = GenerationOutput(request_id="r", text=text, num_prompt_tokens=3,
                              num_generated_tokens=1,
                              finish_reason="stop" if finished else None)
    now = time.monotonic()
    return Delivery(output, now, now)


def _texts(batch: list[Delivery]) -> str:
    return "".join(d.item.text for d in batch)


def test_take_waits_for_the_interval_and_returns_everything_delivered_meanwhile() -> None:
    async def scenario() -> tuple[str, float, str]:
        stream = OutputStream()
        stream.put(_delivery("a"), last=False)
        first = _texts(await stream.take())  # nothing to wait for: at once
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        for i, text in enumerate("bcd"):
            loop.call_later(0.02 * (i + 1), stream.put, _delivery(text), False)
        batch = await stream.take(not_before=started + 0.3)
        return first, time.monotonic() - started, _texts(batch)

    first, waited, batched = asyncio.run(scenario())
    assert first == "a"
    assert waited >= 0.29
    assert batched == "bcd"


def test_the_last_delivery_is_taken_at_once_not_at_the_interval() -> None:
    async def scenario() -> tuple[float, str]:
        stream = OutputStream()
        loop = asyncio.get_running_loop()
        loop.call_later(0.02, stream.put, _delivery("x"), False)
        loop.call_later(0.04, stream.put, _delivery("y", finished=True), True)
        started = time.monotonic()
        batch = await stream.take(not_before=started + 5.0)
        return time.monotonic() - started, _texts(batch)

    waited, batched = asyncio.run(scenario())
    assert batched == "xy"
    assert waited < 2.0


def test_after_the_interval_take_waits_for_the_next_delivery() -> None:
    async def scenario() -> tuple[float, str]:
        stream = OutputStream()
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, stream.put, _delivery("late"), False)
        started = time.monotonic()
        batch = await stream.take(not_before=started + 0.05)
        return time.monotonic() - started, _texts(batch)

    waited, batched = asyncio.run(scenario())
    assert batched == "late"
    assert waited >= 0.19


def test_a_cancelled_take_leaves_the_deliveries_for_the_next() -> None:
    async def scenario() -> str:
        stream = OutputStream()
        stream.put(_delivery("kept"), last=False)
        waiter = asyncio.ensure_future(stream.take(not_before=time.monotonic() + 5.0))
        await asyncio.sleep(0.05)
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        return _texts(await stream.take())

    assert asyncio.run(scenario()) == "kept"


def test_the_callers_deadline_ends_a_paced_take_even_when_both_expire_together() -> None:
    """The replica holds the request's deadline (asyncio.timeout) around take; a pacing
    interval that ends at that same instant must not swallow it (nothing more arrives)."""
    async def scenario() -> str:
        stream = OutputStream()
        stream.put(_delivery("a"), last=False)
        await stream.take()
        for _ in range(20):
            deadline = asyncio.get_running_loop().time() + 0.01
            try:
                async with asyncio.timeout_at(deadline):
                    await stream.take(not_before=deadline)
            except TimeoutError:
                continue
            return "took nothing yet returned"
        return "deadline every time"

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) == "deadline every time"
