"""Nothing lost: overload beyond the queue, a thousand cancellations and expired deadlines, and drafters
that hang or die mid-load, against real services over loopback. Every admitted request must finish
(token-exact where it matters), every refused one must be refused at once with a clean status, and the
verifier's and drafters' state must return to where it started. Every wait is bounded."""

from __future__ import annotations

import asyncio
import collections
import random
import threading
import time

import grpc
import pytest

from smartspec.bench.reliability import CANCELLED, FINISHED, end_by_client, service_state
from smartspec.wire import router_pb2, verifier_pb2_grpc
from tests.support import ServerThread, reference_greedy
from tests.test_router_behaviour import GatedVerifier
from tests.test_router_lossless import WORDS, assert_lossless, repeating_prompt
from tests.test_router_stack import RouterThread, ScriptedDrafter, generate_many, real_drafters, serve_drafter, tokenizer_for, verifier_for, wait_until
from tests.test_service_lifecycle import serve

SLOW_PROPOSER = "tests.gated_drafter:GatedDrafter"  # proposes the last token k times, taking --propose-delay-s


def assert_router_forgot_everything(router: RouterThread) -> None:
    scheduler = router.servicer.scheduler
    assert wait_until(lambda: not scheduler.running and not scheduler.waiting)
    assert not scheduler.controller._posteriors and not scheduler.controller._previous, "the controller still tracks finished requests"


# --- overload ------------------------------------------------------------------------------------------
def test_ten_times_capacity_is_refused_at_once_and_every_admitted_request_finishes(tiny_target):
    from verifier_svc.main import build_servicer
    from verifier_svc.server import SERVICE_NAME

    max_batch, max_queue = 4, 4
    capacity = max_batch + max_queue
    sent = 10 * capacity
    verifier = GatedVerifier(build_servicer(str(tiny_target), max_sequences=capacity))
    server = ServerThread(lambda s: verifier_pb2_grpc.add_VerifierServiceServicer_to_server(verifier, s), [SERVICE_NAME])
    router = RouterThread(tokenizer_for(str(tiny_target)), server.address, {}, drafter="none", max_batch=max_batch, max_queue=max_queue, cost_profile="off")
    try:
        scheduler = router.servicer.scheduler
        futures = [router.stub.Generate.future(router_pb2.GenerateRequest(prompt=f"overload {i}", max_tokens=8), timeout=120) for i in range(sent)]
        # The verifier is stuck in the first step: every request the router does not hold (running or
        # waiting) is answered now, with RESOURCE_EXHAUSTED, not once capacity frees up.
        def held() -> int:
            return len(scheduler.running) + len(scheduler.waiting)

        assert wait_until(lambda: sum(f.done() for f in futures) + held() == sent, timeout=30)
        early = [f for f in futures if f.done()]
        assert not verifier.gate.is_set() and held() <= capacity
        for future in early:
            assert future.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED, future.exception()
        assert f"(limit {max_queue}); retry later" in early[0].exception().details()
        verifier.gate.set()
        outcomes: collections.Counter[str] = collections.Counter()
        for future in futures:
            try:
                reply = future.result(timeout=120)
            except grpc.RpcError as err:
                outcomes[err.code().name] += 1
            else:
                assert len(reply.token_ids) == 8 and reply.finish_reason == router_pb2.FINISH_REASON_LENGTH
                outcomes["finished"] += 1
        refused = outcomes["RESOURCE_EXHAUSTED"]
        assert set(outcomes) <= {"finished", "RESOURCE_EXHAUSTED"}, outcomes
        assert outcomes["finished"] + refused == sent  # nothing lost
        assert sent - capacity <= refused <= sent - 1 and refused == len(early)  # all refusals came while the verifier was stuck
        assert wait_until(lambda: service_state(server.address, {})["verifier.live_sequences"] == 0)
    finally:
        verifier.gate.set()
        router.stop()
        server.stop()
        verifier.inner.thread.close()


