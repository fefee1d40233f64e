"""LLMRouter: the OpenAI-compatible front door, over HTTP and over Ray handles.

Every operation is a plain Python method first (``completions``, ``chat_completions``,
their ``*_stream`` variants, ``models``; ``tokenize`` has no HTTP route), used by handle
callers such as the LangChain adapter; the HTTP routes only parse the body and call them.
So validation, limits, auth and error mapping are the same for both paths. Errors are
``ServiceError`` (OpenAI error JSON over HTTP). Requests go to the LLMServer replicas
through a deployment handle; Ray's ``BackPressureError`` (the replicas' queues are full)
becomes 503 + Retry-After, and a replica that dies before sending a token is retried once
on another replica.

This module never imports torch. (No `from __future__ import annotations` here: FastAPI must
see the real `Request` annotation of the route methods.)
"""


import asyncio
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    RayActorError,
    TaskCancelledError,
)
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments import constants, metrics
from deployments.choices import (
    ChatChoiceStream,
    chat_choice,
    chat_logprobs,
    completion_choice,
)
from deployments.config import LLMConfig
from deployments.contract import (
    ChatTurn,
    DetokenizeRequest,
    ErrorChunk,
    ErrorKind,
    GenerateRequest,
    OutputChunk,
    TokenizeRequest,
)
from deployments.errors import ServiceError
from deployments.grammar import guide_error
from deployments.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseFormat,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    new_id,
    parse_request,
    usage,
    usage_chunk,
)
from deployments.responses_api import (
    ResponseEvents,
    ResponsesRequest,
    new_response_id,
    response_object,
    usage_of,
)
from deployments.responses_api import sse as responses_sse
from deployments.tokenize_api import (
    detokenize_response,
    parse_detokenize_body,
    parse_tokenize_body,
    tokenize_response,
    version_response,
)
from deployments.tool_calls import forced_call_guide

logger = logging.getLogger("ray.serve")


class CallerErrorLogFilter(logging.Filter):
    """Ray Serve logs every exception a handle call raises as an ERROR with its traceback
    ("Request failed."). A ServiceError the router raised on purpose carries its own
    reason, so its traceback (the raise site) adds nothing, and a burst of them would bury
    real errors: the caller's own mistake (4xx) becomes one INFO line, a retriable refusal
    (429/503: at capacity, but also a lost or failed replica) one WARNING line. All other
    records pass unchanged. (Over HTTP the router answers these itself; nothing is logged.)
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ServiceError) and (error.status_code < 500 or error.retriable):
            level = logging.INFO if error.status_code < 500 else logging.WARNING
            record.msg, record.args = "Request answered %d: %s", (error.status_code,
                                                                 error.message)
            record.levelno, record.levelname = level, logging.getLevelName(level)
            record.exc_info = record.exc_text = None
        return True


_REPLICA_LOST = (ActorDiedError, ActorUnavailableError, RayActorError)

app = FastAPI(title="ipex-llm-serve", description="OpenAI-compatible LLM serving on Intel "
              "GPUs and CPU sockets", docs_url=None, redoc_url=None)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and methods answer in OpenAI's error shape too."""
    message = "no such route" if error.status_code == 404 else str(error.detail)
    return _error_response(ServiceError(f"{message}: {request.method} {request.url.path}",
                                        error.status_code))


@app.exception_handler(Exception)
async def _unexpected_error(request: Request, error: Exception) -> Response:
    """A bug still answers in OpenAI's shape (and is logged), never as plain text."""
    if _client_gone(error):  # nobody to answer, and nothing went wrong: no traceback
        logger.info("client went away during %s %s", request.method, request.url.path)
        return Response(status_code=499)  # nginx's "client closed request"; never sent
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return _error_response(ServiceError(f"internal error: {type(error).__name__}", 500))


def _client_gone(error: BaseException) -> bool:
    """Whether ``error`` is Ray cancelling the request because its HTTP client hung up
    (Starlette meets it in ``receive()`` while streaming): every client that leaves
    mid-stream would otherwise log a traceback."""
    if isinstance(error, BaseExceptionGroup):
        return all(_client_gone(inner) for inner in error.exceptions)
    return isinstance(error, TaskCancelledError)


def _body_schema(model: type) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()}}}}


