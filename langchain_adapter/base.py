"""RayServeModel: what the LLM and the chat model share.

The application they call, the model it serves, generation defaults in IpexLLM's
``model_kwargs`` form, the request bodies they send, tracing parameters, and IpexLLM's
constructors (``from_model_id``, ``from_model_id_low_bit``), which deploy the model first.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, Self, TypeVar

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LangSmithParams
from langchain_core.outputs import ChatGenerationChunk, GenerationChunk
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from deployments.constants import DEFAULT_LOW_BIT
from langchain_adapter.deploy import (
    Deployment,
    deploy_low_bit,
    deploy_model,
    resolve_checkpoint_root,
)
from langchain_adapter.router_client import GENERATION_KWARGS, RouterClient, generation_fields

LS_PROVIDER = "ray_serve"
# Both adapters' pydantic config, set in each class: LangChain's bases, later in their MRO,
# would override the mixin's with extra="ignore", which drops unknown constructor fields.
FORBID_UNKNOWN_FIELDS = ConfigDict(extra="forbid")
Piece = TypeVar("Piece", GenerationChunk, ChatGenerationChunk)


class RayServeModel(BaseModel):
    """Fields and request building shared by RayServeLLM and ChatRayServe (a mixin).

    Generation settings are accepted as fields too, as ChatOpenAI takes them
    (``ChatRayServe(temperature=0, max_tokens=64)``): they join ``model_kwargs``. Any other
    unknown field is an error, so a misspelt or unsupported setting is never dropped.
    """

    app_name: str = Field("llm", description="Serve application whose ingress is the LLM "
                          "router (the `name` in serve_config.yaml).")
    model: str | None = Field(None, description="Model the application serves (the requests' "
                              "`model`); None asks the application.")
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Generation defaults; per-call keyword arguments override them. OpenAI "
                    "names (max_tokens, temperature, top_p, top_k, seed, ignore_eos, min_tokens, "
                    "timeout, presence_penalty, frequency_penalty, repetition_penalty, min_p, "
                    "logit_bias, n, logprobs, top_logprobs, response_format; tools, "
                    "tool_choice, parallel_tool_calls for chat) or IpexLLM's: max_new_tokens "
                    "and max_length become max_tokens (max_length then caps the answer alone, "
                    "since the adapter does not tokenize), do_sample=False means temperature "
                    "0, trust_remote_code and device ('cpu' or 'xpu': where the replicas run) "
                    "only matter to from_model_id*, which convert and deploy the model.")

    stop: list[str] | None = Field(None, description="Stop strings for every call; a call's "
                                   "own `stop` replaces them.")
    streaming: bool = Field(False, description="Whether invoke and batch stream each answer "
                            "internally (firing `on_llm_new_token` callbacks), as ChatOpenAI's "
                            "`streaming`.")

    _router: RouterClient = PrivateAttr()

    @model_validator(mode="before")
    @classmethod
    def _settings_into_model_kwargs(cls, data: Any) -> Any:
        """Generation settings given as fields move into ``model_kwargs``; the same key set
        both ways to different values is an error."""
        if not isinstance(data, dict) or not GENERATION_KWARGS & data.keys():
            return data
        data = dict(data)
        settings = {key: data.pop(key) for key in GENERATION_KWARGS & data.keys()}
        model_kwargs = dict(data.get("model_kwargs") or {})
        clashes = sorted(key for key, value in settings.items()
                         if key in model_kwargs and model_kwargs[key] != value)
        if clashes:
            raise ValueError(f"{', '.join(clashes)} set both as a field and in model_kwargs, "
                             "to different values")
        data["model_kwargs"] = {**model_kwargs, **settings}
        return data

    @model_validator(mode="after")
    def _connect(self) -> Self:
        """Find the application now: a wrong name or model fails here, not at the first call."""
        generation_fields(self.model_kwargs)
        self._router = RouterClient(self.app_name)
        served = self._router.model_names
        if self.model is None:
            self.model = served[0]
        elif self.model not in served:
            raise ValueError(f"Serve application {self.app_name!r} serves {served}, not "
                             f"{self.model!r}; leave `model` unset to use what it serves")
        return self

    # ---- IpexLLM's constructors ----------------------------------------------------------

    @classmethod
    def from_model_id(cls, model_id: str, model_kwargs: dict[str, Any] | None = None, *,
                      tokenizer_id: str | None = None, load_in_4bit: bool = True,
                      load_in_low_bit: str | None = None, app_name: str | None = None,
                      checkpoint_root: str | os.PathLike[str] | None = None,
                      app_args: Mapping[str, Any] | None = None,
                      route_prefix: str | None = None, **kwargs: Any) -> Self:
        """Serve ``model_id`` (hub id, model folder or .gguf file) and return the adapter.

        As IpexLLM's, but the model is converted once to a low-bit checkpoint in the
        checkpoint root (``checkpoint_root``, else $LLM_CHECKPOINT_ROOT, else
        ``checkpoints``; a path every node sees) and served by a Serve application on the
        connected cluster (``app_name``, default ``llm-<checkpoint name>``), both reused when
        they exist. ``model_kwargs["device"]`` ("cpu" or "xpu", as IpexLLM takes it) is
        where the replicas run: one Intel GPU tile or CPU socket each (LLMConfig's
        ``device``). ``app_args`` are further LLMConfig fields (max_batch_size...);
        ``route_prefix`` also exposes the application over HTTP. ``kwargs`` go to the adapter
        (callbacks, tags...).
        """
        if tokenizer_id is not None and tokenizer_id != model_id:
            raise ValueError("from_model_id converts a model with its own tokenizer; for "
                             "another tokenizer, save the model with ipex-llm's save_low_bit "
                             "and use from_model_id_low_bit(path, tokenizer_id=...)")
        if load_in_low_bit is None and not load_in_4bit:
            raise ValueError("this server runs low-bit models only; pass load_in_low_bit "
                             "(e.g. 'bf16' or 'sym_int8') instead of load_in_4bit=False")
        model_kwargs = dict(model_kwargs or {})
        deployment = deploy_model(
            model_id, low_bit=load_in_low_bit or DEFAULT_LOW_BIT,
            trust_remote_code=bool(model_kwargs.get("trust_remote_code", False)),
            root=resolve_checkpoint_root(checkpoint_root), app_name=app_name,
            app_args=app_args_with_device(app_args, model_kwargs), route_prefix=route_prefix)
        return cls._for(deployment, model_kwargs, kwargs)

    @classmethod
    def from_model_id_low_bit(cls, model_id: str | os.PathLike[str],
                              model_kwargs: dict[str, Any] | None = None, *,
                              tokenizer_id: str | None = None, app_name: str | None = None,
                              checkpoint_root: str | os.PathLike[str] | None = None,
                              app_args: Mapping[str, Any] | None = None,
                              route_prefix: str | None = None, **kwargs: Any) -> Self:
        """Serve a low-bit model folder and return the adapter.

        ``model_id`` is a checkpoint ``llm-checkpoint`` published (served as it is) or, as
        with IpexLLM, a folder ipex-llm's ``save_low_bit`` wrote, with its tokenizer or the
        tokenizer of ``tokenizer_id``: published once into the checkpoint root first. Other
        arguments as in ``from_model_id``.
        """
        model_kwargs = dict(model_kwargs or {})
        deployment = deploy_low_bit(
            model_id, tokenizer_id=tokenizer_id,
            trust_remote_code=bool(model_kwargs.get("trust_remote_code", False)),
            root=resolve_checkpoint_root(checkpoint_root), app_name=app_name,
            app_args=app_args_with_device(app_args, model_kwargs), route_prefix=route_prefix)
        return cls._for(deployment, model_kwargs, kwargs)

    @classmethod
    def _for(cls, deployment: Deployment, model_kwargs: dict[str, Any],
             kwargs: dict[str, Any]) -> Self:
        return cls(app_name=deployment.app_name, model=deployment.model_name,
                   model_kwargs=model_kwargs, **kwargs)

    # ---- requests ------------------------------------------------------------------------

    def _generation_params(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        # LangChain passes its own `stream` flag on to _generate and _stream: not a setting;
        # a call's `model` names the model (see _body).
        return generation_fields(self.model_kwargs, {key: value for key, value in kwargs.items()
                                                     if key not in ("stream", "model")})

    def _body(self, stop: Sequence[str] | None, kwargs: Mapping[str, Any], *, stream: bool,
              **content: Any) -> dict[str, Any]:
        """An OpenAI request body: ``content`` is ``prompt=`` or ``messages=``. A call's
        ``model`` keyword (LangChain's per-call model override) replaces the adapter's; the
        router refuses a model it does not serve."""
        body = {"model": kwargs.get("model") or self.model, **content,
                **self._generation_params(kwargs)}
        stop = self.stop if stop is None else stop
        if stop:
            body["stop"] = list(stop)
        if stream:
            if body.get("n", 1) != 1:
                raise ValueError("n > 1 cannot stream (the adapter streams one answer); "
                                 "call invoke or generate for several answers")
            body["stream_options"] = {"include_usage": True}
        return body

    def get_token_ids(self, text: str) -> list[int]:
        """``text``'s token ids by the served model's tokenizer (asked of the application),
        not LangChain's default GPT-2 one; a ``custom_get_token_ids`` still wins."""
        if self.custom_get_token_ids is not None:  # type: ignore[attr-defined]
            return self.custom_get_token_ids(text)  # type: ignore[attr-defined]
        return self._router.tokenize(text)

    # ---- streaming (both adapters) -------------------------------------------------------

    def _stream_pieces(self, method: str, body: Mapping[str, Any],
                       run_manager: CallbackManagerForLLMRun | None,
                       piece: Callable[[Mapping[str, Any]], Piece],
                       last: Callable[[StreamState], Piece]) -> Iterator[Piece]:
        """The router's stream ``method`` as LangChain chunks: ``piece(choice)`` for each
        chunk's choice that carries something (text, tool call pieces, logprobs) as it
        arrives, then ``last(state)`` carrying the ending and the usage; each one is also a
        ``on_llm_new_token`` callback."""
        state = StreamState()
        for chunk in self._router.stream(method, body):
            if choice := state.passed_on(chunk):
                out = piece(choice)
                if run_manager:
                    run_manager.on_llm_new_token(out.text, chunk=out)
                yield out
        if state.ended:
            out = last(state)
            if run_manager:
                run_manager.on_llm_new_token(out.text, chunk=out)
            yield out

    async def _astream_pieces(self, method: str, body: Mapping[str, Any],
                              run_manager: AsyncCallbackManagerForLLMRun | None,
                              piece: Callable[[Mapping[str, Any]], Piece],
                              last: Callable[[StreamState], Piece]) -> AsyncIterator[Piece]:
        """``_stream_pieces`` for asyncio callers."""
        state = StreamState()
        async for chunk in self._router.astream(method, body):
            if choice := state.passed_on(chunk):
                out = piece(choice)
                if run_manager:
                    await run_manager.on_llm_new_token(out.text, chunk=out)
                yield out
        if state.ended:
            out = last(state)
            if run_manager:
                await run_manager.on_llm_new_token(out.text, chunk=out)
            yield out

    # ---- tracing -------------------------------------------------------------------------

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """Everything that decides an answer besides the prompt (LangChain's cache key)."""
        # Not "stop": LangChain's cache key puts a call's stop there, over this.
        default_stop = {"default_stop": self.stop} if self.stop else {}
        return {"app_name": self.app_name, "model": self.model, **default_stop,
                **generation_fields(self.model_kwargs)}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop)  # type: ignore[misc]
        params["ls_provider"] = LS_PROVIDER
        if kwargs.get("model"):  # a call's model override (see _body)
            params["ls_model_name"] = kwargs["model"]
        generation = self._generation_params(kwargs)
        if "temperature" in generation:
            params["ls_temperature"] = generation["temperature"]
        if "max_tokens" in generation:
            params["ls_max_tokens"] = generation["max_tokens"]
        return params


