"""Continuous batching, independent of the model backend.

``ContinuousBatchingEngine`` implements the ``LLMEngine`` step contract once: the waiting
queue, admission between decode steps (bounded by batch size, a per-step prefill token
budget and the model's context), chunked prefill of long prompts, finish conditions (EOS,
max_tokens, stop strings, context full, abort), streaming text deltas and sampling (greedy,
or temperature + top-p with a generator per request: a seed gives the same answer in any
batch, on either engine). A backend subclass supplies only the tensor work: prefill,
decode one step, join and drop rows, and each row's last logits for ``_sample``.

Per step: waiting sequences are prefilled (their first token) and join the batch, then
every running sequence decodes one token, the new ones included. A short request never
waits behind a long one, and a long prompt is prefilled in budget-sized chunks between
everyone's decode steps. The first tokens are handed out (``step``'s ``early``) before the
decode runs, so a new request's TTFT does not include a decode step of the whole batch;
the running sequences lose nothing: between two of their decode steps there is one
admission either way.

Short-first decoding (``short_first``, for backends that can decode any subset of their
rows: ``decodes_row_subsets``): on a CPU a decode step's time grows almost linearly with its
rows (bench/RESULTS.md), so a batch is
close to processor sharing, and a 16-token answer next to 256-token ones takes as long per
token as they do. Then, as in FastServe's skip-join scheduling, a long row (``_is_long_row``:
a request whose token budget, max_tokens or the context, is LONG_ROW_FACTOR times the
smallest running one's, with LONG_ROW_MIN_TOKENS or more still to go) decodes only every
LONG_ROW_STRIDE-th step while shorter requests run: those finish sooner, the long ones keep
a guaranteed share (never starved). Requests of alike budgets are never split, however far
along each is: skipping rows costs throughput (a step has a fixed cost, and fewer rows share
it), worth paying to let a 16-token answer pass 256-token ones, not to reorder alike ones.
A backend may decode more rows than asked (``_rows_decodable``: a padded batch decodes a
leading run of its rows, and all of them when skipping would cost memory it does not have).

KV memory: with ``max_kv_tokens`` set, a waiting sequence is admitted only when the batch
could run every sequence in it to its end (prompt + max_tokens, or the context) within that
many KV positions (one token of one row), as the backend lays them out (``_kv_positions``).
A running sequence therefore never runs the device out of memory mid-answer; the queue
waits instead (first come, first served, so a large request is not starved by small ones),
and a request that could not fit even alone is refused when it arrives.
"""

from __future__ import annotations

import abc
import collections
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from deployments.constants import LONG_ROW_FACTOR, LONG_ROW_MIN_TOKENS, LONG_ROW_STRIDE
from deployments.contract import ErrorKind
from deployments.engine.detokenizer import StopStringTextStream
from deployments.engine.protocol import (
    EngineError,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    LLMEngine,
    SamplingParams,
    StepResult,
)


@dataclass(eq=False)
class Sequence_:
    """One request's state inside the engine."""

    request: GenerationRequest
    text_stream: StopStringTextStream
    generated: list[int] = field(default_factory=list)
    num_prefilled: int = 0
    num_cached: int = 0  # leading prompt tokens whose KV a backend's prompt cache supplied
    finish_reason: FinishReason | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.request.prompt_token_ids

    @property
    def total_tokens(self) -> int:
        return len(self.prompt) + len(self.generated)