# --- cancellation and deadlines --------------------------------------------------------------------------
def test_a_thousand_cancellations_and_expired_deadlines_leave_no_state(tiny_target, tiny_draft):
    verifier = verifier_for(str(tiny_target))
    drafters = real_drafters(str(tiny_target), str(tiny_draft))
    baseline = service_state(verifier.address, drafters)
    assert baseline["verifier.live_sequences"] == 0 and baseline["verifier.kv_used_tokens"] == 0
    router = RouterThread(tokenizer_for(str(tiny_target)), verifier.address, drafters, max_batch=8, max_queue=64, cost_profile="off")
    rng = random.Random(3)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(n)) for n in (3, 12, 40)] + [("alpha beta gamma delta. " * 6)]
    try:
        outcomes = asyncio.run(
            end_by_client(router.address, prompts, total=1000, concurrency=25, seed=5, drafters=("prompt_lookup", "draft_model", "self_draft", "auto", "none"),
                          policies=("fixed:3", "goodput", "fixed:1"))
        )
        assert set(outcomes) <= {CANCELLED, "DEADLINE_EXCEEDED", FINISHED}, outcomes  # no error from the router
        assert outcomes[CANCELLED] + outcomes["DEADLINE_EXCEEDED"] >= 990 and outcomes["DEADLINE_EXCEEDED"] >= 150 and outcomes[CANCELLED] >= 500, outcomes
        assert wait_until(lambda: service_state(verifier.address, drafters) == baseline, timeout=30), (
            f"state left behind: {service_state(verifier.address, drafters)} (before: {baseline})"
        )
        assert_router_forgot_everything(router)
        reply = router.stub.Generate(router_pb2.GenerateRequest(prompt=prompts[0], max_tokens=5, drafter="draft_model"), timeout=60)
        assert len(reply.token_ids) == 5
    finally:
        router.stop()


def test_cancelled_while_a_slow_propose_is_in_flight_frees_the_drafter(tiny_target):
    """A drafter slower than the router's deadline is still working on a Propose when its requests are
    cancelled and released: the release must not be lost behind it."""
    from drafter_svc.main import build_servicer

    slow = serve_drafter(build_servicer(SLOW_PROPOSER, delay_s=0.6))
    verifier = verifier_for(str(tiny_target))
    router = RouterThread(
        tokenizer_for(str(tiny_target)), verifier.address, {"slow": slow.address}, drafter="slow", policy="fixed:2", drafter_timeout_s=0.2,
        cost_profile="off",
    )
    try:
        streams = [router.stub.GenerateStream(router_pb2.GenerateRequest(prompt=f"slow {i}", max_tokens=300), timeout=60) for i in range(6)]
        for stream in streams:
            next(stream)  # admitted: its first step's Propose is on its way
        time.sleep(0.3)  # past the router's deadline, before the drafter answers
        for stream in streams:
            stream.cancel()
        assert wait_until(lambda: service_state(verifier.address, {"slow": slow.address}) == dict.fromkeys(
            ("verifier.live_sequences", "verifier.kv_used_tokens", "slow.live_sequences"), 0), timeout=20
        ), service_state(verifier.address, {"slow": slow.address})
        assert router.servicer.scheduler.drafters["slow"].failures >= 1, "the drafter never missed its deadline: the test did not test it"
    finally:
        router.stop()
        slow.stop()


# --- drafter failures ------------------------------------------------------------------------------------
class HangingDrafter(ScriptedDrafter):
    """A ScriptedDrafter that, while `hanging` is set, answers nothing until long past any deadline."""

    def __init__(self, references) -> None:
        super().__init__(references)
        self.hanging = threading.Event()
        self.hung_calls = 0

    async def Propose(self, request, context):
        if self.hanging.is_set():
            self.hung_calls += 1
            await asyncio.sleep(30)
        return await super().Propose(request, context)


@pytest.fixture(scope="module")
def references(tiny_target):
    """Prompts, their token ids and the target's greedy continuation (48 tokens) with top-2 gaps."""
    tokenizer = tokenizer_for(str(tiny_target))
    texts = ["The quick brown fox jumps over the lazy dog near the river bank.", repeating_prompt(tiny_target, tokenizer), "Hi"]
    out = []
    for text in texts:
        ids = tokenizer(text).input_ids
        out.append((text, ids, *reference_greedy(tiny_target, ids, 48)))
    return out


def test_a_hanging_drafter_costs_only_speculation_and_is_used_again_once_it_answers(tiny_target, references):
    drafter = HangingDrafter([ids + ref for _, ids, ref, _ in references])
    server = serve_drafter(drafter)
    verifier = verifier_for(str(tiny_target))
    router = RouterThread(tokenizer_for(str(tiny_target)), verifier.address, {"scripted": server.address}, drafter="scripted", policy="fixed:3",
                          drafter_timeout_s=0.3, cost_profile="off")
    requests = [router_pb2.GenerateRequest(prompt=text, max_tokens=48) for text, *_ in references for _ in range(3)]
    try:
        drafter.hanging.set()
        for reply, (text, _, ref, gaps) in zip(generate_many(router.stub, requests), [r for r in references for _ in range(3)]):
            assert isinstance(reply, router_pb2.GenerateResponse), f"request lost while the drafter hangs: {reply}"
            assert_lossless(reply.token_ids, ref, gaps, f"hanging/{text[:10]}")
            assert reply.stats.proposed == 0  # every step it took part in went on with k = 0
        assert drafter.hung_calls >= 1 and router.servicer.scheduler.drafters["scripted"].failures >= 1

        drafter.hanging.clear()
        client = router.servicer.scheduler.drafters["scripted"]
        assert wait_until(client.available, timeout=10), "the router never retried the drafter"
        replies = generate_many(router.stub, requests)
        for reply, (text, _, ref, gaps) in zip(replies, [r for r in references for _ in range(3)]):
            assert isinstance(reply, router_pb2.GenerateResponse), reply
            assert_lossless(reply.token_ids, ref, gaps, f"recovered/{text[:10]}")
        assert sum(r.stats.accepted for r in replies) > 0, "the drafter answers again but its drafts are not used"
    finally:
        drafter.hanging.clear()
        router.stop()
        server.stop()


