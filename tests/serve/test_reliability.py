"""Reliability over real Ray Serve with the model-free echo engine: backpressure, cancellation,
deadlines, API keys, redeploys and replica faults.

One application serves the whole module (Ray starts once); the tests run in file order and
the last two change it: a redeploy under load, then two replicas and one of them killed
under load. The echo engine answers with the prompt's last word repeated, one character per
token, so a surviving request's text is exact; its steps take STEP_DELAY_S, so a request
of N tokens in a batch lasts about N * STEP_DELAY_S.

The first tests need no Ray: the engine loop's liveness (what ``check_health`` reports)
and the API key sources.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from ray import serve

from deployments.app import bind_app
from deployments.config import LLMConfig
from deployments.contract import ErrorKind
from deployments.engine.batching import BatchingEngine
from deployments.engine.echo import EchoRunner
from deployments.engine.protocol import GenerationRequest, SamplingParams
from deployments.engine_loop import EngineLoop
from deployments.errors import ServiceError
from deployments.ingress import LLMRouter
from tests.helpers import scrape, serve_app, server_stats, sse_events, total

pytestmark = pytest.mark.timeout(180)

MODEL = "smollm2-135m-instruct"
API_KEY = "test-key-8c1f27d0"
STEP_DELAY_S = 0.02
MAX_BATCH_SIZE = 8
ARGS: dict[str, Any] = {
    "engine": "echo", "checkpoint_path": "/unused", "max_batch_size": MAX_BATCH_SIZE,
    "engine_options": {"step_delay_s": STEP_DELAY_S},
    "request_timeout_s": 4, "max_request_timeout_s": 60}
# Small queues, so a burst overflows them; fast health checks, so a killed replica is
# noticed within seconds.
SERVER_OPTIONS: dict[str, Any] = {
    "max_ongoing_requests": 2 * MAX_BATCH_SIZE, "max_queued_requests": 16,
    "health_check_period_s": 1, "health_check_timeout_s": 5, "graceful_shutdown_timeout_s": 30}
LONG = 30.0  # `timeout` of requests that must not meet their deadline


def echo(word: str, tokens: int) -> str:
    """What the echo engine answers to a prompt whose last word is ``word``."""
    return (word * tokens)[:tokens]


# ---- no Ray: engine loop liveness (check_health) ---------------------------------------


class _GatedEcho(BatchingEngine):
    """An echo engine whose decode steps wait for a gate, and that counts them."""

    def __init__(self) -> None:
        super().__init__(EchoRunner(max_batch_size=4, max_prefill_tokens_per_step=64))
        self.gate = threading.Event()
        self.gate.set()
        self.steps = 0
        self.fail = False

    def step(self, early=None):  # type: ignore[override]
        self.steps += 1
        if self.fail:
            raise RuntimeError("device lost")
        self.gate.wait(10)
        return super().step(early)


@contextlib.contextmanager
def _running_loop(engine: _GatedEcho, stall_timeout_s: float
                  ) -> Iterator[tuple[EngineLoop, asyncio.AbstractEventLoop]]:
    event_loop = asyncio.new_event_loop()
    loop = EngineLoop(engine, stall_timeout_s=stall_timeout_s)
    loop.start(event_loop)
    try:
        yield loop, event_loop
    finally:
        engine.gate.set()
        loop.stop()
        event_loop.close()


def _request(request_id: str, max_tokens: int = 50) -> GenerationRequest:
    return GenerationRequest(request_id, tuple(b"go abc"), SamplingParams(max_tokens=max_tokens))


def test_liveness_never_generates_and_passes_while_idle():
    engine = _GatedEcho()
    with _running_loop(engine, stall_timeout_s=0.3) as (loop, _):
        for _ in range(5):
            loop.check_alive()
            time.sleep(0.1)
        assert engine.steps == 0  # an idle replica's health check runs no generation


def test_liveness_fails_when_a_step_stalls_while_work_waits():
    engine = _GatedEcho()
    with _running_loop(engine, stall_timeout_s=0.3) as (loop, _):
        engine.gate.clear()
        loop.submit(_request("stuck"))
        deadline = time.monotonic() + 3
        while engine.steps == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        loop.check_alive()  # stepping, not yet stalled
        time.sleep(0.5)
        with pytest.raises(RuntimeError, match="no step"):
            loop.check_alive()
        engine.gate.set()
        time.sleep(0.2)
        loop.check_alive()  # progress again: healthy again


def test_liveness_fails_and_requests_get_503_when_the_loop_dies():
    engine = _GatedEcho()
    with _running_loop(engine, stall_timeout_s=5) as (loop, event_loop):
        engine.fail = True
        outputs = loop.submit(_request("doomed"))
        (delivery,) = event_loop.run_until_complete(asyncio.wait_for(outputs.take(), 5))
        assert delivery.item.kind == ErrorKind.UNAVAILABLE  # the router's 503
        with pytest.raises(RuntimeError, match="not running"):
            loop.check_alive()
        with pytest.raises(RuntimeError):
            loop.submit(_request("after"))


# ---- no Ray: API key sources -------------------------------------------------------------


def test_api_keys_from_env_and_file(tmp_path, monkeypatch):
    key_file = tmp_path / "keys"
    key_file.write_text("\nfile-key-1\n  file-key-2  \n")
    monkeypatch.setenv("LLM_TEST_KEYS", "env-a, env-b")
    config = LLMConfig(api_key_env="LLM_TEST_KEYS", api_key_file=str(key_file))
    assert config.api_keys() == {"env-a", "env-b", "file-key-1", "file-key-2"}
    assert LLMConfig().api_keys() == frozenset()  # nothing configured: open


@pytest.mark.parametrize("source", ["unset_env", "blank_env", "missing_file", "blank_file"])
def test_a_configured_but_empty_key_source_refuses_to_start(tmp_path, monkeypatch, source):
    monkeypatch.delenv("LLM_TEST_KEYS", raising=False)
    if source == "blank_env":
        monkeypatch.setenv("LLM_TEST_KEYS", " , ")
    blank = tmp_path / "blank"
    blank.write_text("\n  \n")
    config = LLMConfig(**({"api_key_env": "LLM_TEST_KEYS"} if "env" in source else
                          {"api_key_file": str(blank if source == "blank_file"
                                               else tmp_path / "missing")}))
    with pytest.raises(ValueError, match="api_key_") as raised:
        config.api_keys()
    assert "remove api_key" in str(raised.value) or "cannot be read" in str(raised.value)
    # The router's own constructor (under Serve's ASGI wrapper) refuses: it never serves.
    router_cls = next(c for c in LLMRouter.func_or_class.__mro__ if "_authorize" in vars(c))
    with pytest.raises(ValueError):
        router_cls.__init__(object.__new__(router_cls), None, config)


def test_a_key_pasted_as_api_key_env_is_refused():
    with pytest.raises(ValueError, match="api_key_env"):
        LLMConfig(api_key_env="sk-1234-abcd")


# ---- the served application ------------------------------------------------------------


@pytest.fixture(scope="module")
def base_url(tmp_path_factory) -> Iterator[str]:
    key_file = tmp_path_factory.mktemp("keys") / "api_keys"
    key_file.write_text(f"{API_KEY}\n")
    ARGS["api_key_file"] = str(key_file)
    with serve_app(ARGS, server_options=SERVER_OPTIONS) as url:
        yield url


@pytest.fixture
def client(base_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


def _body(word: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": f"say {word}", "max_tokens": max_tokens, **extra}


def _wait_for(condition, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return False


def _replica_pids(base_url: str, want: int, attempts: int = 60) -> set[int]:
    """LLMServer replica PIDs, as /health reports them (it asks one replica per call)."""
    pids: set[int] = set()
    for _ in range(attempts):
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            pids.add(httpx.get(f"{base_url}/health", timeout=5).json()["replica"]["pid"])
        if len(pids) >= want:
            break
    return pids


def _serve_replica_rss() -> dict[str, int]:
    """RSS of this test's Serve replica processes (our descendants), by deployment."""
    rss: dict[str, int] = {}
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            title = " ".join(proc.cmdline())
            for name in ("LLMRouter", "LLMServer", "ProxyActor"):
                if f":{name}" in title or title.startswith(f"ray::{name}"):
                    rss[name] = rss.get(name, 0) + proc.memory_info().rss
    return rss


