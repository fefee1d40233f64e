"""The continuous-batching scheduler, shared by every runner: who prefills, who decodes.

It decides and keeps state; a runner (runner.py) computes. A step of the engine asks for
plans (plan.py) in this order: release (rows that left), admission (prefill waiting prompts
and join them), release (requests that their first token finished), decode (one token for
the running rows), release. Each plan's output is fed back through ``update``, which
appends tokens, applies the finish rules and yields the text to stream.

Admission, between decode steps: waiting sequences are prefilled (their first token) and
join the batch, bounded by the batch size, a per-step prefill token budget and the
model's context; a prompt too long for one step's budget is prefilled in budget-sized chunks
between everyone's decode steps, so a short request never waits behind a long one. The
first tokens are handed out before the decode runs (the engine's ``early``), so a new
request's TTFT does not include a decode step of the whole batch.

KV memory: with the runner's ``max_kv_tokens``, a waiting sequence is admitted only when the
batch could run every sequence in it to its end within that many KV positions, as the
runner lays them out (``kv_positions``). A running sequence therefore never runs the device
out of memory mid-answer; the queue waits instead (first come, first served, so a large
request is not starved by small ones), and a request that could not fit even alone is
refused when it arrives.

Prompt cache: as a sequence comes up for admission the runner may claim a cached prefix of
its prompt (``claim_cache``); the prefill budget counts only the tokens left to compute,
and a claim is given back if the sequence must wait.

Short-first decoding (``short_first``, for runners that decode row subsets): on a CPU a
decode step's time grows almost linearly with its rows, so a batch is close to processor
sharing, and a 16-token answer next to 256-token ones takes as long per token as they do.
As in FastServe's skip-join scheduling, a long row (``is_long_row``: a token budget,
max_tokens or the context, LONG_ROW_FACTOR times the smallest running one's, with
LONG_ROW_MIN_TOKENS or more still to go) decodes only every LONG_ROW_STRIDE-th step while
shorter requests run: those finish sooner, the long ones keep a guaranteed share (never
starved). Requests of alike budgets are never split, however far along each is: skipping
rows costs throughput (a step has a fixed cost, and fewer rows share it). A runner may
decode more rows than asked (``rows_decodable``).

Finish rules: EOS (from min_tokens on, unless ignore_eos), max_tokens, a full context, a
stop string (from min_tokens on, as vLLM), abort. Text deltas never show part of a stop
string nor half a character (detokenizer.py).

Imports neither ray nor torch.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np

from deployments.constants import LONG_ROW_FACTOR, LONG_ROW_MIN_TOKENS, LONG_ROW_STRIDE
from deployments.contract import ErrorKind
from deployments.engine.detokenizer import StopStringTextStream
from deployments.engine.plan import PrefillWork, RunnerOutput, SequenceState, StepPlan
from deployments.engine.protocol import (
    EngineError,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
)
from deployments.engine.runner import ModelRunner
from deployments.engine.sampler import Sample, Sampler

# The logit of a runner's own token when the sampler must still draw (others: 0): certain
# for any vocabulary, yet within reach of logit_bias and penalties.
CERTAIN_LOGIT = 50.0


class Scheduler:
    """Queues, the running batch and the finish rules; the runner answers layout questions."""

    def __init__(self, runner: ModelRunner):
        limits = runner.limits
        if limits.short_first and not limits.decodes_row_subsets:
            raise EngineError(f"{type(runner).__name__} decodes its whole batch every step: "
                              "short_first needs a runner that can skip rows",
                              kind=ErrorKind.MISCONFIGURED)
        self.limits = limits
        self._runner = runner
        self._decode_text = runner.text.decode
        self._sampler = Sampler(
            limits.eos_token_ids, token_text=lambda token: self._decode_text([token]),
            guides=runner.text.guides(limits.vocab_size, sorted(limits.eos_token_ids)))
        self._decode_steps = 0  # plans that decoded rows; long rows' turns (short_first)
        self._waiting: collections.deque[SequenceState] = collections.deque()
        self._chunking: SequenceState | None = None  # a long prompt prefilled in chunks
        self._running: list[SequenceState] = []  # the runner's batch, in row order
        self._leaving: list[SequenceState] = []  # finished; the runner still holds them
        self._aborted: set[str] = set()
        self._known: set[str] = set()

    # ---- requests ------------------------------------------------------------------------

    def add(self, request: GenerationRequest) -> None:
        """Queue ``request``; EngineError if it can never be served here."""
        context = self.limits.max_context_tokens
        if request.request_id in self._known:
            raise EngineError(f"request id {request.request_id!r} is already running")
        if not request.prompt_token_ids:
            raise EngineError("the prompt is empty", field="prompt")
        if len(request.prompt_token_ids) >= context:
            raise EngineError(
                f"the prompt has {len(request.prompt_token_ids)} tokens; this model's context "
                f"holds {context} tokens including the answer", field="prompt")
        seq = SequenceState(request, StopStringTextStream(request.params.stop))
        needed = self._runner.kv_positions((), (seq,))
        if self.limits.max_kv_tokens is not None and needed > self.limits.max_kv_tokens:
            raise EngineError(
                f"the prompt ({len(request.prompt_token_ids)} tokens) plus max_tokens "
                f"({request.params.max_tokens}) need {needed} positions of this replica's KV "
                f"cache, which holds {self.limits.max_kv_tokens}; lower max_tokens or shorten "
                "the prompt", field="max_tokens")
        self._sampler.prepare(seq)
        self._known.add(request.request_id)
        self._waiting.append(seq)

    def abort(self, request_id: str) -> None:
        """End the request at the next ``apply_aborts``."""
        if request_id in self._known:
            self._aborted.add(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running or self._chunking)

    @property
    def num_running(self) -> int:
        return len(self._running) + (self._chunking is not None)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # ---- plans ---------------------------------------------------------------------------

    def apply_aborts(self) -> list[GenerationOutput]:
        """Finish every aborted request (its last output); running ones leave at the next
        ``schedule_release``."""
        if not self._aborted:
            return []
        outputs = []
        for seq in [s for s in self._waiting if s.request_id in self._aborted]:
            self._waiting.remove(seq)
            outputs.append(self._finish(seq, "abort"))
        if self._chunking is not None and self._chunking.request_id in self._aborted:
            outputs.append(self._finish(self._chunking, "abort"))
            self._leaving.append(self._chunking)
            self._chunking = None
        for seq in self._running:
            if seq.request_id in self._aborted:
                outputs.append(self._finish(seq, "abort"))
        self._aborted.clear()
        self._collect_finished()
        return outputs

    def schedule_release(self) -> StepPlan | None:
        """The finished sequences the runner still holds, or None when there are none."""
        if not self._leaving:
            return None
        plan = StepPlan(leaving=tuple(self._leaving))
        self._leaving = []
        return plan

    def schedule_admission(self) -> StepPlan | None:
        """Prefill work for this step within its token budget (the chunked prompt's next
        chunk first, then whole waiting prompts, first come first served), or None."""
        budget = self.limits.max_prefill_tokens_per_step
        free_rows = self.limits.max_batch_size - len(self._running)
        work: list[PrefillWork] = []
        spent = 0
        if self._chunking is not None and free_rows > 0:
            seq = self._chunking
            # What a prompt cache supplied counts as prefilled: chunks start after it.
            start = max(seq.num_prefilled, seq.num_cached)
            end = min(len(seq.prompt), start + budget)
            work.append(PrefillWork(seq, start, end))
            spent += end - start
            seq.num_prefilled = end
            if end == len(seq.prompt):
                self._chunking = None
        joining = [w.seq for w in work if w.complete]
        whole: list[SequenceState] = []
        while (self._waiting and self._chunking is None
               and len(whole) + len(joining) < free_rows
               and self._fits([*joining, *whole, self._waiting[0]])):
            seq = self._waiting[0]
            seq.num_cached = self._runner.claim_cache(seq)
            cost = len(seq.prompt) - seq.num_cached
            if spent + cost <= budget:
                whole.append(self._waiting.popleft())
                spent += cost
            elif not whole and not work and spent == 0:
                self._chunking = self._waiting.popleft()  # too long for one step: its
                break  # chunks start at the next admission
            else:
                self._runner.unclaim_cache(seq)
                seq.num_cached = 0
                break
        for seq in whole:
            work.append(PrefillWork(seq, seq.num_cached, len(seq.prompt)))
            seq.num_prefilled = len(seq.prompt)
        return StepPlan(prefill=tuple(work)) if work else None

    def schedule_decode(self) -> StepPlan | None:
        """One token for the running rows: all of them, but with ``short_first`` long rows
        (``is_long_row``) only on every LONG_ROW_STRIDE-th decode; None if none run."""
        if not self._running:
            return None
        self._decode_steps += 1
        rows = self._running
        if self.limits.short_first and self._decode_steps % LONG_ROW_STRIDE != 0:
            budgets = [self._token_budget(seq) for seq in self._running]
            smallest = min(budgets)
            short = [seq for seq, budget in zip(self._running, budgets, strict=True)
                     if not is_long_row(budget, budget - len(seq.generated), smallest)]
            if len(short) < len(self._running):
                rows = self._runner.rows_decodable(self._running, short)
        return StepPlan(decode=tuple(rows))

    def update(self, plan: StepPlan, output: RunnerOutput) -> list[GenerationOutput]:
        """Apply a plan's output: complete prefills join the batch, every sampled sequence
        gets its token; the outputs to stream."""
        sampled = plan.sampled
        samples = self._samples(sampled, output)
        joined = [work.seq for work in plan.prefill if work.complete]
        if joined:
            self._running = [*joined, *self._running] if self.limits.joins_in_front else \
                [*self._running, *joined]
        outputs = [self._append(seq, sample)
                   for seq, sample in zip(sampled, samples, strict=True)]
        self._collect_finished()
        return [out for out in outputs if out is not None]

    def _samples(self, sampled: list[SequenceState], output: RunnerOutput) -> list[Sample]:
        """The next token of each sampled sequence: drawn from the runner's logits, or the
        runner's own token unless the request needs the sampler (a grammar, logprobs,
        penalties, logit_bias), which then draws from that token made certain."""
        if output.tokens is None:
            return self._sampler.sample(output.logits, sampled) if sampled else []
        samples = []
        for seq, token in zip(sampled, output.tokens, strict=True):
            if self._sampler.needed(seq):
                certain = np.zeros((1, self.limits.vocab_size), dtype=np.float32)
                certain[0, token] = CERTAIN_LOGIT
                samples += self._sampler.sample(certain, [seq])
            else:
                samples.append(Sample(token))
        return samples

    # ---- rules ---------------------------------------------------------------------------

    def _token_budget(self, seq: SequenceState) -> int:
        """The most tokens ``seq`` may generate in all: max_tokens, or what the context
        leaves after its prompt."""
        return seq.final_length(self.limits.max_context_tokens) - len(seq.prompt)

    def _fits(self, joining: Sequence[SequenceState]) -> bool:
        """Whether ``joining`` may join the running batch within the KV budget."""
        return self.limits.max_kv_tokens is None or \
            self._runner.kv_positions(self._running, joining) <= self.limits.max_kv_tokens

    def _collect_finished(self) -> None:
        """Move finished rows out of the batch, to leave at the next release."""
        finished = [seq for seq in self._running if seq.finish_reason is not None]
        if finished:
            self._leaving += finished
            self._running = [seq for seq in self._running if seq.finish_reason is None]

    def _append(self, seq: SequenceState, sample: Sample) -> GenerationOutput | None:
        """Record one sampled token; the output to stream, if any."""
        if seq.finish_reason is not None:
            return None
        params = seq.request.params
        token = sample.token
        seq.generated.append(token)
        self._sampler.accept(seq, token)
        is_eos = token in self.limits.eos_token_ids
        if sample.logprob is not None and not (is_eos and not params.ignore_eos):
            seq.pending_logprobs.append(sample.logprob)
        finish: FinishReason | None = None
        ended_by_eos = is_eos and not params.ignore_eos and \
            len(seq.generated) >= max(params.min_tokens, 1)
        if ended_by_eos or self._sampler.guide_complete(seq):
            finish = "stop"  # EOS, or a grammar that allows nothing more: the answer is whole
        elif (len(seq.generated) >= params.max_tokens
              or seq.total_tokens >= self.limits.max_context_tokens):
            finish = "length"
        text_ids = seq.generated[:-1] if ended_by_eos else seq.generated
        # As vLLM: stop strings count from min_tokens on (one that ended earlier is text).
        delta = seq.text_stream.update(self._decode_text(text_ids), final=finish is not None,
                                       find_stops=len(seq.generated) >= params.min_tokens)
        if seq.text_stream.stopped:
            finish = "stop"
        if finish is not None:
            return self._finish(seq, finish, delta)
        return _output(seq, delta, None) if delta else None

    def _finish(self, seq: SequenceState, reason: FinishReason, text: str = ""
                ) -> GenerationOutput:
        seq.finish_reason = reason
        self._known.discard(seq.request_id)
        self._sampler.forget(seq.request_id)
        return _output(seq, text, reason)


def is_long_row(budget: int, tokens_left: int, smallest_budget: int) -> bool:
    """Whether a row with this token budget and ``tokens_left`` to go waits out short-first
    steps next to a row whose budget is ``smallest_budget``. That row is never long, so a
    step decodes someone."""
    return budget >= LONG_ROW_FACTOR * smallest_budget and tokens_left >= LONG_ROW_MIN_TOKENS


def _output(seq: SequenceState, text: str, reason: FinishReason | None) -> GenerationOutput:
    logprobs, seq.pending_logprobs = seq.pending_logprobs, []
    return GenerationOutput(
        request_id=seq.request_id, text=text, num_prompt_tokens=len(seq.prompt),
        num_generated_tokens=len(seq.generated), finish_reason=reason,
        num_cached_prompt_tokens=seq.num_cached, logprobs=logprobs)
