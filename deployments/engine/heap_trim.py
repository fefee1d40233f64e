"""HeapTrimmer: gives the memory a runner freed back to the operating system.

Why: a runner that allocates and frees many mid-sized CPU tensors (engine ipex_llm's prompt
cache keeps each finished sequence's KV as its own tensors and evicts the oldest) leaves
glibc's heap full of free chunks that it keeps rather than returns. The process's RSS then
grows long after the cache reached its bound, as if it leaked, and a host's memory is
counted twice (the cache's bound plus what the heap keeps). ``malloc_trim(0)`` releases
every free page of every arena (glibc 2.8 and later).

Contract: ``freed(n)`` is told of bytes the runner let go of; once ``threshold_bytes`` have
accumulated (or at ``idle()``, when the runner's batch has emptied after work), the heap is
trimmed on the calling thread, which must be the runner's own (between two steps, so no
model step allocates meanwhile). Where glibc is absent (musl, macOS) it does nothing, and
says so in its report.

Imports neither ray nor torch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from dataclasses import dataclass
from typing import Any

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE_BYTES


@dataclass
class HeapTrimStats:
    """What trimming has done so far: for /health, so its cost and effect can be read."""

    available: bool
    threshold_bytes: int
    trims: int = 0
    seconds: float = 0.0
    released_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"available": self.available, "threshold_bytes": self.threshold_bytes,
                "trims": self.trims, "seconds": round(self.seconds, 4),
                "released_bytes": self.released_bytes}


class HeapTrimmer:
    """Trims the heap after ``threshold_bytes`` were freed, and when the runner goes idle."""

    def __init__(self, threshold_bytes: int):
        if threshold_bytes < 1:
            raise ValueError("threshold_bytes must be >= 1")
        self._trim = _malloc_trim()
        self._pending = 0
        self.stats = HeapTrimStats(available=self._trim is not None,
                                   threshold_bytes=threshold_bytes)

    def freed(self, nbytes: int) -> None:
        """``nbytes`` were let go of; trims once enough have been since the last trim."""
        self._pending += nbytes
        if self._pending >= self.stats.threshold_bytes:
            self.trim()

    def idle(self) -> None:
        """The runner has nothing running: trim if anything was freed since the last trim."""
        if self._pending:
            self.trim()

    def trim(self) -> None:
        self._pending = 0
        if self._trim is None:
            return
        before, started = _rss_bytes(), time.perf_counter()
        self._trim(0)
        self.stats.seconds += time.perf_counter() - started
        self.stats.trims += 1
        self.stats.released_bytes += max(before - _rss_bytes(), 0)
