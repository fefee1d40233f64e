"""Structured output, tools, n, logprobs, echo, tokenize and the Responses API over real Ray
Serve, with the model-free echo engine (its answers repeat the prompt's last word, so the
grammar's effect on them is visible). The same on the real demo model, with the openai
client: tests/model/test_structured_output.py."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.helpers import serve_app, sse_events

MODEL = "smollm2-135m-instruct"
CHOICE_SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
                 "required": ["answer"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                   "required": ["city"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def base_url():
    args = {"engine": "echo", "checkpoint_path": "/unused", "max_batch_size": 16}
    with serve_app(args, server_options={"max_ongoing_requests": 64}) as url:
        yield url


@pytest.fixture
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


@pytest.fixture
def oai(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def chat(client, **fields):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x hello"}],
            "max_tokens": 30, **fields}
    return client.post("/v1/chat/completions", json=body)


# ---- structured output ---------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    {"response_format": {"type": "json_schema",
                         "json_schema": {"name": "yn", "schema": CHOICE_SCHEMA, "strict": True}}},
    {"guided_json": CHOICE_SCHEMA},
])
def test_a_json_schema_answer_follows_the_schema(client, fields):
    r = chat(client, temperature=0.8, **fields)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert json.loads(choice["message"]["content"])["answer"] in ("yes", "no")
    assert choice["finish_reason"] == "stop"


def test_guided_choice_and_regex_constrain_the_echo(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x hello",
                                              "guided_choice": ["help", "hello there"]})
    assert r.json()["choices"][0]["text"] == "hello there"  # the echo, where allowed
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x hel",
                                              "guided_regex": "he[0-9]{3}", "max_tokens": 9})
    text = r.json()["choices"][0]["text"]
    assert text.startswith("he") and len(text) == 5 and text[2:].isdigit()


def test_json_mode_streams_a_whole_object(client):
    r = chat(client, stream=True, response_format={"type": "json_schema", "json_schema": {
        "name": "yn", "schema": CHOICE_SCHEMA}})
    events = sse_events(r.text)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert json.loads(text)["answer"] in ("yes", "no")


# ---- tools ---------------------------------------------------------------------------------


def test_a_forced_tool_call_parses_and_matches_its_schema(oai):
    answer = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x weather in Paris?"}],
        tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0.8, max_tokens=40)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")


def test_required_tool_choice_gives_one_call_of_the_offered_tools(oai):
    other = {"type": "function", "function": {"name": "noop", "parameters": {
        "type": "object", "properties": {}, "additionalProperties": False}}}
    answer = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x go"}], tools=[WEATHER, other],
        tool_choice="required", parallel_tool_calls=False, max_tokens=60)
    calls = answer.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name in ("get_weather", "noop")
    json.loads(calls[0].function.arguments)


def test_a_streamed_tool_call_reassembles_to_the_same_call(oai):
    stream = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x weather?"}], tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0, max_tokens=40, stream=True)
    name, arguments, reasons, ids = "", "", [], set()
    for chunk in stream:
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or ():
            ids.add(delta.id) if delta.id else None
            name += delta.function.name or ""
            arguments += delta.function.arguments or ""
        reasons.append(choice.finish_reason)
    assert name == "get_weather" and len(ids) == 1 and reasons[-1] == "tool_calls"
    whole = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x weather?"}], tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0, max_tokens=40)
    assert json.loads(arguments) == json.loads(whole.choices[0].message.tool_calls[0]
                                               .function.arguments)


def test_auto_tool_calls_are_read_from_the_hermes_format(client):
    # The echo repeats the prompt's last word: a Hermes call written there comes back.
    call = '<tool_call>{"name":"get_weather","arguments":{"city":"Rome"}}</tool_call>'
    r = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": f"x {call}"}],
        "tools": [WEATHER], "max_tokens": len(call)})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"  # max_tokens ended it; the call is whole
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == \
        {"city": "Rome"}


def test_tool_history_is_rendered_for_a_template_without_tools(client):
    history = [
        {"role": "user", "content": "x weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = client.post("/tokenize", json={"model": MODEL, "messages": history})
    assert r.status_code == 200, r.text
    detok = client.post("/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}' in detok
    assert "<tool_response>\nsunny\n</tool_response>" in detok


# ---- n, logprobs, echo, penalties ----------------------------------------------------------


def test_n_gives_independent_choices_and_counts_the_prompt_once(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ["a one", "b two"],
                                              "n": 3, "max_tokens": 3})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == list(range(6))
    assert [c["text"] for c in body["choices"]] == ["one"] * 3 + ["two"] * 3
    assert body["usage"]["prompt_tokens"] == 5 + 5
    assert body["usage"]["completion_tokens"] == 18
    r = chat(client, n=2, stream=True, max_tokens=4)
    indexes = {e["choices"][0]["index"] for e in sse_events(r.text)[:-1]}
    assert indexes == {0, 1}


def test_logprobs_come_with_every_token(client):
    r = chat(client, logprobs=True, top_logprobs=2, max_tokens=5)
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == choice["message"]["content"] == "hello"
    assert all(-1e-6 < e["logprob"] <= 0 and len(e["top_logprobs"]) == 2 for e in content)
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x hey", "logprobs": 1,
                                              "max_tokens": 3, "echo": False})
    logprobs = r.json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["h", "e", "y"] and logprobs["text_offset"] == [0, 1, 2]


def test_echo_puts_the_prompt_before_the_answer(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x hi", "echo": True,
                                              "max_tokens": 2})
    assert r.json()["choices"][0]["text"] == "x hihi"


def test_logit_bias_and_penalties_reach_the_sampler(client):
    # The echo's token is certain (logit 50, others 0): a bias of -100 takes it away.
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x ab", "max_tokens": 1,
                                              "temperature": 0,
                                              "logit_bias": {str(ord("a")): -100}})
    assert r.json()["choices"][0]["text"] != "a"
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x ab", "max_tokens": 4,
                                              "temperature": 0, "frequency_penalty": 2.0,
                                              "presence_penalty": 1.0,
                                              "repetition_penalty": 1.2, "min_p": 0.1})
    assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) == 4


# ---- tokenize, version, Responses ----------------------------------------------------------


def test_tokenize_detokenize_and_version(client):
    r = client.post("/tokenize", json={"model": MODEL, "prompt": "hé"})
    assert r.json() == {"count": 2, "max_model_len": 4096, "tokens": [104, 233],
                        "token_strs": None}
    assert client.post("/detokenize", json={"tokens": [104, 233]}).json() == {"prompt": "hé"}
    assert client.get("/version").json()["version"]
    r = client.post("/tokenize", json={"model": "other", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_the_responses_api_answers_and_streams_typed_events(oai):
    response = oai.responses.create(model=MODEL, input="x hello", max_output_tokens=5)
    assert response.output_text == "hello" and response.status == "incomplete"
    events = list(oai.responses.create(model=MODEL, input="x hey", max_output_tokens=3,
                                       stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.incomplete"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "hey"
    structured = oai.responses.create(model=MODEL, input="x yes", text={"format": {
        "type": "json_schema", "name": "yn", "schema": CHOICE_SCHEMA, "strict": True}})
    assert json.loads(structured.output_text)["answer"] in ("yes", "no")


# ---- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema"),
    ({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": 7}}}}}]},
     "tools.0.function.parameters"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}]},
     "messages.1.tool_call_id"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"n": 17}, "n"),
    ({"top_logprobs": 2}, "top_logprobs"),
])
def test_bad_structured_requests_are_a_400_naming_the_field(client, fields, param):
    r = chat(client, **fields)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
