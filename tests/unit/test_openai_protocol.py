"""Request parsing and error shapes of the OpenAI protocol, without Ray.

The property tests state the contract the router relies on: whatever the body (any bytes,
any JSON, any Python object a handle caller passes), ``parse_request`` returns a request or
raises a ``ServiceError`` 400; nothing else escapes, so no input becomes a 500.
"""

from __future__ import annotations

import json
import logging
import pickle
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployments.contract import OutputChunk
from deployments.errors import ServiceError
from deployments.openai_protocol import (
    MAX_SEED,
    MAX_TOKEN_ID,
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    completion_response,
    parse_request,
    usage,
    usage_chunk,
)

MODEL = "m"
PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, database=None,
                             suppress_health_check=[HealthCheck.too_slow])


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hello", **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


def refused(model: type, body: Any) -> ServiceError:
    with pytest.raises(ServiceError) as raised:
        parse_request(model, body)
    assert raised.value.status_code == 400
    return raised.value


# ---- what is accepted ----------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "prompts"), [
    ("text", ["text"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1], [2, 3]], [[1], [2, 3]]),
    ([0, MAX_TOKEN_ID], [[0, MAX_TOKEN_ID]]),
])
def test_the_four_prompt_forms(prompt, prompts):
    assert parse_request(CompletionRequest, completion(prompt=prompt)).prompts == prompts


def test_json_bytes_and_dicts_parse_alike():
    body = completion(max_tokens=5, temperature=0, stop=["\n"], seed=3, timeout=2.5)
    from_bytes = parse_request(CompletionRequest, json.dumps(body).encode())
    assert from_bytes == parse_request(CompletionRequest, body)
    assert (from_bytes.max_tokens, from_bytes.stop_strings, from_bytes.timeout) == (5, ("\n",),
                                                                                    2.5)


def test_integers_are_accepted_where_floats_go():
    request = parse_request(CompletionRequest, completion(temperature=1, top_p=1, timeout=3))
    assert (request.temperature, request.top_p, request.timeout) == (1, 1, 3)


def test_unsupported_fields_at_their_neutral_value_are_accepted():
    neutral = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "presence_penalty": 0,
               "frequency_penalty": 0.0, "logit_bias": {}, "suffix": "",
               "response_format": {"type": "text"}, "tools": [], "tool_choice": "none"}
    assert parse_request(CompletionRequest, completion(**neutral)).prompt == "hello"


def test_vllm_extensions_at_their_neutral_value_are_accepted():
    neutral = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1, "skip_special_tokens": True,
               "stop_token_ids": [], "include_stop_str_in_output": False}
    assert parse_request(CompletionRequest, completion(**neutral)).top_k == -1
    assert parse_request(CompletionRequest, completion(top_k=5)).top_k == 5


@pytest.mark.parametrize("field", ["temperature", "top_p", "n", "presence_penalty",
                                   "frequency_penalty", "stream", "ignore_eos", "min_tokens",
                                   "top_k", "max_tokens", "stop", "seed", "logprobs", "tools",
                                   "stream_options", "repetition_penalty"])
def test_null_in_an_optional_field_means_its_default(field):
    for body in (completion(**{field: None}), json.dumps(completion(**{field: None})).encode()):
        assert parse_request(CompletionRequest, body) == parse_request(CompletionRequest,
                                                                       completion())
    chat_body = chat(**{field: None, "max_completion_tokens": None})
    assert parse_request(ChatCompletionRequest, chat_body) == parse_request(
        ChatCompletionRequest, chat())


@pytest.mark.parametrize(("model", "body"), [
    (CompletionRequest, completion(min_tokens=6, max_tokens=5)),
    (ChatCompletionRequest, chat(min_tokens=6, max_tokens=50, max_completion_tokens=5)),
])
def test_min_tokens_above_the_maximum_is_refused(model, body):
    assert refused(model, body).param == "min_tokens"


def test_min_tokens_up_to_the_maximum_or_without_one_is_accepted():
    assert parse_request(CompletionRequest, completion(min_tokens=5, max_tokens=5))
    assert parse_request(ChatCompletionRequest, chat(min_tokens=500)).min_tokens == 500


def test_unknown_fields_are_ignored():
    assert parse_request(ChatCompletionRequest, chat(some_future_field={"x": [1]}))


def test_chat_specifics():
    request = parse_request(ChatCompletionRequest, chat(
        messages=[{"role": "developer", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "a"},
                                               {"type": "text", "text": "b"}]}],
        max_tokens=9, max_completion_tokens=4, stream=True,
        stream_options={"include_usage": True}))
    assert [(t.role, t.content) for t in request.chat_turns()] == [("system", "be brief"),
                                                                    ("user", "ab")]
    assert request.requested_max_tokens == 4  # max_completion_tokens wins
    assert request.include_usage


