"""What router replicas share through Redis: per-drafter acceptance evidence and the cost profile.

The controller never waits on Redis. It keeps deciding from its local state; a background task
(`SharedState.start`) runs every `interval_s` on the router's event loop, between steps, and

- publishes the evidence this replica gathered since its last publish, as increments (HINCRBY) of
  never-faded counts (verifies, proposed, accepted, failures, and per draft position), into a hash per
  time bucket: ``NS:acceptance:BUCKET``, one field per replica, statistic and drafter;
- reads the buckets of the last `window_s` seconds, adds up every *other* replica's counts (its own are
  already in its local rates) and hands them to each drafter's `DrafterRates.set_fleet`, where they
  count like local evidence in the drafter's rate, which is every request's prior.

Fading. Local evidence fades per step (`SpeculationController.rate_decay`, a window of ~200 steps).
Replicas step at different speeds, so steps are no common clock: fleet evidence fades by its age in
seconds instead, weighted 0.5 ** (age / half_life_s) and gone after `window_s`, when its bucket's key
expires. A replica that stopped, or a drafter whose acceptance changed, stops counting within a
minute, as a drafter's local evidence does within its window. Evidence a replica gathers while Redis is
unreachable stays local (sent later it would be stale), and the fleet's counts are dropped as soon as
Redis fails: the controller then works on local state alone, exactly as without Redis.

The cost profile is stored under ``NS:profile:KEY``, KEY as in router/controller/profile.py, so a second
replica reads the first one's instead of measuring its own (tens of seconds).

Redis going away or coming back is logged once each way; reconnection is retried with a doubling
backoff. No error from Redis reaches a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import defaultdict
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from router.controller.acceptance import DrafterRates
from router.controller.controller import SpeculationController

log = logging.getLogger("smartspec.router.shared_state")

# What a failing Redis call raises: its own errors, a refused or dropped socket, a timeout of ours.
UNAVAILABLE_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


class SharedState:
    """Syncs one router's controllers (one per verifier replica) with the fleet's Redis; also its cost-profile store."""

    def __init__(
        self,
        url: str,
        namespace: str,
        controller: SpeculationController,
        interval_s: float = 1.0,
        bucket_s: float = 5.0,
        window_s: float = 60.0,
        half_life_s: float = 10.0,
        max_backoff_s: float = 10.0,
        timeout_s: float = 1.0,
    ) -> None:
        self.url = redacted(url)
        self.namespace = namespace
        # The controllers it syncs: the router's, one per verifier replica once the scheduler made them
        # (router.server.build_router); all their evidence is this router's, the fleet's goes to each.
        self.controllers = [controller]
        self.interval_s = interval_s
        self.bucket_s = bucket_s
        self.buckets = max(1, round(window_s / bucket_s))
        self.half_life_s = half_life_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self.replica = uuid.uuid4().hex  # its own fields in the shared hashes, skipped when reading
        # Raises ValueError for a malformed URL: a configuration error, reported at startup.
        self.client = redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s, retry=Retry(NoBackoff(), 0), decode_responses=True
        )
        self.available: bool | None = None  # None until the first call
        self.publishes = 0  # successful publishes that carried evidence (for tests and debugging)
        # Evidence already published, per drafter: the rates object it came from (the controller
        # replaces them on reset) and its totals then.
        # Keyed by (id of the controller, drafter): replicas found by DNS come and go, so a position in
        # `controllers` is not a controller's identity (a reused id is caught by the rates object check).
        self._published: dict[tuple[int, str], tuple[DrafterRates, dict[str, int]]] = {}
        self.fleet: dict[str, dict[str, float]] = {}  # the other replicas' faded counts per drafter
        self._task: asyncio.Task | None = None
        self._stopping = False

    @property
    def controller(self) -> SpeculationController:
        """The first verifier replica's controller."""
        return self.controllers[0]

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the sync loop on the running event loop (the router's)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="router-shared-state")

    async def close(self) -> None:
        """Stops the loop, publishes the last evidence if Redis is up (bounded by the timeout), closes."""
        if self._task is not None:
            # A cancellation can be swallowed (asyncio.wait_for's race when the awaited call completes
            # at the same moment, or a client library's cleanup): cancel until the task is done.
            self._stopping = True
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=0.1)
            self._task = None
        if self.available:
            with contextlib.suppress(*UNAVAILABLE_ERRORS):
                await asyncio.wait_for(self._publish(), self.timeout_s)
        with contextlib.suppress(*UNAVAILABLE_ERRORS):
            await self.client.aclose()

    async def _run(self) -> None:
        backoff = self.interval_s
        while not self._stopping:
            try:
                await asyncio.wait_for(self.sync_once(), 3 * self.timeout_s)
                backoff = self.interval_s
            except UNAVAILABLE_ERRORS as err:
                self._failed(err)
                backoff = min(max(backoff, self.interval_s) * 2, self.max_backoff_s)
            except Exception:  # a bug here must not stop the router: log it and keep trying
                log.exception("syncing controller state with redis at %s failed", self.url)
                backoff = self.max_backoff_s
            await asyncio.sleep(backoff)

    def _succeeded(self) -> None:
        if self.available is None:
            log.info("sharing controller state through redis at %s (namespace %r)", self.url, self.namespace)
        elif not self.available:
            log.info("redis reconnected at %s: sharing controller state again", self.url)
        self.available = True

    def _failed(self, err: BaseException) -> None:
        if self.available is not False:
            log.warning("redis unavailable at %s: using local state; will retry (%s)", self.url, describe(err))
        self.available = False
        self.fleet = {}
        for controller in self.controllers:
            for rates in controller.rates.values():
                rates.set_fleet(0.0, 0.0)

    # --- acceptance evidence --------------------------------------------------------------------
    async def sync_once(self) -> None:
        """Publishes new evidence, then pulls the fleet's; raises when Redis fails."""
        await self._publish()
        await self._pull()
        self._succeeded()

    def _bucket(self, now: float) -> int:
        return int(now // self.bucket_s)

    def _key(self, *parts: object) -> str:
        return ":".join([self.namespace, *map(str, parts)])

    def _new_evidence(self) -> dict[str, dict[str, int]]:
        """Per drafter, what its counts grew by since the last publish; marks it published (evidence
        from a failed publish stays local: see the module's docstring)."""
        out: dict[str, dict[str, int]] = {}
        for controller in self.controllers:
            for name, rates in list(controller.rates.items()):
                totals = rates.totals()
                key = (id(controller), name)
                source, before = self._published.get(key, (None, {}))
                if source is not rates:  # new, or the controller was reset: everything counts
                    before = {}
                self._published[key] = (rates, totals)
                for stat, value in totals.items():
                    if value != before.get(stat, 0):
                        drafter = out.setdefault(name, {})
                        drafter[stat] = drafter.get(stat, 0) + value - before.get(stat, 0)
        live = {id(controller) for controller in self.controllers}
        for key in [key for key in self._published if key[0] not in live]:  # a replica that left
            del self._published[key]
        return out

    async def _publish(self) -> None:
        evidence = self._new_evidence()
        if not evidence:
            await self.client.ping()  # still tells whether Redis is there
            return
        key = self._key("acceptance", self._bucket(time.time()))
        async with self.client.pipeline(transaction=False) as pipe:
            for drafter, delta in evidence.items():
                for stat, value in delta.items():
                    pipe.hincrby(key, f"{self.replica}|{stat}|{drafter}", value)
            pipe.expire(key, round((self.buckets + 1) * self.bucket_s))
            await pipe.execute()
        self.publishes += 1

    async def _pull(self) -> None:
        now = time.time()
        newest = self._bucket(now)
        buckets = range(newest - self.buckets + 1, newest + 1)
        async with self.client.pipeline(transaction=False) as pipe:
            for bucket in buckets:
                pipe.hgetall(self._key("acceptance", bucket))
            replies = await pipe.execute()
        fleet: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for bucket, fields in zip(buckets, replies):
            age = max(now - (bucket + 0.5) * self.bucket_s, 0.0)
            weight = 0.5 ** (age / self.half_life_s)
            for field, value in fields.items():
                replica, stat, drafter = field.split("|", 2)
                if replica != self.replica:
                    fleet[drafter][stat] += weight * int(value)
        self.fleet = {name: dict(stats) for name, stats in fleet.items()}
        for controller in self.controllers:
            for name in set(self.fleet) | set(controller.rates):
                stats = self.fleet.get(name, {})
                controller.drafter_rates(name).set_fleet(stats.get("accepted", 0.0), stats.get("failures", 0.0))

    # --- cost profile (router.controller.profile.ProfileStore) ----------------------------------
    def location(self, key: str) -> str:
        return f"redis at {self.url} ({self._key('profile', key)})"

    async def get_profile(self, key: str) -> dict[str, Any] | None:
        try:
            raw = await asyncio.wait_for(self.client.get(self._key("profile", key)), 2 * self.timeout_s)
        except UNAVAILABLE_ERRORS as err:
            self._failed(err)
            return None
        self._succeeded()
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            log.warning("ignoring a malformed cost profile in %s", self.location(key))
            return None

    async def put_profile(self, key: str, profile: dict[str, Any]) -> None:
        if self.available is False:
            return  # just failed: the local file has it, and the next replica will measure or find one
        try:
            await asyncio.wait_for(self.client.set(self._key("profile", key), json.dumps(profile)), 2 * self.timeout_s)
        except UNAVAILABLE_ERRORS as err:
            self._failed(err)
            return
        self._succeeded()


def describe(err: BaseException) -> str:
    """A one-line reason: 'ConnectionError: Error 111 connecting to ...'."""
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
