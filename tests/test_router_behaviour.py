"""The router's client-facing behaviour over loopback: finish reasons and stop sequences, streaming,
validation errors, overload, and cancellation freeing state everywhere."""

from __future__ import annotations

import asyncio
import threading
from typing import Callable

import grpc
import pytest

from router.detokenize import tokenizer_decoder
from smartspec.wire import router_pb2, verifier_pb2, verifier_pb2_grpc
from tests.support import ServerThread, reference_greedy
from tests.test_router_stack import (
    RouterThread,
    ScriptedDrafter,
    generate_many,
    serve_drafter,
    stack,  # noqa: F401  (fixture)
    tokenizer_for,
    verifier_live,
    wait_until,
)

PROMPT = "The quick brown fox jumps over the lazy dog near the river bank."


def _stream(stub, request):
    chunks = list(stub.GenerateStream(request, timeout=60))
    return chunks, [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)


def _error(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


# --- finish reasons and stop sequences -------------------------------------------------------------
def test_length_with_a_perfect_draft_never_overshoots(stack, tiny_target):
    ids = tokenizer_for(str(tiny_target))(PROMPT).input_ids
    ref, _ = reference_greedy(tiny_target, ids, 7)
    reply = stack.stub.Generate(router_pb2.GenerateRequest(prompt=PROMPT, max_tokens=7, drafter="self_draft", policy="fixed:5"))
    assert list(reply.token_ids) == ref and reply.finish_reason == router_pb2.FINISH_REASON_LENGTH
    # prefill gives 1 token; one step verifies exactly the 5 drafts that fit and emits 6
    assert (reply.stats.steps, reply.stats.proposed, reply.stats.accepted) == (1, 5, 5)
    one = stack.stub.Generate(router_pb2.GenerateRequest(prompt=PROMPT, max_tokens=1, drafter="self_draft", policy="fixed:5"))
    assert list(one.token_ids) == ref[:1] and one.stats.steps == 0 and one.finish_reason == router_pb2.FINISH_REASON_LENGTH


def test_stop_sequence_cuts_text_and_drops_tokens_past_it(stack, tiny_target):
    tokenizer = tokenizer_for(str(tiny_target))
    decode = tokenizer_decoder(tokenizer)
    ids = tokenizer(PROMPT).input_ids
    ref, _ = reference_greedy(tiny_target, ids, 30)
    full = decode(ref)
    # a stop string made of the end of token 12's text and the start of token 13's (it spans tokens)
    cut = len(decode(ref[:12]))
    stop = full[cut - 2 : cut + 2]
    assert len(stop) == 4 and full.find(stop) >= 0
    at = full.find(stop)
    expected_tokens = next(n for n in range(1, 31) if stop in decode(ref[:n]))  # the token that completes it
    for drafter, policy in (("none", "none"), ("self_draft", "fixed:5"), ("draft_model", "fixed:3")):
        request = router_pb2.GenerateRequest(prompt=PROMPT, max_tokens=30, stop=[stop, "never-ever"], drafter=drafter, policy=policy)
        reply = stack.stub.Generate(request)
        assert reply.finish_reason == router_pb2.FINISH_REASON_STOP, drafter
        assert reply.text == full[:at], drafter
        assert list(reply.token_ids) == ref[:expected_tokens], drafter
        chunks, streamed_ids, streamed_text = _stream(stack.stub, request)
        assert streamed_text == reply.text and streamed_ids == list(reply.token_ids)
        assert not any(stop in c.text for c in chunks)


def test_streaming_concatenation_equals_the_unary_response(stack):
    prompts = [PROMPT, "日本語のテキストと絵文字 😀🎉 を含む", "x"]
    for prompt in prompts:
        for drafter, policy in (("none", "none"), ("draft_model", "fixed:3"), ("self_draft", "fixed:5"), ("prompt_lookup", "fixed:1")):
            request = router_pb2.GenerateRequest(prompt=prompt, max_tokens=20, drafter=drafter, policy=policy)
            unary = stack.stub.Generate(request)
            chunks, ids, text = _stream(stack.stub, request)
            assert ids == list(unary.token_ids) and text == unary.text
            assert [c.finish_reason for c in chunks[:-1]] == [router_pb2.FINISH_REASON_UNSPECIFIED] * (len(chunks) - 1)
            assert chunks[-1].finish_reason == unary.finish_reason == router_pb2.FINISH_REASON_LENGTH
            assert chunks[-1].HasField("stats") and not any(c.HasField("stats") for c in chunks[:-1])
            assert chunks[-1].stats.steps == unary.stats.steps
            assert len(chunks) == unary.stats.steps + 1  # one message per step, plus the prefill's


def test_text_is_the_tokenizers_decoding_of_the_ids(stack, tiny_target):
    decode = tokenizer_decoder(tokenizer_for(str(tiny_target)))
    replies = generate_many(stack.stub, [router_pb2.GenerateRequest(prompt=f"{i} 😀 世界", max_tokens=25, drafter="draft_model") for i in range(6)])
    for reply in replies:
        assert reply.text == decode(reply.token_ids)


# --- validation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, code, message",
    [
        (dict(prompt="hi", max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be at least 1"),
        (dict(), grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty"),
        (dict(prompt="hi", messages=[router_pb2.ChatMessage(role="user", content="x")]), grpc.StatusCode.INVALID_ARGUMENT, "either prompt or messages"),
        (dict(prompt="hi", drafter="forest"), grpc.StatusCode.INVALID_ARGUMENT, "drafter 'forest' is unknown; use one of none, "),
        (dict(prompt="hi", policy="fixed:many"), grpc.StatusCode.INVALID_ARGUMENT, "fixed:K needs an integer K"),
        (dict(prompt="hi", policy="sometimes"), grpc.StatusCode.INVALID_ARGUMENT, "unknown policy 'sometimes'"),
        (dict(prompt="hi " * 100, max_tokens=500), grpc.StatusCode.OUT_OF_RANGE, "exceeds the model's context limit of 512"),
        (dict(prompt="hi", stop=[""]), grpc.StatusCode.INVALID_ARGUMENT, "stop sequences must not be empty"),
        (dict(prompt="hi", stop=["s"] * 17), grpc.StatusCode.INVALID_ARGUMENT, "17 stop sequences given; at most 16"),
        (dict(prompt="hi", stop=["s" * 257]), grpc.StatusCode.INVALID_ARGUMENT, "a stop sequence has 257 characters; at most 256"),
        (dict(prompt="hi", max_tokens=-5), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be at least 1 (got -5)"),
        (dict(prompt="hi", max_tokens=2**31 - 1), grpc.StatusCode.OUT_OF_RANGE, "max_tokens (2147483647) leaves no room for the prompt"),
        (dict(prompt="x" * 16385), grpc.StatusCode.OUT_OF_RANGE, "the prompt has 16385 characters, more than the 16384 accepted"),
        (dict(messages=[router_pb2.ChatMessage(role="user", content="x" * 16385)]), grpc.StatusCode.OUT_OF_RANGE, "the messages have 16385 characters"),
        (dict(messages=[router_pb2.ChatMessage(role="user")] * 513), grpc.StatusCode.OUT_OF_RANGE, "513 messages cannot fit"),
        (dict(messages=[router_pb2.ChatMessage(role="robot" * 5000, content="x")]), grpc.StatusCode.INVALID_ARGUMENT, "(25000 characters); use one of system"),
        (dict(prompt="hi", drafter="d" * 100_000), grpc.StatusCode.INVALID_ARGUMENT, "...' (100000 characters) is unknown"),
        (dict(prompt="hi", policy="fixed:²"), grpc.StatusCode.INVALID_ARGUMENT, "fixed:K needs an integer K from 0 to 32"),
        (dict(prompt="hi", policy="fixed:33"), grpc.StatusCode.INVALID_ARGUMENT, "fixed:K needs an integer K from 0 to 32"),
        (dict(prompt="hi", temperature=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "temperature must be a finite number >= 0"),
        (dict(prompt="hi", temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT, "temperature must be a finite number >= 0"),
        (dict(prompt="hi", temperature=1.0, top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1]"),
        (dict(prompt="hi", temperature=1.0, top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1]"),
        (dict(prompt="hi", temperature=1.0, top_k=-1), grpc.StatusCode.INVALID_ARGUMENT, "top_k must be >= 0"),
    ],
)
def test_validation_errors_over_grpc(stack, fields, code, message):
    request = router_pb2.GenerateRequest(**fields)
    for call in (lambda: stack.stub.Generate(request), lambda: list(stack.stub.GenerateStream(request))):
        got_code, details = _error(call)
        assert got_code == code and message in details, details


# --- overload and cancellation: a verifier whose Verify waits at a gate --------------------------------
class GatedVerifier(verifier_pb2_grpc.VerifierServiceServicer):
    """Delegates to a real verifier, but the Verify calls that `holds` picks, after the first `passing`
    of them, wait until the gate is open. By default it holds every Verify that verifies (one that only
    prefills passes: the first token streams)."""

    def __init__(self, inner, holds: Callable[[verifier_pb2.VerifyRequest], bool] = lambda request: bool(request.request_ids),
                 passing: int = 0) -> None:
        self.inner = inner
        self.holds = holds
        self.passing = passing
        self.gate = threading.Event()
        self.verifying = threading.Event()  # a held call is waiting at the gate
        self.verify_calls = 0  # calls that `holds` picked

    async def Prefill(self, request, context):
        return await self.inner.Prefill(request, context)

    async def Verify(self, request, context):
        if self.holds(request):
            self.verify_calls += 1
            if self.verify_calls > self.passing:
                self.verifying.set()
                while not self.gate.is_set():
                    await asyncio.sleep(0.01)
        return await self.inner.Verify(request, context)

    async def Release(self, request, context):
        return await self.inner.Release(request, context)

    async def Info(self, request, context):
        return await self.inner.Info(request, context)


@pytest.fixture
def gated(tiny_target):
    from verifier_svc.main import build_servicer
    from verifier_svc.server import SERVICE_NAME

    verifier = GatedVerifier(build_servicer(str(tiny_target), max_sequences=4))
    server = ServerThread(lambda s: verifier_pb2_grpc.add_VerifierServiceServicer_to_server(verifier, s), [SERVICE_NAME])
    drafter = ScriptedDrafter()
    drafter_server = serve_drafter(drafter)
    router = RouterThread(  # cost profile off: its sweep would wait at the gate
        tokenizer_for(str(tiny_target)), server.address, {"scripted": drafter_server.address}, drafter="scripted", max_batch=1, max_queue=1,
        cost_profile="off",
    )
    yield verifier, server, drafter, router
    verifier.gate.set()
    router.stop()
    drafter_server.stop()
    server.stop()
    verifier.inner.thread.close()


def test_full_queue_is_resource_exhausted_at_once(gated):
    verifier, _, _, router = gated
    scheduler = router.servicer.scheduler
    first = router.stub.Generate.future(router_pb2.GenerateRequest(prompt="first", max_tokens=5), timeout=60)
    assert verifier.verifying.wait(10)  # admitted, stuck in its first step: the batch (size 1) is full
    second = router.stub.Generate.future(router_pb2.GenerateRequest(prompt="second", max_tokens=5), timeout=60)
    assert wait_until(lambda: len(scheduler.waiting) == 1)
    code, details = _error(lambda: router.stub.Generate(router_pb2.GenerateRequest(prompt="third", max_tokens=5), timeout=5))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "requests already wait for admission (limit 1)" in details
    verifier.gate.set()
    assert len(first.result().token_ids) == 5 and len(second.result().token_ids) == 5


def test_cancelled_requests_are_released_in_verifier_and_drafter(gated):
    verifier, server, drafter, router = gated
    stream = router.stub.GenerateStream(router_pb2.GenerateRequest(prompt="cancel me", max_tokens=400, policy="fixed:3"), timeout=60)
    first = next(stream)  # the prefill's token: admitted and prefilled
    assert len(first.token_ids) == 1
    waiting = router.stub.GenerateStream(router_pb2.GenerateRequest(prompt="never admitted", max_tokens=5), timeout=60)
    assert verifier.verifying.wait(10) and drafter.contexts  # proposed, then stuck in Verify
    assert wait_until(lambda: len(router.servicer.scheduler.waiting) == 1)
    waiting.cancel()
    stream.cancel()
    assert wait_until(lambda: not router.servicer.scheduler.waiting)  # the queued one is dropped at once
    verifier.gate.set()
    assert wait_until(lambda: verifier_live(server.address) == 0), "the verifier still holds the cancelled request"
    assert wait_until(lambda: not drafter.contexts and drafter.released), "the drafter still holds the cancelled request"
    assert wait_until(lambda: not router.servicer.scheduler.running)
    assert verifier.verify_calls <= 2  # it left the batch at the next step boundary, long before 400 tokens
    # the router still serves
    assert len(router.stub.Generate(router_pb2.GenerateRequest(prompt="after", max_tokens=3), timeout=30).token_ids) == 3
