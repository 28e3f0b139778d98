"""The `clairvoyant` reference: the controller's own allocator, fed what the controller can only guess.

Each request's true chance of acceptance at each coming draft position (its gain curve, from the world)
and the world's true step costs, linearised around the current batch into the allocator's StepCost form.
A step's prefill chunks are part of that truth and count as the controller counts them (their own time
kept out of the goodput, what a draft costs beside them in it), so the reference differs from `goodput`
only in what it knows, not in what it maximises.
It shows how much of the gap to the best possible a better estimate could close; it is a reference
column, never a policy the router could run.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from router.controller.allocator import Candidate, StepCost, allocate_goodput
from router.controller.profile import PrefillRow
from router.policy import RequestView, SpeculationPolicy
from smartspec.simulate.world import StepCosts, Truth

NAME = "clairvoyant"


class ClairvoyantPolicy(SpeculationPolicy):
    """allocate_goodput over true gains and true (noiseless) costs."""

    def __init__(self, costs: StepCosts, truths: Mapping[str, Truth], k_max: int, step_prefill: Callable[[], Sequence[PrefillRow]] = tuple) -> None:
        self.costs = costs
        self.truths = truths  # request id -> its truth; filled by the step loop as requests arrive
        self.k_max = k_max
        self.step_prefill = step_prefill  # the coming step's prefill chunks

    @property
    def name(self) -> str:
        return NAME

    def choose(self, batch: Sequence[RequestView]) -> list[int]:
        candidates = []
        for view in batch:
            truth = self.truths[view.request_id]
            cap = min(view.max_k, self.k_max)
            candidates.append(Candidate(truth.base, cap, view.drafter, truth.gains(view.generated, cap) if cap else None))
        return allocate_goodput(candidates, self.step_cost(batch))

    def step_cost(self, batch: Sequence[RequestView]) -> StepCost:
        """The true verify time around this batch: base at k = 0 without its prefill chunks (their time is
        kept apart, allocator.py), and beside them the jump of the first speculative token and the cost
        per draft token from k = 1 to k = 4 for everyone."""
        n = len(batch)
        contexts = [v.context_tokens for v in batch]
        chunks = tuple(self.step_prefill())

        def verify(per_seq_k: int) -> float:
            return self.costs.step_s(contexts, [per_seq_k] * n, chunks)

        base, one, four = verify(0), verify(1), verify(4)
        token_s = max((four - one) / (3 * n), 1e-9)
        jump_s = max(one - base - token_s * n, 0.0)
        alone = self.costs.step_s(contexts, [0] * n) if chunks else base  # the chunks' own time kept apart
        return StepCost(base_s=alone, token_s=token_s, jump_s=jump_s, drafters=dict(self.costs.drafters), prefill_s=base - alone)
