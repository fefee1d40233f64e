"""Connection abuse at Ray Serve's HTTP proxy (uvicorn) with the model-free echo engine:
idle keep-alive connections, slow-header clients, and streams their clients never read.

What the proxy does, from Ray 2.60's and uvicorn's source: one asyncio server, so an idle or
slow connection costs a file descriptor and a protocol object, not a thread; a connection
that never sent a request has no timeout (uvicorn's keep-alive timer, Ray's
``keep_alive_timeout_s``, starts only after a response), and a header sent byte by byte is
not timed either. So such clients hold descriptors for as long as they like (Ray raises its
processes' descriptor limit; put a reverse proxy with header timeouts in front of a public
endpoint), and the tests check what must hold regardless: everyone else is answered in
normal time, and a stream whose client stopped reading still ends at its deadline on the
model replica, freeing its batch slot.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.helpers import serve_app, server_stats

pytestmark = pytest.mark.timeout(240)

MODEL = "smollm2-135m-instruct"
STEP_DELAY_S = 0.01  # per engine step (token): streams last
MAX_BATCH_SIZE = 16
ARGS: dict[str, Any] = {
    "engine": "echo", "checkpoint_path": "/unused", "max_batch_size": MAX_BATCH_SIZE,
    "engine_options": {"step_delay_s": STEP_DELAY_S},
    "max_stream_chunks_per_s": None,  # a chunk per token: a stuck stream fills buffers fast
    "request_timeout_s": 10, "max_request_timeout_s": 60}
SERVER_OPTIONS: dict[str, Any] = {"max_ongoing_requests": 4 * MAX_BATCH_SIZE}
IDLE_CONNECTIONS = 1000
IDLE_WITH_ONE_REQUEST = 100  # of those, sent one request first, then idle
SLOW_HEADER_CLIENTS = 20
SLOW_HEADER_BYTE_INTERVAL_S = 0.1
STUCK_STREAMS = 8
STUCK_DEADLINE_S = 8.0  # the stuck streams' own `timeout`
STUCK_MAX_TOKENS = 3000  # 30 s of tokens: only the deadline ends them in time
NORMAL_SAMPLES = 7


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * IDLE_CONNECTIONS
    if soft < wanted:  # this process opens the idle connections
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2 * IDLE_CONNECTIONS:
        pytest.skip(f"need {2 * IDLE_CONNECTIONS} file descriptors, the hard limit is {hard}")
    with serve_app(ARGS, server_options=SERVER_OPTIONS) as url:
        yield url


def normal_latencies(base_url: str) -> list[float]:
    """Seconds each of NORMAL_SAMPLES ordinary requests took (a fresh connection each, as a
    new client's), every answer checked."""
    seconds = []
    body = {"model": MODEL, "prompt": "say ok", "max_tokens": 10}
    for _ in range(NORMAL_SAMPLES):
        started = time.monotonic()
        response = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
        seconds.append(time.monotonic() - started)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == "ok" * 5
    return seconds


def within_normal_latency(before: list[float], during: list[float]) -> None:
    p50_before, p50_during = statistics.median(before), statistics.median(during)
    print(f"p50 before {p50_before:.3f} s, during {p50_during:.3f} s")
    assert p50_during <= 3 * p50_before + 0.5, (before, during)


def host_port(base_url: str) -> tuple[str, int]:
    host, port = base_url.removeprefix("http://").split(":")
    return host, int(port)


class Abusers:
    """IDLE_CONNECTIONS open connections (some after one request) and SLOW_HEADER_CLIENTS
    sending a request's header a byte at a time, on an event loop of their own."""

    def __init__(self, base_url: str) -> None:
        self._address = host_port(base_url)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._writers: list[asyncio.StreamWriter] = []
        self._slow: list[asyncio.Future[str]] = []
        self.finish_slow = asyncio.Event()

    def __enter__(self) -> Abusers:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(timeout=120)
        return self

    def __exit__(self, *exc_info: object) -> None:
        async def close() -> None:
            for writer in self._writers:
                writer.close()
            for task in self._slow:
                task.cancel()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _open(self) -> None:
        host, port = self._address
        for index in range(IDLE_CONNECTIONS):
            reader, writer = await asyncio.open_connection(host, port)
            self._writers.append(writer)
            if index < IDLE_WITH_ONE_REQUEST:  # one keep-alive request, then nothing
                writer.write(f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
                assert head.startswith(b"HTTP/1.1 200"), head
        self._slow = [asyncio.ensure_future(self._slow_header(i))
                      for i in range(SLOW_HEADER_CLIENTS)]

    async def _slow_header(self, index: int) -> str:
        """Send a request's head byte by byte until finish_slow, then the rest; the answer's
        status line."""
        host, port = self._address
        reader, writer = await asyncio.open_connection(host, port)
        self._writers.append(writer)
        body = b'{"model": "%s", "prompt": "say slow", "max_tokens": 4}' % MODEL.encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nX-Padding: {'p' * 2000}"
                f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        request = head.encode() + body
        sent = 0
        while sent < len(request) - len(body) - 4 and not self.finish_slow.is_set():
            writer.write(request[sent:sent + 1])
            await writer.drain()
            sent += 1
            await asyncio.sleep(SLOW_HEADER_BYTE_INTERVAL_S)
        writer.write(request[sent:])
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 60)
        return status.decode().strip()

    def slow_headers_still_sending(self) -> int:
        return sum(not task.done() for task in self._slow)

    def finish_slow_headers(self) -> list[str]:
        """Let the slow clients finish their requests; their status lines."""
        async def finish() -> list[str]:
            self.finish_slow.set()
            return list(await asyncio.gather(*self._slow))
        return asyncio.run_coroutine_threadsafe(finish(), self._loop).result(timeout=120)


def test_idle_and_slow_header_connections_do_not_slow_other_clients(base_url: str) -> None:
    before = normal_latencies(base_url)
    with Abusers(base_url) as abusers:
        time.sleep(1)  # the slow clients are mid-header
        during = normal_latencies(base_url)
        assert abusers.slow_headers_still_sending() == SLOW_HEADER_CLIENTS
        # Every idle connection is still open (none was dropped to make room).
        statuses = abusers.finish_slow_headers()
    print(f"{IDLE_CONNECTIONS} idle connections ({IDLE_WITH_ONE_REQUEST} after one request), "
          f"{SLOW_HEADER_CLIENTS} slow-header clients: {len(during)} normal requests all "
          f"answered; slow clients answered {statuses[0]!r} x{len(statuses)}")
    within_normal_latency(before, during)
    assert statuses == ["HTTP/1.1 200 OK"] * SLOW_HEADER_CLIENTS
    # The proxy is fine after they left.
    within_normal_latency(before, normal_latencies(base_url))


def stuck_stream(base_url: str) -> socket.socket:
    """A streaming request whose client never reads: a tiny receive buffer, nothing read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(host_port(base_url))
    body = (b'{"model": "%s", "prompt": "say stuck", "stream": true, "max_tokens": %d, '
            b'"timeout": %g}' % (MODEL.encode(), STUCK_MAX_TOKENS, STUCK_DEADLINE_S))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def read_to_the_end(sock: socket.socket) -> bytes:
    """Everything the server sends on ``sock`` until it ends a chunked body."""
    sock.settimeout(30)
    data = b""
    while not data.endswith(b"\r\n0\r\n\r\n"):
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        data += chunk
    return data


def test_streams_nobody_reads_end_at_their_deadline_and_free_their_slots(
    base_url: str
) -> None:
    before = normal_latencies(base_url)
    assert server_stats()["running"] == 0
    sockets = [stuck_stream(base_url) for _ in range(STUCK_STREAMS)]
    try:
        started = time.monotonic()
        while server_stats()["running"] < STUCK_STREAMS:
            assert time.monotonic() - started < 30, server_stats()
            time.sleep(0.05)
        during = normal_latencies(base_url)
        # Cut at the deadline (STUCK_DEADLINE_S), not run to max_tokens (30 s).
        while server_stats()["running"] > 0:
            assert time.monotonic() - started < STUCK_DEADLINE_S + 10, server_stats()
            time.sleep(0.1)
        freed_after_s = time.monotonic() - started
        # What reached the clients: their small buffers' worth; the rest waits upstream.
        held = [s.recv(1 << 24, socket.MSG_PEEK | socket.MSG_DONTWAIT) for s in sockets]
        late_reader = read_to_the_end(sockets[0])  # one client reads after all
    finally:
        for sock in sockets:
            sock.close()
    print(f"{STUCK_STREAMS} unread streams: slots freed {freed_after_s:.1f} s after they "
          f"started (deadline {STUCK_DEADLINE_S} s, max_tokens would take "
          f"{STUCK_MAX_TOKENS * STEP_DELAY_S:.0f} s); each client held {len(held[0])} "
          f"bytes of a {len(late_reader)}-byte stream")
    assert all(chunk.startswith(b"HTTP/1.1 200") for chunk in held)
    assert all(b"[DONE]" not in chunk for chunk in held)  # really stuck: the end waited
    assert len(late_reader) > 10 * len(held[0])
    # The late reader gets a whole stream, cut at the deadline: the last choice ends by
    # length (timed out) long before max_tokens, then [DONE].
    assert late_reader.rstrip().endswith(b"data: [DONE]\n\n\r\n0")
    assert b'"finish_reason": "length"' in late_reader
    assert late_reader.count(b"data: ") < STUCK_MAX_TOKENS / 2
    within_normal_latency(before, during)
    # Capacity is back: a full batch of ordinary requests runs at once.
    within_normal_latency(before, normal_latencies(base_url))


def test_a_client_that_hangs_up_is_not_logged_as_an_unexpected_error(
    caplog: pytest.LogCaptureFixture
) -> None:
    """Ray cancels the router's request when its HTTP client hangs up; Starlette may meet
    that in ``receive()`` mid-stream and hand it to the catch-all handler (a soak of the
    demo model logged a traceback for about half its cancelled streams)."""
    from ray.exceptions import TaskCancelledError
    from starlette.requests import Request

    from deployments.ingress import _unexpected_error

    request = Request({"type": "http", "method": "POST", "path": "/v1/completions",
                       "headers": [], "query_string": b""})
    with caplog.at_level("INFO", logger="ray.serve"):
        gone = asyncio.run(_unexpected_error(request, TaskCancelledError()))
        group = asyncio.run(_unexpected_error(
            request, BaseExceptionGroup("tasks", [TaskCancelledError()])))
        bug = asyncio.run(_unexpected_error(request, ValueError("a bug")))
    assert (gone.status_code, group.status_code, bug.status_code) == (499, 499, 500)
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.getMessage() for r in errors] == ["unexpected error on POST /v1/completions"]
