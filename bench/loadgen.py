"""Load generator for any OpenAI-compatible server (ours, llama-server, any other).

    python -m bench.loadgen --url http://127.0.0.1:8000 --clients 1,8,16 \\
        [--model NAME] [--prompt-tokens N] [--max-tokens N] [--mixed] [--out run.json]
    python -m bench.loadgen --interleave http://A,http://B --clients 8,16 [--turns 3]

Closed loop: each client sends its next request when the previous one ends, streaming
``/v1/completions`` (greedy, ``ignore_eos``, ``max_tokens``), so every answer has the same
length; a server that ignores ``ignore_eos`` is measured on the tokens its usage reports
(``short_answers`` counts those answers). All requests send one prompt, which a prompt
cache reuses. Each level runs a warm-up round, then ceil(min_requests / clients) rounds; a
level disturbed by other load (bench.machine) is measured once more, the quieter kept.
``--mixed`` adds short requests alone and next to long ones. ``--interleave A,B`` measures
two servers in alternating turns (A B, B A, A B, ...): the machine's speed drifts by more
than the gaps compared, and steady drift cancels in pairs; the result is each turn's A/B
ratio of tokens/s per level, and their median.

Output: ``Run`` or ``Interleaved`` below, as JSON (times in seconds, None where nothing was
measured); their field descriptions document the schema.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import BaseModel, Field

from bench.machine import emit_result, machine_info, measure_quietly_async
from bench.stats import RequestRecord, median, ratio, summarize

PROMPT = ("You are a helpful assistant. Write a long, detailed story about a small robot who "
          "lives in a lighthouse and learns to paint the sea at night.")
Issue = Callable[[int], Awaitable[RequestRecord]]  # argument: max_tokens
REQUEST_TIMEOUT_S = 900.0
_SEND_ATTEMPTS = 8


class Level(BaseModel):
    """One client count, measured."""

    clients: int = Field(description="concurrent closed-loop clients")
    max_tokens: int = Field(description="max_tokens of every request")
    requests: int = Field(description="requests that streamed to their end")
    errors: int = Field(description="requests that failed: HTTP error, broken stream, timeout")
    first_error: str | None = Field(None, description="the first failure's message")
    short_answers: int = Field(description="successful answers shorter than max_tokens "
                                           "(the server ignored ignore_eos)")
    completion_tokens: int = Field(description="tokens of the successful answers (usage)")
    duration_s: float | None = Field(description="first request sent to last answer ended")
    tokens_per_s: float | None = Field(description="completion_tokens / duration_s")
    ttft_p50_s: float | None = Field(description="time to the first text chunk, median")
    ttft_p99_s: float | None = Field(description="time to the first text chunk, 99th pct")
    tpot_p50_s: float | None = Field(
        description="per answer (last chunk - first chunk) / (tokens - 1), median")
    itl_p99_s: float | None = Field(description="gap between text chunks, 99th percentile "
                                                "(a chunk may carry several tokens)")
    e2e_p50_s: float | None = Field(description="request sent to answer ended, median")
    e2e_p99_s: float | None = Field(description="request sent to answer ended, 99th pct")
    prompt_tokens: int | None = Field(description="prompt tokens per request (usage)")
    prompt_cached_share: float | None = Field(
        description="of the prompt tokens, those the server's prompt cache held "
                    "(usage.prompt_tokens_details.cached_tokens; None if not reported)")
    foreign_cores: float | None = Field(
        None, description="CPU cores other processes used meanwhile (Mixed: see there)")
    attempts: int = Field(1, description="measurements made (2: the first was disturbed)")


class Mixed(BaseModel):
    """Short requests alone, then while long ones keep the batch busy; the long requests
    alone, and those running when the first short one came (run to their end)."""

    short_alone: Level
    short_mixed: Level
    long_alone: Level
    long_mixed: Level
    short_p50_ratio: float | None = Field(description="short e2e p50, mixed / alone")
    long_p50_ratio: float | None = Field(description="long e2e p50, mixed / alone")
    foreign_cores: float
    attempts: int


class Run(BaseModel):
    """``python -m bench.loadgen --url``: one server at several client counts."""

    url: str
    model: str
    date: str = Field(description="UTC, when the run started")
    commit: str = Field(description="git commit of the benchmark (+dirty)")
    machine: dict[str, Any] = Field(description="bench.machine.machine_info()")
    prompt: str
    levels: list[Level]
    mixed: Mixed | None = None


class Side(BaseModel):
    """One target's measurement within a turn."""

    tokens_per_s: dict[str, float | None] = Field(description="by key (the client count)")
    foreign_cores: float | None = None


