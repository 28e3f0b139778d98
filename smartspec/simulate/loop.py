"""The router's step loop on a virtual clock, driving the real policies and controller.

One iteration mirrors ``router.replica_loop.ReplicaLoop.iterate`` (one verifier replica): admit waiting
requests (up to the batch limit), then one step: prefill chunks under the step token budget
(router/prefill_budget.py, as the router plans them), ``choose`` per policy, the drafter proposes,
``refine``, ``controller.record``, one Verify carrying the chunks, then ``controller.observe_request`` per
request, ``controller.observe_step`` and the policy's ``observe``; a chunk that completes its prompt gives
the request its first token; finished requests are forgotten by both. The
clock advances by the world's (noisy) times; the controller and the policies see only what the router
would show them: views, proposal lengths, accepted counts and measured seconds.
"""

from __future__ import annotations

import collections
import math
import random
from dataclasses import dataclass
from typing import Sequence

from router.controller.controller import Slot, SpeculationController
from router.controller.policies import controller_policies
from router.controller.profile import ALL_CHUNKS, BATCHES, CONTEXT_RANGE, PrefillRow, step_features, sweep_plan
from router.policy import PolicyRegistry, RequestOutcome, RequestView, SpeculationPolicy, StepOutcome, clamp_k
from router.prefill_budget import DEFAULT_MAX_STEP_TOKENS, PrefillPacer
from smartspec.bench.metrics import RequestRecord
from smartspec.simulate.load import RequestSpec
from smartspec.simulate.oracle import NAME as CLAIRVOYANT
from smartspec.simulate.oracle import ClairvoyantPolicy
from smartspec.simulate.world import AcceptanceSource, Noise, StepCosts, Truth


@dataclass
class SimRequest:
    """A request in flight, as the router holds it."""

    spec: RequestSpec
    truth: Truth
    arrival_s: float
    prefill_left: int = 0  # prompt tokens not yet prefilled (set at admission)
    generated: int = 0
    steps: int = 0
    proposed: int = 0
    accepted: int = 0
    first_token_s: float | None = None
    done_s: float | None = None

    @property
    def id(self) -> str:
        return f"r{self.spec.index}"

    @property
    def context(self) -> int:
        return self.spec.prompt_tokens - self.prefill_left + self.generated

    @property
    def done(self) -> bool:
        return self.generated >= self.spec.output_tokens

    def record(self) -> RequestRecord:
        return RequestRecord(
            index=self.spec.index, prompt_index=self.spec.prompt_index, due_s=self.arrival_s, sent_s=self.arrival_s,
            first_token_s=self.first_token_s, done_s=self.done_s, token_ids=[0] * self.generated, finish_reason="length",
            steps=self.steps, proposed=self.proposed, accepted=self.accepted,
        )


@dataclass(frozen=True)
class Cell:
    """What every policy of a cell shares: the world, the requests and the load."""

    costs: StepCosts
    acceptance: AcceptanceSource
    requests: tuple[RequestSpec, ...]
    drafter: str
    max_batch: int
    concurrency: int | None  # closed loop; None: the requests' Poisson arrival times
    seed: int
    noise_sigma: float
    profile_scale: float = 1.0  # the startup profile's coefficients times this, as a stale cached profile would be
    max_step_tokens: int | None = None  # the router's --max-step-tokens (None: the profile's)

    @property
    def step_tokens(self) -> int:
        return self.costs.max_step_tokens if self.max_step_tokens is None else self.max_step_tokens


def startup_profile(controller: SpeculationController, costs: StepCosts, noise: Noise, seed: int, scale: float = 1.0, largest_chunk: int = DEFAULT_MAX_STEP_TOKENS) -> None:
    """What the router does at start (router/controller/profile.py): the same sweep plan of Verify
    steps over batch x k x context, some carrying a prefill chunk, fitted into the verify model's prior; here the steps are the world's.
    `scale` != 1 stands for a cached profile measured on a busier or quieter machine."""
    plan = sweep_plan(max(BATCHES), CONTEXT_RANGE[1], random.Random(seed), chunk_room=ALL_CHUNKS, largest_chunk=largest_chunk)
    rows, seconds = [], []
    for picked, ks, chunk in plan.steps:
        contexts = [plan.contexts[i] for i in picked]
        chunks = [chunk] if chunk else []
        rows.append(step_features(contexts, ks, chunks))
        seconds.append(noise(costs.step_s(contexts, ks, chunks)))
    controller.verify_cost.fit_batch(rows, seconds)
    controller.verify_cost.reset_prior(controller.verify_cost.prior * scale)


