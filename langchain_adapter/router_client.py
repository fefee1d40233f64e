"""The LLMRouter of a Serve application, called through its handle; no LangChain here.

``RouterClient`` finds the application's ingress (``serve.get_app_handle``) on the Ray cluster
this process is connected to, and calls the router's Python methods (``completions``,
``chat_completions``, their ``*_stream`` variants, ``models``, ``tokenize``), so validation,
limits and metrics apply exactly as over HTTP. What crosses the handle is a pydantic model:
OpenAI's request models (``CompletionRequest``, ``ChatCompletionRequest``, validated here
with the router's own rules, so a bad value fails before the call with the same 400) and
the contract's ``TokenizeRequest``. Errors come back as ``ServiceError`` (unwrapped from Ray's
wrapper); a missing cluster or application as ``AppUnavailableError``.

``generation_fields`` maps ``model_kwargs`` and per-call keyword arguments, in LangChain
IpexLLM's Hugging Face names or OpenAI's, to the fields of an OpenAI request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import ray
from ray import serve
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from deployments.constants import ADAPTER_CONNECT_TIMEOUT_S, RETRY_AFTER_S
from deployments.contract import TokenizeRequest
from deployments.errors import ServiceError
from deployments.openai_protocol import ChatCompletionRequest, CompletionRequest, parse_request

# Request fields that mean the same in model_kwargs, per-call kwargs and OpenAI requests
# (ignore_eos, min_tokens, top_k: vLLM's extensions, top_k also Hugging Face generate()'s;
# repetition_penalty, min_p: vLLM's too, repetition_penalty as Hugging Face's; timeout: the
# request's deadline in seconds; response_format: json_object or json_schema).
_OPENAI_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos",
                  "min_tokens", "timeout", "presence_penalty", "frequency_penalty",
                  "repetition_penalty", "min_p", "logit_bias", "n", "logprobs", "top_logprobs",
                  "response_format")
# Tool calling (chat only): what ChatRayServe.bind_tools binds, sent as OpenAI's fields.
# Accepted in model_kwargs and per call, not as the adapter's own fields.
TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")
# Hugging Face generate() names (IpexLLM's model_kwargs) that become max_tokens, in precedence
# order. max_length counts prompt + answer there; the adapter does not tokenize, so it caps
# the answer alone: never shorter than IpexLLM's, never longer than max_length tokens.
_MAX_TOKENS_ALIASES = ("max_new_tokens", "max_length")
# IpexLLM's model-loading keys: they matter when from_model_id* converts and deploys a model
# (device: where its replicas run, "cpu" or "xpu"), not per request.
LOAD_KWARGS = ("trust_remote_code", "device")
# What sets a request's generation: accepted in model_kwargs, as the adapter's own fields
# (ChatOpenAI's style) and per call.
GENERATION_KWARGS = frozenset((*_OPENAI_FIELDS, *_MAX_TOKENS_ALIASES, "do_sample"))
_KNOWN_KWARGS = GENERATION_KWARGS | frozenset(TOOL_FIELDS) | frozenset(LOAD_KWARGS)


# The OpenAI request model each router method takes.
_REQUEST_MODELS: dict[str, type[CompletionRequest | ChatCompletionRequest]] = {
    "completions": CompletionRequest, "completions_stream": CompletionRequest,
    "chat_completions": ChatCompletionRequest, "chat_completions_stream": ChatCompletionRequest}


def openai_request(method: str, body: Mapping[str, Any]
                   ) -> CompletionRequest | ChatCompletionRequest:
    """``body`` as the request model router method ``method`` takes; ServiceError 400 (the
    router's own message) when it does not validate."""
    return parse_request(_REQUEST_MODELS[method], dict(body))


class AppUnavailableError(ConnectionError):
    """No Ray cluster to connect to, no such Serve application on it, or it does not answer."""


def generation_fields(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """The OpenAI request fields ``layers`` set, each layer overriding the ones before it
    (``model_kwargs``, then a call's keyword arguments); None values set nothing.

    Accepts OpenAI's names (tools and ``response_format`` among them) and IpexLLM's Hugging
    Face ones: ``max_new_tokens`` and
    ``max_length`` become ``max_tokens`` (an explicit ``max_tokens`` in the same layer wins),
    ``do_sample=False`` means greedy (``temperature`` 0, as in Hugging Face whatever the
    temperature), and a later ``do_sample=True`` or ``temperature`` undoes it. Unknown keys
    raise ValueError naming them: a typo or a knob this server lacks (``num_beams``) must not
    be silently ignored. ``logit_bias`` keys (token ids) go as JSON's strings.
    """
    fields: dict[str, Any] = {}
    greedy = False
    for kwargs in layers:
        unknown = sorted(set(kwargs) - _KNOWN_KWARGS)
        if unknown:
            raise ValueError(f"unsupported generation keyword(s) {', '.join(unknown)}; "
                             f"supported: {', '.join(sorted(_KNOWN_KWARGS))}")
        given = {key: value for key, value in kwargs.items() if value is not None}
        fields.update({key: given[key] for key in (*_OPENAI_FIELDS, *TOOL_FIELDS)
                       if key in given})
        alias = next((given[key] for key in _MAX_TOKENS_ALIASES if key in given), None)
        if alias is not None and "max_tokens" not in given:
            fields["max_tokens"] = alias
        if "do_sample" in given:
            greedy = given["do_sample"] is False
        elif "temperature" in given:
            greedy = False
    if greedy:
        fields["temperature"] = 0.0
    if "logit_bias" in fields:  # token ids as JSON keys, as over HTTP (ChatOpenAI takes ints)
        fields["logit_bias"] = {str(token): bias for token, bias in fields["logit_bias"].items()}
    return fields


def connect_ray() -> None:
    """Connect this process to its Ray cluster unless it is connected already.

    ``ray.init(address="auto")``: RAY_ADDRESS if set, else the Ray cluster running on this
    machine (``ray start``'s, or the one ``serve run`` started). Never starts a cluster of
    its own, which could not run the application.
    """
    if ray.is_initialized():
        return
    try:
        ray.init(address="auto")
    except ConnectionError as error:
        raise AppUnavailableError(
            f"cannot connect to a Ray cluster ({error}); set RAY_ADDRESS, or call "
            "ray.init(address=...) before making the adapter. A cluster with token "
            "authentication (Ray's default for local clusters) also needs "
            "RAY_AUTH_MODE=token here when RAY_ADDRESS names it") from None


def application_names() -> list[str]:
    return sorted(serve.status().applications)


class RouterClient:
    """Calls to the LLMRouter ingress of Serve application ``app_name``."""

    def __init__(self, app_name: str):
        connect_ray()
        try:
            self._handle: DeploymentHandle = serve.get_app_handle(app_name)
        except RayServeException as error:
            running = application_names() if "does not exist" in str(error) else []
            raise AppUnavailableError(
                f"no Serve application {app_name!r} on the connected Ray cluster ({error}); "
                f"running applications: {running or 'none'}. Start it (`serve run "
                "serve_config.yaml`, or RayServeLLM.from_model_id), or pass the right "
                "app_name") from None
        self.app_name = app_name
        try:
            models = _wait(self._handle.models.remote(), ADAPTER_CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise AppUnavailableError(
                f"Serve application {app_name!r} did not answer within "
                f"{ADAPTER_CONNECT_TIMEOUT_S:.0f} s; is it still deploying? (see `serve status`)"
            ) from None
        except RayServeException as error:
            if "does not exist" not in str(error):
                raise
            raise AppUnavailableError(
                f"Serve application {app_name!r} is not an LLM router (its ingress has no "
                "`models` method); pass the app_name of a deployments.app application") from None
        self.model_names = [entry["id"] for entry in models["data"]]

    # ---- whole answers -------------------------------------------------------------------

    def submit(self, method: str, body: Mapping[str, Any]) -> DeploymentResponse:
        """Start a call without waiting for it: submit many, then wait, to run them together."""
        request = openai_request(method, body)
        return getattr(self._handle, method).remote(request)

    @staticmethod
    def wait_all(responses: Sequence[DeploymentResponse]) -> list[dict[str, Any]]:
        """Every response's result; on the first error the others are cancelled."""
        try:
            with service_errors():
                return [response.result() for response in responses]
        except BaseException:
            for response in responses:
                response.cancel()
            raise

    @staticmethod
    async def await_all(responses: Sequence[DeploymentResponse]) -> list[dict[str, Any]]:
        try:
            with service_errors():
                return list(await asyncio.gather(*responses))
        except BaseException:
            for response in responses:
                response.cancel()
            raise

    def tokenize(self, text: str) -> list[int]:
        """``text``'s token ids by the served model's tokenizer (the router's ``tokenize``)."""
        with service_errors():
            request = TokenizeRequest(prompt=text)
            return _wait(self._handle.tokenize.remote(request), ADAPTER_CONNECT_TIMEOUT_S)["tokens"]

    # ---- streams -------------------------------------------------------------------------

    def stream(self, method: str, body: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """The router's chunks as it yields them; leaving early cancels the request."""
        request = openai_request(method, body)
        chunks = getattr(self._handle.options(stream=True), method).remote(request)
        finished = False
        try:
            with service_errors():
                yield from chunks
            finished = True
        finally:
            if not finished:
                chunks.cancel()

    async def astream(self, method: str, body: Mapping[str, Any]
                      ) -> AsyncIterator[dict[str, Any]]:
        request = openai_request(method, body)
        chunks = getattr(self._handle.options(stream=True), method).remote(request)
        finished = False
        try:
            with service_errors():
                async for chunk in chunks:
                    yield chunk
            finished = True
        finally:
            if not finished:
                chunks.cancel()


@contextmanager
def service_errors() -> Iterator[None]:
    """Raise the router's ServiceError itself, not Ray's wrapper around it.

    A full router queue (Ray's BackPressureError on our handle) is the same 503 + Retry-After
    an HTTP client would get.
    """
    try:
        yield
    except BackPressureError:
        raise ServiceError("the router is at capacity; retry shortly", 503,
                           retry_after_s=RETRY_AFTER_S) from None
    except Exception as error:
        unwrapped = ServiceError.from_exception(error)
        if unwrapped is None:
            raise
        raise unwrapped from None


def _wait(response: DeploymentResponse, timeout_s: float) -> Any:
    """A response's result, also from code running in an event loop (a constructor called
    inside ``async def``), where Ray refuses to block: then wait in a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return response.result(timeout_s=timeout_s)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(response.result, timeout_s=timeout_s).result()
