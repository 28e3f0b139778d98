"""Continuous batching: requests join and leave the running batch between steps.

One loop iteration:
  1. admit: waiting requests (up to the batch limit, first come first served) are admitted, one
     chunked Prefill call per verifier replica: the verifier keeps their contexts, computes nothing yet;
  2. step: a token budget (max_step_tokens) gives one token to each decoding request and the rest to
     prefill chunks of the admitted contexts in admission order (with no request decoding, the first
     prompt in line goes whole: there is no stream to hold back); the policies pick k per decoding
     request (the controller pricing the chunks in), the drafters are called in parallel
     (asyncio.gather), and ONE Verify call per replica checks every proposal (k = 0 is plain decoding)
     and prefills the chunks in the same forward; a chunk that completes its context gives the
     request's first token, and the request decodes from the next step on;
  3. the emitted tokens are committed per request (stop rules applied) and streamed out;
  4. finished and cancelled requests are released in the verifier and their drafter.

So a long prompt never stalls the running requests for its whole prefill: each step carries at most
a budget's worth of it (docs/engine.md, "Chunked prefill").
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import grpc

from router.controlled import NAME as CONTROLLED
from router.controller.controller import PrefillRow, Slot, SpeculationController
from router.drafters import TREE_DRAFTERS, Draft, DrafterClient, pack_parents
from router.policy import RequestOutcome, RequestView, SpeculationPolicy, StepOutcome, clamp_k
from router.request import RequestState
from router.verifiers import REPLICA_DOWN, STATE_LOST, VerifierPool, VerifierReplica
from router.telemetry import RouterTelemetry
from smartspec.errors import RequestError
from smartspec.sampling import pack_distributions
from smartspec.wire import verifier_pb2, verifier_pb2_grpc

log = logging.getLogger("smartspec.router.scheduler")

AUTO = "auto"  # the drafter choice that lets the controller pick one per request and step
BENCHMARK_ONLY = frozenset({CONTROLLED})  # never picked by 'auto'

# Verifier statuses that mean "this request cannot be served" rather than "the verifier is broken".
PASS_THROUGH = {"INVALID_ARGUMENT", "OUT_OF_RANGE", "RESOURCE_EXHAUSTED"}

# A step's token budget (--max-step-tokens): one token per decoding request, the rest for prefill
# chunks, so that running streams slow down, never stall, while a prompt is prefilled. On one core of
# the reference CPU a decode step of 8 requests costs ~170 ms and a prefill token ~4 ms: 40 prefill
# tokens beside 8 decoding keep such a step near 2x a decode step (docs/engine.md, "Chunked prefill").
# A GPU affords far more: a few thousand.
DEFAULT_MAX_STEP_TOKENS = 48
# However many requests decode, a prefill advances at least this many tokens a step.
MIN_PREFILL_TOKENS = 16


@dataclass(frozen=True)
class PrefillChunk:
    """A request's part of a step's prefill, its row as the cost model sees it."""

    request: RequestState
    row: PrefillRow
    completes: bool  # it ends the request's context: the reply carries the request's next token


@dataclass
class StepReply:
    """What the replicas answered for one step: per decoding request (accepted count, emitted tokens),
    or None where its replica failed (the request then moved or failed); the chunks that ran, each
    with the request's first token when it completed its context; the context tokens attended."""

    results: list[tuple[int, list[int]] | None]
    prefilled: list[tuple[PrefillChunk, int | None]]
    context_tokens: int


@dataclass(frozen=True)
class Limits:
    """What the router learns from the verifier's Info."""

    max_context: int
    vocab_size: int
    eos_ids: frozenset[int]
    max_sequences: int