def test_keys_are_required_except_for_health(base_url, client):
    body = _body("hi", 2)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                    {"Authorization": f"Basic {API_KEY}"}):
        r = httpx.post(f"{base_url}/v1/completions", json=body, headers=headers)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{base_url}/v1/models").status_code == 401
    assert httpx.get(f"{base_url}/health").status_code == 200
    assert client.post("/v1/completions", json=body).status_code == 200
    assert client.get("/v1/models").status_code == 200


def _burst(base_url: str, size: int) -> tuple[list[tuple[int, float, httpx.Response]],
                                               list[int]]:
    """``size`` requests at once, each with a connection of its own, and /health probes
    meanwhile: (request index, seconds, response) per request, and the probes' statuses."""

    async def run() -> tuple[list[tuple[int, float, httpx.Response]], list[int]]:
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            async def one(i: int) -> tuple[int, float, httpx.Response]:
                started = time.monotonic()
                r = await c.post("/v1/completions", json=_body(f"b{i}", 8, timeout=LONG))
                return i, time.monotonic() - started, r

            async def health_probes() -> list[int]:
                statuses = []
                for _ in range(5):
                    await asyncio.sleep(0.5)
                    statuses.append((await c.get("/health")).status_code)
                return statuses

            probes = asyncio.ensure_future(health_probes())
            results = await asyncio.gather(*(one(i) for i in range(size)))
            return results, await probes

    return asyncio.run(run())


