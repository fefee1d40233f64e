"""Structured output, tool calls, n and logprobs on the real demo model, through the openai
client against a live app: the grammar makes even a 135M model's answers parse and
validate, at a sampling temperature."""

from __future__ import annotations

import json
import math

import jsonschema
import openai
import pytest

from tests.helpers import serve_app

pytestmark = pytest.mark.model

MODEL = "smollm2-135m-instruct"
NAME = {"type": "string", "maxLength": 12}

SCHEMAS = [
    {"type": "object", "properties": {"name": NAME}, "required": ["name"]},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
     "required": ["color"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0.5,
                                                "maximum": 99.5}}, "required": ["price"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": NAME,
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"]},
    {"type": "object", "properties": {"city": NAME, "country": NAME},
     "required": ["city", "country"], "additionalProperties": False},
    {"type": "object", "properties": {"person": {
        "type": "object", "properties": {"name": NAME, "age": {"type": "integer",
                                                               "minimum": 1, "maximum": 99}},
        "required": ["name", "age"]}}, "required": ["person"]},
    {"type": "object", "properties": {"scores": {"type": "array", "maxItems": 4, "items": {
        "type": "integer", "minimum": -5, "maximum": 5}}}, "required": ["scores"]},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                      "confidence": {"type": "number", "minimum": 0,
                                                     "maximum": 1}},
     "required": ["answer", "confidence"]},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"}},
     "required": ["id"]},
    {"type": "object", "properties": {"level": {"const": "high"}}, "required": ["level"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": NAME, "qty": {"type": "integer", "minimum": 1,
                                                              "maximum": 9}},
        "required": ["sku", "qty"], "additionalProperties": False}}}, "required": ["items"]},
    {"type": "object", "properties": {"note": {"type": ["string", "null"], "maxLength": 10}},
     "required": ["note"]},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0,
                                                           "maximum": 9}, {"enum": ["none"]}]}},
     "required": ["value"]},
    {"type": "object", "$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9},
        "y": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x", "y"]}},
     "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
     "required": ["start", "end"]},
    {"type": "object", "properties": {"title": {"type": "string", "minLength": 2,
                                                "maxLength": 15}}, "required": ["title"]},
    {"type": "object", "properties": {"weekday": {"enum": ["mon", "tue", "wed", "thu", "fri"]},
                                      "hour": {"type": "integer", "minimum": 0, "maximum": 23}},
     "required": ["weekday", "hour"], "additionalProperties": False},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0,
                                                  "maximum": 3}}}}, "required": ["matrix"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "email": {"type": "string", "format": "email", "maxLength": 24},
        "roles": {"type": "array", "items": {"enum": ["admin", "dev"]}, "maxItems": 2}},
        "required": ["email", "roles"]}}, "required": ["user"]},
]
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": -99, "maximum": 99},
        "b": {"type": "integer", "minimum": -99, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def oai(demo_checkpoint):
    args = {"checkpoint_path": str(demo_checkpoint), "max_batch_size": 8}
    with serve_app(args, server_options={"max_ongoing_requests": 64}) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                            timeout=600)


def test_strict_json_schema_answers_parse_and_validate_for_20_schemas(oai):
    from concurrent.futures import ThreadPoolExecutor

    def ask(index: int) -> tuple[int, str, str]:
        answer = oai.chat.completions.create(
            model=MODEL, temperature=0.8, max_tokens=200, seed=index,
            messages=[{"role": "user", "content": "Fill in the JSON object."}],
            response_format={"type": "json_schema", "json_schema": {
                "name": f"s{index}", "schema": SCHEMAS[index], "strict": True}})
        choice = answer.choices[0]
        return index, choice.message.content, choice.finish_reason

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(len(SCHEMAS))))
    for index, content, finish_reason in answers:
        assert finish_reason == "stop", (index, content)
        jsonschema.validate(json.loads(content), SCHEMAS[index])


def test_a_forced_tool_call_and_a_two_step_tool_loop(oai):
    messages = [{"role": "user", "content": "What is 2 plus 3? Use the add tool."}]
    first = oai.chat.completions.create(
        model=MODEL, messages=messages, tools=[ADD], temperature=0.8, max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "add"}})
    (call,) = first.choices[0].message.tool_calls
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, ADD["function"]["parameters"])
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id,
                  "content": str(arguments["a"] + arguments["b"])}]
    second = oai.chat.completions.create(model=MODEL, messages=messages, tools=[ADD],
                                         temperature=0, max_tokens=40)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the history was sent


def test_a_streamed_tool_call_reassembles_to_the_whole_one(oai):
    request = {"model": MODEL, "tools": [ADD], "temperature": 0, "max_tokens": 60,
               "messages": [{"role": "user", "content": "Add 4 and 5."}],
               "tool_choice": {"type": "function", "function": {"name": "add"}}}
    whole = oai.chat.completions.create(**request).choices[0].message.tool_calls[0]
    arguments = "".join(d.function.arguments or "" for chunk in
                        oai.chat.completions.create(**request, stream=True)
                        for d in chunk.choices[0].delta.tool_calls or ())
    assert json.loads(arguments) == json.loads(whole.function.arguments)


def test_n_choices_and_logprobs_that_add_up(oai):
    answer = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}], n=3,
        temperature=1.0, max_tokens=8, logprobs=True, top_logprobs=3)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    total = 0
    for choice in answer.choices:
        content = choice.logprobs.content
        assert "".join(t.token for t in content) == choice.message.content
        for token in content:
            assert token.logprob <= 0 and len(token.top_logprobs) == 3
            # the top alternatives are the likeliest: the sampled token is among them or
            # no likelier than the third
            assert token.logprob <= token.top_logprobs[0].logprob + 1e-6
            assert math.isfinite(token.logprob)
        total += len(content)
    eos_ended = sum(c.finish_reason == "stop" for c in answer.choices)
    assert total == answer.usage.completion_tokens - eos_ended  # EOS has no logprob entry