def app_args_with_device(app_args: Mapping[str, Any] | None,
                         model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``app_args`` with IpexLLM's ``model_kwargs["device"]`` as the application's ``device``.

    "xpu:N" is refused: Ray gives each replica a tile of its own, which it sees as xpu:0.
    The same setting in both places must agree."""
    args = dict(app_args or {})
    device = model_kwargs.get("device")
    if device is None:
        return args
    device = str(device).strip().lower()
    if device.startswith("xpu:"):
        raise ValueError(f"device {device!r}: each replica gets an Intel GPU tile of its own "
                         "from Ray (it sees it as xpu:0); pass device='xpu'")
    if device not in ("cpu", "xpu", "auto"):
        raise ValueError(f"device {device!r}: expected 'cpu', 'xpu' or 'auto'")
    if args.get("device", device) != device:
        raise ValueError(f"device set to {device!r} in model_kwargs and {args['device']!r} in "
                         "app_args; set it once")
    return {**args, "device": device}


class StreamState:
    """Reads the router's stream chunks (completion or chat): the choices to pass on at
    once, then the ending (the choice that carries finish_reason, with its last text or
    tool call pieces) and the usage, which close the stream."""

    def __init__(self) -> None:
        self.last_choice: Mapping[str, Any] = {}
        self.usage: dict[str, int] | None = None

    def passed_on(self, chunk: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The chunk's choice to stream now; None when the chunk only ends the answer,
        counts usage or carries nothing (a chat stream's opening role-only delta)."""
        if not chunk["choices"]:
            self.usage = chunk.get("usage")
            return None
        choice = chunk["choices"][0]
        if choice["finish_reason"] is not None:
            self.last_choice = choice
            return None
        return choice if carries_something(choice) else None

    @property
    def finish_reason(self) -> str | None:
        return self.last_choice.get("finish_reason")

    @property
    def ended(self) -> bool:
        return self.finish_reason is not None


def carries_something(choice: Mapping[str, Any]) -> bool:
    """Whether a stream chunk's choice has text, tool call pieces or logprobs."""
    delta = choice.get("delta") or {}
    return bool(choice.get("text") or delta.get("content") or delta.get("tool_calls")
                or choice.get("logprobs"))
