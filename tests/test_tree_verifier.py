"""Tree verification is lossless: whatever tree is proposed, batched with chains of other requests,
the verifier emits exactly the target's greedy output (transformers generate), and accepts exactly the
longest path the reference agrees with. Trees are built from the reference, so which nodes are right is
known by construction, for shapes from a chain to a star, pathological ones included."""

from __future__ import annotations

import random

import pytest

from smartspec.errors import RequestError
from smartspec.sampling import SamplingParams
from smartspec.tree import chain_parents, depths
from tests.support import first_mismatch, reference_greedy
from tests.test_verifier_lossless import make_engine, random_prompts

NEW_TOKENS = 24
VOCAB = 49152
SHAPES = ("chain", "star", "single", "random", "wrong-top", "right-last", "duplicates", "empty", "plain-chain")


def wrong(token: int, rng: random.Random) -> int:
    return (token + 1 + rng.randrange(1000)) % VOCAB


def build(shape: str, tail: list[int], rng: random.Random) -> tuple[list[int], list[int] | None]:
    """A proposal after the committed output: tokens and parents (None: sent as a plain chain).
    tail is the reference's continuation; the node at depth d is right when it equals tail[d - 1]
    and its parent is right."""
    at = lambda d: tail[d - 1] if d - 1 < len(tail) else rng.randrange(VOCAB)  # noqa: E731  past the reference: any token
    if shape == "empty":
        return [], None
    if shape in ("chain", "plain-chain"):
        k = rng.randrange(1, 7)
        cut = rng.randrange(k + 1)  # the first `cut` tokens are right
        tokens = [at(d) if d <= cut else wrong(at(d), rng) for d in range(1, k + 1)]
        return tokens, (None if shape == "plain-chain" else chain_parents(k))
    if shape == "star":  # every node a child of the root, at most one of them right
        k = rng.randrange(1, 9)
        tokens = [wrong(at(1), rng) for _ in range(k)]
        if rng.random() < 0.7:
            tokens[rng.randrange(k)] = at(1)
        return tokens, [-1] * k
    if shape == "single":  # budget 1
        return [at(1) if rng.random() < 0.5 else wrong(at(1), rng)], [-1]
    if shape == "wrong-top":  # the root's children are wrong, their children carry depth-2 right tokens
        parents = [-1, -1, 0, 0, 1]
        return [wrong(at(1), rng), wrong(at(1), rng), at(2), at(2), at(2)], parents
    if shape == "right-last":  # a long wrong branch first, the right path at the highest indices
        parents = [-1, 0, 1, 2, -1, 4, 5]
        return [wrong(at(1), rng), at(2), at(3), at(4), at(1), at(2), at(3)], parents
    if shape == "duplicates":  # two right siblings; only the second one's child is right
        parents = [-1, -1, 0, 1, 3]
        return [at(1), at(1), wrong(at(2), rng), at(2), at(3)], parents
    # random: random parents; a node under a right parent is right with probability 0.6
    k = rng.randrange(1, 13)
    parents = [rng.randrange(-1, i) for i in range(k)]
    right: list[bool] = []
    tokens = []
    for i, (parent, depth) in enumerate(zip(parents, depths(parents))):
        ok = (parent == -1 or right[parent]) and rng.random() < 0.6
        right.append(ok)
        tokens.append(at(depth) if ok else wrong(at(depth), rng))
    return tokens, parents


def expected_accept(tokens: list[int], parents: list[int] | None, tail: list[int]) -> tuple[int, bool]:
    """The longest path whose every token matches the reference (computed without the verifier's
    code), and whether the reference was long enough to be sure of it."""
    parents = parents if parents is not None else chain_parents(len(tokens))
    best, right = 0, []
    for i, (parent, depth) in enumerate(zip(parents, depths(parents))):
        ok = (parent == -1 or right[parent]) and depth <= len(tail) and tokens[i] == tail[depth - 1]
        right.append(ok)
        best = max(best, depth if ok else 0)
    return best, best < len(tail)


@pytest.fixture(scope="module")
def engine(tiny_target):
    return make_engine(tiny_target, max_sequences=8)


