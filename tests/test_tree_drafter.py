"""The tree drafter: its proposal is the best-first tree of top-b children (parents before children,
cumulative probabilities not increasing, the node budget respected), equal to a brute-force reference
built from plain forwards of every path; batched requests share one forward per round; its state stays
in sync across commits; sampling requests get no tree."""

from __future__ import annotations

import math
import random

import pytest
import torch

from drafter_svc.engine import DrafterEngine
from drafter_svc.tree import TreeDrafter
from smartspec.sampling import GREEDY, SamplingParams
from smartspec.tree import depths, parents_problem

BRANCHING = 3


@pytest.fixture(scope="module")
def engine(tiny_draft):
    return DrafterEngine(TreeDrafter(str(tiny_draft), max_sequences=8, branching=BRANCHING))


@pytest.fixture(scope="module")
def model(tiny_draft):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_draft, dtype=torch.float32).eval()


def reference_tree(model, context: list[int], budget: int, branching: int) -> dict[tuple[int, ...], float]:
    """The `budget` most likely paths of the top-b tree, by plain forwards of each path: path ->
    cumulative probability. Level by level, only a level's `budget` most likely nodes are expanded: a
    node with `budget` more likely nodes beside it cannot be among the best, nor can its descendants."""
    nodes: dict[tuple[int, ...], float] = {}
    frontier = [((), 1.0)]
    for _ in range(budget):
        grown = []
        with torch.inference_mode():
            for path, cum in frontier:
                probs = torch.softmax(model(torch.tensor([context + list(path)])).logits[0, -1].float(), dim=-1)  # [vocab]
                values, ids = torch.topk(probs, branching)
                grown += [(path + (t,), cum * p) for p, t in zip(values.tolist(), ids.tolist())]
        nodes.update(grown)
        frontier = sorted(grown, key=lambda item: -item[1])[:budget]
    return dict(sorted(nodes.items(), key=lambda item: -item[1])[:budget])


