"""The shared sampler: next tokens from each row's logits, the same for every runner.

Per row, in vLLM's order: the grammar mask of a guided request (only tokens that keep the
answer inside its grammar), logit_bias, the repetition, frequency and presence penalties,
EOS barred until min_tokens; then greedy at temperature 0, else temperature, top-k, top-p
and min_p, and a draw with a random generator per request: a seeded request repeats its
answer whatever else is batched with it, on any engine. Logprobs, when asked for, are those
of the distribution the token was drawn from (after temperature, top-k, top-p and min_p;
greedy rows: the processed logits at temperature 1).

Imports neither ray nor torch (numpy only).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from deployments.contract import TokenLogprob, TopLogprob
from deployments.engine.guided import GuideCompiler, GuideState
from deployments.engine.plan import SequenceState
from deployments.engine.protocol import EngineError, SamplingParams


@dataclass(frozen=True)
class Sample:
    token: int
    logprob: TokenLogprob | None = None


class Sampler:
    """Samples for many requests; holds a generator and a grammar state per request until
    ``forget``. ``token_text`` spells one token (for logprobs)."""

    def __init__(self, eos_token_ids: Iterable[int], *,
                 token_text: Callable[[int], str] = str,
                 guides: GuideCompiler | None = None):
        self._eos_index = np.array(sorted(set(eos_token_ids)), dtype=np.int64)
        self._token_text = token_text
        self._guides = guides
        self._rngs: dict[str, np.random.Generator] = {}  # request id -> its generator
        self._guide_states: dict[str, GuideState] = {}  # request id -> its grammar's state

    def prepare(self, seq: SequenceState) -> None:
        """Check what the request needs before it runs: a guided request's grammar compiles
        (EngineError naming the field if it cannot, or if this runner has no guides)."""
        guide = seq.request.params.guide
        if guide is None:
            return
        if self._guides is None:
            raise EngineError("this engine cannot constrain answers to a grammar",
                              field="response_format")
        self._guide_states[seq.request_id] = self._guides.state(guide)

    def needed(self, seq: SequenceState) -> bool:
        """Whether ``seq``'s token depends on more than the model's choice: a grammar,
        logprobs, logit_bias or penalties."""
        params = seq.request.params
        return bool(params.guide or params.logprobs is not None or params.logit_bias
                    or params.repetition_penalty != 1.0 or params.presence_penalty
                    or params.frequency_penalty)

    def sample(self, logits: np.ndarray, sequences: Sequence[SequenceState]) -> list[Sample]:
        """One token per row of ``logits`` (float, one row per sequence, in order)."""
        return [self._sample_row(logits[row], seq) for row, seq in enumerate(sequences)]

    def accept(self, seq: SequenceState, token: int) -> None:
        """Advance a guided request's grammar past ``token`` (appended to the answer)."""
        state = self._guide_states.get(seq.request_id)
        if state is not None:
            state.advance(token)

    def guide_complete(self, seq: SequenceState) -> bool:
        """Whether a guided request's answer is complete: its grammar allows nothing more."""
        state = self._guide_states.get(seq.request_id)
        return state is not None and state.is_complete()

    def forget(self, request_id: str) -> None:
        """Drop a finished request's generator and grammar state."""
        self._rngs.pop(request_id, None)
        self._guide_states.pop(request_id, None)

    @property
    def num_requests(self) -> int:
        """Requests holding state (sampled at a temperature, or guided), not yet forgotten."""
        return len(self._rngs.keys() | self._guide_states.keys())

    # ---- one row -------------------------------------------------------------------------

    def _sample_row(self, row_logits: np.ndarray, seq: SequenceState) -> Sample:
        params = seq.request.params
        logits = self._processed(row_logits, seq)
        if params.temperature == 0:
            token = int(logits.argmax())
            probs = _softmax(logits) if params.logprobs is not None else None
        else:
            probs = _distribution(logits, params)
            token = int(self._rng(seq).choice(probs.size, p=probs))
        if params.logprobs is None:
            return Sample(token)
        return Sample(token, self._logprob(probs, token, params.logprobs))

    def _processed(self, row_logits: np.ndarray, seq: SequenceState) -> np.ndarray:
        """The row's logits after the grammar mask, logit_bias, penalties and the EOS bar;
        a copy only when something changes them."""
        params = seq.request.params
        logits = row_logits
        state = self._guide_states.get(seq.request_id)
        if state is not None:
            logits = np.where(state.allowed(logits.size), logits, -np.inf).astype(np.float32)
        if params.logit_bias or params.repetition_penalty != 1.0 or params.presence_penalty \
                or params.frequency_penalty:
            logits = _penalized(logits if logits is not row_logits else logits.copy(),
                                seq, params)
        if self._eos_index.size and len(seq.generated) < params.min_tokens:
            barred = logits if logits is not row_logits else logits.copy()
            barred[self._eos_index] = -np.inf
            if np.isfinite(barred).any():  # a grammar that may only end now ends anyway
                logits = barred
        if not np.isfinite(logits).any():
            raise EngineError("no token is allowed here (the grammar and logit_bias leave "
                              "none)", field="response_format")
        return logits

    def _logprob(self, probs: np.ndarray, token: int, top: int) -> TokenLogprob:
        with np.errstate(divide="ignore"):
            logprobs = np.log(probs)
        order = np.argsort(-logprobs, kind="stable")[:top] if top else []
        return TokenLogprob(
            **self._spelled(token, logprobs[token]),
            top_logprobs=tuple(TopLogprob(**self._spelled(int(t), logprobs[t])) for t in order))

    def _spelled(self, token: int, logprob: float) -> dict:
        text = self._token_text(token)
        return {"token": text, "logprob": max(float(logprob), -9999.0),
                "bytes": tuple(text.encode())}

    def _rng(self, seq: SequenceState) -> np.random.Generator:
        rng = self._rngs.get(seq.request_id)
        if rng is None:
            seed = seq.request.params.seed
            rng = np.random.default_rng(seed if seed is not None else random.getrandbits(63))
            self._rngs[seq.request_id] = rng
        return rng


def _penalized(logits: np.ndarray, seq: SequenceState, params: SamplingParams) -> np.ndarray:
    """logit_bias added, then vLLM's penalties: repetition (tokens of prompt or answer:
    positive logits divided, negative multiplied), frequency (per occurrence in the answer)
    and presence (once, if in the answer)."""
    for token, bias in params.logit_bias:
        if 0 <= token < logits.size:
            logits[token] += bias
    if params.repetition_penalty != 1.0:
        seen = np.unique(np.fromiter((*seq.prompt, *seq.generated), dtype=np.int64))
        seen = seen[seen < logits.size]
        values = logits[seen]
        logits[seen] = np.where(values > 0, values / params.repetition_penalty,
                                values * params.repetition_penalty)
    if (params.frequency_penalty or params.presence_penalty) and seq.generated:
        counts = np.bincount(np.asarray(seq.generated, dtype=np.int64), minlength=logits.size)
        counts = counts[:logits.size]
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return logits


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits.astype(np.float64) - logits.max())
    return shifted / shifted.sum()


def _distribution(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The probabilities a token is drawn from: at the request's temperature, among its
    top_k most likely tokens (all tied with the k-th stay), within its top_p nucleus, and
    without tokens below min_p x the likeliest one's probability."""
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
    if params.min_p > 0:
        probs = np.where(probs >= params.min_p * probs.max(), probs, 0.0)
    return probs / probs.sum()
