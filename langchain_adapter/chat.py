"""ChatRayServe: a LangChain chat model over the router's ``/v1/chat/completions`` semantics.

The replica applies the model's chat template; messages travel as OpenAI dicts, tool calls
and tool results included. Tool calling and structured output follow ``ChatOpenAI``:
``bind_tools`` sends OpenAI's ``tools`` / ``tool_choice``, ``with_structured_output`` a
``response_format`` (json_schema, json_object) or a forced tool call.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import (
    JsonOutputKeyToolsParser,
    PydanticToolsParser,
    make_invalid_tool_call,
    parse_tool_call,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import (
    convert_to_openai_function,
    convert_to_openai_tool,
)
from langchain_core.utils.pydantic import is_basemodel_subclass

from deployments.openai_protocol import cached_tokens
from langchain_adapter.base import FORBID_UNKNOWN_FIELDS, RayServeModel, StreamState

_ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool"}
# LangChain content blocks an assistant turn may carry that are not its text: tool calls
# (v1 "tool_call", Anthropic's "tool_use", which travel as OpenAI tool_calls instead) and
# reasoning. Dropped from the content sent back, as ChatOpenAI drops them.
_NOT_TEXT_OF_AN_ANSWER = frozenset(("tool_call", "tool_call_chunk", "tool_use", "thinking",
                                    "reasoning", "reasoning_content", "invalid_tool_call",
                                    "server_tool_call", "server_tool_result"))
# OpenAI's tool_choice values (LangChain's "any" and True mean "required").
_TOOL_CHOICES = ("auto", "none", "required")

ToolLike = Mapping[str, Any] | type | Callable[..., Any] | BaseTool


class ChatRayServe(RayServeModel, BaseChatModel):
    """A chat model whose model runs in a Ray Serve application (see RayServeLLM).

    Takes system, human, AI (with their tool calls) and tool messages. ``bind_tools`` and
    ``with_structured_output`` work as ChatOpenAI's, over the router's OpenAI tools and
    ``response_format``. Answers carry ``tool_calls`` (``invalid_tool_calls`` for
    arguments that are not JSON), ``usage_metadata`` and
    ``response_metadata["finish_reason"]`` (and ``["logprobs"]`` when asked for).
    """

    model_config = FORBID_UNKNOWN_FIELDS

    @property
    def _llm_type(self) -> str:
        return "ray_serve_chat"

    # ---- tools and structured output -----------------------------------------------------

    def bind_tools(self, tools: Sequence[ToolLike], *,
                   tool_choice: str | bool | Mapping[str, Any] | None = None,
                   parallel_tool_calls: bool | None = None, strict: bool | None = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """This model with ``tools`` offered on every call (OpenAI's function tools).

        ``tools``: anything ``convert_to_openai_tool`` takes (LangChain tools, functions,
        pydantic models, TypedDicts, JSON schemas, OpenAI tool dicts). ``tool_choice``:
        "auto", "none", "required" (also "any" or True), a bound tool's name, or OpenAI's
        ``{"type": "function", "function": {"name": ...}}``; None or False leave the
        server's default (auto). ``strict`` marks each function strict (None: not sent).
        ``kwargs`` are bound too (generation settings).
        """
        formatted = [convert_to_openai_tool(tool, strict=strict) for tool in tools]
        names = [tool["function"]["name"] for tool in formatted if "function" in tool]
        choice = _tool_choice(tool_choice, names)
        if choice is not None:
            kwargs["tool_choice"] = choice
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return self.bind(tools=formatted, **kwargs)

    def with_structured_output(
            self, schema: Mapping[str, Any] | type | None = None, *,
            method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
            include_raw: bool = False, strict: bool | None = None,
            **kwargs: Any) -> Runnable[LanguageModelInput, Any]:
        """This model answering in ``schema``'s shape (a pydantic model, a TypedDict, a JSON
        schema or an OpenAI function), parsed into the model (pydantic) or a dict.

        As ChatOpenAI's. ``method``: "json_schema" (the default) sends OpenAI's
        ``response_format`` json_schema, which the server enforces while decoding;
        "function_calling" binds the schema as the one tool and forces its call;
        "json_mode" asks for any JSON object (``response_format`` json_object: say the
        keys in the prompt). ``include_raw``: answer ``{"raw": AIMessage, "parsed": ...,
        "parsing_error": ...}`` instead of raising when parsing fails. ``strict`` is sent
        with the schema (not with json_mode).
        """
        if strict is not None and method == "json_mode":
            raise ValueError("strict is not supported with method='json_mode'")
        if schema is None and method != "json_mode":
            raise ValueError(f"method={method!r} needs a schema")
        pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        parser: Runnable
        if method == "function_calling":
            name = convert_to_openai_tool(schema)["function"]["name"]  # type: ignore[arg-type]
            llm = self.bind_tools([schema], tool_choice=name,  # type: ignore[list-item]
                                  parallel_tool_calls=False, strict=strict,
                                  ls_structured_output_format={
                                      "kwargs": {"method": method, "strict": strict},
                                      "schema": schema},
                                  **kwargs)
            parser = (PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
                      if pydantic else JsonOutputKeyToolsParser(key_name=name,
                                                                first_tool_only=True))
        elif method == "json_schema":
            llm = self.bind(response_format=json_schema_format(schema, strict=strict),  # type: ignore[arg-type]
                            ls_structured_output_format={
                                "kwargs": {"method": method, "strict": strict},
                                "schema": schema},
                            **kwargs)
            parser = (PydanticOutputParser(pydantic_object=schema)  # type: ignore[arg-type]
                      if pydantic else JsonOutputParser())
        elif method == "json_mode":
            llm = self.bind(response_format={"type": "json_object"},
                            ls_structured_output_format={"kwargs": {"method": method},
                                                         "schema": schema},
                            **kwargs)
            parser = (PydanticOutputParser(pydantic_object=schema)  # type: ignore[arg-type]
                      if pydantic else JsonOutputParser())
        else:
            raise ValueError(f"unknown method {method!r}: expected 'json_schema', "
                             "'function_calling' or 'json_mode'")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser,
                                            parsing_error=lambda _: None)
        unparsed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([unparsed],
                                                            exception_key="parsing_error")

    # ---- calls ---------------------------------------------------------------------------

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None,
                  **kwargs: Any) -> ChatResult:
        response = self._router.submit("chat_completions", self._chat_body(messages, stop,
                                                                           kwargs, False))
        return self._result(self._router.wait_all([response])[0])

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None,
                         **kwargs: Any) -> ChatResult:
        response = self._router.submit("chat_completions", self._chat_body(messages, stop,
                                                                           kwargs, False))
        return self._result((await self._router.await_all([response]))[0])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        yield from self._stream_pieces("chat_completions_stream",
                                       self._chat_body(messages, stop, kwargs, True),
                                       run_manager, _piece, self._last_chunk)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        async for piece in self._astream_pieces("chat_completions_stream",
                                                self._chat_body(messages, stop, kwargs, True),
                                                run_manager, _piece, self._last_chunk):
            yield piece

    def _chat_body(self, messages: Sequence[BaseMessage], stop: list[str] | None,
                   kwargs: Mapping[str, Any], stream: bool) -> dict[str, Any]:
        return self._body(stop, kwargs, stream=stream,
                          messages=[openai_message(message) for message in messages])

    def _result(self, response: Mapping[str, Any]) -> ChatResult:
        """One generation per choice (``n`` of them, 1 by default), each message with the
        answer's usage, as ChatOpenAI reports it."""
        usage = response["usage"]
        generations = []
        for choice in sorted(response["choices"], key=lambda choice: choice["index"]):
            metadata = {"finish_reason": choice["finish_reason"],
                        "model_name": response.get("model") or self.model}
            if choice.get("logprobs"):
                metadata["logprobs"] = choice["logprobs"]
            message = ai_message(choice["message"], response_metadata=metadata,
                                 usage_metadata=_usage_metadata(usage))
            generations.append(ChatGeneration(message=message, generation_info={
                key: value for key, value in metadata.items() if key != "model_name"}))
        return ChatResult(generations=generations,
                          llm_output={"token_usage": usage, "model_name": self.model})

    def _last_chunk(self, state: StreamState) -> ChatGenerationChunk:
        """The stream's last piece: the ending choice's delta, finish_reason, the usage."""
        metadata = {"finish_reason": state.finish_reason, "model_name": self.model}
        if state.last_choice.get("logprobs"):
            metadata["logprobs"] = state.last_choice["logprobs"]
        message = _message_chunk(
            state.last_choice.get("delta") or {}, chunk_position="last",
            response_metadata=metadata,
            usage_metadata=_usage_metadata(state.usage) if state.usage else None)
        return ChatGenerationChunk(message=message,
                                   generation_info={"finish_reason": state.finish_reason})