def paths_of(tokens: list[int], parents: list[int]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    for token, parent in zip(tokens, parents):
        out.append((out[parent] if parent >= 0 else ()) + (token,))
    return out


def check_structure(tokens: list[int], parents: list[int], probs: list[float], budget: int) -> list[float]:
    """The structural promises; returns the cumulative probabilities in proposal order."""
    assert len(tokens) == len(parents) == len(probs) == budget
    assert parents_problem(parents, len(tokens)) is None  # parents precede children
    cum: list[float] = []
    for parent, prob in zip(parents, probs):
        cum.append((cum[parent] if parent >= 0 else 1.0) * prob)
    assert all(a >= b for a, b in zip(cum, cum[1:])), f"not best-first: {cum}"
    paths = paths_of(tokens, parents)
    assert len(set(paths)) == len(paths), "two nodes with the same path"
    children: dict[int, int] = {}
    for parent in parents:
        children[parent] = children.get(parent, 0) + 1
    assert max(children.values()) <= BRANCHING
    return cum


def assert_matches_reference(model, context, tokens, parents, probs, budget) -> None:
    cum = check_structure(tokens, parents, probs, budget)
    want = reference_tree(model, context, budget, BRANCHING)
    got = dict(zip(paths_of(tokens, parents), cum))
    kth = min(want.values())
    for path, p in got.items():
        if path in want:
            assert math.isclose(p, want[path], rel_tol=1e-4, abs_tol=1e-7), (path, p, want[path])
        else:  # only a near-tie with the reference's last node may differ
            assert abs(p - kth) < 1e-5, f"path {path} ({p}) is not among the reference's best {budget} (last {kth})"


class Router:
    """Holds committed tokens per request and sends only what the drafter has not seen yet."""

    def __init__(self, engine: DrafterEngine) -> None:
        self.engine = engine
        self.committed: dict[str, list[int]] = {}
        self.sent: dict[str, int] = {}

    def propose(self, ks: dict[str, int], sampling=()):
        ids = list(ks)
        appended = [self.committed[r][self.sent.get(r, 0) :] for r in ids]
        out = self.engine.propose(ids, [len(self.committed[r]) for r in ids], appended, [ks[r] for r in ids], sampling)
        assert out.in_sync == [True] * len(ids)
        for r in ids:
            self.sent[r] = len(self.committed[r])
        return {r: (d, p, q) for r, d, p, q in zip(ids, out.drafts, out.parents, out.token_probs)}, out.proposal


def test_batched_trees_equal_the_brute_force_best_first_trees(engine, model):
    rng = random.Random(4)
    router = Router(engine)
    router.committed = {"a": [5, 17, 300], "b": [rng.randrange(49152) for _ in range(40)], "c": [rng.randrange(49152) for _ in range(90)]}
    ks = {"a": 1, "b": 4, "c": 6}
    trees, work = router.propose(ks)
    for r, k in ks.items():
        assert_matches_reference(model, router.committed[r], *trees[r], k)
    rounds = work.num_forwards

    # each alone takes at most as many forwards as the batch did, and the batch no more than the slowest
    alone = []
    for r, k in ks.items():
        solo = Router(DrafterEngine(engine.drafter))
        solo.committed = {f"solo-{r}": list(router.committed[r])}
        tree, solo_work = solo.propose({f"solo-{r}": k})
        (tokens, parents, probs), (want_tokens, want_parents, want_probs) = tree[f"solo-{r}"], trees[r]
        assert (tokens, parents) == (want_tokens, want_parents)
        assert probs == pytest.approx(want_probs, rel=1e-4)
        alone.append(solo_work.num_forwards)
        engine.drafter.release(f"solo-{r}")
    assert rounds == max(alone), f"batched {rounds} forwards, alone {alone}: rounds are not shared"

    # commit part of each tree's best path plus another token; the next trees follow the new contexts
    for r in ks:
        tokens, parents, _ = trees[r]
        deepest = max(range(len(tokens)), key=lambda i: (depths(parents)[i], -i))
        path, node = [], deepest
        while node != -1:
            path.append(tokens[node])
            node = parents[node]
        router.committed[r] += path[::-1][: rng.randrange(len(path) + 1)] + [rng.randrange(49152)]
    ks = {"a": 5, "b": 2, "c": 0}
    trees, _ = router.propose(ks)
    assert trees["c"] == ([], [], [])
    for r in ("a", "b"):
        assert_matches_reference(model, router.committed[r], *trees[r], ks[r])
    router.committed["c"] += [11, 12]  # after a k=0 step its tokens are fed on the next call
    trees, _ = router.propose({"c": 3})
    assert_matches_reference(model, router.committed["c"], *trees["c"], 3)
    for r in ks:
        engine.release([r])


def test_branching_one_is_the_draft_models_greedy_chain_in_as_many_forwards(tiny_draft):
    from tests.support import reference_greedy

    chain = DrafterEngine(TreeDrafter(str(tiny_draft), max_sequences=2, branching=1))
    context = [7, 1200, 55, 3, 801]
    out = chain.propose(["x"], [len(context)], [context], [5])
    assert out.parents == [[-1, 0, 1, 2, 3]]
    want, _ = reference_greedy(tiny_draft, context, 5)
    assert out.drafts == [want]
    assert out.proposal.num_forwards == 5


def test_sampling_requests_get_no_tree_but_stay_in_sync(engine):
    router = Router(engine)
    router.committed = {"s": [4, 5, 6, 7], "g": [4, 5, 6, 7]}
    trees, _ = router.propose({"s": 4, "g": 4}, sampling=[SamplingParams(temperature=0.7, seed=3), GREEDY])
    assert trees["s"] == ([], [], []) and len(trees["g"][0]) == 4
    router.committed["s"] += [9]
    trees, _ = router.propose({"s": 2}, sampling=[GREEDY])
    assert len(trees["s"][0]) == 2
    engine.release(["s", "g"])


def test_near_the_context_limit_trees_get_no_deeper_than_the_room(tiny_draft):
    limited = DrafterEngine(TreeDrafter(str(tiny_draft), max_sequences=2, max_context=20, branching=2))
    context = list(range(300, 318))  # 18 tokens: nodes may reach depth 3 (position 20 is never fed)
    out = limited.propose(["edge"], [len(context)], [context], [8])
    assert len(out.drafts[0]) == 8 and max(depths(out.parents[0])) <= 3
