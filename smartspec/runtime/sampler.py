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
    return _nucleus(probs, params.top_p) if params.top_p < 1.0 else probs


def _nucleus(probs: torch.Tensor, top_p: float, first: int = 64) -> torch.Tensor:
    """Keeps, per row, the most likely tokens until their mass reaches top_p (the token that crosses it
    included), renormalised. Looks at the top `first` tokens first and sorts the whole row only when a
    nucleus is larger: it usually is not, and a full sort of a vocabulary row costs ~2 ms on a CPU.

    probs: [n, vocab]; returns [n, vocab].
    """
    n = min(first, probs.shape[-1])
    values, ids = torch.topk(probs, n, dim=-1)  # [n_rows, n], descending
    keep = (torch.cumsum(values, dim=-1) - values) < top_p  # mass before a token < top_p: the first is always kept
    if n < probs.shape[-1] and bool(keep[:, -1].any()):  # some row's nucleus reaches past the top n
        values, ids = torch.sort(probs, dim=-1, descending=True)  # [n_rows, vocab]
        keep = (torch.cumsum(values, dim=-1) - values) < top_p
    out = torch.zeros_like(probs).scatter_(-1, ids, values * keep)
    return out / out.sum(dim=-1, keepdim=True)


def sample_index(probs: torch.Tensor, u: float) -> int:
    """The token at which the CDF of `probs` ([vocab], need not be normalised) first exceeds u times
    its total. A token of probability 0 is never picked."""
    cdf = torch.cumsum(probs.double(), dim=0)  # [vocab]
    target = torch.tensor([u * float(cdf[-1])], dtype=torch.float64, device=cdf.device)
    index = int(torch.searchsorted(cdf, target, right=True)[0])
    return min(index, probs.shape[0] - 1)


def draft_distribution(logits: torch.Tensor, params: SamplingParams, n: int) -> DraftDistribution:
    """What a drafter samples a draft token from: its `n` most likely tokens, processed (temperature,
    top-k, top-p) among themselves, tokens of probability 0 left out. It costs a top-n instead of a
    softmax and sort over the vocabulary, and is what goes on the wire instead of a vocabulary row;
    exactness only needs q to be what the drafter samples from.

    logits: [vocab].
    """
    values, ids = torch.topk(logits.float(), min(n, logits.shape[-1]))  # [n], descending
    probs = processed_probs(values[None], params)[0]  # [n]
    keep = probs > 0
    return DraftDistribution(tuple(ids[keep].tolist()), tuple(probs[keep].tolist()))