class Turn(BaseModel):
    order: list[str] = Field(description="the targets in the order they ran")
    sides: dict[str, Side]


class Ratio(BaseModel):
    a_key: str = Field(description="A's key (client count) compared")
    b_key: str = Field(description="B's key compared")
    per_turn: list[float | None] = Field(description="A's tokens/s over B's, each turn")
    median: float | None


class Interleaved(BaseModel):
    """Two targets in alternating turns (A first in odd turns, B first in even ones)."""

    a: str
    b: str
    date: str
    commit: str
    turns: list[Turn]
    ratios: list[Ratio]


# ---- requests ---------------------------------------------------------------------------


def prompt_of(tokens: int | None) -> str:
    """PROMPT (about 30 tokens), or its words repeated to about ``tokens`` tokens (a common
    English word is about one token; Level.prompt_tokens has the server's count)."""
    if not tokens:
        return PROMPT
    words = PROMPT.split()
    return " ".join(words[i % len(words)] for i in range(tokens))


def completion_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


async def consume(chunks: AsyncIterator[dict[str, Any]], record: RequestRecord,
                  max_tokens: int) -> RequestRecord:
    """Fill ``record`` from OpenAI completion chunks. Without usage, an answer that ended
    on ``length`` has max_tokens tokens, any other one a token per text chunk."""
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
        if usage := chunk.get("usage"):
            record.completion_tokens = int(usage.get("completion_tokens") or 0)
            record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            record.cached_prompt_tokens = int(
                (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    record.finished = time.perf_counter()
    if not record.completion_tokens:
        record.completion_tokens = max_tokens if finish == "length" else len(record.chunk_times)
    return record


class HttpTarget:
    """A server's streamed /v1/completions; ``issue(max_tokens)`` sends one request."""

    def __init__(self, base_url: str, model: str, prompt: str):
        self._url = f"{base_url.rstrip('/')}/v1/completions"
        self._model, self._prompt = model, prompt
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
        body = completion_body(self._model, self._prompt, max_tokens)
        for attempt in range(1, _SEND_ATTEMPTS + 1):
            record = RequestRecord(started=time.perf_counter())
            try:
                async with self._session.post(self._url, json=body) as response:
                    if response.status != 200:
                        record.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                        record.finished = time.perf_counter()
                        return record
                    return await consume(_sse_chunks(response), record, max_tokens)
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as error:
                # A kept-alive connection the server had closed: nothing was sent, so retry
                # with a fresh clock (llama-server closes idle ones in bulk).
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
        if line.startswith(b"data:"):
            if (data := line[5:].strip()) == b"[DONE]":
                return
            yield json.loads(data)


# ---- load shapes ------------------------------------------------------------------------


async def closed_loop(issue: Issue, *, clients: int, rounds: int, max_tokens: int,
                      timeout_s: float) -> list[RequestRecord]:
    """``clients`` concurrent clients, ``rounds`` requests each, back to back; requests
    still running at ``timeout_s`` are cancelled and count as errors."""
    records: list[RequestRecord] = []

    async def client() -> None:
        for _ in range(rounds):
            records.append(await issue(max_tokens))

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    records += [RequestRecord(started=time.perf_counter(), error="benchmark timeout")
                for _ in pending]
    return records


async def mixed(issue: Issue, *, long_clients: int, long_tokens: int, short_clients: int,
                short_tokens: int, short_rounds: int, timeout_s: float
                ) -> tuple[list[RequestRecord], list[RequestRecord]]:
    """Short requests while long ones keep the batch busy: the long clients loop until every
    short client has sent ``short_rounds`` requests; the long requests then running finish
    (what the short ones cost them shows in their latency), unless ``timeout_s`` ends them."""
    short: list[RequestRecord] = []
    long: list[RequestRecord] = []
    short_done = asyncio.Event()
    deadline = time.perf_counter() + timeout_s

    async def long_client() -> None:
        while not short_done.is_set():
            long.append(await issue(long_tokens))

    async def short_client() -> None:
        await asyncio.sleep(0.5)  # the long requests fill the batch first
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


def _level_timeout(clients: int, rounds: int, max_tokens: int) -> float:
    return 60 + rounds * clients * max_tokens / 5  # every token at 5 tok/s, plus a minute


async def measure_levels(target: HttpTarget, clients_list: list[int], *, max_tokens: int,
                         min_requests: int) -> list[Level]:
    levels = []
    for clients in clients_list:
        rounds = max(1, math.ceil(min_requests / clients))
        await closed_loop(target.issue, clients=clients, rounds=1, max_tokens=4,
                          timeout_s=120)  # warm: connections, this batch size's shapes

        async def measure(clients: int = clients, rounds: int = rounds) -> dict[str, Any]:
            records = await closed_loop(target.issue, clients=clients, rounds=rounds,
                                        max_tokens=max_tokens,
                                        timeout_s=_level_timeout(clients, rounds, max_tokens))
            return summarize(records, clients, max_tokens)

        levels.append(Level(**await measure_quietly_async(measure)))
        level = levels[-1]
        _log(f"{clients} clients: {level.tokens_per_s or math.nan:.1f} tok/s, TTFT p50 "
             f"{level.ttft_p50_s or math.nan:.3f} s, errors {level.errors}, other load "
             f"{level.foreign_cores} (attempts {level.attempts})")
    return levels


async def measure_mixed(target: HttpTarget, *, max_tokens: int, clients: int = 4,
                        short_rounds: int = 8, short_tokens: int = 16) -> Mixed:
    """``clients`` short clients (``short_rounds`` requests of ``short_tokens``) alone,
    ``clients`` long requests (2 x max_tokens) alone, then both together."""
    long_tokens = 2 * max_tokens

    async def measure() -> dict[str, Any]:
        short_alone = await closed_loop(target.issue, clients=clients, rounds=short_rounds,
                                        max_tokens=short_tokens, timeout_s=600)
        long_alone = await closed_loop(target.issue, clients=clients, rounds=1,
                                       max_tokens=long_tokens, timeout_s=900)
        short, long = await mixed(target.issue, long_clients=clients, long_tokens=long_tokens,
                                  short_clients=clients, short_tokens=short_tokens,
                                  short_rounds=short_rounds, timeout_s=900)
        first_short = min((r.started for r in short), default=math.inf)
        levels = {name: Level(**summarize(records, clients, tokens))
                  for name, records, tokens in (
                      ("short_alone", short_alone, short_tokens),
                      ("short_mixed", short, short_tokens),
                      ("long_alone", long_alone, long_tokens),
                      ("long_mixed", [r for r in long if r.started < first_short],
                       long_tokens))}
        return {**levels, **{f"{kind}_p50_ratio": ratio(levels[f"{kind}_mixed"].e2e_p50_s,
                                                        levels[f"{kind}_alone"].e2e_p50_s)
                             for kind in ("short", "long")}}

    await closed_loop(target.issue, clients=clients, rounds=1, max_tokens=4, timeout_s=120)
    result = Mixed(**await measure_quietly_async(measure))
    _log(f"mixed: short p50 mixed / alone {result.short_p50_ratio}, long "
         f"{result.long_p50_ratio}")
    return result


async def run(url: str, model: str, clients: list[int], *, max_tokens: int = 128,
              min_requests: int = 12, prompt: str = PROMPT, with_mixed: bool = False,
              mixed_clients: int = 4, mixed_rounds: int = 8) -> Run:
    info = machine_info()
    async with HttpTarget(url, model, prompt) as target:
        levels = await measure_levels(target, clients, max_tokens=max_tokens,
                                      min_requests=min_requests)
        mixed_result = await measure_mixed(
            target, max_tokens=max_tokens, clients=mixed_clients,
            short_rounds=mixed_rounds) if with_mixed else None
    return Run(url=url, model=model, date=info["date"], commit=info["git_commit"],
               machine=info, prompt=prompt, levels=levels, mixed=mixed_result)


# ---- interleaving -----------------------------------------------------------------------


def turn_order(turns: int, a: str, b: str) -> list[tuple[str, str]]:
    return [(a, b) if turn % 2 == 0 else (b, a) for turn in range(turns)]


def side_of(levels: list[Level]) -> Side:
    return Side(tokens_per_s={str(level.clients): level.tokens_per_s for level in levels},
                foreign_cores=max((level.foreign_cores for level in levels), default=None))


def interleave(turns: int, a: tuple[str, Callable[[], Side]], b: tuple[str, Callable[[], Side]],
               pairs: list[tuple[str, str]]) -> Interleaved:
    """Measure A and B in ``turn_order``; ``pairs`` says which of A's keys to compare with
    which of B's (the same client count, say)."""
    measure = dict([a, b])
    done = []
    for number, order in enumerate(turn_order(turns, a[0], b[0]), start=1):
        sides = {}
        for who in order:
            _log(f"turn {number}: {who}")
            sides[who] = measure[who]()
        done.append(Turn(order=list(order), sides=sides))
    ratios = []
    for a_key, b_key in pairs:
        per_turn = [ratio(t.sides[a[0]].tokens_per_s.get(a_key),
                          t.sides[b[0]].tokens_per_s.get(b_key)) for t in done]
        measured = [x for x in per_turn if x is not None]
        ratios.append(Ratio(a_key=a_key, b_key=b_key, per_turn=per_turn,
                            median=median(measured) if measured else None))
    info = machine_info()
    return Interleaved(a=a[0], b=b[0], date=info["date"], commit=info["git_commit"],
                       turns=done, ratios=ratios)


def url_side(url: str, model: str, clients: list[int], prompt: str = PROMPT,
             **levels: Any) -> Callable[[], Side]:
    """A turn's measurement of a running server: its levels' tokens/s."""
    async def measure() -> Side:
        async with HttpTarget(url, model, prompt) as target:
            return side_of(await measure_levels(target, clients, **levels))

    return lambda: asyncio.run(measure())


# ---- CLI --------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"[loadgen] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def served_model(url: str) -> str:
    """The first model a server lists at /v1/models."""
    import httpx

    return httpx.get(f"{url.rstrip('/')}/v1/models", timeout=30).json()["data"][0]["id"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of an OpenAI-compatible server")
    target.add_argument("--interleave", metavar="A_URL,B_URL",
                        help="two servers, measured in alternating turns")
    parser.add_argument("--model", help="model name (default: the first of /v1/models)")
    parser.add_argument("--clients", default="1,8,16", help="comma-separated client counts")
    parser.add_argument("--prompt-tokens", type=int, help="about this many prompt tokens "
                        "(default: a fixed prompt of about 30)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--min-requests", type=int, default=12,
                        help="each level runs ceil(this / clients) rounds")
    parser.add_argument("--mixed", action="store_true", help="also short next to long requests")
    parser.add_argument("--turns", type=int, default=3, help="turns of --interleave")
    parser.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    prompt = prompt_of(args.prompt_tokens)
    levels = {"max_tokens": args.max_tokens, "min_requests": args.min_requests}
    if args.url:
        result: BaseModel = asyncio.run(run(
            args.url, args.model or served_model(args.url), clients, prompt=prompt,
            with_mixed=args.mixed, **levels))
    else:
        a, b = args.interleave.split(",")
        result = interleave(args.turns, *((url, url_side(url, args.model or served_model(url),
                                                         clients, prompt=prompt, **levels))
                                          for url in (a, b)),
                            pairs=[(str(c), str(c)) for c in clients])
    emit_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
