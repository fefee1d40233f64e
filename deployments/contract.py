"""What crosses the handle between the router and the model replicas, defined once for both
(pydantic models, never dicts re-read by key): the request (``GenerateRequest``: one prompt
form, the answer's length, ``Sampling``, the deadline, the request id) and what comes back,
``OutputChunk`` pieces of the answer or one ``ErrorChunk`` that ends it with an
``ErrorKind``; ``TokenizeRequest`` and ``TokenizeResult`` for the model's tokenizer. The
router alone turns an ErrorKind into an HTTP status. (Callers of the router's handle, the
LangChain adapter among them, send it OpenAI's request models: openai_protocol.py.)

Imports neither ray nor torch nor anything of HTTP.
"""

from __future__ import annotations

import enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ErrorKind(enum.StrEnum):
    """Why a request got no answer, in the engine's terms. The router alone maps a kind to
    an HTTP status and OpenAI's error JSON; nothing below it knows HTTP."""

    INVALID_REQUEST = "invalid_request"  # the request cannot be served as asked
    MISCONFIGURED = "misconfigured"  # the engine, its options or its checkpoint are wrong
    UNAVAILABLE = "unavailable"  # the engine failed or is gone: retry, another replica may serve
    TIMEOUT = "timeout"  # the request's deadline passed before the model answered


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ToolCall(_Message):
    """A function call the assistant made: ``arguments`` is its JSON text."""

    id: str
    name: str
    arguments: str


class ChatTurn(_Message):
    """One message of a chat: an assistant turn may carry its tool calls, a ``tool`` turn
    answers the call ``tool_call_id``."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def openai(self) -> dict[str, Any]:
        """OpenAI's message object, as chat templates take it."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class Tool(_Message):
    """A function the model may call: its name, what it does, its arguments' JSON schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})

    def openai(self) -> dict[str, Any]:
        """OpenAI's tool object, as chat templates take it."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": self.parameters}}


class Guide(_Message):
    """A grammar the answer must follow, enforced token by token (the engine masks every
    token that would leave it). ``spec``: a JSON schema's text (``json_schema``), a regular
    expression (``regex``), a JSON list of strings (``choice``) or a Lark grammar
    (``grammar``)."""

    kind: Literal["json_schema", "regex", "choice", "grammar"]
    spec: str


class Sampling(_Message):
    """How the answer's tokens are picked (the router validated the values)."""

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # sample among the k most likely tokens; -1 or 0: all
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0  # subtracted once from a token already in the answer
    frequency_penalty: float = 0.0  # subtracted per occurrence in the answer
    repetition_penalty: float = 1.0  # divides (or multiplies) tokens in prompt or answer
    min_p: float = 0.0  # drop tokens below min_p x the likeliest token's probability
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: int | None = None  # report each token's logprob and this many alternatives
    guide: Guide | None = None


class GenerateRequest(_Message):
    """One answer to generate: exactly one of ``prompt`` (text), ``messages`` (a chat, for
    the model's chat template) or ``prompt_token_ids``."""

    request_id: str = Field(min_length=1)
    prompt: str | None = None
    messages: tuple[ChatTurn, ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    tools: tuple[Tool, ...] = ()  # offered to the model through its chat template
    max_tokens: int | None = Field(
        None, ge=1, description="None: the config's default_max_tokens, within the context")
    sampling: Sampling = Sampling()
    timeout_s: float = Field(gt=0, description="The deadline, from when the replica takes it")

    @model_validator(mode="after")
    def _one_prompt_form(self) -> GenerateRequest:
        forms = [self.prompt, self.messages, self.prompt_token_ids]
        if sum(form is not None for form in forms) != 1:
            raise ValueError("give exactly one of prompt, messages and prompt_token_ids")
        return self

    def describe_prompt(self) -> str:
        """The prompt as text, for request logs that include prompts."""
        if self.messages is not None:
            return str([turn.model_dump() for turn in self.messages])
        return str(self.prompt if self.prompt is not None else list(self.prompt_token_ids or ()))


class TokenizeRequest(_Message):
    """Text to split into the served model's tokens: ``prompt`` (a text, as a prompt) or
    ``messages`` (a chat, through the model's chat template), exactly one."""

    prompt: str | None = None
    messages: tuple[ChatTurn, ...] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Message):
    """Token ids to turn back into text (special tokens skipped, as answers are)."""

    tokens: tuple[int, ...]


class TokenizeResult(_Message):
    """The tokens of a TokenizeRequest, in vLLM's ``/tokenize`` answer fields."""

    tokens: list[int]
    count: int
    max_model_len: int


class TopLogprob(_Message):
    token: str
    logprob: float
    bytes: tuple[int, ...]


class TokenLogprob(_Message):
    """One generated token: its text, log-probability under the distribution it was sampled
    from, and the most likely alternatives there."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top_logprobs: tuple[TopLogprob, ...] = ()


class OutputChunk(_Message):
    """A piece of the answer: its new text and, on the last piece, why it ended. Token
    counts are the answer's so far; ``cached_tokens`` are prompt tokens the engine's prompt
    cache supplied. ``timed_out``: the deadline cut the answer (it ends with "length")."""

    text: str
    finish_reason: Literal["stop", "length", "abort"] | None = None
    prompt_tokens: int
    cached_tokens: int = 0
    completion_tokens: int
    timed_out: bool = False
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens since the previous chunk


class ErrorChunk(_Message):
    """The end of a request without (the rest of) an answer: why, and the request field at
    fault when one is."""

    message: str
    kind: ErrorKind
    field: str | None = None
