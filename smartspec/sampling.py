"""Sampling parameters, the counter-based random stream every service draws from, and the compact wire
form of draft distributions. Torch-free (the router uses it); the tensor work is in
``smartspec.runtime.sampler``.

Randomness is a pure function of (request seed, token index, purpose) rather than a stateful generator:

- the drafter draws ``uniform(seed, i, DRAFT)`` to sample the draft token at index i;
- the verifier draws ``uniform(seed, i, ACCEPT)`` to accept or reject the draft at index i, and
  ``uniform(seed, i, EMIT)`` to sample its own token at index i (prefill, residual or bonus token).

So a seeded request with a fixed drafter and k produces the same tokens whatever it is batched with,
and however often a drafter loses and resyncs its state (and, without drafts, whichever verifier
replica serves it: a re-prefill after a failover draws the same numbers). What it cannot fix: when k changes (the goodput policy, a
drafter that fails or misses its deadline, the end of the token budget) different draws get used, so
only the distribution is the same; and float rounding differs a little between batch compositions, so
a draw within ~1e-6 of a probability boundary could go either way.
It stays exact: the token committed at index i depends only on draws at indices <= i, and every draw at
an index is used for at most one committed decision, so each decision sees fresh, independent numbers
(a draft at index i + 1 proposed in a step that rejected index i is discarded unexamined, and the next
step's draft at i + 1 may reuse its number because nothing committed depended on it).
"""

from __future__ import annotations

import functools
import math
import secrets
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from smartspec.errors import RequestError
from smartspec.wire import common_pb2

_MASK = (1 << 64) - 1
# Below this temperature a request is greedy: logits / temperature would overflow float32 to inf (NaN
# probabilities), and the distribution is a point mass on the argmax anyway.
MIN_TEMPERATURE = 1e-5
# Purposes of a draw, as independent streams.
DRAFT, ACCEPT, EMIT = 0x5D5A_F7A1_0000_0001, 0x5D5A_F7A1_0000_0002, 0x5D5A_F7A1_0000_0003


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele et al., 2014): a bijection of 64-bit ints with full avalanche.
    numpy uint64 wraps like the C original; torch has no unsigned 64-bit shift (its int64 shift is
    arithmetic), so the draws are made here and sent to the device."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seeds: Sequence[int], indices: Sequence[int], stream: int) -> np.ndarray:
    """Uniform numbers in [0, 1), one per (seed, token index) pair, in the given stream: float64, 53
    random bits each, a pure function of (seed, index, stream)."""
    seed = np.array([s & _MASK for s in seeds], dtype=np.uint64)
    index = np.array(indices, dtype=np.uint64).reshape(seed.shape)
    bits = _mix64(_mix64(_mix64(seed) ^ np.uint64(stream)) ^ index) >> np.uint64(11)
    return bits.astype(np.float64) * (1.0 / (1 << 53))  # exact: fewer than 53 bits


def uniform(seed: int, index: int, stream: int) -> float:
    """One draw of `uniforms`."""
    return float(uniforms([seed], [index], stream)[0])


def random_seed() -> int:
    """A fresh seed for a request that gave none (63 bits, so it prints and parses as a plain int)."""
    return secrets.randbits(63)


@dataclass(frozen=True)
class SamplingParams:
    """How a request picks its tokens. temperature 0 (or below MIN_TEMPERATURE) is greedy (argmax);
    top_p 1 and top_k 0 are off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def check(self) -> "SamplingParams":
        """Raises INVALID_ARGUMENT naming the bad value; returns self when every value is usable."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise RequestError("INVALID_ARGUMENT", f"temperature must be a finite number >= 0 (0 = greedy); got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise RequestError("INVALID_ARGUMENT", f"top_p must be in (0, 1] (1 = off); got {self.top_p}")
        if self.top_k < 0:
            raise RequestError("INVALID_ARGUMENT", f"top_k must be >= 0 (0 = off); got {self.top_k}")
        if not 0 <= self.seed <= _MASK:
            raise RequestError("INVALID_ARGUMENT", f"seed must fit in 64 bits unsigned; got {self.seed}")
        return self

    def to_wire(self) -> common_pb2.SamplingParams:
        return common_pb2.SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed)

    @classmethod
    def from_wire(cls, message: common_pb2.SamplingParams) -> "SamplingParams":
        """Wire form to params; an unset message (temperature 0) is greedy, and top_p 0 means off."""
        return cls(message.temperature, message.top_p or 1.0, message.top_k, message.seed).check()