def test_trees_of_every_shape_batched_with_chains_equal_generate(tiny_target, engine):
    prompts = random_prompts([1, 5, 37, 120, 9, 60], seed=11)
    ids = [f"t{i}" for i in range(len(prompts))]
    refs = {i: reference_greedy(tiny_target, p, NEW_TOKENS) for i, p in zip(ids, prompts)}
    first, _ = engine.prefill(list(zip(ids, prompts)))
    outputs = {i: [t] for i, t in zip(ids, first)}
    rng = random.Random(3)
    seen: dict[str, int] = {}
    accepted_total = 0
    while active := [i for i in ids if len(outputs[i]) < len(refs[i][0])]:
        proposals = []
        for i in active:
            shape = rng.choice(SHAPES)
            seen[shape] = seen.get(shape, 0) + 1
            proposals.append((shape, *build(shape, refs[i][0][len(outputs[i]) :], rng)))
        outcome = engine.verify(active, [tokens for _, tokens, _ in proposals], parents=[parents for _, _, parents in proposals])
        for i, (shape, tokens, parents), accepted, emitted in zip(active, proposals, outcome.accepted, outcome.emitted):
            want, sure = expected_accept(tokens, parents, refs[i][0][len(outputs[i]) :])
            assert accepted == want or (not sure and accepted >= want), f"{i} {shape} {tokens} {parents}: accepted {accepted}, expected {want}"
            assert len(emitted) == accepted + 1
            accepted_total += accepted
            outputs[i].extend(emitted)
    for i in ids:
        ref, gaps = refs[i]
        problem = first_mismatch(outputs[i][: len(ref)], ref, gaps)
        assert problem is None, f"{i}: {problem}"
    assert set(seen) == set(SHAPES), f"shapes never drawn: {set(SHAPES) - set(seen)}"
    assert accepted_total > len(ids) * 4, "too few accepted drafts for the test to mean much"
    assert engine.release(ids) == len(ids)


def test_a_whole_right_tree_of_several_branches_is_accepted_to_its_deepest_path(tiny_target, engine):
    prompt = random_prompts([12], seed=5)[0]
    ref, gaps = reference_greedy(tiny_target, prompt, 12)
    first, _ = engine.prefill([("deep", prompt)])
    assert first == ref[:1]
    # the right path is 5 deep; a wrong branch hangs off every right node
    tokens, parents = [], []
    for d in range(5):
        tokens += [ref[1 + d], (ref[1 + d] + 3) % VOCAB]
        parents += [2 * (d - 1) if d else -1] * 2
    outcome = engine.verify(["deep"], [tokens], parents=[parents])
    assert outcome.accepted == [5]
    assert outcome.emitted[0] == ref[1:7]
    assert outcome.committed_lengths == [len(prompt) + 7]
    # the KV now holds the accepted path in sequence order: plain decoding continues exactly
    after = engine.verify(["deep"], [ref[7:9]])
    assert after.accepted == [2] and after.emitted[0] == ref[7:10]
    engine.release(["deep"])


def test_bad_trees_and_sampling_trees_are_refused(engine):
    engine.prefill([("g", [5, 6, 7]), ("s", [5, 6, 7], SamplingParams(temperature=0.8, seed=1))])
    with pytest.raises(RequestError) as err:
        engine.verify(["g"], [[1, 2]], parents=[[-1, 1]])
    assert err.value.status == "INVALID_ARGUMENT" and "do not describe a tree" in err.value.message
    with pytest.raises(RequestError) as err:
        engine.verify(["g", "s"], [[1, 2], [3, 4]], parents=[None, [-1, -1]])
    assert err.value.status == "INVALID_ARGUMENT" and "trees are verified greedily only" in err.value.message
    # a chain spelled out with parents is still a chain: fine for a sampling request
    outcome = engine.verify(["g", "s"], [[1, 2], [3, 4]], parents=[[-1, -1], [-1, 0]])
    assert len(outcome.accepted) == 2
    engine.release(["g", "s"])


def test_the_context_limit_counts_a_trees_depth_not_its_size(tiny_target):
    small = make_engine(tiny_target, max_sequences=2)
    small.runner.max_context = 40  # the KV pool's slack covers a tree's extra width
    small.prefill([("edge", list(range(100, 130)))])
    star = list(range(200, 212))
    with pytest.raises(RequestError) as err:
        small.verify(["edge"], [star])  # as a chain: 30 + 1 + 12 = 43 tokens
    assert err.value.status == "OUT_OF_RANGE"
    outcome = small.verify(["edge"], [star], parents=[[-1] * len(star)])  # as a star: depth 1
    assert outcome.committed_lengths[0] <= 32
