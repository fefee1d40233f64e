"""LangChain's standard integration suite for ChatRayServe, against a live application on
the demo model (SmolLM2-135M-Instruct, sym_int4, engine ipex_llm), called through its handle;
then a tool-calling loop and structured output through ChatRayServe and through
langchain-openai's ChatOpenAI over the same application's HTTP API.

Every call is greedy (temperature 0). The suite checks plumbing (invoke, stream, batch,
usage, stop, tool messages, forced tool calls, schema-constrained answers), which must
pass; tests that judge whether a 135M model chooses well (call a tool unforced, follow a
JSON shape it was only told about in words) are marked xfail with the reason, so a pass
there is reported, not required. Skipped standard tests say why in their own skip reason
(features this server lacks: images, audio, PDFs, Anthropic inputs, another model).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_tests.integration_tests import ChatModelIntegrationTests
from pydantic import BaseModel, Field

from deployments.constants import DEMO_CHECKPOINT_DIR, DEMO_MODEL_NAME
from deployments.convert import ensure_demo_checkpoint
from langchain_adapter import ChatRayServe
from tests.helpers import serve_app
from tests.langchain_capabilities import ChatRayServeCapabilities

pytestmark = [pytest.mark.model, pytest.mark.timeout(600)]

APP = "llm"
REPO_ROOT = Path(__file__).resolve().parents[2]
# Answers are capped short (CPU decoding of every test's answer is most of the suite's
# time), except structured answers: room for a whole JSON joke.
MAX_TOKENS = 48
STRUCTURED_MAX_TOKENS = 160
# Greedy, the 135M model loops inside a JSON string ('{"setup": "A cat sits on a porch
# swing. A cat sits on a porch swing. ...') until max_tokens; Hugging Face's repetition
# penalty, the usual remedy for small models, lets it close the joke (measured).
STRUCTURED_SETTINGS = {"max_tokens": STRUCTURED_MAX_TOKENS, "repetition_penalty": 1.3}
QUALITY = ("SmolLM2-135M-Instruct decides this poorly: the test judges the model's choice "
           "(unforced), not the adapter's plumbing")
# tool_choice "any" (OpenAI's "required"): the router constrains the answer to a JSON list of
# calls that follow the tools' schemas; what the 135M model puts in them is its own: measured,
# magic_function(3) becomes input 1 or 100, and a greedy list can run on until max_tokens.
# Named tool_choice and "any" where any argument will do pass (test_tool_choice,
# test_bind_runnables_as_tools, test_a_tool_calling_loop_through_the_handle).
FORCED_ANY = ("SmolLM2-135M-Instruct under tool_choice 'any': calls follow the schema, but the "
              "model picks wrong argument values (magic_function(3) -> input 1 or 100) or "
              "writes calls until max_tokens; the test checks the values")


@pytest.fixture(scope="module", autouse=True)
def demo_app() -> Iterator[str]:
    """The demo model served on a fresh local Ray, over the handle and HTTP; its base URL."""
    checkpoint = ensure_demo_checkpoint(REPO_ROOT / DEMO_CHECKPOINT_DIR)
    args = {"engine": "ipex_llm", "checkpoint_path": str(checkpoint), "max_batch_size": 8}
    with serve_app(args) as url:
        yield url


class TestChatRayServeStandard(ChatRayServeCapabilities, ChatModelIntegrationTests):

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"app_name": APP, "temperature": 0, "max_tokens": MAX_TOKENS}




    @property
    def structured_output_kwargs(self) -> dict[str, Any]:
        return {"method": "json_schema", **STRUCTURED_SETTINGS}




    @pytest.mark.xfail(reason=FORCED_ANY, strict=False)
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_tool_calling(self, model: ChatRayServe) -> None:
        super().test_tool_calling(model)

    @pytest.mark.xfail(reason=FORCED_ANY, strict=False)
    async def test_tool_calling_async(self, model: ChatRayServe) -> None:
        await super().test_tool_calling_async(model)

    @pytest.mark.xfail(reason=FORCED_ANY, strict=False)
    def test_tool_calling_with_no_arguments(self, model: ChatRayServe) -> None:
        super().test_tool_calling_with_no_arguments(model)

    @pytest.mark.xfail(reason=f"{QUALITY}: after the tool's answer it must stop calling the "
                       "tool and answer in words, with tool_choice auto", strict=False)
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model: ChatRayServe) -> None:
        super().test_agent_loop(model)

    @pytest.mark.xfail(reason=f"{QUALITY}: json_object mode constrains the answer to some "
                       "JSON object, and the keys 'setup' and 'punchline' are only asked for "
                       "in the prompt", strict=False)
    def test_json_mode(self, model: ChatRayServe) -> None:
        super().test_json_mode(model)


# ---- a tool loop and structured output, through the handle and over HTTP -----------------


@tool
def add(a: int, b: int) -> int:
    """Add two integers a and b."""
    return a + b


class Capital(BaseModel):
    """A country's capital city."""

    country: str = Field(description="the country")
    capital: str = Field(description="its capital city")