def test_a_burst_of_1000_gets_200_or_503_at_once_and_memory_stays_bounded(base_url):
    rss = [_serve_replica_rss()]
    for _ in range(2):  # the second burst shows that memory does not grow with each burst
        started = time.monotonic()
        results, health_statuses = _burst(base_url, 1000)
        elapsed = time.monotonic() - started
        by_status: dict[int, int] = {}
        for i, _, r in results:
            by_status[r.status_code] = by_status.get(r.status_code, 0) + 1
            if r.status_code == 200:
                assert r.json()["choices"][0]["text"] == echo(f"b{i}", 8)
            else:
                assert r.status_code == 503, r.text
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["type"] == "service_unavailable_error"
        rejected = sorted(t for _, t, r in results if r.status_code == 503)
        print(f"burst of 1000: {by_status} in {elapsed:.1f} s; 503 median "
              f"{rejected[len(rejected) // 2]:.2f} s" if rejected else "")
        assert by_status.get(200, 0) >= 2 * MAX_BATCH_SIZE and by_status.get(503, 0) > 0
        assert elapsed < 90
        # Rejected at once, not after waiting a turn. The median is mostly the proxy taking
        # 1000 connections on 2 cores: 15-19 s in the full suite on an AVX2 EPYC about half
        # as fast as the one this bound (then 15 s) was set on; 25 s keeps room for such CPUs
        # and stays far below the 113 s it guards against.
        assert rejected[len(rejected) // 2] < 25
        # None waits in Ray's proxy for the router (which handed them on at ~10/s: up to
        # 113 s in a burst while the router's limit was 512).
        assert max(t for _, t, _ in results) < 30
        assert health_statuses == [200] * 5  # busy is not down: /health stays 200
        # What was accepted was bounded by the queues: nothing is left over afterwards.
        assert _wait_for(lambda: server_stats()["running"] == 0 == server_stats()["waiting"],
                         10)
        rss.append(_serve_replica_rss())
    growth = [{name: round((after.get(name, 0) - before) / 2**20)
               for name, before in rss[0].items()} for after in rss[1:]]
    print("RSS growth over the first and the second burst (MB):", growth)
    for name in rss[0]:
        assert growth[0][name] < 200 and growth[1][name] - growth[0][name] < 50, growth
    assert httpx.get(f"{base_url}/health").status_code == 200


def test_health_says_busy_while_a_full_replica_keeps_answering(base_url):
    """Every replica slot taken by long answers (the queue not full): the health probe waits
    in the queue past its timeout, but chunks keep coming, so it is "busy", not 503."""
    from deployments.constants import HEALTH_TIMEOUT_S

    tokens = int((HEALTH_TIMEOUT_S + 3) / STEP_DELAY_S)  # the first answers end after it

    async def run() -> tuple[httpx.Response, float, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=base_url, timeout=60, headers={
                "Authorization": f"Bearer {API_KEY}"}) as c:
            answers = [asyncio.ensure_future(c.post("/v1/completions", json=_body(
                f"f{i}", tokens, timeout=LONG))) for i in range(SERVER_OPTIONS[
                    "max_ongoing_requests"])]
            def replica_full() -> bool:  # from /metrics: a stats call would queue too
                samples = scrape(base_url)
                return total(samples, "llm_num_requests_running") + total(
                    samples, "llm_num_requests_waiting") == len(answers)

            assert await asyncio.to_thread(_wait_for, replica_full, 10)
            started = time.monotonic()
            health = await c.get("/health")
            waited = time.monotonic() - started
            return health, waited, await asyncio.gather(*answers)

    health, waited, answers = asyncio.run(run())
    assert waited >= HEALTH_TIMEOUT_S  # the probe did wait behind the answers
    assert health.status_code == 200, health.text
    assert health.json()["status"] == "busy"
    assert [r.status_code for r in answers] == [200] * len(answers)


def test_a_handle_callers_bad_request_is_one_info_line_in_the_router_log(base_url):
    """Ray Serve logs exceptions of handle calls with a traceback; a caller's own mistake
    must not fill the log with them (CallerErrorLogFilter)."""
    import ray

    router = serve.get_app_handle("llm")
    with pytest.raises(Exception) as raised:
        router.completions.remote(_body("x", -3)).result(timeout_s=30)
    assert ServiceError.from_exception(raised.value).status_code == 400
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    logs = sorted((session / "logs" / "serve").glob("replica_llm_LLMRouter_*.log"))
    assert logs, "no router replica log"

    def logged() -> str:
        return "".join(path.read_text(errors="replace") for path in logs)

    assert _wait_for(lambda: "Request answered 400" in logged(), 10)
    text = logged()
    line = next(line for line in text.splitlines() if "Request answered 400" in line)
    assert line.startswith("INFO ") and "max_tokens" in line, line
    assert "Traceback" not in text


def test_handle_callers_get_503_with_retry_after_when_the_queue_is_full(base_url):
    router = serve.get_app_handle("llm")
    responses = [router.completions.remote(_body(f"h{i}", 20, timeout=LONG))
                 for i in range(60)]
    statuses: dict[Any, int] = {}
    for i, response in enumerate(responses):
        try:
            assert response.result(timeout_s=60)["choices"][0]["text"] == echo(f"h{i}", 20)
            statuses[200] = statuses.get(200, 0) + 1
        except Exception as raised:
            error = ServiceError.from_exception(raised)
            assert error is not None, raised
            assert (error.status_code, error.retry_after_s, error.retriable) == (503, 1, True)
            statuses[503] = statuses.get(503, 0) + 1
    assert statuses.get(200, 0) > 0 and statuses.get(503, 0) > 0, statuses


def _stream_text(client: httpx.Client, body: dict[str, Any], started: threading.Event
                 ) -> tuple[str, str | None]:
    text, finish = [], None
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = sse_events(line)[0]
            started.set()
            choice = event["choices"][0]
            text.append(choice["text"])
            finish = choice["finish_reason"] or finish
    return "".join(text), finish


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_a_client_that_hangs_up_stops_its_generation_and_not_the_others(base_url, stream):
    survivor_tokens = 150
    before = server_stats()["decoded_tokens"]
    # The request that will hang up starts first, then a survivor joins its batch; each has
    # a connection of its own.
    headers = {"Authorization": f"Bearer {API_KEY}"}
    quitter_client = httpx.Client(base_url=base_url, headers=headers, timeout=1.5)
    survivor_client = httpx.Client(base_url=base_url, headers=headers, timeout=60)
    victim = _body("victim", 2000, timeout=LONG, stream=stream)
    if stream:
        response = quitter_client.send(quitter_client.build_request(
            "POST", "/v1/completions", json=victim), stream=True)
        lines = response.iter_lines()  # kept: dropping the iterator would hang up now
        assert next(lines).startswith("data: ")
    else:
        gave_up: list[BaseException] = []

        def ask_and_give_up() -> None:
            try:
                quitter_client.post("/v1/completions", json=victim)
            except httpx.ReadTimeout as error:  # the client's own timeout: it hangs up
                gave_up.append(error)

        quitter = threading.Thread(target=ask_and_give_up)
        quitter.start()
    assert _wait_for(lambda: server_stats()["decoded_tokens"] > before, 5)
    survivor_started = threading.Event()
    survivor: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: survivor.update(result=_stream_text(
        survivor_client, _body("survivor", survivor_tokens, timeout=LONG), survivor_started)))
    thread.start()
    assert survivor_started.wait(10)
    assert server_stats()["running"] == 2
    if stream:
        response.close()
    else:
        quitter.join()
        assert gave_up
    quitter_client.close()
    at_hang_up = server_stats()["decoded_tokens"]
    thread.join(30)
    survivor_client.close()
    assert survivor["result"] == (echo("survivor", survivor_tokens), "length")
    assert _wait_for(lambda: server_stats()["running"] == 0, 5)
    after = server_stats()["decoded_tokens"]
    # The survivor had at most survivor_tokens to go; the victim, not aborted, would have
    # made as many again.
    victim_tokens_after_hang_up = (after - at_hang_up) - survivor_tokens
    assert victim_tokens_after_hang_up < 50, (at_hang_up, after)  # < 1 s of steps
    time.sleep(0.3)
    assert server_stats()["decoded_tokens"] == after


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_a_cancelled_handle_call_stops_its_generation(base_url, stream):
    router = serve.get_app_handle("llm")
    before = server_stats()["decoded_tokens"]
    body = _body("cancel", 2000, timeout=LONG)
    if stream:
        response = router.options(stream=True).completions_stream.remote(body)
        assert next(iter(response))["choices"][0]["text"]
    else:
        response = router.completions.remote(body)
    assert _wait_for(lambda: server_stats()["decoded_tokens"] > before + 5, 5)
    response.cancel()
    assert _wait_for(lambda: server_stats()["running"] == 0, 3)
    stopped_at = server_stats()["decoded_tokens"]
    assert stopped_at - before < 500  # would be 2000 had it run on
    time.sleep(0.3)
    assert server_stats()["decoded_tokens"] == stopped_at


