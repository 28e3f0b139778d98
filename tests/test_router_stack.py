"""A whole stack in one process for the router tests (verifier, drafters and router on loopback, each
server on its own event-loop thread), test drafters that misbehave on purpose, and the stack's own
smoke tests. Other test_router_* modules import the helpers from here."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from typing import Sequence

import grpc
import pytest

from smartspec.serving import CHANNEL_OPTIONS, start_server
from smartspec.wire import drafter_pb2, drafter_pb2_grpc, router_pb2, router_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from tests.support import ServerThread

VOCAB = 49152


class LoopThread:
    """An event loop on a daemon thread, for servers whose setup must run on their serving loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coroutine, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=timeout)


class RouterThread(LoopThread):
    """A router (router.server.build_router) served over loopback from its own loop thread; with
    `security` (smartspec.security.ServerSecurity), over TLS and/or behind a token (then `stub` is plaintext
    and unauthenticated: make your own)."""

    def __init__(self, tokenizer, verifier_address: str, drafters: dict[str, str], telemetry=None, security=None, **settings) -> None:
        from router.server import SERVICE_NAME, RouterSettings, build_router
        from router.validate import Defaults

        super().__init__()
        defaults = Defaults(**{k: settings.pop(k) for k in ("drafter", "policy", "max_tokens") if k in settings})
        self.servicer = self.call(build_router(tokenizer, verifier_address, drafters, RouterSettings(defaults=defaults, **settings), telemetry=telemetry))
        self.running = self.call(
            start_server(lambda s: router_pb2_grpc.add_RouterServiceServicer_to_server(self.servicer, s), [SERVICE_NAME], "127.0.0.1", 0,
                         self.servicer.scheduler.telemetry.tracing, security)
        )
        self.address = self.running.address
        self.channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        self.stub = router_pb2_grpc.RouterServiceStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        self.call(self.servicer.close())
        self.call(self.running.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)


# --- test drafters: the DrafterService contract implemented by hand -----------------------------------
class ScriptedDrafter(drafter_pb2_grpc.DrafterServiceServicer):
    """Follows the sync protocol strictly (RESYNC_REQUIRED on any mismatch) and proposes the known
    greedy continuation of a context (from `references`, full token sequences) with one token made
    wrong on purpose at a rotating position, so every acceptance count 0..k happens. With `forget_every`
    it drops all its state every that many calls, so the router must resync. Counts what it saw."""

    def __init__(self, references: Sequence[Sequence[int]] = (), forget_every: int = 0, corrupt: bool = True) -> None:
        self.references = [list(r) for r in references]
        self.forget_every = forget_every
        self.corrupt = corrupt
        self.contexts: dict[str, list[int]] = {}
        self.calls = self.resyncs = self.full_sends = self.proposed = 0
        self.released: set[str] = set()

    def _continuation(self, context: list[int], k: int) -> list[int]:
        for ref in self.references:
            if len(ref) > len(context) and ref[: len(context)] == context:
                draft = ref[len(context) : len(context) + k]
                if self.corrupt and draft:
                    wrong = self.calls % (len(draft) + 1)  # == len(draft): all right
                    if wrong < len(draft):
                        draft[wrong] = (draft[wrong] + 1) % VOCAB
                return draft
        return [(context[-1] + 7) % VOCAB] * k  # unknown context: always wrong

    async def Propose(self, request, context):
        self.calls += 1
        if self.forget_every and self.calls % self.forget_every == 0:
            self.contexts.clear()
        statuses, counts, flat, start = [], [], [], 0
        for rid, length, count, k in zip(request.request_ids, request.committed_lengths, request.appended_counts, request.max_draft_tokens):
            appended = list(request.appended_token_ids[start : start + count])
            start += count
            if count == length:
                self.full_sends += 1
                self.contexts[rid] = appended
            elif rid in self.contexts and len(self.contexts[rid]) + count == length:
                self.contexts[rid] += appended
            else:
                self.resyncs += 1
                statuses.append(drafter_pb2.PROPOSE_STATUS_RESYNC_REQUIRED)
                counts.append(0)
                continue
            draft = self._continuation(self.contexts[rid], k)
            self.proposed += len(draft)
            statuses.append(drafter_pb2.PROPOSE_STATUS_OK)
            counts.append(len(draft))
            flat += draft
        return drafter_pb2.ProposeResponse(statuses=statuses, draft_counts=counts, draft_token_ids=flat)

    async def Release(self, request, context):
        self.released.update(request.request_ids)
        freed = sum(self.contexts.pop(rid, None) is not None for rid in request.request_ids)
        return drafter_pb2.ReleaseResponse(released=freed)

    async def Info(self, request, context):
        return drafter_pb2.InfoResponse(kind="scripted", live_sequences=len(self.contexts))


