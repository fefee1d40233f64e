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


class _Node:
    """A token trie node: the entries whose tokens pass through it, the one ending here."""

    __slots__ = ("children", "ending", "through")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.through: set[tuple[int, ...]] = set()
        self.ending: tuple[int, ...] | None = None


class PrefixStore(Generic[KV]):
    """Up to ``capacity`` positions of finished sequences' KV, least recently used first out.

    Entries are indexed by a token trie (as SGLang's radix cache and vLLM's block hashes
    index theirs): a lookup walks the prompt's tokens once, whatever the number of entries.
    """

    def __init__(self, capacity: int, on_drop: Callable[[int], None] | None = None):
        """``on_drop(positions)`` is told of each entry let go of (its KV freed)."""
        self.capacity = capacity
        self._on_drop = on_drop
        self._entries: collections.OrderedDict[tuple[int, ...], PrefixEntry[KV]] = \
            collections.OrderedDict()  # least recently used first
        self._root = _Node()
        self._last_used: dict[tuple[int, ...], int] = {}
        self._clock = 0
        self.positions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def longest_prefix(self, prompt: Sequence[int]) -> tuple[PrefixEntry[KV] | None, int]:
        """The entry sharing the longest prefix with ``prompt`` (of several, the one used
        last) and that prefix's length (``None, 0`` if none shares a token); the entry
        counts as just used."""
        node, depth = self._root, 0
        for token in prompt:
            child = node.children.get(token)
            if child is None:
                break
            node, depth = child, depth + 1
        if depth == 0:
            return None, 0
        key = max(node.through, key=self._last_used.__getitem__)
        self._use(key)
        return self._entries[key], depth

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
        node, extended = self._root, []
        for token in key:
            node = node.children.get(token)
            if node is None:
                break
            if node.ending is not None:
                extended.append(node.ending)
        else:  # every token is on the trie: an entry starts with ``tokens``
            self._use(max(node.through, key=self._last_used.__getitem__))
            return False
        for shorter in extended:
            self._drop(shorter)
        while self.positions + size > self.capacity:
            self._drop(next(iter(self._entries)))
        self._entries[key] = PrefixEntry(key, make_kv(), prompt_logits, size)
        self._insert(key)
        self._use(key)
        self.positions += size
        return True

    def _use(self, key: tuple[int, ...]) -> None:
        self._clock += 1
        self._last_used[key] = self._clock
        self._entries.move_to_end(key)

    def _insert(self, key: tuple[int, ...]) -> None:
        node = self._root
        for token in key:
            node = node.children.setdefault(token, _Node())
            node.through.add(key)
        node.ending = key

    def _drop(self, key: tuple[int, ...]) -> None:
        dropped = self._entries.pop(key).positions
        self.positions -= dropped
        if self._on_drop is not None:
            self._on_drop(dropped)
        del self._last_used[key]
        node = self._root
        for token in key:
            child = node.children[token]
            child.through.discard(key)
            if not child.through:
                del node.children[token]  # nothing else below: the branch goes
                return
            node = child
        node.ending = None


def shared_prefix(cached: Sequence[int], prompt: Sequence[int]) -> int:
    """How many leading tokens ``cached`` and ``prompt`` have in common."""
    length = min(len(cached), len(prompt))
    if length == 0:
        return 0
    differs = np.flatnonzero(np.asarray(cached[:length]) != np.asarray(prompt[:length]))
    return int(differs[0]) if differs.size else length
