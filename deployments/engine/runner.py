"""The model runner contract: what a backend supplies under the shared scheduler.

A runner owns a model on one device and its KV cache. It executes the scheduler's plans
(plan.py) and answers the few questions admission needs about its memory layout; it never
decides who runs. ipex_llm, llama_cpp and echo are runners; none of them subclasses the
scheduler, and the scheduler's rules are tested with no model at all.

Imports neither ray nor torch.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from deployments.engine.guided import GuideCompiler
from deployments.engine.heap_trim import HeapTrimStats
from deployments.engine.plan import RunnerOutput, SequenceState, StepPlan


class TokenizerText(Protocol):
    """A model's text side: the same for the scheduler (stop strings) and the replica."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as the model sees a prompt (special tokens included)."""

    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of generated ``token_ids`` (special tokens skipped)."""

    def apply_chat_template(self, messages: Sequence[dict[str, Any]],
                            tools: Sequence[dict[str, Any]] = ()) -> str:
        """The prompt text for a chat offering ``tools``, ending where the assistant's
        answer begins (LLMEngine.apply_chat_template)."""

    def guides(self, vocab_size: int, eos_token_ids: Sequence[int]) -> GuideCompiler:
        """Grammar constraints over these tokens (guided.py)."""


@dataclass(frozen=True)
class RunnerLimits:
    """What the scheduler must respect, as the runner's model and memory set it.

    ``max_kv_tokens``: KV positions (one token of one row) every running sequence together
    may come to hold, as ``kv_positions`` counts them; None: unbounded.
    ``decodes_row_subsets``: ``execute`` takes a decode of some running rows, not all (what
    short-first decoding needs). ``joins_in_front``: joining rows go in front of the
    running ones in the runner's batch (else after them).
    """

    max_batch_size: int
    max_prefill_tokens_per_step: int
    max_context_tokens: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    max_kv_tokens: int | None = None
    short_first: bool = False
    decodes_row_subsets: bool = False
    joins_in_front: bool = False

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_prefill_tokens_per_step < 1:
            raise ValueError("max_batch_size and max_prefill_tokens_per_step must be >= 1")
        if self.max_kv_tokens is not None and self.max_kv_tokens < 1:
            raise ValueError("max_kv_tokens must be >= 1")


@dataclass(frozen=True)
class PromptCacheUsage:
    """What a runner's prompt cache holds now: bounded by ``capacity_positions``, so a
    replica's memory grows by at most ``capacity_bytes`` as it fills (a leak check
    subtracts ``bytes``). Sizes are counted as the runner budgets them (positions x its
    KV bytes per position)."""

    entries: int
    positions: int
    capacity_positions: int
    bytes_per_position: int

    def to_dict(self) -> dict[str, int]:
        return {"entries": self.entries, "positions": self.positions,
                "capacity_positions": self.capacity_positions,
                "bytes": self.positions * self.bytes_per_position,
                "capacity_bytes": self.capacity_positions * self.bytes_per_position}


class ModelRunner(abc.ABC):
    """A model's tensor work for the shared scheduler. Called from one thread."""

    text: TokenizerText
    limits: RunnerLimits

    @classmethod
    @abc.abstractmethod
    def load(cls, checkpoint_path: str, *, device: str, max_batch_size: int,
             max_prefill_tokens_per_step: int, options: Any = None,
             hashes_verified: bool = False) -> ModelRunner:
        """Load the checkpoint at ``checkpoint_path`` onto ``device`` ("cpu" or "xpu:N").

        ``options`` is the engine's own options model (options.py), as the config
        validated it; None means its defaults. The checkpoint is verified against its
        manifest first; ``hashes_verified`` says the caller already hashed every file of
        this very folder (the node-local cache does while copying), so only the manifest
        and sizes are checked: a node hashes a checkpoint once, not once per replica.
        Raises EngineError naming the checkpoint when it is missing, corrupt or of
        another format."""

    @abc.abstractmethod
    def execute(self, plan: StepPlan) -> RunnerOutput:
        """Do ``plan`` (leaving, prefill, join, decode, in that order); the next token's
        logits (or tokens) of each of ``plan.sampled``."""

    def warm_up(self) -> None:
        """Prepare the device before the first request (e.g. compile its kernels); called
        once, on the engine thread. Nothing by default."""
        return

    def kv_positions(self, running: Sequence[SequenceState],
                     joining: Sequence[SequenceState]) -> int:
        """The most KV positions the batch can come to hold if ``joining`` joins ``running``
        and every sequence runs to its end. This default fits runners that store each
        sequence on its own (a slot or pages per sequence): the sum of their final
        lengths. A runner with another layout (padded rows) overrides it."""
        context = self.limits.max_context_tokens
        return sum(seq.final_length(context) for seq in (*running, *joining))

    def rows_decodable(self, running: Sequence[SequenceState],
                       wanted: Sequence[SequenceState]) -> list[SequenceState]:
        """The running rows (in batch order) this runner decodes for a step that needs only
        ``wanted`` (a proper subset of ``running``, in batch order): at least those, at
        most all. Only asked when ``limits.decodes_row_subsets``."""
        return list(wanted)

    def claim_cache(self, seq: SequenceState) -> int:
        """Reserve what ``seq``'s prefill can take from this runner's prompt cache as it
        comes up for admission; the leading prompt tokens it supplies (the step's prefill
        budget then counts only the rest). Kept until ``unclaim_cache`` or the prefill."""
        return 0

    def unclaim_cache(self, seq: SequenceState) -> None:
        """Give back what ``claim_cache`` reserved: ``seq`` waits for a later step."""
        return

    def heap_trim_stats(self) -> HeapTrimStats | None:
        """What returning freed memory to the OS (heap_trim.py) has done and cost; None
        for a runner that does not (its memory is allocated up front)."""
        return None

    def prompt_cache_usage(self) -> PromptCacheUsage | None:
        """What a prompt cache kept outside the running batch holds now; None when the
        runner keeps none (or keeps it in memory allocated up front, as llama_cpp's slots).
        """
        return None


def eos_ids(*ids: int | Iterable[int] | None) -> frozenset[int]:
    """The end-of-sequence ids among ``ids`` (ints, lists of them, or None)."""
    found: set[int] = set()
    for item in ids:
        if item is None:
            continue
        found.update([item] if isinstance(item, int) else item)
    return frozenset(found)
