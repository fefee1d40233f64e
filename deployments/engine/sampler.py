"""The shared sampler: next tokens from each row's logits, the same for every runner.

Greedy at temperature 0, else top-k then top-p sampling at the request's temperature, with
a random generator per request: a seeded request repeats its answer whatever else is
batched with it, on any engine. EOS is barred until a request's min_tokens.

Imports neither ray nor torch (numpy only).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import numpy as np

from deployments.engine.plan import SequenceState
from deployments.engine.protocol import SamplingParams


class Sampler:
    """Samples for many requests; holds one generator per request until ``forget``."""

    def __init__(self, eos_token_ids: Iterable[int]):
        self._eos_index = np.array(sorted(set(eos_token_ids)), dtype=np.int64)
        self._rngs: dict[str, np.random.Generator] = {}  # request id -> its generator

    def sample(self, logits: np.ndarray, sequences: Sequence[SequenceState]) -> list[int]:
        """One token per row of ``logits`` (float, one row per sequence, in order)."""
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
                tokens.append(sample_top_k_top_p(row_logits, params, self._rng(seq)))
        return tokens

    def forget(self, request_id: str) -> None:
        """Drop a finished request's generator."""
        self._rngs.pop(request_id, None)

    @property
    def num_requests(self) -> int:
        """Requests holding a generator (those sampled at a temperature and not forgotten)."""
        return len(self._rngs)

    def _rng(self, seq: SequenceState) -> np.random.Generator:
        rng = self._rngs.get(seq.request_id)
        if rng is None:
            seed = seq.request.params.seed
            rng = np.random.default_rng(seed if seed is not None else random.getrandbits(63))
            self._rngs[seq.request_id] = rng
        return rng


def sample_top_k_top_p(logits: np.ndarray, params: SamplingParams,
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