def test_the_config_default_deadline_ends_a_long_answer_with_length(client):
    started = time.monotonic()
    r = client.post("/v1/completions", json=_body("slow", 2000))
    elapsed = time.monotonic() - started
    assert r.status_code == 200, r.text
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    assert choice["finish_reason"] == "length"
    assert 0 < usage["completion_tokens"] < 2000
    assert choice["text"] == echo("slow", usage["completion_tokens"])
    assert ARGS["request_timeout_s"] - 0.5 < elapsed < ARGS["request_timeout_s"] + 3


def test_a_request_timeout_ends_a_stream_with_length(client):
    started = time.monotonic()
    text, finish = _stream_text(client, _body("brief", 2000, timeout=0.5), threading.Event())
    assert finish == "length"
    assert 0 < len(text) < 2000 and text == echo("brief", len(text))
    assert time.monotonic() - started < 5


def test_a_deadline_before_any_token_is_a_504_error(base_url, client):
    # Fill the batch, so the next request waits in the engine's queue past its deadline.
    router = serve.get_app_handle("llm").options(stream=True)
    fillers = [router.completions_stream.remote(_body(f"f{i}", 2000, timeout=LONG))
               for i in range(MAX_BATCH_SIZE)]
    try:
        assert _wait_for(lambda: server_stats()["running"] == MAX_BATCH_SIZE, 10)
        for stream in (False, True):
            started = time.monotonic()
            r = client.post("/v1/completions", json=_body("late", 5, timeout=0.3, stream=stream))
            assert r.status_code == 504, r.text
            assert r.json()["error"]["type"] == "timeout_error"
            assert "deadline" in r.json()["error"]["message"]
            assert time.monotonic() - started < 5
    finally:
        for filler in fillers:
            filler.cancel()
    assert _wait_for(lambda: server_stats()["running"] == 0, 5)


