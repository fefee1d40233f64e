"""The Responses API's request parsing, response object and stream events, checked against
the OpenAI client's own models and parsers, offline (an httpx mock transport stands in for
the server), without Ray."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseErrorEvent,
    ResponseFailedEvent,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseStreamEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)
from pydantic import BaseModel, TypeAdapter

from deployments.contract import OutputChunk, Sampling
from deployments.errors import ServiceError
from deployments.openai_protocol import parse_request
from deployments.responses_api import (
    ResponseEvents,
    ResponsesRequest,
    new_message_id,
    new_response_id,
    response_object,
    responses_usage,
    sse,
    sse_event,
    status_of,
    usage_of,
)

MODEL = "m"
STREAM_EVENT = TypeAdapter(ResponseStreamEvent)
EVENT_MODELS = {
    "response.created": ResponseCreatedEvent,
    "response.in_progress": ResponseInProgressEvent,
    "response.output_item.added": ResponseOutputItemAddedEvent,
    "response.content_part.added": ResponseContentPartAddedEvent,
    "response.output_text.delta": ResponseTextDeltaEvent,
    "response.output_text.done": ResponseTextDoneEvent,
    "response.content_part.done": ResponseContentPartDoneEvent,
    "response.output_item.done": ResponseOutputItemDoneEvent,
    "response.completed": ResponseCompletedEvent,
    "response.incomplete": ResponseIncompleteEvent,
    "response.failed": ResponseFailedEvent,
    "error": ResponseErrorEvent,
}
STREAM_ORDER = ["response.created", "response.in_progress", "response.output_item.added",
                "response.content_part.added"]
STREAM_END = ["response.output_text.done", "response.content_part.done",
              "response.output_item.done"]


def body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "input": "hello", **fields}


def parse(**fields: Any) -> ResponsesRequest:
    return parse_request(ResponsesRequest, body(**fields))


def chunk(text: str, finish_reason: str | None = None, completion_tokens: int = 1,
          **fields: Any) -> OutputChunk:
    return OutputChunk(text=text, finish_reason=finish_reason, prompt_tokens=5,
                       completion_tokens=completion_tokens, **fields)


async def chunks_of(*chunks: OutputChunk | BaseException) -> AsyncIterator[OutputChunk]:
    for item in chunks:
        if isinstance(item, BaseException):
            raise item
        yield item


def collect(events: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    async def gather() -> list[dict[str, Any]]:
        return [event async for event in events]
    return asyncio.run(gather())


def checked(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events, each parsed by the OpenAI client's models (the union and its own)."""
    for event in events:
        assert STREAM_EVENT.validate_python(event).type == event["type"]
        EVENT_MODELS[event["type"]].model_validate(event)
        json.dumps(event)
    numbers = [event["sequence_number"] for event in events]
    assert numbers == list(range(len(events)))
    return events


# ---- requests ------------------------------------------------------------------------------

def test_a_text_input_is_one_user_message():
    request = parse()
    assert request.chat_messages() == [{"role": "user", "content": "hello"}]
    assert request.response_format() is None
    assert not request.stream and request.store


def test_instructions_become_a_leading_system_message():
    assert parse(instructions="be brief").chat_messages() == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]


def test_messages_in_every_form_openai_takes():
    request = parse(instructions="rules", input=[
        {"role": "developer", "content": "dev"},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
        # an earlier response's output item, sent back as it came
        {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "c", "annotations": [], "logprobs": []}]},
        {"role": "user", "content": "d"},
    ])
    assert request.chat_messages() == [
        {"role": "system", "content": "rules"}, {"role": "system", "content": "dev"},
        {"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d"}]


def test_null_means_the_default():
    request = parse(instructions=None, temperature=None, top_p=None, max_output_tokens=None,
                    text=None, metadata=None, tools=None, reasoning=None, store=None,
                    stream=None, previous_response_id=None)
    assert request.temperature == 1.0 and request.top_p == 1.0 and request.store
    assert request.response_format() is None
    assert parse(text={"format": None}).response_format() is None


def test_unused_values_of_unsupported_fields_are_accepted():
    parse(tools=[], tool_choice="auto", parallel_tool_calls=False, include=[], background=False,
          truncation="disabled", top_logprobs=0, service_tier="auto", reasoning={},
          store=False, text={"format": {"type": "text"}, "verbosity": "medium"},
          stream_options={"include_obfuscation": False}, user="u", safety_identifier="s",
          prompt_cache_key="k", metadata={"a": "b"}, some_future_field={"x": 1})