# ---- what is refused, and how -----------------------------------------------------------


@pytest.mark.parametrize(("raw", "says"), [
    (b"\xff\xfe{}", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"{\"model\": \"m\", \"prompt\": \"a\"", "not valid JSON"),  # truncated
    (b"{\"model\": \"m\", \"prompt\": \"\\ud800\"}", "not valid JSON"),  # lone surrogate
    (b"[" * 5000 + b"]" * 5000, ""),  # nesting bomb
    (b"[]", ""),
    (b"null", ""),
    (b"\"text\"", ""),
])
def test_bodies_that_are_not_a_json_object(raw, says):
    assert says in refused(CompletionRequest, raw).message


@pytest.mark.parametrize(("fields", "param"), [
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 5.0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": "0.5"}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"seed": MAX_SEED + 1}, "seed"),
    ({"stream": "yes"}, "stream"),
    ({"stop": [1]}, "stop"),
    ({"timeout": 0}, "timeout"),
    ({"timeout": True}, "timeout"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"model": 7}, "model"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"best_of": 3}, "best_of"),
    ({"logprobs": 21}, "logprobs"),
    ({"tools": [{"type": "function"}]}, "tools"),  # a chat field
    ({"echo": "yes"}, "echo"),
    ({"echo": True, "logprobs": 1}, "echo"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"guided_regex": "a(", "max_tokens": 3}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"guided_regex": "a", "ignore_eos": True}, "ignore_eos"),
    ({"n": True}, "n"),  # JSON true is not 1
    ({"presence_penalty": False}, "presence_penalty"),
    ({"logprobs": True}, "logprobs"),
    ({"top_k": True}, "top_k"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"guided_json": {"type": "array", "uniqueItems": True}}, "guided_json"),
    ({"skip_special_tokens": False}, "skip_special_tokens"),
])
def test_wrong_types_and_values_name_the_field(fields, param):
    error = refused(CompletionRequest, completion(**fields))
    assert error.param is not None and error.param.split(".")[0] == param
    assert error.message.startswith(error.param) or f"`{param}`" in error.message
    assert "[" not in error.param  # no pydantic union tags such as `list[str]`


@pytest.mark.parametrize(("prompt", "says"), [
    ("", "must not be empty"), ([], "must not be empty"), ([[]], "must not be empty"),
    (["a", ""], "must not be empty"),
    ([-1], "prompt.0: Input should be greater than or equal to 0"),
    ([MAX_TOKEN_ID + 1], "prompt.0: Input should be less than or equal to"),
    ([[1], [-5]], "prompt.1.0: Input should be greater than or equal to 0"),
    ([1.5], "prompt.0"), ([True], "prompt.0"), ({"text": "a"}, "prompt"), (None, "prompt"),
])
def test_bad_prompts(prompt, says):
    error = refused(CompletionRequest, completion(prompt=prompt))
    assert says in error.message
    assert (error.param or "").split(".")[0] == "prompt"


@pytest.mark.parametrize("messages", [
    [], None, "hi", [{"role": "tool", "content": "x"}], [{"role": "user"}],
    [{"role": "user", "content": 5}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
])
def test_bad_chat_messages(messages):
    error = refused(ChatCompletionRequest, chat(messages=messages))
    assert "messages" in (error.param or "")


def test_json_extensions_are_refused_or_caught_by_range_checks():
    # Python's json writes NaN and Infinity; the parser refuses them or a range check does.
    for raw in (b'{"model": "m", "prompt": "a", "temperature": NaN}',
                b'{"model": "m", "prompt": "a", "top_p": -Infinity}'):
        refused(CompletionRequest, raw)
    huge = parse_request(CompletionRequest, b'{"model": "m", "prompt": "a", "timeout": 1e400}')
    assert huge.timeout == float("inf")  # the router's cap refuses it (max_request_timeout_s)


# ---- error objects -----------------------------------------------------------------------


def test_service_errors_are_openai_json_and_survive_pickling():
    error = ServiceError("busy", 503, param="x", retry_after_s=1, code="c")
    assert error.to_dict() == {"error": {"message": "busy", "type": "service_unavailable_error",
                                         "param": "x", "code": "c"}}
    assert error.headers() == {"Retry-After": "1"} and error.retriable
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.message, copy.status_code, copy.param, copy.retry_after_s, copy.code) == \
        ("busy", 503, "x", 1, "c")


def test_service_errors_are_found_inside_wrappers():
    class Wrapper(Exception):
        def __init__(self, cause: BaseException):
            super().__init__("wrapped")
            self.cause = cause

    inner = ServiceError("bad", 400, param="p")
    try:
        raise RuntimeError("outer") from Wrapper(inner)
    except RuntimeError as raised:
        found = ServiceError.from_exception(raised)
    assert found is not None and (found.message, found.param) == ("bad", "p")
    assert ServiceError.from_exception(RuntimeError("nothing inside")) is None