async def _with_deadline(stream: Any, deadline: float
                         ) -> AsyncIterator[OutputChunk | ErrorChunk]:
    """Backstop for the replica's own deadline: a stream that goes silent ends with 504.

    A stream left unfinished (deadline, error, or the caller cancelled: a client that hung
    up) is cancelled here, so the replica aborts the sequence and frees its batch slot
    without waiting for Ray's propagation of the caller's cancellation.
    """
    iterator = stream.__aiter__()
    ended = False
    try:
        while True:
            try:
                # Not asyncio.wait_for: on Python 3.11 it drops a cancellation that lands
                # as a chunk arrives, and the generation would run on.
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.001)):
                    chunk = await iterator.__anext__()
            except StopAsyncIteration:
                ended = True
                return
            except TimeoutError:
                raise ServiceError("the model did not answer before the deadline",
                                   504) from None
            yield chunk
    finally:
        if not ended:
            stream.cancel()


async def _merge(streams: list[AsyncIterator[OutputChunk]]
                 ) -> AsyncIterator[tuple[int, OutputChunk]]:
    """Interleave several chunk streams as they produce, tagged with their index."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, OutputChunk | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[OutputChunk]) -> None:
        try:
            async for chunk in stream:
                await queue.put((index, chunk))
            await queue.put((index, None))
        except BaseException as error:
            await queue.put((index, error))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


Chunk = TypeVar("Chunk")


async def _primed(streams: list[AsyncIterator[Chunk]]) -> list[AsyncIterator[Chunk]]:
    """The streams, each with its first chunk awaited, all together, before any is returned:
    a prompt the replica refuses (its first chunk is the error) then fails the whole request
    before the response starts, as an OpenAI 4xx, not as an error event after the other
    prompts' text. On a failure every stream is closed, which cancels its generation."""
    if len(streams) == 1:
        return streams
    firsts = [asyncio.ensure_future(anext(stream)) for stream in streams]
    try:
        chunks = await asyncio.gather(*firsts)
    except BaseException:
        for first in firsts:
            first.cancel()
        await asyncio.gather(*firsts, return_exceptions=True)
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]
        raise
    return [_starting_with(chunk, stream) for chunk, stream in zip(chunks, streams, strict=True)]


