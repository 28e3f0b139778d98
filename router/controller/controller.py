"""The closed-loop speculation controller: what it knows, how it decides, how it learns.

It owns the cost models (verify and per-drafter), the drafters' global acceptance rates and each
request's acceptance posterior. The router asks it for k per request every step and reports back what
each Verify and Propose measured, so the models keep refitting while the system runs. Pure code: no
I/O, no clock, no gRPC; the router passes measured seconds in.

Token trees: k is a tree's node budget. A request's E(k) comes from its drafter's probabilities
(``tree.TreeCalibration``, fitted online per drafter from which nodes each verify accepted): exact for
the tree just proposed (to choose how many of its nodes to verify), and from its previous tree, with a
geometric tail past that tree's size, to choose the next budget before drafting. Until a request has
proposed a tree, its drafter's geometric acceptance stands in.

Chunked prefill: a step may also carry prefill chunks (``begin_step``). They are rows of the same
forward, so every prediction of the step prices them, and what a draft costs beside them; their own
time is kept out of the goodput a draft must raise, since the pacer sized them at k = 0 and drafts
displace none of their tokens (allocator.py). The pacer prices its chunks here too (``prefill_pricer``).
"""

from __future__ import annotations

import inspect
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Sequence

from router.controller.acceptance import REQUEST_PRIOR_STRENGTH, DrafterRates, RequestAcceptance
from router.controller.allocator import (
    Candidate,
    DrafterCost,
    StepCost,
    allocate_goodput,
    allocate_uniform,
    expected_total,
    predicted_goodput,
)
from router.controller.cost_model import LONGEST_ROW, NEW_TOKENS, LinearCostModel, VerifyCostModel, draft_features, new_draft_model, new_verify_model
from router.controller.profile import PrefillRow, VerifyRows, step_features
from router.controller.tree import TREE_PRIOR_STRENGTH, TreeCalibration, path_probs
from router.prefill_budget import StepPricer

# Drafters that run no model: their proposals cost next to nothing per request (a host-side match).
MODEL_FREE_DRAFTERS = frozenset({"prompt_lookup", "controlled"})


@dataclass(frozen=True)
class Slot:
    """One running request as the controller sees it this step."""

    request_id: str
    drafter: str  # "none" when it has no drafter (or its drafter is unavailable this step)
    cap: int  # most tokens it may speculate (budget, context, proposal length already applied)
    context_tokens: int


@dataclass
class StepRecord:
    """A decision and its prediction, kept until the step's measurements arrive."""

    ks: list[int]
    predicted_s: float
    predicted_goodput: float


