"""The LangChain adapter without a cluster: LangChain's standard unit suite for ChatRayServe,
and the OpenAI shapes the adapter sends and reads (messages, tools, tool calls, structured
output, response_format, n, logprobs).

The only stand-in is ``FakeRouter``, in place of ``RouterClient`` (the handle calls): it
checks each OpenAI request body the adapter builds against the router's request models
(as RouterClient does), records it, and answers with OpenAI-shaped responses and stream
chunks, as the router does. Against the real router, the same
paths run in tests/serve/test_langchain_standard.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import pytest
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from langchain_tests.unit_tests import ChatModelUnitTests
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from langchain_adapter import ChatRayServe, RayServeLLM
from langchain_adapter import base as adapter_base
from langchain_adapter.chat import openai_message
from langchain_adapter.router_client import generation_fields, openai_request
from tests.langchain_capabilities import ChatRayServeCapabilities

MODEL = "demo-model"
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
         "prompt_tokens_details": {"cached_tokens": 2}}


class FakeRouter:
    """RouterClient's interface: ``bodies`` records each call's (method, body); replies
    (whole responses or lists of stream chunks) are queued in ``replies``."""

    def __init__(self, app_name: str = "llm") -> None:
        self.app_name = app_name
        self.model_names = [MODEL]
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.replies: list[Any] = []

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [body for _, body in self.calls]

    def _reply(self, method: str, body: Mapping[str, Any]) -> Any:
        openai_request(method, body)  # the router's own request models accept it
        self.calls.append((method, json.loads(json.dumps(body))))  # as it would travel
        return self.replies.pop(0)

    def submit(self, method: str, body: Mapping[str, Any]) -> Any:
        return self._reply(method, body)

    @staticmethod
    def wait_all(responses: list[Any]) -> list[Any]:
        return list(responses)

    @staticmethod
    async def await_all(responses: list[Any]) -> list[Any]:
        return list(responses)

    def stream(self, method: str, body: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        yield from self._reply(method, body)

    async def astream(self, method: str, body: Mapping[str, Any]
                      ) -> AsyncIterator[dict[str, Any]]:
        for chunk in self._reply(method, body):
            yield chunk

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]


@pytest.fixture
def router(monkeypatch: pytest.MonkeyPatch) -> FakeRouter:
    """The FakeRouter every adapter made in the test talks to."""
    fake = FakeRouter()
    monkeypatch.setattr(adapter_base, "RouterClient", lambda app_name: fake)
    return fake


# ---- OpenAI-shaped answers, as the router builds them ------------------------------------


def chat_response(content: str | None = None, tool_calls: list[dict[str, Any]] | None = None,
                  finish_reason: str = "stop", **choice: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": MODEL,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish_reason, **choice}],
            "usage": USAGE}


def call(name: str, arguments: str, call_id: str = "call_1") -> dict[str, Any]:
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": arguments}}


def chunk(delta: dict[str, Any], finish_reason: str | None = None,
          logprobs: Any = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                         "finish_reason": finish_reason}]}


def usage_chunk() -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": MODEL,
            "choices": [], "usage": USAGE}


def text_stream(*pieces: str, finish_reason: str = "stop") -> list[dict[str, Any]]:
    return [chunk({"role": "assistant", "content": ""}),
            *[chunk({"content": piece}) for piece in pieces],
            chunk({}, finish_reason), usage_chunk()]


def tool_call_stream(name: str, *argument_pieces: str) -> list[dict[str, Any]]:
    """A tool call streamed as OpenAI does: id and name first, then the arguments in
    pieces, then finish_reason "tool_calls"."""
    first = {"index": 0, "id": "call_1", "type": "function",
             "function": {"name": name, "arguments": ""}}
    return [chunk({"role": "assistant", "content": None, "tool_calls": [first]}),
            *[chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
              for piece in argument_pieces],
            chunk({}, "tool_calls"), usage_chunk()]


def joined(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    whole = chunks[0]
    for piece in chunks[1:]:
        whole += piece
    return whole


# ---- LangChain's standard unit suite -------------------------------------------------------


class TestChatRayServeStandard(ChatRayServeCapabilities, ChatModelUnitTests):
    """ChatModelUnitTests on ChatRayServe, with FakeRouter for the application.

    ChatRayServe asks the application for its model when it is made (a wrong app_name or
    model fails at construction, not at the first call), so without a cluster the
    standard suite's constructions talk to FakeRouter: construction, bind_tools and
    with_structured_output are exercised as they are, only the handle is not there.
    """

    @pytest.fixture(autouse=True)
    def _fake_application(self, router: FakeRouter) -> None:
        """Every adapter the suite makes finds FakeRouter as its application."""


    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"app_name": "llm"}

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        """LangChain's standard parameters that apply: not ``api_key`` (handle calls skip
        the router's HTTP API key check) nor ``max_retries`` (the adapter does not retry;
        the router retries a lost replica once)."""
        params = dict(super().standard_chat_model_params)
        del params["api_key"], params["max_retries"]
        return params




    @property
    def structured_output_kwargs(self) -> dict[str, Any]:
        return {"method": "json_schema"}





def test_the_standard_parameters_reach_the_request(router: FakeRouter) -> None:
    chat = ChatRayServe(temperature=0, max_tokens=100, timeout=60, stop=[])
    router.replies.append(chat_response("hi"))
    chat.invoke("hello")
    assert router.bodies == [{"model": MODEL, "messages": [{"role": "user", "content": "hello"}],
                              "temperature": 0, "max_tokens": 100, "timeout": 60}]


# ---- messages ---------------------------------------------------------------------------


def test_messages_become_openai_messages() -> None:
    assert openai_message(SystemMessage("be brief")) == {"role": "system",
                                                         "content": "be brief"}
    assert openai_message(HumanMessage("hi", name="ann")) == {"role": "user", "content": "hi",
                                                              "name": "ann"}
    assert openai_message(HumanMessage(["a", {"type": "text", "text": "b"}])) == {
        "role": "user", "content": [{"type": "text", "text": "a"},
                                    {"type": "text", "text": "b"}]}
    assert openai_message(AIMessage("hello")) == {"role": "assistant", "content": "hello"}


def test_an_ai_messages_tool_calls_become_openai_tool_calls() -> None:
    calling = AIMessage("", tool_calls=[
        {"name": "add", "args": {"a": 1, "b": "é"}, "id": "c1", "type": "tool_call"}],
        invalid_tool_calls=[{"name": "add", "args": "{oops", "id": "c2", "error": "bad",
                             "type": "invalid_tool_call"}])
    assert openai_message(calling) == {"role": "assistant", "content": None, "tool_calls": [
        call("add", '{"a": 1, "b": "é"}', "c1"), call("add", "{oops", "c2")]}
    # Anthropic-style and v1 tool call blocks in the content travel as tool_calls only.
    blocks = AIMessage([{"type": "text", "text": "let me add"},
                        {"type": "tool_use", "id": "c1", "name": "add", "input": {"a": 1}}],
                       tool_calls=[{"name": "add", "args": {"a": 1}, "id": "c1"}])
    assert openai_message(blocks) == {
        "role": "assistant", "content": [{"type": "text", "text": "let me add"}],
        "tool_calls": [call("add", '{"a": 1}', "c1")]}
    only_calls = AIMessage([{"type": "tool_call", "id": "c1", "name": "add", "args": {}}],
                           tool_calls=[{"name": "add", "args": {}, "id": "c1"}])
    assert openai_message(only_calls)["content"] is None


def test_a_tool_message_becomes_a_tool_message() -> None:
    assert openai_message(ToolMessage("3", tool_call_id="c1", name="add")) == {
        "role": "tool", "tool_call_id": "c1", "content": "3"}
    assert openai_message(ToolMessage([{"type": "text", "text": "3"}, "!"],
                                      tool_call_id="c1", status="error")) == {
        "role": "tool", "tool_call_id": "c1", "content": "3!"}


def test_function_messages_are_refused() -> None:
    with pytest.raises(ValueError, match="FunctionMessage is not supported"):
        openai_message(FunctionMessage("3", name="add"))


# ---- tools ------------------------------------------------------------------------------


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


ADD_TOOL = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                    "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}


@pytest.mark.parametrize(("given", "sent"), [
    (None, None), (False, None), ("auto", "auto"), ("none", "none"),
    ("required", "required"), ("any", "required"), (True, "required"),
    ("add", {"type": "function", "function": {"name": "add"}}),
    ({"type": "function", "function": {"name": "multiply"}},
     {"type": "function", "function": {"name": "multiply"}}),
])
def test_bind_tools_sends_openai_tools_and_tool_choice(router: FakeRouter, given: Any,
                                                       sent: Any) -> None:
    chat = ChatRayServe()
    router.replies.append(chat_response("ok"))
    chat.bind_tools([add, multiply], tool_choice=given).invoke("add 1 and 2")
    (body,) = router.bodies
    assert body["tools"][0] == ADD_TOOL
    assert [t["function"]["name"] for t in body["tools"]] == ["add", "multiply"]
    assert body.get("tool_choice") == sent
    assert "parallel_tool_calls" not in body


def test_bind_tools_takes_every_kind_of_tool_and_its_options(router: FakeRouter) -> None:
    class Person(BaseModel):
        """A person."""

        name: str = Field(description="their name")

    def greet(name: str) -> str:
        """Greet someone."""
        return name

    chat = ChatRayServe()
    router.replies.append(chat_response("ok"))
    place = {**Person.model_json_schema(), "title": "Place"}
    chat.bind_tools([Person, greet, place, ADD_TOOL], strict=True,
                    parallel_tool_calls=False, temperature=0).invoke("hi")
    (body,) = router.bodies
    assert [t["function"]["name"] for t in body["tools"]] == ["Person", "greet", "Place", "add"]
    assert all(t["function"]["strict"] is True for t in body["tools"][:3])
    assert body["tools"][3] == ADD_TOOL  # an OpenAI tool dict goes as it is
    assert body["tools"][0]["function"]["parameters"]["additionalProperties"] is False
    assert (body["parallel_tool_calls"], body["temperature"]) == (False, 0)


def test_an_unknown_tool_choice_is_refused_at_binding(router: FakeRouter) -> None:
    with pytest.raises(ValueError, match="'subtract' is neither a bound tool"):
        ChatRayServe().bind_tools([add], tool_choice="subtract")


def test_tool_calls_in_the_answer_become_langchain_tool_calls(router: FakeRouter) -> None:
    router.replies.append(chat_response(None, [call("add", '{"a": 1, "b": 2}'),
                                               call("add", "{not json", "call_2"),
                                               call("add", "[1, 2]", "call_3")],
                                        "tool_calls"))
    answer = ChatRayServe().bind_tools([add]).invoke("add 1 and 2")
    assert answer.content == ""
    assert answer.tool_calls == [{"name": "add", "args": {"a": 1, "b": 2}, "id": "call_1",
                                  "type": "tool_call"}]
    assert [(c["name"], c["args"], c["id"]) for c in answer.invalid_tool_calls] == [
        ("add", "{not json", "call_2"), ("add", "[1, 2]", "call_3")]
    assert answer.response_metadata["finish_reason"] == "tool_calls"
    assert answer.usage_metadata == {"input_tokens": 7, "output_tokens": 3,
                                     "total_tokens": 10, "input_token_details": {"cache_read": 2}}


def test_a_tool_loop_sends_the_call_and_its_result_back(router: FakeRouter) -> None:
    """bind_tools -> tool call -> run the tool -> ToolMessage -> the final answer."""
    chat = ChatRayServe()
    router.replies += [chat_response(None, [call("add", '{"a": 1, "b": 2}')], "tool_calls"),
                       chat_response("1 + 2 = 3")]
    question = HumanMessage("What is 1 + 2?")
    calling = chat.bind_tools([add], tool_choice="add").invoke([question])
    result = add.invoke(calling.tool_calls[0])
    assert isinstance(result, ToolMessage) and result.content == "3"
    answer = chat.bind_tools([add]).invoke([question, calling, result])
    assert answer.content == "1 + 2 = 3" and not answer.tool_calls
    assert router.bodies[1]["messages"] == [
        {"role": "user", "content": "What is 1 + 2?"},
        {"role": "assistant", "content": None,
         "tool_calls": [call("add", '{"a": 1, "b": 2}')]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    assert "tool_choice" not in router.bodies[1]


def test_streamed_tool_calls_join_into_tool_calls(router: FakeRouter) -> None:
    router.replies.append(tool_call_stream("add", '{"a": ', '1, "b"', ': 2}'))
    chunks = list(ChatRayServe().bind_tools([add], tool_choice="any").stream("add"))
    assert all(isinstance(piece, AIMessageChunk) for piece in chunks)
    assert [c["args"] for piece in chunks for c in piece.tool_call_chunks] == [
        "", '{"a": ', '1, "b"', ': 2}']
    whole = joined(chunks)
    assert whole.chunk_position == "last"
    assert whole.tool_calls == [{"name": "add", "args": {"a": 1, "b": 2}, "id": "call_1",
                                 "type": "tool_call"}]
    assert whole.response_metadata["finish_reason"] == "tool_calls"
    assert whole.usage_metadata is not None and whole.usage_metadata["total_tokens"] == 10
    assert router.calls[0][0] == "chat_completions_stream"
    assert router.bodies[0]["stream_options"] == {"include_usage": True}


async def test_streamed_tool_calls_in_async_calls(router: FakeRouter) -> None:
    router.replies.append(tool_call_stream("add", '{"a": 1, "b": 2}'))
    chunks = [c async for c in ChatRayServe().bind_tools([add]).astream("add")]
    assert joined(chunks).tool_calls[0]["args"] == {"a": 1, "b": 2}


def test_a_text_stream_still_ends_with_the_last_chunk(router: FakeRouter) -> None:
    router.replies.append(text_stream("Hel", "lo"))
    chunks = list(ChatRayServe().stream("hi"))
    assert [c.content for c in chunks] == ["Hel", "lo", ""]
    assert chunks[-1].chunk_position == "last"
    assert joined(chunks).content == "Hello"


# ---- structured output --------------------------------------------------------------------


class Joke(BaseModel):
    """A joke."""

    setup: str = Field(description="the question")
    punchline: str = Field(description="the answer")


class JokeDict(TypedDict):
    """A joke."""

    setup: str
    punchline: str


JOKE = {"setup": "Why?", "punchline": "Because."}


def test_json_schema_output_sends_the_schema_and_parses_the_answer(router: FakeRouter) -> None:
    router.replies.append(chat_response(json.dumps(JOKE)))
    assert ChatRayServe().with_structured_output(Joke).invoke("a joke") == Joke(**JOKE)
    (body,) = router.bodies
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "Joke", "description": "A joke.", "strict": False, "schema": {
            "type": "object", "required": ["setup", "punchline"], "properties": {
                "setup": {"type": "string", "description": "the question"},
                "punchline": {"type": "string", "description": "the answer"}}}}}
    assert "tools" not in body


@pytest.mark.parametrize("schema", [JokeDict, Joke.model_json_schema()])
def test_json_schema_output_of_a_dict_schema_is_a_dict(router: FakeRouter,
                                                       schema: Any) -> None:
    router.replies.append(chat_response(json.dumps(JOKE)))
    chat = ChatRayServe().with_structured_output(schema, strict=True)
    assert chat.invoke("a joke") == JOKE
    json_schema = router.bodies[0]["response_format"]["json_schema"]
    assert json_schema["strict"] is True
    assert json_schema["schema"]["additionalProperties"] is False


def test_a_ready_response_format_is_sent_as_it_is(router: FakeRouter) -> None:
    ready = {"type": "json_schema", "json_schema": {"name": "joke", "strict": True,
                                                    "schema": Joke.model_json_schema()}}
    router.replies += [chat_response(json.dumps(JOKE))] * 2
    assert ChatRayServe().with_structured_output(ready).invoke("a joke") == JOKE
    assert ChatRayServe().with_structured_output(ready["json_schema"]).invoke("a joke") == JOKE
    assert router.bodies[0]["response_format"] == router.bodies[1]["response_format"] == ready


def test_structured_output_streams_partial_objects(router: FakeRouter) -> None:
    text = json.dumps(JOKE)
    router.replies.append(text_stream(text[:12], text[12:25], text[25:]))
    parsed = list(ChatRayServe().with_structured_output(Joke).stream("a joke"))
    assert parsed and all(isinstance(p, Joke) for p in parsed)
    assert parsed[-1] == Joke(**JOKE)


def test_function_calling_output_forces_the_schemas_tool(router: FakeRouter) -> None:
    router.replies.append(chat_response(None, [call("Joke", json.dumps(JOKE))], "tool_calls"))
    chat = ChatRayServe().with_structured_output(Joke, method="function_calling")
    assert chat.invoke("a joke") == Joke(**JOKE)
    (body,) = router.bodies
    assert [t["function"]["name"] for t in body["tools"]] == ["Joke"]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "Joke"}}
    assert body["parallel_tool_calls"] is False
    assert "response_format" not in body
    router.replies.append(chat_response(None, [call("Joke", json.dumps(JOKE))], "tool_calls"))
    as_dict = ChatRayServe().with_structured_output(Joke.model_json_schema(),
                                                   method="function_calling")
    assert as_dict.invoke("a joke") == JOKE


def test_json_mode_asks_for_a_json_object(router: FakeRouter) -> None:
    router.replies += [chat_response(json.dumps(JOKE))] * 2
    assert ChatRayServe().with_structured_output(Joke, method="json_mode").invoke("j") == Joke(
        **JOKE)
    assert ChatRayServe().with_structured_output(method="json_mode").invoke("j") == JOKE
    assert [b["response_format"] for b in router.bodies] == [{"type": "json_object"}] * 2
    with pytest.raises(ValueError, match="strict"):
        ChatRayServe().with_structured_output(Joke, method="json_mode", strict=True)


def test_include_raw_keeps_the_answer_and_the_parsing_error(router: FakeRouter) -> None:
    router.replies += [chat_response(json.dumps(JOKE)), chat_response('{"setup": "Why?"}')]
    chat = ChatRayServe().with_structured_output(Joke, include_raw=True)
    good = chat.invoke("a joke")
    assert good["parsed"] == Joke(**JOKE) and good["parsing_error"] is None
    assert isinstance(good["raw"], AIMessage)
    bad = chat.invoke("a joke")
    assert bad["parsed"] is None and bad["parsing_error"] is not None
    assert bad["raw"].content == '{"setup": "Why?"}'


def test_structured_output_needs_a_known_method_and_a_schema(router: FakeRouter) -> None:
    with pytest.raises(ValueError, match="unknown method"):
        ChatRayServe().with_structured_output(Joke, method="xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a schema"):
        ChatRayServe().with_structured_output(None)


# ---- n, logprobs, response_format on RayServeLLM, model override --------------------------


def test_n_answers_are_n_generations(router: FakeRouter) -> None:
    response = chat_response("a")
    response["choices"].append({**response["choices"][0], "index": 1,
                                "message": {"role": "assistant", "content": "b"}})
    router.replies.append(response)
    result = ChatRayServe(n=2).generate([[HumanMessage("hi")]])
    assert [g.text for g in result.generations[0]] == ["a", "b"]
    assert router.bodies[0]["n"] == 2
    with pytest.raises(ValueError, match="n > 1 cannot stream"):
        list(ChatRayServe(n=2).stream("hi"))


def test_logprobs_are_in_the_response_metadata(router: FakeRouter) -> None:
    entry = {"token": "a", "logprob": -0.1, "bytes": [97],
             "top_logprobs": [{"token": "a", "logprob": -0.1, "bytes": [97]}]}
    router.replies.append(chat_response("a", logprobs={"content": [entry]}))
    answer = ChatRayServe(logprobs=True, top_logprobs=1).invoke("hi")
    assert answer.response_metadata["logprobs"] == {"content": [entry]}
    assert (router.bodies[0]["logprobs"], router.bodies[0]["top_logprobs"]) == (True, 1)
    router.replies.append([chunk({"content": "a"}, logprobs={"content": [entry]}),
                           chunk({"content": "b"}, logprobs={"content": [entry]}),
                           chunk({}, "stop"), usage_chunk()])
    whole = joined(list(ChatRayServe(logprobs=True).stream("hi")))
    assert whole.response_metadata["logprobs"] == {"content": [entry, entry]}


def test_the_llm_sends_response_format_from_model_kwargs_and_per_call(
        router: FakeRouter) -> None:
    completion = {"id": "cmpl-1", "object": "text_completion", "model": MODEL, "usage": USAGE,
                  "choices": [{"index": 0, "text": '{"a": 1}', "logprobs": None,
                               "finish_reason": "stop"}]}
    json_object = {"type": "json_object"}
    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"a": {"type": "integer"}}}}}
    router.replies += [completion] * 3
    llm = RayServeLLM(model_kwargs={"response_format": json_object, "max_tokens": 20})
    assert llm.invoke("json please") == '{"a": 1}'
    assert llm.invoke("json please", response_format=schema) == '{"a": 1}'
    assert RayServeLLM(response_format=schema).invoke("json please") == '{"a": 1}'
    assert [b["response_format"] for b in router.bodies] == [json_object, schema, schema]
    assert router.bodies[0] == {"model": MODEL, "prompt": "json please", "max_tokens": 20,
                                "response_format": json_object}


def test_the_llm_returns_n_generations_per_prompt(router: FakeRouter) -> None:
    def completion(*texts: str) -> dict[str, Any]:
        return {"id": "cmpl-1", "object": "text_completion", "model": MODEL, "usage": USAGE,
                "choices": [{"index": i, "text": text, "logprobs": None,
                             "finish_reason": "length"} for i, text in enumerate(texts)]}

    router.replies += [completion("a", "b"), completion("c", "d")]
    result = RayServeLLM(n=2).generate(["p", "q"])
    assert [[g.text for g in gs] for gs in result.generations] == [["a", "b"], ["c", "d"]]


def test_the_new_openai_fields_are_generation_settings() -> None:
    fields = {"presence_penalty": 0.5, "frequency_penalty": 0.1, "logit_bias": {"5": -100},
              "n": 2, "logprobs": True, "top_logprobs": 3,
              "response_format": {"type": "json_object"}, "tools": [ADD_TOOL],
              "tool_choice": "auto", "parallel_tool_calls": False}
    assert generation_fields(fields) == fields
    with pytest.raises(ValueError, match="best_of"):
        generation_fields({"best_of": 2})


def test_a_calls_model_overrides_the_adapters(router: FakeRouter) -> None:
    chat = ChatRayServe()
    assert chat._get_ls_params(model="other")["ls_model_name"] == "other"
    assert chat._get_ls_params()["ls_model_name"] == MODEL
    router.replies.append(chat_response("hi"))
    chat.invoke("hello", model="other")
    assert router.bodies[0]["model"] == "other"
