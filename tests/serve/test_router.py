"""The router and the replicas over real Ray Serve, with the model-free echo engine."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest
from ray import serve

from deployments.contract import TokenizeRequest
from deployments.errors import ServiceError
from deployments.openai_protocol import ChatCompletionRequest, CompletionRequest
from tests.helpers import serve_app, server_stats, sse_events

MODEL = "smollm2-135m-instruct"
KV_BUDGET = 3000  # KV positions of the echo replica (its context: 4096)


@pytest.fixture(scope="module")
def base_url():
    args = {"engine": "echo", "checkpoint_path": "/unused", "max_batch_size": 16,
            "engine_options": {"step_delay_s": 0.01, "max_kv_tokens": KV_BUDGET}}
    with serve_app(args, server_options={"max_ongoing_requests": 128}) as url:
        yield url


@pytest.fixture
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


def test_completion_has_openai_shape_and_usage(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "say hello",
                                              "max_tokens": 7})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "hellohe"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16,
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_several_prompts_give_one_choice_each(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ["a one", "b two"],
                                              "max_tokens": 3})
    assert [c["text"] for c in r.json()["choices"]] == ["one", "two"]
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]


def test_chat_stream_is_openai_sse_with_role_first_usage_and_done(client):
    r = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi there"}],
        "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "there\n"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [f["choices"][0]["finish_reason"] for f in finals] == ["length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


def test_completion_stream_text_matches_non_streamed(client):
    body = {"model": MODEL, "prompt": "x abcdefghij", "max_tokens": 10}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    r = client.post("/v1/completions", json={**body, "stream": True})
    events = sse_events(r.text)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == whole


def test_stop_strings_end_the_answer_without_the_stop_text(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x abcdef",
                                              "max_tokens": 20, "stop": ["de"]})
    choice = r.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("abc", "stop")


def test_concurrent_requests_are_batched_and_never_cross_talk(client):
    def ask(i: int) -> tuple[int, str]:
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": f"id w{i:03d}",
                                                  "max_tokens": 12})
        assert r.status_code == 200, r.text
        return i, r.json()["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(ask, range(64)))
    for i, text in answers:
        assert text == (f"w{i:03d}" * 3)[:12]
    assert server_stats()["max_batch_size_seen"] > 1


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "nope", "prompt": "a"}, 404, "model"),
    ({"model": MODEL, "prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "a", "temperature": 3}, 400, "temperature"),
    ({"model": MODEL, "prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt"),
    ({"model": MODEL, "prompt": "a", "n": True}, 400, "n"),
    ({"model": MODEL, "prompt": "a", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"model": MODEL, "prompt": "a", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
    ({"model": MODEL, "prompt": "a", "n": 17}, 400, "n"),
    ({"model": MODEL, "prompt": "a", "logprobs": 21}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "a", "suffix": "b"}, 400, "suffix"),
    ({"model": MODEL, "prompt": "a", "stop": ["s"] * 9}, 400, "stop"),
    ({"model": MODEL, "prompt": "a", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "y" * 5000, "max_tokens": 1}, 400, "prompt"),
    ({"model": MODEL, "prompt": "a", "timeout": 10**6}, 400, "timeout"),
    ({"prompt": "a"}, 400, "model"),
])
def test_bad_requests_get_openai_errors(client, body, status, param):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    assert error["param"] == param


def test_unknown_fields_are_ignored(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x ab", "max_tokens": 2,
                                              "some_future_field": {"x": 1}})
    assert r.status_code == 200


@pytest.mark.parametrize("raw", [b"\xff\xfe\x00", b"{not json", b"[]", b'"text"'])
def test_malformed_bodies_are_400(client, raw):
    r = client.post("/v1/chat/completions", content=raw,
                    headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_oversize_body_is_413(client):
    r = client.post("/v1/completions", content=b" " * 2_000_000,
                    headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_unknown_route_is_openai_404(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404
    assert "error" in r.json()


def test_a_request_larger_than_the_replicas_kv_budget_is_a_400(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x abc",
                                              "max_tokens": KV_BUDGET})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "max_tokens" and "KV cache" in error["message"]
    fits = client.post("/v1/completions", json={"model": MODEL, "prompt": "x abc",
                                                 "max_tokens": KV_BUDGET - 10})
    assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] == KV_BUDGET - 10


def test_health_and_models(client):
    health = client.get("/health").json()
    assert health["status"] == "ok"
    assert health["replica"]["kv_cache_positions"] == KV_BUDGET
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
    card = client.get(f"/v1/models/{MODEL}")
    assert card.status_code == 200 and card.json() == client.get("/v1/models").json()["data"][0]
    other = client.get("/v1/models/org/other-model")
    assert other.status_code == 404
    assert (other.json()["error"]["code"], other.json()["error"]["param"]) == (
        "model_not_found", "model")


def test_null_means_the_default_and_top_k_and_min_tokens_reach_the_engine(client):
    base = {"model": MODEL, "prompt": "x abcabcabc", "max_tokens": 6}
    nulls = {k: None for k in ("temperature", "top_p", "n", "presence_penalty", "stream",
                               "ignore_eos", "min_tokens", "top_k", "seed", "stop")}
    plain = client.post("/v1/completions", json=base)
    with_nulls = client.post("/v1/completions", json={**base, **nulls})
    assert with_nulls.status_code == 200, with_nulls.text
    assert with_nulls.json()["choices"] == plain.json()["choices"]
    # Stop strings count from min_tokens on: "ab" ends at tokens 2 and 5.
    r = client.post("/v1/completions", json={**base, "stop": "ab", "min_tokens": 4,
                                              "top_k": 1, "temperature": 1.0})
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    assert (choice["text"], choice["finish_reason"], usage["completion_tokens"]) == (
        "abc", "stop", 5)


def test_handle_callers_use_the_same_validation(base_url):
    handle = serve.get_app_handle("llm")
    ok = handle.completions.remote({"model": MODEL, "prompt": "x hey", "max_tokens": 3})
    assert ok.result()["choices"][0]["text"] == "hey"
    with pytest.raises(Exception) as raised:
        handle.completions.remote({"model": MODEL, "prompt": "x", "max_tokens": 0}).result()
    error = ServiceError.from_exception(raised.value)
    assert error is not None and error.status_code == 400 and error.param == "max_tokens"


def test_handle_callers_may_send_the_request_models_themselves(base_url):
    handle = serve.get_app_handle("llm")
    request = CompletionRequest(model=MODEL, prompt="x yo", max_tokens=4)
    assert handle.completions.remote(request).result()["choices"][0]["text"] == "yoyo"
    chat = ChatCompletionRequest.model_validate(
        {"model": "other-model", "messages": [{"role": "user", "content": "x hi"}]})
    with pytest.raises(Exception) as raised:  # the router's limits apply to models too
        handle.chat_completions.remote(chat).result()
    error = ServiceError.from_exception(raised.value)
    assert error is not None and error.status_code == 404 and error.param == "model"


def test_tokenize_splits_a_prompt_or_a_chat_and_refuses_bad_bodies(base_url):
    handle = serve.get_app_handle("llm")
    tokens = handle.tokenize.remote(TokenizeRequest(prompt="hé")).result()
    assert tokens == {"tokens": [ord("h"), ord("é")], "count": 2, "max_model_len": 4096,
                      "token_strs": None}
    chat = handle.tokenize.remote({"messages": [{"role": "user", "content": "hi"}]}).result()
    assert chat["tokens"] == [ord(c) for c in "user: hi\nassistant:"]
    for body, field in (({"prompt": 3}, "prompt"), ({}, None),
                        ({"prompt": "a", "messages": []}, None)):
        with pytest.raises(Exception) as raised:
            handle.tokenize.remote(body).result()
        error = ServiceError.from_exception(raised.value)
        assert error is not None and error.status_code == 400, body
        assert field is None or error.param == field


def test_handle_streaming_yields_chunks(base_url):
    handle = serve.get_app_handle("llm").options(stream=True)
    chunks = list(handle.chat_completions_stream.remote(
        {"model": MODEL, "messages": [{"role": "user", "content": "go abc"}], "max_tokens": 4}))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "abc\n"


def test_a_streamed_batch_with_one_refused_prompt_is_a_400_before_any_text(client):
    """The replica refuses the second prompt's token ids: nothing of the first answer may be
    sent under a 200 before that (found by the fuzzer: an error event mid-stream; the order
    in which replies arrive is forced in tests/unit/test_ingress_streams.py)."""
    r = client.post("/v1/completions", json={
        "model": MODEL, "prompt": [[32, 65, 66], [65, 0x10FFFF]], "max_tokens": 8,
        "stream": True})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt"
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": [[32, 65], [32, 66]],
                                              "max_tokens": 2, "stream": True})
    texts = {e["choices"][0]["index"]: e["choices"][0]["text"]
             for e in sse_events(r.text)[:-1] if e["choices"]}
    assert r.status_code == 200 and sorted(texts) == [0, 1]


def test_token_ids_outside_the_vocabulary_are_400_and_the_replica_survives(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": [65, 0x10FFFF],
                                              "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": [32, 65, 66],
                                              "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "AB"


def test_streamed_chunks_share_the_replicas_chunk_budget(base_url):
    """8 answers streaming at once from a replica with the default budget (40 chunks/s):
    each gets a chunk at most every 0.2 s, so a 40-token answer made in ~0.4-0.8 s arrives in
    a handful of chunks (per-token chunks would be 40), all of its text intact."""
    body = {"model": MODEL, "prompt": "x " + "abcdefghij" * 4, "max_tokens": 40}
    with httpx.Client(base_url=base_url, timeout=60) as c:
        whole = c.post("/v1/completions", json=body).json()["choices"][0]["text"]

    def stream() -> list[str]:
        with httpx.Client(base_url=base_url, timeout=60) as c:
            r = c.post("/v1/completions", json={**body, "stream": True})
        return [e["choices"][0]["text"] for e in sse_events(r.text)[:-1] if e["choices"]]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        streams = list(pool.map(lambda _: stream(), range(8)))
    assert all("".join(chunks) == whole for chunks in streams)
    assert len(whole) == 40
    text_chunks = [len([t for t in chunks if t]) for chunks in streams]
    assert max(text_chunks) <= 12, text_chunks