def test_a_timeout_above_the_cap_is_refused(client):
    r = client.post("/v1/completions", json=_body("x", 2, timeout=61))
    assert r.status_code == 400 and r.json()["error"]["param"] == "timeout"


# ---- the last two change the application -------------------------------------------------

REDEPLOYED_ARGS = {**ARGS, "default_max_tokens": 7}


async def _ask(client: httpx.AsyncClient, word: str, tokens: int, stream: bool
               ) -> tuple[Any, ...]:
    """One request's outcome: ("ok", text) or ("error", status, error JSON)."""
    r = await client.post("/v1/completions", json=_body(word, tokens, timeout=LONG,
                                                         stream=stream))
    if r.status_code != 200:
        assert r.headers.get("retry-after") == "1", r.text
        return ("error", r.status_code, r.json()["error"])
    if not stream:
        return ("ok", r.json()["choices"][0]["text"])
    events = sse_events(r.text)
    assert events[-1] == "[DONE]", r.text[-300:]
    errors = [e["error"] for e in events[:-1] if "error" in e]
    if errors:
        return ("error", 200, errors[0])
    return ("ok", "".join(e["choices"][0]["text"] for e in events[:-1]))


def test_a_redeploy_under_load_lets_in_flight_requests_finish(base_url, client):
    old_pids = _replica_pids(base_url, want=1)
    # About 3 s in a full batch. With one replica, Serve stops the old one first (it drains
    # while the new one starts); going to two replicas it would start a new one first.
    tokens = 150

    def old_replica_stopping() -> bool:
        states = serve.status().applications["llm"].deployments["LLMServer"].replica_states
        return states.get("STOPPING", 0) > 0

    async def scenario() -> tuple[list[Any], list[Any], bool]:
        async with httpx.AsyncClient(base_url=base_url, timeout=90,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            in_flight = [asyncio.ensure_future(_ask(c, f"r{i}", tokens, stream=i % 2 == 0))
                         for i in range(MAX_BATCH_SIZE)]
            while (await asyncio.to_thread(server_stats))["running"] < MAX_BATCH_SIZE:
                await asyncio.sleep(0.05)
            redeploy = asyncio.ensure_future(asyncio.to_thread(
                serve.run, bind_app(LLMConfig.model_validate(REDEPLOYED_ARGS),
                                    server_options=SERVER_OPTIONS),
                name="llm", route_prefix="/"))
            await asyncio.sleep(0.5)
            during = [asyncio.ensure_future(_ask(c, f"d{i}", 20, stream=i % 2 == 0))
                      for i in range(4)]
            # The old replica is told to stop while its requests are still running.
            stopped_while_busy = False
            while not stopped_while_busy and not all(t.done() for t in in_flight):
                stopped_while_busy = await asyncio.to_thread(old_replica_stopping)
                stopped_while_busy &= not all(t.done() for t in in_flight)
                await asyncio.sleep(0.1)
            results = await asyncio.gather(*in_flight)
            await redeploy
            return results, await asyncio.gather(*during), stopped_while_busy

    in_flight, during, stopped_while_busy = asyncio.run(scenario())
    assert stopped_while_busy
    assert in_flight == [("ok", echo(f"r{i}", tokens)) for i in range(MAX_BATCH_SIZE)]
    assert during == [("ok", echo(f"d{i}", 20)) for i in range(4)]
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "new config"})
    assert r.json()["usage"]["completion_tokens"] == REDEPLOYED_ARGS["default_max_tokens"]
    new_pids = _replica_pids(base_url, want=1)
    assert len(new_pids) == 1 and not new_pids & old_pids


