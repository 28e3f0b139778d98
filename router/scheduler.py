"""Continuous batching over verifier replicas: requests join and leave the running batches between steps.

The Scheduler owns the one admission queue (first come, first served) and runs one step loop per
verifier replica (router/replica_loop.py, ReplicaLoop): each loop admits from the front of the queue as
its replica has room, and steps its own batch with its own SpeculationController (cost model and
acceptance), at its own pace. So a slow replica, or one that hangs until its call's deadline, never
delays the requests on the others, and its step times never train their cost models. A request whose
replica fails goes back to the front of the queue and is re-admitted on another replica from its
committed tokens (router/verifiers.py).

A step of a loop: admission (one chunked Prefill), then the policies pick k per decoding request, the
drafters propose in parallel and ONE Verify checks every proposal and prefills a budget's worth of
prompt chunks (max_step_tokens) in the same forward, so a long prompt never stalls the running
requests for its whole prefill (docs/engine.md, "Chunked prefill"). Emitted tokens are committed per
request (stop rules applied) and streamed; finished and cancelled requests are released.

Across replicas: `steps` and `preemptions` count over all loops; `controller` is the first replica's
(the one the router's controller policies are registered with; each loop decides with its own, see
ReplicaLoop._policy); `controllers` lists them all, and `reset_controller` resets them all.

Replicas found by DNS (router/follow.py) come and go while the router runs: `add_replica` gives a new
one its own loop and a sibling controller; `retire_replica` ends a replica's loop once its grace period
is over (its requests move, like a failed replica's, but without counting as a failure), and the
scheduler forgets it (`retired`). `on_replicas_changed` callbacks hear of both (the shared-state sync
follows the set of controllers).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import grpc

from router.controller.controller import SpeculationController
from router.drafters import DrafterClient
from router.prefill_budget import DEFAULT_MAX_STEP_TOKENS
from router.replica_loop import AUTO, BENCHMARK_ONLY, ReplicaLoop
from router.request import RequestState
from router.telemetry import RouterTelemetry
from router.verifiers import VerifierPool, VerifierReplica
from smartspec.errors import RequestError
from smartspec.wire import verifier_pb2, verifier_pb2_grpc

log = logging.getLogger("smartspec.router.scheduler")

__all__ = ["AUTO", "BENCHMARK_ONLY", "DEFAULT_MAX_STEP_TOKENS", "Limits", "Scheduler"]



@dataclass(frozen=True)
class Limits:
    """What the router learns from the verifier's Info."""

    max_context: int
    vocab_size: int
    eos_ids: frozenset[int]
    max_sequences: int


