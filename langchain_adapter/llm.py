"""RayServeLLM: a LangChain LLM served by the application's LLM router, through its handle."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
    Callbacks,
)
from langchain_core.language_models import LLM, LanguageModelInput
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from langchain_core.runnables import Runnable, RunnableConfig
from pydantic import Field

from deployments.openai_protocol import sum_usage
from langchain_adapter.base import FORBID_UNKNOWN_FIELDS, RayServeModel, StreamState
from langchain_adapter.router_client import GENERATION_KWARGS, generation_fields


class RayServeLLM(RayServeModel, LLM):
    """A text-completion LLM whose model runs in a Ray Serve application.

    Calls go to the router's Python methods (``/v1/completions`` semantics, or
    ``/v1/chat/completions`` with ``chat_template``), so validation, limits and metrics are
    those of HTTP clients. ``batch`` sends every prompt at once, so
    the replicas batch them; ``stream`` passes text on as the replica produces it. Service
    errors (bad parameters, backpressure, deadlines) raise ``ServiceError``.

    Example:
        .. code-block:: python

            import ray
            from langchain_core.prompts import PromptTemplate
            from langchain_adapter import RayServeLLM

            ray.init(address="auto")  # the cluster that runs `serve run serve_config.yaml`
            llm = RayServeLLM(app_name="llm", chat_template=True,
                              model_kwargs={"temperature": 0, "max_length": 64})
            chain = PromptTemplate.from_template("USER: {question}\\nASSISTANT:") | llm
            chain.invoke({"question": "What is the capital of France?"})
    """

    model_config = FORBID_UNKNOWN_FIELDS

    chat_template: bool = Field(
        False, description="Send each prompt as one user message, framed by the model's chat "
        "template on the replica (/v1/chat semantics) instead of as raw text. Instruct models "
        "answer far better so: as a raw completion the demo SmolLM2-135M-Instruct answers "
        "'USER: What is the capital of France?\\nASSISTANT:' with 'The answer is:' over and "
        "over; with its template, 'The capital of France is Paris.'")

    @property
    def _llm_type(self) -> str:
        return "ray_serve"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {**super()._identifying_params, "chat_template": self.chat_template}

    def generate(self, prompts: list[str], stop: list[str] | None = None,
                 callbacks: Callbacks | list[Callbacks] | None = None,
                 **kwargs: Any) -> LLMResult:
        """LangChain's ``generate``, with a call's generation settings made the model's.

        LangChain's LLM cache keys an answer by the model's settings and ``stop`` only, not
        by a call's keyword arguments, so ``invoke(p, max_tokens=2)`` would get the cached
        answer of ``invoke(p)``; a copy of the adapter with those settings in its
        ``model_kwargs`` keys (and sends) them.
        """
        model, kwargs = self._with_call_settings(kwargs)
        return super(RayServeLLM, model).generate(prompts, stop, callbacks, **kwargs)

    async def agenerate(self, prompts: list[str], stop: list[str] | None = None,
                        callbacks: Callbacks | list[Callbacks] | None = None,
                        **kwargs: Any) -> LLMResult:
        model, kwargs = self._with_call_settings(kwargs)
        return await super(RayServeLLM, model).agenerate(prompts, stop, callbacks, **kwargs)

    def batch(self, inputs: list[LanguageModelInput],
              config: RunnableConfig | list[RunnableConfig] | None = None, *,
              return_exceptions: bool = False, **kwargs: Any) -> list[str]:
        """All prompts in one call, so the replicas batch them; with ``return_exceptions``
        each prompt is its own call (as ChatRayServe's batch), so a bad prompt fails alone.

        LangChain's LLM.batch would give every input the first prompt's error, and the
        other prompts' requests would be cancelled.
        """
        if return_exceptions:
            return Runnable.batch(self, inputs, config, return_exceptions=True, **kwargs)
        return super().batch(inputs, config, **kwargs)

    async def abatch(self, inputs: list[LanguageModelInput],
                     config: RunnableConfig | list[RunnableConfig] | None = None, *,
                     return_exceptions: bool = False, **kwargs: Any) -> list[str]:
        if return_exceptions:
            return await Runnable.abatch(self, inputs, config, return_exceptions=True,
                                         **kwargs)
        return await super().abatch(inputs, config, **kwargs)

    def _with_call_settings(self, kwargs: Mapping[str, Any]
                            ) -> tuple[RayServeLLM, dict[str, Any]]:
        """(this adapter, or a copy with the call's generation settings in its
        ``model_kwargs``; the call's other keyword arguments: tags, metadata...)."""
        settings = {key: value for key, value in kwargs.items() if key in GENERATION_KWARGS}
        rest = {key: value for key, value in kwargs.items() if key not in settings}
        if not settings:
            return self, rest
        loading = {key: value for key, value in self.model_kwargs.items()
                   if key not in GENERATION_KWARGS}
        return self.model_copy(update={"model_kwargs": {
            **loading, **generation_fields(self.model_kwargs, settings)}}), rest

    def _call(self, prompt: str, stop: list[str] | None = None,
              run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        """LangChain's one-prompt entry point (invoke goes through ``_generate``)."""
        return self._generate([prompt], stop, run_manager, **kwargs).generations[0][0].text

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None,
                  **kwargs: Any) -> LLMResult:
        if self.streaming:
            return _streamed_result([_joined(self._stream(prompt, stop, run_manager, **kwargs))
                                     for prompt in prompts], self.model)
        method, bodies = self._requests(prompts, stop, kwargs, stream=False)
        responses = [self._router.submit(method, body) for body in bodies]
        return self._result(self._router.wait_all(responses))

    async def _agenerate(self, prompts: list[str], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None,
                         **kwargs: Any) -> LLMResult:
        if self.streaming:
            return _streamed_result([await _ajoined(self._astream(prompt, stop, run_manager,
                                                                  **kwargs))
                                     for prompt in prompts], self.model)
        method, bodies = self._requests(prompts, stop, kwargs, stream=False)
        responses = [self._router.submit(method, body) for body in bodies]
        return self._result(await self._router.await_all(responses))

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[GenerationChunk]:
        method, (body,) = self._requests([prompt], stop, kwargs, stream=True)
        yield from self._stream_pieces(method, body, run_manager, _piece, _last_chunk)

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        method, (body,) = self._requests([prompt], stop, kwargs, stream=True)
        async for piece in self._astream_pieces(method, body, run_manager, _piece, _last_chunk):
            yield piece

    def _requests(self, prompts: list[str], stop: list[str] | None, kwargs: Mapping[str, Any],
                  *, stream: bool) -> tuple[str, list[dict[str, Any]]]:
        """The router method and one request body per prompt."""
        method = "chat_completions" if self.chat_template else "completions"
        bodies = [self._body(stop, kwargs, stream=stream,
                             **({"messages": [{"role": "user", "content": prompt}]}
                                if self.chat_template else {"prompt": prompt}))
                  for prompt in prompts]
        return f"{method}_stream" if stream else method, bodies

    def _result(self, responses: list[dict[str, Any]]) -> LLMResult:
        """Per prompt its generations (``n`` of them, 1 by default), each with its
        finish_reason, the prompt's token usage (also summed in llm_output, as LangChain's
        OpenAI LLM reports it) and its logprobs when asked for."""
        generations = [[Generation(text=_text(choice), generation_info=_info(
            choice["finish_reason"], response["usage"], choice.get("logprobs")))
            for choice in sorted(response["choices"], key=lambda choice: choice["index"])]
            for response in responses]
        return LLMResult(generations=generations, llm_output={
            "token_usage": sum_usage([response["usage"] for response in responses]),
            "model_name": self.model})


def _joined(chunks: Iterator[GenerationChunk]) -> GenerationChunk:
    whole = GenerationChunk(text="")
    for chunk in chunks:
        whole += chunk
    return whole


async def _ajoined(chunks: AsyncIterator[GenerationChunk]) -> GenerationChunk:
    whole = GenerationChunk(text="")
    async for chunk in chunks:
        whole += chunk
    return whole


def _streamed_result(answers: list[GenerationChunk], model: str | None) -> LLMResult:
    """``streaming=True``'s result: each prompt's chunks joined; usage as in _result."""
    usages = [(answer.generation_info or {}).get("token_usage") or {} for answer in answers]
    return LLMResult(generations=[[answer] for answer in answers], llm_output={
        "token_usage": sum_usage(usages) if all(usages) else {}, "model_name": model})


def _text(choice: Mapping[str, Any]) -> str:
    return choice["text"] if "text" in choice else choice["message"]["content"] or ""


def _info(finish_reason: str | None, usage: Mapping[str, int] | None,
          logprobs: Any = None) -> dict[str, Any]:
    info = {"finish_reason": finish_reason, "token_usage": dict(usage or {})}
    if logprobs:
        info["logprobs"] = logprobs
    return info


def _piece(choice: Mapping[str, Any]) -> GenerationChunk:
    return GenerationChunk(text=_delta_text(choice), generation_info=(
        {"logprobs": choice["logprobs"]} if choice.get("logprobs") else None))


def _delta_text(choice: Mapping[str, Any]) -> str:
    """A stream chunk's text: a completion's, or a chat delta's (with ``chat_template``)."""
    return choice["text"] if "text" in choice else choice["delta"].get("content") or ""


def _last_chunk(state: StreamState) -> GenerationChunk:
    return GenerationChunk(text=_delta_text(state.last_choice), generation_info=_info(
        state.finish_reason, state.usage, state.last_choice.get("logprobs")))