class SpeculationController:
    """One per router. The scheduler records every step's final k and measurements here, whatever
    the policy, so the cost model learns and its error is measured under every policy; the goodput and
    uniform policies ask it for decisions."""

    def __init__(
        self,
        k_max: int = 8,
        request_prior_strength: float = REQUEST_PRIOR_STRENGTH,
        tree_prior_strength: float = TREE_PRIOR_STRENGTH,
        hysteresis: float = 0.02,
        initial_rate: float = 0.5,
        evidence_decay: float = 0.9,
        rate_decay: float = 0.995,
    ) -> None:
        self.k_max = k_max
        self.request_prior_strength = request_prior_strength  # pseudo-verifies of the drafter's rate in each request's posterior
        self.tree_prior_strength = tree_prior_strength  # pseudo-observations in a drafter's tree calibration
        self.hysteresis = hysteresis
        self.initial_rate = initial_rate
        self.evidence_decay = evidence_decay  # per step: a request's old acceptance evidence fades (about 10 steps)
        self.rate_decay = rate_decay  # per step: a drafter's global evidence fades (about 200 steps)
        self.verify_cost: VerifyCostModel = new_verify_model()
        self.draft_cost: dict[str, LinearCostModel] = {}
        self._clear()

    def sibling(self) -> "SpeculationController":
        """A controller for another replica of the same model: these settings and this startup cost
        prior (whose rescaling, should live steps contradict it, is saved the same way), nothing learned."""
        settings = inspect.signature(SpeculationController).parameters  # each kept as an attribute of that name
        sibling = SpeculationController(**{name: getattr(self, name) for name in settings})
        sibling.verify_cost.reset_prior(self.verify_cost.prior, self.verify_cost.breaks)
        sibling.verify_cost.on_recalibrate = self.verify_cost.on_recalibrate
        return sibling

    def _clear(self) -> None:
        """Forgets what was learned while serving (the cost models go back to their priors)."""
        self.verify_cost.reset_prior(self.verify_cost.prior)
        for model in self.draft_cost.values():
            model.reset_prior(model.prior)
        self.rates: dict[str, DrafterRates] = {}
        self._posteriors: dict[str, dict[str, RequestAcceptance]] = {}  # request id -> drafter -> posterior
        self.calibrations: dict[str, TreeCalibration] = {}  # drafter -> its trees' calibration
        self._trees: dict[str, dict[str, tuple[list[int], list[float]]]] = {}  # request id -> drafter -> last tree (parents, probs)
        self._unverified: set[tuple[str, str]] = set()  # (request id, drafter) whose last tree awaits its verify
        self._previous: dict[str, int] = {}
        self._prefill: tuple[PrefillRow, ...] = ()  # this step's prefill chunks (begin_step)
        self.last: StepRecord | None = None
        self._step_errors: deque[float] = deque(maxlen=256)
        self.steps = 0
        self.batch_sizes = 0
        self.k_histogram: list[int] = []

    def reset(self) -> None:
        """Back to the priors (benchmarks reset between policy runs); a startup profile is kept."""
        self._clear()

    # --- estimates ------------------------------------------------------------------------------
    def drafter_rates(self, drafter: str) -> DrafterRates:
        if drafter not in self.rates:
            self.rates[drafter] = DrafterRates(initial=self.initial_rate)
        return self.rates[drafter]

    def drafter_cost(self, drafter: str) -> LinearCostModel:
        if drafter not in self.draft_cost:
            self.draft_cost[drafter] = new_draft_model(model_free=drafter in MODEL_FREE_DRAFTERS)
        return self.draft_cost[drafter]

    def calibration(self, drafter: str) -> TreeCalibration:
        if drafter not in self.calibrations:
            self.calibrations[drafter] = TreeCalibration(self.tree_prior_strength)
        return self.calibrations[drafter]

    def _gains(self, request_id: str, drafter: str, cap: int) -> tuple[float, ...] | None:
        """Marginal gains of the request's first `cap` tree nodes, from its last proposed tree (None: it
        has none with this drafter). Past that tree's size the gains go on geometrically."""
        tree = self._trees.get(request_id, {}).get(drafter)
        if tree is None or not tree[0] or cap <= 0:
            return None
        gains = self.calibration(drafter).gains(*tree)[:cap]
        ratio = min(gains[-1] / gains[-2], 1.0) if len(gains) > 1 and gains[-2] > 0 else gains[-1]
        while len(gains) < cap:
            gains.append(gains[-1] * ratio)
        return tuple(gains)

    def _candidate(self, request_id: str, drafter: str, cap: int, prior_rate: float | None = None) -> Candidate:
        """`prior_rate`: the drafter's optimistic rate, when the caller has it for many requests."""
        return Candidate(self.acceptance(request_id, drafter, prior_rate), cap, drafter, self._gains(request_id, drafter, cap))

    def expected(self, request_id: str, drafter: str, k: int) -> float:
        """E(k) the controller predicts for the request's next verify of k tokens (tree nodes) from
        `drafter`: the target's own token plus the drafts expected to be accepted."""
        return self._candidate(request_id, drafter, k).expected(k)

    def _posterior(self, request_id: str, drafter: str) -> RequestAcceptance:
        mine = self._posteriors.get(request_id)
        if mine is None:
            mine = self._posteriors[request_id] = {}
        posterior = mine.get(drafter)
        if posterior is None:
            posterior = mine[drafter] = RequestAcceptance()
        return posterior

    def acceptance(self, request_id: str, drafter: str, prior_rate: float | None = None) -> float:
        """Posterior mean of the request's acceptance rate with `drafter` (prior: the drafter's rate,
        optimistic while the drafter's evidence is thin; `prior_rate` when already known)."""
        prior = self.drafter_rates(drafter).optimistic_rate if prior_rate is None else prior_rate
        return self._posterior(request_id, drafter).mean(prior, self.request_prior_strength)

    def step_cost(self, slots: Sequence[Slot]) -> StepCost:
        """The cost model flattened for this batch (its base is the step with every k = 0 less this
        step's prefill chunks' own time; the jump and the knee come after as many draft tokens as the
        step's own tokens, the chunks' included, leave before them)."""
        drafters = {s.drafter for s in slots if s.drafter != "none"}
        return self._flat_cost([s.context_tokens for s in slots], self._prefill, drafters)

    def _flat_cost(self, contexts: Sequence[int], prefill: Sequence[PrefillRow], drafters: Iterable[str]) -> StepCost:
        """StepCost of a step over requests with these contexts, beside these prefill chunks, drafting
        with these drafters: a draft token costs its share of the step's tokens and attention over its
        request's context (at the mean context: the allocator prices every request's tokens alike)."""
        coef, breaks = self.verify_cost.as_dict(), self.verify_cost.breaks
        drafter_costs = {}
        for name in drafters:
            d = self.drafter_cost(name).as_dict()
            drafter_costs[name] = DrafterCost(any_s=d["any_speculation"], position_s=d["max_k"], token_s=d["sum_k"])
        decoding = VerifyRows.of(contexts, [0] * len(contexts))
        at_zero = decoding.beside(prefill)  # [STEP_SHAPE]: with its chunks, where the breakpoints fall
        own = int(at_zero[NEW_TOKENS])  # tokens the step has whatever k is
        base_s = self.verify_cost.predict(decoding.beside())  # without them: their time is kept apart
        with_chunks_s = self.verify_cost.predict(at_zero) if prefill else base_s
        paid = at_zero[LONGEST_ROW] > 1 and own >= breaks.jump_tokens  # by a prefill chunk
        knee = float("inf") if breaks.knee_tokens is None else max(breaks.knee_tokens - own, 0)
        return StepCost(
            base_s=max(base_s, 1e-4),
            token_s=coef["new_tokens"] + coef["attended_tokens"] * sum(contexts) / max(len(contexts), 1),
            jump_s=0.0 if paid else coef["multi_token"],
            drafters=drafter_costs,
            jump_after=max(breaks.jump_tokens - own, 1),
            knee_after=knee,
            excess_s=coef["excess_tokens"],
            prefill_s=with_chunks_s - base_s,
        )

    def prefill_pricer(self, contexts: Sequence[int], cached: Sequence[int]) -> StepPricer:
        """What the prefill pacer sizes chunks by, alike under every policy: the predicted Verify
        seconds of a step over requests with these contexts, none speculating, when the prompts being
        prefilled (`cached` tokens of each already in) get so many tokens each."""
        decoding = VerifyRows.of(contexts, [0] * len(contexts))  # summed once for the pacer's ~10 prices

        def price(sizes: Sequence[int]) -> float:
            return self.verify_cost.predict(decoding.beside([PrefillRow(c, n) for c, n in zip(cached, sizes) if n]))

        return price

    def _candidates(self, slots: Sequence[Slot]) -> list[Candidate]:
        priors = {name: self.drafter_rates(name).optimistic_rate for name in {s.drafter for s in slots} if name != "none"}  # once per drafter
        return [
            self._candidate(s.request_id, s.drafter, min(s.cap, self.k_max), priors[s.drafter]) if s.drafter != "none" else Candidate(0.0, 0, "none")
            for s in slots
        ]

    # --- decisions ------------------------------------------------------------------------------
    def begin_step(self, prefill: Sequence[PrefillRow] = ()) -> None:
        """The prefill chunks the step about to be decided carries besides its requests' verification,
        priced into every prediction until the next call."""
        self._prefill = tuple(prefill)

    @property
    def step_prefill(self) -> tuple[PrefillRow, ...]:
        """The prefill chunks of the step being decided (begin_step)."""
        return self._prefill

    def choose_drafter(self, request_id: str, drafters: Sequence[str], cap: int, context_tokens: int) -> str:
        """For drafter 'auto': the drafter that gives this request the best predicted goodput on its
        own (best over k <= cap), from its acceptance estimate for this request, how often it has
        anything to propose, and its cost; 'none' when there is none or no room to speculate."""
        if not drafters or cap <= 0:
            return "none"
        cost = self._flat_cost([context_tokens], (), drafters)  # the request on its own
        best, best_value = "none", 1.0 / cost.base_s
        for name in drafters:
            candidate = self._candidate(request_id, name, min(cap, self.k_max))
            hit = self._posterior(request_id, name).proposal_rate
            for k in range(1, candidate.cap + 1):
                value = (1.0 + hit * (candidate.expected(k) - 1.0)) / cost.alone_time(k, name)
                if value > best_value:
                    best, best_value = name, value
        return best

    def decide(self, slots: Sequence[Slot], mode: str = "goodput") -> list[int]:
        """k per slot. 'goodput': per request, with hysteresis against last step's k; 'uniform': the
        published batch-wide choice. Changes no state (the scheduler records what was verified)."""
        candidates = self._candidates(slots)
        cost = self.step_cost(slots)
        if mode == "uniform":
            return allocate_uniform(candidates, cost, self.k_max)
        if mode != "goodput":
            raise ValueError(f"unknown controller mode {mode!r}")
        ks = allocate_goodput(candidates, cost)
        previous = [min(self._previous.get(s.request_id, 0), c.cap) for s, c in zip(slots, candidates)]
        if previous != ks and predicted_goodput(candidates, ks, cost) <= predicted_goodput(candidates, previous, cost) * (1 + self.hysteresis):
            return previous  # not clearly better: keep last step's choice rather than thrash
        return ks

    def record(self, slots: Sequence[Slot], ks: Sequence[int]) -> StepRecord:
        """The k each request verifies this step (under any policy) and the predicted step time."""
        candidates = self._candidates(slots)
        cost = self.step_cost(slots)
        drafters = [c.drafter if k > 0 else "none" for c, k in zip(candidates, ks)]
        predicted = cost.step_time(list(ks), drafters) + cost.prefill_s
        tokens = expected_total(candidates, ks)
        for s, k in zip(slots, ks):
            self._previous[s.request_id] = k
            if k >= len(self.k_histogram):
                self.k_histogram.extend([0] * (k + 1 - len(self.k_histogram)))
            self.k_histogram[k] += 1
        self.steps += 1
        self.batch_sizes += len(slots)
        self.last = StepRecord(list(ks), predicted, tokens / predicted if predicted > 0 else 0.0)
        return self.last

    # --- feedback -------------------------------------------------------------------------------
    def observe_tree(self, request_id: str, drafter: str, parents: Sequence[int], probs: Sequence[float]) -> None:
        """A token tree `drafter` proposed for the request this step (before it is cut to what is
        verified): per node its parent and the drafter's probability of it given its path. The verify
        decision and the next step's budget are estimated from it."""
        if len(probs) != len(parents):
            return  # no probabilities: the geometric estimate stands in
        self._trees.setdefault(request_id, {})[drafter] = (list(parents), list(probs))
        self._unverified.add((request_id, drafter))

    def observe_request(
        self, request_id: str, drafter: str, proposed: int, accepted: int, asked: int | None = None, accepted_nodes: Sequence[int] | None = None
    ) -> None:
        """One request's outcome in one Verify (`asked` tokens asked of its drafter, `proposed`
        verified, `accepted`; for a token tree, `accepted_nodes`: which of its nodes, which fits the
        drafter's calibration). Old evidence fades a little every step, also when the request did not
        speculate, so a request that stopped speculating is tried again later."""
        for other in self._posteriors.get(request_id, {}).values():  # every drafter's, used this step or not
            other.decay(self.evidence_decay)
        if drafter == "none":
            return
        if (request_id, drafter) in self._unverified:
            self._unverified.discard((request_id, drafter))
            if proposed > 0 and accepted_nodes is not None:
                parents, probs = self._trees[request_id][drafter]
                hit = set(accepted_nodes)
                self.calibration(drafter).observe(path_probs(parents[:proposed], probs[:proposed]), [i in hit for i in range(proposed)])
        posterior = self._posterior(request_id, drafter)
        if asked:
            posterior.observe_ask(proposed)
        if proposed > 0:
            posterior.observe(proposed, accepted)
            self.drafter_rates(drafter).observe(proposed, accepted)

    def observe_step(
        self,
        contexts: Sequence[int],
        ks: Sequence[int],
        drafts: dict[str, tuple[Sequence[int], float]],
        step_s: float,
        prefill: Sequence[PrefillRow] = (),
    ) -> None:
        """A step's measurements: its shape (each verified request's context and k, the prefill chunks
        that ran beside them), each drafter's ks and Propose time, and the step's wall time, which is
        compared with the prediction made at decision time.

        The verify model is fitted to the wall time minus the slowest Propose (drafters run in
        parallel), so router and RPC overheads are part of what it predicts, as they are part of
        what a client waits for.
        """
        for rates in self.rates.values():
            rates.decay(self.rate_decay)
        for calibration in self.calibrations.values():
            calibration.decay(self.rate_decay)
        drafting_s = max((seconds for _, seconds in drafts.values()), default=0.0)
        self.verify_cost.observe(step_features(contexts, ks, prefill), max(step_s - drafting_s, 0.0))
        for drafter, (asked, seconds) in drafts.items():
            if any(asked):
                self.drafter_cost(drafter).observe(draft_features(asked), seconds)
        if self.last is not None and step_s > 0:
            self._step_errors.append(abs(self.last.predicted_s - step_s) / step_s)

    def forget(self, request_id: str) -> None:
        """A finished request's posteriors and last k go (its drafter's global rate keeps its evidence)."""
        self._previous.pop(request_id, None)
        self._posteriors.pop(request_id, None)
        for drafter in self._trees.pop(request_id, {}):
            self._unverified.discard((request_id, drafter))

    def step_error(self) -> float:
        """Mean absolute percentage error of the predicted step time over the recent window."""
        return sum(self._step_errors) / len(self._step_errors) if self._step_errors else float("nan")