class Scheduler:
    """Owns the admission queue and one ReplicaLoop (an asyncio task) per verifier replica."""

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
        self.drafters = drafters
        self.limits = limits
        self._max_batch = max_batch
        self.max_batch = max(1, min(max_batch, self.verifiers.capacity))  # router-wide, over every replica
        if max_step_tokens < 1:
            raise ValueError(f"max_step_tokens must be at least 1 (got {max_step_tokens})")
        self.max_step_tokens = max_step_tokens
        self.max_queue = max_queue
        self.verifier_timeout_s = verifier_timeout_s
        self.waiting: collections.deque[RequestState] = collections.deque()
        self.preemptions = 0  # requests sent back to the queue because a verifier's KV cache was full
        self.moved = 0  # requests moved off a replica that left (found by DNS, gone past its grace period)
        # The first replica's loop decides with `controller` (the router's controller policies are
        # bound to it); every other replica gets its own, with the same settings and cost profile.
        first = controller or SpeculationController()
        self._controller = first
        self.loops = [
            ReplicaLoop(self, replica, first if i == 0 else first.sibling()) for i, replica in enumerate(self.verifiers.replicas)
        ]
        self.on_replicas_changed: list[Callable[[], None]] = []
        self._background: set[asyncio.Task] = set()
        self._idle = asyncio.Event()
        self._started = False
        self.draining = False
        self.closing = False

    # --- views over the replicas ----------------------------------------------------------------
    @property
    def controller(self) -> SpeculationController:
        """The first replica's controller (see the module's docstring); it stays the router's after
        that replica, found by DNS, left."""
        return self._controller

    @property
    def controllers(self) -> list[SpeculationController]:
        """Every replica's controller, in replica order (the router's alone while it has no replica)."""
        return [loop.controller for loop in self.loops] or [self._controller]

    @property
    def running(self) -> list[RequestState]:
        """Every replica's running batch."""
        return [r for loop in self.loops for r in loop.running]

    @property
    def steps(self) -> int:
        """Verify steps that verified requests, over every replica."""
        return sum(loop.steps for loop in self.loops)

    # --- called by RPC handlers -----------------------------------------------------------------
    def submit(self, request: RequestState) -> None:
        """Queues a request for admission, or refuses it at once when the queue is full."""
        self.check_open()
        if len(self.waiting) >= self.max_queue:
            raise RequestError(
                "RESOURCE_EXHAUSTED",
                f"the router is overloaded: {len(self.waiting)} requests already wait for admission (limit {self.max_queue}); retry later",
            )
        self.waiting.append(request)
        self.wake()

    def check_open(self) -> None:
        """Refuses a request while the router shuts down (before it is even tokenized)."""
        if self.draining:
            raise RequestError("UNAVAILABLE", "the router is shutting down; retry on another router")

    def reset_controller(self) -> None:
        """Forgets what every replica's controller learned (Stats(reset=true)), each at its own step
        boundary."""
        for loop in self.loops:
            loop.reset_controller()
        if all(loop.controller is not self._controller for loop in self.loops):
            self._controller.reset()  # its replica left; the policies bound to it still read it

    def cancel(self, request: RequestState) -> None:
        """The client went away: drop a waiting request now, a running one at its loop's next step boundary."""
        request.cancelled = True
        if request in self.waiting:
            self.waiting.remove(request)
            self.drop([request])  # it may have run before (moved off a failed replica): free what it holds
        self.wake()

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._started = True
        for loop in self.loops:
            loop.start()

    # --- replicas found by DNS (router/follow.py) --------------------------------------------------
    def add_replica(self, replica: VerifierReplica) -> None:
        """A new replica (SERVING, same model) joins with its own loop and a controller of its own."""
        self.verifiers.add(replica)
        loop = ReplicaLoop(self, replica, self._controller.sibling())
        self.loops.append(loop)
        self._replicas_changed()
        if self._started and not self.closing:
            loop.start()
        self.wake()

    def has_replica(self, address: str) -> bool:
        """Whether the replica at `address` is in use and not on its way out."""
        return any(loop.replica.address == address and not loop.retiring for loop in self.loops)

    def retire_replica(self, address: str) -> None:
        """The replica's grace period is over: its loop moves its requests elsewhere and ends."""
        for loop in self.loops:
            if loop.replica.address == address:
                loop.retiring = True
                loop.wake.set()

    def retired(self, loop: ReplicaLoop, held: Sequence[str]) -> None:
        """Called by a retiring loop once its requests moved: the replica leaves the pool, and what it
        may still hold is released (if it answers) before its channel closes."""
        self.loops.remove(loop)
        self.verifiers.remove(loop.replica)
        self._replicas_changed()
        self.in_background(_release_and_close(loop.replica, held, self.verifier_timeout_s))
        self.wake()

    def _replicas_changed(self) -> None:
        self.max_batch = max(1, min(self._max_batch, self.verifiers.capacity))
        for callback in self.on_replicas_changed:
            callback()

    async def iterate(self) -> None:
        """One iteration of every replica's loop, concurrently (tests step the scheduler by hand)."""
        await asyncio.gather(*(loop.iterate() for loop in self.loops))

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
        """Stops every loop after its current iteration (cancelling it only past `timeout_s`, so a
        step's releases are not cut short); every unfinished request fails with UNAVAILABLE and is released."""
        self.closing = self.draining = True
        self.wake()
        tasks = [loop.task for loop in self.loops if loop.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        error = RequestError("UNAVAILABLE", "the router is shutting down")
        unfinished = self.running
        for request in [*self.waiting, *unfinished]:
            request.fail(error)
        self.waiting.clear()
        for loop in self.loops:
            loop.running = []
        await self.release(unfinished)

    # --- called by the replica loops ------------------------------------------------------------
    def wake(self) -> None:
        """Something changed for admission (a request arrived, left or moved): every loop looks."""
        for loop in self.loops:
            loop.wake.set()

    def note_idle(self) -> None:
        """A loop has nothing to do: with nothing waiting or running anywhere, a drain may finish."""
        if not self.waiting and not any(loop.running for loop in self.loops):
            self._idle.set()

    def requeue(self, requests: Sequence[RequestState]) -> None:
        """Requests back to the front of the queue, in order (moved off a failed replica, preempted,
        or refused for lack of slots): the first loop with room re-admits them."""
        for request in reversed(requests):
            self.waiting.appendleft(request)
        self.wake()

    async def release(self, requests: Iterable[RequestState]) -> None:
        """Frees state in the verifier (awaited: its slots are needed for the next admission) and in
        drafters (in the background: nothing waits on them)."""
        requests = list(requests)
        if not requests:
            return
        for request in requests:
            request.params.policy.forget(request.id)
            for controller in self.controllers:  # it may have moved between replicas
                controller.forget(request.id)
        by_drafter: dict[str, list[str]] = collections.defaultdict(list)
        for request in requests:
            for name in request.drafter_contacted & self.drafters.keys():
                by_drafter[name].append(request.id)
        for name, ids in by_drafter.items():
            self.in_background(self.drafters[name].release(ids))
        by_replica: dict[str, list[str]] = collections.defaultdict(list)
        for request in requests:
            if request.verifier in self.verifiers:
                by_replica[request.verifier].append(request.id)
        self.verifiers.forget(requests)
        releases = [self.verifiers.release(self.verifiers[address], ids, self.verifier_timeout_s) for address, ids in by_replica.items()]
        if releases:  # shielded: completes even if the loop is cancelled meanwhile
            await asyncio.shield(asyncio.gather(*releases))

    def drop(self, requests: list[RequestState]) -> None:
        """Requests leaving without passing through a running batch's reaping (cancelled while queued,
        or ended while moving between replicas): free their drafter and controller state. One that never
        ran holds none."""
        ran = [r for r in requests if r.first_token is not None]
        if ran:
            self.in_background(self.release(ran))

    def in_background(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


# A replica that left may be gone already: its Release gets a short deadline.
LEFT_RELEASE_TIMEOUT_S = 5.0


async def _release_and_close(replica: VerifierReplica, ids: Sequence[str], timeout_s: float) -> None:
    """Frees what a replica that left still holds, if it still answers, then closes its channel."""
    try:
        if ids:
            await replica.stub.Release(verifier_pb2.ReleaseRequest(request_ids=list(dict.fromkeys(ids))), timeout=min(timeout_s, LEFT_RELEASE_TIMEOUT_S))
    except grpc.RpcError as err:
        log.debug("verifier %s left: release of %d requests failed (%s)", replica.address, len(ids), err.code())
    finally:
        if replica.channel is not None:  # a release of orphans may still be in flight: it ends by its deadline
            await replica.channel.close(grace=LEFT_RELEASE_TIMEOUT_S)
