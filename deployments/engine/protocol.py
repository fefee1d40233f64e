"""The engine contract: what a serving replica needs from a model backend.

An engine owns one model on one device and advances a batch of sequences one step at a time,
in the style of vLLM's ``LLMEngine`` (``add_request`` / ``step`` / ``abort``): the replica's
scheduler loop calls these from a single thread of its own, so an implementation needs no
locking. Step-wise operation is what lets each sequence stream, stop and be aborted on its own,
and lets new sequences join the running batch between decode steps (continuous batching).

``BatchingEngine`` (batching.py) implements it for every backend that is a ``ModelRunner``
(runner.py) under the shared scheduler; a backend with a scheduler of its own would
implement ``LLMEngine`` directly.

This module imports neither ray nor torch, so the router, the adapter and unit tests can use
the types without the model stack.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from deployments.contract import ErrorKind, Sampling, TokenLogprob

FinishReason = Literal["stop", "length", "abort"]


class EngineError(Exception):
    """A request the engine cannot serve: the message, its kind, and the request field at
    fault (``field``: "prompt", "max_tokens", ...) when one is."""

    def __init__(self, message: str, *, kind: ErrorKind = ErrorKind.INVALID_REQUEST,
                 field: str | None = None):
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.field = field


class SamplingParams(Sampling):
    """The contract's Sampling and the answer's length: everything the engine decides a
    request's tokens by (the replica fills ``max_tokens`` in before the engine sees it)."""

    max_tokens: int = 256


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class GenerationOutput:
    """What one step produced for one request.

    ``text`` is the new text since the previous output of this request (never a partial
    stop string, never half a UTF-8 character); ``finish_reason`` is set on its last output.
    """

    request_id: str
    text: str
    num_prompt_tokens: int
    num_generated_tokens: int
    finish_reason: FinishReason | None = None
    # Leading prompt tokens whose KV came from the engine's prompt cache (not computed).
    num_cached_prompt_tokens: int = 0
    # With SamplingParams.logprobs: the tokens generated since the previous output (EOS
    # that ended the answer excluded), with their logprobs.
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepResult:
    """One scheduler iteration: the outputs, and how many sequences the step decoded."""

    outputs: list[GenerationOutput]
    batch_size: int
    num_prefill_tokens: int = 0


class LLMEngine(abc.ABC):
    """A model on one device that generates for many requests, one step at a time.

    Contract:
    - ``add_request`` queues a sequence; it joins the running batch at a later ``step``.
    - ``step`` admits waiting sequences (within ``max_batch_size`` and the per-step prefill
      token budget), runs one decode step for every running sequence, and returns each
      request's new text. A finished request (EOS, stop string, max_tokens, abort) is
      reported once with its ``finish_reason`` and then forgotten. Given ``early``, it may
      hand outputs that exist before the decode (first tokens of admitted requests, aborts)
      to ``early`` first, so they are not held back for a step of everyone's decoding; the
      result then holds the rest.
    - ``abort`` ends a request at the next step, freeing its batch slot.
    All methods are called from one thread.
    """

    @property
    @abc.abstractmethod
    def max_context_tokens(self) -> int:
        """Prompt plus generated tokens one sequence may hold."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Token ids run from 0 to vocab_size - 1; callers check prompts of token ids."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as the model sees a prompt (special tokens included)."""

    @abc.abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of ``token_ids`` as an answer shows it (special tokens skipped)."""

    @abc.abstractmethod
    def apply_chat_template(self, messages: Sequence[dict[str, Any]],
                            tools: Sequence[dict[str, Any]] = ()) -> str:
        """The prompt text for a chat (OpenAI-style message dicts: role, content, and
        tool_calls / tool_call_id), offering ``tools`` (OpenAI tool objects), ending where
        the assistant's answer begins."""

    def warm_up(self) -> None:
        """Prepare the device before the first request (e.g. compile its kernels); called
        once, on the engine thread, before the replica serves. Nothing by default."""
        return

    @abc.abstractmethod
    def add_request(self, request: GenerationRequest) -> None: ...

    @abc.abstractmethod
    def abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    def has_unfinished_requests(self) -> bool: ...

    @abc.abstractmethod
    def step(self, early: Callable[[list[GenerationOutput]], None] | None = None
             ) -> StepResult: ...