GREEDY = SamplingParams()


@dataclass(frozen=True)
class DraftDistribution:
    """The distribution q a drafter sampled one draft token from: a sparse support and its
    probabilities (summing to 1). The drafter may truncate its distribution to its top-N before
    sampling; exactness only needs q to be what it actually sampled from."""

    token_ids: tuple[int, ...]
    probs: tuple[float, ...]

    @functools.cached_property
    def total(self) -> float:
        """Sum of the probabilities (1 up to float32 rounding; both sides normalise by it)."""
        return math.fsum(self.probs)

    @functools.cached_property
    def _index(self) -> dict[int, int]:
        return {token: i for i, token in enumerate(self.token_ids)}

    def prob(self, token: int) -> float:
        """q(token), normalised; 0 outside the support."""
        i = self._index.get(token)
        return 0.0 if i is None else self.probs[i] / self.total

    def problem(self, token: int, vocab_size: int) -> str | None:
        """Why this cannot be the distribution `token` was sampled from (None when it can): what the
        router checks before sending a drafter's proposal on, and the verifier before using it."""
        if len(self.token_ids) != len(self.probs):
            return f"{len(self.token_ids)} token ids but {len(self.probs)} probabilities"
        if len(self._index) != len(self.token_ids):
            return "a token id appears twice in the support"
        if any(not 0 <= t < vocab_size for t in self.token_ids):
            return f"a token id is outside the vocabulary (size {vocab_size})"
        if not all(0.0 <= p <= 1.0 for p in self.probs) or not self.total > 0.0:
            return "the values are not probabilities"
        if self.prob(token) <= 0.0:
            return f"the proposed token {token} has probability 0 in it"
        return None

    def sample(self, u: float) -> int:
        """Inverse-CDF draw with the uniform u (a token of probability 0 is never picked)."""
        target, cumulative = u * self.total, 0.0
        for token, prob in zip(self.token_ids, self.probs):
            cumulative += prob
            if cumulative > target:
                return token
        return next(t for t, p in zip(reversed(self.token_ids), reversed(self.probs)) if p > 0)


# Per draft token of one request: its distribution, or None for a deterministic proposal (q one-hot).
TokenDistributions = Sequence["DraftDistribution | None"]


def pack_distributions(per_request: Sequence[TokenDistributions]) -> common_pb2.DraftDistributions:
    """Flattens per-request, per-token distributions into the wire's ragged form (support count 0 for a
    deterministic token). Empty when every token is deterministic, which costs nothing on the wire."""
    message = common_pb2.DraftDistributions()
    if not any(d is not None for dists in per_request for d in dists):
        return message
    for dists in per_request:
        for dist in dists:
            if dist is None:
                message.support_counts.append(0)
            else:
                message.support_counts.append(len(dist.token_ids))
                message.token_ids.extend(dist.token_ids)
                message.probs.extend(dist.probs)
    return message


def unpack_distributions(message: common_pb2.DraftDistributions, draft_counts: Sequence[int]) -> list[list[DraftDistribution | None]]:
    """The inverse of `pack_distributions` for drafts of the given counts; checks that the parts agree."""
    counts = list(message.support_counts)
    total_tokens = sum(draft_counts)
    if not counts:
        return [[None] * n for n in draft_counts]
    if len(counts) != total_tokens:
        raise RequestError("INVALID_ARGUMENT", f"draft_distributions: {len(counts)} support counts for {total_tokens} draft tokens")
    if len(message.token_ids) != len(message.probs) or sum(counts) != len(message.token_ids):
        raise RequestError(
            "INVALID_ARGUMENT",
            f"draft_distributions: support counts add up to {sum(counts)}, with {len(message.token_ids)} token ids and {len(message.probs)} probabilities",
        )
    ids, probs = list(message.token_ids), list(message.probs)
    out: list[list[DraftDistribution | None]] = []
    token, entry = 0, 0
    for n in draft_counts:
        dists: list[DraftDistribution | None] = []
        for count in counts[token : token + n]:
            dists.append(DraftDistribution(tuple(ids[entry : entry + count]), tuple(probs[entry : entry + count])) if count else None)
            entry += count
        token += n
        out.append(dists)
    return out
