"""Replicas found by DNS (issue 18): a real DNS server started here (dnslib on a loopback UDP port, as in
tests/test_discovery.py) names the verifier and drafter replicas, and its records change while
requests stream. Replicas listen on the same port of different loopback addresses (127.0.0.1, 127.0.0.2:
Linux routes all of 127/8 to lo), so one name:port stands for all of them, as a headless Service's does."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Iterator

import pytest
from dnslib.server import DNSServer

from smartspec.wire import drafter_pb2_grpc, router_pb2, verifier_pb2_grpc
from tests.support import ServerThread, first_mismatch, reference_greedy
from tests.test_discovery import Records
from tests.test_router_stack import RouterThread, ScriptedDrafter, tokenizer_for, wait_until

VERIFIER = "verifier.cell.test"
DRAFTER = "drafter.cell.test"
REFRESH_S = 0.2
GRACE_S = 1.5
MAX_TOKENS = 64
FIRST, SECOND = "127.0.0.1", "127.0.0.2"


@pytest.fixture
def zone() -> Iterator[tuple[Records, int]]:
    records = Records()
    server = DNSServer(records, address="127.0.0.1", port=0)
    server.start_thread()
    try:
        yield records, server.server.server_address[1]
    finally:
        server.stop()


def free_port() -> int:
    """A port free on 127.0.0.1 (the replicas bind it on each of their loopback addresses)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _placement(scheduler) -> dict[str, int]:
    """How many requests each verifier replica's loop runs (read on the router's loop)."""
    return {loop.replica.address: len(loop.running) for loop in scheduler.loops}


def test_replicas_added_and_removed_in_dns_take_requests_and_lose_none(tiny_target, zone):
    from verifier_svc.main import build_servicer
    from verifier_svc.server import SERVICE_NAME as VERIFIER_SERVICE
    from drafter_svc.server import SERVICE_NAME as DRAFTER_SERVICE

    records, dns_port = zone
    tokenizer = tokenizer_for(str(tiny_target))
    vport, dport = free_port(), free_port()
    verifiers = {
        ip: ServerThread(lambda s: verifier_pb2_grpc.add_VerifierServiceServicer_to_server(build_servicer(str(tiny_target), max_sequences=8), s),
                         [VERIFIER_SERVICE], host=ip, port=vport)
        for ip in (FIRST, SECOND)
    }
    drafters = {ip: ScriptedDrafter() for ip in (FIRST, SECOND)}
    drafter_servers = [
        ServerThread(lambda s, d=d: drafter_pb2_grpc.add_DrafterServiceServicer_to_server(d, s), [DRAFTER_SERVICE], host=ip, port=dport)
        for ip, d in drafters.items()
    ]
    records.set(FIRST, name=VERIFIER)
    records.set(FIRST, name=DRAFTER)
    router = RouterThread(
        tokenizer, f"dns://127.0.0.1:{dns_port}/{VERIFIER}:{vport}", {"scripted": f"dns://127.0.0.1:{dns_port}/{DRAFTER}:{dport}"},
        drafter="scripted", policy="fixed:3", max_tokens=MAX_TOKENS, max_batch=16, dns_refresh_s=REFRESH_S, replica_grace_s=GRACE_S,
    )
    first, second = f"{FIRST}:{vport}", f"{SECOND}:{vport}"
    streams: list[dict] = []
    errors: list[BaseException] = []
    done = threading.Event()
    counter = iter(range(10_000))

    def client() -> None:  # one stream at a time until the test ends
        try:
            while not done.is_set():
                prompt = f"Stream {next(counter)}: the quick brown fox jumps over the lazy dog."
                record = {"prompt": tokenizer(prompt).input_ids, "tokens": []}
                streams.append(record)
                for message in router.stub.GenerateStream(router_pb2.GenerateRequest(prompt=prompt), timeout=60):
                    record["tokens"] += message.token_ids
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    def placement() -> dict[str, int]:
        return router.call(_placement(router.servicer.scheduler), timeout=5)

    started = time.monotonic()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
    try:
        assert [loop.replica.address for loop in router.servicer.scheduler.loops] == [first]
        for thread in threads:
            thread.start()
        assert wait_until(lambda: drafters[FIRST].calls > 0 and placement().get(first, 0) > 0, 30), "the load never started"

        # Added mid-load: the second verifier and drafter replicas take new requests.
        records.set(FIRST, SECOND, name=VERIFIER)
        records.set(FIRST, SECOND, name=DRAFTER)
        assert wait_until(lambda: placement().get(second, 0) > 0, 20), f"the added verifier took no request: {placement()}"
        assert wait_until(lambda: drafters[SECOND].calls > 0, 20), "the added drafter replica took no request"

        # A readiness flap shorter than the grace period moves nothing.
        scheduler = router.servicer.scheduler
        loop = next(loop for loop in scheduler.loops if loop.replica.address == second)
        records.set(FIRST, name=VERIFIER)
        assert wait_until(lambda: loop.replica.leaving, 5)
        records.set(FIRST, SECOND, name=VERIFIER)
        assert wait_until(lambda: not loop.replica.leaving, 5)
        time.sleep(GRACE_S)
        assert scheduler.moved == 0 and loop in scheduler.loops and not loop.retiring

        # Removed mid-load: the first replicas' requests stay through the grace, then move; none is lost.
        assert wait_until(lambda: placement().get(first, 0) > 0, 20), "nothing ran on the first verifier to move"
        records.set(SECOND, name=VERIFIER)
        records.set(SECOND, name=DRAFTER)
        removed = time.monotonic()
        assert wait_until(lambda: first not in placement(), GRACE_S + 20), f"the removed verifier was never dropped: {placement()}"
        assert time.monotonic() - removed >= GRACE_S, "the removed verifier was dropped before its grace period"
        assert wait_until(lambda: FIRST + f":{dport}" not in router.servicer.scheduler.drafters["scripted"].clients, 10)
        calls = drafters[FIRST].calls
        time.sleep(1.0)
        assert drafters[FIRST].calls == calls, "the removed drafter replica was still called after its grace period"
        assert placement().get(second, 0) > 0
        done.set()
        for thread in threads:
            thread.join(timeout=60)
            assert not thread.is_alive(), "a stream never finished"
    finally:
        done.set()
        router.stop()
        for server in [*verifiers.values(), *drafter_servers]:
            server.stop()
    assert not errors, f"{len(errors)} streams failed: {errors[0]!r}"
    assert time.monotonic() - started < 90
    assert scheduler.moved > 0, "no request was running on the removed verifier when its grace period ended"
    assert router.servicer.scheduler.drafters["scripted"].moved > 0, "no request moved off the removed drafter replica"
    assert drafters[SECOND].full_sends > 0
    assert len(streams) >= 12
    for stream in streams:
        ref, gaps = reference_greedy(tiny_target, stream["prompt"], MAX_TOKENS)
        assert first_mismatch(stream["tokens"], ref, gaps) is None
