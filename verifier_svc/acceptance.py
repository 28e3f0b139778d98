"""Acceptance rules: which proposed tokens the target keeps."""

from __future__ import annotations

from smartspec.protocol import common_prefix_length


def greedy_accept(draft: list[int], target_argmax: list[int]) -> int:
    """Length of the longest prefix of `draft` equal to the target's argmax at each position.

    target_argmax[i] is the target's choice after the context plus draft[:i]; it has len(draft) + 1
    entries, and target_argmax[accepted] is the target's own token emitted after the accepted drafts.
    This makes greedy speculation exactly equal to plain greedy decoding.
    """
    return common_prefix_length(draft, target_argmax)
