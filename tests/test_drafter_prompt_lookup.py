"""Prompt lookup: which match it picks, what it proposes, and that a step stays cheap on long contexts."""

from __future__ import annotations

import time

import pytest

from drafter_svc.base import SyncedRequest
from drafter_svc.prompt_lookup import NgramIndex, PromptLookupDrafter


def lookup(tokens: list[int], k: int, min_n: int = 1, max_n: int = 3) -> list[int]:
    return NgramIndex(min_n, max_n).propose(tokens, k)


def test_proposes_what_followed_the_match():
    assert lookup([7, 8, 9, 10, 11, 5, 8, 9], k=3) == [10, 11, 5]


def test_no_match_proposes_nothing():
    assert lookup([1, 2, 3, 4], k=3) == []
    assert lookup([1], k=3) == []


def test_longest_n_is_tried_first():
    # suffix (2, 3): the 2-gram occurs once (-> 50); the 1-gram 3 occurs later (-> 60)
    assert lookup([2, 3, 50, 9, 3, 60, 2, 3], k=1) == [50]
    # with max_n 1 only the last token is matched, and its latest occurrence wins
    assert lookup([2, 3, 50, 9, 3, 60, 2, 3], k=1, max_n=1) == [60]


def test_most_recent_occurrence_is_preferred():
    assert lookup([1, 2, 10, 1, 2, 20, 1, 2], k=1) == [20]


def test_min_n_rejects_short_matches():
    assert lookup([5, 9, 8, 7, 9], k=2) == [8, 7]
    assert lookup([5, 9, 8, 7, 9], k=2, min_n=2) == []


def test_k_larger_than_the_rest_of_the_context():
    assert lookup([5, 6, 7, 5, 6], k=10) == [7, 5, 6]


def test_overlapping_ngrams():
    # a a a a: the suffix (a, a, a) last occurred ending one token earlier, so one token follows it
    assert lookup([4, 4, 4, 4], k=5) == [4]
    assert lookup([4, 4], k=5) == [4]
    # a b a b a: suffix (a, b, a) overlaps its earlier occurrence
    assert lookup([1, 2, 1, 2, 1], k=5) == [2, 1]


def test_flags_are_checked():
    with pytest.raises(ValueError, match="min-n"):
        PromptLookupDrafter(min_n=3, max_n=2)
    with pytest.raises(ValueError, match="min-n"):
        PromptLookupDrafter(min_n=0, max_n=2)


def test_incremental_index_matches_a_fresh_one():
    """The per-request index, fed only appended tokens across calls (k=0 calls included), proposes
    exactly what a lookup over the whole context does."""
    import random

    rng = random.Random(0)
    drafter = PromptLookupDrafter(min_n=1, max_n=3)
    context: list[int] = [rng.randrange(6) for _ in range(5)]
    for step in range(300):
        appended = [rng.randrange(6) for _ in range(rng.randrange(1, 4))]
        reset = step == 0
        if not reset:
            context.extend(appended)
        k = rng.choice([0, 1, 4])
        request = SyncedRequest("r", context, len(context) if reset else len(appended), reset, k)
        got = drafter.propose([request]).drafts[0]
        assert got == (lookup(context, k) if k else []), step


def test_a_step_does_not_scan_the_context():
    """2,000 one-token steps over a 20,000-token context: an index rebuilt or scanned every step would
    take tens of seconds here; the incremental one takes milliseconds."""
    drafter = PromptLookupDrafter()
    context = [i % 5000 for i in range(20_000)]
    drafter.propose([SyncedRequest("long", context, len(context), True, 4)])
    started = time.perf_counter()
    for i in range(2000):
        context.append(i % 7)
        drafter.propose([SyncedRequest("long", context, 1, False, 4)])
    assert time.perf_counter() - started < 1.0
