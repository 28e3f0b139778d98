"""Each verifier replica has its own step loop: a replica that stops answering holds only its own
requests. The others keep streaming without a pause, and once it answers again everything it held
finishes with exactly the target's greedy output. A replica that cancels calls (a server stopping with
calls in flight) is a failed replica: its requests move, none fails."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import grpc

from smartspec.serving import wait_serving
from smartspec.wire import router_pb2, verifier_pb2_grpc
from tests.support import ServerThread, assert_lossless, reference_greedy
from tests.test_router_behaviour import GatedVerifier
from tests.test_router_failover import live
from tests.test_router_stack import RouterThread, tokenizer_for, wait_until
from tests.test_service_lifecycle import serve

STOP_S = 10.0
MAX_GAP_S = 1.0
MAX_TOKENS = 40


async def _placement(scheduler) -> list[tuple[str, list[tuple[int, ...]]]]:
    """Which prompts each replica's loop is running (read on the router's loop)."""
    return [(loop.replica.address, [tuple(r.prompt_ids) for r in loop.running]) for loop in scheduler.loops]


def test_a_stopped_replica_holds_only_its_own_requests(tiny_target, tmp_path):
    tokenizer = tokenizer_for(str(tiny_target))
    argv = ["verifier", "--target-model", str(tiny_target), "--max-sequences", "16", "--threads", "1"]
    with serve(argv, tmp_path / "a.log") as (_, first), serve(argv, tmp_path / "b.log") as (victim, second):
        for address in (first, second):
            asyncio.run(wait_serving(address, 60))
        router = RouterThread(tokenizer, [first, second], {}, max_batch=32, drafter="none", policy="none", max_tokens=MAX_TOKENS)
        try:
            streams: list[dict] = []  # per stream: prompt ids, message times, tokens
            seen: dict[tuple[int, ...], set[str]] = {}  # prompt -> the replicas it was seen running on
            done = threading.Event()
            counter = iter(range(10_000))

            def client() -> None:  # keeps one stream going at a time until the test ends
                while not done.is_set():
                    prompt = f"Stream {next(counter)}: the quick brown fox jumps over the lazy dog."
                    record = {"prompt": tuple(tokenizer(prompt).input_ids), "times": [time.monotonic()], "tokens": []}
                    streams.append(record)
                    for message in router.stub.GenerateStream(router_pb2.GenerateRequest(prompt=prompt), timeout=120):
                        record["times"].append(time.monotonic())
                        record["tokens"] += message.token_ids

            def watch() -> None:
                while not done.is_set():
                    for address, prompts in router.call(_placement(router.servicer.scheduler), timeout=5):
                        for prompt in prompts:
                            seen.setdefault(prompt, set()).add(address)
                    time.sleep(0.02)

            threads = [threading.Thread(target=client, daemon=True) for _ in range(6)] + [threading.Thread(target=watch, daemon=True)]
            for thread in threads:
                thread.start()
            assert wait_until(lambda: live(first) > 0 and live(second) > 0, 30), "the load never reached both replicas"
            os.kill(victim.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            time.sleep(STOP_S)
            os.kill(victim.pid, signal.SIGCONT)
            resumed = time.monotonic()
            time.sleep(1.0)
            done.set()
            for thread in threads:
                thread.join(timeout=60)
                assert not thread.is_alive(), "a stream never finished after the replica resumed"
        finally:
            router.stop()

    during = [s for s in streams if s["times"][0] < resumed and s["times"][-1] > stopped]
    elsewhere = [s for s in during if seen.get(s["prompt"]) == {first}]
    held = [s for s in during if second in seen.get(s["prompt"], ())]
    assert len(elsewhere) >= 10 and held, f"{len(elsewhere)} streams ran on the healthy replica and {len(held)} on the stopped one"
    for stream in elsewhere:
        gaps = [b - a for a, b in zip(stream["times"], stream["times"][1:])]
        assert max(gaps) <= MAX_GAP_S, f"a stream on the healthy replica waited {max(gaps):.1f}s for a message"
    assert any(max(b - a for a, b in zip(s["times"], s["times"][1:])) > STOP_S / 2 for s in held), "the stop held nothing"
    for stream in during:  # token-exact, also the ones the stop held
        ref, gaps = reference_greedy(tiny_target, list(stream["prompt"]), MAX_TOKENS)
        assert_lossless(stream["tokens"], ref, gaps)


def test_a_replica_that_cancels_its_calls_loses_no_request(tiny_target):
    """A verifier that stops with a Verify in flight cancels it (CANCELLED): the request moves to the
    other replica and finishes token-exact, rather than failing."""
    from verifier_svc.main import build_servicer
    from verifier_svc.server import SERVICE_NAME

    gated = [GatedVerifier(build_servicer(str(tiny_target), max_sequences=4)) for _ in range(2)]
    servers = [ServerThread(lambda s, g=g: verifier_pb2_grpc.add_VerifierServiceServicer_to_server(g, s), [SERVICE_NAME]) for g in gated]
    # cost profile off: its sweep would wait at the gates (the test is about the cancelled call, not costs)
    router = RouterThread(tokenizer_for(str(tiny_target)), [s.address for s in servers], {}, drafter="none", max_tokens=MAX_TOKENS, cost_profile="off")
    prompt = "A cancelled call: the quick brown fox jumps over the lazy dog."
    try:
        future = router.stub.Generate.future(router_pb2.GenerateRequest(prompt=prompt), timeout=60)
        assert wait_until(lambda: any(g.verifying.is_set() for g in gated), 20), "no Verify reached a gate"
        holder = next(i for i, g in enumerate(gated) if g.verifying.is_set())
        gated[1 - holder].gate.set()  # the other replica verifies freely
        servers[holder].call(servers[holder].running.server.stop(0))  # cancels the held Verify
        reply = future.result()
    finally:
        router.stop()
        for g, server in zip(gated, servers):
            g.gate.set()
            server.stop()
    ref, gaps = reference_greedy(tiny_target, tokenizer_for(str(tiny_target))(prompt).input_ids, MAX_TOKENS)
    assert_lossless(list(reply.token_ids), ref, gaps)
