"""The service on the real demo model: batching under concurrency, and `serve run` itself."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from tests.helpers import (
    ask_8k,
    assert_too_long_is_refused_naming_the_context,
    scrape,
    serve_app,
    serve_run,
    server_stats,
    sse_events,
    total,
    wait_until,
)

pytestmark = pytest.mark.model

MODEL = "smollm2-135m-instruct"
FRANCE = {"role": "user", "content": "What is the capital of France?"}


def test_64_concurrent_requests_are_batched_and_stay_correct(demo_checkpoint):
    args = {"checkpoint_path": str(demo_checkpoint), "max_batch_size": 16}
    with serve_app(args, server_options={"max_ongoing_requests": 128}) as url, \
            httpx.Client(base_url=url, timeout=300) as client:

        def ask(i: int) -> tuple[int, str]:
            if i % 2 == 0:
                r = client.post("/v1/chat/completions", json={
                    "model": MODEL, "messages": [FRANCE], "max_tokens": 16, "temperature": 0})
                assert r.status_code == 200, r.text
                return i, r.json()["choices"][0]["message"]["content"]
            # Eight repeats: after four, " banana" leads "\n" by only 0.25 logits, and which
            # wins depends on the batch's numerics (the prompt cache's, a prefill's width).
            r = client.post("/v1/completions", json={
                "model": MODEL, "prompt": "banana, " * 7 + "banana,", "max_tokens": 6,
                "temperature": 0})
            assert r.status_code == 200, r.text
            return i, r.json()["choices"][0]["text"]

        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            answers = dict(pool.map(ask, range(64)))
        stats = server_stats()
    france = [a for i, a in answers.items() if i % 2 == 0]
    banana = [a for i, a in answers.items() if i % 2 == 1]
    assert all("Paris" in a for a in france), france
    assert all("banana" in a and "Paris" not in a for a in banana), banana
    assert stats["max_batch_size_seen"] > 1, stats


def wait_for_idle(client: httpx.Client) -> None:
    """The replica's running batch empties (a request's end frees its slot)."""
    wait_until(lambda: client.get("/health").json()["replica"]["running"] == 0, 60, poll_s=0.5)


def assert_chat_answers(base: str, question: str, expected: str) -> None:
    """A plain and a streamed chat answer both contain ``expected``."""
    message = {"role": "user", "content": question}
    r = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": [message], "temperature": 0})
    assert r.status_code == 200
    assert expected in r.json()["choices"][0]["message"]["content"]
    r = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": [message], "temperature": 0, "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert expected in text
    assert len(events) > 3  # streamed in several chunks


def test_serve_run_with_the_shipped_config_answers_paris(demo_checkpoint, tmp_path):
    with serve_run("serve_config.yaml", tmp_path) as base:
        assert_chat_answers(base, FRANCE["content"], "Paris")
        # The prompt cache holds this chat from the requests above, and the logits that
        # followed it: all of it comes from there, and the answer repeats.
        ask = {"model": MODEL, "messages": [FRANCE], "temperature": 0}
        answers = [httpx.post(f"{base}/v1/chat/completions", timeout=120, json=ask).json()
                   for _ in range(2)]
        for again in answers:
            usage = again["usage"]
            assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"]
            assert "Paris" in again["choices"][0]["message"]["content"]
        assert answers[0]["choices"] == answers[1]["choices"]
        # Short-first decoding (the default on the CPU): a short request next to a long one
        # runs on the leading rows of the batch while the long one sits out every other step.
        replica = httpx.get(f"{base}/health", timeout=30).json()["replica"]
        assert replica["short_first"] is True
        # /health reports the prompt cache: it holds this chat, within its bound.
        cache = replica["prompt_cache"]
        assert cache["entries"] >= 1 and 0 < cache["bytes"] <= cache["capacity_bytes"]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            long = pool.submit(httpx.post, f"{base}/v1/completions", timeout=120, json={
                "model": MODEL, "prompt": "Once upon a time", "max_tokens": 160,
                "ignore_eos": True, "temperature": 0})
            short = [httpx.post(f"{base}/v1/completions", timeout=120, json={
                "model": MODEL, "prompt": "The capital of France is", "max_tokens": 8,
                "temperature": 0}).json() for _ in range(3)]
            assert all("Paris" in s["choices"][0]["text"] for s in short), short
            assert long.result().json()["usage"]["completion_tokens"] == 160
        # An ~8k-token prompt that cannot be prefilled within its deadline (5 s: far less
        # than a CPU takes) ends in a clean 504 and frees its slot; past the context it is
        # a 400 naming the limit.
        with httpx.Client(base_url=base, timeout=120) as client:
            response, seconds = ask_8k(client, MODEL, timeout=5)
            assert response.status_code in (200, 504), response.text
            if response.status_code == 504:
                error = response.json()["error"]
                assert "deadline" in error["message"] and seconds < 30, (error, seconds)
            else:  # a host fast enough
                assert response.json()["usage"]["prompt_tokens"] > 7800
            assert_too_long_is_refused_naming_the_context(client, MODEL)
            wait_for_idle(client)


def test_serve_run_on_engine_llama_cpp_answers_concurrent_requests(gguf_checkpoint, tmp_path):
    pytest.importorskip("llama_cpp", reason="the llama-cpp extra (make test installs it)")
    with serve_run("serve_config.llama_cpp.yaml", tmp_path) as base:
        assert_chat_answers(base, "What is the capital of Germany?", "Berlin")
        health = httpx.get(f"{base}/health", timeout=30).json()
        assert health["replica"]["engine"] == "llama_cpp"
        assert health["replica"]["prompt_cache"] is None  # its slots, allocated up front

        def ask(i: int) -> str:
            body = ({"model": MODEL, "temperature": 0, "max_tokens": 16,
                     "messages": [{"role": "user", "content": "What is the capital of Germany?"}]}
                    if i % 2 == 0 else
                    {"model": MODEL, "prompt": "banana, banana, banana, banana,",
                     "max_tokens": 6, "temperature": 0})
            path = "/v1/chat/completions" if i % 2 == 0 else "/v1/completions"
            choice = httpx.post(f"{base}{path}", json=body, timeout=120).json()["choices"][0]
            return choice["message"]["content"] if i % 2 == 0 else choice["text"]

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, range(16)))
        # A slot holds this chat from the requests above: all but its last token is reused.
        again = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
            "model": MODEL, "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "user", "content": "What is the capital of Germany?"}]}).json()
        usage = again["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1
        assert again["choices"][0]["message"]["content"] == answers[0]
        samples = scrape(base)
        # The shipped config's 8192 cells per slot take an ~8k-token prompt within its
        # deadline; past the context it is a 400 naming the limit.
        with httpx.Client(base_url=base, timeout=330) as client:
            response, seconds = ask_8k(client, MODEL, timeout=300)
            assert response.status_code == 200, response.text
            usage = response.json()["usage"]
            assert usage["prompt_tokens"] > 7800 and usage["completion_tokens"] >= 1, usage
            print(f"\nllama_cpp: {usage['prompt_tokens']}-token prompt answered in "
                  f"{seconds:.1f} s")
            assert_too_long_is_refused_naming_the_context(client, MODEL)
            wait_for_idle(client)
    assert all("Berlin" in a for a in answers[0::2]), answers
    assert all("banana" in a and "Berlin" not in a for a in answers[1::2]), answers
    assert 0 < total(samples, "llm_prompt_cached_tokens_total") < total(
        samples, "llm_prompt_tokens_total")
