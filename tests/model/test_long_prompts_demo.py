"""A long prompt on the demo model over HTTP: a client that hangs up during its chunked
prefill frees its slot at once. (The ~8k-token prompts on each engine's shipped config are
in test_serve_demo.py, beside that config's other checks.)"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.helpers import long_prompt, serve_app, server_stats, wait_until

pytestmark = pytest.mark.model

MODEL = "smollm2-135m-instruct"


@pytest.mark.timeout(300)
def test_a_client_that_hangs_up_during_chunked_prefill_frees_its_slot(demo_checkpoint):
    chunk = 64
    args = {"checkpoint_path": str(demo_checkpoint), "max_batch_size": 1,
            "max_prefill_tokens_per_step": chunk, "request_timeout_s": 240,
            "engine_options": {"prompt_cache": False}}
    with serve_app(args) as url, httpx.Client(base_url=url, timeout=240) as client:
        prompt = long_prompt(client, MODEL, 40 * chunk)  # 40 chunks: seconds of prefill
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
            wait_until(lambda: server_stats()["running"] == 1, 60)
            time.sleep(2 * step_s)  # a few chunks in
            assert server_stats()["running"] == 1  # still prefilling
        freed_s = wait_until(lambda: server_stats()["running"] == 0, 60)
        answer = client.post("/v1/completions", json={
            "model": MODEL, "prompt": "Paris is the capital of", "max_tokens": 4}).json()
        assert answer["choices"][0]["finish_reason"] == "length", answer
        print(f"\nslot freed {freed_s:.2f} s after the hang-up; a chunk's step {step_s:.2f} s")
        # 30+ chunks were left: the slot came free long before the prefill would have ended.
        assert freed_s < 10 * step_s + 2
