"""Several verifier replicas behind one router: a replica that dies mid-load, or loses its state, costs no
request; its requests are re-admitted on another replica from their committed tokens and finish with
exactly the output they would have had (greedy: the target's own; seeded sampling without drafts: the
same tokens, since draws are keyed by position)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from smartspec.wire import router_pb2, verifier_pb2, verifier_pb2_grpc
from tests.support import ServerThread, assert_lossless, reference_greedy
from tests.test_router_stack import RouterThread, generate_many, lookup_drafter, tokenizer_for, wait_until

PROMPTS = [f"Replica test {i}: the quick brown fox jumps over the lazy dog number {i}." for i in range(12)]
MAX_TOKENS = 80


def start_verifier(path) -> ServerThread:
    from verifier_svc.main import build_servicer
    from verifier_svc.server import SERVICE_NAME

    servicer = build_servicer(str(path), max_sequences=16)
    return ServerThread(lambda s: verifier_pb2_grpc.add_VerifierServiceServicer_to_server(servicer, s), [SERVICE_NAME])


def live(address: str) -> int:
    try:
        with grpc.insecure_channel(address) as channel:
            return verifier_pb2_grpc.VerifierServiceStub(channel).Info(verifier_pb2.InfoRequest(), timeout=5).live_sequences
    except grpc.RpcError:
        return -1


def requests() -> list[router_pb2.GenerateRequest]:
    """Greedy requests with and without speculation, and seeded sampling ones without drafts (with drafts,
    the token right after a failover is drawn differently: only its distribution is kept)."""
    out = []
    for i, prompt in enumerate(PROMPTS):
        drafter = ("prompt_lookup", "none")[i % 2]
        if i % 3 == 2:
            out.append(router_pb2.GenerateRequest(prompt=prompt, max_tokens=MAX_TOKENS, drafter="none", temperature=0.8, top_k=20, seed=i))
        else:
            out.append(router_pb2.GenerateRequest(prompt=prompt, max_tokens=MAX_TOKENS, drafter=drafter, policy="fixed:3"))
    return out


@pytest.fixture
def replicas(tiny_target):
    servers = [start_verifier(tiny_target), start_verifier(tiny_target)]
    router = RouterThread(tokenizer_for(str(tiny_target)), [s.address for s in servers], {"prompt_lookup": lookup_drafter().address}, max_batch=32)
    yield router, servers
    router.stop()
    for server in servers:
        server.stop()  # a no-op for one the test stopped


def check_outputs(replies, expected_sampled, tiny_target) -> None:
    tokenizer = tokenizer_for(str(tiny_target))
    for request, reply in zip(requests(), replies):
        assert isinstance(reply, router_pb2.GenerateResponse), reply
        if request.temperature:
            assert list(reply.token_ids) == expected_sampled[request.seed], f"seed {request.seed} changed its output"
        else:
            ref, gaps = reference_greedy(tiny_target, tokenizer(request.prompt).input_ids, MAX_TOKENS)
            assert_lossless(list(reply.token_ids), ref, gaps)


def test_a_replica_that_dies_mid_load_loses_no_request(replicas, tiny_target):
    router, (first, second) = replicas
    healthy = generate_many(router.stub, requests())  # the reference for the seeded sampling requests
    expected_sampled = {r.seed: list(reply.token_ids) for r, reply in zip(requests(), healthy) if r.temperature}
    check_outputs(healthy, expected_sampled, tiny_target)

    futures = [router.stub.Generate.future(request, timeout=120) for request in requests()]
    assert wait_until(lambda: live(second.address) > 0 and live(first.address) > 0, 20)  # both hold requests
    second.stop()  # the replica goes away mid-load, with its KV caches
    replies = []
    for future in futures:
        try:
            replies.append(future.result())
        except grpc.RpcError as err:
            replies.append(err)
    check_outputs(replies, expected_sampled, tiny_target)
    replica = router.servicer.scheduler.verifiers[second.address]
    assert replica.failures >= 1 and not replica.holding
    assert wait_until(lambda: live(first.address) == 0)  # everything released on the survivor


def test_a_replica_that_lost_its_state_gets_the_requests_again(replicas, tiny_target):
    router, servers = replicas
    stream = router.stub.GenerateStream(router_pb2.GenerateRequest(prompt=PROMPTS[0], max_tokens=MAX_TOKENS, drafter="none"), timeout=60)
    chunks = [next(stream)]
    holder = next(s for s in servers if live(s.address) == 1)
    with grpc.insecure_channel(holder.address) as channel:  # as if it had restarted: the request is gone
        (request_id,) = router.servicer.scheduler.verifiers[holder.address].holding
        verifier_pb2_grpc.VerifierServiceStub(channel).Release(verifier_pb2.ReleaseRequest(request_ids=[request_id]), timeout=5)
    chunks += list(stream)
    tokens = [t for c in chunks for t in c.token_ids]
    ref, gaps = reference_greedy(tiny_target, tokenizer_for(str(tiny_target))(PROMPTS[0]).input_ids, MAX_TOKENS)
    assert_lossless(tokens, ref, gaps)


def test_with_every_replica_gone_requests_fail_cleanly(replicas):
    router, servers = replicas
    scheduler = router.servicer.scheduler
    # a longer first backoff, so that waiting it out is visible even on a loaded machine
    scheduler.verifiers._base_backoff = 10.0
    for server in servers:
        server.stop()
    replies = generate_many(router.stub, requests()[:4], timeout=60)
    assert all(isinstance(r, grpc.RpcError) and r.code() == grpc.StatusCode.UNAVAILABLE for r in replies), replies
    # Now every replica is backing off (each loop retries its own replica on its own clock, so one whose
    # backoff ran out would be tried at once: back them all off together): new requests wait for the
    # next try (which fails them) while the router keeps answering, rather than spinning on its event loop.
    router.call(_back_off_all(scheduler.verifiers, 5.0))
    futures = [router.stub.Generate.future(r, timeout=60) for r in requests()[:4]]
    assert wait_until(lambda: len(scheduler.waiting) == 4, 5)
    started = time.monotonic()
    router.stub.Stats(router_pb2.StatsRequest(), timeout=5)
    assert time.monotonic() - started < 0.3
    for future in futures:
        with pytest.raises(grpc.RpcError) as err:
            future.result()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def _back_off_all(pool, seconds: float) -> None:
    for replica in pool.replicas:
        replica.retry_at = max(replica.retry_at, time.monotonic() + seconds)


def test_up_with_two_verifiers_survives_killing_one(tiny_target, tiny_draft, tmp_path):
    """`smartspec up --verifiers 2`: SIGKILL one verifier process while requests run."""
    import re

    from tests.test_cli_up import _children, _env, _read_line

    log_path = tmp_path / "up.log"
    log = open(log_path, "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "smartspec.cli", "up", "--port", "0", "--verifiers", "2", "--drafters", "prompt_lookup",
         "--target-model", str(tiny_target), "--grace-s", "10", "--http-port", "-1"],
        stdout=subprocess.PIPE, stderr=log, text=True, env=_env(),
    )
    try:
        line = _read_line(process, timeout=180)
        match = re.match(r"^ready router=(\S+) verifier=(\S+) verifier2=(\S+) prompt_lookup=(\S+)$", line.strip())
        assert match, f"no ready line (got {line!r}); log:\n{log_path.read_text()[-3000:]}"
        router_address, _, second_address, _ = match.groups()
        with grpc.insecure_channel(router_address) as channel:
            from smartspec.wire import router_pb2_grpc

            stub = router_pb2_grpc.RouterServiceStub(channel)
            greedy = [r for r in requests() if not r.temperature]
            futures = [stub.Generate.future(r, timeout=120) for r in greedy]
            assert wait_until(lambda: live(second_address) > 0, 20)
            port = second_address.rsplit(":", 1)[1]
            victim = next(pid for pid, cmd in _children(process.pid).items() if "serve verifier" in cmd and _listens(pid, port))
            os.kill(victim, signal.SIGKILL)
            replies = [f.result() for f in futures]
        tokenizer = tokenizer_for(str(tiny_target))
        for request, reply in zip(greedy, replies):
            ref, gaps = reference_greedy(tiny_target, tokenizer(request.prompt).input_ids, MAX_TOKENS)
            assert_lossless(list(reply.token_ids), ref, gaps)
        assert "move to another replica" in log_path.read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _listens(pid: int, port: str) -> bool:
    """Whether process `pid` has a listening socket on `port` (from `ss`)."""
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, timeout=10).stdout
    return f"pid={pid}," in out
