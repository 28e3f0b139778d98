"""Stats(reset=true) while the router serves: the reset waits for the step in flight (no request ever
fails because of it), and behind a bearer token only an authenticated caller may reset."""

from __future__ import annotations

import threading

import grpc
import pytest

from smartspec.security import ServerSecurity
from smartspec.wire import router_pb2, router_pb2_grpc
from tests.test_router_stack import RouterThread, real_drafters, tokenizer_for, verifier_for

TOKEN = "reset-token"
STREAMS = 6
MAX_TOKENS = 120
RESETS = 100


@pytest.fixture(scope="module")
def router(tiny_target, tiny_draft):
    router = RouterThread(tokenizer_for(str(tiny_target)), verifier_for(str(tiny_target)).address, real_drafters(str(tiny_target), str(tiny_draft)),
                          cost_profile="off")
    yield router
    router.stop()


def _read(stream, out: list, index: int, started: threading.Barrier) -> None:
    """Collects one stream's chunks (or its error) into out[index]; meets the others after the first chunk."""
    chunks = []
    try:
        for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 1:
                started.wait(timeout=60)
        out[index] = chunks
    except grpc.RpcError as err:
        out[index] = err
        started.abort()


def test_a_hundred_resets_during_load_fail_no_request(router):
    """Several streaming requests share the running batch while Stats(reset=true) arrives 100 times; every
    request finishes with all its tokens, and the resets did land while they ran."""
    drafters = ("prompt_lookup", "draft_model", "auto")
    requests = [
        router_pb2.GenerateRequest(prompt=f"one two three four one two three four {i}", max_tokens=MAX_TOKENS, drafter=drafters[i % len(drafters)],
                                   policy="goodput")
        for i in range(STREAMS)
    ]
    results: list = [None] * STREAMS
    started = threading.Barrier(STREAMS + 1)
    readers = [
        threading.Thread(target=_read, args=(router.stub.GenerateStream(request, timeout=300), results, i, started), daemon=True)
        for i, request in enumerate(requests)
    ]
    for reader in readers:
        reader.start()
    started.wait(timeout=120)  # every request is running
    steps_seen = []
    for _ in range(RESETS):
        steps_seen.append(router.stub.Stats(router_pb2.StatsRequest(reset=True), timeout=30).steps)
    still_running = sum(reader.is_alive() for reader in readers)
    for reader in readers:
        reader.join(timeout=300)

    failed = [r for r in results if not isinstance(r, list)]
    assert failed == [], failed
    for chunks in results:
        assert chunks[-1].finish_reason == router_pb2.FINISH_REASON_LENGTH
        assert sum(len(c.token_ids) for c in chunks) == MAX_TOKENS
    # the resets overlapped the load: steps ran between them, and requests were still running after the last
    assert sum(1 for steps in steps_seen[1:] if steps > 0) > 0 and still_running > 0


def test_a_reset_on_an_idle_router_applies_at_once(router):
    """No step in flight: the very next Stats sees a controller back at its priors (what `smartspec bench`
    relies on between policy runs)."""
    reply = router.stub.Generate(router_pb2.GenerateRequest(prompt="count one two three", max_tokens=8, drafter="prompt_lookup"), timeout=60)
    assert len(reply.token_ids) == 8
    assert router.stub.Stats(router_pb2.StatsRequest(reset=True), timeout=10).steps > 0
    assert router.stub.Stats(router_pb2.StatsRequest(), timeout=10).steps == 0


@pytest.fixture(scope="module")
def token_router(tiny_target):
    router = RouterThread(tokenizer_for(str(tiny_target)), verifier_for(str(tiny_target)).address, {}, drafter="none", cost_profile="off",
                          security=ServerSecurity(auth_token=TOKEN))
    yield router
    router.stop()


def test_behind_a_token_only_an_authenticated_caller_may_reset(token_router):
    authorized = (("authorization", f"Bearer {TOKEN}"),)
    stub = router_pb2_grpc.RouterServiceStub(token_router.channel)
    stub.Generate(router_pb2.GenerateRequest(prompt="learn something", max_tokens=6), timeout=60, metadata=authorized)
    before = stub.Stats(router_pb2.StatsRequest(), timeout=10, metadata=authorized).steps
    assert before > 0
    for metadata in ((), (("authorization", "Bearer a-guess"),)):
        with pytest.raises(grpc.RpcError) as info:
            stub.Stats(router_pb2.StatsRequest(reset=True), timeout=10, metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stub.Stats(router_pb2.StatsRequest(), timeout=10, metadata=authorized).steps == before  # nothing was forgotten
    stub.Stats(router_pb2.StatsRequest(reset=True), timeout=10, metadata=authorized)
    assert stub.Stats(router_pb2.StatsRequest(), timeout=10, metadata=authorized).steps == 0
