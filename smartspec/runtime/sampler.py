"""Logits to sampling distributions, and sampling with a given uniform number.

Verifier and drafter both call ``processed_probs``, so p (target) and q (draft) go through the same
temperature / top-k / top-p processing, in the order transformers' ``generate()`` applies its warpers.
Sampling is by inverse CDF from a uniform of ``smartspec.sampling.uniform``: deterministic per seed.
"""

from __future__ import annotations

import torch

from smartspec.sampling import DraftDistribution, SamplingParams


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, then top-k, then top-p (at least one token always kept).

    logits: [n, vocab]; returns [n, vocab] float32, each row summing to 1.
    """
    scores = logits.float() / params.temperature  # [n, vocab]
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scores, params.top_k, dim=-1).values[:, -1:]  # [n, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)  # [n, vocab]
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p  # the most likely token has mass_before 0: always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_index(probs: torch.Tensor, u: float) -> int:
    """The token at which the CDF of `probs` ([vocab], need not be normalised) first exceeds u times
    its total. A token of probability 0 is never picked."""
    cdf = torch.cumsum(probs.double(), dim=0)  # [vocab]
    target = torch.tensor([u * float(cdf[-1])], dtype=torch.float64)
    index = int(torch.searchsorted(cdf, target, right=True)[0])
    return min(index, probs.shape[0] - 1)


def truncate_top_n(probs: torch.Tensor, n: int) -> DraftDistribution:
    """The `n` most likely tokens of a distribution ([vocab]) and their renormalised probabilities:
    what a drafter samples from and sends, instead of a whole vocabulary row (tokens of probability
    0 are left out)."""
    values, ids = torch.topk(probs, min(n, probs.shape[0]))  # [n]
    keep = values > 0
    values, ids = values[keep], ids[keep]
    values = values / values.sum()
    return DraftDistribution(tuple(ids.tolist()), tuple(values.tolist()))
