"""One verifier replica's step loop: its own running batch, its own cost model, its own pace.

The router runs one ReplicaLoop per verifier replica, each as its own asyncio task (router/scheduler.py
owns them and the one admission queue they share). A replica that is slow, or hangs until its call's
deadline, holds only the requests it serves: the other loops keep stepping, and new requests go to
the replicas that are there to take them. Each loop has its own SpeculationController, so a replica's
step times train only its own cost model, and its in-flight decision is never mixed with another's.

One iteration of a loop:
  1. admit: requests from the front of the shared queue (first come, first served), as many as its
     replica has room for and its share of the queue (below); one chunked Prefill call: the verifier
     keeps their contexts, computes nothing yet;
  2. step: one token to each decoding request and, paced so that the controller's cost model prices
     such a step at about 2.25x one without (router/prefill_budget.py), prefill chunks of the admitted contexts in admission order
     (at most max_step_tokens in all; with no request decoding, the first
     prompt in line goes whole: there is no stream to hold back); the policies pick k per decoding
     request (the controller pricing the chunks in), the drafters are called in parallel
     (asyncio.gather), and ONE Verify call checks every proposal (k = 0 is plain decoding) and
     prefills the chunks in the same forward; a chunk that completes its context gives the request's
     first token, and the request decodes from the next step on;
  3. the emitted tokens are committed per request (stop rules applied) and streamed out;
  4. finished and cancelled requests are released in the verifier and their drafter.

A loop's share of the queue: the waiting requests split in proportion to the free slots of the
replicas that will take them soon (their own loop is between calls, or in one for less than STALL_S),
so a burst spreads over idle replicas while a hung replica takes nothing.

A replica that fails (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED) or lost its state: its requests go
back to the front of the queue and another loop re-admits them from their committed tokens (docs/design.md
section 7; router/verifiers.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import grpc

from router.controlled import NAME as CONTROLLED
from router.controller.controller import Slot, SpeculationController
from router.controller.profile import PrefillRow
from router.controller.policies import ControllerPolicy
from router.drafters import TREE_DRAFTERS, Draft, pack_parents
from router.policy import RequestOutcome, RequestView, SpeculationPolicy, StepOutcome, clamp_k
from router.prefill_budget import PrefillPacer
from router.request import RequestState
from router.verifiers import REPLICA_DOWN, STATE_LOST, VerifierReplica
from smartspec.errors import RequestError
from smartspec.sampling import pack_distributions
from smartspec.wire import verifier_pb2

if TYPE_CHECKING:
    from router.scheduler import Scheduler

log = logging.getLogger("smartspec.router.scheduler")

AUTO = "auto"  # the drafter choice that lets the controller pick one per request and step
BENCHMARK_ONLY = frozenset({CONTROLLED})  # never picked by 'auto'

# Verifier statuses that mean "this request cannot be served" rather than "the verifier is broken".
PASS_THROUGH = {"INVALID_ARGUMENT", "OUT_OF_RANGE", "RESOURCE_EXHAUSTED"}

# A replica whose loop has been in one call this long is not counted on to admit soon: the queue is
# shared among the others (a hung replica takes no new request; a slow one takes fewer).
STALL_S = 1.0


@dataclass(frozen=True)
class PrefillChunk:
    """A request's part of a step's prefill, its row as the cost model sees it."""

    request: RequestState
    row: PrefillRow
    completes: bool  # it ends the request's context: the reply carries the request's next token


@dataclass
class StepReply:
    """What the replica answered for one step: per decoding request (accepted count, emitted tokens);
    the chunks that ran, each with the request's first token when it completed its context; the
    context tokens attended."""

    results: list[tuple[int, list[int]]]
    prefilled: list[tuple[PrefillChunk, int | None]]
    context_tokens: int
    verified: list[int]  # draft tokens verified per decoding request (fewer than sent where the verifier cut an invalid one)
    handler_s: float  # the verifier's own time in its handler, of which
    forward_s: float  # the model forward


class ReplicaLoop:
    """The running batch of one verifier replica and the asyncio task that steps it."""

    def __init__(self, scheduler: Scheduler, replica: VerifierReplica, controller: SpeculationController) -> None:
        self.scheduler = scheduler
        self.replica = replica
        # Sees every step of this replica under every policy: learns its cost model and acceptance.
        self.controller = controller
        self.pacer = PrefillPacer(scheduler.max_step_tokens)  # sizes prompt chunks from the controller's cost model
        self.running: list[RequestState] = []
        self.steps = 0
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self._in_call_since: float | None = None  # monotonic start of its Prefill or Verify in flight
        # After the verifier refused a prefill for lack of sequence slots (it may serve other routers,
        # or still hold released state): admit at most this many at once, and none while `_blocked`
        # (a single request was refused) until one of ours leaves.
        self._admit_cap: int | None = None
        self._blocked = False
        # A Stats(reset=true) that arrived while a step was in flight: applied when the step ends.
        self._stepping = False
        self._reset_pending = False
        self._own_policies: dict[str, ControllerPolicy] = {}  # the controller policies, on this loop's controller
        self._invalid_drafters: set[str] = set()  # drafters whose invalid proposals were logged
        # Set when its replica, found by DNS, is gone past its grace period: the loop moves its requests
        # to the other replicas and ends (Scheduler.retire_replica).
        self.retiring = False

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run(), name=f"router-replica-{self.replica.address}")
        self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        """A loop ends when the router closes or its replica left; any other end strands its requests."""
        if not (self.scheduler.closing or self.retiring):
            error = None if task.cancelled() else task.exception()
            log.error("the step loop of verifier %s ended unexpectedly (%s)", self.replica.address, "cancelled" if task.cancelled() else error,
                      exc_info=error)

    async def run(self) -> None:
        s = self.scheduler
        while not s.closing:
            if self.retiring:
                await self._retire()
                return
            if not self.running and not self._room():
                s.note_idle()
                self.wake.clear()
                # A replica backing off is tried again when its backoff ends (to serve the queue, or
                # fail it if every replica is still down); otherwise a submit or a leaving request wakes it.
                retry = self._retry_in() if s.waiting else None
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), retry)
                continue
            try:
                await self.iterate()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not hang every client: fail the batch, keep serving
                log.exception("router step failed on verifier %s", self.replica.address)
                error = RequestError("INTERNAL", "the router failed while serving this request (see the router's log)")
                failed, self.running = self.running, []
                for request in failed:
                    request.fail(error)
                await s.release(failed)

    def _retry_in(self) -> float | None:
        wait = self.replica.retry_at - time.monotonic()
        return max(wait, 0.01) if wait > 0 else None

    def ready_soon(self, now: float) -> bool:
        """Whether this loop will admit soon: its replica takes requests (not backing off, not leaving),
        and it is between calls or in one that has not run STALL_S yet."""
        return self.replica.accepting() and (self._in_call_since is None or now - self._in_call_since < STALL_S)

    def reset_controller(self) -> None:
        """Forgets what the controller learned (so that benchmark runs start alike), between steps only:
        a step in flight reads the controller's record of its own decision when its Verify returns."""
        if self._stepping:
            self._reset_pending = True
        else:
            self._forget()

    def _forget(self) -> None:
        self.controller.reset()

    async def iterate(self) -> None:
        """One admission + one step + cleanup."""
        await self._admit()
        await self._reap()
        if self.running:
            self._stepping = True
            try:
                await self._step()
            finally:
                self._stepping = False
                if self._reset_pending:  # the step boundary: a reset asked for meanwhile applies now
                    self._reset_pending = False
                    self._forget()
            await self._reap()

    # --- admission ------------------------------------------------------------------------------
    def _room(self) -> int:
        """How many waiting requests this loop admits now: what its replica and the router-wide batch
        limit have room for, at most its share of the queue (the module's docstring)."""
        s = self.scheduler
        if not s.waiting or not self.replica.accepting() or (self._blocked and self.running):
            return 0
        free = self.replica.free
        room = min(free, s.max_batch - sum(len(loop.running) for loop in s.loops))
        if self._admit_cap is not None:
            room = min(room, self._admit_cap)
        if room <= 0:
            return 0
        now = time.monotonic()
        others = sum(max(loop.replica.free, 0) for loop in s.loops if loop is not self and loop.ready_soon(now))
        return min(room, math.ceil(len(s.waiting) * free / (free + others)))

    async def _admit(self) -> None:
        room = self._room()
        batch: list[RequestState] = []
        waiting = self.scheduler.waiting
        while waiting and len(batch) < room:
            request = waiting.popleft()
            if request.cancelled or request.done:
                self.scheduler.drop([request])
            else:
                batch.append(request)
        if batch:
            await self._prefill(batch)

    async def _prefill(self, batch: list[RequestState]) -> None:
        """Admits `batch`, chunked: the verifier keeps each context (a new request's prompt; a request
        moving from a failed replica, all its committed tokens) for the steps to prefill, and the chunk
        that completes it gives the request's next token."""
        s, replica = self.scheduler, self.replica
        now = time.perf_counter()
        new = [r for r in batch if r.first_token is None]  # the others move from a failed replica
        for request in new:
            request.admitted = now
        stale = [r.id for r in batch if r.id in replica.orphans]  # it may still hold an old copy of them
        if stale:
            replica.orphans.difference_update(stale)
            await s.verifiers.release(replica, stale, s.verifier_timeout_s)
        for request in batch:
            request.prefill_left = len(request.tokens)
        self.running.extend(batch)  # from here on a failure is theirs too; _reap releases the failed
        s.verifiers.hold(replica, batch)
        items = [verifier_pb2.PrefillItem(request_id=r.id, token_ids=r.tokens, sampling=r.params.sampling.to_wire()) for r in batch]
        self._in_call_since = time.monotonic()
        try:
            await replica.stub.Prefill(
                verifier_pb2.PrefillRequest(items=items, chunked=True), timeout=s.verifier_timeout_s, metadata=s.telemetry.rpc_metadata(batch)
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                s.verifiers.forget(batch)
                await self._requeue(batch, err)
                return
            await self._verifier_failed(batch, "prefill", err)
            return
        finally:
            self._in_call_since = None
        self._answered()
        for request in batch:
            request.failovers = 0
        self._admit_cap = None
        s.telemetry.admitted(new)

    async def _requeue(self, batch: list[RequestState], err: grpc.RpcError) -> None:
        """The verifier has no free slot for `batch`: back to the front of the queue, smaller next time."""
        self._leave(batch)
        for request in batch:
            if request.first_token is None:  # a new request waits again; a moving one keeps its times
                request.admitted = None
        self.scheduler.requeue(batch)
        level = logging.WARNING if self._admit_cap is None else logging.DEBUG  # once per episode
        log.log(level, "verifier %s full (%s); %d requests wait for a free slot", self.replica.address, err.details(), len(batch))
        self._admit_cap = max(1, len(batch) // 2)
        self._blocked = len(batch) == 1
        if not self.running:
            await asyncio.sleep(0.05)  # nothing of ours to finish first: retry shortly

    def _leave(self, requests: Sequence[RequestState]) -> None:
        leaving = set(map(id, requests))
        self.running = [r for r in self.running if id(r) not in leaving]

    # --- one step -------------------------------------------------------------------------------
    async def _step(self) -> None:
        s = self.scheduler
        started = time.perf_counter()
        batch = [r for r in self.running if not r.prefill_left]  # decoding; the others are being prefilled
        chunks = self._prefill_chunks(batch)
        self.controller.begin_step([c.row for c in chunks])
        s.telemetry.step_started(batch)
        groups = self._groups(batch)
        views, asked, drafts, draft_times = await self._speculate(batch, groups)
        if batch:
            final = [len(d) for d in drafts]
            self.controller.record([Slot(v.request_id, v.drafter, k, v.context_tokens) for v, k in zip(views, final)], final)
        verify_started = time.perf_counter()
        reply = await self._verify(batch, drafts, chunks)
        finished = time.perf_counter()
        if reply is None:  # the replica failed: its requests moved or failed
            return
        drafts = self._verified(views, drafts, reply.verified)
        self._prefilled(reply.prefilled)
        if not batch:
            return
        s.telemetry.verified(finished - verify_started, reply.handler_s, reply.forward_s)
        self.steps += 1
        accepted_counts = [accepted for accepted, _ in reply.results]
        for request, draft, (accepted, tokens) in zip(batch, drafts, reply.results):
            request.counters.steps += 1
            request.counters.proposed += len(draft)
            request.counters.accepted += accepted
            if not request.done:
                request.send(request.commit(tokens))
        for view, draft, k, (accepted, tokens) in zip(views, drafts, asked, reply.results):
            nodes = draft.accepted_nodes(tokens[:accepted]) if draft.parents else None  # which tree nodes: calibrates the drafter
            self.controller.observe_request(view.request_id, view.drafter, len(draft), accepted, asked=k, accepted_nodes=nodes)
        prefilled = [chunk.row for chunk, _ in reply.prefilled]
        self.controller.observe_step([v.context_tokens for v in views], [len(d) for d in drafts], draft_times, finished - started, prefill=prefilled)
        s.telemetry.step_finished(batch, views, asked, drafts, accepted_counts, draft_times, self.controller.last.predicted_s, finished - started)
        for policy, members in groups.items():
            policy.observe(
                StepOutcome(
                    requests=tuple(
                        RequestOutcome(views[i].request_id, views[i].drafter, asked[i], len(drafts[i]), accepted_counts[i], views[i].context_tokens)
                        for i in members
                    ),
                    num_sequences=len(batch),
                    new_tokens=sum(len(d) + 1 for d in drafts),
                    context_tokens=reply.context_tokens,
                    verify_s=finished - verify_started,
                    step_s=finished - started,
                    drafts=draft_times,
                    prefill_tokens=sum(row.tokens for row in prefilled),
                )
            )

    def _prefill_chunks(self, batch: Sequence[RequestState]) -> list[PrefillChunk]:
        """This step's prefill chunks beside the decoding `batch`, paced by router/prefill_budget.py
        (the simulator paces the same way)."""
        prefilling = [r for r in self.running if r.prefill_left]
        cached = [len(r.tokens) - r.prefill_left for r in prefilling]
        price = self.controller.prefill_pricer([len(r.tokens) for r in batch], cached)
        sizes = self.pacer.plan(len(batch), [r.prefill_left for r in prefilling], price)
        return [PrefillChunk(r, PrefillRow(cached=c, tokens=n), completes=n == r.prefill_left) for r, c, n in zip(prefilling, cached, sizes) if n]

    async def _speculate(
        self, batch: Sequence[RequestState], groups: dict[SpeculationPolicy, list[int]]
    ) -> tuple[list[RequestView], list[int], list[Draft], dict[str, tuple[tuple[int, ...], float]]]:
        """Each decoding request's drafter and k (its policy's choice, clamped to its room) and the
        drafters' proposals (`groups`: the batch's indices by policy). Returns the views, the ks asked
        of the drafters, the drafts to verify and, per drafter called, its ks and wall time."""
        assigned = [self._drafter_for(r) for r in batch]
        views = self._views(batch, assigned)
        asked = [0] * len(batch)
        for policy, members in groups.items():
            for i, k in zip(members, policy.choose([views[i] for i in members])):
                asked[i] = clamp_k(k, views[i].max_k)
        proposals, draft_times = await self._propose(batch, assigned, asked)
        for view, proposal in zip(views, proposals):
            if proposal.parents:  # a token tree: the controller estimates its E(k) from the drafter's probabilities
                self.controller.observe_tree(view.request_id, view.drafter, proposal.parents, proposal.probs)
        final = [0] * len(batch)
        for policy, members in groups.items():
            refined = policy.refine([views[i] for i in members], [asked[i] for i in members], [len(proposals[i]) for i in members])
            for i, k in zip(members, refined):
                final[i] = clamp_k(k, min(asked[i], len(proposals[i])))
        drafts = [proposal.cut(k) for proposal, k in zip(proposals, final)]
        return views, asked, drafts, draft_times

    def _verified(self, views: Sequence[RequestView], drafts: Sequence[Draft], verified: Sequence[int]) -> list[Draft]:
        """The drafts as the verifier took them: a proposal it cut at an invalid token counts as that
        much shorter (for the counters, the acceptance estimates and the cost model alike). A drafter
        that sends invalid tokens is logged once per loop."""
        cut = [draft.cut(n) if n < len(draft) else draft for draft, n in zip(drafts, verified)]
        for view, draft, n in zip(views, drafts, verified):
            if n < len(draft) and view.drafter not in self._invalid_drafters:
                self._invalid_drafters.add(view.drafter)
                log.warning("drafter %s proposed an invalid token (id outside the vocabulary, or an impossible distribution) "
                            "for request %s: the verifier cut that proposal; further cuts are not logged", view.drafter, view.request_id)
        return cut

    def _prefilled(self, prefilled: Sequence[tuple[PrefillChunk, int | None]]) -> None:
        """The chunks that ran: their requests' contexts advance, and one whose context is complete
        streams its first token (its TTFT) and decodes from the next step on."""
        for chunk, token in prefilled:
            chunk.request.prefill_left -= chunk.row.tokens
            if token is not None and not chunk.request.done:
                chunk.request.send(chunk.request.commit([token]))

    async def _verify(self, batch: Sequence[RequestState], drafts: Sequence[Draft], chunks: Sequence[PrefillChunk]) -> StepReply | None:
        """The step's one Verify: the decoding requests' proposals and the prefill chunks, in one
        forward. None when the replica failed (its requests then moved, or failed)."""
        s = self.scheduler
        requests = [*batch, *(chunk.request for chunk in chunks)]
        self._in_call_since = time.monotonic()
        try:
            reply = await self.replica.stub.Verify(
                verify_message(batch, drafts, chunks), timeout=s.verifier_timeout_s, metadata=s.telemetry.rpc_metadata(requests)
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                await self._preempt(requests, err)
            else:
                await self._verifier_failed(requests, "verify", err)
            return None
        finally:
            self._in_call_since = None
        self._answered()
        emitted, firsts = list(reply.emitted_token_ids), list(reply.prefill_next_token_ids)
        verified = list(reply.verified_draft_counts)
        completing = sum(chunk.completes for chunk in chunks)
        if (len(reply.accepted_counts) != len(batch) or len(verified) != len(batch)
                or len(emitted) != sum(reply.accepted_counts) + len(batch) or len(firsts) != completing):
            raise RuntimeError(
                f"verifier answered {len(reply.accepted_counts)} counts, {len(verified)} verified counts, {len(emitted)} tokens "
                f"and {len(firsts)} first tokens for {len(batch)} requests and {completing} completed prefills"
            )
        results, start = [], 0
        for accepted in reply.accepted_counts:
            results.append((accepted, emitted[start : start + accepted + 1]))
            start += accepted + 1
        first = iter(firsts)
        prefilled = [(chunk, next(first) if chunk.completes else None) for chunk in chunks]
        return StepReply(results, prefilled, reply.stats.num_context_tokens, verified, reply.stats.handler_s, reply.stats.forward_s)

    # --- verifier failures ----------------------------------------------------------------------
    async def _verifier_failed(self, batch: list[RequestState], what: str, err: grpc.RpcError) -> None:
        """A Prefill or Verify on this replica failed. If the replica is down and another can take
        over, or if it lost the requests' state, the requests are re-admitted from their committed
        tokens (at the front of the queue, by whichever loop has room first); otherwise they fail with
        the verifier's error."""
        s, replica = self.scheduler, self.replica
        code = err.code()
        # A request that moved through every replica without progress fails rather than bouncing on.
        limit = len(s.verifiers.replicas)
        stuck = [r for r in batch if r.failovers >= limit]
        if stuck:
            error = verifier_error(what, err)
            for request in stuck:
                request.fail(error)  # still running: reaped and released like any failed request
            batch = [r for r in batch if r.failovers < limit]
        if code in REPLICA_DOWN and s.verifiers.any_available(besides=replica):
            s.verifiers.mark_down(replica, f"{code.name}: {err.details()}", batch)
            if not batch:
                return
        elif code in STATE_LOST:
            log.warning("verifier %s lost state (%s); re-admitting %d requests", replica.address, err.details(), len(batch))
            await s.verifiers.release(replica, [r.id for r in batch], s.verifier_timeout_s)
        else:
            if code in REPLICA_DOWN:
                s.verifiers.mark_down(replica, f"{code.name}: {err.details()}", batch)
            error = verifier_error(what, err)
            for request in batch:
                request.fail(error)
            return
        self._move(batch, failed=True)

    def _move(self, batch: list[RequestState], failed: bool) -> None:
        """`batch` leaves this replica for the front of the queue, to be re-admitted elsewhere from its
        committed tokens; a request that ended meanwhile is dropped instead. A failed replica counts
        against each request's failovers (a request that fails on every replica stops bouncing)."""
        s = self.scheduler
        s.verifiers.forget(batch)
        self._leave(batch)
        moving = []
        for request in batch:
            if request.done or request.cancelled:
                s.drop([request])
            else:
                request.failovers += int(failed)
                moving.append(request)
        s.requeue(moving)

    async def _retire(self) -> None:
        """The replica's grace period is over: its requests move to the other replicas (re-prefilled,
        token-exact), what it holds is released if it still answers, and the scheduler forgets it."""
        s = self.scheduler
        held = [*self.running]
        log.info("verifier %s left: %d of its requests move to another replica", self.replica.address, len(held))
        s.moved += len(held)
        self._move(held, failed=False)
        leftovers = [*self.replica.holding, *self.replica.orphans, *(r.id for r in held)]
        s.retired(self, leftovers)

    async def _preempt(self, batch: list[RequestState], err: grpc.RpcError) -> None:
        """The replica's KV cache cannot hold this step (nothing was changed there): the newest request
        leaves it and waits at the front of the queue; it is re-admitted from its committed tokens, token
        for token, once there is room. The others step again next iteration without it."""
        s = self.scheduler
        newest = max(batch, key=lambda r: (r.admitted if r.admitted is not None else float("inf"), r.id))
        s.preemptions += 1
        self._blocked = True  # it waits for one of ours to leave: re-admitted at once, it would be preempted again
        log.info("verifier %s: %s; preempting request %s (%d tokens)", self.replica.address, err.details(), newest.id, len(newest.tokens))
        self._leave([newest])
        await s.verifiers.release(self.replica, [newest.id], s.verifier_timeout_s)
        s.verifiers.forget([newest])
        s.requeue([newest])

    def _answered(self) -> None:
        """The replica answered: release, in the background, what it may still hold of moved requests."""
        s = self.scheduler
        orphans = s.verifiers.answered(self.replica)
        if orphans:
            s.in_background(s.verifiers.release(self.replica, orphans, s.verifier_timeout_s))

    # --- speculation inputs ---------------------------------------------------------------------
    def _drafter_for(self, request: RequestState) -> str:
        """This step's drafter: the request's own, or for 'auto' the controller's pick among the
        healthy drafter services; 'none' when it has none or it is backing off."""
        drafters, name = self.scheduler.drafters, request.params.drafter
        if name == AUTO:
            usable = [
                n for n, d in drafters.items()
                if n not in BENCHMARK_ONLY and d.available() and (request.params.sampling.greedy or n not in TREE_DRAFTERS)
            ]
            return self.controller.choose_drafter(request.id, usable, request.draft_room(self.scheduler.limits.max_context), len(request.tokens))
        drafter = drafters.get(name)
        return name if drafter is not None and drafter.available() else "none"

    def _views(self, batch: Sequence[RequestState], assigned: Sequence[str]) -> list[RequestView]:
        """What the policies see; a request whose drafter is missing or backing off has drafter 'none'."""
        max_context = self.scheduler.limits.max_context
        return [
            RequestView(
                request_id=r.id,
                drafter=drafter,
                context_tokens=len(r.tokens),
                generated=r.generated,
                max_k=r.draft_room(max_context) if drafter != "none" else 0,
                steps=r.counters.steps,
                proposed=r.counters.proposed,
                accepted=r.counters.accepted,
            )
            for r, drafter in zip(batch, assigned)
        ]

    def _policy(self, request: RequestState) -> SpeculationPolicy:
        """The request's policy; a controller policy decides on this replica's controller (the
        registry's instances are bound to the first replica's)."""
        policy = request.params.policy
        if isinstance(policy, ControllerPolicy) and policy.controller is not self.controller:
            if policy.mode not in self._own_policies:
                self._own_policies[policy.mode] = ControllerPolicy(self.controller, policy.mode)
            return self._own_policies[policy.mode]
        return policy

    def _groups(self, batch: Sequence[RequestState]) -> dict[SpeculationPolicy, list[int]]:
        groups: dict[SpeculationPolicy, list[int]] = collections.defaultdict(list)
        for i, request in enumerate(batch):
            groups[self._policy(request)].append(i)
        return groups

    async def _propose(
        self, batch: Sequence[RequestState], assigned: Sequence[str], ks: Sequence[int]
    ) -> tuple[list[Draft], dict[str, tuple[tuple[int, ...], float]]]:
        """Calls every drafter that has work, in parallel. Returns each request's proposal (cut to its k;
        empty when it asked for none or its drafter failed) and, per drafter called, the ks asked of it
        and its wall time. Token ids and distributions are checked once, by the verifier, which cuts a
        proposal at its first invalid token (`cut_invalid_drafts`)."""
        drafters = self.scheduler.drafters
        by_drafter: dict[str, list[int]] = collections.defaultdict(list)
        for i, (name, k) in enumerate(zip(assigned, ks)):
            if k > 0:
                by_drafter[name].append(i)
        names = list(by_drafter)
        results = await asyncio.gather(*(drafters[n].propose([batch[i] for i in by_drafter[n]], [ks[i] for i in by_drafter[n]]) for n in names))
        proposals = [Draft() for _ in batch]
        times: dict[str, tuple[tuple[int, ...], float]] = {}
        for name, (drafted, seconds) in zip(names, results):
            times[name] = (tuple(ks[i] for i in by_drafter[name]), seconds)
            for i, proposal in zip(by_drafter[name], drafted):
                proposals[i] = proposal.cut(ks[i])
        return proposals, times

    # --- cleanup --------------------------------------------------------------------------------
    async def _reap(self) -> None:
        gone = [r for r in self.running if r.done or r.cancelled]
        if gone:
            self._leave(gone)
            self._blocked = False
            await self.scheduler.release(gone)
            self.scheduler.wake()  # room under the router-wide batch limit: any loop may admit


def verify_message(batch: Sequence[RequestState], drafts: Sequence[Draft], chunks: Sequence[PrefillChunk]) -> verifier_pb2.VerifyRequest:
    """The wire form of one replica's step: ragged drafts, flat, in request order, and the prefill
    chunks as (request, token count) pairs."""
    return verifier_pb2.VerifyRequest(
        request_ids=[r.id for r in batch],
        draft_counts=[len(d) for d in drafts],
        draft_token_ids=[t for d in drafts for t in d.tokens],
        draft_distributions=pack_distributions([d.dists for d in drafts]),
        draft_parents=pack_parents(drafts),
        prefill_request_ids=[chunk.request.id for chunk in chunks],
        prefill_counts=[chunk.row.tokens for chunk in chunks],
        cut_invalid_drafts=True,
    )


def verifier_error(what: str, err: grpc.RpcError) -> RequestError:
    code = err.code().name if err.code() is not None else "UNKNOWN"
    if code in PASS_THROUGH:
        return RequestError(code, err.details() or f"the verifier refused the {what}")
    if err.code() in REPLICA_DOWN:
        return RequestError("UNAVAILABLE", f"the verifier did not answer the {what} ({code}: {err.details()}); retry later")
    return RequestError("INTERNAL", f"the verifier failed the {what} ({code}: {err.details()})")
