"""The parts behind structured output, tools and logprobs, on plain data: the shared
sampler's penalties, biases and logprobs, grammar masks, tool-call grammars and parsers,
and the choice objects (no Ray, no model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deployments.choices import ChatChoiceStream, chat_choice, completion_logprobs
from deployments.contract import Guide, OutputChunk, TokenLogprob, Tool
from deployments.engine.detokenizer import StopStringTextStream
from deployments.engine.guided import GuideCompiler
from deployments.engine.plan import SequenceState
from deployments.engine.protocol import EngineError, GenerationRequest, SamplingParams
from deployments.engine.sampler import Sampler
from deployments.grammar import guide_error, strict_schema
from deployments.tool_calls import (
    forced_call_guide,
    forced_calls,
    parse_hermes,
    parse_llama3_json,
)

ASCII = [bytes([i]) for i in range(128)]


def seq(prompt=(1, 2), generated=(), **params) -> SequenceState:
    state = SequenceState(GenerationRequest("r", tuple(prompt), SamplingParams(**params)),
                          StopStringTextStream(()))
    state.generated.extend(generated)
    return state


def draws(sampler: Sampler, logits, state, times=300) -> set[int]:
    return {sampler.sample(np.array([logits], dtype=np.float32), [state])[0].token
            for _ in range(times)}


# ---- sampler ------------------------------------------------------------------------------


def test_logit_bias_moves_the_greedy_choice():
    sampler = Sampler([0])
    logits = [0.0, 1.0, 2.0]
    assert draws(sampler, logits, seq(temperature=0), 1) == {2}
    assert draws(sampler, logits, seq(temperature=0, logit_bias=((1, 5.0),)), 1) == {1}


def test_penalties_push_down_tokens_already_said():
    sampler = Sampler([0])
    logits = [0.0, 2.0, 1.9]
    said = seq(temperature=0, generated=(1, 1))
    assert draws(sampler, logits, said, 1) == {1}
    assert draws(sampler, logits, seq(temperature=0, generated=(1, 1),
                                      frequency_penalty=0.1), 1) == {2}
    assert draws(sampler, logits, seq(temperature=0, generated=(1,),
                                      presence_penalty=0.2), 1) == {2}
    # repetition counts the prompt too: 2.0 / 1.2 < 1.9
    assert draws(sampler, logits, seq(prompt=(1,), temperature=0,
                                      repetition_penalty=1.2), 1) == {2}


def test_min_p_drops_the_unlikely_tail():
    sampler = Sampler([0])
    logits = np.log([0.05, 0.5, 0.45]).tolist()
    assert draws(sampler, logits, seq(temperature=1.0, seed=3)) == {0, 1, 2}
    assert draws(sampler, logits, seq(temperature=1.0, seed=3, min_p=0.2)) == {1, 2}


def test_logprobs_are_those_of_the_distribution_drawn_from():
    sampler = Sampler([0], token_text=lambda t: f"<{t}>")
    logits = np.log([0.1, 0.6, 0.3]).astype(np.float32)
    state = seq(temperature=1.0, top_p=0.7, seed=1, logprobs=2)
    sample = sampler.sample(logits[None], [state])[0]
    top = sample.logprob.top_logprobs
    assert [t.token for t in top] == ["<1>", "<2>"]
    # top_p 0.7 keeps 0.6 and 0.3, renormalized
    assert np.allclose([np.exp(t.logprob) for t in top], [0.6 / 0.9, 0.3 / 0.9], atol=1e-5)
    assert sample.logprob.token == f"<{sample.token}>"
    assert sample.logprob.logprob == next(t.logprob for t in top if t.token == f"<{sample.token}>")


def test_a_grammar_masks_every_token_that_would_leave_it():
    sampler = Sampler([0], guides=GuideCompiler.for_token_bytes(ASCII, [0]))
    state = seq(temperature=1.0, seed=2, guide=Guide(kind="regex", spec="ab|ac"))
    sampler.prepare(state)
    flat = np.zeros(128, dtype=np.float32)
    first = draws(sampler, flat, state, 50)
    assert first == {ord("a")}
    state.generated.append(ord("a"))
    sampler.accept(state, ord("a"))
    assert draws(sampler, flat, state, 100) == {ord("b"), ord("c")}
    sampler.accept(state, ord("c"))
    assert sampler.guide_complete(state) or draws(sampler, flat, state, 20) == {0}


def test_a_runner_without_guides_refuses_a_guided_request():
    with pytest.raises(EngineError) as refused:
        Sampler([0]).prepare(seq(guide=Guide(kind="regex", spec="a")))
    assert refused.value.field == "response_format"


# ---- grammars -----------------------------------------------------------------------------


@pytest.mark.parametrize(("guide", "bad"), [
    (Guide(kind="json_schema", spec=json.dumps({"type": "object"})), False),
    (Guide(kind="json_schema", spec=json.dumps({"type": "array", "uniqueItems": True})), True),
    (Guide(kind="json_schema", spec="{oops"), True),
    (Guide(kind="regex", spec="a("), True),
    (Guide(kind="choice", spec=json.dumps(["a", "b"])), False),
    (Guide(kind="grammar", spec='start: "a" | "b"'), False),
    (Guide(kind="grammar", spec="root ::= \"a\" | \"b\""), False),  # GBNF
    (Guide(kind="grammar", spec='start: "a" | undefined_rule'), True),
])
def test_guides_are_checked_without_a_tokenizer(guide, bad):
    error = guide_error(guide)
    assert (error is not None) == bad
    assert error is None or "\n" not in error


def test_strict_schemas_close_objects_and_bound_decimals():
    schema = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {}},
        "b": {"type": "number"}, "c": {"type": "number", "multipleOf": 0.5},
        "d": {"type": "object", "additionalProperties": True}}}
    strict = strict_schema(schema)
    assert strict["additionalProperties"] is False
    assert strict["properties"]["a"]["additionalProperties"] is False
    assert strict["properties"]["b"]["multipleOf"] == 1e-6
    assert strict["properties"]["c"]["multipleOf"] == 0.5
    assert strict["properties"]["d"]["additionalProperties"] is True
    assert "additionalProperties" not in schema  # the caller's schema is left alone


# ---- tool calls ---------------------------------------------------------------------------

WEATHER = Tool(name="weather", parameters={"type": "object", "properties": {
    "city": {"type": "string"}}, "required": ["city"]})
CLOCK = Tool(name="clock", parameters={"type": "object", "properties": {}})


def test_a_named_call_generates_its_arguments_and_required_a_list_of_calls():
    named = json.loads(forced_call_guide([WEATHER, CLOCK], "weather", True).spec)
    assert named["properties"] == WEATHER.parameters["properties"]
    assert named["additionalProperties"] is False
    required = json.loads(forced_call_guide([WEATHER, CLOCK], None, False).spec)
    assert required["type"] == "array" and required["maxItems"] == 1
    assert [c["properties"]["name"]["const"] for c in required["items"]["anyOf"]] == \
        ["weather", "clock"]
    calls = forced_calls('[{"name":"clock","arguments":{}}]', None)
    assert [(c.name, c.arguments) for c in calls] == [("clock", "{}")]
    cut = forced_calls('[{"name":"clock","arguments":{}},{"name":"weather","argu', None)
    assert [c.name for c in cut] == ["clock"]  # the completed call survives a cut answer
    assert forced_calls("[", None) == []
    (call,) = forced_calls('{"city":"Oslo"}', "weather")
    assert call.name == "weather" and json.loads(call.arguments) == {"city": "Oslo"}


def test_the_hermes_parser_reads_calls_and_keeps_the_text_before_them():
    text = ('Let me check.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}'
            '\n</tool_call>\n<tool_call>{"name": "clock", "arguments": {}}</tool_call>')
    content, calls = parse_hermes(text)
    assert content == "Let me check."
    assert [c.name for c in calls] == ["weather", "clock"]
    assert json.loads(calls[0].arguments) == {"city": "Oslo"}
    assert len({c.id for c in calls}) == 2
    assert parse_hermes("no calls here") == ("no calls here", [])
    broken = "<tool_call>{not json}</tool_call>"
    assert parse_hermes(broken) == (broken, [])


def test_the_llama3_json_parser_reads_whole_answer_calls_only():
    content, calls = parse_llama3_json('{"name": "weather", "parameters": {"city": "Rome"}}')
    assert content is None and json.loads(calls[0].arguments) == {"city": "Rome"}
    assert parse_llama3_json("The weather is fine.") == ("The weather is fine.", [])


# ---- choices ------------------------------------------------------------------------------


def chunk(text, reason=None, **fields) -> OutputChunk:
    return OutputChunk(text=text, finish_reason=reason, prompt_tokens=3,
                       completion_tokens=len(text), **fields)


def test_a_chat_choice_with_calls_ends_with_tool_calls_unless_cut():
    choice = chat_choice(0, chunk('{"city":"Oslo"}', "stop"), mode="named", named="weather")
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "weather"
    cut = chat_choice(0, chunk('{"city":"Os', "length"), mode="named", named="weather")
    assert cut["finish_reason"] == "length"
    plain = chat_choice(1, chunk("hi", "stop"))
    assert plain == {"index": 1, "message": {"role": "assistant", "content": "hi"},
                     "logprobs": None, "finish_reason": "stop"}


def test_a_streamed_named_call_sends_its_name_once_then_argument_pieces():
    stream = ChatChoiceStream(mode="named", named="weather")
    deltas = [*stream.deltas(chunk('{"ci')), *stream.deltas(chunk('ty":"Oslo"}', "stop"))]
    first, second = deltas
    call = first[0]["tool_calls"][0]
    assert call["function"] == {"name": "weather", "arguments": '{"ci'} and call["id"]
    assert "id" not in second[0]["tool_calls"][0] and second[1] == "tool_calls"
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d, _ in deltas) == \
        '{"city":"Oslo"}'


def test_a_streamed_auto_answer_is_held_and_sent_whole_with_its_calls():
    stream = ChatChoiceStream(mode="auto", parser="hermes")
    assert stream.deltas(chunk("Sure. <tool_")) == [({"role": "assistant", "content": ""},
                                                     None)]
    out = stream.deltas(chunk('call>{"name":"clock","arguments":{}}</tool_call>', "stop"))
    assert out[0] == ({"content": "Sure."}, None)
    assert out[1][0]["tool_calls"][0]["function"]["name"] == "clock"
    assert out[-1] == ({}, "tool_calls")


def test_completion_logprobs_offsets_count_from_the_echoed_prompt():
    entries = [TokenLogprob(token=t, logprob=-0.5, bytes=tuple(t.encode())) for t in ("ab", "c")]
    logprobs = completion_logprobs(entries, offset=4)
    assert logprobs["text_offset"] == [4, 6] and logprobs["tokens"] == ["ab", "c"]
