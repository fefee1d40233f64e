"""Long prompts on the demo model over HTTP: a client that hangs up during a chunked
prefill frees its slot at once, and an ~8k-token prompt (the model's context is 8192) is
answered by each engine's shipped config, or refused clearly (400 naming the limit, or 504
at the deadline; never a 500 or a hang)."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.helpers import serve_app, serve_run, server_stats

pytestmark = pytest.mark.model

MODEL = "smollm2-135m-instruct"
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank today. "


def long_prompt(client: httpx.Client, tokens: int) -> str:
    """A prompt of about ``tokens`` tokens of this model (within 1%)."""
    def count(text: str) -> int:
        return client.post("/tokenize", json={"model": MODEL, "prompt": text}).json()["count"]

    # Repeats merge at their seams (". The"): count a repeat inside the text, not alone.
    per_repeat = (count(SENTENCE * 11) - count(SENTENCE)) / 10
    prompt = SENTENCE * round(tokens / per_repeat)
    assert abs(count(prompt) - tokens) < tokens / 100
    return prompt


def wait_for(condition, timeout_s: float, poll_s: float = 0.05) -> float:
    """Seconds until ``condition()`` held; fails after ``timeout_s``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"not within {timeout_s} s"
        time.sleep(poll_s)
    return time.monotonic() - started


@pytest.mark.timeout(300)
def test_a_client_that_hangs_up_during_chunked_prefill_frees_its_slot(demo_checkpoint):
    chunk = 64
    args = {"checkpoint_path": str(demo_checkpoint), "max_batch_size": 1,
            "max_prefill_tokens_per_step": chunk, "request_timeout_s": 240,
            "engine_options": {"prompt_cache": False}}
    with serve_app(args) as url, httpx.Client(base_url=url, timeout=240) as client:
        prompt = long_prompt(client, 40 * chunk)  # 40 chunks: seconds of prefill
        # A step: one chunk (nothing decodes: the only slot is the long prompt's).
        started = time.monotonic()
        client.post("/v1/completions", json={"model": MODEL, "prompt": prompt[:len(prompt) // 40],
                                             "max_tokens": 1})
        step_s = time.monotonic() - started
        # A raw connection: the answer's headers wait for its first token, so an HTTP
        # client would block in the request; closing the socket is the hang-up.
        body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 8, "stream": True})
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n"
                          "Content-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
            wait_for(lambda: server_stats()["running"] == 1, 60)
            time.sleep(2 * step_s)  # a few chunks in
            assert server_stats()["running"] == 1  # still prefilling
        freed_s = wait_for(lambda: server_stats()["running"] == 0, 60)
        answer = client.post("/v1/completions", json={
            "model": MODEL, "prompt": "Paris is the capital of", "max_tokens": 4}).json()
        assert answer["choices"][0]["finish_reason"] == "length", answer
        print(f"\nslot freed {freed_s:.2f} s after the hang-up; a chunk's step {step_s:.2f} s")
        # 30+ chunks were left: the slot came free long before the prefill would have ended.
        assert freed_s < 10 * step_s + 2


def running(client: httpx.Client) -> int:
    return client.get("/health").json()["replica"]["running"]


def ask_8k(client: httpx.Client, **fields) -> tuple[httpx.Response, float]:
    """An ~7900-token completion (the context is 8192) and its seconds."""
    prompt = long_prompt(client, 7900)
    started = time.monotonic()
    response = client.post("/v1/completions", json={
        "model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, **fields})
    return response, time.monotonic() - started


def assert_too_long_is_refused_naming_the_context(client: httpx.Client) -> None:
    response = client.post("/v1/completions", json={
        "model": MODEL, "prompt": long_prompt(client, 8300), "max_tokens": 4})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "8192" in error["message"] and error["type"] == "invalid_request_error", error


@pytest.mark.timeout(600)
def test_llama_cpp_answers_an_8k_prompt_within_its_deadline(gguf_checkpoint, tmp_path):
    with serve_run("serve_config.llama_cpp.yaml", tmp_path) as base, \
            httpx.Client(base_url=base, timeout=330) as client:
        response, seconds = ask_8k(client, timeout=300)
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        assert usage["prompt_tokens"] > 7800 and usage["completion_tokens"] >= 1, usage
        reason = response.json()["choices"][0]["finish_reason"]
        print(f"\nllama_cpp: {usage['prompt_tokens']}-token prompt answered in {seconds:.1f} s "
              f"({usage['completion_tokens']} tokens, {reason})")
        assert_too_long_is_refused_naming_the_context(client)
        assert running(client) == 0


@pytest.mark.timeout(600)
def test_ipex_llm_answers_an_8k_prompt_or_ends_it_at_the_deadline(demo_checkpoint, tmp_path):
    """The shipped config's deadline (request_timeout_s) applies: on a fast host the
    answer comes, on a slow one a 504 in OpenAI's error shape, and the slot is freed."""
    with serve_run("serve_config.yaml", tmp_path) as base, \
            httpx.Client(base_url=base, timeout=300) as client:
        response, seconds = ask_8k(client)
        assert response.status_code in (200, 504), response.text
        if response.status_code == 200:
            usage = response.json()["usage"]
            assert usage["prompt_tokens"] > 7800 and usage["completion_tokens"] >= 1, usage
            print(f"\nipex_llm: {usage['prompt_tokens']}-token prompt answered in "
                  f"{seconds:.1f} s")
        else:
            error = response.json()["error"]
            assert "deadline" in error["message"], error
            print(f"\nipex_llm: the 8k prompt reached its deadline after {seconds:.1f} s")
        assert_too_long_is_refused_naming_the_context(client)
        wait_for(lambda: running(client) == 0, 60, poll_s=0.5)