def test_json_schema_format_becomes_a_response_format():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    request = parse(text={"format": {"type": "json_schema", "name": "thing", "schema": schema,
                                     "strict": True, "description": "a thing"}})
    assert request.response_format() == {"type": "json_schema", "json_schema": {
        "name": "thing", "schema": schema, "strict": True, "description": "a thing"}}
    loose = parse(text={"format": {"type": "json_schema", "name": "t", "schema": schema}})
    assert loose.response_format() == {"type": "json_schema", "json_schema": {
        "name": "t", "schema": schema, "strict": False}}
    assert parse(text={"format": {"type": "json_object"}}).response_format() == {
        "type": "json_object"}


def test_raw_json_bytes_parse_as_the_dict_does():
    raw = json.dumps(body(temperature=0, max_output_tokens=7, stream=True)).encode()
    request = parse_request(ResponsesRequest, raw)
    assert request.temperature == 0 and request.max_output_tokens == 7 and request.stream


def test_the_router_reads_sampling_as_from_chat_requests():
    request = parse(temperature=0.5, top_p=0.9, max_output_tokens=12)
    assert request.sampling() == Sampling(temperature=0.5, top_p=0.9)
    assert request.requested_max_tokens == 12
    assert request.stop_strings == () and request.timeout is None
    assert (request.top_k, request.seed, request.ignore_eos, request.min_tokens) == (
        -1, None, False, 0)


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"background": True}, "background"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"truncation": "auto"}, "truncation"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"max_tool_calls": 2}, "max_tool_calls"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"parallel_tool_calls": 1}, "parallel_tool_calls"),  # JSON 1 is not true
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f",
                 "arguments": "{}"}]}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.0.content.0.type"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role"),
    ({"input": []}, "input"),
    ({"input": 3}, "input"),
    ({"input": None}, "input"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
    ({"text": {"format": {"type": "json_schema", "name": "a b", "schema": {}}}},
     "text.format.name"),
    ({"text": {"format": {"type": "grammar", "syntax": "lark"}}}, "text.format.type"),
    ({"text": {"format": {}}}, "text.format.type"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"),
    ({"temperature": 3}, "temperature"),
    ({"temperature": "1"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"stream": "true"}, "stream"),
    ({"store": 1}, "store"),
    ({"metadata": {"k": 1}}, "metadata.k"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"model": None}, "model"),
])
def test_what_is_not_served_is_a_400_naming_it(fields, param):
    with pytest.raises(ServiceError) as caught:
        parse(**fields)
    assert caught.value.status_code == 400
    assert caught.value.param == param
    assert caught.value.message


def test_a_missing_input_is_a_400():
    with pytest.raises(ServiceError) as caught:
        parse_request(ResponsesRequest, {"model": MODEL})
    assert caught.value.param == "input"


def test_the_request_the_openai_client_sends_parses():
    """Bodies built by the client itself: ``responses.create`` and ``responses.parse``."""
    sent: list[bytes] = []

    def handler(http_request: httpx.Request) -> httpx.Response:
        sent.append(http_request.content)
        request = parse_request(ResponsesRequest, http_request.content)
        return httpx.Response(200, json=response_object(
            request, new_response_id(), 1, text='{"name": "x", "size": 2}',
            finish_reason="stop", usage=responses_usage(4, 5)))

    class Thing(BaseModel):
        name: str
        size: int

    client = _client(handler)
    client.responses.create(model=MODEL, input=[{"role": "user", "content": "hi"}],
                            instructions="i", max_output_tokens=5, temperature=0.2,
                            metadata={"a": "b"}, store=False)
    parsed = client.responses.parse(model=MODEL, input="hi", text_format=Thing)
    assert parsed.output_parsed == Thing(name="x", size=2)
    request = parse_request(ResponsesRequest, sent[-1])
    assert request.response_format()["json_schema"]["name"] == "Thing"
    assert request.response_format()["json_schema"]["strict"] is True


# ---- the response object -------------------------------------------------------------------

