"""The incremental-sync protocol (drafter_svc.engine), the same for every backend."""

from __future__ import annotations

from typing import Sequence

import pytest

from drafter_svc.base import Drafter, Proposal, SyncedRequest
from drafter_svc.engine import DrafterEngine
from smartspec.errors import RequestError


class Recorder(Drafter):
    """Proposes k copies of the last token and remembers what it was given."""

    kind = "recorder"

    def __init__(self, max_sequences: int | None = None, vocab_size: int | None = None) -> None:
        self.seen: list[SyncedRequest] = []
        self.released: list[str] = []
        self._cap = max_sequences
        self._vocab = vocab_size
        self.fail = False

    @property
    def max_sequences(self) -> int | None:
        return self._cap

    @property
    def vocab_size(self) -> int | None:
        return self._vocab

    def propose(self, batch: Sequence[SyncedRequest]) -> Proposal:
        if self.fail:
            raise RuntimeError("backend broke")
        self.seen.extend(SyncedRequest(r.request_id, list(r.context), r.num_appended, r.reset, r.k) for r in batch)
        return Proposal([[r.context[-1]] * r.k for r in batch])

    def release(self, request_id: str) -> None:
        self.released.append(request_id)


def propose(engine: DrafterEngine, *items: tuple[str, int, list[int], int]):
    """items: (request id, committed length, appended tokens, k)."""
    ids, committed, appended, ks = zip(*items)
    return engine.propose(list(ids), list(committed), list(appended), list(ks))


def test_new_request_then_deltas():
    backend = Recorder()
    engine = DrafterEngine(backend)
    out = propose(engine, ("a", 3, [1, 2, 3], 2))
    assert out.in_sync == [True] and out.drafts == [[3, 3]]
    assert backend.seen[-1] == SyncedRequest("a", [1, 2, 3], 3, True, 2)
    out = propose(engine, ("a", 5, [4, 5], 1))
    assert out.in_sync == [True] and out.drafts == [[5]]
    assert backend.seen[-1] == SyncedRequest("a", [1, 2, 3, 4, 5], 2, False, 1)
    assert backend.seen[-1].appended == [4, 5]
    # nothing new is fine too (same committed length again)
    assert propose(engine, ("a", 5, [], 1)).in_sync == [True]
    assert engine.live == 1


def test_wrong_committed_length_asks_for_a_resync_and_changes_nothing():
    backend = Recorder()
    engine = DrafterEngine(backend)
    propose(engine, ("a", 3, [1, 2, 3], 1))
    calls = len(backend.seen)
    out = propose(engine, ("a", 6, [4, 5], 2), ("ghost", 4, [1], 2))  # a: 3 + 2 != 6; ghost: unknown
    assert out.in_sync == [False, False] and out.drafts == [[], []]
    assert len(backend.seen) == calls  # the backend never saw them
    # a's state is untouched: the right delta still works
    out = propose(engine, ("a", 4, [9], 1))
    assert out.in_sync == [True] and backend.seen[-1].context == [1, 2, 3, 9]


def test_full_resend_recovers_and_resets():
    backend = Recorder()
    engine = DrafterEngine(backend)
    propose(engine, ("a", 3, [1, 2, 3], 1))
    assert propose(engine, ("a", 9, [4], 1)).in_sync == [False]
    out = propose(engine, ("a", 4, [1, 2, 7, 8], 1))
    assert out.in_sync == [True] and out.drafts == [[8]]
    assert backend.seen[-1] == SyncedRequest("a", [1, 2, 7, 8], 4, True, 1)


def test_mixed_batch_keeps_request_order():
    engine = DrafterEngine(Recorder())
    propose(engine, ("a", 1, [10], 0))
    out = propose(engine, ("x", 5, [1], 3), ("a", 2, [11], 2), ("b", 2, [5, 6], 1))
    assert out.in_sync == [False, True, True]
    assert out.drafts == [[], [11, 11], [6]]


def test_release_frees_state():
    backend = Recorder()
    engine = DrafterEngine(backend)
    propose(engine, ("a", 1, [1], 1), ("b", 1, [2], 1))
    assert engine.live == 2
    assert engine.release(["a", "b", "never"]) == 2
    assert engine.live == 0 and sorted(backend.released) == ["a", "b"]
    assert propose(engine, ("a", 2, [3], 1)).in_sync == [False]  # released: must start again


def test_least_recently_used_request_is_evicted_past_capacity():
    backend = Recorder(max_sequences=2)
    engine = DrafterEngine(backend)
    propose(engine, ("a", 1, [1], 1))
    propose(engine, ("b", 1, [2], 1))
    propose(engine, ("a", 2, [1], 1))  # b is now the least recently used
    propose(engine, ("c", 1, [3], 1))
    assert engine.live == 2 and backend.released == ["b"]
    assert propose(engine, ("b", 2, [2], 1)).in_sync == [False]
    with pytest.raises(RequestError) as err:
        propose(engine, ("a", 3, [1], 1), ("c", 2, [3], 1), ("d", 1, [4], 1))
    assert err.value.status == "RESOURCE_EXHAUSTED"


@pytest.mark.parametrize(
    "items, fragment",
    [
        ((("a", 2, [1], 1), ("a", 2, [1], 1)), "more than once"),
        ((("", 1, [1], 1),), "must not be empty"),
        ((("a", 0, [], 1),), "at least 1"),
        ((("a", 1, [1, 2], 1),), "appended tokens but committed length 1"),
        ((("a", 1, [1], 65),), "at most 64"),
        ((("a", 2, [1, 100], 1),), "vocabulary (size 100)"),
    ],
)
def test_bad_batches_are_rejected_whole(items, fragment):
    backend = Recorder(vocab_size=100)
    engine = DrafterEngine(backend)
    propose(engine, ("ok", 2, [1, 2], 1))
    with pytest.raises(RequestError) as err:
        propose(engine, ("ok", 3, [3], 1), *items)
    assert err.value.status == "INVALID_ARGUMENT" and fragment in err.value.message
    assert backend.seen[-1].context == [1, 2]
    assert propose(engine, ("ok", 3, [3], 1)).in_sync == [True]  # "ok" did not take the rejected delta


def test_mismatched_array_lengths_are_rejected():
    with pytest.raises(RequestError, match="one entry per request"):
        DrafterEngine(Recorder()).propose(["a", "b"], [1], [[1], [2]], [1, 1])


def test_a_failing_backend_makes_its_requests_resync():
    backend = Recorder()
    engine = DrafterEngine(backend)
    propose(engine, ("a", 1, [1], 1), ("b", 1, [2], 1))
    backend.fail = True
    with pytest.raises(RuntimeError):
        propose(engine, ("a", 2, [1], 1))
    backend.fail = False
    assert backend.released == ["a"]
    assert propose(engine, ("a", 3, [1], 1), ("b", 2, [2], 1)).in_sync == [False, True]


def test_a_backend_proposing_too_much_is_an_internal_error():
    class Greedy(Recorder):
        def propose(self, batch):
            return Proposal([[1] * (r.k + 1) for r in batch])

    with pytest.raises(RequestError) as err:
        propose(DrafterEngine(Greedy()), ("a", 1, [1], 2))
    assert err.value.status == "INTERNAL" and "'recorder' proposed 3 tokens" in err.value.message
