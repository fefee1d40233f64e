"""Closed-loop load: N clients, each sending its next request when the previous one ends.

Requests stream, so time to first token and the gaps between chunks are measured on the
client's side. Two transports speak the same OpenAI completion chunks: HTTP (our router
through Ray Serve's proxy, or llama.cpp's server) and a Ray Serve app handle (the router's
``completions_stream`` method, as the LangChain adapter calls it).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp

from bench.stats import RequestRecord

Issue = Callable[[int], Awaitable[RequestRecord]]  # argument: max_tokens
REQUEST_TIMEOUT_S = 900.0
_SEND_ATTEMPTS = 8


def completion_body(model: str, prompt: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    """A streamed greedy completion that runs to exactly ``max_tokens``."""
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            **extra}


async def _consume(chunks: AsyncIterator[dict[str, Any]], record: RequestRecord,
                   max_tokens: int) -> RequestRecord:
    finish = None
    async for chunk in chunks:
        now = time.perf_counter()
        if "error" in chunk:
            record.error = str(chunk["error"])[:200]
            break
        for choice in chunk.get("choices") or ():
            if choice.get("text"):
                record.chunk_times.append(now)
            finish = choice.get("finish_reason") or finish
        usage = chunk.get("usage")
        if usage:
            record.completion_tokens = int(usage["completion_tokens"])
            record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            record.cached_prompt_tokens = int(
                (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    record.finished = time.perf_counter()
    if not record.completion_tokens and finish == "length":
        record.completion_tokens = max_tokens
    if record.error is None and record.completion_tokens != max_tokens:
        record.error = f"{record.completion_tokens} tokens instead of {max_tokens}"
    return record


class HttpTarget:
    """An OpenAI-compatible server's /v1/completions over HTTP (loopback)."""

    def __init__(self, base_url: str, model: str, prompt: str, **extra: Any):
        self._url = f"{base_url}/v1/completions"
        self._model, self._prompt, self._extra = model, prompt, extra
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HttpTarget:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._session is not None
        await self._session.close()

    async def issue(self, max_tokens: int) -> RequestRecord:
        assert self._session is not None
        body = completion_body(self._model, self._prompt, max_tokens, **self._extra)
        for attempt in range(1, _SEND_ATTEMPTS + 1):
            record = RequestRecord(started=time.perf_counter())
            try:
                async with self._session.post(self._url, json=body) as response:
                    if response.status != 200:
                        record.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                        record.finished = time.perf_counter()
                        return record
                    return await _consume(_sse_chunks(response), record, max_tokens)
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as error:
                # A kept-alive connection the server had closed: nothing was sent, so
                # retry (the record restarts its clock). llama-server closes idle ones in
                # bulk, so the pool can hand out several stale connections in a row.
                if attempt == _SEND_ATTEMPTS or record.chunk_times:
                    return _failed(record, error)
            except (aiohttp.ClientError, TimeoutError) as error:
                return _failed(record, error)
        raise AssertionError("unreachable")


def _failed(record: RequestRecord, error: BaseException) -> RequestRecord:
    record.error = f"{type(error).__name__}: {error}"
    record.finished = time.perf_counter()
    return record


async def _sse_chunks(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)


class HandleTarget:
    """The router's ``completions_stream`` through a Ray Serve app handle (no HTTP)."""

    def __init__(self, app_name: str, model: str, prompt: str):
        from ray import serve

        self._handle = serve.get_app_handle(app_name).options(stream=True)
        self._model, self._prompt = model, prompt

    async def __aenter__(self) -> HandleTarget:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def issue(self, max_tokens: int) -> RequestRecord:
        body = completion_body(self._model, self._prompt, max_tokens)
        record = RequestRecord(started=time.perf_counter())
        try:
            stream = self._handle.completions_stream.remote(body)
            return await _consume(_aiter(stream), record, max_tokens)
        except Exception as error:  # a ServiceError or Ray error ends this request only
            record.error = f"{type(error).__name__}: {error}"[:300]
            record.finished = time.perf_counter()
            return record


async def _aiter(stream: Any) -> AsyncIterator[dict[str, Any]]:
    async for chunk in stream:
        yield chunk


async def closed_loop(issue: Issue, *, clients: int, rounds: int, max_tokens: int,
                      timeout_s: float) -> list[RequestRecord]:
    """``clients`` concurrent clients, ``rounds`` requests each, back to back. Requests still
    running at ``timeout_s`` are cancelled and reported as errors."""
    records: list[RequestRecord] = []

    async def client() -> None:
        for _ in range(rounds):
            records.append(await issue(max_tokens))

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if pending:
        now = time.perf_counter()
        records.extend(RequestRecord(started=now, error="benchmark timeout")
                       for _ in pending)
    return records


async def mixed(issue: Issue, *, long_clients: int, long_tokens: int, short_clients: int,
                short_tokens: int, short_rounds: int, timeout_s: float
                ) -> tuple[list[RequestRecord], list[RequestRecord]]:
    """Short requests while long ones keep the batch busy: the long clients loop until every
    short client has done ``short_rounds`` requests; the long requests then running are let
    finish (what running next to the short ones cost them shows in their latency), those
    still running at ``timeout_s`` are dropped (aborting them on the server)."""
    short: list[RequestRecord] = []
    long: list[RequestRecord] = []
    short_done = asyncio.Event()
    deadline = time.perf_counter() + timeout_s

    async def long_client() -> None:
        while not short_done.is_set():
            long.append(await issue(long_tokens))

    async def short_client() -> None:
        await asyncio.sleep(0.5)  # let the long requests fill the batch first
        for _ in range(short_rounds):
            short.append(await issue(short_tokens))

    long_tasks = [asyncio.create_task(long_client()) for _ in range(long_clients)]
    short_tasks = [asyncio.create_task(short_client()) for _ in range(short_clients)]
    _, pending = await asyncio.wait(short_tasks, timeout=timeout_s)
    short_done.set()
    _, long_pending = await asyncio.wait(long_tasks,
                                         timeout=max(deadline - time.perf_counter(), 0))
    for task in [*pending, *long_pending]:
        task.cancel()
    await asyncio.gather(*pending, *long_pending, return_exceptions=True)
    return short, long