def test_the_response_object_is_openais():
    request = parse(instructions="be brief", metadata={"k": "v"}, temperature=0.3,
                    max_output_tokens=9, text={"format": {"type": "json_schema", "name": "t",
                                                          "schema": {"type": "object"}}})
    usage = usage_of(chunk("", "stop", completion_tokens=4, cached_tokens=2))
    raw = response_object(request, "resp_1", 1700000000, text="Hi there", finish_reason="stop",
                          usage=usage, message_id="msg_1")
    response = Response.model_validate(raw)
    assert response.id == "resp_1" and response.object == "response"
    assert response.status == "completed" and response.incomplete_details is None
    assert response.output_text == "Hi there"
    assert response.output[0].id == "msg_1" and response.output[0].status == "completed"
    assert response.usage.input_tokens == 5 and response.usage.output_tokens == 4
    assert response.usage.total_tokens == 9
    assert response.usage.input_tokens_details.cached_tokens == 2
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    assert response.metadata == {"k": "v"} and response.instructions == "be brief"
    assert response.temperature == 0.3 and response.max_output_tokens == 9
    assert response.text.format.type == "json_schema"
    assert response.text.format.schema_ == {"type": "object"}
    assert response.tools == [] and response.tool_choice == "auto"
    assert raw["created_at"] == 1700000000 and raw["completed_at"] >= raw["created_at"]


def test_an_answer_cut_by_its_length_is_incomplete():
    raw = response_object(parse(), new_response_id(), 1, text="Hi", finish_reason="length",
                          usage=responses_usage(1, 1))
    response = Response.model_validate(raw)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete" and response.output_text == "Hi"


def test_statuses():
    assert status_of("stop") == "completed" and status_of(None) == "completed"
    assert status_of("length") == "incomplete" and status_of("abort") == "cancelled"
    for status in ("in_progress", "failed"):
        raw = response_object(parse(), new_response_id(), 1, status=status,
                              error=ServiceError("boom", 500) if status == "failed" else None)
        response = Response.model_validate(raw)
        assert response.status == status and response.output == [] and response.usage is None
    failed = response_object(parse(), "resp_1", 1, status="failed",
                             error=ServiceError("bad", 400))
    assert failed["error"] == {"code": "invalid_prompt", "message": "bad"}


def test_ids_have_openais_prefixes():
    assert new_response_id().startswith("resp_") and new_message_id().startswith("msg_")
    assert new_response_id() != new_response_id()


# ---- stream events -------------------------------------------------------------------------

def test_the_stream_is_openais_event_sequence():
    events = checked(collect(ResponseEvents(parse(), "resp_1", 7, "msg_1").stream(chunks_of(
        chunk("Hel"), chunk(""), chunk("lo", completion_tokens=2),
        chunk("!", "stop", completion_tokens=3)))))
    kinds = [event["type"] for event in events]
    assert kinds == [*STREAM_ORDER, *["response.output_text.delta"] * 3, *STREAM_END,
                     "response.completed"]
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == [
        "Hel", "lo", "!"]
    assert events[0]["response"]["status"] == "in_progress"
    assert events[0]["response"]["output"] == []
    assert events[2]["item"]["status"] == "in_progress" and events[2]["item"]["id"] == "msg_1"
    done = {event["type"]: event for event in events}
    assert done["response.output_text.done"]["text"] == "Hello!"
    assert done["response.content_part.done"]["part"]["text"] == "Hello!"
    assert done["response.output_item.done"]["item"]["status"] == "completed"
    final = Response.model_validate(events[-1]["response"])
    assert final.id == "resp_1" and final.status == "completed"
    assert final.output_text == "Hello!" and final.usage.output_tokens == 3
    for event in events:
        if "item_id" in event:
            assert event["item_id"] == "msg_1"
        if "response" in event:
            assert event["response"]["id"] == "resp_1"


def test_a_stream_cut_by_its_length_ends_incomplete():
    events = checked(collect(ResponseEvents(parse(max_output_tokens=1)).stream(chunks_of(
        chunk("Hi", "length")))))
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-2]["item"]["status"] == "incomplete"


def test_an_error_before_the_first_chunk_is_raised_before_any_event():
    stream = ResponseEvents(parse()).stream(chunks_of(ServiceError("too long", param="input")))
    with pytest.raises(ServiceError, match="too long"):
        collect(stream)


@pytest.mark.parametrize(("error", "code"), [
    (ServiceError("lost", 503, retry_after_s=1), "server_error"),
    (RuntimeError("bug"), "server_error"),
])
def test_an_error_mid_stream_ends_it_with_failed(error, code):
    events = checked(collect(ResponseEvents(parse()).stream(chunks_of(chunk("Hi"), error))))
    assert [event["type"] for event in events][-2:] == ["error", "response.failed"]
    assert events[-1]["response"]["status"] == "failed"
    assert events[-1]["response"]["error"]["code"] == code


