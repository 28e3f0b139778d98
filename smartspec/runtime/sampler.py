"""Logits to sampling distributions, and sampling with given uniform numbers, for batches of rows.

Verifier and drafter both use this processing, so p (target) and q (draft) go through the same
temperature / top-k / top-p steps, in the order transformers' ``generate()`` applies its warpers. Every
row has its own parameters, so one call serves a whole batch of requests, and nothing is read back to
the host on an accelerator. Sampling is by inverse CDF from uniforms of ``smartspec.sampling.uniforms``:
deterministic per seed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from smartspec.sampling import DraftDistribution, SamplingParams

# Device types whose tensors are in host memory: reading one back is no device-to-host transfer.
HOST_DEVICES = frozenset({"cpu"})


@dataclass(frozen=True)
class RowParams:
    """Sampling parameters per row of logits, as tensors on their device, and what the processing's shape
    depends on, known on the host so that it needs no transfer."""

    temperatures: tuple[float, ...]  # [n], on the host
    temperature: torch.Tensor  # [n] float32
    top_k: torch.Tensor  # [n] int64; 0: off
    top_p: torch.Tensor  # [n] float32
    nucleus: torch.Tensor  # [n] bool: top-p is on (top_p < 1)
    max_top_k: int
    any_nucleus: bool
    nucleus_in_top_k: bool  # every top-p row also has a top-k: its nucleus lies among its top k tokens

    @classmethod
    def of(cls, params: Sequence[SamplingParams], vocab: int, device: torch.device) -> "RowParams":
        top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
        nucleus = [p.top_p < 1.0 for p in params]
        temperatures = tuple(p.temperature for p in params)
        return cls(
            temperatures=temperatures,
            temperature=torch.tensor(temperatures, dtype=torch.float32, device=device),
            top_k=torch.tensor(top_k, dtype=torch.long, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            nucleus=torch.tensor(nucleus, dtype=torch.bool, device=device),
            max_top_k=max(top_k, default=0),
            any_nucleus=any(nucleus),
            nucleus_in_top_k=all(k > 0 for k, on in zip(top_k, nucleus) if on),
        )

    def __getitem__(self, rows: slice) -> "RowParams":
        """These rows' parameters. The host flags stay the whole set's: they only decide what is computed,
        and each row's own values still decide its result."""
        return dataclasses.replace(
            self, temperatures=self.temperatures[rows], temperature=self.temperature[rows], top_k=self.top_k[rows], top_p=self.top_p[rows],
            nucleus=self.nucleus[rows],
        )

    @property
    def divisor(self) -> float | torch.Tensor:
        """What the logits are divided by: the temperature, a number when every row shares it (the
        cheaper division), else [n, 1]."""
        return self.temperatures[0] if len(set(self.temperatures)) == 1 else self.temperature[:, None]


