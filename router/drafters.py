"""The router's side of one drafter service: keeping its per-request state in sync, asking for
proposals under a deadline, and backing off when it fails.

A drafter's failure must cost only speculation (DESIGN.md section 7): ``propose`` never raises; the
requests it could not serve get no proposal this step and send their full context next time, and the
drafter is skipped for a backoff period that doubles on each consecutive failure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import grpc

from router.request import RequestState
from smartspec.errors import RequestError
from smartspec.sampling import DraftDistribution, unpack_distributions
from smartspec.telemetry import Metadata
from smartspec.wire import drafter_pb2, drafter_pb2_grpc

log = logging.getLogger("smartspec.router.drafters")

RESYNC = drafter_pb2.PROPOSE_STATUS_RESYNC_REQUIRED
OK = drafter_pb2.PROPOSE_STATUS_OK


@dataclass
class Draft:
    """One request's proposal for one step: tokens and, per token, the distribution it was sampled
    from (None: deterministic, q one-hot). ``len`` and ``cut`` keep the two aligned."""

    tokens: list[int] = field(default_factory=list)
    dists: list[DraftDistribution | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.dists:
            self.dists = [None] * len(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def cut(self, k: int) -> "Draft":
        return Draft(self.tokens[:k], self.dists[:k])


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
        return proposals, time.perf_counter() - started

    async def release(self, request_ids: Sequence[str]) -> None:
        """Frees state of finished or cancelled requests; failures are only logged (state is leaked
        at worst, and a drafter bounds what it keeps)."""
        if not request_ids:
            return
        try:
            await self.stub.Release(drafter_pb2.ReleaseRequest(request_ids=list(request_ids)), timeout=self.timeout_s)
        except grpc.RpcError as err:
            level = logging.WARNING if self.available() else logging.DEBUG  # a known-down drafter: said already
            log.log(level, "drafter %s: release of %d requests failed: %s", self.name, len(request_ids), describe_rpc_error(err))

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
        start = 0
        for j, i in enumerate(positions):
            count = counts[j]
            if response.statuses[j] == OK:
                proposals[i] = Draft(flat[start : start + count], dists[j]).cut(ks[i])
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
