"""GET /metrics: counts and sums match what was sent, aggregated over replica processes."""

from __future__ import annotations

import os

import httpx
import pytest

from tests.helpers import scrape, serve_app, sse_events, total

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def base_url():
    args = {"engine": "echo", "checkpoint_path": "/unused",
            "engine_options": {"step_delay_s": 0.002}, "engine_thread_niceness": 5}
    with serve_app(args, server_options={"max_ongoing_requests": 64}) as url:
        yield url


def test_metrics_count_what_was_sent(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as client:
        generated = 0
        for i in range(5):
            r = client.post("/v1/completions", json={"model": MODEL, "prompt": f"x w{i}",
                                                      "max_tokens": 4 + i})
            generated += r.json()["usage"]["completion_tokens"]
        for i in range(3):
            r = client.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": f"say s{i}"}],
                "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}})
            generated += sse_events(r.text)[-2]["usage"]["completion_tokens"]
        for _ in range(2):
            assert client.post("/v1/completions", json={"model": MODEL, "prompt": "x",
                                                         "max_tokens": 0}).status_code == 400
    samples = scrape(base_url)
    assert total(samples, "llm_requests_total", status="finished") == 8
    assert total(samples, "llm_requests_total", status="error", device="router") == 2
    assert total(samples, "llm_generation_tokens_total") == generated
    assert total(samples, "llm_time_to_first_token_seconds_count") == 8
    assert total(samples, "llm_e2e_request_latency_seconds_count") == 8
    assert total(samples, "llm_generation_tokens_sum") == generated
    assert total(samples, "llm_inter_token_latency_seconds_count") == generated - 8
    assert total(samples, "llm_batch_size_count") > 0
    assert total(samples, "llm_replica_loaded", device="cpu") == 1
    slots = {dict(lab).get("slot") for (n, lab) in samples if n == "llm_requests_total"}
    assert "0" in slots  # replica series carry their slot


def test_metrics_come_from_the_replica_process_too(base_url):
    """The router's /metrics includes series written by the LLMServer process."""
    samples = scrape(base_url)
    devices = {dict(lab).get("device") for (n, lab) in samples if n.startswith("llm_")}
    assert {"cpu", "router"} <= devices


def test_the_engine_thread_runs_at_the_configured_niceness(base_url):
    """Ray starts workers at niceness 15; the config moves the engine thread (any process
    may lower its own priority, so 15 -> 5 needs root, and stays 15 without it)."""
    health = httpx.get(f"{base_url}/health", timeout=30).json()
    expected = 5 if os.geteuid() == 0 else 15
    assert health["replica"]["engine_thread_niceness"] == expected
