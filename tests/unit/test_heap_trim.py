"""HeapTrimmer against this machine's real glibc: freed heap memory goes back to the OS once
enough was freed, or when the runner goes idle."""

from __future__ import annotations

import pytest

from deployments.engine import heap_trim
from deployments.engine.heap_trim import HeapTrimmer

CHUNK_BYTES = 20_000  # mid-sized: from malloc's heap, not a mapping of its own


def fragmented_heap(megabytes: int) -> list[bytearray]:
    """Free ``megabytes`` of heap chunks, keeping every 50th: the survivors pin the heap, so
    free() alone returns nothing (what evicted KV tensors leave behind)."""
    chunks = [bytearray(CHUNK_BYTES) for _ in range(megabytes * 2**20 // CHUNK_BYTES)]
    return chunks[::50]


def test_a_trim_returns_the_free_heap_memory_to_the_os():
    trimmer = HeapTrimmer(threshold_bytes=1)
    survivors = fragmented_heap(200)
    before = heap_trim._rss_bytes()
    trimmer.freed(200 * 2**20)
    assert trimmer.stats.trims == 1 and trimmer.stats.available
    assert before - heap_trim._rss_bytes() > 150 * 2**20
    assert trimmer.stats.released_bytes > 150 * 2**20 and trimmer.stats.seconds > 0
    assert len(survivors) > 0


def test_trims_wait_for_the_threshold_or_for_idle_after_something_was_freed():
    trimmer = HeapTrimmer(threshold_bytes=100)
    trimmer.idle()  # nothing freed: nothing to do
    trimmer.freed(60)
    assert trimmer.stats.trims == 0
    trimmer.freed(60)  # 120 >= 100
    assert trimmer.stats.trims == 1
    trimmer.freed(10)
    trimmer.idle()
    assert trimmer.stats.trims == 2
    trimmer.idle()
    assert trimmer.stats.trims == 2
    assert trimmer.stats.to_dict()["threshold_bytes"] == 100


def test_without_glibc_it_does_nothing_and_says_so(monkeypatch):
    monkeypatch.setattr(heap_trim, "_malloc_trim", lambda: None)  # musl, macOS
    trimmer = HeapTrimmer(threshold_bytes=1)
    trimmer.freed(10)
    assert trimmer.stats.to_dict() == {"available": False, "threshold_bytes": 1, "trims": 0,
                                       "seconds": 0.0, "released_bytes": 0}
    with pytest.raises(ValueError):
        HeapTrimmer(threshold_bytes=0)
