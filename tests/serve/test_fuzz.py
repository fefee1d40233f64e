"""Bad input over real HTTP never reaches the engine unchecked: a property-based fuzz of the
OpenAI routes (hypothesis), plus the issue's named cases, against the echo engine.

Every answer is a 2xx or a 4xx with OpenAI's error JSON; never a 5xx (a 504 only when the
body asked for a deadline too short to meet), and afterwards the same replica process is
still serving. The echo engine's context is small, so any accepted request is short.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from ray import serve

from deployments.errors import ServiceError
from tests.helpers import serve_app, sse_events

pytestmark = pytest.mark.timeout(240)

MODEL = "smollm2-135m-instruct"
CONTEXT_TOKENS = 256
ARGS = {"engine": "echo", "checkpoint_path": "/unused", "max_batch_size": 8,
        "engine_options": {"max_context_tokens": CONTEXT_TOKENS}, "default_max_tokens": 8,
        "request_timeout_s": 10, "max_request_timeout_s": 30, "max_request_body_bytes": 65536}
PATHS = ["/v1/completions", "/v1/chat/completions"]
FUZZ_SETTINGS = settings(max_examples=400, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve_app(ARGS, server_options={"max_ongoing_requests": 32}) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def replica_pid(client) -> int:
    return client.get("/health").json()["replica"]["pid"]


def check_answer(r: httpx.Response, body: Any) -> None:
    """The contract for any input: a well-formed success, or a 4xx OpenAI error."""
    if r.status_code == 200:
        if r.headers["content-type"].startswith("text/event-stream"):
            events = sse_events(r.text)
            assert events and events[-1] == "[DONE]", r.text[-300:]
            assert all("error" not in e for e in events[:-1]), r.text[-300:]
        else:
            assert r.json()["choices"], r.text
        return
    short_deadline = (isinstance(body, dict) and type(body.get("timeout")) in (int, float)
                      and body["timeout"] < 1)
    assert r.status_code < 500 or (r.status_code == 504 and short_deadline), (r.status_code,
                                                                              r.text)
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"], r.text
    assert isinstance(error["type"], str) and error["type"], r.text


def assert_still_serving(client: httpx.Client, replica_pid: int) -> None:
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["replica"]["pid"] == replica_pid
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "still alive",
                                              "max_tokens": 5})
    assert r.json()["choices"][0]["text"] == "alive"


# ---- the named cases -------------------------------------------------------------


def _completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "say hi", **fields}


NAMED_CASES: dict[str, tuple[str, bytes | dict[str, Any], int]] = {
    "invalid utf-8": ("/v1/completions", b'{"model": "\xff\xfe", "prompt": "a"}', 400),
    "not json": ("/v1/chat/completions", b"model=x&prompt=y", 400),
    "empty body": ("/v1/completions", b"", 400),
    "lone surrogate": ("/v1/completions", b'{"model": "m", "prompt": "\\udc80"}', 400),
    "nesting bomb": ("/v1/completions", b'{"prompt": ' + b"[" * 10000 + b"]" * 10000 + b"}",
                     400),
    "NaN literal": ("/v1/completions", b'{"model": "x", "prompt": "a", "temperature": NaN}', 400),
    "wrong type": ("/v1/completions", _completion(max_tokens="8"), 400),
    "float for int": ("/v1/completions", _completion(max_tokens=8.0), 400),
    "huge max_tokens": ("/v1/completions", _completion(max_tokens=10**400), 400),
    "huge timeout": ("/v1/completions", b'{"model": "%s", "prompt": "a", "timeout": 1e400}'
                     % MODEL.encode(), 400),
    "huge seed": ("/v1/completions", _completion(seed=2**64), 400),
    "huge min_tokens": ("/v1/completions", _completion(min_tokens=10**30), 200),
    "min_tokens over max_tokens": ("/v1/completions", _completion(min_tokens=10**30,
                                                                  max_tokens=2), 400),
    "empty prompt": ("/v1/completions", _completion(prompt=""), 400),
    "empty prompt in list": ("/v1/completions", _completion(prompt=["a", ""]), 400),
    "empty chat": ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400),
    "prompt beyond context": ("/v1/completions", _completion(prompt="y" * CONTEXT_TOKENS), 400),
    "prompt and answer beyond context": ("/v1/completions",
                                         _completion(prompt="y" * 200, max_tokens=100), 400),
    "token ids beyond context": ("/v1/completions", _completion(prompt=[65] * 300), 400),
    "negative token id": ("/v1/completions", _completion(prompt=[72, -1]), 400),
    "token id beyond int32": ("/v1/completions", _completion(prompt=[2**31]), 400),
    "too many prompts": ("/v1/completions", _completion(prompt=["a"] * 17), 400),
    "too many stop strings": ("/v1/completions", _completion(stop=["s"] * 9), 400),
    "overlong stop string": ("/v1/completions", _completion(stop=["s" * 257]), 400),
    "too many choices": ("/v1/completions", _completion(n=17), 400),
    # the tool definitions' system prompt alone outgrows this app's 256-token context
    "tools beyond the context": ("/v1/chat/completions",
                          {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                           "tools": [{"type": "function", "function": {"name": "f"}}]}, 400),
    "image part": ("/v1/chat/completions",
                   {"model": MODEL, "messages": [{"role": "user", "content": [
                       {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400),
    "tool role": ("/v1/chat/completions",
                  {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400),
    "timeout above cap": ("/v1/completions", _completion(timeout=31), 400),
    "unknown model": ("/v1/completions", _completion(model="gpt-4"), 404),
    "body too large": ("/v1/completions", _completion(prompt="z" * 70000), 413),
}


@pytest.mark.parametrize("case", list(NAMED_CASES))
def test_named_bad_inputs_get_openai_4xx(client, case):
    path, body, status = NAMED_CASES[case]
    for stream in (False, True):
        if isinstance(body, dict):
            content = json.dumps({**body, "stream": stream}).encode()
        elif stream:
            continue
        else:
            content = body
        r = client.post(path, content=content, headers={"content-type": "application/json"})
        assert r.status_code == status, (case, stream, r.text[:300])
        check_answer(r, body)


def test_named_bad_inputs_left_the_replica_serving(client, replica_pid):
    assert_still_serving(client, replica_pid)


# ---- property-based fuzz over HTTP --------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers()
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=10)
# Token ids anywhere in the int32 range: the replica refuses those outside the engine's
# vocabulary with a 400 (the echo engine's vocabulary ends below the surrogates, 0xD800).
token_ids = st.lists(st.integers(0x20, 0xD7FF) | st.integers(0, 2**31 - 1), min_size=1,
                     max_size=40)
texts = st.text(min_size=1, max_size=40)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer"]),
     "content": texts | st.lists(st.fixed_dictionaries(
         {"type": st.just("text"), "text": st.text(max_size=10)}), min_size=1, max_size=3)},
    optional={"name": st.text(max_size=5)}), min_size=1, max_size=3)
# Per field: values a client may well send, then values it should not.
FIELD_VALUES: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "model": (st.just(MODEL), st.text(max_size=10) | json_values),
    "prompt": (texts | st.lists(texts, min_size=1, max_size=4) | token_ids
               | st.lists(token_ids, min_size=1, max_size=3),
               st.just("") | st.lists(texts, min_size=17, max_size=20)
               | st.lists(st.integers(), max_size=5) | json_values),
    "messages": (messages, st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["tool", "bot", "user"]), "content": json_values}), max_size=3)
        | json_values),
    "max_tokens": (st.integers(1, 40), st.integers(max_value=0) | st.integers(300)
                   | json_values),
    "max_completion_tokens": (st.integers(1, 40), st.integers(max_value=0) | json_values),
    "temperature": (st.floats(0, 2), st.floats(2.001) | st.floats(max_value=-0.001)
                    | json_values),
    "top_p": (st.floats(0.01, 1), st.floats(max_value=0) | json_values),
    "seed": (st.integers(0, 2**63 - 1), st.integers(max_value=-1) | st.integers(2**63)
             | json_values),
    "stop": (st.text(min_size=1, max_size=3) | st.lists(st.text(max_size=3), max_size=8),
             st.lists(st.text(max_size=3), min_size=9, max_size=12) | json_values),
    "stream": (st.booleans(), json_values),
    "stream_options": (st.fixed_dictionaries({"include_usage": st.booleans()}), json_values),
    "timeout": (st.floats(0.5, 30), st.floats(30.001) | st.floats(max_value=0) | json_values),
    "min_tokens": (st.integers(0, 50), st.integers(max_value=-1) | json_values),
    "ignore_eos": (st.booleans(), json_values),
    "n": (st.just(1), st.integers(2, 5) | json_values),
    "logprobs": (st.sampled_from([None, False, 0]), st.sampled_from([True, 3]) | json_values),
    "tools": (st.just([]), json_values),
    "user": (st.text(max_size=5), json_values),
}


@st.composite
def request_bodies(draw: st.DrawFn) -> tuple[str, Any]:
    """A path and a body: mostly plausible OpenAI JSON, each field bad now and then (so most
    requests reach the engine with unusual but valid values), sometimes arbitrary JSON,
    sometimes bytes that are not JSON at all."""
    path = draw(st.sampled_from(PATHS))
    kind = draw(st.sampled_from(["fields"] * 8 + ["json", "bytes"]))
    if kind == "bytes":
        return path, draw(st.binary(max_size=100))
    if kind == "json":
        return path, draw(json_values)

    def value(name: str) -> Any:
        good, bad = FIELD_VALUES[name]
        return draw(bad if draw(st.integers(0, 19)) == 0 else good)

    required = ["model", "prompt" if path == "/v1/completions" else "messages"]
    body = {name: value(name) for name in required if draw(st.integers(0, 19)) > 0}
    for name in draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), max_size=6)):
        body[name] = value(name)
    body.update(draw(st.dictionaries(st.text(max_size=6), json_values, max_size=2)))
    return path, body


@FUZZ_SETTINGS
@given(request=request_bodies(), ascii_only=st.booleans(),
       content_type=st.sampled_from(["application/json", "text/plain", None]))
def test_fuzzed_http_requests_get_2xx_or_openai_4xx(client, request, ascii_only, content_type):
    path, body = request
    content = body if isinstance(body, bytes) else json.dumps(
        body, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    headers = {"content-type": content_type} if content_type else {}
    r = client.post(path, content=content, headers=headers)
    event(f"HTTP {r.status_code}")
    check_answer(r, body)


@settings(FUZZ_SETTINGS, max_examples=100)
@given(request=request_bodies())
def test_fuzzed_handle_calls_answer_or_raise_a_4xx_service_error(base_url, request):
    path, body = request
    router = serve.get_app_handle("llm")
    method = router.completions if path == "/v1/completions" else router.chat_completions
    try:
        assert method.remote(body).result(timeout_s=60)["choices"]
    except Exception as raised:
        error = ServiceError.from_exception(raised)
        assert error is not None, raised
        short_deadline = isinstance(body, dict) and type(body.get("timeout")) in (int, float) \
            and body["timeout"] < 1
        assert error.status_code < 500 or (error.status_code == 504 and short_deadline), error


def test_after_the_fuzz_the_same_replica_is_serving(client, replica_pid):
    assert_still_serving(client, replica_pid)
