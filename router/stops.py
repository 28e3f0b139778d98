"""Stop sequences on streamed text.

A stop string can arrive split over several chunks ("\\n" now, "\\n" next step), so text that might be
the start of a stop string is held back until it either completes the stop (and is dropped) or stops
being a possible start (and is released). That keeps the streamed text exactly the final text.
"""

from __future__ import annotations

from typing import Sequence


class StopMatcher:
    """Finds the first stop string in one request's text and decides which text is safe to release."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Adds text; returns (text safe to release, whether a stop string was found). After a stop,
        the released text ends just before the stop string and the rest is discarded."""
        buffer = self._held + text
        first = min((i for i in (buffer.find(s) for s in self._stops) if i >= 0), default=-1)
        if first >= 0:
            self._held = ""
            return buffer[:first], True
        hold = self._partial_suffix(buffer)
        self._held = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        """Releases held text (generation ended without a stop)."""
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of some stop string."""
        longest = max((len(s) for s in self._stops), default=0)
        for size in range(min(len(buffer), longest - 1), 0, -1):
            tail = buffer[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0