@dataclass(frozen=True)
class Distributions:
    """Processed distributions of n rows, kept factored so that reading p at one token per row costs no
    pass over the vocabulary: p = probs where probs >= floor, else 0, divided by total (p = probs when
    no row has top-p)."""

    probs: torch.Tensor  # [n, vocab]: softmax after temperature and top-k, before top-p
    floor: torch.Tensor | None  # [n]: the smallest probability top-p keeps (0: top-p off)
    total: torch.Tensor | None  # [n]: the probability top-p keeps (1: top-p off, p is probs itself)

    def at(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """p of token tokens[i] at row rows[i] ([m] each); returns [m]."""
        prob = self.probs[rows, tokens]  # [m]
        return prob if self.floor is None else torch.where(prob >= self.floor[rows], prob, 0.0) / self.total[rows]

    def dense(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """p itself at `rows` (default: all): [rows, vocab], each row summing to 1."""
        probs, floor, total = self.probs, self.floor, self.total
        if rows is not None:
            probs = probs.index_select(0, rows)
            floor, total = (None, None) if floor is None else (floor[rows], total[rows])
        if floor is None:
            return probs
        return torch.where(probs >= floor[:, None], probs, 0.0) / total[:, None]


def distributions(logits: torch.Tensor, params: RowParams, workspace: torch.Tensor | None = None) -> Distributions:
    """Probabilities after temperature, then top-k, then top-p (at least one token always kept), per row
    with that row's parameters. logits: [n, vocab]. workspace: [2, >= n, vocab] float32 to compute in
    (the probabilities are then a view of it, valid until its next use), or None: fresh tensors. On the
    host, reusing one avoids mapping fresh memory for every block."""
    n = logits.shape[0]
    buffers = (None, None) if workspace is None else (workspace[0, :n], workspace[1, :n])
    scores = torch.div(logits.float(), params.divisor, out=buffers[0])  # [n, vocab]
    top = _cut_to_top_k(scores, params) if params.max_top_k else None
    probs = torch.softmax(scores, dim=-1, out=buffers[1])  # [n, vocab]
    if not params.any_nucleus:
        return Distributions(probs, None, None)
    if top is not None and params.nucleus_in_top_k:  # the top-k tokens, already in order: no sort
        floor = torch.where(params.nucleus, _floor_of_sorted(probs.gather(1, top.indices), params.top_p), 0.0)
    else:
        floor = _nucleus_floor(probs, params.top_p, params.nucleus)  # [n]
    kept = torch.where(probs >= floor[:, None], probs, probs.new_zeros(()), out=buffers[0]).sum(dim=-1)  # [n]; the scores are spent
    return Distributions(probs, floor, torch.where(params.nucleus, kept, 1.0))


def _cut_to_top_k(scores: torch.Tensor, params: RowParams) -> torch.return_types.topk:
    """Sets, in place, every score below its row's k-th largest to -inf (rows without top-k keep all);
    returns the largest max_top_k scores and their tokens, in order ([n, max_top_k] each)."""
    top = torch.topk(scores, params.max_top_k, dim=-1)
    kth = top.values.gather(1, (params.top_k[:, None] - 1).clamp(min=0)).masked_fill(params.top_k[:, None] == 0, float("-inf"))  # [n, 1]
    scores.masked_fill_(scores < kth, float("-inf"))
    return top


def _nucleus_floor(probs: torch.Tensor, top_p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The smallest probability in each row's top-p nucleus: the most likely tokens until their mass
    reaches top_p, the token that crosses it included (masses summed in order of probability, as
    transformers' TopPLogitsWarper does); ties with it are kept too. Only `rows` ([n] bool) are computed,
    the others get 0. probs: [n, vocab]; top_p: [n]; returns [n].

    On an accelerator sorting the rows is cheap and keeps the step free of host reads. On the host a full
    sort costs ~5 ms per vocabulary row, so only the tokens that can be in the nucleus are sorted.
    """
    if probs.device.type in HOST_DEVICES:
        return _floor_among_candidates(probs, top_p, rows)
    return torch.where(rows, _floor_of_sorted(torch.sort(probs, dim=-1, descending=True).values, top_p), 0.0)


def _floor_of_sorted(values: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The nucleus floor of rows sorted in descending order ([n, m]: all their nonzero values, or at
    least the nucleus); [n]."""
    keep = (torch.cumsum(values, dim=-1) - values) < top_p[:, None]  # mass before a token < top_p: the first is always kept
    return values.gather(1, keep.sum(dim=-1, keepdim=True) - 1)[:, 0]


def _floor_among_candidates(probs: torch.Tensor, top_p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`_nucleus_floor` in host memory, sorting only the candidates: a token of probability below
    (1 - top_p) / vocab is never in the nucleus (the tokens at most as likely hold less than 1 - top_p, so
    more than top_p comes before it); half that bound leaves room for rounding. On real logits a few
    thousand of 49,152 tokens remain. In numpy, whose compare and sort are several times faster than
    torch's on a CPU; the running sums are accumulated as torch's are (in float64, each rounded to
    float32), so the floor is exactly `_floor_of_sorted`'s."""
    values, top = probs.numpy(), top_p.numpy()
    floor = np.zeros_like(top)
    for i in np.flatnonzero(rows.numpy()):
        candidates = np.sort(values[i][values[i] >= (1.0 - top[i]) / (2 * values.shape[-1])])[::-1]
        before = np.cumsum(candidates, dtype=np.float64).astype(np.float32) - candidates
        floor[i] = candidates[np.count_nonzero(before < top[i]) - 1]
    return torch.from_numpy(floor)


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """p for every row of `logits` ([n, vocab]) under one request's parameters: [n, vocab] float32,
    each row summing to 1."""
    rows = RowParams.of([params] * logits.shape[0], logits.shape[-1], logits.device)
    return distributions(logits, rows).dense()


def sample(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the token at which the CDF of `weights` ([n, vocab], need not be normalised) first
    exceeds u ([n] float64) times its total. A token of weight 0 is never picked. Returns [n] int64."""
    cdf = torch.cumsum(weights.double(), dim=-1)  # [n, vocab]
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]  # [n]
    return index.clamp(max=weights.shape[-1] - 1)


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
