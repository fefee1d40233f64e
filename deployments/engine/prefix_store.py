"""PrefixStore: finished sequences' KV, kept for prompts that start with the same tokens.

A prompt cache for engines whose running batch cannot keep a finished row's KV in place
(engine ipex_llm's left-padded batch is rebuilt when rows leave): the row's KV is copied
out as it leaves, keyed by the tokens it covers, and a new prompt starting with those
tokens prefills only the rest. Entries are immutable, so any number of prompts can read one
at once. The store is bounded in positions (one token of one sequence) and evicts the
entry used longest ago; an entry that another one extends is not kept twice.

The KV itself is opaque here (the backend's tensors); only tokens and sizes are read.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

KV = TypeVar("KV")


@dataclass(frozen=True, eq=False)
class PrefixEntry(Generic[KV]):
    """The KV of ``tokens``, position by position, and optionally the logits that followed
    the first ``prompt_logits[0]`` of them (the prompt the entry's answer came from), which
    take ``positions - len(tokens)`` positions' worth of memory."""

    tokens: tuple[int, ...]
    kv: KV
    prompt_logits: tuple[int, Any] | None = None
    positions: int = 0


class PrefixStore(Generic[KV]):
    """Up to ``capacity`` positions of finished sequences' KV, least recently used first out."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: collections.OrderedDict[tuple[int, ...], PrefixEntry[KV]] = \
            collections.OrderedDict()  # least recently used first
        self.positions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def longest_prefix(self, prompt: Sequence[int]) -> tuple[PrefixEntry[KV] | None, int]:
        """The entry sharing the longest prefix with ``prompt`` and that prefix's length
        (``None, 0`` if none shares a token); the entry counts as just used."""
        best: PrefixEntry[KV] | None = None
        best_length = 0
        for entry in self._entries.values():
            length = shared_prefix(entry.tokens, prompt)
            if length > best_length:
                best, best_length = entry, length
        if best is not None:
            self._entries.move_to_end(best.tokens)
        return best, best_length

    def put(self, tokens: Sequence[int], make_kv: Callable[[], KV],
            prompt_logits: tuple[int, Any] | None = None, logits_positions: int = 0) -> bool:
        """Keep the KV of ``tokens`` (``make_kv`` copies it out, called only if it is kept)
        and ``prompt_logits`` (counted as ``logits_positions`` positions); whether it was.
        Not kept: no tokens, more than the whole capacity, or an entry that starts with
        ``tokens`` already (it serves every prompt this one would). Entries that ``tokens``
        extend are dropped, then the least recently used until it fits."""
        key = tuple(tokens)
        size = len(key) + logits_positions
        if not key or size > self.capacity:
            return False
        for entry in list(self._entries.values()):
            shared = shared_prefix(entry.tokens, key)
            if shared == len(key):
                self._entries.move_to_end(entry.tokens)
                return False
            if shared == len(entry.tokens):
                self._drop(entry.tokens)
        while self.positions + size > self.capacity:
            self._drop(next(iter(self._entries)))
        self._entries[key] = PrefixEntry(key, make_kv(), prompt_logits, size)
        self.positions += size
        return True

    def _drop(self, key: tuple[int, ...]) -> None:
        self.positions -= self._entries.pop(key).positions


def shared_prefix(cached: Sequence[int], prompt: Sequence[int]) -> int:
    """How many leading tokens ``cached`` and ``prompt`` have in common."""
    length = min(len(cached), len(prompt))
    if length == 0:
        return 0
    differs = np.flatnonzero(np.asarray(cached[:length]) != np.asarray(prompt[:length]))
    return int(differs[0]) if differs.size else length