def test_a_replica_killed_under_load_fails_fast_and_the_service_recovers(base_url, client):
    serve.run(bind_app(LLMConfig.model_validate(ARGS),
                       server_options={**SERVER_OPTIONS, "num_replicas": 2}),
              name="llm", route_prefix="/")
    pids = _replica_pids(base_url, want=2)
    assert len(pids) == 2
    victim = min(pids)
    tokens = 100

    async def scenario() -> tuple[list[Any], list[float], list[Any]]:
        async with httpx.AsyncClient(base_url=base_url, timeout=60,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            async def timed(coro: Any) -> tuple[Any, float]:
                started = time.monotonic()
                return await coro, time.monotonic() - started

            # 3 batches' worth over 2 replicas: each runs a full batch and queues the rest.
            load = [asyncio.ensure_future(timed(_ask(c, f"k{i}", tokens, stream=i % 2 == 0)))
                    for i in range(3 * MAX_BATCH_SIZE)]
            await asyncio.sleep(0.8)
            os.kill(victim, signal.SIGKILL)
            # Meanwhile new requests go to the healthy replica (or are retried there).
            after_kill = [await _ask(c, f"n{i}", 5, stream=i % 2 == 0) for i in range(6)]
            results = await asyncio.gather(*load)
            return [r for r, _ in results], [t for _, t in results], after_kill

    outcomes, seconds, after_kill = asyncio.run(scenario())
    failed = 0
    for i, outcome in enumerate(outcomes):
        if outcome[0] == "ok":
            assert outcome[1] == echo(f"k{i}", tokens)
        else:
            failed += 1
            _, status, error = outcome
            assert status in (200, 503)  # 200: the stream had begun; the error is its last event
            assert error["type"] == "service_unavailable_error"
            assert "replica" in error["message"]
    print(f"killed a replica under load: {failed} of {len(outcomes)} requests failed, "
          f"slowest {max(seconds):.1f} s")
    # Only the victim's running requests fail (their tokens had started); its queued ones,
    # with no token yet, are retried on the other replica.
    assert 0 < failed <= MAX_BATCH_SIZE, outcomes
    assert max(seconds) < 15, seconds  # nobody hung
    assert after_kill == [("ok", echo(f"n{i}", 5)) for i in range(6)]
    # Ray restarts the replica.
    assert _wait_for(lambda: len(_replica_pids(base_url, want=2, attempts=20) - {victim}) == 2,
                     60, interval_s=1)
    assert client.post("/v1/completions", json=_body("back", 3)).json()["choices"][0][
        "text"] == "bac"
