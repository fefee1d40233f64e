"""vLLM's ``/tokenize``, ``/detokenize`` and ``/version``: request models and answers, with
vLLM's field names (vllm/entrypoints/openai/protocol.py).

``/tokenize`` takes a prompt (``TokenizeCompletionBody``) or a chat (``TokenizeChatBody``,
the same messages as chat completions); ``parse_tokenize_body`` tells them apart by the
presence of ``messages``. Parsing follows openai_protocol.py: strict JSON types, ``null``
means the default, unknown fields are ignored, and vLLM's options the replica does not
implement are accepted only at the value that matches what it does, any other value
being a ServiceError 400 naming the field. The replica tokenizes as the model sees a
prompt: special tokens added (a prompt's ``add_special_tokens`` must stay true), a chat
through the model's chat template ending where the answer begins
(``add_generation_prompt`` must stay true). A chat's ``add_special_tokens`` is accepted
with either value: the count is always that of the prompt the model would get.

Imports neither ray nor torch nor anything of HTTP.
"""

from __future__ import annotations

import importlib.metadata
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.contract import TokenizeRequest, TokenizeResult
from deployments.errors import ServiceError
from deployments.openai_protocol import (
    ChatMessage,
    TokenId,
    parse_request,
    refuse_unsupported,
    without_nulls,
)

# The distribution name of this project ([project] name in pyproject.toml).
DISTRIBUTION = "ipex-llm-serve"
UNKNOWN_VERSION = "0+unknown"

# vLLM's tokenize options the replica does not implement, with the values that match what
# it does (``null`` always does; an empty tuple: only ``null``).
TOKENIZE_UNSUPPORTED_FIELD_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "return_token_strs": (False,),
    "continue_final_message": (False,),
    "chat_template": (),
    "chat_template_kwargs": ({},),
    "mm_processor_kwargs": ({},),
    "tools": ([],),
}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        return without_nulls(cls, data)

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _Body:
        values = {**(self.model_extra or {}),
                  **{name: getattr(self, name) for name in type(self).model_fields}}
        refuse_unsupported(values, TOKENIZE_UNSUPPORTED_FIELD_DEFAULTS)
        return self


class TokenizeCompletionBody(_Body):
    """vLLM's TokenizeCompletionRequest: a prompt's tokens."""

    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _as_the_replica_tokenizes(self) -> TokenizeCompletionBody:
        if not self.add_special_tokens:
            raise ServiceError("`add_special_tokens` = False is not supported by this server: "
                               "a prompt is tokenized as the model sees it, with its special "
                               "tokens", param="add_special_tokens")
        return self

    def tokenize_request(self) -> TokenizeRequest:
        """What the replica's ``tokenize`` takes."""
        return TokenizeRequest(prompt=self.prompt)


class TokenizeChatBody(_Body):
    """vLLM's TokenizeChatRequest: a chat's tokens, through the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _as_the_replica_tokenizes(self) -> TokenizeChatBody:
        for index, message in enumerate(self.messages):
            error = message.shape_error()
            if error:
                raise ServiceError(error[1], param=f"messages.{index}.{error[0]}")
        if not self.add_generation_prompt:
            raise ServiceError("`add_generation_prompt` = False is not supported by this "
                               "server: a chat is tokenized up to where the answer begins",
                               param="add_generation_prompt")
        return self

    def tokenize_request(self) -> TokenizeRequest:
        """What the replica's ``tokenize`` takes: the chat as chat completions sends it (so
        the count is that of the same chat's prompt)."""
        return TokenizeRequest(messages=tuple(m.turn() for m in self.messages))


class DetokenizeBody(_Body):
    """vLLM's DetokenizeRequest: the text of token ids."""

    tokens: list[TokenId]


def parse_tokenize_body(body: bytes | dict[str, Any]
                        ) -> TokenizeCompletionBody | TokenizeChatBody:
    """A ``/tokenize`` body (raw JSON bytes or a decoded dict): a chat if it has
    ``messages`` (not null), else a prompt. ServiceError 400 naming the field if bad."""
    try:
        decoded = json.loads(body) if isinstance(body, bytes | bytearray) else body
    except (ValueError, RecursionError):
        decoded = None  # parse_request below reports the JSON error
    if isinstance(decoded, dict) and decoded.get("messages") is not None:
        if decoded.get("prompt") is not None:
            raise ServiceError("give either `prompt` or `messages`, not both", param="prompt")
        return parse_request(TokenizeChatBody, body)
    return parse_request(TokenizeCompletionBody, body)


def parse_detokenize_body(body: bytes | dict[str, Any]) -> DetokenizeBody:
    """A ``/detokenize`` body; ServiceError 400 naming the field if bad."""
    return parse_request(DetokenizeBody, body)


def tokenize_response(result: TokenizeResult) -> dict[str, Any]:
    """vLLM's TokenizeResponse (``token_strs`` is null: ``return_token_strs`` is refused)."""
    return {"count": result.count, "max_model_len": result.max_model_len,
            "tokens": list(result.tokens), "token_strs": None}


def detokenize_response(text: str) -> dict[str, Any]:
    """vLLM's DetokenizeResponse."""
    return {"prompt": text}


def server_version() -> str:
    """The installed version of this project, "0+unknown" when it is not installed."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return UNKNOWN_VERSION


def version_response() -> dict[str, str]:
    """vLLM's ``/version`` answer, with this project's version."""
    return {"version": server_version()}