def test_a_drafter_process_killed_mid_load_loses_nothing_and_is_used_again_after_a_restart(tiny_target, references, tmp_path):
    verifier = verifier_for(str(tiny_target))
    argv = ["drafter", "--kind", "prompt_lookup", "--port", "0", "--log-level", "WARNING"]
    with serve(argv, tmp_path / "drafter.log") as (process, address):
        router = RouterThread(tokenizer_for(str(tiny_target)), verifier.address, {"prompt_lookup": address}, drafter="prompt_lookup",
                              policy="fixed:3", drafter_timeout_s=0.5, cost_profile="off")
        scheduler = router.servicer.scheduler
        try:
            assert wait_until(lambda: service_state(verifier.address, {"prompt_lookup": address})["prompt_lookup.live_sequences"] == 0)
            batch = [r for r in references for _ in range(4)]
            futures = [router.stub.Generate.future(router_pb2.GenerateRequest(prompt=text, max_tokens=48), timeout=120) for text, *_ in batch]
            # the batch's prompts are prefilled a chunk at a time: kill once the drafter's drafts were verified
            used = lambda: scheduler.controller.drafter_rates("prompt_lookup").proposed_total > 0  # noqa: E731
            assert wait_until(used, timeout=60), "the drafter was never used"
            process.kill()  # mid-load: SIGKILL, no drain
            process.wait(timeout=10)
            proposed = 0
            for future, (text, _, ref, gaps) in zip(futures, batch):
                reply = future.result(timeout=120)  # raises if the request was lost
                assert_lossless(reply.token_ids, ref, gaps, f"killed/{text[:10]}")
                proposed += reply.stats.proposed
            assert proposed > 0, "the drafter was never used before it died"
            assert scheduler.drafters["prompt_lookup"].failures >= 1, "the drafter died after the batch finished: the test did not test it"
        except BaseException:
            router.stop()
            raise
    port = address.rsplit(":", 1)[1]
    try:
        with serve([*argv[:-4], "--port", port, "--log-level", "WARNING"], tmp_path / "drafter-restarted.log") as (_, again):
            assert again == address
            text, _, ref, gaps = references[1]  # the repeating prompt: prompt lookup proposes
            deadline = time.monotonic() + 20
            while True:  # the router's backoff and the channel's reconnect both end within a few seconds
                reply = router.stub.Generate(router_pb2.GenerateRequest(prompt=text, max_tokens=48), timeout=60)
                assert_lossless(reply.token_ids, ref, gaps, "restarted")
                if reply.stats.proposed > 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert reply.stats.proposed > 0, "the restarted drafter was never used again"
            assert wait_until(lambda: service_state(verifier.address, {"prompt_lookup": again})["prompt_lookup.live_sequences"] == 0)
    finally:
        router.stop()


def test_a_failed_drafter_release_is_sent_again_with_the_next():
    """A release that fails (the drafter is down or busy past the deadline) is not forgotten: its ids go
    with the next release, under a deadline longer than Propose's."""
    from router.drafters import RELEASE_TIMEOUT_S, DrafterClient
    from smartspec.wire import drafter_pb2

    class Down(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "connection refused"

    class Stub:
        def __init__(self) -> None:
            self.calls: list[tuple[list[str], float]] = []
            self.up = False

        async def Release(self, request, timeout: float):
            self.calls.append((list(request.request_ids), timeout))
            if not self.up:
                raise Down()
            return drafter_pb2.ReleaseResponse(released=len(request.request_ids))

    stub = Stub()
    client = DrafterClient("d", stub, timeout_s=0.2)
    asyncio.run(client.release(["a", "b"]))
    stub.up = True
    asyncio.run(client.release(["c"]))
    asyncio.run(client.release(["d"]))
    assert stub.calls == [(["a", "b"], RELEASE_TIMEOUT_S), (["a", "b", "c"], RELEASE_TIMEOUT_S), (["d"], RELEASE_TIMEOUT_S)]