def make_policy(spec: str, controller: SpeculationController, costs: StepCosts, truths: dict[str, Truth]) -> SpeculationPolicy:
    """The router's registry (fixed policies, plus the controller's 'goodput' and 'uniform'), and the
    simulator's own reference 'clairvoyant'."""
    registry = PolicyRegistry(controller_policies(controller))
    registry.register(CLAIRVOYANT, ClairvoyantPolicy(costs, truths, controller.k_max, lambda: controller.step_prefill))
    return registry.get(spec)


def simulate(cell: Cell, policy_spec: str) -> tuple[list[RequestRecord], dict]:
    """Runs every request of the cell under one policy; returns the per-request records and the
    controller's Stats (k histogram, step-time error, batch size) as the router reports them."""
    noise = Noise(cell.noise_sigma, cell.seed)
    controller = SpeculationController()
    startup_profile(controller, cell.costs, Noise(cell.noise_sigma, cell.seed, tag=1), cell.seed, cell.profile_scale, cell.step_tokens)  # the same profile for every policy
    truths: dict[str, Truth] = {}
    policy = make_policy(policy_spec, controller, cell.costs, truths)
    loop = _Loop(cell, policy, controller, noise, truths)
    loop.run()
    steps = controller.steps
    error = controller.step_error()
    stats = {
        "k_histogram": list(controller.k_histogram),
        "step_time_mape": error if math.isfinite(error) else None,
        "mean_batch_size": controller.batch_sizes / steps if steps else None,
        "steps": steps,
    }
    return [r.record() for r in loop.finished], stats