class FailingDrafter(drafter_pb2_grpc.DrafterServiceServicer):
    """Fails every Propose: by raising (the call ends with UNKNOWN), by hanging past any deadline, by
    answering garbage (token ids outside the vocabulary, more tokens than asked), or ("half") by
    answering one valid token and garbage after it."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.calls = 0

    async def Propose(self, request, context):
        self.calls += 1
        if self.mode == "raise":
            raise RuntimeError("drafter exploded on purpose")
        if self.mode == "hang":
            await asyncio.sleep(30)
        n = len(request.request_ids)
        proposal = [1, *[VOCAB + 5] * 69] if self.mode == "half" else [VOCAB + 5] * 70
        return drafter_pb2.ProposeResponse(statuses=[drafter_pb2.PROPOSE_STATUS_OK] * n, draft_counts=[70] * n, draft_token_ids=proposal * n)

    async def Release(self, request, context):
        return drafter_pb2.ReleaseResponse(released=0)

    async def Info(self, request, context):
        return drafter_pb2.InfoResponse(kind=f"failing-{self.mode}")


def serve_drafter(servicer, tracing=None) -> ServerThread:
    from drafter_svc.server import SERVICE_NAME

    return ServerThread(lambda s: drafter_pb2_grpc.add_DrafterServiceServicer_to_server(servicer, s), [SERVICE_NAME], tracing)


# --- the shared stack ---------------------------------------------------------------------------------
@functools.cache
def tokenizer_for(path: str):
    from router.main import load_tokenizer

    return load_tokenizer(path)


@functools.cache
def verifier_for(path: str, max_sequences: int = 16) -> ServerThread:
    """One tiny-target verifier per process, shared by the router test modules."""
    from verifier_svc.main import build_servicer
    from verifier_svc.server import SERVICE_NAME

    servicer = build_servicer(path, max_sequences=max_sequences)
    return ServerThread(lambda s: verifier_pb2_grpc.add_VerifierServiceServicer_to_server(servicer, s), [SERVICE_NAME])


@functools.cache
def real_drafter_servers(target: str, draft: str) -> dict[str, ServerThread]:
    """The real drafter services: prompt lookup, a draft model that is often wrong (the tiny draft) and
    one that is always right (the target itself as its own draft). Cached: they live for the session
    (a server that is garbage-collected stops serving)."""
    from drafter_svc.main import build_servicer

    return {
        "prompt_lookup": serve_drafter(build_servicer("prompt_lookup")),
        "draft_model": serve_drafter(build_servicer("draft_model", draft_model=draft)),
        "self_draft": serve_drafter(build_servicer("draft_model", draft_model=target)),
    }


@functools.cache
def lookup_drafter() -> ServerThread:
    """A prompt-lookup drafter alone (model-free, so it serves any target)."""
    from drafter_svc.main import build_servicer

    return serve_drafter(build_servicer("prompt_lookup"))


def real_drafters(target: str, draft: str) -> dict[str, str]:
    return {name: server.address for name, server in real_drafter_servers(target, draft).items()}


@pytest.fixture(scope="module")
def stack(tiny_target, tiny_draft):
    """A router in front of the tiny verifier and the real drafters (module-scoped router)."""
    verifier = verifier_for(str(tiny_target))
    router = RouterThread(tokenizer_for(str(tiny_target)), verifier.address, real_drafters(str(tiny_target), str(tiny_draft)))
    yield router
    router.stop()


def generate_many(stub, requests: Sequence[router_pb2.GenerateRequest], timeout: float = 120) -> list:
    """Sends every request at once (so they share the running batch); returns replies or RpcErrors."""
    futures = [stub.Generate.future(request, timeout=timeout) for request in requests]
    out = []
    for future in futures:
        try:
            out.append(future.result())
        except grpc.RpcError as err:
            out.append(err)
    return out


def verifier_live(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return verifier_pb2_grpc.VerifierServiceStub(channel).Info(verifier_pb2.InfoRequest(), timeout=10).live_sequences


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --- smoke tests of the stack itself --------------------------------------------------------------------
def test_router_answers_health_and_generates(stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from router.server import SERVICE_NAME

    health = health_pb2_grpc.HealthStub(stack.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status == health_pb2.HealthCheckResponse.SERVING
    reply = stack.stub.Generate(router_pb2.GenerateRequest(prompt="Hello", max_tokens=5, drafter="none"))
    assert len(reply.token_ids) == 5 and reply.finish_reason == router_pb2.FINISH_REASON_LENGTH
    assert reply.stats.steps == 4  # the first token comes from prefill
    assert reply.stats.prompt_tokens > 0 and reply.stats.total_s >= reply.stats.ttft_s >= reply.stats.queue_s >= 0


def test_all_requests_released_after_a_burst(stack, tiny_target):
    requests = [router_pb2.GenerateRequest(prompt=f"burst {i}", max_tokens=6, drafter=d) for i in range(6) for d in ("none", "prompt_lookup", "draft_model")]
    replies = generate_many(stack.stub, requests)
    assert all(isinstance(r, router_pb2.GenerateResponse) and len(r.token_ids) == 6 for r in replies)
    assert wait_until(lambda: verifier_live(verifier_for(str(tiny_target)).address) == 0)