class ContinuousBatchingEngine(LLMEngine, abc.ABC):
    """Scheduling and bookkeeping of the step contract; subclasses do the model work."""

    # Whether ``_decode`` takes a subset of the running rows (those ``_rows_decodable``
    # gives), which short-first decoding needs.
    decodes_row_subsets = False
    # Whether joining rows go in front of the running ones (else after them).
    joins_in_front = False

    def __init__(self, *, max_batch_size: int, max_prefill_tokens_per_step: int,
                 max_context_tokens: int, eos_token_ids: Iterable[int],
                 max_kv_tokens: int | None = None, short_first: bool = False):
        if max_batch_size < 1 or max_prefill_tokens_per_step < 1:
            raise ValueError("max_batch_size and max_prefill_tokens_per_step must be >= 1")
        if max_kv_tokens is not None and max_kv_tokens < 1:
            raise ValueError("max_kv_tokens must be >= 1")
        if short_first and not self.decodes_row_subsets:
            raise EngineError(f"{type(self).__name__} decodes its whole batch every step: "
                              "short_first needs a backend that can skip rows",
                              kind=ErrorKind.MISCONFIGURED)
        self.short_first = short_first
        self._decode_steps = 0  # steps that decoded rows; long rows' turns (short_first)
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens_per_step = max_prefill_tokens_per_step
        self.max_kv_tokens = max_kv_tokens
        self._max_context_tokens = max_context_tokens
        self._eos_token_ids = frozenset(eos_token_ids)
        self._eos_index = np.array(sorted(self._eos_token_ids), dtype=np.int64)  # for _sample
        self._waiting: collections.deque[Sequence_] = collections.deque()
        self._chunking: Sequence_ | None = None  # a long prompt being prefilled in chunks
        self._running: list[Sequence_] = []  # row order of the backend's batch
        self._aborted: set[str] = set()
        self._known: set[str] = set()
        self._rngs: dict[str, np.random.Generator] = {}  # request id -> its sampler's

    # ---- backend hooks -------------------------------------------------------------------

    @abc.abstractmethod
    def _prefill(self, sequences: Sequence[Sequence_]) -> list[int]:
        """Prefill whole prompts as one batch; keep their KV pending; first token of each."""

    @abc.abstractmethod
    def _prefill_chunk(self, sequence: Sequence_, end: int) -> int | None:
        """Prefill prompt tokens [num_prefilled, end); the first token once ``end`` is the
        prompt's length (its KV is then pending), else None."""

    @abc.abstractmethod
    def _join_pending(self) -> None:
        """Append every pending prefilled sequence to the running batch, in prefill order."""

    @abc.abstractmethod
    def _decode(self, sequences: Sequence[Sequence_]) -> list[int]:
        """One decode step over the running batch (rows in ``sequences`` order); with
        ``decodes_row_subsets``, over the rows ``_rows_decodable`` gave."""

    @abc.abstractmethod
    def _drop_rows(self, rows: Sequence[int]) -> None:
        """Remove these rows (ascending) from the running batch."""

    @abc.abstractmethod
    def _decode_text(self, token_ids: Sequence[int]) -> str: ...

    def _rows_decodable(self, wanted: list[Sequence_]) -> list[Sequence_]:
        """The running rows (in batch order) this backend decodes for a step that needs
        only ``wanted`` (a proper subset, in batch order): at least those, at most all."""
        return wanted

    def _claim_cache(self, seq: Sequence_) -> None:
        """Reserve what ``seq``'s prefill can take from the backend's prompt cache, setting
        ``seq.num_cached``, as the sequence comes up for admission: the step's prefill budget
        then counts only the tokens left to compute. A backend without one keeps it 0."""

    def _unclaim_cache(self, seq: Sequence_) -> None:
        """Give back what ``_claim_cache`` reserved: ``seq`` waits for a later step."""

    def _kv_positions(self, running: Sequence[Sequence_], joining: Sequence[Sequence_]) -> int:
        """The most KV positions the batch can come to hold if ``joining`` joins ``running`` and
        every sequence runs to its end. This default fits backends that store each sequence
        on its own (a slot or pages per sequence): the sum of their final lengths. A backend
        with another layout (padded rows) overrides it."""
        return sum(self._final_length(seq) for seq in (*running, *joining))

    def _final_length(self, seq: Sequence_) -> int:
        """Prompt plus answer when ``seq`` ends: max_tokens, or the context, if sooner."""
        return min(len(seq.prompt) + seq.request.params.max_tokens, self._max_context_tokens)

    # ---- LLMEngine -----------------------------------------------------------------------

    @property
    def max_context_tokens(self) -> int:
        return self._max_context_tokens

    def add_request(self, request: GenerationRequest) -> None:
        if request.request_id in self._known:
            raise EngineError(f"request id {request.request_id!r} is already running")
        if not request.prompt_token_ids:
            raise EngineError("the prompt is empty", field="prompt")
        if len(request.prompt_token_ids) >= self._max_context_tokens:
            raise EngineError(
                f"the prompt has {len(request.prompt_token_ids)} tokens; this model's context "
                f"holds {self._max_context_tokens} tokens including the answer", field="prompt")
        seq = Sequence_(request, StopStringTextStream(request.params.stop))
        if self.max_kv_tokens is not None and self._kv_positions((), (seq,)) > self.max_kv_tokens:
            raise EngineError(
                f"the prompt ({len(request.prompt_token_ids)} tokens) plus max_tokens "
                f"({request.params.max_tokens}) need {self._kv_positions((), (seq,))} positions "
                f"of this replica's KV cache, which holds {self.max_kv_tokens}; lower "
                "max_tokens or shorten the prompt", field="max_tokens")
        self._known.add(request.request_id)
        self._waiting.append(seq)

    def abort(self, request_id: str) -> None:
        if request_id in self._known:
            self._aborted.add(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting or self._running or self._chunking)

    @property
    def num_running(self) -> int:
        return len(self._running) + (self._chunking is not None)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def step(self, early: Callable[[list[GenerationOutput]], None] | None = None
             ) -> StepResult:
        outputs = self._apply_aborts()
        prefill_tokens, admitted = self._admit()
        outputs += admitted
        if early is not None:
            ready = [o for o in outputs if o is not None]
            if ready:
                early(ready)
            outputs = []
        decoding = self._rows_to_decode()
        if decoding:
            tokens = self._decode(decoding)
            outputs += [self._append(seq, tok) for seq, tok in zip(decoding, tokens,
                                                                   strict=True)]
            self._drop_finished()
        return StepResult(outputs=[o for o in outputs if o is not None],
                          batch_size=len(decoding), num_prefill_tokens=prefill_tokens)

    # ---- scheduling ----------------------------------------------------------------------

    def _admit(self) -> tuple[int, list[GenerationOutput | None]]:
        """Prefill waiting prompts within the step's token budget and join them to the batch."""
        budget = self.max_prefill_tokens_per_step
        free_rows = self.max_batch_size - len(self._running)
        ready: list[tuple[Sequence_, int]] = []
        spent = 0
        if self._chunking is not None and free_rows > 0:
            seq = self._chunking
            # What a prompt cache supplied counts as prefilled: chunks start after it.
            seq.num_prefilled = max(seq.num_prefilled, seq.num_cached)
            end = min(len(seq.prompt), seq.num_prefilled + budget)
            spent += end - seq.num_prefilled
            first = self._prefill_chunk(seq, end)
            seq.num_prefilled = end
            if first is not None:
                self._chunking = None
                ready.append((seq, first))
        batch: list[Sequence_] = []
        while (self._waiting and self._chunking is None
               and len(batch) + len(ready) < free_rows
               and self._fits([*(seq for seq, _ in ready), *batch, self._waiting[0]])):
            seq = self._waiting[0]
            self._claim_cache(seq)
            cost = len(seq.prompt) - seq.num_cached
            if spent + cost <= budget:
                batch.append(self._waiting.popleft())
                spent += cost
            elif not batch and not ready and spent == 0:
                self._chunking = self._waiting.popleft()  # too long for one step: chunk it
                break
            else:
                self._unclaim_cache(seq)
                break
        if batch:
            for seq in batch:
                seq.num_prefilled = len(seq.prompt)
            ready += zip(batch, self._prefill(batch), strict=True)
        if not ready:
            return spent, []
        self._join_pending()
        joined = [seq for seq, _ in ready]
        self._running = [*joined, *self._running] if self.joins_in_front else \
            [*self._running, *joined]
        outputs = [self._append(seq, tok) for seq, tok in ready]
        self._drop_finished()
        return spent, outputs

    def _rows_to_decode(self) -> list[Sequence_]:
        """The running sequences this step decodes: all of them, but with ``short_first``
        long rows (``_is_long_row``) only on every LONG_ROW_STRIDE-th step."""
        if not self._running:
            return []
        self._decode_steps += 1
        if not self.short_first or self._decode_steps % LONG_ROW_STRIDE == 0:
            return self._running
        budgets = [self._token_budget(seq) for seq in self._running]
        smallest = min(budgets)
        short = [seq for seq, budget in zip(self._running, budgets, strict=True)
                 if not _is_long_row(budget, budget - len(seq.generated), smallest)]
        return self._running if len(short) == len(self._running) else \
            self._rows_decodable(short)

    def _token_budget(self, seq: Sequence_) -> int:
        """The most tokens ``seq`` may generate in all: max_tokens, or what the context
        leaves after its prompt."""
        return self._final_length(seq) - len(seq.prompt)

    def _fits(self, joining: Sequence[Sequence_]) -> bool:
        """Whether ``joining`` may join the running batch within the KV budget."""
        return self.max_kv_tokens is None or \
            self._kv_positions(self._running, joining) <= self.max_kv_tokens

    def _apply_aborts(self) -> list[GenerationOutput | None]:
        if not self._aborted:
            return []
        outputs: list[GenerationOutput | None] = []
        for seq in [s for s in self._waiting if s.request_id in self._aborted]:
            self._waiting.remove(seq)
            outputs.append(self._finish(seq, "abort"))
        if self._chunking is not None and self._chunking.request_id in self._aborted:
            outputs.append(self._finish(self._chunking, "abort"))
            self._discard_chunk_state(self._chunking)
            self._chunking = None
        for seq in self._running:
            if seq.request_id in self._aborted:
                seq.finish_reason = "abort"
                outputs.append(self._finish(seq, "abort"))
        self._drop_finished()
        self._aborted.clear()
        return outputs

    def _discard_chunk_state(self, seq: Sequence_) -> None:
        """Forget ``seq``, a prompt admitted for chunked prefill and aborted before it joined
        (backends with chunk state override this)."""

    def _drop_finished(self) -> None:
        rows = [i for i, seq in enumerate(self._running) if seq.finish_reason is not None]
        if rows:
            self._drop_rows(rows)
            self._running = [s for s in self._running if s.finish_reason is None]

    # ---- per-token bookkeeping -----------------------------------------------------------

    def _append(self, seq: Sequence_, token: int) -> GenerationOutput | None:
        """Record one sampled token; the output to stream, if any."""
        if seq.finish_reason is not None:
            return None
        params = seq.request.params
        seq.generated.append(token)
        is_eos = token in self._eos_token_ids
        finish: FinishReason | None = None
        if is_eos and not params.ignore_eos and len(seq.generated) >= max(params.min_tokens, 1):
            finish = "stop"
        elif (len(seq.generated) >= params.max_tokens
              or seq.total_tokens >= self._max_context_tokens):
            finish = "length"
        text_ids = seq.generated[:-1] if finish == "stop" else seq.generated
        # As vLLM: stop strings count from min_tokens on (one that ended earlier is text).
        delta = seq.text_stream.update(self._decode_text(text_ids), final=finish is not None,
                                       find_stops=len(seq.generated) >= params.min_tokens)
        if seq.text_stream.stopped:
            finish = "stop"
        if finish is not None:
            seq.finish_reason = finish
            return self._finish(seq, finish, delta)
        if not delta:
            return None
        return self._output(seq, delta, None)

    def _finish(self, seq: Sequence_, reason: FinishReason, text: str = "") -> GenerationOutput:
        seq.finish_reason = reason
        self._known.discard(seq.request_id)
        self._rngs.pop(seq.request_id, None)
        return self._output(seq, text, reason)

    # ---- sampling (backends hand over each row's last logits) ----------------------------

    def _sample(self, logits: np.ndarray, sequences: Sequence[Sequence_]) -> list[int]:
        """One token per row of ``logits`` (float, one row per sequence): greedy at
        temperature 0, else top-k / top-p sampling with the request's own generator, so a seeded
        request repeats whatever else is batched. EOS is barred until min_tokens."""
        tokens = []
        for row, seq in enumerate(sequences):
            params = seq.request.params
            row_logits = logits[row]
            if self._eos_index.size and len(seq.generated) < params.min_tokens:
                row_logits = row_logits.copy()
                row_logits[self._eos_index] = -np.inf
            if params.temperature == 0:
                tokens.append(int(row_logits.argmax()))
            else:
                tokens.append(_sample_top_k_top_p(row_logits, params, self._rng(seq)))
        return tokens

    def _rng(self, seq: Sequence_) -> np.random.Generator:
        rng = self._rngs.get(seq.request_id)
        if rng is None:
            seed = seq.request.params.seed
            rng = np.random.default_rng(seed if seed is not None else random.getrandbits(63))
            self._rngs[seq.request_id] = rng
        return rng

    @staticmethod
    def _output(seq: Sequence_, text: str, reason: FinishReason | None) -> GenerationOutput:
        return GenerationOutput(
            request_id=seq.request_id, text=text, num_prompt_tokens=len(seq.prompt),
            num_generated_tokens=len(seq.generated), finish_reason=reason,
            num_cached_prompt_tokens=seq.num_cached)


