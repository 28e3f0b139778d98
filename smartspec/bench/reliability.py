"""Reliability scenarios, shared by `bench/reliability.py` (which turns them into figures) and the tests
(which assert on them): each sends requests to a router and records how every one ended, so that a
request is never silently lost.

Every call has a deadline: a call that outlives it, or ends with a status its scenario does not expect,
is *lost*. Imports only grpc and the generated stubs.
"""

from __future__ import annotations

import asyncio
import collections
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import grpc

from smartspec.wire import drafter_pb2, drafter_pb2_grpc, router_pb2, router_pb2_grpc, verifier_pb2, verifier_pb2_grpc

FINISHED = "finished"
CANCELLED = "cancelled"  # the client cancelled the call itself (no status comes back)
ACCEPTED = "accepted"  # a malformed request the router served instead of refusing
VALIDATION = frozenset({"INVALID_ARGUMENT", "OUT_OF_RANGE"})
CLIENT_ENDED = frozenset({CANCELLED, "DEADLINE_EXCEEDED"})
GENERATE = "/smartspec.router.v1.RouterService/Generate"


@dataclass
class Tally:
    """How the requests of one scenario ended: finished, refused (with one of the statuses it expects:
    a clean refusal a client can act on, or the client's own cancel or deadline), or lost (any other
    status, or no answer within the deadline)."""

    scenario: str
    expected: frozenset[str]
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    notes: dict = field(default_factory=dict)

    def add(self, outcome: str) -> None:
        self.outcomes[outcome] += 1

    @property
    def sent(self) -> int:
        return sum(self.outcomes.values())

    @property
    def finished(self) -> int:
        return self.outcomes[FINISHED]

    @property
    def refused(self) -> dict[str, int]:
        return {status: n for status, n in sorted(self.outcomes.items()) if status in self.expected}

    @property
    def lost(self) -> int:
        return self.sent - self.finished - sum(self.refused.values())

    def row(self) -> dict:
        unexpected = {status: n for status, n in sorted(self.outcomes.items()) if status != FINISHED and status not in self.expected}
        return {
            "scenario": self.scenario, "sent": self.sent, "finished": self.finished, "refused": self.refused, "lost": self.lost,
            "lost_by_status": unexpected, **self.notes,
        }


def outcome_of(err: grpc.RpcError) -> str:
    code = err.code() if hasattr(err, "code") else None
    return code.name if code is not None else "UNKNOWN"


def service_state(verifier: str, drafters: dict[str, str], timeout_s: float = 10.0) -> dict[str, int]:
    """What the services hold, from their Info RPCs: the verifier's live sequences and KV tokens, and
    each drafter's live sequences. After every request has ended, all of it should be back to where it
    was before."""
    with grpc.insecure_channel(verifier) as channel:
        info = verifier_pb2_grpc.VerifierServiceStub(channel).Info(verifier_pb2.InfoRequest(), timeout=timeout_s)
    state = {"verifier.live_sequences": info.live_sequences, "verifier.kv_used_tokens": info.kv_used_tokens}
    for name, address in drafters.items():
        with grpc.insecure_channel(address) as channel:
            reply = drafter_pb2_grpc.DrafterServiceStub(channel).Info(drafter_pb2.InfoRequest(), timeout=timeout_s)
        state[f"{name}.live_sequences"] = reply.live_sequences
    return state


async def end_by_client(
    address: str, prompts: Sequence[str], total: int, concurrency: int, seed: int, drafters: Sequence[str], policies: Sequence[str],
    max_tokens: int = 300,
) -> collections.Counter[str]:
    """Sends `total` long requests, `concurrency` at a time, each ended by the client before it can
    finish: a stream cancelled after 1-4 chunks (so it is running), a stream cancelled 1-50 ms after it
    was sent without reading (often still queued), or a unary call whose deadline (5-300 ms) expires.
    Returns how each call ended (CANCELLED, DEADLINE_EXCEEDED, FINISHED if it won the race, or a status)."""
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)

        async def one(request: router_pb2.GenerateRequest, how: str, pause_s: float, chunks: int) -> str:
            try:
                if how == "deadline":
                    await stub.Generate(request, timeout=pause_s)
                    return FINISHED
                call = stub.GenerateStream(request, timeout=120)
                if how == "stream":
                    for _ in range(chunks):
                        reply = await call.read()
                        if reply is grpc.aio.EOF or reply.finish_reason:
                            return FINISHED
                else:
                    await asyncio.sleep(pause_s / 6)
                call.cancel()
                return CANCELLED
            except grpc.aio.AioRpcError as err:
                return outcome_of(err)

        outcomes: collections.Counter[str] = collections.Counter()
        for start in range(0, total, concurrency):
            plans = [
                (
                    router_pb2.GenerateRequest(prompt=rng.choice(prompts), max_tokens=max_tokens, drafter=rng.choice(drafters), policy=rng.choice(policies)),
                    rng.choice(("stream", "stream", "waiting", "deadline")), rng.uniform(0.005, 0.3), rng.randint(1, 4),
                )
                for _ in range(min(concurrency, total - start))
            ]
            outcomes.update(await asyncio.gather(*(one(*plan) for plan in plans)))
    return outcomes


