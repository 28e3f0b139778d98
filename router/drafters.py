"""The router's side of one drafter service: keeping its per-request state in sync, asking for
proposals under a deadline, and backing off when it fails.

A drafter's failure must cost only speculation (docs/design.md section 7): ``propose`` never raises; the
requests it could not serve get no proposal this step and send their full context next time, and the
drafter is skipped for a backoff period that doubles on each consecutive failure.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import grpc

from router.request import RequestState
from smartspec.errors import RequestError
from smartspec.sampling import DraftDistribution, unpack_distributions
from smartspec.serving import CHANNEL_OPTIONS
from smartspec.telemetry import Metadata
from smartspec.tree import chain_parents, is_chain, longest_path, parents_problem
from smartspec.wire import drafter_pb2, drafter_pb2_grpc

log = logging.getLogger("smartspec.router.drafters")

RESYNC = drafter_pb2.PROPOSE_STATUS_RESYNC_REQUIRED
OK = drafter_pb2.PROPOSE_STATUS_OK

# Drafters that propose token trees, which the verifier checks greedily only: sampling requests may
# not use them (router/validate.py), and 'auto' does not pick them for one.
TREE_DRAFTERS = frozenset({"tree"})


@dataclass
class Draft:
    """One request's proposal for one step: tokens and, per token, the distribution it was sampled
    from (None: deterministic, q one-hot), its parent (a token tree; empty: a chain) and the drafter's
    probability of it given its path (empty: not reported). ``len`` and ``cut`` keep them aligned."""

    tokens: list[int] = field(default_factory=list)
    dists: list[DraftDistribution | None] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.dists:
            self.dists = [None] * len(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def cut(self, k: int) -> "Draft":
        """The first k tokens: a tree again, since drafters put parents before their children."""
        if k >= len(self.tokens):
            return self
        return Draft(self.tokens[:k], self.dists[:k], self.parents[:k], self.probs[:k])

    def chain_length(self) -> int:
        """How many of the first tokens form a chain (all of them unless it is a tree)."""
        return next((i for i, parent in enumerate(self.parents) if parent != i - 1), len(self.tokens))

    def accepted_nodes(self, accepted: Sequence[int]) -> list[int]:
        """Which tokens of this draft the verifier accepted, root first, from the accepted tokens it
        emitted (the path it chose, found the way it chose it)."""
        parents = self.parents or chain_parents(len(self.tokens))
        return longest_path(self.tokens, parents, lambda parent, depth: accepted[depth] if depth < len(accepted) else None)


def pack_parents(drafts: Sequence[Draft]) -> list[int]:
    """VerifyRequest.draft_parents: empty when every draft is a chain, else every draft's parents
    (chains spelled out), flat."""
    if all(is_chain(d.parents) for d in drafts):
        return []
    return [p for d in drafts for p in (d.parents or chain_parents(len(d)))]


# Deadline of a Release (it runs in the background), and most ids kept for a retry after one failed.
RELEASE_TIMEOUT_S = 30.0
MAX_UNRELEASED = 4096


class DrafterClient:
    """Calls one DrafterService. Tracks health; each request tracks how much of it the drafter holds."""

    def __init__(
        self, name: str, stub: drafter_pb2_grpc.DrafterServiceStub, timeout_s: float, backoff_s: float = 0.25, max_backoff_s: float = 8.0,
        trace_metadata: Callable[[Sequence[RequestState]], Metadata | None] = lambda requests: None,
    ) -> None:
        self.name = name
        self.stub = stub
        self.trace_metadata = trace_metadata  # the requests' trace contexts for a Propose (RouterTelemetry.rpc_metadata)
        self.timeout_s = timeout_s
        self._base_backoff = backoff_s
        self._max_backoff = max_backoff_s
        self._backoff = backoff_s
        self._retry_at = 0.0
        self.failures = 0  # total failed calls, for logs and tests
        self._unreleased: dict[str, None] = {}  # ids whose Release failed, oldest first

    def available(self) -> bool:
        """False while backing off after a failure: its requests decode without speculation."""
        return time.monotonic() >= self._retry_at

    async def propose(self, requests: Sequence[RequestState], ks: Sequence[int]) -> tuple[list[Draft], float]:
        """Syncs each request and returns up to ks[i] proposed tokens for it (possibly fewer, or none
        on failure), and the call's wall time. A request the drafter lost is resent with its full
        context once, in this step."""
        started = time.perf_counter()
        proposals = [Draft() for _ in requests]
        try:
            response = await self._call(requests, ks)
            resync = [i for i, status in enumerate(response.statuses) if status == RESYNC]
            self._collect(response, range(len(requests)), ks, proposals)
            if resync:  # their drafter_synced is 0 now: the retry sends each one's full context
                again = await self._call([requests[i] for i in resync], [ks[i] for i in resync])
                self._collect(again, resync, ks, proposals)
        except (grpc.RpcError, asyncio.TimeoutError, ValueError) as err:
            self._failed(err, requests)
            return [Draft() for _ in requests], time.perf_counter() - started
        self._backoff = self._base_backoff
        for i, request in enumerate(requests):
            if not request.params.sampling.greedy:  # the verifier checks trees greedily only: keep the chain it starts with
                proposals[i] = proposals[i].cut(proposals[i].chain_length())
        return proposals, time.perf_counter() - started

    async def release(self, request_ids: Sequence[str]) -> None:
        """Frees state of finished or cancelled requests. Nothing waits on it, so its deadline is long:
        a Release queues behind the Propose calls the drafter is still working on, including ones the
        router gave up on, and one cut short by Propose's deadline would leave the state behind. Ids
        whose release failed go again with the next release (a restarted drafter ignores them)."""
        ids = list(dict.fromkeys([*self._unreleased, *request_ids]))
        if not ids:
            return
        self._unreleased.clear()
        try:
            await self.stub.Release(drafter_pb2.ReleaseRequest(request_ids=ids), timeout=max(self.timeout_s, RELEASE_TIMEOUT_S))
        except grpc.RpcError as err:
            self._unreleased.update(dict.fromkeys(ids))
            for stale in list(self._unreleased)[: max(0, len(self._unreleased) - MAX_UNRELEASED)]:  # oldest go first
                del self._unreleased[stale]
            level = logging.WARNING if self.available() else logging.DEBUG  # a known-down drafter: said already
            log.log(level, "drafter %s: release of %d requests failed (retried with the next): %s", self.name, len(ids), describe_rpc_error(err))

    async def _call(self, requests: Sequence[RequestState], ks: Sequence[int]) -> drafter_pb2.ProposeResponse:
        appended: list[int] = []
        counts: list[int] = []
        for request in requests:
            synced = request.drafter_synced.get(self.name, 0)
            new = request.tokens[synced:] if synced else request.tokens
            appended.extend(new)
            counts.append(len(new))
        message = drafter_pb2.ProposeRequest(
            request_ids=[r.id for r in requests],
            committed_lengths=[len(r.tokens) for r in requests],
            appended_counts=counts,
            appended_token_ids=appended,
            max_draft_tokens=list(ks),
            sampling=[r.params.sampling.to_wire() for r in requests] if any(not r.params.sampling.greedy for r in requests) else [],
        )
        # Until a reply arrives the drafter's state is unknown: a failed call forces a full resync.
        for request in requests:
            request.drafter_synced[self.name] = 0
            request.drafter_contacted.add(self.name)
        response = await self.stub.Propose(message, timeout=self.timeout_s, metadata=self.trace_metadata(requests))
        if len(response.statuses) != len(requests) or len(response.draft_counts) != len(requests):
            raise ValueError(f"{len(requests)} requests but {len(response.statuses)} statuses and {len(response.draft_counts)} counts")
        if sum(response.draft_counts) != len(response.draft_token_ids):
            raise ValueError(f"draft counts add up to {sum(response.draft_counts)} but {len(response.draft_token_ids)} tokens came back")
        for request, status in zip(requests, response.statuses):
            if status == OK:
                request.drafter_synced[self.name] = len(request.tokens)
        return response

    @staticmethod
    def _collect(response: drafter_pb2.ProposeResponse, positions: Sequence[int], ks: Sequence[int], proposals: list[Draft]) -> None:
        """Stores the OK answers of `response` (whose entries are the requests at `positions`), cut to k.
        Raises ValueError (the drafter failed) on malformed distributions."""
        counts = list(response.draft_counts)
        try:
            dists = unpack_distributions(response.draft_distributions, counts)
        except RequestError as err:
            raise ValueError(err.message) from None
        flat = list(response.draft_token_ids)
        for name, values in (("draft_parents", response.draft_parents), ("draft_token_probs", response.draft_token_probs)):
            if values and len(values) != len(flat):
                raise ValueError(f"{len(values)} {name} for {len(flat)} draft tokens")
        if any(not 0.0 <= p <= 1.0 for p in response.draft_token_probs):
            raise ValueError("draft_token_probs holds a value outside [0, 1]")
        start = 0
        for j, i in enumerate(positions):
            count = counts[j]
            if response.statuses[j] == OK:
                part = slice(start, start + count)
                parents = list(response.draft_parents[part])
                problem = parents_problem(parents, count) if parents else None
                if problem is not None:
                    raise ValueError(f"malformed token tree: {problem}")
                proposals[i] = Draft(flat[part], dists[j], parents, list(response.draft_token_probs[part])).cut(ks[i])
            start += count

    def _failed(self, err: BaseException, requests: Sequence[RequestState]) -> None:
        for request in requests:
            request.drafter_synced[self.name] = 0
        self.failures += 1
        self._retry_at = time.monotonic() + self._backoff
        log.warning("drafter %s failed (%s); its %d requests go on without speculation; retry in %.2fs",
                    self.name, describe_rpc_error(err), len(requests), self._backoff)
        self._backoff = min(self._backoff * 2, self._max_backoff)


def describe_rpc_error(err: BaseException) -> str:
    if isinstance(err, grpc.RpcError):
        return f"{err.code().name}: {err.details()}"
    return f"{type(err).__name__}: {err}"


class DrafterReplicas:
    """Several replicas of one drafter kind, found by DNS (router/follow.py drives `join`, `leave`,
    `back` and `drop`); the scheduler calls it as one DrafterClient. A request's drafter state lives on
    one replica, so a request sticks to the one it was placed on (the least loaded when placed) and
    moves, with a full resync, only when that one is dropped or is backing off after a failure. A
    replica whose address vanished keeps its requests through the grace period but gets no new ones."""

    def __init__(
        self, name: str, timeout_s: float, trace_metadata: Callable[[Sequence[RequestState]], Metadata | None] = lambda requests: None,
        connect: Callable[[str], grpc.aio.Channel] | None = None,
    ) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self.trace_metadata = trace_metadata
        self._connect = connect or (lambda address: grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS))
        self.clients: dict[str, DrafterClient] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.leaving: set[str] = set()
        self.home: dict[str, str] = {}  # request id -> the replica holding its state
        self.moved = 0  # requests placed again after their replica went away (each with a full resync)
        self._background: set[asyncio.Task] = set()

    @property
    def failures(self) -> int:
        return sum(c.failures for c in self.clients.values())

    def available(self) -> bool:
        """Whether any replica can propose (a leaving one still serves the requests it holds)."""
        return any(c.available() for c in self.clients.values())

    async def propose(self, requests: Sequence[RequestState], ks: Sequence[int]) -> tuple[list[Draft], float]:
        """Each request's proposal from its replica, the replicas called in parallel; a request no
        replica can take gets none. Returns the proposals and the slowest call's wall time."""
        by_replica: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            address = self._place(request)
            if address is not None:
                by_replica.setdefault(address, []).append(i)
        proposals = [Draft() for _ in requests]
        calls = [self.clients[a].propose([requests[i] for i in members], [ks[i] for i in members]) for a, members in by_replica.items()]
        seconds = 0.0
        for members, (drafts, took) in zip(by_replica.values(), await asyncio.gather(*calls)):
            seconds = max(seconds, took)
            for i, draft in zip(members, drafts):
                proposals[i] = draft
        return proposals, seconds

    def _place(self, request: RequestState) -> str | None:
        """The request's replica: its home while that one serves, else the least loaded replica that
        takes new requests (its state there starts with a full resync), else None."""
        home = self.home.get(request.id)
        if home in self.clients and self.clients[home].available():
            return home
        candidates = [a for a, c in self.clients.items() if a not in self.leaving and c.available()]
        if not candidates:
            return None
        loads = collections.Counter(self.home.values())
        address = min(candidates, key=lambda a: (loads[a], a))
        if home in self.clients:  # it backs off: free the state it may still hold once it answers
            self._spawn(self.clients[home].release([request.id]))
        if home is not None:
            self.moved += 1
            log.debug("drafter %s: request %s moves from %s to %s (resync)", self.name, request.id, home, address)
        self.home[request.id] = address
        request.drafter_synced[self.name] = 0  # the new replica gets the request's whole context
        return address

    async def release(self, request_ids: Sequence[str]) -> None:
        by_replica: dict[str, list[str]] = {}
        for request_id in request_ids:
            address = self.home.pop(request_id, None)
            if address in self.clients:
                by_replica.setdefault(address, []).append(request_id)
        await asyncio.gather(*(self.clients[a].release(ids) for a, ids in by_replica.items()))

    # --- membership (router/follow.py) ------------------------------------------------------------
    def has(self, address: str) -> bool:
        return address in self.clients

    async def join(self, address: str) -> None:
        channel = self._connect(address)
        self._channels[address] = channel
        self.clients[address] = DrafterClient(
            self.name, drafter_pb2_grpc.DrafterServiceStub(channel), self.timeout_s, trace_metadata=self.trace_metadata
        )
        log.info("drafter %s: replica %s joined (%d now)", self.name, address, len(self.clients))

    def leave(self, address: str) -> None:
        self.leaving.add(address)

    def back(self, address: str) -> None:
        self.leaving.discard(address)

    def drop(self, address: str) -> None:
        """Gone past its grace period: its requests are placed elsewhere at their next step."""
        self.leaving.discard(address)
        self.clients.pop(address, None)
        channel = self._channels.pop(address, None)
        if channel is not None:  # a call still in flight ends by its deadline (closing cancels it: CancelledError)
            self._spawn(channel.close(grace=self.timeout_s))
        moved = [request_id for request_id, home in self.home.items() if home == address]
        log.info("drafter %s: replica %s left; %d requests move to another at their next step", self.name, address, len(moved))

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels.values()))

    def _spawn(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
