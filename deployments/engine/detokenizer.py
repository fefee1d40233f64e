"""Incremental detokenization with stop strings, shared by every engine.

A streamed answer must never show part of a stop string nor half a UTF-8 character, and
the text of all chunks must add up to the text of the whole answer. ``StopStringTextStream``
gets the full decoded text after each token and hands out only what is safe to show.
"""

from __future__ import annotations

from collections.abc import Sequence

_INCOMPLETE_CHAR = "\ufffd"


class StopStringTextStream:
    """Turns successive full decodes of a sequence into safe-to-emit text deltas."""

    def __init__(self, stop: Sequence[str]):
        self._stop = tuple(s for s in stop if s)
        self._emitted_chars = 0
        # Stop strings ending at or before this many characters are text (find_stops off).
        self._stops_end_after = 0
        self.stopped = False

    def update(self, full_text: str, *, final: bool = False, find_stops: bool = True) -> str:
        """The new text to emit, given the whole decoded answer so far.

        Sets ``stopped`` when a stop string appears; the stop string and anything after it
        are never emitted. With ``final`` (the sequence ends for another reason) everything
        still held back is released. Without ``find_stops`` (min_tokens not reached yet)
        stop strings are not looked for, and those in this text never count later; a
        possible start of one at the end is still held back, so a stop string completed
        once they count is never shown in part.
        """
        if self.stopped:
            return ""
        if find_stops:
            cut = self._find_stop(full_text)
        else:
            cut = None
            self._stops_end_after = len(full_text.rstrip(_INCOMPLETE_CHAR))
        if cut is not None:
            self.stopped = True
            return self._emit_until(full_text, cut)
        if final:
            return self._emit_until(full_text, len(full_text.rstrip(_INCOMPLETE_CHAR)))
        safe_end = len(full_text)
        while safe_end > self._emitted_chars and full_text[safe_end - 1] == _INCOMPLETE_CHAR:
            safe_end -= 1
        safe_end -= self._partial_stop_suffix_length(full_text[:safe_end])
        return self._emit_until(full_text, safe_end)

    def _find_stop(self, text: str) -> int | None:
        longest = max((len(s) for s in self._stop), default=0)
        search_from = max(0, self._emitted_chars - longest + 1)
        hits = [i for i in (text.find(s, max(search_from, self._stops_end_after - len(s) + 1))
                            for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _partial_stop_suffix_length(self, text: str) -> int:
        """Length of the longest end of ``text`` that could still grow into a stop string."""
        best = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:length]):
                    best = length
                    break
        return best

    def _emit_until(self, text: str, end: int) -> str:
        if end <= self._emitted_chars:
            return ""
        delta = text[self._emitted_chars:end]
        self._emitted_chars = end
        return delta
