"""The draft-model backend: its proposals are the draft model's own greedy continuation (transformers
generate) of the committed context, across ragged batches, rejections and k=0 steps."""

from __future__ import annotations

import random

import pytest

from drafter_svc.draft_model import DraftModelDrafter
from drafter_svc.engine import DrafterEngine
from tests.support import first_mismatch, reference_greedy


@pytest.fixture(scope="module")
def engine(tiny_draft):
    return DrafterEngine(DraftModelDrafter(str(tiny_draft), max_sequences=8))


class Router:
    """Holds committed tokens per request and sends only what the drafter has not seen yet."""

    def __init__(self, engine: DrafterEngine) -> None:
        self.engine = engine
        self.committed: dict[str, list[int]] = {}
        self.sent: dict[str, int] = {}

    def propose(self, ks: dict[str, int]):
        ids = list(ks)
        appended = [self.committed[r][self.sent.get(r, 0) :] for r in ids]
        out = self.engine.propose(ids, [len(self.committed[r]) for r in ids], appended, [ks[r] for r in ids])
        assert out.in_sync == [True] * len(ids)
        for r in ids:
            self.sent[r] = len(self.committed[r])
        return dict(zip(ids, out.drafts)), out.proposal


def assert_greedy(model_path, context: list[int], got: list[int], k: int) -> None:
    want, gaps = reference_greedy(model_path, context, k)
    problem = first_mismatch(got, want, gaps)
    assert problem is None, f"context of {len(context)} tokens: {problem}"


def test_proposals_follow_rejections_and_k0_steps(engine, tiny_draft):
    rng = random.Random(1)
    router = Router(engine)
    router.committed = {"short": [5, 17, 300], "mid": [rng.randrange(49152) for _ in range(40)], "long": [rng.randrange(49152) for _ in range(150)]}
    ks = {"short": 5, "mid": 1, "long": 3}
    drafts, work = router.propose(ks)
    for r, k in ks.items():
        assert_greedy(tiny_draft, router.committed[r], drafts[r], k)
    # one forward per draft position; position j only runs the requests with k >= j
    assert work.num_forwards == 5
    assert work.new_tokens == (3 + 40 + 150) + 2 + 2 + 1 + 1

    # The router commits: short accepts 2 drafts then gets another token (rejection), mid accepts its
    # draft plus a bonus token, long rejects at once.
    d = drafts
    router.committed["short"] += [*d["short"][:2], (d["short"][2] + 1) % 49152]
    router.committed["mid"] += [d["mid"][0], 77]
    router.committed["long"] += [(d["long"][0] + 1) % 49152]
    ks = {"short": 4, "mid": 2, "long": 6}
    drafts, work = router.propose(ks)
    for r, k in ks.items():
        assert_greedy(tiny_draft, router.committed[r], drafts[r], k)
    # Only what the KV lacked was fed at position 1: short's rejected token (its 2 accepted drafts were
    # already cached), mid's bonus (its draft was never fed), long's new token. No prefix recomputed.
    assert work.new_tokens == (1 + 2 + 1) + (4 - 1) + (2 - 1) + (6 - 1)

    # k=0 steps: tokens are committed without drafting; no forward runs.
    for _ in range(3):
        for r in router.committed:
            router.committed[r].append(rng.randrange(49152))
        _, work = router.propose({r: 0 for r in router.committed})
        assert work.num_forwards == 0
    ks = {"short": 2, "mid": 3, "long": 1}
    drafts, _ = router.propose(ks)
    for r, k in ks.items():
        assert_greedy(tiny_draft, router.committed[r], drafts[r], k)
    engine.release(list(router.committed))
    assert engine.live == 0 and engine.drafter.runner.live == 0


def test_verifying_fewer_drafts_than_proposed(engine, tiny_draft):
    """Propose-then-truncate: the router verified only 2 of 5 drafts and the target's own token equals
    the 3rd draft, so every committed token is already in the drafter's KV."""
    router = Router(engine)
    router.committed = {"t": [11, 22, 33, 44]}
    drafts, _ = router.propose({"t": 5})
    router.committed["t"] += drafts["t"][:3]
    drafts, work = router.propose({"t": 4})
    assert_greedy(tiny_draft, router.committed["t"], drafts["t"], 4)
    assert work.new_tokens == 1 + 3  # the last committed token is fed again for its logits
    engine.release(["t"])


def test_full_resend_resets_and_context_limit_is_respected(tiny_draft):
    engine = DrafterEngine(DraftModelDrafter(str(tiny_draft), max_sequences=4, max_context=100))
    assert engine.drafter.model_info().max_context == 100
    router = Router(engine)
    # a long-running request near the limit next to a new long prompt: one flat forward takes both (no
    # padded view to overflow), then one forward per further draft position
    router.committed = {"old": list(range(1000, 1090))}
    router.propose({"old": 1})
    router.committed["old"] += [5]
    router.committed["new"] = list(range(2000, 2090))
    drafts, work = router.propose({"old": 8, "new": 2})
    assert work.num_forwards == 1 + 7
    for r, k in {"old": 8, "new": 2}.items():
        assert_greedy(tiny_draft, router.committed[r], drafts[r], k)
    # 97 committed tokens: room for 100 - 97 + 1 = 4 drafts; past the limit, none
    router.committed["old"] += [6, 7, 8, 9, 10, 11]
    drafts, _ = router.propose({"old": 8})
    assert len(drafts["old"]) == 4
    router.committed["old"] += [1] * 4
    drafts, work = router.propose({"old": 8})
    assert drafts["old"] == [] and work.num_forwards == 0
    # a full resend of a different context resets the request
    out = engine.propose(["old"], [3], [[7, 8, 9]], [3])
    assert out.in_sync == [True]
    assert_greedy(tiny_draft, [7, 8, 9], out.drafts[0], 3)


def test_embedded_draft_matches_its_generate(embedded):
    """The shipped 4-layer draft (loads in well under a second once converted)."""
    engine = DrafterEngine(DraftModelDrafter("embedded", max_sequences=2))
    prompt = [1, 504, 3287, 282, 253, 4452, 28, 665, 314]
    out = engine.propose(["e"], [len(prompt)], [prompt], [4])
    assert_greedy(embedded.draft, prompt, out.drafts[0], 4)