# ---- LangChain messages <-> OpenAI dicts -------------------------------------------------


def openai_message(message: BaseMessage) -> dict[str, Any]:
    """``message`` as an OpenAI Chat Completions message.

    An AI message's tool calls become OpenAI ``tool_calls`` (arguments as JSON text; an
    invalid call's text as it was), its content then ``None`` when it has no text; a
    ToolMessage becomes a ``tool`` message answering ``tool_call_id``.
    """
    role = message.role if isinstance(message, ChatMessage) else _ROLES.get(message.type)
    if role is None:
        raise ValueError(f"{type(message).__name__} is not supported: send system, human, "
                         "AI and tool messages")
    if isinstance(message, AIMessage):
        return _assistant_message(message)
    if isinstance(message, ToolMessage):
        return {"role": "tool", "tool_call_id": message.tool_call_id,
                "content": _tool_content(message.content)}
    out: dict[str, Any] = {"role": role, "content": _content(message.content)}
    if message.name is not None and isinstance(message, HumanMessage | SystemMessage):
        out["name"] = message.name
    return out


def _assistant_message(message: AIMessage) -> dict[str, Any]:
    content = message.content
    if isinstance(content, list):
        content = [part for part in content
                   if not (isinstance(part, dict) and part.get("type") in _NOT_TEXT_OF_AN_ANSWER)]
    out: dict[str, Any] = {"role": "assistant", "content": _content(content)}
    if message.name is not None:
        out["name"] = message.name
    calls = [openai_tool_call(call["id"], call["name"], json.dumps(call["args"],
                                                                   ensure_ascii=False))
             for call in message.tool_calls]
    calls += [openai_tool_call(call["id"], call["name"], call["args"])
              for call in message.invalid_tool_calls]
    if calls:
        out["tool_calls"] = calls
        out["content"] = out["content"] or None
    return out


