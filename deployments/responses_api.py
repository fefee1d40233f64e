"""OpenAI's Responses API (``POST /v1/responses``), minimal: the request model, the response
object and the typed stream events, shaped as the OpenAI client parses them.

Served: ``input`` as a text or as messages (roles user, system, developer, assistant;
content a text or ``input_text`` / ``output_text`` parts), ``instructions`` (a leading
system message), ``max_output_tokens``, ``temperature``, ``top_p``, ``stream``, plain text
output, and structured output through ``text.format`` (``json_schema`` or
``json_object``; ``response_format()`` gives it in chat completions' ``response_format``
shape). ``metadata`` is echoed back. ``store`` is accepted with any value, but nothing is
ever stored: a response cannot be retrieved or continued later (``previous_response_id``
is refused). The parsing rules are those of openai_protocol.py: strict JSON types, ``null``
means the default, unknown fields are ignored, and the Responses API's known fields this
server does not implement (tools, reasoning, conversations, background mode, ...) are
accepted only at the value that means "unused"; any other value is a ServiceError 400
naming the field, as is any input item other than a message.

A stream is OpenAI's event sequence (``ResponseEvents``): ``response.created``,
``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``,
one ``response.output_text.delta`` per piece of text, ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done``, then ``response.completed``
(``response.incomplete`` when the answer was cut, e.g. by ``max_output_tokens``, as
OpenAI does). Each event goes out as ``event: <type>`` + ``data: <json>`` (``sse_event``);
there is no ``[DONE]`` line in this API.

Imports neither ray nor torch nor anything of HTTP.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    model_validator,
)

from deployments.contract import OutputChunk, Sampling
from deployments.errors import ServiceError
from deployments.openai_protocol import refuse_unsupported, without_nulls

logger = logging.getLogger("ray.serve")

# Known Responses API fields we do not implement, with the values that mean "not used"
# (``null`` always does; an empty tuple: only ``null``).
RESPONSES_UNSUPPORTED_FIELD_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "parallel_tool_calls": (True, False),
    "max_tool_calls": (),
    "previous_response_id": (),
    "conversation": (),
    "context_management": ([],),
    "prompt": (),
    "reasoning": ({},),
    "include": ([],),
    "background": (False,),
    "background_options": (),
    "truncation": ("disabled",),
    "top_logprobs": (0,),
    "service_tier": ("auto", "default"),
    "moderation": (),
    "image": (),
    "access_programs": (),
    "prompt_cache_options": (),
    "prompt_cache_retention": ("in_memory",),
}

# The input items we take, and the content parts of a message we take.
_MESSAGE_ITEM = "message"
_TEXT_PARTS = ("input_text", "output_text")
_TEXT_FORMATS = ("text", "json_object", "json_schema")


class _Strict(BaseModel):
    """Strict JSON types; ``null`` in an optional field means its default."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        return without_nulls(cls, data)


