"""The router's stream plumbing, with chunk streams made here (no Ray): a multi-prompt stream
starts only once every prompt has its first chunk, so a refused prompt is a 4xx."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from deployments.contract import ErrorChunk, ErrorKind
from deployments.errors import ServiceError
from deployments.ingress import _primed, _service_error


class Stream:
    """A replica's chunk stream: ``chunks`` after ``delay_s``, or ``error`` instead."""

    def __init__(self, chunks: list[str], delay_s: float = 0.0,
                 error: ServiceError | None = None) -> None:
        self.chunks, self.delay_s, self.error = chunks, delay_s, error
        self.closed = False

    async def run(self) -> AsyncIterator[dict[str, Any]]:
        try:
            await asyncio.sleep(self.delay_s)
            if self.error is not None:
                raise self.error
            for text in self.chunks:
                yield {"text": text}
        finally:
            self.closed = True


async def test_a_late_refusal_fails_before_any_chunk_is_handed_on() -> None:
    fast = Stream(["A", "B"])  # its first chunk exists long before the other's refusal
    refused = Stream([], delay_s=0.05, error=ServiceError("token ids must lie in [0, 9)",
                                                          param="prompt"))
    with pytest.raises(ServiceError, match="token ids"):
        await _primed([fast.run(), refused.run()])
    assert fast.closed  # its generation is cancelled, not left running


async def test_primed_streams_keep_every_chunk_in_order() -> None:
    streams = await _primed([Stream(["a", "b"]).run(), Stream(["c"], delay_s=0.02).run()])
    assert [[chunk["text"] async for chunk in stream] for stream in streams] == [
        ["a", "b"], ["c"]]
    (single,) = await _primed([Stream(["x"]).run()])
    assert [chunk["text"] async for chunk in single] == ["x"]


@pytest.mark.parametrize(("kind", "status", "retry_after_s"), [
    (ErrorKind.INVALID_REQUEST, 400, None), (ErrorKind.MISCONFIGURED, 500, None),
    (ErrorKind.UNAVAILABLE, 503, 1), (ErrorKind.TIMEOUT, 504, None)])
def test_the_router_maps_each_error_kind_to_its_status(kind: ErrorKind, status: int,
                                                       retry_after_s: int | None) -> None:
    error = _service_error(ErrorChunk(message="m", kind=kind, field="prompt"))
    assert (error.status_code, error.param, error.retry_after_s) == (status, "prompt",
                                                                     retry_after_s)
