"""vLLM's /tokenize, /detokenize and /version shapes, without Ray."""

from __future__ import annotations

import importlib.metadata
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployments import tokenize_api
from deployments.contract import ChatTurn, TokenizeRequest, TokenizeResult
from deployments.errors import ServiceError
from deployments.openai_protocol import MAX_TOKEN_ID
from deployments.tokenize_api import (
    DISTRIBUTION,
    DetokenizeBody,
    TokenizeChatBody,
    TokenizeCompletionBody,
    detokenize_response,
    parse_detokenize_body,
    parse_tokenize_body,
    tokenize_response,
    version_response,
)

ROOT = Path(__file__).resolve().parents[2]
CHAT = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]


def test_a_prompt_body():
    body = parse_tokenize_body({"model": "m", "prompt": "hello"})
    assert isinstance(body, TokenizeCompletionBody)
    assert body.model == "m" and body.add_special_tokens and not body.return_token_strs
    assert body.tokenize_request() == TokenizeRequest(prompt="hello")


def test_a_chat_body_by_the_presence_of_messages():
    body = parse_tokenize_body(json.dumps({"messages": CHAT}).encode())
    assert isinstance(body, TokenizeChatBody)
    assert body.model is None and body.add_generation_prompt
    assert not body.add_special_tokens and not body.continue_final_message
    assert body.tokenize_request() == TokenizeRequest(messages=(
        ChatTurn(role="system", content="s"), ChatTurn(role="user", content="hi")))


def test_chat_content_parts_and_developer_messages_as_chat_completions_sends_them():
    body = parse_tokenize_body({"messages": [
        {"role": "developer", "content": "d"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                     "text": "b"}]}]})
    turns = body.tokenize_request().messages
    assert [(t.role, t.content) for t in turns] == [("system", "d"), ("user", "ab")]


def test_vllms_defaults_and_nulls_are_accepted():
    parse_tokenize_body({"prompt": "x", "add_special_tokens": True, "return_token_strs": False,
                         "model": None, "messages": None, "unknown": 1})
    parse_tokenize_body({"messages": CHAT, "add_generation_prompt": True,
                         "continue_final_message": False, "add_special_tokens": True,
                         "return_token_strs": None, "chat_template": None,
                         "chat_template_kwargs": {}, "tools": None, "prompt": None})


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": 3}, "prompt"),
    ({}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": "x", "model": 1}, "model"),
    ({"prompt": "x", "add_special_tokens": 1}, "add_special_tokens"),
    ({"prompt": "x", "add_special_tokens": False}, "add_special_tokens"),
    ({"prompt": "x", "return_token_strs": True}, "return_token_strs"),
    ({"prompt": "x", "return_token_strs": "yes"}, "return_token_strs"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": CHAT, "prompt": "x"}, "prompt"),
    ({"messages": CHAT, "add_generation_prompt": False}, "add_generation_prompt"),
    ({"messages": CHAT, "continue_final_message": True}, "continue_final_message"),
    ({"messages": CHAT, "chat_template": "{{ x }}"}, "chat_template"),
    ({"messages": CHAT, "chat_template_kwargs": {"enable_thinking": False}},
     "chat_template_kwargs"),
    ({"messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
    ({"messages": CHAT, "add_special_tokens": "no"}, "add_special_tokens"),
])
def test_bad_tokenize_bodies_are_a_400_naming_the_field(body, param):
    for form in (body, json.dumps(body).encode()):
        with pytest.raises(ServiceError) as caught:
            parse_tokenize_body(form)
        assert caught.value.status_code == 400 and caught.value.param == param


@pytest.mark.parametrize("raw", [b"{", b"", b"[1]", b"null", b'"x"', b"\xff"])
def test_a_body_that_is_not_a_json_object_is_a_400(raw):
    with pytest.raises(ServiceError) as caught:
        parse_tokenize_body(raw)
    assert caught.value.status_code == 400


def test_the_tokenize_answer_is_vllms():
    result = TokenizeResult(tokens=[1, 2, 3], count=3, max_model_len=4096)
    assert tokenize_response(result) == {"count": 3, "max_model_len": 4096,
                                         "tokens": [1, 2, 3], "token_strs": None}


def test_a_detokenize_body():
    body = parse_detokenize_body(b'{"model": "m", "tokens": [0, 5, 7]}')
    assert isinstance(body, DetokenizeBody) and body.tokens == [0, 5, 7] and body.model == "m"
    assert parse_detokenize_body({"tokens": []}).tokens == []
    assert detokenize_response("hello") == {"prompt": "hello"}


@pytest.mark.parametrize(("body", "param"), [
    ({"tokens": [-1]}, "tokens.0"),
    ({"tokens": [1, MAX_TOKEN_ID + 1]}, "tokens.1"),
    ({"tokens": [1.0]}, "tokens.0"),
    ({"tokens": [True]}, "tokens.0"),
    ({"tokens": "1 2"}, "tokens"),
    ({}, "tokens"),
    ({"tokens": [1], "model": 3}, "model"),
])
def test_bad_detokenize_bodies_are_a_400_naming_the_field(body, param):
    with pytest.raises(ServiceError) as caught:
        parse_detokenize_body(body)
    assert caught.value.status_code == 400 and caught.value.param == param


def test_the_version_is_this_projects():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == DISTRIBUTION
    assert version_response() == {"version": importlib.metadata.version(project["name"])}


def test_the_version_of_a_project_not_installed(monkeypatch):
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(tokenize_api.importlib.metadata, "version", not_installed)
    assert version_response() == {"version": "0+unknown"}


json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=10) | st.floats(
    allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["role", "content", "type", "text"]) | st.text(max_size=6), inner,
        max_size=4),
    max_leaves=10)
FIELDS = ["model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
          "return_token_strs", "continue_final_message", "tokens", "tools"]


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from([{"prompt": "x"}, {"messages": CHAT}, {"tokens": [1]}]),
       change=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=3),
       as_bytes=st.booleans(), raw=st.none() | st.binary(max_size=40))
def test_any_body_parses_or_is_a_400(base, change, as_bytes, raw):
    body: Any = raw if raw is not None else {**base, **change}
    if as_bytes and raw is None:
        body = json.dumps(body).encode()
    for parse in (parse_tokenize_body, parse_detokenize_body):
        try:
            parsed = parse(body)
        except ServiceError as error:
            assert error.status_code == 400 and error.message
        else:
            if hasattr(parsed, "tokenize_request"):
                parsed.tokenize_request()
