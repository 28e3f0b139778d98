"""Replicas found by DNS: a verifier or drafter address of gRPC's form `dns:///NAME:PORT` (the system's
resolver) or `dns://RESOLVER/NAME:PORT` (that DNS server, e.g. `dns://10.96.0.10/...` or
`dns://127.0.0.1:5353/...`) stands for every A and AAAA address NAME resolves to, re-resolved every few
seconds, so the router can follow the replicas a cluster adds, moves and removes (on Kubernetes, NAME is a
headless Service: its DNS answer holds the ready pods). A plain `HOST:PORT` stays one static address.

    discovery = ReplicaDiscovery(parse_address("dns:///verifier.ns.svc.cluster.local:50052"))
    async for change in discovery.watch():   # the first change adds every address found
        for address in change.added: ...      # connect; use it once its health check says SERVING
        for address, since in change.removed.items(): ...  # no new requests; move its requests on a
                                                            # failed RPC or once `since` is a grace period old

`reconcile(old, new, now)` is the pure part (what changed between two answers). A failed lookup (a
timeout, SERVFAIL, an unreachable resolver) changes nothing: the last known set stays, so a DNS outage
never drops every replica. A name that does not exist or has no address (NXDOMAIN, no A/AAAA records) is
an answer, the empty set: a headless Service with no ready pod answers that way.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterable

import dns.asyncresolver
import dns.exception
import dns.resolver

log = logging.getLogger("smartspec.router.discovery")

SCHEME = "dns:"
DNS_PORT = 53
DEFAULT_REFRESH_S = 5.0
DEFAULT_TIMEOUT_S = 2.0
# How long a replica whose address vanished keeps its requests (router/follow.py): a readiness flap
# shorter than this moves nothing.
DEFAULT_GRACE_S = 30.0


@dataclass(frozen=True)
class DnsTarget:
    """A parsed `dns:` address: resolve `name` (at `resolver`, or the system's when None) and use `port`."""

    name: str
    port: int
    resolver: tuple[str, int] | None = None  # (IP address, port) of the DNS server


def parse_address(address: str) -> DnsTarget | None:
    """The DnsTarget of a `dns:` address, or None for a static HOST:PORT. Raises ValueError for a `dns:`
    address without a name or port (gRPC would default the port to 443; here it must be explicit)."""
    if not address.startswith(SCHEME):
        return None
    rest = address[len(SCHEME):]
    if rest.startswith("//"):
        authority, slash, path = rest[2:].partition("/")
        if not slash:
            raise ValueError(f"{address!r}: expected dns:///NAME:PORT or dns://RESOLVER/NAME:PORT")
    else:  # dns:NAME:PORT, gRPC's form without an authority
        authority, path = "", rest
    name, port = _split_host_port(path, address, default_port=None)
    resolver = _split_host_port(authority, address, default_port=DNS_PORT) if authority else None
    if resolver is not None:
        try:
            ipaddress.ip_address(resolver[0])
        except ValueError:
            raise ValueError(f"{address!r}: the resolver must be an IP address (got {resolver[0]!r})") from None
    return DnsTarget(name=name, port=port, resolver=resolver)


def _split_host_port(text: str, address: str, default_port: int | None) -> tuple[str, int]:
    """'host:port', '[v6]:port', or (with a default port) 'host' and '[v6]' -> (host, port)."""
    if text.startswith("["):
        host, bracket, tail = text[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else None
        if not bracket or (tail and port_text is None):
            raise ValueError(f"{address!r}: malformed bracketed address {text!r}")
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            host, port_text = text, None
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{address!r}: no port; expected NAME:PORT")
        return host, default_port
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{address!r}: expected NAME:PORT with a port from 1 to 65535, got {text!r}")
    return host, int(port_text)


def host_port(ip: str, port: int) -> str:
    """An address as gRPC targets spell it: IPv6 in brackets."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass(frozen=True)
class Change:
    """What one resolution changed: addresses that appeared, and addresses that vanished with the time
    (the discovery's clock) their absence was first seen, from which the caller counts its grace period."""

    added: frozenset[str] = frozenset()
    removed: dict[str, float] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


def reconcile(old: Iterable[str], new: Iterable[str], now: float) -> Change:
    """The change from the address set `old` to `new`, vanished addresses stamped `now`."""
    old, new = set(old), set(new)
    return Change(added=frozenset(new - old), removed=dict.fromkeys(sorted(old - new), now))


class ReplicaDiscovery:
    """Follows the addresses behind one `dns:` target. `refresh()` resolves once; `watch()` resolves
    every `refresh_s` seconds and yields each change. `addresses` is the last known set."""

    def __init__(self, target: DnsTarget, refresh_s: float = DEFAULT_REFRESH_S, timeout_s: float = DEFAULT_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.target = target
        self.refresh_s = refresh_s
        self.addresses: frozenset[str] = frozenset()
        self.clock = clock  # stamps vanished addresses; a caller counts grace periods on it
        self._failing = False
        # The system's resolver uses the search domains of resolv.conf (a short name works as with gRPC);
        # a named resolver gets the name as given, made absolute.
        self._search = target.resolver is None
        self._resolver = dns.asyncresolver.Resolver(configure=self._search)
        if target.resolver is not None:
            self._resolver.nameservers = [target.resolver[0]]
            self._resolver.port = target.resolver[1]
        self._resolver.lifetime = timeout_s
        self._resolver.cache = None  # every refresh asks the server: its answer is the replica set now

    async def resolve(self) -> frozenset[str]:
        """Every address the name resolves to now (A and AAAA), as HOST:PORT. Raises dns.exception.DNSException
        when the lookup itself fails; a name without addresses is the empty set."""
        answers = await asyncio.gather(self._lookup("A"), self._lookup("AAAA"))
        return frozenset(host_port(ip, self.target.port) for answer in answers for ip in answer)

    async def _lookup(self, rdtype: str) -> list[str]:
        try:
            answer = await self._resolver.resolve(self.target.name, rdtype, search=self._search)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        return [record.address for record in answer]

    async def refresh(self) -> Change | None:
        """Resolves once and adopts the answer: the change it makes (possibly empty; the first answer adds
        everything), or None when the lookup failed and the last known set stays."""
        try:
            found = await self.resolve()
        except dns.exception.DNSException as err:
            if not self._failing:
                log.warning("resolving %s failed (%s); keeping the %d known addresses", self.target.name, err or type(err).__name__,
                            len(self.addresses))
            self._failing = True
            return None
        if self._failing:
            log.info("resolving %s works again", self.target.name)
        self._failing = False
        change = reconcile(self.addresses, found, self.clock())
        self.addresses = found
        return change

    async def watch(self) -> AsyncIterator[Change]:
        """Yields the first successful answer's change (every address found, possibly none), then each
        non-empty change, resolving every `refresh_s` seconds; runs until cancelled."""
        first = True
        while True:
            change = await self.refresh()
            if change is not None and (change or first):
                first = False
                yield change
            await asyncio.sleep(self.refresh_s)
