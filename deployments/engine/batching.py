"""BatchingEngine: the LLMEngine of every runner, the shared scheduler driving it.

``BatchingEngine(runner)`` implements the step contract (protocol.py) once: it asks the
scheduler for plans, has the runner execute them and feeds the outputs back. A backend is a
``ModelRunner`` (runner.py); ``load_engine`` builds the engine from a runner class named in
the config.

Per step, in this order: aborts are applied and the rows they free released; waiting
prompts are prefilled and join (their first tokens go to ``early`` before the decode, so a
new request's TTFT does not wait for a decode step of the whole batch); requests their
first token finished are released; the running rows decode one token; finished rows are
released. Releasing at once keeps a finished row's KV out of the next admission's budget
and puts it in the runner's prompt cache before the next prompt looks there.

Imports neither ray nor torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from deployments.engine.heap_trim import HeapTrimStats
from deployments.engine.plan import StepPlan
from deployments.engine.protocol import GenerationOutput, GenerationRequest, LLMEngine, StepResult
from deployments.engine.runner import ModelRunner, PromptCacheUsage
from deployments.engine.scheduler import Scheduler


class BatchingEngine(LLMEngine):
    """A runner under the shared continuous-batching scheduler."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.scheduler = Scheduler(runner)

    # ---- text and limits -----------------------------------------------------------------

    @property
    def max_context_tokens(self) -> int:
        return self.runner.limits.max_context_tokens

    @property
    def vocab_size(self) -> int:
        return self.runner.limits.vocab_size

    @property
    def max_kv_tokens(self) -> int | None:
        """KV positions admission may fill (None: unbounded); reported by the replica."""
        return self.runner.limits.max_kv_tokens

    def heap_trim_stats(self) -> HeapTrimStats | None:
        """The runner's heap trimming so far (None: it does none); reported by the replica."""
        return self.runner.heap_trim_stats()

    def prompt_cache_usage(self) -> PromptCacheUsage | None:
        """The runner's prompt cache now (None: it keeps none); reported by the replica.
        Read from another thread than the engine's: a snapshot of counters, no tensors."""
        return self.runner.prompt_cache_usage()

    @property
    def short_first(self) -> bool:
        return self.runner.limits.short_first

    def encode(self, text: str) -> list[int]:
        return self.runner.text.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.runner.text.decode(token_ids)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]],
                            tools: Sequence[dict[str, Any]] = ()) -> str:
        return self.runner.text.apply_chat_template(messages, tools)

    def warm_up(self) -> None:
        self.runner.warm_up()

    # ---- requests ------------------------------------------------------------------------

    def add_request(self, request: GenerationRequest) -> None:
        self.scheduler.add(request)

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def step(self, early: Callable[[list[GenerationOutput]], None] | None = None
             ) -> StepResult:
        outputs = self.scheduler.apply_aborts()
        self._release()
        admission = self.scheduler.schedule_admission()
        outputs += self._execute(admission)
        self._release()
        if early is not None and outputs:
            early(outputs)
            outputs = []
        decode = self.scheduler.schedule_decode()
        outputs += self._execute(decode)
        self._release()
        return StepResult(outputs=outputs, batch_size=len(decode.decode) if decode else 0,
                          num_prefill_tokens=admission.num_prefill_tokens if admission else 0)

    def _execute(self, plan: StepPlan | None) -> list[GenerationOutput]:
        if plan is None:
            return []
        return self.scheduler.update(plan, self.runner.execute(plan))

    def _release(self) -> None:
        plan = self.scheduler.schedule_release()
        if plan is not None:
            self.runner.execute(plan)


def load_engine(runner_class_path: str, checkpoint_path: str, **load_args: Any
                ) -> BatchingEngine:
    """The engine of the runner class at ``runner_class_path`` ("module:Class"), loaded
    with ``load_args`` (ModelRunner.load's keyword arguments)."""
    module_name, _, class_name = runner_class_path.partition(":")
    runner_cls: type[ModelRunner] = getattr(importlib.import_module(module_name), class_name)
    return BatchingEngine(runner_cls.load(checkpoint_path, **load_args))
