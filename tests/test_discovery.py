"""DNS discovery of replicas (router/discovery.py) against a real DNS server started here: dnslib on a
loopback UDP port, answering from records the tests change while a discovery watches."""

from __future__ import annotations

import asyncio
import threading
from typing import Iterator

import pytest
from dnslib import AAAA, QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from router.discovery import Change, DnsTarget, ReplicaDiscovery, parse_address, reconcile

NAME = "verifier.cell.svc.cluster.local"
REFRESH_S = 0.2


class Records(BaseResolver):
    """A zone whose A/AAAA records the test sets (of NAME unless named); `failing` answers SERVFAIL to
    everything; any other name is NXDOMAIN."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ips: dict[str, list[str]] = {}
        self.failing = False

    def set(self, *ips: str, name: str = NAME) -> None:
        with self._lock:
            self._ips[name] = list(ips)

    def resolve(self, request, handler):
        reply = request.reply()
        question = request.q
        if self.failing:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        name = str(question.qname).rstrip(".")
        with self._lock:
            ips = self._ips.get(name)
        if ips is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for ip in ips:
            v6 = ":" in ip
            if question.qtype == (QTYPE.AAAA if v6 else QTYPE.A):
                reply.add_answer(RR(name, question.qtype, rdata=AAAA(ip) if v6 else A(ip), ttl=1))
        return reply


@pytest.fixture
def zone() -> Iterator[tuple[Records, int]]:
    records = Records()
    server = DNSServer(records, address="127.0.0.1", port=0, logger=DNSLogger(logf=lambda line: None))
    server.start_thread()
    try:
        yield records, server.server.server_address[1]
    finally:
        server.stop()


def discovery(port: int, name: str = NAME, **kwargs) -> ReplicaDiscovery:
    return ReplicaDiscovery(parse_address(f"dns://127.0.0.1:{port}/{name}:50052"), refresh_s=REFRESH_S, **kwargs)


def test_parse_address_reads_grpcs_dns_forms_and_leaves_static_addresses_alone():
    assert parse_address("10.0.0.1:50052") is None
    assert parse_address("verifier:50052") is None
    assert parse_address("dns:///verifier.ns.svc.cluster.local:50052") == DnsTarget("verifier.ns.svc.cluster.local", 50052)
    assert parse_address("dns:verifier:7") == DnsTarget("verifier", 7)
    assert parse_address("dns://10.96.0.10/verifier:50052") == DnsTarget("verifier", 50052, ("10.96.0.10", 53))
    assert parse_address("dns://127.0.0.1:5353/verifier:50052") == DnsTarget("verifier", 50052, ("127.0.0.1", 5353))
    assert parse_address("dns://[::1]:5353/verifier:1") == DnsTarget("verifier", 1, ("::1", 5353))
    for bad in ("dns:///verifier", "dns:///verifier:0", "dns:///:50052", "dns://kube-dns/verifier:1", "dns://10.0.0.1"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_reconcile_reports_added_and_removed_addresses_with_the_time_they_vanished():
    change = reconcile({"a:1", "b:1"}, {"b:1", "c:1"}, now=7.5)
    assert change == Change(added=frozenset({"c:1"}), removed={"a:1": 7.5})
    assert not reconcile({"a:1"}, {"a:1"}, now=1.0)


class Clock:
    """A clock the test sets, so a removal's timestamp is known exactly."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def next_change(changes, timeout_s: float = 10 * REFRESH_S) -> Change:
    return await asyncio.wait_for(anext(changes), timeout_s)


def test_watch_sees_replicas_added_and_removed_within_the_refresh_interval(zone):
    records, port = zone
    clock = Clock()

    async def scenario() -> None:
        records.set("10.0.0.1")
        changes = discovery(port, clock=clock).watch()
        try:
            assert await next_change(changes) == Change(added=frozenset({"10.0.0.1:50052"}))
            records.set("10.0.0.1", "10.0.0.2", "fd00::3")
            assert await next_change(changes) == Change(added=frozenset({"10.0.0.2:50052", "[fd00::3]:50052"}))
            clock.now = 105.0
            records.set("10.0.0.2", "fd00::3")
            assert await next_change(changes) == Change(removed={"10.0.0.1:50052": 105.0})
        finally:
            await changes.aclose()

    asyncio.run(scenario())


def test_a_failing_resolver_keeps_the_last_known_addresses(zone):
    records, port = zone
    clock = Clock()

    async def scenario() -> None:
        records.set("10.0.0.1", "10.0.0.2")
        watched = discovery(port, clock=clock)
        assert await watched.refresh() == Change(added=frozenset({"10.0.0.1:50052", "10.0.0.2:50052"}))
        records.failing = True  # SERVFAIL
        assert await watched.refresh() is None
        assert watched.addresses == {"10.0.0.1:50052", "10.0.0.2:50052"}
        records.failing = False
        records.set("10.0.0.2")
        clock.now = 110.0
        assert await watched.refresh() == Change(removed={"10.0.0.1:50052": 110.0})

    asyncio.run(scenario())


def test_an_unreachable_resolver_keeps_the_last_known_addresses(zone):
    records, port = zone

    async def scenario() -> None:
        records.set("10.0.0.1")
        watched = discovery(port, timeout_s=0.3)
        await watched.refresh()
        watched._resolver.port = 9  # discard: nothing answers, the lookup times out
        assert await watched.refresh() is None
        assert watched.addresses == {"10.0.0.1:50052"}

    asyncio.run(scenario())


def test_a_name_without_addresses_is_an_empty_answer_not_an_error(zone):
    records, port = zone
    clock = Clock()

    async def scenario() -> None:
        assert await discovery(port, name="nothing.example").refresh() == Change()
        records.set("10.0.0.1")
        watched = discovery(port, clock=clock)
        await watched.refresh()
        records.set()  # a headless Service with no ready pod
        assert await watched.refresh() == Change(removed={"10.0.0.1:50052": clock.now})

    asyncio.run(scenario())
