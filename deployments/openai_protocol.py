"""OpenAI request models, validation rules and response shapes.

Requests are parsed strictly from the raw body (wrong JSON types are a 400, never coerced).
Fields of OpenAI's schemas that we do not implement are accepted only at their default
value; any other value is refused naming the field. Fields nobody knows are ignored, as
vLLM does, so today's clients keep working. vLLM's ``ignore_eos``, ``min_tokens`` and
``top_k`` extensions are honoured; its other sampling extensions are refused like OpenAI's
unimplemented fields. ``timeout`` (seconds) sets a request's own deadline. An explicit
``null`` in an optional field means its default, as in OpenAI's API.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deployments.contract import OutputChunk
from deployments.errors import ServiceError

# Known OpenAI fields (and vLLM sampling extensions) we do not implement, with the values
# that mean "not used" (``null`` always does).
UNSUPPORTED_FIELD_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": ({},),
    "suffix": ("",),
    "response_format": ({"type": "text"},),
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "functions": ([],),
    "function_call": ("none", "auto"),
    "parallel_tool_calls": (True, False),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    # vLLM's sampling extensions beside ignore_eos, min_tokens and top_k.
    "min_p": (0, 0.0),
    "repetition_penalty": (1, 1.0),
    "length_penalty": (1, 1.0),
    "use_beam_search": (False,),
    "stop_token_ids": ([],),
    "bad_words": ([],),
    "include_stop_str_in_output": (False,),
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "prompt_logprobs": (0,),
    "allowed_token_ids": (),
    "truncate_prompt_tokens": (),
    "guided_json": (),
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
}

MAX_SEED = 2**63 - 1
# Token ids are never negative and fit an int32 index (the model's vocabulary is smaller).
MAX_TOKEN_ID = 2**31 - 1
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]


class _SamplingFields(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    # vLLM's: sample from the k most likely tokens; -1 or 0 means from all of them.
    top_k: int = Field(-1, ge=-1)
    timeout: float | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """Drop ``null`` values of optional fields, declared or not (OpenAI's API and its
        SDKs treat ``null`` as "not set"); a required field's ``null`` stays an error."""
        if not isinstance(data, dict):
            return data
        required = {name for name, field in cls.model_fields.items() if field.is_required()}
        return {k: v for k, v in data.items() if v is not None or k in required}

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _SamplingFields:
        for name, value in (self.model_extra or {}).items():
            allowed = UNSUPPORTED_FIELD_DEFAULTS.get(name)
            if allowed is not None and not any(_same_json(value, a) for a in allowed):
                raise ServiceError(f"`{name}` = {value!r} is not supported by this server",
                                   param=name)
        limit = self.requested_max_tokens
        if limit is not None and self.min_tokens > limit:
            raise ServiceError(f"`min_tokens` ({self.min_tokens}) must not exceed the maximum "
                               f"number of tokens ({limit})", param="min_tokens")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]

    @model_validator(mode="after")
    def _prompt_not_empty(self) -> CompletionRequest:
        if not self.prompt or any(not p for p in self.prompts):
            raise ServiceError("`prompt` must not be empty", param="prompt")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: texts or token id lists."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], int):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text"]
    text: str


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def chat_messages(self) -> list[dict[str, str]]:
        role = {"developer": "system"}
        return [{"role": role.get(m.role, m.role), "content": m.text()} for m in self.messages]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def _same_json(value: Any, allowed: Any) -> bool:
    """JSON equality: ``true`` is not ``1`` (Python's ``True == 1`` is)."""
    if isinstance(value, bool) or isinstance(allowed, bool):
        return type(value) is type(allowed) and value == allowed
    return bool(value == allowed)


def parse_request(model: type[BaseModel], body: bytes | dict[str, Any]) -> Any:
    """Validate a body (raw JSON bytes or an already decoded dict); ServiceError 400 if bad."""
    try:
        if isinstance(body, bytes | bytearray):
            return model.model_validate_json(body)
        return model.model_validate(body)
    except ValidationError as error:
        raise ServiceError.from_validation(error) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(*results: OutputChunk) -> dict[str, Any]:
    """OpenAI's usage object of answers (the last chunk of each), summed.
    ``prompt_tokens_details.cached_tokens`` counts the prompt tokens the engine's prompt
    cache supplied, as OpenAI reports its prompt caching."""
    return sum_usage({"prompt_tokens": r.prompt_tokens,
                      "completion_tokens": r.completion_tokens,
                      "total_tokens": r.prompt_tokens + r.completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": r.cached_tokens}}
                     for r in results)


def sum_usage(usages: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """OpenAI usage objects added up, ``prompt_tokens_details.cached_tokens`` included (0
    from a server that does not report it): the router sums a request's answers with it,
    the LangChain adapter a batch's responses."""
    usages = list(usages)
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    return {**{key: sum(u[key] for u in usages) for key in keys},
            "prompt_tokens_details": {"cached_tokens": sum(map(cached_tokens, usages))}}


def cached_tokens(usage: Mapping[str, Any]) -> int:
    """Prompt tokens a usage object says the server's prompt cache supplied (0 from a server
    that does not say)."""
    return int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def completion_response(request_id: str, model: str, choices: list[dict[str, Any]],
                        usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage}


def chat_response(request_id: str, model: str, text: str, finish_reason: str | None,
                  usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage}


def completion_chunk(request_id: str, model: str, index: int, text: str,
                     finish_reason: str | None) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": [{"index": index, "text": text, "logprobs": None,
                                         "finish_reason": finish_reason}]}


def chat_chunk(request_id: str, model: str, delta: dict[str, str],
               finish_reason: str | None) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]}


def usage_chunk(request_id: str, model: str, obj: str, usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "object": obj, "created": int(time.time()), "model": model,
            "choices": [], "usage": usage}


_SamplingFields.model_rebuild()
CompletionRequest.model_rebuild()
ChatMessage.model_rebuild()
ChatCompletionRequest.model_rebuild()
