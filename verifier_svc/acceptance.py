"""Acceptance rules: which proposed tokens the target keeps, and the token it adds after them."""

from __future__ import annotations

from typing import Sequence

import torch

from smartspec.runtime.sampler import sample_index
from smartspec.sampling import ACCEPT, EMIT, DraftDistribution, uniform
from smartspec.tree import longest_path


def greedy_accept(draft: Sequence[int], parents: Sequence[int], target_argmax: Sequence[int]) -> list[int]:
    """The accepted path of a draft tree (a chain is the tree with parents -1, 0, 1, ...): the longest
    root-to-node path whose every token equals the target's argmax at its parent (ties: the path that
    ends at the lowest index). Returns the path's draft indices, root first.

    target_argmax[0] is the target's choice after the context, target_argmax[i + 1] its choice after the
    context plus the path to draft[i]; the token emitted after the path is target_argmax[path[-1] + 1]
    (target_argmax[0] for an empty path). This makes greedy speculation exactly equal to plain greedy
    decoding, whatever the tree.
    """
    return longest_path(draft, parents, lambda parent, depth: target_argmax[parent + 1])


def speculative_accept(
    draft: Sequence[int],
    draft_dists: Sequence[DraftDistribution | None],
    target_probs: torch.Tensor,
    seed: int,
    first_index: int,
) -> tuple[int, int]:
    """Speculative rejection sampling (Leviathan et al. 2023, "Fast Inference from Transformers via
    Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with
    Speculative Sampling"). Returns (accepted count n, the target's token after them).

    Draft token x_i, sampled from q_i, is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the
    first rejection the target's token is sampled from norm(max(0, p_i - q_i)) and the rest discarded;
    if every draft is accepted, one more token is sampled from p_k. Each emitted token is then
    distributed exactly as p, whatever q is. A deterministic proposal (None) has q one-hot on x_i.

    target_probs: [k + 1, vocab], the processed target distribution after the context plus draft[:i].
    first_index: token index of draft[0] in the sequence (the random draws are keyed by it).
    """
    for i, (token, dist) in enumerate(zip(draft, draft_dists)):
        index = first_index + i
        p = target_probs[i]  # [vocab]
        q_token = 1.0 if dist is None else dist.prob(token)
        # u < min(1, p/q)  <=>  u * q < p  (q > 0: the drafter sampled this token from q)
        if uniform(seed, index, ACCEPT) * q_token < float(p[token]):
            continue
        residual = p.clone()  # [vocab]
        if dist is None:
            residual[token] = 0.0
        else:
            ids = torch.tensor(dist.token_ids, dtype=torch.long, device=p.device)
            q = torch.tensor(dist.probs, dtype=residual.dtype, device=p.device) / dist.total
            residual[ids] = torch.clamp(residual[ids] - q, min=0.0)
        if float(residual.sum()) <= 0.0:  # p <= q everywhere only up to rounding: p itself is exact enough
            residual = p
        return i, sample_index(residual, uniform(seed, index, EMIT))
    k = len(draft)
    return k, sample_index(target_probs[k], uniform(seed, first_index + k, EMIT))