QUESTION = HumanMessage("What is 2 + 3? Use the add tool.")
FRANCE = "What is the capital of France?"


def tool_loop(chat: Any) -> tuple[AIMessage, ToolMessage, AIMessage]:
    """The forced call of ``add``, the tool's result, and the answer after it (tool_choice
    none: the loop's end must be words)."""
    calling = chat.bind_tools([add], tool_choice="add").invoke([QUESTION])
    assert isinstance(calling, AIMessage)
    assert [call["name"] for call in calling.tool_calls] == ["add"]
    (call,) = calling.tool_calls
    assert set(call["args"]) == {"a", "b"} and call["id"]
    result = add.invoke(call)
    assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
    answer = chat.bind_tools([add], tool_choice="none").invoke([QUESTION, calling, result])
    assert isinstance(answer, AIMessage) and not answer.tool_calls
    assert isinstance(answer.content, str) and answer.content.strip()
    return calling, result, answer


def test_a_tool_calling_loop_through_the_handle() -> None:
    chat = ChatRayServe(app_name=APP, temperature=0, max_tokens=64)
    calling, result, _ = tool_loop(chat)
    assert calling.response_metadata["finish_reason"] == "tool_calls"
    assert result.content == str(calling.tool_calls[0]["args"]["a"]
                                 + calling.tool_calls[0]["args"]["b"])
    streamed = None
    for piece in chat.bind_tools([add], tool_choice="add").stream([QUESTION]):
        streamed = piece if streamed is None else streamed + piece
    assert streamed is not None and streamed.tool_calls == [
        {**calling.tool_calls[0], "id": streamed.tool_calls[0]["id"]}]


def test_structured_output_through_the_handle() -> None:
    chat = ChatRayServe(app_name=APP, temperature=0, max_tokens=64)
    for method in ("json_schema", "function_calling"):
        capital = chat.with_structured_output(Capital, method=method).invoke(FRANCE)
        assert isinstance(capital, Capital), method
        assert "Paris" in capital.capital, (method, capital)


@pytest.fixture(scope="module")
def chat_openai(demo_app: str) -> Any:
    langchain_openai = pytest.importorskip("langchain_openai")
    return langchain_openai.ChatOpenAI(base_url=f"{demo_app}/v1", api_key="unused",
                                       model=DEMO_MODEL_NAME, temperature=0, max_tokens=64,
                                       max_retries=0)


def test_chatopenai_structured_output_over_http(chat_openai: Any) -> None:
    capital = chat_openai.with_structured_output(Capital).invoke(FRANCE)  # json_schema
    assert isinstance(capital, Capital) and "Paris" in capital.capital
    as_dict = chat_openai.with_structured_output(Capital.model_json_schema()).invoke(FRANCE)
    assert set(as_dict) == {"country", "capital"}


def test_chatopenai_tool_calling_loop_over_http(chat_openai: Any) -> None:
    calling, _, _ = tool_loop(chat_openai)
    assert calling.response_metadata["finish_reason"] == "tool_calls"


def test_chatopenai_and_the_adapter_send_the_same_request() -> None:
    """The adapter's body for a tool call is ChatOpenAI's: same tools, same tool_choice."""
    langchain_openai = pytest.importorskip("langchain_openai")
    openai_chat = langchain_openai.ChatOpenAI(model=DEMO_MODEL_NAME, api_key="unused")
    bound = openai_chat.bind_tools([add], tool_choice="add")
    openai_payload = openai_chat._get_request_payload([QUESTION], **bound.kwargs)
    ours = ChatRayServe(app_name=APP)
    body = ours._chat_body([QUESTION], None, ours.bind_tools([add], tool_choice="add").kwargs,
                           False)
    assert body["tools"] == openai_payload["tools"]
    assert body["tool_choice"] == openai_payload["tool_choice"]
    assert body["messages"] == json.loads(json.dumps(openai_payload["messages"]))