@dataclass
class Reply:
    """One unary call of a burst: its outcome, the response when it finished, and its latency."""

    outcome: str
    response: router_pb2.GenerateResponse | None
    seconds: float


async def burst(address: str, requests: Sequence[router_pb2.GenerateRequest], timeout_s: float) -> list[Reply]:
    """Sends every request at once (unary calls) and waits for all of them."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)

        async def one(request: router_pb2.GenerateRequest) -> Reply:
            started = time.perf_counter()
            try:
                response = await stub.Generate(request, timeout=timeout_s)
            except grpc.aio.AioRpcError as err:
                return Reply(outcome_of(err), None, time.perf_counter() - started)
            return Reply(FINISHED, response, time.perf_counter() - started)

        return list(await asyncio.gather(*(one(request) for request in requests)))


# --- malformed input ------------------------------------------------------------------------------
def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz _-:²٣") for _ in range(n))


def malformed_catalog(max_context: int) -> dict[str, Callable[[random.Random], router_pb2.GenerateRequest]]:
    """One maker per kind of mistake a client can make (each a request the router must refuse), with
    random values: the router's validation is the subject, so each maker breaks exactly one rule."""
    request = router_pb2.GenerateRequest
    chat = router_pb2.ChatMessage
    return {
        "empty prompt": lambda rng: request(max_tokens=rng.randint(1, 8)),
        "prompt and messages": lambda rng: request(prompt="hi", messages=[chat(role="user", content="hi")]),
        "unknown role": lambda rng: request(messages=[chat(role=_text(rng, rng.randint(1, 40)) + "!", content="hi")]),
        "prompt too long (characters)": lambda rng: request(prompt="x" * (32 * max_context + rng.randint(1, 1000))),
        "prompt + max_tokens over the context": lambda rng: request(prompt="hi " * (max_context // 2 + 1), max_tokens=max_context // 2 + rng.randint(1, 50)),
        "max_tokens <= 0": lambda rng: request(prompt="hi", max_tokens=rng.randint(-(2**31), 0)),
        "max_tokens huge": lambda rng: request(prompt="hi", max_tokens=rng.randint(max_context, 2**31 - 1)),
        "unknown drafter": lambda rng: request(prompt="hi", drafter="x-" + _text(rng, rng.choice((3, 30, 50_000)))),
        "unknown policy": lambda rng: request(prompt="hi", policy="p-" + _text(rng, rng.choice((3, 30, 50_000)))),
        "fixed:K out of range": lambda rng: request(
            prompt="hi", policy=rng.choice(("fixed:33", "fixed:-1", "fixed:", "fixed:²", f"fixed:{rng.randint(33, 10**9)}"))
        ),
        "bad temperature": lambda rng: request(prompt="hi", temperature=rng.choice((-rng.random() - 1e-3, math.nan, math.inf))),
        "bad top_p": lambda rng: request(prompt="hi", temperature=1.0, top_p=rng.choice((0.0, -rng.random(), 1.0 + rng.random() + 1e-3, math.nan))),
        "bad top_k": lambda rng: request(prompt="hi", temperature=1.0, top_k=rng.randint(-(2**31), -1)),
        "too many stops": lambda rng: request(prompt="hi", stop=["s"] * rng.randint(17, 100)),
        "stop too long": lambda rng: request(prompt="hi", stop=["s" * rng.randint(257, 5000)]),
        "empty stop": lambda rng: request(prompt="hi", stop=["ok", ""]),
        "controlled without a reference": lambda rng: request(prompt="hi", drafter="controlled"),
    }


def undecodable(rng: random.Random) -> bytes:
    """Bytes that are not a GenerateRequest: a valid encoding cut inside its prompt (the prompt comes
    first and its length says more bytes follow), or with a prompt that is not UTF-8."""
    valid = router_pb2.GenerateRequest(prompt=_text(rng, 12), max_tokens=3, drafter="none").SerializeToString()
    if rng.random() < 0.5:
        return valid[: rng.randint(2, 13)]  # tag, length 12, then fewer than 12 bytes
    return b"\x0a\x03\xc3\x28\xff" + valid


async def send_malformed(address: str, max_context: int, total: int, garbage: int, seed: int, concurrency: int = 16) -> collections.Counter[str]:
    """`total` malformed requests (kinds in turn, random values) and `garbage` undecodable messages;
    returns how they ended, by status (ACCEPTED for one the router wrongly served)."""
    rng = random.Random(seed)
    makers = list(malformed_catalog(max_context).values())
    messages = [makers[i % len(makers)](rng).SerializeToString() for i in range(total)] + [undecodable(rng) for _ in range(garbage)]
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(GENERATE)  # raw bytes: the router sees exactly what was made
        outcomes: collections.Counter[str] = collections.Counter()

        async def one(data: bytes) -> str:
            try:
                await call(data, timeout=30)
            except grpc.aio.AioRpcError as err:
                return outcome_of(err)
            return ACCEPTED

        for start in range(0, len(messages), concurrency):
            outcomes.update(await asyncio.gather(*(one(data) for data in messages[start : start + concurrency])))
    return outcomes
