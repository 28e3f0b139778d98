"""Replicas found by DNS (issue 18): a real DNS server started here (dnslib on a loopback UDP port, as in
tests/test_discovery.py) names the verifier and drafter replicas, and its records change while
requests stream. Replicas listen on the same port of different loopback addresses (127.0.0.1, 127.0.0.2:
Linux routes all of 127/8 to lo), so one name:port stands for all of them, as a headless Service's does."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time
from typing import Iterator

import pytest

from router.discovery import ReplicaDiscovery, parse_address
from router.follow import Follower
from smartspec.serving import free_port
from smartspec.wire import drafter_pb2_grpc, router_pb2, verifier_pb2_grpc
from tests.support import ServerThread, assert_lossless, reference_greedy
from tests.test_discovery import Records, zone  # noqa: F401 - zone: the DNS server fixture
from tests.test_router_stack import RouterThread, ScriptedDrafter, tokenizer_for, wait_until

VERIFIER = "verifier.cell.test"
DRAFTER = "drafter.cell.test"
REFRESH_S = 0.2
GRACE_S = 2.0
MAX_TOKENS = 160
FIRST_VERIFY_DELAY_S = 0.02  # MAX_TOKENS steps (every draft misses: one token a step) outlast GRACE_S there
FIRST, SECOND = "127.0.0.1", "127.0.0.2"


def slowed(servicer, delay_s: float):
    """The verifier servicer with each Verify held back by `delay_s`, so a request there lasts long
    enough for a test to act while it runs (the tiny model steps in milliseconds)."""
    if delay_s:
        verify = servicer.Verify

        async def slow_verify(request, context):
            await asyncio.sleep(delay_s)
            return await verify(request, context)

        servicer.Verify = slow_verify
    return servicer


class Cell:
    """Two verifier and two drafter replicas (in-process, on FIRST and SECOND), a router that finds
    them through the zone, and clients that keep streams going until `finish`. Verify on FIRST is
    held back by `first_delay_s`."""

    def __init__(self, target, records: Records, dns_port: int, grace_s: float, clients: int = 6, first_delay_s: float = 0.0) -> None:
        from drafter_svc.server import SERVICE_NAME as DRAFTER_SERVICE
        from verifier_svc.main import build_servicer
        from verifier_svc.server import SERVICE_NAME as VERIFIER_SERVICE

        self.target = target
        self.tokenizer = tokenizer_for(str(target))
        vport, dport = free_port(), free_port()
        self.verifier = {ip: f"{ip}:{vport}" for ip in (FIRST, SECOND)}
        self.drafter = {ip: f"{ip}:{dport}" for ip in (FIRST, SECOND)}
        self.servers = {
            ip: ServerThread(
                lambda s, delay=first_delay_s if ip == FIRST else 0.0: verifier_pb2_grpc.add_VerifierServiceServicer_to_server(
                    slowed(build_servicer(str(target), max_sequences=8), delay), s
                ),
                [VERIFIER_SERVICE], host=ip, port=vport,
            )
            for ip in (FIRST, SECOND)
        }
        self.drafters = {ip: ScriptedDrafter() for ip in (FIRST, SECOND)}
        self.drafter_servers = [
            ServerThread(lambda s, d=d: drafter_pb2_grpc.add_DrafterServiceServicer_to_server(d, s), [DRAFTER_SERVICE], host=ip, port=dport)
            for ip, d in self.drafters.items()
        ]
        self.router = RouterThread(
            self.tokenizer, f"dns://127.0.0.1:{dns_port}/{VERIFIER}:{vport}", {"scripted": f"dns://127.0.0.1:{dns_port}/{DRAFTER}:{dport}"},
            drafter="scripted", policy="fixed:3", max_tokens=MAX_TOKENS, max_batch=16, cost_profile="off", dns_refresh_s=REFRESH_S, replica_grace_s=grace_s,
        )
        self.scheduler = self.router.servicer.scheduler
        self.streams: list[dict] = []
        self.errors: list[BaseException] = []
        self._done = threading.Event()
        self._counter = iter(range(10_000))
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self) -> None:  # one stream at a time until the test ends
        try:
            while not self._done.is_set():
                prompt = f"Stream {next(self._counter)}: the quick brown fox jumps over the lazy dog."
                record = {"prompt": self.tokenizer(prompt).input_ids, "tokens": []}
                self.streams.append(record)
                for message in self.router.stub.GenerateStream(router_pb2.GenerateRequest(prompt=prompt), timeout=60):
                    record["tokens"] += message.token_ids
        except BaseException as err:  # noqa: BLE001 - reported by `finish`
            self.errors.append(err)

    def placement(self) -> dict[str, int]:
        """How many requests each verifier replica's loop runs."""

        async def read() -> dict[str, int]:  # on the router's loop
            return {loop.replica.address: len(loop.running) for loop in self.scheduler.loops}

        return self.router.call(read(), timeout=5)

    def fresh_on(self, verifier: str, drafter: str, generated_below: int) -> bool:
        """Whether a request on those verifier and drafter replicas has generated fewer than
        `generated_below` tokens."""
        homes = self.scheduler.drafters["scripted"].home

        async def read() -> bool:  # on the router's loop
            return any(
                r.generated < generated_below and homes.get(r.id) == drafter
                for loop in self.scheduler.loops if loop.replica.address == verifier for r in loop.running
            )

        return self.router.call(read(), timeout=5)

    def diagnose(self) -> str:
        """Each verifier loop's state and stack, for a failure message."""

        async def read() -> str:  # on the router's loop
            out = io.StringIO()
            for loop in self.scheduler.loops:
                in_call = time.monotonic() - loop._in_call_since if loop._in_call_since is not None else None
                print(loop.replica.address, f"running {len(loop.running)}, retiring {loop.retiring}, leaving {loop.replica.leaving}, "
                      f"in a call for {in_call}s", file=out)
                loop.task.print_stack(file=out)
            return out.getvalue()

        return self.router.call(read(), timeout=5)

    def finish(self, timeout_s: float = 60, min_streams: int = 12) -> None:
        """Stops the clients once their streams end; every stream finished, token-exact."""
        self._done.set()
        for thread in self._threads:
            thread.join(timeout=timeout_s)
            assert not thread.is_alive(), "a stream never finished"
        assert not self.errors, f"{len(self.errors)} streams failed: {self.errors[0]!r}"
        assert len(self.streams) >= min_streams
        for stream in self.streams:
            ref, gaps = reference_greedy(self.target, stream["prompt"], MAX_TOKENS)
            assert_lossless(stream["tokens"], ref, gaps)

    def close(self) -> None:
        self._done.set()
        self.router.stop()
        for server in [*self.servers.values(), *self.drafter_servers]:
            server.stop()