def openai_tool_call(call_id: str | None, name: str | None, arguments: str | None
                     ) -> dict[str, Any]:
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": arguments or ""}}


def _content(content: str | list[Any]) -> str | list[Any]:
    """Text as it is; a list of content blocks with bare strings made text blocks (LangChain
    allows them), and an empty list the empty text."""
    if isinstance(content, str):
        return content
    parts = [{"type": "text", "text": part} if isinstance(part, str) else part
             for part in content]
    return parts or ""


def _tool_content(content: str | list[Any]) -> str | list[Any]:
    """A tool's result: text, its text blocks joined, or (other blocks) the list itself."""
    parts = _content(content)
    if isinstance(parts, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                       for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def ai_message(message: Mapping[str, Any], **fields: Any) -> AIMessage:
    """An OpenAI assistant message as LangChain's: tool calls parsed (``args`` a dict), the
    ones whose arguments are not a JSON object kept as ``invalid_tool_calls``."""
    tool_calls, invalid = [], []
    for raw in message.get("tool_calls") or ():
        try:
            call = parse_tool_call(dict(raw), return_id=True)
        except Exception as error:  # OutputParserException: arguments not JSON
            invalid.append(make_invalid_tool_call(dict(raw), str(error)))
            continue
        if call is None or not isinstance(call["args"], dict):
            invalid.append(make_invalid_tool_call(dict(raw), "arguments are not a JSON object"))
        else:
            tool_calls.append(call)
    return AIMessage(content=message.get("content") or "", tool_calls=tool_calls,
                     invalid_tool_calls=invalid, **fields)


def _message_chunk(delta: Mapping[str, Any], **fields: Any) -> AIMessageChunk:
    """A stream delta as a message chunk: its text and its tool call pieces, which LangChain
    joins by ``index`` (OpenAI sends a call's id and name once, its arguments in pieces)."""
    return AIMessageChunk(
        content=delta.get("content") or "",
        tool_call_chunks=[tool_call_chunk(name=(raw.get("function") or {}).get("name"),
                                          args=(raw.get("function") or {}).get("arguments"),
                                          id=raw.get("id"), index=raw.get("index"))
                          for raw in delta.get("tool_calls") or ()],
        **fields)


def _piece(choice: Mapping[str, Any]) -> ChatGenerationChunk:
    metadata = {"logprobs": choice["logprobs"]} if choice.get("logprobs") else {}
    return ChatGenerationChunk(message=_message_chunk(choice["delta"],
                                                      response_metadata=metadata))


def _tool_choice(choice: str | bool | Mapping[str, Any] | None, names: Sequence[str]
                 ) -> str | dict[str, Any] | None:
    """LangChain's tool_choice as OpenAI's: a tool's name forces that tool, "any" and True
    force some tool; None and False send nothing (the server's default, auto)."""
    if choice is None or choice is False:
        return None
    if choice is True or choice == "any":
        return "required"
    if isinstance(choice, Mapping):
        return dict(choice)
    if not isinstance(choice, str):
        raise ValueError(f"tool_choice {choice!r}: expected a string, a bool or a dict")
    if choice in names:
        return {"type": "function", "function": {"name": choice}}
    if choice in _TOOL_CHOICES:
        return choice
    raise ValueError(f"tool_choice {choice!r} is neither a bound tool ({', '.join(names)}) "
                     "nor one of 'auto', 'none', 'required', 'any'")


def json_schema_format(schema: Mapping[str, Any] | type, *, strict: bool | None = None
                       ) -> dict[str, Any]:
    """OpenAI's ``response_format`` json_schema for ``schema`` (as ChatOpenAI builds it): a
    pydantic model, TypedDict or JSON schema becomes ``{"name", "description", "schema",
    "strict"}``; a ready ``response_format`` or ``json_schema`` object is used as it is."""
    if isinstance(schema, Mapping) and schema.get("type") == "json_schema" \
            and "json_schema" in schema:
        return dict(schema)
    if isinstance(schema, Mapping) and "name" in schema and "schema" in schema:
        return {"type": "json_schema", "json_schema": dict(schema)}
    if strict is None:
        given = schema.get("strict") if isinstance(schema, Mapping) else None
        strict = given if isinstance(given, bool) else False
    function = convert_to_openai_function(schema, strict=strict)
    function["schema"] = function.pop("parameters")
    return {"type": "json_schema", "json_schema": function}


def _usage_metadata(usage: Mapping[str, Any]) -> UsageMetadata:
    return UsageMetadata(input_tokens=usage["prompt_tokens"],
                         output_tokens=usage["completion_tokens"],
                         total_tokens=usage["total_tokens"],
                         input_token_details={"cache_read": cached_tokens(usage)})