def _is_long_row(budget: int, tokens_left: int, smallest_budget: int) -> bool:
    """Whether a row with this token budget and ``tokens_left`` to go waits out short-first
    steps next to a row whose budget is ``smallest_budget``. That row is never long, so a
    step decodes someone."""
    return budget >= LONG_ROW_FACTOR * smallest_budget and tokens_left >= LONG_ROW_MIN_TOKENS


def _sample_top_k_top_p(logits: np.ndarray, params: SamplingParams,
                        rng: np.random.Generator) -> int:
    """Sample at the request's temperature among its top_k most likely tokens (all tokens
    tied with the k-th stay), then within those its top_p nucleus."""
    scaled = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < scaled.size:
        kth_largest = np.partition(scaled, -params.top_k)[-params.top_k]
        scaled = np.where(scaled >= kth_largest, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max())
    if params.top_p < 1.0:
        order = np.argsort(-probs)
        sorted_probs = probs[order]
        cumulative = np.cumsum(sorted_probs) / sorted_probs.sum()
        keep = int(np.searchsorted(cumulative, params.top_p)) + 1  # the token crossing top_p
        probs = np.zeros_like(probs)
        probs[order[:keep]] = sorted_probs[:keep]
    return int(rng.choice(probs.size, p=probs / probs.sum()))