class _Loop:
    def __init__(self, cell: Cell, policy: SpeculationPolicy, controller: SpeculationController, noise: Noise, truths: dict[str, Truth]) -> None:
        self.cell, self.policy, self.controller, self.noise, self.truths = cell, policy, controller, noise, truths
        self.now = 0.0
        self.pending = collections.deque(sorted(cell.requests, key=lambda r: (r.arrival_s or 0.0, r.index)))
        self.waiting: collections.deque[SimRequest] = collections.deque()
        self.running: list[SimRequest] = []
        self.finished: list[SimRequest] = []
        self.pacer = PrefillPacer(cell.step_tokens)
        if cell.concurrency is not None:
            for _ in range(min(cell.concurrency, len(self.pending))):
                self._send(self.pending.popleft(), 0.0)

    def _send(self, spec: RequestSpec, at: float) -> None:
        request = SimRequest(spec, self.cell.acceptance.truth(self.cell.seed, spec, self.cell.drafter), at)
        self.truths[request.id] = request.truth
        self.waiting.append(request)

    def run(self) -> None:
        while self.pending or self.waiting or self.running:
            if self.cell.concurrency is None:
                while self.pending and self.pending[0].arrival_s <= self.now:
                    spec = self.pending.popleft()
                    self._send(spec, spec.arrival_s)
            if not self.waiting and not self.running:
                self.now = self.pending[0].arrival_s  # idle until the next arrival
                continue
            self._admit()
            self._reap()
            if self.running:
                self._step()
                self._reap()

    def _admit(self) -> None:
        """Waiting requests join up to the batch limit; their prompts are prefilled in the coming steps."""
        room = self.cell.max_batch - len(self.running)
        for _ in range(min(room, len(self.waiting))):
            request = self.waiting.popleft()
            request.prefill_left = request.spec.prompt_tokens
            self.running.append(request)

    def _views(self) -> list[RequestView]:
        max_context = self.cell.costs.max_context
        drafter = self.cell.drafter
        return [
            RequestView(
                request_id=r.id, drafter=drafter, context_tokens=r.context, generated=r.generated,
                max_k=max(0, min(r.spec.output_tokens - r.generated - 1, max_context - r.context)) if drafter != "none" else 0,
                steps=r.steps, proposed=r.proposed, accepted=r.accepted,
            )
            for r in self.running
            if not r.prefill_left
        ]

    def _chunks(self, contexts: Sequence[int]) -> list[tuple[SimRequest, PrefillRow]]:
        """This step's prefill chunks beside decoding requests with these contexts, paced as the router's."""
        prefilling = [r for r in self.running if r.prefill_left]
        cached = [r.spec.prompt_tokens - r.prefill_left for r in prefilling]
        sizes = self.pacer.plan(len(contexts), [r.prefill_left for r in prefilling], self.controller.prefill_pricer(contexts, cached))
        return [(r, PrefillRow(cached=c, tokens=n)) for r, c, n in zip(prefilling, cached, sizes) if n]

    def _step(self) -> None:
        batch, views, drafter = [r for r in self.running if not r.prefill_left], self._views(), self.cell.drafter
        chunks = self._chunks([v.context_tokens for v in views])
        rows = [row for _, row in chunks]
        self.controller.begin_step(rows)
        asked: list[int] = []
        final: list[int] = []
        if batch:  # the router asks its policies only about requests that decode
            asked = [clamp_k(k, v.max_k) for k, v in zip(self.policy.choose(views), views)]
            lengths = [r.truth.proposal(r.generated, a) for r, a in zip(batch, asked)]
            refined = self.policy.refine(views, asked, lengths)
            final = [clamp_k(k, min(a, n)) for k, a, n in zip(refined, asked, lengths)]
            self.controller.record([Slot(v.request_id, v.drafter, k, v.context_tokens) for v, k in zip(views, final)], final)

        draft_s = self.noise(self.cell.costs.draft_s(drafter, asked)) if any(asked) else 0.0
        drafts = {drafter: (tuple(k for k in asked if k > 0), draft_s)} if any(asked) else {}
        contexts = [v.context_tokens for v in views]
        step_s = draft_s + self.noise(self.cell.costs.step_s(contexts, final, rows))
        self.now += step_s
        for request, row in chunks:
            request.prefill_left -= row.tokens
            if not request.prefill_left:  # its prompt is in: the forward's last row gives its first token
                request.first_token_s = self.now
                request.generated = 1

        accepted = [r.truth.accepted(r.generated, k) for r, k in zip(batch, final)]
        for request, k, n in zip(batch, final, accepted):
            request.steps += 1
            request.proposed += k
            request.accepted += n
            request.generated = min(request.generated + n + 1, request.spec.output_tokens)
        for view, k, a, n in zip(views, final, asked, accepted):
            self.controller.observe_request(view.request_id, view.drafter, k, n, asked=a)
        if not batch:
            return  # a step of prefill alone: the router shows its policies nothing of it
        self.controller.observe_step(contexts, final, drafts, step_s, prefill=rows)
        self.policy.observe(StepOutcome(
            requests=tuple(RequestOutcome(v.request_id, v.drafter, a, k, n, v.context_tokens) for v, a, k, n in zip(views, asked, final, accepted)),
            num_sequences=len(batch), new_tokens=sum(k + 1 for k in final), context_tokens=sum(contexts), verify_s=step_s - draft_s, step_s=step_s,
            drafts=drafts, prefill_tokens=sum(row.tokens for row in rows),
        ))

    def _reap(self) -> None:
        done = [r for r in self.running if r.done]
        if not done:
            return
        self.running = [r for r in self.running if not r.done]
        for request in done:
            request.done_s = self.now
            self.policy.forget(request.id)
            self.controller.forget(request.id)
            self.truths.pop(request.id, None)
            self.finished.append(request)
            if self.cell.concurrency is not None and self.pending:
                self._send(self.pending.popleft(), self.now)  # closed loop: the next request takes the slot