def answer(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> OutputChunk:
    return OutputChunk(text="", finish_reason="stop", prompt_tokens=prompt_tokens,
                       completion_tokens=completion_tokens, cached_tokens=cached_tokens)


def test_response_shapes():
    body = completion_response("id", MODEL, [{"index": 0, "text": "x"}], usage(answer(3, 4)))
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    summed = usage(answer(30, 5, cached_tokens=29), answer(10, 7))
    assert summed == {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52,
                      "prompt_tokens_details": {"cached_tokens": 29}}
    # n = 2 choices of one prompt: the prompt counts once
    assert usage(answer(30, 5), answer(30, 7), choices_per_prompt=2)["prompt_tokens"] == 30
    chunk = chat_chunk("id", MODEL, 1, {"content": "x"}, None)
    assert chunk["object"] == "chat.completion.chunk" and chunk["choices"][0]["index"] == 1
    assert usage_chunk("id", MODEL, "text_completion", usage(answer(1, 2)))["choices"] == []


# ---- properties --------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.floats(
    allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)
python_values = st.recursive(
    json_scalars | st.floats() | st.binary(max_size=8) | st.just(object()),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner) | st.frozensets(
        st.integers(), max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
          "top_p", "seed", "stop", "stream", "stream_options", "timeout", "min_tokens",
          "ignore_eos", "n", "logprobs", "tools", "user"]


def mutated_bodies(values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A valid body with some fields replaced, added or dropped."""
    valid = st.sampled_from([completion(), chat(), completion(prompt=[1, 2]),
                             chat(messages=[{"role": "user", "content": [
                                 {"type": "text", "text": "x"}]}])])
    changes = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), values, max_size=4)
    drops = st.sets(st.sampled_from(FIELDS), max_size=2)
    return st.builds(lambda body, change, drop: {k: v for k, v in {**body, **change}.items()
                                                 if k not in drop}, valid, changes, drops)


def parses_or_400(model: type, body: Any) -> None:
    try:
        parse_request(model, body)
    except ServiceError as error:
        assert error.status_code == 400
        assert error.message and error.to_dict()["error"]["type"] == "invalid_request_error"


@PROPERTY_SETTINGS
@given(raw=st.binary(max_size=200) | mutated_bodies(json_values).map(
    lambda body: json.dumps(body).encode()),
       model=st.sampled_from([CompletionRequest, ChatCompletionRequest]))
def test_any_bytes_parse_or_are_a_400(raw, model):
    parses_or_400(model, raw)


@PROPERTY_SETTINGS
@given(raw=mutated_bodies(json_values).map(json.dumps), cut=st.integers(min_value=0),
       model=st.sampled_from([CompletionRequest, ChatCompletionRequest]))
def test_truncated_json_is_a_400(raw, cut, model):
    truncated = raw[:cut % max(len(raw), 1)].encode()
    parses_or_400(model, truncated)


@PROPERTY_SETTINGS
@given(body=mutated_bodies(python_values) | python_values,
       model=st.sampled_from([CompletionRequest, ChatCompletionRequest]))
def test_any_python_object_from_a_handle_caller_parses_or_is_a_400(body, model):
    parses_or_400(model, body)


def _failed_request_record(error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except BaseException:
        return logging.getLogger("ray.serve").makeRecord(
            "ray.serve", logging.ERROR, __file__, 1, "Request failed.", (), sys.exc_info())


@pytest.mark.parametrize(("error", "logged_as"), [
    (ServiceError("max_tokens must be positive", 400, param="max_tokens"),
     "INFO Request answered 400: max_tokens must be positive"),
    (ServiceError("at capacity", 503, retry_after_s=1), "WARNING Request answered 503: "
     "at capacity"),
])
def test_a_service_error_raised_for_a_handle_caller_is_one_line(error, logged_as):
    from deployments.ingress import CallerErrorLogFilter

    record = _failed_request_record(error)
    assert CallerErrorLogFilter().filter(record)
    assert f"{record.levelname} {record.getMessage()}" == logged_as
    assert record.exc_info is None  # no traceback


@pytest.mark.parametrize("error", [ServiceError("internal error: KeyError", 500),
                                   RuntimeError("a bug")])
def test_a_real_failure_keeps_its_error_and_traceback(error):
    from deployments.ingress import CallerErrorLogFilter

    record = _failed_request_record(error)
    assert CallerErrorLogFilter().filter(record)
    assert record.levelno == logging.ERROR and record.exc_info[1] is error
