"""Token trees as every service reads them: per draft token, the index of its parent.

A proposal of k draft tokens is a tree when each token names its parent among the tokens before it
(index 0..i-1), or ``ROOT`` (-1) for a child of the request's last committed token. Parents come
before their children, so any first n tokens of a tree are a tree again (cutting a proposal to a
budget keeps it valid), and a chain is the tree whose parents are -1, 0, ..., k-2, so one code path
serves both. Torch-free: the router, the drafters and the verifier share it.
"""

from __future__ import annotations

from typing import Callable, Sequence

ROOT = -1


def chain_parents(count: int) -> list[int]:
    """The parents of a chain of `count` tokens: each token follows the one before it."""
    return list(range(-1, count - 1))


def is_chain(parents: Sequence[int]) -> bool:
    """Whether `parents` spell a chain (also true for no tokens)."""
    return all(parent == i - 1 for i, parent in enumerate(parents))


def parents_problem(parents: Sequence[int], count: int) -> str | None:
    """None when `parents` describe a tree of `count` tokens; else what is wrong, for an error message."""
    if len(parents) != count:
        return f"{len(parents)} parents for {count} draft tokens"
    for i, parent in enumerate(parents):
        if not ROOT <= parent < i:
            return f"draft token {i} has parent {parent}; a parent must be -1 (the last committed token) or an earlier token's index"
    return None


def depths(parents: Sequence[int]) -> list[int]:
    """Depth of every token: 1 for a child of the root, its parent's depth + 1 otherwise."""
    out: list[int] = []
    for parent in parents:
        out.append(1 if parent == ROOT else out[parent] + 1)
    return out


def longest_path(tokens: Sequence[int], parents: Sequence[int], want: Callable[[int, int], int | None]) -> list[int]:
    """The longest root-to-node path whose every token equals ``want(parent, parent_depth)`` (the
    parent -1 is the root, at depth 0; None wants nothing), and among equally long ones the one ending
    at the lowest index. Returns the path's token indices, root first.

    The verifier accepts a tree this way (want: the target's argmax after the parent's path), and the
    router finds the accepted nodes from the emitted tokens the same way (want: the token emitted at
    that depth). Siblings may repeat a token: each one's subtree is searched.
    """
    depth = depths(parents)
    matched = [False] * len(parents)
    best = ROOT
    for i, parent in enumerate(parents):
        above = parent == ROOT or matched[parent]
        if above and tokens[i] == want(parent, depth[parent] if parent != ROOT else 0):
            matched[i] = True
            if best == ROOT or depth[i] > depth[best]:
                best = i
    path: list[int] = []
    while best != ROOT:
        path.append(best)
        best = parents[best]
    return path[::-1]