class Scheduler:
    """Owns the admission queue and the running batch; runs the step loop as one asyncio task."""

    def __init__(
        self,
        verifier: verifier_pb2_grpc.VerifierServiceStub | VerifierPool,
        drafters: dict[str, DrafterClient],
        limits: Limits,
        max_batch: int = 16,
        max_queue: int = 64,
        verifier_timeout_s: float = 120.0,
        controller: SpeculationController | None = None,
        telemetry: RouterTelemetry | None = None,
        max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS,
    ) -> None:
        # One or more verifier replicas; a bare stub is a pool of one (limits.max_sequences slots).
        self.verifiers = verifier if isinstance(verifier, VerifierPool) else VerifierPool([VerifierReplica("verifier", verifier, limits.max_sequences)])
        self.telemetry = telemetry or RouterTelemetry()  # traces and metrics; off by default
        # Sees every step under every policy: learns the cost model and acceptance, measures its error.
        self.controller = controller or SpeculationController()
        self.drafters = drafters
        self.limits = limits
        self.max_batch = max(1, min(max_batch, self.verifiers.capacity))
        if max_step_tokens < 1:
            raise ValueError(f"max_step_tokens must be at least 1 (got {max_step_tokens})")
        self.max_step_tokens = max_step_tokens
        self.max_queue = max_queue
        self.verifier_timeout_s = verifier_timeout_s
        self.waiting: collections.deque[RequestState] = collections.deque()
        self.running: list[RequestState] = []
        self.steps = 0
        self.preemptions = 0  # requests sent back to the queue because the verifier's KV cache was full
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._idle = asyncio.Event()
        self.draining = False
        self._closing = False
        # After the verifier refused a prefill for lack of sequence slots (it may serve other routers,
        # or still hold released state): admit at most this many at once, and none while `_blocked`
        # (a single request was refused) until one of ours leaves.
        self._admit_cap: int | None = None
        self._blocked = False
        # A Stats(reset=true) that arrived while a step was in flight: applied when the step ends.
        self._stepping = False
        self._reset_pending = False

    # --- called by RPC handlers -----------------------------------------------------------------
    def submit(self, request: RequestState) -> None:
        """Queues a request for admission, or refuses it at once when the queue is full."""
        if self.draining:
            raise RequestError("UNAVAILABLE", "the router is shutting down; retry on another router")
        if len(self.waiting) >= self.max_queue:
            raise RequestError(
                "RESOURCE_EXHAUSTED",
                f"the router is overloaded: {len(self.waiting)} requests already wait for admission (limit {self.max_queue}); retry later",
            )
        self.waiting.append(request)
        self._wake.set()

    def reset_controller(self) -> None:
        """Forgets what the controller learned (Stats(reset=true)), between steps only: a step in
        flight reads the controller's record of its own decision when its Verify returns."""
        if self._stepping:
            self._reset_pending = True
        else:
            self.controller.reset()

    def cancel(self, request: RequestState) -> None:
        """The client went away: drop a waiting request now, a running one at the next step boundary."""
        request.cancelled = True
        if request in self.waiting:
            self.waiting.remove(request)
            self._drop([request])  # it may have run before (moved off a failed replica): free what it holds
        self._wake.set()

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="router-scheduler")

    async def drain(self, timeout_s: float) -> None:
        """Refuses new requests, lets the admitted and waiting ones finish for up to `timeout_s`
        seconds, then closes."""
        self.draining = True
        if self.waiting or self.running:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout_s)
            except asyncio.TimeoutError:
                log.warning("shutdown: %d requests still unfinished after %.1fs", len(self.waiting) + len(self.running), timeout_s)
        await self.close()

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stops the loop after its current iteration (cancelling it only past `timeout_s`, so a step's
        releases are not cut short); every unfinished request fails with UNAVAILABLE and is released."""
        self._closing = self.draining = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except asyncio.TimeoutError:
                self._task.cancel()
                try:
                    await self._task
                except asyncio.CancelledError:
                    pass
        error = RequestError("UNAVAILABLE", "the router is shutting down")
        for request in [*self.waiting, *self.running]:
            request.fail(error)
        self.waiting.clear()
        await self._release(self.running)
        self.running = []

    async def run(self) -> None:
        while not self._closing:
            if not self.waiting and not self.running:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self.iterate()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not hang every client: fail the batch, keep serving
                log.exception("router step failed")
                error = RequestError("INTERNAL", "the router failed while serving this request (see the router's log)")
                for request in self.running:
                    request.fail(error)
                await self._release(self.running)
                self.running = []

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
                    self.controller.reset()
            await self._reap()

    # --- admission ------------------------------------------------------------------------------
    async def _admit(self) -> None:
        if self._blocked and self.running:
            return
        room = self.max_batch - len(self.running)
        if self._admit_cap is not None:
            room = min(room, self._admit_cap)
        batch: list[RequestState] = []
        while self.waiting and len(batch) < room:
            request = self.waiting.popleft()
            if request.cancelled or request.done:
                self._drop([request])
            else:
                batch.append(request)
        if not batch:
            return
        groups, no_room = self.verifiers.place(batch)
        for request in reversed(no_room):
            self.waiting.appendleft(request)
        if not groups:
            # Every replica is backing off after a failure (the next Prefill tries it again, and fails
            # these requests if it is still down) or full (one of ours leaves soon): wait, not spin.
            await asyncio.sleep(max(0.01, self.verifiers.seconds_until_available()))
            return
        await asyncio.gather(*(self._prefill(replica, group) for replica, group in groups.items()))

    async def _prefill(self, replica: VerifierReplica, batch: list[RequestState]) -> None:
        """Admits `batch` on one replica, chunked: the verifier keeps each context (a new request's
        prompt; a request moving from a failed replica, all its committed tokens) for the steps to
        prefill, and the chunk that completes it gives the request's next token."""
        now = time.perf_counter()
        new = [r for r in batch if r.first_token is None]  # the others move from a failed replica
        for request in new:
            request.admitted = now
        stale = [r.id for r in batch if r.id in replica.orphans]  # it may still hold an old copy of them
        if stale:
            replica.orphans.difference_update(stale)
            await self.verifiers.release(replica, stale, self.verifier_timeout_s)
        for request in batch:
            request.prefill_left = len(request.tokens)
        self.running.extend(batch)  # from here on a failure is theirs too; _reap releases the failed
        self.verifiers.hold(replica, batch)
        items = [verifier_pb2.PrefillItem(request_id=r.id, token_ids=r.tokens, sampling=r.params.sampling.to_wire()) for r in batch]
        try:
            await replica.stub.Prefill(
                verifier_pb2.PrefillRequest(items=items, chunked=True), timeout=self.verifier_timeout_s, metadata=self.telemetry.rpc_metadata(batch)
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.verifiers.forget(batch)
                await self._requeue(batch, err)
                return
            await self._verifier_failed(replica, batch, "prefill", err)
            return
        self._answered(replica)
        for request in batch:
            request.failovers = 0
        self._admit_cap = None
        self.telemetry.admitted(new)

    async def _requeue(self, batch: list[RequestState], err: grpc.RpcError) -> None:
        """The verifier has no free slot for `batch`: back to the front of the queue, smaller next time."""
        self.running = [r for r in self.running if r not in batch]
        for request in reversed(batch):
            if request.first_token is None:  # a new request waits again; a moving one keeps its times
                request.admitted = None
            self.waiting.appendleft(request)
        level = logging.WARNING if self._admit_cap is None else logging.DEBUG  # once per episode
        log.log(level, "verifier full (%s); %d requests wait for a free slot", err.details(), len(batch))
        self._admit_cap = max(1, len(batch) // 2)
        self._blocked = len(batch) == 1
        if not self.running:
            await asyncio.sleep(0.05)  # nothing of ours to finish first: retry shortly

    # --- one step -------------------------------------------------------------------------------
    async def _step(self) -> None:
        started = time.perf_counter()
        batch = [r for r in self.running if not r.prefill_left]  # decoding; the others are being prefilled
        chunks = self._prefill_chunks(len(batch))
        self.controller.begin_step([c.row for c in chunks])
        self.telemetry.step_started(batch)
        views, asked, drafts, draft_times = await self._speculate(batch)
        if batch:
            final = [len(d) for d in drafts]
            self.controller.record([Slot(v.request_id, v.drafter, k, v.context_tokens) for v, k in zip(views, final)], final)
        verify_started = time.perf_counter()
        reply = await self._verify(batch, drafts, chunks)
        finished = time.perf_counter()
        self._prefilled(reply.prefilled)
        results = reply.results
        verified = [i for i, result in enumerate(results) if result is not None]  # the others failed or moved
        if not verified:
            return
        self.steps += 1
        batch, drafts, views, asked = ([xs[i] for i in verified] for xs in (batch, drafts, views, asked))
        accepted_counts = [results[i][0] for i in verified]
        for request, draft, i in zip(batch, drafts, verified):
            accepted, tokens = results[i]
            request.counters.steps += 1
            request.counters.proposed += len(draft)
            request.counters.accepted += accepted
            if not request.done:
                request.send(request.commit(tokens))
        for view, draft, i, k in zip(views, drafts, verified, asked):
            accepted, tokens = results[i]
            nodes = draft.accepted_nodes(tokens[:accepted]) if draft.parents else None  # which tree nodes: calibrates the drafter
            self.controller.observe_request(view.request_id, view.drafter, len(draft), accepted, asked=k, accepted_nodes=nodes)
        prefilled = [chunk.row for chunk, _ in reply.prefilled]
        self.controller.observe_step([v.context_tokens for v in views], [len(d) for d in drafts], draft_times, finished - started, prefill=prefilled)
        self.telemetry.step_finished(batch, views, asked, drafts, accepted_counts, draft_times, self.controller.last.predicted_s, finished - started)
        for policy, members in self._groups(batch).items():
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

    def _prefill_chunks(self, decoding: int) -> list[PrefillChunk]:
        """This step's prefill: what the token budget leaves after one token per decoding request (at
        least MIN_PREFILL_TOKENS), given to the requests being prefilled in admission order (first come,
        first served). With no request decoding there is no stream to hold back, so the first prompt in
        line goes whole (the others would wait for it anyway), in one forward rather than a step per chunk."""
        room = max(self.max_step_tokens - decoding, MIN_PREFILL_TOKENS)
        if not decoding:
            room = max(room, next((r.prefill_left for r in self.running if r.prefill_left), 0))
        chunks: list[PrefillChunk] = []
        for request in self.running:
            if request.prefill_left and room > 0:
                row = PrefillRow(cached=len(request.tokens) - request.prefill_left, tokens=min(request.prefill_left, room))
                chunks.append(PrefillChunk(request, row, completes=row.tokens == request.prefill_left))
                room -= row.tokens
        return chunks

    async def _speculate(
        self, batch: Sequence[RequestState]
    ) -> tuple[list[RequestView], list[int], list[Draft], dict[str, tuple[tuple[int, ...], float]]]:
        """Each decoding request's drafter and k (its policy's choice, clamped to its room) and the
        drafters' proposals. Returns the views, the ks asked of the drafters, the drafts to verify and,
        per drafter called, its ks and wall time."""
        assigned = [self._drafter_for(r) for r in batch]
        views = self._views(batch, assigned)
        groups = self._groups(batch)
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

    def _prefilled(self, prefilled: Sequence[tuple[PrefillChunk, int | None]]) -> None:
        """The chunks that ran: their requests' contexts advance, and one whose context is complete
        streams its first token (its TTFT) and decodes from the next step on."""
        for chunk, token in prefilled:
            chunk.request.prefill_left -= chunk.row.tokens
            if token is not None and not chunk.request.done:
                chunk.request.send(chunk.request.commit([token]))

    async def _verify(self, batch: Sequence[RequestState], drafts: Sequence[Draft], chunks: Sequence[PrefillChunk]) -> StepReply:
        """One Verify per replica, in parallel: its requests' proposals and its share of the prefill
        chunks, in one forward."""
        decoding: dict[str, list[int]] = collections.defaultdict(list)
        prefilling: dict[str, list[PrefillChunk]] = collections.defaultdict(list)
        for i, request in enumerate(batch):
            decoding[request.verifier].append(i)
        for chunk in chunks:
            prefilling[chunk.request.verifier].append(chunk)
        addresses = list(dict.fromkeys([*decoding, *prefilling]))
        replies = await asyncio.gather(
            *(
                self._verify_on(self.verifiers[a], [batch[i] for i in decoding[a]], [drafts[i] for i in decoding[a]], prefilling[a])
                for a in addresses
            )
        )
        step = StepReply([None] * len(batch), [], 0)
        for address, reply in zip(addresses, replies):
            if reply is None:
                continue
            members, mine = decoding[address], prefilling[address]
            emitted, firsts = list(reply.emitted_token_ids), list(reply.prefill_next_token_ids)
            completing = sum(chunk.completes for chunk in mine)
            if len(reply.accepted_counts) != len(members) or len(emitted) != sum(reply.accepted_counts) + len(members) or len(firsts) != completing:
                raise RuntimeError(
                    f"verifier answered {len(reply.accepted_counts)} counts, {len(emitted)} tokens and {len(firsts)} first tokens "
                    f"for {len(members)} requests and {completing} completed prefills"
                )
            step.context_tokens += reply.stats.num_context_tokens
            start = 0
            for i, accepted in zip(members, reply.accepted_counts):
                step.results[i] = (accepted, emitted[start : start + accepted + 1])
                start += accepted + 1
            first = iter(firsts)
            step.prefilled += [(chunk, next(first) if chunk.completes else None) for chunk in mine]
        return step

    async def _verify_on(
        self, replica: VerifierReplica, batch: list[RequestState], drafts: list[Draft], chunks: list[PrefillChunk]
    ) -> verifier_pb2.VerifyResponse | None:
        requests = [*batch, *(chunk.request for chunk in chunks)]
        try:
            reply = await replica.stub.Verify(
                verify_message(batch, drafts, chunks), timeout=self.verifier_timeout_s, metadata=self.telemetry.rpc_metadata(requests)
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                await self._preempt(replica, requests, err)
            else:
                await self._verifier_failed(replica, requests, "verify", err)
            return None
        self._answered(replica)
        return reply

    # --- verifier failures ----------------------------------------------------------------------
    async def _verifier_failed(self, replica: VerifierReplica, batch: list[RequestState], what: str, err: grpc.RpcError) -> None:
        """A Prefill or Verify on `replica` failed. If the replica is down and another can take over,
        or if it lost the requests' state, the requests are re-admitted from their committed tokens
        (at the front of the queue); otherwise they fail with the verifier's error."""
        code = err.code()
        # A request that moved through every replica without progress fails rather than bouncing on.
        limit = len(self.verifiers.replicas)
        stuck = [r for r in batch if r.failovers >= limit]
        if stuck:
            error = _verifier_error(what, err)
            for request in stuck:
                request.fail(error)  # still running: reaped and released like any failed request
            batch = [r for r in batch if r.failovers < limit]
        if code in REPLICA_DOWN and self.verifiers.any_available(besides=replica):
            self.verifiers.mark_down(replica, f"{code.name}: {err.details()}", batch)
            if not batch:
                return
        elif code in STATE_LOST:
            log.warning("verifier %s lost state (%s); re-admitting %d requests", replica.address, err.details(), len(batch))
            await self.verifiers.release(replica, [r.id for r in batch], self.verifier_timeout_s)
        else:
            if code in REPLICA_DOWN:
                self.verifiers.mark_down(replica, f"{code.name}: {err.details()}", batch)
            error = _verifier_error(what, err)
            for request in batch:
                request.fail(error)
            return
        self.verifiers.forget(batch)
        moving = set(map(id, batch))
        self.running = [r for r in self.running if id(r) not in moving]
        for request in reversed(batch):
            if request.done or request.cancelled:
                self._drop([request])
            else:
                request.failovers += 1
                self.waiting.appendleft(request)
        self._wake.set()

    async def _preempt(self, replica: VerifierReplica, batch: list[RequestState], err: grpc.RpcError) -> None:
        """The replica's KV cache cannot hold this step (nothing was changed there): the newest request
        leaves it and waits at the front of the queue; it is re-admitted from its committed tokens, token
        for token, once there is room. The others step again next iteration without it."""
        newest = max(batch, key=lambda r: (r.admitted if r.admitted is not None else float("inf"), r.id))
        self.preemptions += 1
        self._blocked = True  # it waits for one of ours to leave: re-admitted at once, it would be preempted again
        log.info("verifier %s: %s; preempting request %s (%d tokens)", replica.address, err.details(), newest.id, len(newest.tokens))
        self.running = [r for r in self.running if r is not newest]
        await self.verifiers.release(replica, [newest.id], self.verifier_timeout_s)
        self.verifiers.forget([newest])
        self.waiting.appendleft(newest)
        self._wake.set()

    def _answered(self, replica: VerifierReplica) -> None:
        """The replica answered: release, in the background, what it may still hold of moved requests."""
        orphans = self.verifiers.answered(replica)
        if orphans:
            self._in_background(self.verifiers.release(replica, orphans, self.verifier_timeout_s))

    def _drafter_for(self, request: RequestState) -> str:
        """This step's drafter: the request's own, or for 'auto' the controller's pick among the
        healthy drafter services; 'none' when it has none or it is backing off."""
        name = request.params.drafter
        if name == AUTO:
            usable = [
                n for n, d in self.drafters.items()
                if n not in BENCHMARK_ONLY and d.available() and (request.params.sampling.greedy or n not in TREE_DRAFTERS)
            ]
            return self.controller.choose_drafter(request.id, usable, request.draft_room(self.limits.max_context), len(request.tokens))
        drafter = self.drafters.get(name)
        return name if drafter is not None and drafter.available() else "none"

    def _views(self, batch: Sequence[RequestState], assigned: Sequence[str]) -> list[RequestView]:
        """What the policies see; a request whose drafter is missing or backing off has drafter 'none'."""
        return [
            RequestView(
                request_id=r.id,
                drafter=drafter,
                context_tokens=len(r.tokens),
                generated=r.generated,
                max_k=r.draft_room(self.limits.max_context) if drafter != "none" else 0,
                steps=r.counters.steps,
                proposed=r.counters.proposed,
                accepted=r.counters.accepted,
            )
            for r, drafter in zip(batch, assigned)
        ]

    @staticmethod
    def _groups(batch: Sequence[RequestState]) -> dict[SpeculationPolicy, list[int]]:
        groups: dict[SpeculationPolicy, list[int]] = collections.defaultdict(list)
        for i, request in enumerate(batch):
            groups[request.params.policy].append(i)
        return groups

    async def _propose(
        self, batch: Sequence[RequestState], assigned: Sequence[str], ks: Sequence[int]
    ) -> tuple[list[Draft], dict[str, tuple[tuple[int, ...], float]]]:
        """Calls every drafter that has work, in parallel. Returns each request's proposal (cut to its k
        and to valid token ids; empty when it asked for none or its drafter failed) and, per drafter
        called, the ks asked of it and its wall time."""
        by_drafter: dict[str, list[int]] = collections.defaultdict(list)
        for i, (name, k) in enumerate(zip(assigned, ks)):
            if k > 0:
                by_drafter[name].append(i)
        names = list(by_drafter)
        results = await asyncio.gather(
            *(self.drafters[n].propose([batch[i] for i in by_drafter[n]], [ks[i] for i in by_drafter[n]]) for n in names)
        )
        proposals = [Draft() for _ in batch]
        times: dict[str, tuple[tuple[int, ...], float]] = {}
        for name, (drafted, seconds) in zip(names, results):
            times[name] = (tuple(ks[i] for i in by_drafter[name]), seconds)
            for i, proposal in zip(by_drafter[name], drafted):
                proposals[i] = _valid_prefix(proposal.cut(ks[i]), self.limits.vocab_size)
        return proposals, times

    # --- cleanup --------------------------------------------------------------------------------
    async def _reap(self) -> None:
        gone = [r for r in self.running if r.done or r.cancelled]
        if gone:
            self.running = [r for r in self.running if not (r.done or r.cancelled)]
            self._blocked = False
            await self._release(gone)

    async def _release(self, requests: Iterable[RequestState]) -> None:
        """Frees state in the verifier (awaited: its slots are needed for the next admission) and in
        drafters (in the background: nothing waits on them)."""
        requests = list(requests)
        if not requests:
            return
        for request in requests:
            request.params.policy.forget(request.id)
            self.controller.forget(request.id)
        by_drafter: dict[str, list[str]] = collections.defaultdict(list)
        for request in requests:
            for name in request.drafter_contacted & self.drafters.keys():
                by_drafter[name].append(request.id)
        for name, ids in by_drafter.items():
            self._in_background(self.drafters[name].release(ids))
        by_replica: dict[str, list[str]] = collections.defaultdict(list)
        for request in requests:
            if request.verifier:
                by_replica[request.verifier].append(request.id)
        self.verifiers.forget(requests)
        releases = [self.verifiers.release(self.verifiers[address], ids, self.verifier_timeout_s) for address, ids in by_replica.items()]
        if releases:  # shielded: completes even if the loop is cancelled meanwhile
            await asyncio.shield(asyncio.gather(*releases))

    def _drop(self, requests: list[RequestState]) -> None:
        """Requests leaving without passing through the running batch's reaping (cancelled while queued,
        or ended while moving between replicas): free their drafter and controller state. One that never
        ran holds none."""
        ran = [r for r in requests if r.first_token is not None]
        if ran:
            self._in_background(self._release(ran))

    def _in_background(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def verify_message(batch: Sequence[RequestState], drafts: Sequence[Draft], chunks: Sequence[PrefillChunk]) -> verifier_pb2.VerifyRequest:
    """The wire form of one replica's share of a step: ragged drafts, flat, in request order, and the
    prefill chunks as (request, token count) pairs."""
    return verifier_pb2.VerifyRequest(
        request_ids=[r.id for r in batch],
        draft_counts=[len(d) for d in drafts],
        draft_token_ids=[t for d in drafts for t in d.tokens],
        draft_distributions=pack_distributions([d.dists for d in drafts]),
        draft_parents=pack_parents(drafts),
        prefill_request_ids=[chunk.request.id for chunk in chunks],
        prefill_counts=[chunk.row.tokens for chunk in chunks],
    )


def _valid_prefix(draft: Draft, vocab_size: int) -> Draft:
    """A drafter's proposal up to the first token the verifier would refuse (a token id outside the
    vocabulary, or a distribution it cannot have been sampled from), so that one bad drafter cannot
    fail the whole batch's Verify."""
    for j, (token, dist) in enumerate(zip(draft.tokens, draft.dists)):
        if not 0 <= token < vocab_size or (dist is not None and dist.problem(token, vocab_size) is not None):
            return draft.cut(j)
    return draft


def _verifier_error(what: str, err: grpc.RpcError) -> RequestError:
    code = err.code().name if err.code() is not None else "UNKNOWN"
    if code in PASS_THROUGH:
        return RequestError(code, err.details() or f"the verifier refused the {what}")
    if code in {"UNAVAILABLE", "DEADLINE_EXCEEDED"}:
        return RequestError("UNAVAILABLE", f"the verifier did not answer the {what} ({code}: {err.details()}); retry later")
    return RequestError("INTERNAL", f"the verifier failed the {what} ({code}: {err.details()})")
