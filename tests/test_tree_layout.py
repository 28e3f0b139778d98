"""Tree attention: the mask and position ids of a step against references written out by hand, a tree
forward against plain forwards of every root-to-node path, the KV compaction of an accepted path, and
the tree helpers every service shares."""

from __future__ import annotations

import pytest
import torch

from smartspec.runtime.loading import load_causal_lm
from smartspec.runtime.runner import BatchedRunner, StepRow, group_layout
from smartspec.sampling import GREEDY
from smartspec.tree import chain_parents, depths, is_chain, longest_path, parents_problem
from tests.support import reference_model
from verifier_svc.acceptance import Proposal, decide


def test_mask_and_positions_match_a_hand_built_reference():
    # Row 0: 3 cached tokens, then a tree: t0 (root child), t1 and t2 children of t0, t3 child of t1,
    # t4 another root child. Row 1: an empty history and a chain of 5; its key row is padded to 8.
    rows = [StepRow("a", [11, 12, 13, 14, 15], parents=[-1, 0, 0, 1, -1]), StepRow("b", [21, 22, 23, 24, 25])]
    positions, mask = group_layout([3, 0], rows, kv_len=8)
    assert positions.tolist() == [[3, 4, 4, 5, 3], [0, 1, 2, 3, 4]]
    want = torch.tensor(
        [
            [  # columns 0..2: history; 3..7: t0..t4
                [1, 1, 1, 1, 0, 0, 0, 0],  # t0: history, itself
                [1, 1, 1, 1, 1, 0, 0, 0],  # t1: history, t0, itself
                [1, 1, 1, 1, 0, 1, 0, 0],  # t2: history, t0, itself (not its sibling t1)
                [1, 1, 1, 1, 1, 0, 1, 0],  # t3: history, t0, t1, itself
                [1, 1, 1, 0, 0, 0, 0, 1],  # t4: history, itself (no other branch)
            ],
            [  # no history; columns 0..4: the chain; 5..7: key padding, seen by nobody
                [1, 0, 0, 0, 0, 0, 0, 0],
                [1, 1, 0, 0, 0, 0, 0, 0],
                [1, 1, 1, 0, 0, 0, 0, 0],
                [1, 1, 1, 1, 0, 0, 0, 0],
                [1, 1, 1, 1, 1, 0, 0, 0],
            ],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, want)


def test_a_chain_spelled_as_a_tree_lays_out_like_a_chain():
    chain = group_layout([4], [StepRow("a", [1, 2, 3, 4])], kv_len=8)
    tree = group_layout([4], [StepRow("a", [1, 2, 3, 4], parents=chain_parents(4))], kv_len=8)
    for plain, spelled in zip(chain, tree):
        assert torch.equal(plain, spelled)
    # ... and a chain sees exactly the columns up to its own position (the causal mask)
    positions, mask = chain
    assert torch.equal(mask[0], torch.arange(8)[None, :] <= positions[0][:, None])


def test_rows_whose_parents_are_not_a_tree_are_refused():
    for parents in ([0, -1], [-1, 1], [-1, -2], [-1]):
        with pytest.raises(ValueError, match="do not describe a tree"):
            group_layout([0], [StepRow("a", [1, 2], parents=parents)], kv_len=4)


@pytest.fixture(scope="module")
def model(tiny_target):
    return load_causal_lm(tiny_target)


def plain_logits(model_path, tokens: list[int]) -> torch.Tensor:
    """transformers' own last-position logits for `tokens`, one plain forward with no cache: [vocab]."""
    with torch.inference_mode():
        return reference_model(model_path)(torch.tensor([tokens])).logits[0, -1].float()


def test_a_tree_forward_equals_plain_forwards_of_every_path_and_keep_compacts_the_kv(model, tiny_target):
    runner = BatchedRunner(model, max_sequences=4, max_context=256)
    context = [5, 900, 31, 4077, 12, 64, 2001]
    other = [7, 8, 9, 10]
    runner.admit("t")
    runner.admit("c")
    runner.step([StepRow("t", context, all_logits=False), StepRow("c", other, all_logits=False)])
    # pending token 77, then nodes 0..5: two root children, a deeper branch under node 0
    tokens = [77, 300, 301, 302, 303, 304, 305]
    parents = [-1, 0, 0, 1, 3, 2, 1]  # row-local: 0 is the pending token
    step = runner.step([StepRow("t", tokens, parents=parents), StepRow("c", [11, 12, 13])])
    tree_logits = step.logits[0]  # [7, vocab]
    for j in range(len(tokens)):
        path, node = [], j
        while node != -1:
            path.append(tokens[node])
            node = parents[node]
        torch.testing.assert_close(tree_logits[j], plain_logits(tiny_target, context + path[::-1]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step.logits[1][-1], plain_logits(tiny_target, other + [11, 12, 13]), atol=1e-4, rtol=1e-4)

    # accept pending -> node 1 (row 2) -> node 4 (row 5): their KV moves to the next positions in order
    runner.keep("t", len(context), [0, 2, 5])
    runner.keep("c", len(other), [0, 1, 2])
    assert runner.length("t") == len(context) + 3 and runner.length("c") == len(other) + 3
    after = runner.step([StepRow("t", [999], all_logits=False), StepRow("c", [14], all_logits=False)])
    torch.testing.assert_close(after.logits[0][0], plain_logits(tiny_target, context + [77, 301, 304, 999]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after.logits[1][0], plain_logits(tiny_target, other + [11, 12, 13, 14]), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="cannot keep"):
        runner.keep("t", len(context), [1, 0])


def test_tree_helpers():
    assert chain_parents(4) == [-1, 0, 1, 2] and is_chain([-1, 0, 1]) and is_chain([])
    assert not is_chain([-1, -1]) and not is_chain([-1, 0, 0])
    assert depths([-1, 0, 0, 1, -1]) == [1, 2, 2, 3, 1]
    assert parents_problem([-1, 0, 1], 3) is None
    assert "3 parents for 2" in parents_problem([-1, 0, 1], 2)
    assert "draft token 1 has parent 1" in parents_problem([-1, 1], 2)
    assert "draft token 0 has parent -2" in parents_problem([-2], 1)


def greedy_accept(draft: list[int], parents: list[int], choices: list[int]) -> list[int]:
    """The path acceptance.decide accepts for one greedy proposal whose target argmaxes are `choices`
    (checking that the token after it is the argmax there)."""
    logits = torch.nn.functional.one_hot(torch.tensor(choices), 16).float()  # [k + 1, vocab]
    decision = decide(logits, [Proposal(0, draft, parents, [None] * len(draft), GREEDY, 0)])[0]
    assert decision.token == choices[decision.path[-1] + 1 if decision.path else 0]
    return decision.path


def test_greedy_accept_takes_the_longest_agreeing_path():
    # choices[0]: target after the context; choices[i + 1]: after the path to draft i
    #   root -> 0 (tok 5) -> 2 (tok 6) -> 3 (tok 8)         target: 5, then 6, then 7: path 0, 2 (3 is wrong)
    #        -> 1 (tok 9)
    draft, parents = [5, 9, 6, 8], [-1, -1, 0, 2]
    choices = [5, 6, 0, 7, 0]  # after node 1 (choices[2]) and node 3 (choices[4]): never consulted
    assert greedy_accept(draft, parents, choices) == [0, 2]
    # siblings repeating a token: the one with the longer agreeing continuation wins
    draft, parents = [5, 5, 1, 6], [-1, -1, 0, 1]
    choices = [5, 6, 6, 0, 0]
    assert greedy_accept(draft, parents, choices) == [1, 3]
    # a chain: the agreeing prefix
    assert greedy_accept([4, 5, 6], chain_parents(3), [4, 5, 9, 0]) == [0, 1]
    assert greedy_accept([], [], [3]) == []
    # the router's use: which nodes the emitted tokens [5, 6] walked through
    assert longest_path([5, 9, 6, 8], [-1, -1, 0, 2], lambda parent, depth: [5, 6][depth] if depth < 2 else None) == [0, 2]