async def _starting_with(first: Chunk, rest: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    yield first
    async for chunk in rest:
        yield chunk


# The one place an engine's ErrorKind becomes an HTTP status.
_STATUS_OF_KIND = {ErrorKind.INVALID_REQUEST: 400, ErrorKind.MISCONFIGURED: 500,
                   ErrorKind.UNAVAILABLE: 503, ErrorKind.TIMEOUT: 504}


def _service_error(error: ErrorChunk) -> ServiceError:
    """A replica's error chunk as the ServiceError the caller gets (OpenAI's ``param``
    names the request field at fault); an engine failure may be retried shortly."""
    status = _STATUS_OF_KIND[error.kind]
    return ServiceError(error.message, status, error.field,
                        retry_after_s=constants.RETRY_AFTER_S if status == 503 else None)


def _choice_prompts(request: CompletionRequest) -> list[str]:
    """Each choice's prompt as text (echo takes text prompts only), choice by choice."""
    return [prompt if isinstance(prompt, str) else ""
            for prompt in request.prompts for _ in range(request.n)]


def _peek_stream_flag(body: bytes) -> bool:
    """Whether the body asks to stream; full validation happens in the operation."""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: a deeply nested body
        return False
    return isinstance(parsed, dict) and parsed.get("stream") is True


async def _sse(first: dict[str, Any], rest: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    yield f"data: {json.dumps(first)}\n\n"
    try:
        async for chunk in rest:
            yield f"data: {json.dumps(chunk)}\n\n"
    except ServiceError as error:
        yield f"data: {json.dumps(error.to_dict())}\n\n"
    except Exception as error:  # a bug mid-stream still ends the stream in OpenAI's shape
        logger.exception("unexpected error in a stream")
        internal = ServiceError(f"internal error: {type(error).__name__}", 500)
        yield f"data: {json.dumps(internal.to_dict())}\n\n"
    yield "data: [DONE]\n\n"


def _error_response(error: ServiceError) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status_code, headers=error.headers())


@serve.deployment(name="LLMRouter", max_ongoing_requests=constants.ROUTER_MAX_ONGOING_REQUESTS,
                  max_queued_requests=constants.ROUTER_MAX_QUEUED_REQUESTS,
                  # Ray's default (20 s) would cut streams the model replicas still serve.
                  graceful_shutdown_timeout_s=constants.GRACEFUL_SHUTDOWN_TIMEOUT_S)
@serve.ingress(app)
class LLMRouter:
    def __init__(self, server: DeploymentHandle, config: LLMConfig,
                 metrics_dir: str | None = None):
        self._server = server
        self._config = config
        self._api_keys = config.api_keys()
        self._metric_labels = metrics.labels_for(config.model_name, "router", "")
        # When a model replica last sent this router a chunk (time.monotonic()): proof of
        # life for /health while every replica is too busy to take its probe in time.
        self._last_replica_chunk = -math.inf
        metrics.prepare_multiprocess_dir(metrics_dir)
        if not any(isinstance(f, CallerErrorLogFilter) for f in logger.filters):
            logger.addFilter(CallerErrorLogFilter())

    # ---- Python API (handle callers) -----------------------------------------------------

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, model_id: str) -> dict[str, Any]:
        """The served model's card (OpenAI's ``GET /v1/models/{model}``); 404 for any other."""
        if model_id != self._config.model_name:
            raise self._unknown_model(model_id)
        return self._model_card()

    def _unknown_model(self, model_id: str) -> ServiceError:
        return ServiceError(f"the model `{model_id}` does not exist; this server serves "
                            f"`{self._config.model_name}`", 404, param="model",
                            code="model_not_found")

    def _model_card(self) -> dict[str, Any]:
        return {"id": self._config.model_name, "object": "model", "created": 0,
                "owned_by": "ipex-llm-serve"}

    async def tokenize(self, body: TokenizeRequest | dict[str, Any] | bytes) -> dict[str, Any]:
        """A prompt or chat split by the served model's tokenizer, in vLLM's ``/tokenize``
        shapes (a body of its request, or the contract's TokenizeRequest): what LangChain's
        ``get_num_tokens`` counts with, so it counts this model's tokens, not GPT-2's."""
        request: TokenizeRequest
        if isinstance(body, TokenizeRequest):
            request = body
        else:
            parsed = parse_tokenize_body(body)
            self._check_model(parsed.model)
            request = parsed.tokenize_request()
        result = await self._server.tokenize.remote(request)
        if isinstance(result, ErrorChunk):
            raise _service_error(result)
        return tokenize_response(result)

    async def detokenize(self, body: dict[str, Any] | bytes) -> dict[str, Any]:
        """Token ids back to text, in vLLM's ``/detokenize`` shapes."""
        parsed = parse_detokenize_body(body)
        self._check_model(parsed.model)
        request = DetokenizeRequest(tokens=tuple(parsed.tokens))
        text = await self._server.detokenize.remote(request)
        if isinstance(text, ErrorChunk):
            raise _service_error(text)
        return detokenize_response(text)

    async def version(self) -> dict[str, Any]:
        return version_response()

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self._config.model_name:
            raise self._unknown_model(model)

    async def responses(self, body: dict[str, Any] | bytes) -> dict[str, Any]:
        """OpenAI's Responses API, minimal (responses_api.py): text or messages in, text
        out, ``text.format`` for structured output."""
        request = self._parse(ResponsesRequest, body)
        answer = await self._generate(self._responses_request(request))
        return response_object(request, new_response_id(), int(time.time()),
                               text=answer.text, finish_reason=answer.finish_reason,
                               usage=usage_of(answer))

    async def responses_stream(self, body: dict[str, Any] | bytes
                               ) -> AsyncIterator[dict[str, Any]]:
        """The Responses API's typed stream events (response.created, ...output_text.delta,
        response.completed)."""
        request = self._parse(ResponsesRequest, body)
        async for event in ResponseEvents(request).stream(
                self._stream(self._responses_request(request))):
            yield event

    def _responses_request(self, request: ResponsesRequest) -> GenerateRequest:
        guide = None
        if request.response_format() is not None:
            guide = parse_request(ResponseFormat, request.response_format()).guide()
            error = guide_error(guide)
            if error:
                raise ServiceError(f"`text.format` cannot be enforced: {error}",
                                   param="text.format")
        turns = tuple(ChatTurn(**message) for message in request.chat_messages())
        return GenerateRequest(
            messages=turns, request_id=new_id("req"), max_tokens=request.max_output_tokens,
            timeout_s=self._config.request_timeout_s,
            sampling=request.sampling().model_copy(update={"guide": guide}))

    async def completions(self, body: CompletionRequest | dict[str, Any] | bytes
                          ) -> dict[str, Any]:
        request = self._parse(CompletionRequest, body)
        response_id = new_id("cmpl")
        answers = await self._gather([self._generate(r)
                                      for r in self._completion_requests(request)])
        prompts = _choice_prompts(request)
        choices = [completion_choice(i, answer, prefix=prompts[i] if request.echo else "",
                                     logprobs=request.logprobs is not None)
                   for i, answer in enumerate(answers)]
        return completion_response(response_id, request.model, choices,
                                   usage(*answers, choices_per_prompt=request.n))

    async def completions_stream(self, body: CompletionRequest | dict[str, Any] | bytes
                                 ) -> AsyncIterator[dict[str, Any]]:
        request = self._parse(CompletionRequest, body)
        response_id = new_id("cmpl")
        prompts = _choice_prompts(request)
        streams = await _primed([self._stream(r) for r in self._completion_requests(request)])
        echoed: set[int] = set()
        last_chunks = []
        async for index, chunk in _merge(streams):
            prefix = ""
            if request.echo and index not in echoed:
                echoed.add(index)
                prefix = prompts[index]
            if chunk.text or chunk.finish_reason or prefix:
                choice = completion_choice(index, chunk, prefix=prefix,
                                           logprobs=request.logprobs is not None)
                yield completion_chunk(response_id, request.model, choice)
            if chunk.finish_reason:
                last_chunks.append(chunk)
        if request.include_usage:
            yield usage_chunk(response_id, request.model, "text_completion",
                              usage(*last_chunks, choices_per_prompt=request.n))

    async def chat_completions(self, body: ChatCompletionRequest | dict[str, Any] | bytes
                               ) -> dict[str, Any]:
        request = self._parse(ChatCompletionRequest, body)
        answers = await self._gather([self._generate(r) for r in self._chat_requests(request)])
        choices = [chat_choice(i, answer, **self._tool_reading(request),
                               logprobs=request.logprobs) for i, answer in enumerate(answers)]
        return chat_response(new_id("chatcmpl"), request.model, choices,
                             usage(*answers, choices_per_prompt=request.n))

    async def chat_completions_stream(self, body: ChatCompletionRequest | dict[str, Any] | bytes
                                      ) -> AsyncIterator[dict[str, Any]]:
        request = self._parse(ChatCompletionRequest, body)
        response_id = new_id("chatcmpl")
        streams = await _primed([self._stream(r) for r in self._chat_requests(request)])
        states = [ChatChoiceStream(**self._tool_reading(request)) for _ in streams]
        last_chunks = []
        async for index, chunk in _merge(streams):
            logprobs = chat_logprobs(chunk.logprobs) if request.logprobs else None
            for delta, finish_reason in states[index].deltas(chunk):
                yield chat_chunk(response_id, request.model, index, delta, finish_reason,
                                 logprobs)
                logprobs = None  # a chunk's tokens go with its first delta
            if chunk.finish_reason:
                last_chunks.append(chunk)
        if request.include_usage:
            yield usage_chunk(response_id, request.model, "chat.completion.chunk",
                              usage(*last_chunks, choices_per_prompt=request.n))

    def _completion_requests(self, request: CompletionRequest) -> list[GenerateRequest]:
        """One replica request per choice: ``n`` per prompt, prompt by prompt."""
        return [self._generate_request(request, seed, prompt=prompt)
                for prompt in request.prompts for seed in request.choice_seeds()]

    def _chat_requests(self, request: ChatCompletionRequest) -> list[GenerateRequest]:
        """One replica request per choice; a forced tool call generates under its grammar."""
        sampling_update = {}
        if request.forced_tools:
            named = request.tool_choice.function.name if request.tool_mode == "named" else None
            sampling_update["guide"] = forced_call_guide(request.tool_list, named,
                                                         request.parallel_tool_calls)
        return [self._generate_request(request, seed, sampling_update=sampling_update,
                                       messages=request.chat_turns(), tools=request.tool_list)
                for seed in request.choice_seeds()]

    def _tool_reading(self, request: ChatCompletionRequest) -> dict[str, Any]:
        """How a chat answer's tool calls are read (choices.py)."""
        named = request.tool_choice.function.name if request.tool_mode == "named" else None
        return {"mode": request.tool_mode, "named": named,
                "parser": self._config.tool_call_parser}

    @staticmethod
    async def _gather(answers: list[Awaitable[OutputChunk]]) -> list[OutputChunk]:
        """Every choice's answer; one failed: the others' generation is stopped too."""
        tasks = [asyncio.ensure_future(answer) for answer in answers]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def health(self) -> dict[str, Any]:
        """The serving replicas' state; ServiceError 503 while none can serve.

        Replicas at capacity serve (excess requests get 503 + Retry-After), so a load
        balancer must not take the service out of rotation for it: the probe answers
        "busy" when the replicas' queue is full, and also when the probe waited its whole
        timeout in that queue while answers kept streaming in (every streamed answer sends
        a chunk at least every MAX_STREAM_INTERVAL_S, well inside constants.HEALTH_TIMEOUT_S).
        """
        try:
            replica = await asyncio.wait_for(self._server.health.remote(),
                                             constants.HEALTH_TIMEOUT_S)
        except BackPressureError:
            return {"status": "busy", "replica": None}
        except TimeoutError:
            if time.monotonic() - self._last_replica_chunk < constants.HEALTH_TIMEOUT_S:
                return {"status": "busy", "replica": None}
            raise ServiceError("no model replica answered within "
                               f"{constants.HEALTH_TIMEOUT_S:.0f} s", 503,
                               retry_after_s=constants.RETRY_AFTER_S) from None
        except Exception as error:
            raise ServiceError(f"no model replica is ready: {type(error).__name__}", 503,
                               retry_after_s=constants.RETRY_AFTER_S) from None
        return {"status": "ok", "replica": replica}

    # ---- HTTP ----------------------------------------------------------------------------

    @app.get("/metrics")
    async def http_metrics(self) -> Response:
        """Prometheus text format, aggregated over every replica process of this node."""
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/health")
    async def http_health(self) -> Response:
        return await self._respond(self.health)

    @app.get("/v1/models")
    async def http_models(self, request: Request) -> Response:
        return await self._respond(self.models, request=request)

    @app.get("/v1/models/{model_id:path}")
    async def http_model(self, model_id: str, request: Request) -> Response:
        return await self._respond(lambda: self.model(model_id), request=request)

    @app.post("/tokenize")
    async def http_tokenize(self, request: Request) -> Response:
        return await self._respond_to_body(request, self.tokenize)

    @app.post("/detokenize")
    async def http_detokenize(self, request: Request) -> Response:
        return await self._respond_to_body(request, self.detokenize)

    @app.get("/version")
    async def http_version(self) -> Response:
        return await self._respond(self.version)

    @app.post("/v1/responses", openapi_extra=_body_schema(ResponsesRequest))
    async def http_responses(self, request: Request) -> Response:
        try:
            self._authorize(request)
            body = await self._read_body(request)
            if not _peek_stream_flag(body):
                return JSONResponse(await self.responses(body))
            events = self.responses_stream(body)
            first = await anext(events)  # errors before the answer starts: plain HTTP errors
        except ServiceError as error:
            return _error_response(error)
        return StreamingResponse(responses_sse(_starting_with(first, events)),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def http_completions(self, request: Request) -> Response:
        return await self._http_generate(request, self.completions, self.completions_stream)

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
    async def http_chat_completions(self, request: Request) -> Response:
        return await self._http_generate(request, self.chat_completions,
                                         self.chat_completions_stream)

    async def _http_generate(self, request: Request,
                             whole: Callable[[bytes], Awaitable[dict[str, Any]]],
                             stream: Callable[[bytes], AsyncIterator[dict[str, Any]]]
                             ) -> Response:
        try:
            self._authorize(request)
            body = await self._read_body(request)
            wants_stream = _peek_stream_flag(body)
            if not wants_stream:
                return JSONResponse(await whole(body))
            chunks = stream(body)
            first = await anext(chunks)  # errors before the first token are plain HTTP errors
        except ServiceError as error:
            return _error_response(error)
        return StreamingResponse(_sse(first, chunks), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _respond_to_body(self, request: Request,
                               operation: Callable[[bytes], Awaitable[dict[str, Any]]]
                               ) -> Response:
        try:
            self._authorize(request)
            body = await self._read_body(request)
        except ServiceError as error:
            return _error_response(error)
        return await self._respond(lambda: operation(body))

    async def _respond(self, operation: Callable[[], Awaitable[dict[str, Any]]],
                       request: Request | None = None) -> Response:
        try:
            if request is not None:
                self._authorize(request)
            return JSONResponse(await operation())
        except ServiceError as error:
            return _error_response(error)

    def _authorize(self, request: Request) -> None:
        if not self._api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        presented = token.strip().encode() if scheme.lower() == "bearer" else b""
        # Compare against every key, always, so timing does not reveal which one matched.
        matched = False
        for key in self._api_keys:
            matched |= hmac.compare_digest(presented, key.encode())
        if not matched:
            raise ServiceError("missing or invalid API key (Authorization: Bearer <key>)", 401)

    async def _read_body(self, request: Request) -> bytes:
        limit = self._config.max_request_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ServiceError(f"the body is larger than {limit} bytes", 413)
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise ServiceError(f"the body is larger than {limit} bytes", 413)
        return bytes(body)

    # ---- shared path ---------------------------------------------------------------------

    def _parse(self, model: type, body: Any) -> Any:
        try:
            return self._validate(model, body)
        except ServiceError:
            self._count("error")
            raise

    def _count(self, status: str) -> None:
        metrics.REQUESTS_TOTAL.record(1, {**self._metric_labels, "status": status})

    def _validate(self, model: type, body: Any) -> Any:
        """``body`` (an OpenAI request model, or its JSON as a dict or bytes) validated,
        within this application's limits; ServiceError 400 if it is not."""
        request = body if isinstance(body, model) else parse_request(model, body)
        if request.model != self._config.model_name:
            raise self._unknown_model(request.model)
        if len(request.stop_strings) > self._config.max_stop_strings:
            raise ServiceError(f"at most {self._config.max_stop_strings} stop strings",
                               param="stop")
        if any(len(s) > constants.MAX_STOP_STRING_CHARS for s in request.stop_strings):
            raise ServiceError(f"stop strings are limited to {constants.MAX_STOP_STRING_CHARS}"
                               " characters", param="stop")
        if request.timeout is not None and request.timeout > self._config.max_request_timeout_s:
            raise ServiceError(f"`timeout` is capped at {self._config.max_request_timeout_s} s",
                               param="timeout")
        choices = len(getattr(request, "prompts", (None,))) * getattr(request, "n", 1)
        if choices > self._config.max_prompts_per_request:
            raise ServiceError(f"at most {self._config.max_prompts_per_request} answers per "
                               "request (prompts x n)",
                               param="n" if getattr(request, "n", 1) > 1 else "prompt")
        return request

    def _generate_request(self, request: Any, seed: int | None, *,
                          sampling_update: dict[str, Any] | None = None,
                          **prompt: Any) -> GenerateRequest:
        """The replica's request for one choice of a validated OpenAI ``request``:
        ``prompt=`` text or token ids, or ``messages=`` a chat (and its ``tools=``)."""
        if isinstance(prompt.get("prompt"), list):
            prompt = {"prompt_token_ids": prompt["prompt"]}
        sampling = request.sampling(seed)
        if sampling_update:
            sampling = sampling.model_copy(update=sampling_update)
        return GenerateRequest(
            **prompt, request_id=new_id("req"), max_tokens=request.requested_max_tokens,
            timeout_s=request.timeout or self._config.request_timeout_s, sampling=sampling)

    async def _generate(self, request: GenerateRequest) -> OutputChunk:
        """The whole answer as one chunk: the last one's counts, every chunk's text and
        logprobs."""
        chunks = [chunk async for chunk in self._stream(request)]
        assert chunks  # a stream ends with a chunk or raises
        return chunks[-1].model_copy(update={
            "text": "".join(chunk.text for chunk in chunks),
            "logprobs": tuple(lp for chunk in chunks for lp in chunk.logprobs)})

    async def _stream(self, request: GenerateRequest) -> AsyncIterator[OutputChunk]:
        """Chunks from a replica; retried once elsewhere if the replica dies before
        the first token; errors raised as ServiceError."""
        deadline = time.monotonic() + request.timeout_s + constants.RETRY_AFTER_S * 5
        for attempt in (1, 2):
            sent_any = False
            try:
                stream = self._server.options(stream=True).generate_stream.remote(request)
                async for chunk in _with_deadline(stream, deadline):
                    self._last_replica_chunk = time.monotonic()
                    if isinstance(chunk, ErrorChunk):
                        raise _service_error(chunk)
                    sent_any = True
                    yield chunk
                return
            except BackPressureError:
                self._count("rejected")
                raise ServiceError("the model replicas are at capacity; retry shortly", 503,
                                   retry_after_s=constants.RETRY_AFTER_S) from None
            except _REPLICA_LOST as error:
                if sent_any or attempt == 2:
                    raise ServiceError(f"the model replica serving this request was lost "
                                       f"({type(error).__name__}); retry", 503,
                                       retry_after_s=constants.RETRY_AFTER_S) from None
                logger.warning("replica lost before the first token; retrying: %s", error)