class TextPart(_Strict):
    """A text part of a message's content (``annotations``, ``logprobs`` and the like of an
    earlier answer's ``output_text`` are ignored)."""

    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(_Strict):
    """One message of ``input``: OpenAI's easy input message, or an earlier response's
    output message (its ``id`` and ``status`` are ignored)."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class TextFormatText(_Strict):
    type: Literal["text"]


class TextFormatJSONObject(_Strict):
    type: Literal["json_object"]


class TextFormatJSONSchema(_Strict):
    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


def _format_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if not isinstance(kind, str):
        return None
    return {"text": "Text", "json_object": "JSONObject", "json_schema": "JSONSchema"}.get(kind)


# Tags start with a capital letter so ServiceError.from_validation leaves them out of the
# field's location: `text.format.schema`, not `text.format.json_schema.schema`.
TextFormat = Annotated[
    Annotated[TextFormatText, Tag("Text")]
    | Annotated[TextFormatJSONObject, Tag("JSONObject")]
    | Annotated[TextFormatJSONSchema, Tag("JSONSchema")],
    Discriminator(_format_tag),
]


class TextConfig(_Strict):
    format: TextFormat = Field(default_factory=lambda: TextFormatText(type="text"))
    # Only OpenAI's default; the answer's length is the model's own.
    verbosity: Literal["medium"] | None = None

    def echo(self) -> dict[str, Any]:
        """As the response object repeats it."""
        return {"format": self.format.model_dump(by_alias=True, exclude_none=True),
                "verbosity": self.verbosity or "medium"}


class ResponsesStreamOptions(_Strict):
    # OpenAI pads delta events against side channels; ignored here (no padding is sent).
    include_obfuscation: bool = True


MetadataKey = Annotated[str, StringConstraints(max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class ResponsesRequest(_Strict):
    """A ``POST /v1/responses`` body. ``chat_messages()`` is the chat to generate from,
    ``response_format()`` the structured output it asks for (chat completions' shape)."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    input: str | list[InputMessage]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: ResponsesStreamOptions | None = None
    text: TextConfig = Field(default_factory=TextConfig)
    metadata: dict[MetadataKey, MetadataValue] | None = Field(None, max_length=16)
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # Accepted with any value; nothing is ever stored (see the module's docstring).
    store: bool = True

    @model_validator(mode="before")
    @classmethod
    def _refuse_other_items(cls, data: Any) -> Any:
        """Input items other than messages, content parts other than text and text formats
        other than ours, refused by name (pydantic would list every form it expected)."""
        if not isinstance(data, dict):
            return data
        items = data.get("input")
        for i, item in enumerate(items if isinstance(items, list) else ()):
            if not isinstance(item, dict):
                continue
            kind = item.get("type")
            if kind is not None and kind != _MESSAGE_ITEM:
                raise ServiceError(f"input[{i}]: input items of type {kind!r} are not "
                                   "supported by this server; only messages are",
                                   param="input")
            parts = item.get("content")
            for j, part in enumerate(parts if isinstance(parts, list) else ()):
                part_kind = part.get("type") if isinstance(part, dict) else None
                if part_kind is not None and part_kind not in _TEXT_PARTS:
                    raise ServiceError(f"input[{i}].content[{j}]: content of type "
                                       f"{part_kind!r} is not supported by this server; "
                                       "only input_text and output_text are",
                                       param=f"input.{i}.content.{j}.type")
        text = data.get("text")
        text_format = text.get("format") if isinstance(text, dict) else None
        kind = text_format.get("type") if isinstance(text_format, dict) else None
        if text_format is not None and kind not in _TEXT_FORMATS:
            raise ServiceError(f"text.format: the type must be one of {list(_TEXT_FORMATS)}",
                               param="text.format.type")
        return data

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> ResponsesRequest:
        refuse_unsupported(self.model_extra or {}, RESPONSES_UNSUPPORTED_FIELD_DEFAULTS)
        if isinstance(self.input, list) and not self.input:
            raise ServiceError("`input` must not be empty", param="input")
        return self

    def chat_messages(self) -> list[dict[str, str]]:
        """The chat to answer: ``instructions`` first as a system message, then ``input``
        (a text is one user message); developer messages become system messages."""
        role = {"developer": "system"}
        messages = [] if self.instructions is None else \
            [{"role": "system", "content": self.instructions}]
        if isinstance(self.input, str):
            return [*messages, {"role": "user", "content": self.input}]
        return [*messages, *({"role": role.get(m.role, m.role), "content": m.text()}
                             for m in self.input)]

    def response_format(self) -> dict[str, Any] | None:
        """``text.format`` as chat completions' ``response_format``; None for plain text."""
        text_format = self.text.format
        if isinstance(text_format, TextFormatJSONObject):
            return {"type": "json_object"}
        if isinstance(text_format, TextFormatJSONSchema):
            schema: dict[str, Any] = {"name": text_format.name, "schema": text_format.schema_,
                                      "strict": bool(text_format.strict)}
            if text_format.description is not None:
                schema["description"] = text_format.description
            return {"type": "json_schema", "json_schema": schema}
        return None

    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p)

    # The names the router's shared checks and GenerateRequest building read from chat and
    # completion requests; the Responses API has none of these options.
    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_output_tokens

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return ()

    @property
    def timeout(self) -> float | None:
        return None

    @property
    def top_k(self) -> int:
        return -1

    @property
    def seed(self) -> int | None:
        return None

    @property
    def ignore_eos(self) -> bool:
        return False

    @property
    def min_tokens(self) -> int:
        return 0


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def responses_usage(input_tokens: int, output_tokens: int,
                    cached_tokens: int = 0) -> dict[str, Any]:
    """The Responses API's usage object. ``cached_tokens``: prompt tokens the engine's
    prompt cache supplied."""
    return {"input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def usage_of(chunk: OutputChunk) -> dict[str, Any]:
    """The usage object of an answer, from its last chunk."""
    return responses_usage(chunk.prompt_tokens, chunk.completion_tokens, chunk.cached_tokens)


ResponseStatus = Literal["completed", "failed", "in_progress", "cancelled", "queued",
                         "incomplete"]


def status_of(finish_reason: str | None) -> ResponseStatus:
    """A finished answer's status: cut by its length (``max_output_tokens``, the context's
    end or the deadline) is "incomplete", aborted is "cancelled"."""
    return {"length": "incomplete", "abort": "cancelled"}.get(finish_reason or "", "completed")


def output_message(message_id: str, text: str,
                   status: Literal["in_progress", "completed", "incomplete"]
                   ) -> dict[str, Any]:
    """The assistant's output message item, with its one text part."""
    return {"type": "message", "id": message_id, "status": status, "role": "assistant",
            "content": [output_text(text)]}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_object(request: ResponsesRequest, response_id: str, created_at: int, *,
                    text: str = "", finish_reason: str | None = None,
                    usage: Mapping[str, Any] | None = None,
                    status: ResponseStatus | None = None, message_id: str | None = None,
                    error: ServiceError | None = None) -> dict[str, Any]:
    """The response object (``object: "response"``): the answer ``text`` as one output
    message, the usage, and the request's parameters echoed as OpenAI does.

    ``status`` defaults to the answer's (``status_of(finish_reason)``); "in_progress" (the
    stream's first events) has no output and no usage; "failed" carries ``error``.
    """
    status = status or status_of(finish_reason)
    extra = request.model_extra or {}
    output: list[dict[str, Any]] = []
    if status not in ("in_progress", "queued", "failed"):
        output = [output_message(message_id or new_message_id(), text,
                                 "completed" if status == "completed" else "incomplete")]
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": None if error is None else _response_error(error),
        "incomplete_details": {"reason": "max_output_tokens"}
        if status == "incomplete" and finish_reason == "length" else None,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "model": request.model,
        "output": output,
        "parallel_tool_calls": extra.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": request.store,
        "temperature": request.temperature,
        "text": request.text.echo(),
        "tool_choice": extra.get("tool_choice") or "auto",
        "tools": [],
        "top_logprobs": 0,
        "top_p": request.top_p,
        "truncation": "disabled",
        "background": False,
        "service_tier": "default",
        "usage": None if usage is None else dict(usage),
        "user": request.user,
        "safety_identifier": request.safety_identifier,
        "prompt_cache_key": request.prompt_cache_key,
        "metadata": dict(request.metadata or {}),
    }


