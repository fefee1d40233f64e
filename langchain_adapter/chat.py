"""ChatRayServe: a LangChain chat model over the router's ``/v1/chat/completions`` semantics.

The replica applies the model's chat template; messages travel as OpenAI dicts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from deployments.openai_protocol import cached_tokens
from langchain_adapter.base import FORBID_UNKNOWN_FIELDS, RayServeModel, StreamState

_ROLES = {"system": "system", "human": "user", "ai": "assistant"}


class ChatRayServe(RayServeModel, BaseChatModel):
    """A chat model whose model runs in a Ray Serve application (see RayServeLLM).

    Supports system, human and AI messages (no tools: the server has no tool calling).
    Answers carry ``usage_metadata`` and ``response_metadata["finish_reason"]``.
    """

    model_config = FORBID_UNKNOWN_FIELDS

    @property
    def _llm_type(self) -> str:
        return "ray_serve_chat"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
        """Refused: the server has no tool calling (LangChain's default says nothing)."""
        raise NotImplementedError("ChatRayServe cannot bind tools: the server has no tool "
                                  "calling; prompt for the output format instead")

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
                          messages=[_openai_message(message) for message in messages])

    def _result(self, response: Mapping[str, Any]) -> ChatResult:
        choice = response["choices"][0]
        usage = response["usage"]
        message = AIMessage(
            content=choice["message"]["content"],
            response_metadata={"finish_reason": choice["finish_reason"],
                               "model_name": self.model},
            usage_metadata=_usage_metadata(usage))
        return ChatResult(
            generations=[ChatGeneration(message=message, generation_info={
                "finish_reason": choice["finish_reason"]})],
            llm_output={"token_usage": usage, "model_name": self.model})

    def _last_chunk(self, state: StreamState) -> ChatGenerationChunk:
        message = AIMessageChunk(
            content=state.final_text, chunk_position="last",
            response_metadata={"finish_reason": state.finish_reason, "model_name": self.model},
            usage_metadata=_usage_metadata(state.usage) if state.usage else None)
        return ChatGenerationChunk(message=message,
                                   generation_info={"finish_reason": state.finish_reason})


def _piece(text: str) -> ChatGenerationChunk:
    return ChatGenerationChunk(message=AIMessageChunk(content=text))


def _openai_message(message: BaseMessage) -> dict[str, Any]:
    role = message.role if isinstance(message, ChatMessage) else _ROLES.get(message.type)
    if role is None or getattr(message, "tool_calls", None):
        what = type(message).__name__ + (" with tool calls" if role else "")
        raise ValueError(f"{what} is not supported: this server has no tool calling; send "
                         "system, human and AI messages")
    content = message.content
    if not isinstance(content, str):  # LangChain allows bare strings among content blocks
        content = [{"type": "text", "text": part} if isinstance(part, str) else part
                   for part in content]
    return {"role": role, "content": content}


def _usage_metadata(usage: Mapping[str, Any]) -> UsageMetadata:
    return UsageMetadata(input_tokens=usage["prompt_tokens"],
                         output_tokens=usage["completion_tokens"],
                         total_tokens=usage["total_tokens"],
                         input_token_details={"cache_read": cached_tokens(usage)})