@contextlib.contextmanager
def cell(*args, **kwargs) -> Iterator[Cell]:
    running = Cell(*args, **kwargs)
    try:
        yield running
    finally:
        running.close()


def test_replicas_added_and_removed_in_dns_take_requests_and_lose_none(tiny_target, zone):
    records, dns_port = zone
    records.set(FIRST, name=VERIFIER)
    records.set(FIRST, name=DRAFTER)
    started = time.monotonic()
    with cell(tiny_target, records, dns_port, GRACE_S, first_delay_s=FIRST_VERIFY_DELAY_S) as c:
        first, second = c.verifier[FIRST], c.verifier[SECOND]
        group = c.scheduler.drafters["scripted"]
        assert wait_until(lambda: c.drafters[FIRST].calls > 0 and c.placement().get(first, 0) > 0, 30), "the load never started"
        assert list(c.placement()) == [first]

        # Added mid-load: the second verifier and drafter replicas take new requests.
        records.set(FIRST, SECOND, name=VERIFIER)
        records.set(FIRST, SECOND, name=DRAFTER)
        assert wait_until(lambda: c.placement().get(second, 0) > 0, 20), f"the added verifier took no request: {c.placement()}"
        assert wait_until(lambda: c.drafters[SECOND].calls > 0, 20), "the added drafter replica took no request"

        # A readiness flap shorter than the grace period moves nothing.
        loop = next(loop for loop in c.scheduler.loops if loop.replica.address == second)
        records.set(FIRST, name=VERIFIER)
        assert wait_until(lambda: loop.replica.leaving, 5)
        records.set(FIRST, SECOND, name=VERIFIER)
        assert wait_until(lambda: not loop.replica.leaving, 5)
        time.sleep(GRACE_S)
        assert c.scheduler.moved == 0 and loop in c.scheduler.loops and not loop.retiring

        # Removed mid-load: the first replicas keep their requests through the grace, then they move.
        # A request just started there has more steps left than the grace period lasts.
        assert wait_until(lambda: c.fresh_on(first, c.drafter[FIRST], MAX_TOKENS // 8), 30), "no request started on the first replicas to move"
        records.set(SECOND, name=VERIFIER)
        records.set(SECOND, name=DRAFTER)
        removed = time.monotonic()
        assert wait_until(lambda: first not in c.placement(), GRACE_S + 20), f"the removed verifier was never dropped: {c.diagnose()}"
        assert time.monotonic() - removed >= GRACE_S, "the removed verifier was dropped before its grace period"
        assert wait_until(lambda: c.drafter[FIRST] not in group.clients, 10), "the removed drafter replica was never dropped"
        calls = c.drafters[FIRST].calls
        time.sleep(1.0)
        assert c.drafters[FIRST].calls == calls, "the removed drafter replica was still called after its grace period"
        assert c.placement().get(second, 0) > 0
        c.finish()
        assert c.scheduler.moved > 0, "no request was running on the removed verifier when its grace period ended"
        assert group.moved > 0, "no request moved off the removed drafter replica"
        assert c.drafters[SECOND].full_sends > 0
    assert time.monotonic() - started < 90


def test_a_removed_replica_whose_calls_fail_hands_its_requests_over_at_once(tiny_target, zone):
    """A pod deleted: its address leaves DNS and its server stops. Its requests move on the failed
    call, long before the grace period would move them, and none is lost."""
    records, dns_port = zone
    records.set(FIRST, SECOND, name=VERIFIER)
    records.set(FIRST, name=DRAFTER)
    with cell(tiny_target, records, dns_port, grace_s=600) as c:
        first = c.verifier[FIRST]
        assert sorted(c.placement()) == sorted(c.verifier.values())  # both SERVING at startup: both used
        assert wait_until(lambda: c.placement().get(first, 0) > 0, 30), "nothing ran on the first verifier"
        records.set(SECOND, name=VERIFIER)
        c.servers[FIRST].stop()  # cancels its calls in flight
        stopped = time.monotonic()
        assert wait_until(lambda: c.placement().get(first, 0) == 0, 10)
        time.sleep(1.0)
        c.finish(timeout_s=30, min_streams=6)
        assert time.monotonic() - stopped < 60 and c.scheduler.moved == 0  # moved by the failure, not the grace


def test_startup_waits_for_a_serving_replica_and_says_which_it_found(zone):
    records, dns_port = zone
    records.set("127.0.0.3", name=VERIFIER)  # nothing listens there
    follower = Follower(ReplicaDiscovery(parse_address(f"dns://127.0.0.1:{dns_port}/{VERIFIER}:{free_port()}"), refresh_s=REFRESH_S))
    with pytest.raises(TimeoutError, match="127.0.0.3.*none reported SERVING"):
        asyncio.run(follower.first_serving(1.0))
