"""The router's verifier replicas: where each request lives, which replicas answer, and where to move
requests whose replica stopped answering.

A request's KV cache lives on one replica. When that replica stops answering (UNAVAILABLE,
DEADLINE_EXCEEDED, CANCELLED) or does not hold the request as expected (NOT_FOUND: it restarted; ALREADY_EXISTS: an
old copy), the scheduler re-admits the request elsewhere by a Prefill of its committed tokens (docs/design.md
section 7). The router owns those tokens, so nothing is lost: greedy output is exactly the same, and a
sampling request keeps its distribution. (Its exact tokens stay the same too without drafts, since
draws are keyed by (seed, position); with drafts, the re-prefill samples the next token directly where
a verify would have accepted or rejected a draft with other draws.)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import grpc

from router.drafters import describe_rpc_error
from router.request import RequestState
from smartspec.wire import verifier_pb2, verifier_pb2_grpc

log = logging.getLogger("smartspec.router.verifiers")

# A replica that fails with one of these is down: its requests move, it is retried after a backoff.
# CANCELLED comes from the replica's side (a server stopping with calls in flight cancels them): the
# router's own cancellation of a call surfaces as asyncio.CancelledError, never as this status.
REPLICA_DOWN = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})
# The replica answers but its state of the requests is not what the router expects: it lost them (it
# restarted: NOT_FOUND), or still holds an old copy (ALREADY_EXISTS): release there and re-admit.
STATE_LOST = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS})


@dataclass(eq=False)
class VerifierReplica:
    """One verifier service, the requests it holds, and its health."""

    address: str
    stub: verifier_pb2_grpc.VerifierServiceStub
    max_sequences: int
    holding: set[str] = field(default_factory=set)  # ids prefilled here and not released
    # ids it may still hold after their requests moved away: released once it answers again
    orphans: set[str] = field(default_factory=set)
    retry_at: float = 0.0
    backoff_s: float = 0.0
    failures: int = 0
    # Its address vanished from DNS (router/follow.py): it takes no new request, and keeps the ones it
    # has until an RPC to it fails or the grace period ends (a readiness flap re-prefills nothing).
    leaving: bool = False
    channel: grpc.aio.Channel | None = None  # closed when a replica found by DNS is dropped

    def available(self) -> bool:
        return time.monotonic() >= self.retry_at

    def accepting(self) -> bool:
        """Whether it takes new requests (and requests moving off another replica)."""
        return self.available() and not self.leaving

    @property
    def free(self) -> int:
        """Slots left: orphans may still take slots on the replica until they are released."""
        return self.max_sequences - len(self.holding) - len(self.orphans)


class VerifierPool:
    """The replicas behind one router. Not thread-safe: used from the router's event loop."""

    def __init__(self, replicas: Sequence[VerifierReplica], backoff_s: float = 0.5, max_backoff_s: float = 8.0) -> None:
        if not replicas:
            raise ValueError("a router needs at least one verifier")
        self.replicas = list(replicas)
        self._by_address = {r.address: r for r in self.replicas}
        self._base_backoff = backoff_s
        self._max_backoff = max_backoff_s

    def __getitem__(self, address: str) -> VerifierReplica:
        return self._by_address[address]

    def __contains__(self, address: str) -> bool:
        return address in self._by_address

    def add(self, replica: VerifierReplica) -> None:
        """A replica found by DNS joins (once its health check said SERVING)."""
        if replica.address in self._by_address:
            raise ValueError(f"verifier {replica.address} is already in the pool")
        self.replicas.append(replica)
        self._by_address[replica.address] = replica

    def remove(self, replica: VerifierReplica) -> None:
        """A replica that left (its grace period over, its requests moved): the pool forgets it."""
        self.replicas.remove(replica)
        del self._by_address[replica.address]

    @property
    def capacity(self) -> int:
        return sum(r.max_sequences for r in self.replicas)

    def any_available(self, besides: VerifierReplica | None = None) -> bool:
        """Whether another replica can take requests moving off `besides`."""
        return any(r.accepting() for r in self.replicas if r is not besides)

    def hold(self, replica: VerifierReplica, requests: Sequence[RequestState]) -> None:
        for request in requests:
            request.verifier = replica.address
            replica.holding.add(request.id)

    def forget(self, requests: Sequence[RequestState]) -> None:
        """The requests no longer live on their replica (released, or moving elsewhere)."""
        for request in requests:
            replica = self._by_address.get(request.verifier)
            if replica is not None:
                replica.holding.discard(request.id)
            request.verifier = ""

    def mark_down(self, replica: VerifierReplica, error: str, moving: Sequence[RequestState]) -> None:
        """The replica failed: skip it for a backoff that doubles per consecutive failure; the ids of
        `moving` become orphans to release should it come back with their state."""
        replica.failures += 1
        replica.backoff_s = min(max(replica.backoff_s * 2, self._base_backoff), self._max_backoff)
        replica.retry_at = time.monotonic() + replica.backoff_s
        replica.orphans.update(r.id for r in moving)
        log.warning("verifier %s failed (%s): %d of its requests move to another replica; retry in %.1fs",
                    replica.address, error, len(moving), replica.backoff_s)

    def answered(self, replica: VerifierReplica) -> list[str]:
        """The replica answered: healthy again. Returns the orphans to release there (once)."""
        if replica.failures:
            log.info("verifier %s answers again", replica.address)
        replica.failures = 0
        replica.backoff_s = 0.0
        orphans, replica.orphans = list(replica.orphans), set()
        return orphans

    async def release(self, replica: VerifierReplica, ids: Sequence[str], timeout_s: float) -> None:
        """Frees ids on a replica; a replica that is down keeps them as orphans for later."""
        if not ids:
            return
        if not replica.available():
            replica.orphans.update(ids)
            return
        try:
            await replica.stub.Release(verifier_pb2.ReleaseRequest(request_ids=list(ids)), timeout=timeout_s)
        except grpc.RpcError as err:
            replica.orphans.update(ids)
            log.warning("verifier %s: release of %d requests failed (%s); retried when it answers again",
                        replica.address, len(ids), describe_rpc_error(err))
