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

import json
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deployments import constants
from deployments.contract import ChatTurn, Guide, OutputChunk, Sampling, Tool, ToolCall
from deployments.errors import ServiceError
from deployments.grammar import guide_error, strict_schema

# Known OpenAI fields (and vLLM sampling extensions) we do not implement, with the values
# that mean "not used" (``null`` always does).
UNSUPPORTED_FIELD_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "suffix": ("",),
    "functions": ([],),
    "function_call": ("none", "auto"),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "web_search_options": (),
    # vLLM's extensions beside those implemented below.
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
    "guided_decoding_backend": (),
    "guided_whitespace_pattern": (),
    "structured_outputs": (),
}
MAX_LOGPROBS = constants.MAX_LOGPROBS
MAX_CHOICES = constants.MAX_CHOICES

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
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # vLLM's: HF's repetition penalty (1 = none) and min-p sampling.
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    # vLLM's guided decoding: at most one of these and response_format.
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        return without_nulls(cls, data)

    # Fields of the other endpoint's request, refused here unless at their unused value.
    _OTHER_ENDPOINTS_FIELDS: ClassVar[dict[str, tuple[Any, ...]]] = {}

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _SamplingFields:
        refuse_unsupported(self.model_extra or {},
                           {**UNSUPPORTED_FIELD_DEFAULTS, **self._OTHER_ENDPOINTS_FIELDS})
        limit = self.requested_max_tokens
        if limit is not None and self.min_tokens > limit:
            raise ServiceError(f"`min_tokens` ({self.min_tokens}) must not exceed the maximum "
                               f"number of tokens ({limit})", param="min_tokens")
        for token, bias in (self.logit_bias or {}).items():
            if not token.isdigit() or int(token) > MAX_TOKEN_ID or not -100 <= bias <= 100:
                raise ServiceError("`logit_bias` maps token ids to biases in [-100, 100]; "
                                   f"got {token!r}: {bias}", param="logit_bias")
        guides = [name for name in ("response_format", "guided_json", "guided_regex",
                                    "guided_choice", "guided_grammar")
                  if getattr(self, name) is not None
                  and not (name == "response_format" and self.response_format.type == "text")]
        if len(guides) > 1:
            raise ServiceError(f"`{guides[1]}` cannot go with `{guides[0]}`: give at most "
                               "one way to constrain the answer", param=guides[1])
        guide = self.guide
        if guide is not None:
            if self.ignore_eos:
                raise ServiceError("`ignore_eos` cannot go with a structured answer, which "
                                   "ends where its grammar does", param="ignore_eos")
            error = guide_error(guide)
            if error:
                raise ServiceError(f"`{guides[0]}` cannot be enforced: {error}",
                                   param=guides[0])
        return self

    @property
    def guide(self) -> Guide | None:
        """The grammar the answer must follow, if the request asks for one."""
        if self.response_format is not None:
            return self.response_format.guide()
        if self.guided_json is not None:
            spec = self.guided_json if isinstance(self.guided_json, str) else \
                json.dumps(self.guided_json)
            return Guide(kind="json_schema", spec=spec)
        if self.guided_regex is not None:
            return Guide(kind="regex", spec=self.guided_regex)
        if self.guided_choice is not None:
            return Guide(kind="choice", spec=json.dumps(self.guided_choice))
        if self.guided_grammar is not None:
            return Guide(kind="grammar", spec=self.guided_grammar)
        return None

    @property
    def logprobs_count(self) -> int | None:
        """Alternatives to report per token (0: the sampled token's logprob alone), or None
        for no logprobs."""
        return None

    def sampling(self, seed: int | None) -> Sampling:
        """The replica's sampling parameters of one choice (``seed``: this choice's)."""
        return Sampling(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=seed,
            stop=self.stop_strings, ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, min_p=self.min_p,
            logit_bias=tuple((int(t), b) for t, b in (self.logit_bias or {}).items()),
            logprobs=self.logprobs_count, guide=self.guide)

    def choice_seeds(self) -> list[int | None]:
        """Each choice's seed: the request's, then the next ones (choices must differ)."""
        if self.seed is None:
            return [None] * self.n
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.n)]

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


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: plain text, any JSON object, or JSON following a schema."""

    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None
                                           or self.json_schema.json_schema is None):
            raise ServiceError("`response_format` of type json_schema needs "
                               "`json_schema.schema`", param="response_format.json_schema")
        return self

    def guide(self) -> Guide | None:
        if self.type == "json_object":
            return Guide(kind="json_schema", spec='{"type": "object"}')
        if self.type == "json_schema":
            schema = self.json_schema.json_schema
            if self.json_schema.strict:
                schema = strict_schema(schema)
            return Guide(kind="json_schema", spec=json.dumps(schema))
        return None


class CompletionRequest(_SamplingFields):
    _OTHER_ENDPOINTS_FIELDS: ClassVar[dict[str, tuple[Any, ...]]] = {
        "tools": ([],), "tool_choice": ("none",), "parallel_tool_calls": (True, False),
        "top_logprobs": (0,), "messages": ()}

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)

    @model_validator(mode="after")
    def _prompt_not_empty(self) -> CompletionRequest:
        if not self.prompt or any(not p for p in self.prompts):
            raise ServiceError("`prompt` must not be empty", param="prompt")
        if self.best_of is not None and self.best_of != self.n:
            raise ServiceError(f"`best_of` ({self.best_of}) other than `n` ({self.n}) is not "
                               "supported: every sample is returned", param="best_of")
        if self.echo and self.logprobs is not None:
            raise ServiceError("`echo` with `logprobs` is not supported (prompt logprobs "
                               "are not computed)", param="echo")
        if self.echo and any(not isinstance(p, str) for p in self.prompts):
            raise ServiceError("`echo` needs text prompts", param="echo")
        return self

    @property
    def logprobs_count(self) -> int | None:
        return self.logprobs

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: texts or token id lists."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], int):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]


class FunctionCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    name: str = Field(min_length=1)
    arguments: str


class MessageToolCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = Field(None, min_length=1)

    def shape_error(self) -> tuple[str, str] | None:
        """(field, why) when the message's fields do not fit its role."""
        if self.role == "tool" and self.tool_call_id is None:
            return "tool_call_id", "a tool message needs `tool_call_id`, the call it answers"
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            return "content", ("`content` is required (null only for an assistant message "
                               "with tool_calls)")
        if self.tool_calls and self.role != "assistant":
            return "tool_calls", "only assistant messages carry `tool_calls`"
        return None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def turn(self) -> ChatTurn:
        role = {"developer": "system"}.get(self.role, self.role)
        calls = tuple(ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
                      for c in self.tool_calls or ())
        return ChatTurn(role=role, content=self.text(), tool_calls=calls,
                        tool_call_id=self.tool_call_id)


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text"]
    text: str


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object",
                                                                "properties": {}})
    strict: bool | None = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    _OTHER_ENDPOINTS_FIELDS: ClassVar[dict[str, tuple[Any, ...]]] = {
        "echo": (False,), "best_of": (1,), "prompt": ()}

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _tools_consistent(self) -> ChatCompletionRequest:
        for index, message in enumerate(self.messages):
            error = message.shape_error()
            if error:
                raise ServiceError(error[1], param=f"messages.{index}.{error[0]}")
        if self.top_logprobs is not None and not self.logprobs:
            raise ServiceError("`top_logprobs` needs `logprobs: true`", param="top_logprobs")
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) < len(names):
            raise ServiceError("tool names must be unique", param="tools")
        for index, tool in enumerate(self.tools or ()):
            error = guide_error(Guide(kind="json_schema",
                                      spec=json.dumps(tool.function.parameters)))
            if error:
                raise ServiceError(f"tool `{tool.function.name}`'s parameters are not a "
                                   f"usable JSON schema: {error}",
                                   param=f"tools.{index}.function.parameters")
        choice = self.tool_choice
        if choice not in (None, "none") and not names:
            raise ServiceError("`tool_choice` needs `tools`", param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ServiceError(f"`tool_choice` names `{choice.function.name}`, which is not "
                               f"among the tools ({', '.join(names)})", param="tool_choice")
        if self.forced_tools and self.guide is not None:
            raise ServiceError("a forced tool call cannot go with `response_format`",
                               param="tool_choice")
        return self

    def chat_turns(self) -> tuple[ChatTurn, ...]:
        return tuple(message.turn() for message in self.messages)

    @property
    def tool_list(self) -> tuple[Tool, ...]:
        return tuple(Tool(name=t.function.name, description=t.function.description,
                          parameters=t.function.parameters) for t in self.tools or ())

    @property
    def tool_mode(self) -> Literal["none", "auto", "required", "named"]:
        """How the answer may call tools: never, if the model chooses (parsed from its
        text), or forced (one of them, or the named one; grammar-constrained)."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return "required" if self.tool_choice == "required" else "auto"

    @property
    def forced_tools(self) -> bool:
        return self.tool_mode in ("required", "named")

    @property
    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def without_nulls(model: type[BaseModel], data: Any) -> Any:
    """``data`` without the ``null`` values of optional fields, declared or not (OpenAI's
    API and its SDKs treat ``null`` as "not set"); a required field's ``null`` stays an
    error."""
    if not isinstance(data, dict):
        return data
    required = {name for name, field in model.model_fields.items() if field.is_required()}
    required |= {field.alias for field in model.model_fields.values()
                 if field.alias and field.is_required()}
    return {k: v for k, v in data.items() if v is not None or k in required}


def refuse_unsupported(values: Mapping[str, Any],
                       unsupported: Mapping[str, tuple[Any, ...]]) -> None:
    """ServiceError 400 naming the first field of ``values`` that ``unsupported`` lists,
    unless it has one of the values that mean "not used"."""
    for name, value in values.items():
        allowed = unsupported.get(name)
        if allowed is not None and not any(_same_json(value, a) for a in allowed):
            raise ServiceError(f"`{name}` = {value!r} is not supported by this server",
                               param=name)


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


def usage(*results: OutputChunk, choices_per_prompt: int = 1) -> dict[str, Any]:
    """OpenAI's usage object of answers (the last chunk of each), summed; with ``n``
    choices per prompt (results prompt by prompt) a prompt counts once, as OpenAI counts
    it. ``prompt_tokens_details.cached_tokens`` counts the prompt tokens the engine's
    prompt cache supplied, as OpenAI reports its prompt caching."""
    def one(result: OutputChunk, counts_prompt: bool) -> dict[str, Any]:
        prompt = result.prompt_tokens if counts_prompt else 0
        return {"prompt_tokens": prompt, "completion_tokens": result.completion_tokens,
                "total_tokens": prompt + result.completion_tokens,
                "prompt_tokens_details": {
                    "cached_tokens": result.cached_tokens if counts_prompt else 0}}

    return sum_usage(one(r, i % choices_per_prompt == 0) for i, r in enumerate(results))


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


def chat_response(request_id: str, model: str, choices: list[dict[str, Any]],
                  usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage}


def completion_chunk(request_id: str, model: str, choice: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice]}


def chat_chunk(request_id: str, model: str, index: int, delta: dict[str, Any],
               finish_reason: str | None, logprobs: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish_reason}]}


def usage_chunk(request_id: str, model: str, obj: str, usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "object": obj, "created": int(time.time()), "model": model,
            "choices": [], "usage": usage}


_SamplingFields.model_rebuild()
CompletionRequest.model_rebuild()
ChatMessage.model_rebuild()
ChatCompletionRequest.model_rebuild()
