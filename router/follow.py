"""Keeps the router's replicas of one `dns:` address equal to what its name resolves to (issue 18):
router/discovery.py says which addresses appeared and vanished; a Follower turns that into membership.

- An address that appears is used once its gRPC health check says SERVING (a pod that is still loading
  its model is in DNS before it can serve): `Members.join`, retried while the address stays in DNS.
- An address that vanishes gets no new requests at once (`Members.leave`), but keeps the ones it has
  for a grace period: an RPC to it that fails moves them sooner (failover), and if the address comes
  back within the grace (a readiness flap) nothing moved (`Members.back`). Past the grace it is dropped
  (`Members.drop`): its requests move elsewhere, re-prefilled (verifiers) or resynced (drafters).

The verifier side (VerifierMembers) puts replicas in the scheduler's pool, each with its own step loop
and controller; the drafter side is router.drafters.DrafterReplicas. A failed lookup keeps the last
known set (ReplicaDiscovery), so a DNS outage drops nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router.discovery import DEFAULT_GRACE_S, ReplicaDiscovery
from router.verifiers import VerifierReplica
from smartspec.serving import CHANNEL_OPTIONS, wait_serving
from smartspec.wire import verifier_pb2, verifier_pb2_grpc

if TYPE_CHECKING:
    from router.scheduler import Scheduler

log = logging.getLogger("smartspec.router.follow")

HEALTH_TIMEOUT_S = 2.0
# A replica whose join failed (it answers SERVING but e.g. serves another model) is tried again this often.
JOIN_RETRY_S = 5.0


class Members(Protocol):
    """The replicas one `dns:` address stands for, as the router uses them."""

    def has(self, address: str) -> bool:
        """Whether the address is in use (leaving or not)."""

    async def join(self, address: str) -> None:
        """Starts using a replica that says SERVING; raises when it cannot be used."""

    def leave(self, address: str) -> None:
        """The address vanished from DNS: no new requests; its own stay for the grace period."""

    def back(self, address: str) -> None:
        """The address is in DNS again within its grace period: used as before."""

    def drop(self, address: str) -> None:
        """The grace period is over: its requests move elsewhere and it is forgotten."""


async def is_serving(address: str, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
    """One health check of the whole server at `address`."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class Follower:
    """Follows one `dns:` address (a ReplicaDiscovery) and keeps `members` in step with it."""

    def __init__(self, discovery: ReplicaDiscovery, grace_s: float = DEFAULT_GRACE_S) -> None:
        self.discovery = discovery
        self.grace_s = grace_s
        self.members: Members | None = None
        self._joining: dict[str, asyncio.Task] = {}
        self._leaving: dict[str, asyncio.Task] = {}
        self._task: asyncio.Task | None = None

    @property
    def name(self) -> str:
        return self.discovery.target.name

    async def first_serving(self, timeout_s: float) -> list[str]:
        """The router's startup: resolves until at least one address says SERVING (within
        `timeout_s`) and returns those that do; the others join later, once they do too."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            await self.discovery.refresh()
            addresses = sorted(self.discovery.addresses)
            serving = [a for a, ok in zip(addresses, await asyncio.gather(*map(is_serving, addresses))) if ok]
            if serving:
                return serving
            if loop.time() > deadline:
                found = ", ".join(addresses) or "no address"
                raise TimeoutError(f"{self.name} resolved to {found}: none reported SERVING within {timeout_s:.0f}s")
            await asyncio.sleep(min(self.discovery.refresh_s, 1.0))

    def start(self, members: Members) -> None:
        """Follows the name from now on: known addresses not in use yet join once SERVING."""
        self.members = members
        self._task = self._spawn(self._follow())

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._joining.values(), *self._leaving.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, work) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(work, name=f"router-follow-{self.name}")
        task.add_done_callback(self._report)
        return task

    def _report(self, task: asyncio.Task) -> None:
        """A bug in following must not pass silently: the router would stop seeing replica changes."""
        if not task.cancelled() and task.exception() is not None:
            log.error("following %s failed", self.name, exc_info=task.exception())

    async def _follow(self) -> None:
        for address in self.discovery.addresses:
            self._found(address)
        async for change in self.discovery.watch():
            for address in sorted(change.added):
                self._found(address)
            for address, since in change.removed.items():
                self._vanished(address, since)

    def _found(self, address: str) -> None:
        timer = self._leaving.pop(address, None)
        if timer is not None:
            timer.cancel()
            self.members.back(address)
            log.info("%s: %s is back within its grace period", self.name, address)
        elif not self.members.has(address) and address not in self._joining:
            self._joining[address] = self._spawn(self._join(address))

    async def _join(self, address: str) -> None:
        try:
            while True:
                await wait_serving(address, math.inf)
                try:
                    await self.members.join(address)
                    return
                except (grpc.RpcError, ValueError) as err:
                    log.warning("%s: replica %s cannot be used yet (%s); retrying in %.0fs", self.name, address, err, JOIN_RETRY_S)
                await asyncio.sleep(JOIN_RETRY_S)
        finally:
            if self._joining.get(address) is asyncio.current_task():  # not a later join of the same address
                del self._joining[address]

    def _vanished(self, address: str, since: float) -> None:
        joining = self._joining.pop(address, None)
        if joining is not None:
            joining.cancel()
        elif self.members.has(address) and address not in self._leaving:
            log.info("%s: %s vanished from DNS: no new requests; its requests move on a failed call or in %.1fs", self.name, address, self.grace_s)
            self.members.leave(address)
            self._leaving[address] = self._spawn(self._drop_later(address, since))

    async def _drop_later(self, address: str, since: float) -> None:
        await asyncio.sleep(max(0.0, since + self.grace_s - self.discovery.clock()))
        del self._leaving[address]
        log.info("%s: %s gone past its grace period: dropped", self.name, address)
        self.members.drop(address)


class VerifierMembers:
    """Verifier replicas found by DNS, in the scheduler's pool: each joins with its own step loop once
    its Info shows the same model as the router's first replica (a request may move between them)."""

    def __init__(self, scheduler: Scheduler, first: str, model: verifier_pb2.ModelInfo, default_slots: int, timeout_s: float) -> None:
        self.scheduler = scheduler
        self.first = first
        self.model = model
        self.default_slots = default_slots
        self.timeout_s = timeout_s

    def has(self, address: str) -> bool:
        return self.scheduler.has_replica(address)

    async def join(self, address: str) -> None:
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        stub = verifier_pb2_grpc.VerifierServiceStub(channel)
        try:
            info = await stub.Info(verifier_pb2.InfoRequest(), timeout=self.timeout_s)
            check_same_model(self.first, self.model, address, info.model)
            self.scheduler.add_replica(VerifierReplica(address, stub, info.max_sequences or self.default_slots, channel=channel))
        except BaseException:
            await channel.close()
            raise
        log.info("verifier %s joined (%d slots); %d replicas now", address, info.max_sequences or self.default_slots,
                 len(self.scheduler.verifiers.replicas))

    def leave(self, address: str) -> None:
        self.scheduler.verifiers[address].leaving = True

    def back(self, address: str) -> None:
        self.scheduler.verifiers[address].leaving = False
        self.scheduler.wake()

    def drop(self, address: str) -> None:
        self.scheduler.retire_replica(address)


def check_same_model(first: str, model: verifier_pb2.ModelInfo, address: str, other: verifier_pb2.ModelInfo) -> None:
    """Raises ValueError unless the replica at `address` serves the model of `first` (vocabulary,
    context limit, end of sequence): a request may move from one to the other."""
    if (other.vocab_size, other.max_context, list(other.eos_token_ids)) != (model.vocab_size, model.max_context, list(model.eos_token_ids)):
        raise ValueError(
            f"verifier {address} serves {other.model} (vocabulary {other.vocab_size}, context {other.max_context}) but {first} serves "
            f"{model.model} (vocabulary {model.vocab_size}, context {model.max_context}): replicas must run the same model"
        )
