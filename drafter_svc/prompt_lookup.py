"""Prompt lookup: propose the tokens that followed the latest earlier occurrence of the context's suffix.

It is called every step for every request, so each request keeps an index of its n-grams that is
extended by the appended tokens only: a step costs O(appended x n-sizes) dictionary updates plus at
most one lookup per n, independent of the context length.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from drafter_svc.base import Drafter, Proposal, SyncedRequest
from smartspec.config import add_flag


class NgramIndex:
    """For each n in [min_n, max_n]: n-gram -> end (exclusive) of its most recent occurrence.

    Only n-grams ending before the context's last token are indexed, so the suffix being looked up
    never finds itself, and later occurrences overwrite earlier ones (most recent wins).
    """

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n
        self._last_end: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}
        self._indexed_to = 0  # n-grams ending at or before this position are in the index

    def _extend(self, tokens: Sequence[int], end: int) -> None:
        for stop in range(self._indexed_to + 1, end + 1):
            for n, last_end in self._last_end.items():
                if stop >= n:
                    last_end[tuple(tokens[stop - n : stop])] = stop
        self._indexed_to = max(self._indexed_to, end)

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens following the longest (then most recent) earlier match of the suffix.

        `tokens` must extend the tokens of previous calls (build a new index when it does not).
        """
        length = len(tokens)
        self._extend(tokens, length - 1)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            end = self._last_end[n].get(tuple(tokens[length - n :]))
            if end is not None:
                return list(tokens[end : min(end + k, length)])
        return []


class PromptLookupDrafter(Drafter):
    """Model-free n-gram drafter (prompt lookup decoding)."""

    kind = "prompt_lookup"

    def __init__(self, min_n: int = 1, max_n: int = 3, max_sequences: int = 1024) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"prompt lookup needs 1 <= min-n <= max-n, got min-n {min_n} and max-n {max_n}")
        self.min_n = min_n
        self.max_n = max_n
        self._max_sequences = max_sequences
        self._indexes: dict[str, NgramIndex] = {}

    @property
    def max_sequences(self) -> int:
        """Bounds memory should requests never be released (an index holds a dict entry per n-gram length and position)."""
        return self._max_sequences

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_flag(parser, "--min-n", type=int, default=1, help="shortest suffix n-gram that may match")
        add_flag(parser, "--max-n", type=int, default=3, help="longest suffix n-gram tried (longest first)")
        add_flag(
            parser, "--max-sequences", type=int, default=1024,
            help="most requests whose tokens are held; past it the least recently used is dropped (and resyncs)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "PromptLookupDrafter":
        return cls(min_n=args.min_n, max_n=args.max_n, max_sequences=args.max_sequences)

    def propose(self, batch: Sequence[SyncedRequest]) -> Proposal:
        drafts = []
        for request in batch:
            index = self._indexes.get(request.request_id)
            if index is None or request.reset:
                index = self._indexes[request.request_id] = NgramIndex(self.min_n, self.max_n)
            # k=0 leaves the index behind; the next lookup catches up on the appended tokens.
            drafts.append(index.propose(request.context, request.k) if request.k > 0 else [])
        return Proposal(drafts)

    def release(self, request_id: str) -> None:
        self._indexes.pop(request_id, None)