def test_leaving_the_stream_early_closes_the_chunks():
    closed = []

    async def chunks() -> AsyncIterator[OutputChunk]:
        try:
            yield chunk("a")
            yield chunk("b", "stop")
        finally:
            closed.append(True)

    async def first_events() -> list[dict[str, Any]]:
        stream = ResponseEvents(parse()).stream(chunks())
        events = [await anext(stream) for _ in range(5)]
        await stream.aclose()
        return events

    assert asyncio.run(first_events())[-1]["delta"] == "a"
    assert closed == [True]


def test_a_stream_without_a_finish_reason_still_completes():
    events = checked(collect(ResponseEvents(parse()).stream(chunks_of(chunk("a")))))
    assert events[-1]["type"] == "response.completed"
    assert checked(collect(ResponseEvents(parse()).stream(chunks_of())))[-1][
        "response"]["output"][0]["content"][0]["text"] == ""


def test_the_step_by_step_interface():
    events = ResponseEvents(parse())
    produced = [*events.start(), *events.delta("a"), *events.delta(""), *events.delta("b"),
                *events.finish("stop", responses_usage(1, 2))]
    checked(produced)
    assert events.text == "ab"
    assert produced[-1]["response"]["usage"]["total_tokens"] == 3


def test_sse_text_has_the_event_line_and_the_json():
    event = ResponseEvents(parse()).delta("a\nb")[0]
    text = sse_event(event)
    assert text.startswith("event: response.output_text.delta\ndata: ")
    assert text.endswith("\n\n") and text.count("\n") == 3
    assert json.loads(text.split("data: ", 1)[1]) == event

    async def render() -> list[str]:
        return [part async for part in sse(chunks_of_events([event, event]))]
    assert asyncio.run(render()) == [text, text]


async def chunks_of_events(events: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for event in events:
        yield event


def _client(handler: Any) -> openai.OpenAI:
    return openai.OpenAI(api_key="k", base_url="http://test/v1", max_retries=0,
                         http_client=httpx.Client(transport=httpx.MockTransport(handler)))


def _stream_handler(*answer: OutputChunk) -> Any:
    def handler(http_request: httpx.Request) -> httpx.Response:
        request = parse_request(ResponsesRequest, http_request.content)
        assert request.stream
        events = ResponseEvents(request).stream(chunks_of(*answer))
        body = "".join(sse_event(event) for event in collect(events))
        return httpx.Response(200, content=body.encode(),
                              headers={"content-type": "text/event-stream"})
    return handler


def test_the_openai_client_reads_the_stream():
    client = _client(_stream_handler(chunk("Hel"), chunk("lo", "stop", completion_tokens=2)))
    events = list(client.responses.create(model=MODEL, input="hi", stream=True))
    assert [event.type for event in events][-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello"
    assert events[-1].response.output_text == "Hello"


def test_the_openai_clients_stream_helper_assembles_the_answer():
    client = _client(_stream_handler(chunk("4"), chunk("2", "stop", completion_tokens=2)))
    with client.responses.stream(model=MODEL, input="hi") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas == ["4", "2"] and final.output_text == "42"
    assert final.usage.output_tokens == 2


def test_the_openai_client_reads_the_whole_response():
    def handler(http_request: httpx.Request) -> httpx.Response:
        request = parse_request(ResponsesRequest, http_request.content)
        return httpx.Response(200, json=response_object(
            request, new_response_id(), 1, text="Hi", finish_reason="stop",
            usage=responses_usage(3, 1)))

    response = _client(handler).responses.create(model=MODEL, input="hi")
    assert response.output_text == "Hi" and response.usage.total_tokens == 4


# ---- properties ----------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.floats(
    allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "role", "content", "text", "format", "schema", "name"])
        | st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
FIELDS = ["model", "input", "instructions", "max_output_tokens", "temperature", "top_p",
          "stream", "text", "metadata", "store", "tools", "tool_choice", "reasoning",
          "truncation", "user"]
VALID = [body(), body(input=[{"role": "user", "content": [{"type": "input_text", "text": "x"}]}]),
         body(text={"format": {"type": "json_schema", "name": "n", "schema": {}}})]


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from(VALID),
       change=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=3),
       as_bytes=st.booleans())
def test_any_body_parses_or_is_a_400(base, change, as_bytes):
    raw: Any = {**base, **change}
    if as_bytes:
        raw = json.dumps(raw).encode()
    try:
        request = parse_request(ResponsesRequest, raw)
    except ServiceError as error:
        assert error.status_code == 400 and error.message
    else:
        request.chat_messages()
        request.response_format()
        Response.model_validate(response_object(request, "resp_1", 1, text="x",
                                                finish_reason="stop",
                                                usage=responses_usage(1, 1)))
