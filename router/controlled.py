"""The benchmark-only "controlled" drafter: proposes the request's reference continuation, each token
kept with probability a and otherwise replaced, so acceptance can be swept on any model.

This is how the SmartSpec authors measured the verifier's real cost against acceptance. It runs inside
the router (proposing is a list lookup), so it costs next to nothing; results from it are always
labelled as controlled. The reference is the target's own greedy output for the prompt, which a run
with policy "none" yields: under greedy decoding the committed output equals it, so position
``generated + j`` of the reference is exactly the token the verifier will check at draft position j.
"""

from __future__ import annotations

import random
import time
from typing import Sequence

from router.drafters import Draft
from router.request import RequestState

NAME = "controlled"


class ControlledDrafter:
    """Same interface as router.drafters.DrafterClient, without a service behind it."""

    name = NAME

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._rngs: dict[str, random.Random] = {}

    def available(self) -> bool:
        return True

    def _propose_one(self, request: RequestState, k: int) -> list[int]:
        options = request.params.benchmark
        rng = self._rngs.setdefault(request.id, random.Random(options.seed))
        reference = options.reference_token_ids
        start = request.generated
        proposal = []
        for token in reference[start : start + k]:
            if rng.random() < options.controlled_acceptance:
                proposal.append(token)
            else:  # any other token: the verifier rejects it (greedy), which is the point
                proposal.append((token + 1 + rng.randrange(self.vocab_size - 1)) % self.vocab_size)
        return proposal

    async def propose(self, requests: Sequence[RequestState], ks: Sequence[int]) -> tuple[list[Draft], float]:
        started = time.perf_counter()
        proposals = [Draft(self._propose_one(request, k)) for request, k in zip(requests, ks)]
        return proposals, time.perf_counter() - started

    async def release(self, request_ids: Sequence[str]) -> None:
        for request_id in request_ids:
            self._rngs.pop(request_id, None)