def _response_error(error: ServiceError) -> dict[str, Any]:
    """A ServiceError as a failed response's ``error`` (OpenAI's codes are a fixed list)."""
    code = "rate_limit_exceeded" if error.status_code == 429 else \
        "invalid_prompt" if error.status_code < 500 else "server_error"
    return {"code": code, "message": error.message}


class ResponseEvents:
    """The typed events of one streamed response, in order, numbered by
    ``sequence_number``. Either call ``start()``, ``delta(text)`` per piece of text and
    ``finish(finish_reason, usage)`` (or ``fail(error)``), or let ``stream(chunks)`` drive
    them from a replica's OutputChunks."""

    def __init__(self, request: ResponsesRequest, response_id: str | None = None,
                 created_at: int | None = None, message_id: str | None = None):
        self.request = request
        self.response_id = response_id or new_response_id()
        self.message_id = message_id or new_message_id()
        self.created_at = int(time.time()) if created_at is None else created_at
        self._sequence = 0
        self._pieces: list[str] = []
        self._started = False

    @property
    def text(self) -> str:
        """The answer's text so far."""
        return "".join(self._pieces)

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def _response(self, **fields: Any) -> dict[str, Any]:
        return response_object(self.request, self.response_id, self.created_at,
                               message_id=self.message_id, **fields)

    def _part(self, kind: str, text: str) -> dict[str, Any]:
        return self._event(kind, item_id=self.message_id, output_index=0, content_index=0,
                           part=output_text(text))

    def start(self) -> list[dict[str, Any]]:
        """The events before the first text: the response in progress, its message item and
        the item's (empty) text part."""
        self._started = True
        in_progress = self._response(status="in_progress")
        return [self._event("response.created", response=in_progress),
                self._event("response.in_progress", response=in_progress),
                self._event("response.output_item.added", output_index=0,
                            item=output_message(self.message_id, "", "in_progress")),
                self._part("response.content_part.added", "")]

    def delta(self, text: str) -> list[dict[str, Any]]:
        """A piece of the answer's text (nothing for an empty piece)."""
        if not text:
            return []
        self._pieces.append(text)
        return [self._event("response.output_text.delta", item_id=self.message_id,
                            output_index=0, content_index=0, delta=text, logprobs=[])]

    def finish(self, finish_reason: str | None,
               usage: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """The events after the last text, ending with ``response.completed`` (or
        ``response.incomplete`` for an answer that was cut: see ``status_of``)."""
        text = self.text
        status = status_of(finish_reason)
        final = self._response(text=text, finish_reason=finish_reason, usage=usage)
        item_status = "completed" if status == "completed" else "incomplete"
        return [self._event("response.output_text.done", item_id=self.message_id,
                            output_index=0, content_index=0, text=text, logprobs=[]),
                self._part("response.content_part.done", text),
                self._event("response.output_item.done", output_index=0,
                            item=output_message(self.message_id, text, item_status)),
                self._event("response.completed" if status == "completed"
                            else "response.incomplete", response=final)]

    def fail(self, error: ServiceError) -> list[dict[str, Any]]:
        """The end of a stream that failed after it started: OpenAI's ``error`` event, then
        ``response.failed`` with the error."""
        return [self._event("error", code=error.code or error.error_type,
                            message=error.message, param=error.param),
                self._event("response.failed",
                            response=self._response(status="failed", error=error))]

    async def stream(self, chunks: AsyncIterable[OutputChunk]
                     ) -> AsyncIterator[dict[str, Any]]:
        """The events of an answer streamed as ``chunks`` (read to their end; the last
        chunk's finish reason and counts make the final event). The first chunk is awaited
        before any event, so an error before the answer starts is raised (a plain HTTP
        error); an error after it ends the stream with ``fail``'s events. Closed early,
        it closes ``chunks``, which cancels their generation."""
        iterator = aiter(chunks)
        try:
            chunk: OutputChunk | None = await anext(iterator, None)
            for event in self.start():
                yield event
            try:
                last = chunk
                while chunk is not None:
                    for event in self.delta(chunk.text):
                        yield event
                    last = chunk
                    chunk = await anext(iterator, None)  # after the last: the stream's end
            except ServiceError as error:
                for event in self.fail(error):
                    yield event
                return
            except Exception as error:  # a bug mid-stream still ends it in OpenAI's shape
                logger.exception("unexpected error in a responses stream")
                for event in self.fail(ServiceError(f"internal error: {type(error).__name__}",
                                                    500)):
                    yield event
                return
            for event in self.finish(last.finish_reason if last else None,
                                     usage_of(last) if last else None):
                yield event
        finally:  # left early (the caller hung up): stop the generation now
            close = getattr(iterator, "aclose", None)
            if close is not None:
                await close()


def sse_event(event: Mapping[str, Any]) -> str:
    """One event as server-sent-event text: its ``event:`` line (the type) and its JSON."""
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


async def sse(events: AsyncIterable[Mapping[str, Any]]) -> AsyncIterator[str]:
    """Events as server-sent-event text (no ``[DONE]``: the Responses API sends none)."""
    async for event in events:
        yield sse_event(event)


ResponsesRequest.model_rebuild()
