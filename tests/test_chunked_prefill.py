"""Chunked prefill is lossless and leaves nothing behind: a context prefilled in chunks, alone or in the
same forward as other requests' speculative verification, gives exactly the target's greedy output
(transformers generate) and the same seeded samples as an unchunked prefill; a request that leaves
mid-prefill frees everything; and the KV cache accounts for contexts still to prefill."""

from __future__ import annotations

import random

import grpc
import pytest

from smartspec.errors import RequestError
from smartspec.runtime.loading import load_causal_lm
from smartspec.runtime.runner import BatchedRunner
from smartspec.sampling import SamplingParams
from smartspec.wire import router_pb2, verifier_pb2, verifier_pb2_grpc
from tests.support import ServerThread, first_mismatch, reference_greedy
from tests.test_router_behaviour import GatedVerifier
from tests.test_router_lossless import assert_lossless
from tests.test_router_stack import RouterThread, generate_many, lookup_drafter, tokenizer_for, verifier_for, wait_until
from tests.test_verifier_lossless import drive, make_engine, proposal, random_prompts
from verifier_svc.engine import VerifierEngine

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def engine(tiny_target):
    return make_engine(tiny_target)


def prefill_rest(engine: VerifierEngine, request_id: str, length: int, size: int) -> int:
    """Prefills an admitted context of `length` tokens to its end, `size` tokens a step (only the last
    chunk yields a token); returns the request's first token."""
    done = engine.runner.length(request_id)
    while True:
        count = min(size, length - done)
        outcome = engine.verify([], [], prefill=[(request_id, count)])
        done += count
        assert engine.runner.length(request_id) == done
        if done == length:
            (first,) = outcome.first_tokens
            return first
        assert outcome.first_tokens == []


def test_a_prompt_in_many_chunks_equals_the_unchunked_prefill_and_generate(tiny_target, engine):
    prompt = random_prompts([150], seed=11)[0]
    ref, gaps = reference_greedy(tiny_target, prompt, NEW_TOKENS)
    whole, _ = engine.prefill([("whole", prompt)])
    engine.admit([("chunked", prompt)])
    first = prefill_rest(engine, "chunked", len(prompt), size=37)  # 4 full chunks and a short one
    assert [first] == whole == ref[:1]
    outputs = {"whole": list(whole), "chunked": [first]}
    drive(engine, ["whole", "chunked"], {"whole": ref, "chunked": ref}, outputs, random.Random(12), kinds=["right", "partly", "wrong"])
    for request_id in outputs:
        assert first_mismatch(outputs[request_id][: len(ref)], ref, gaps) is None, request_id
    assert engine.release(["whole", "chunked"]) == 2
    assert engine.runner.live == 0 and engine.runner.used_tokens == 0


def test_chunks_beside_speculating_requests_stay_exact(tiny_target, engine):
    """Every step verifies the running requests' drafts (right, partly right, wrong) and prefills the
    next chunk of a long prompt in the same forward; then all three go on together."""
    prompts = random_prompts([20, 45, 160], seed=13)
    ids = ["a", "b", "long"]
    refs, gaps = {}, {}
    for request_id, prompt in zip(ids, prompts):
        refs[request_id], gaps[request_id] = reference_greedy(tiny_target, prompt, NEW_TOKENS)
    first, _ = engine.prefill([("a", prompts[0]), ("b", prompts[1])])
    outputs = {"a": [first[0]], "b": [first[1]]}
    engine.admit([("long", prompts[2])])
    rng = random.Random(14)
    left = len(prompts[2])
    while left:
        count = min(left, rng.randrange(5, 50))
        drafts, expected = zip(*(proposal(rng.choice(["right", "partly", "wrong"]), refs[i] + [0] * 8, len(outputs[i]), rng.randrange(0, 6), rng) for i in ("a", "b")))
        outcome = engine.verify(["a", "b"], list(drafts), prefill=[("long", count)])
        left -= count
        assert outcome.accepted == list(expected)
        for request_id, emitted in zip(("a", "b"), outcome.emitted):
            outputs[request_id].extend(emitted)
        assert len(outcome.first_tokens) == (0 if left else 1)
    outputs["long"] = list(outcome.first_tokens)
    drive(engine, ids, refs, outputs, rng, kinds=["right", "partly", "wrong"])
    for request_id in ids:
        assert first_mismatch(outputs[request_id][: len(refs[request_id])], refs[request_id], gaps[request_id]) is None, request_id
    engine.release(ids)


def test_a_seeded_sampling_request_draws_the_same_tokens_chunked_or_not(engine):
    prompt = random_prompts([90], seed=15)[0]
    sampling = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    runs = {}
    for request_id, size in (("once", len(prompt)), ("chunks", 17)):
        engine.admit([(request_id, prompt, sampling)])
        tokens = [prefill_rest(engine, request_id, len(prompt), size)]
        for _ in range(12):
            tokens += engine.verify([request_id], [[]]).emitted[0]
        runs[request_id] = tokens
        engine.release([request_id])
    assert runs["once"] == runs["chunks"]


def test_a_request_released_mid_prefill_frees_everything_and_misuse_is_refused(engine):
    prompt = random_prompts([100], seed=16)[0]
    engine.admit([("mid", prompt)])
    engine.verify([], [], prefill=[("mid", 30)])
    with pytest.raises(RequestError) as info:
        engine.verify(["mid"], [[]])
    assert info.value.status == "INVALID_ARGUMENT" and "70 context tokens left to prefill" in info.value.message
    for count in (0, 71):
        with pytest.raises(RequestError) as info:
            engine.verify([], [], prefill=[("mid", count)])
        assert info.value.status == "INVALID_ARGUMENT" and "70 of its context are left" in info.value.message
    with pytest.raises(RequestError) as info:
        engine.verify([], [], prefill=[("nobody", 3)])
    assert info.value.status == "NOT_FOUND"
    assert engine.runner.length("mid") == 30  # refusals changed nothing
    assert engine.release(["mid"]) == 1
    assert engine.runner.live == 0 and engine.runner.used_tokens == 0 and not engine._unfilled and not engine._sampling


def test_admission_counts_the_chunks_still_to_prefill(tiny_target):
    """A context admitted chunked holds no blocks yet, but its chunks will: a second admission that
    would only fit if they were forgotten is refused, and the first one then prefills to the end."""
    model = load_causal_lm(tiny_target)
    small = VerifierEngine(BatchedRunner(model, max_sequences=4, max_context=512, kv_cache_tokens=12 * 16), model.config.vocab_size)
    first, second = random_prompts([120, 40], seed=17)  # 8 and 3 blocks; 2 blocks of decode room each
    small.admit([("first", first)])
    with pytest.raises(RequestError) as info:
        small.admit([("second", second)])
    assert info.value.status == "RESOURCE_EXHAUSTED" and "the KV cache is full" in info.value.message
    prefill_rest(small, "first", len(first), size=50)
    small.release(["first"])


# --- through the router ---------------------------------------------------------------------------------
def test_a_long_prompt_prefilled_beside_speculating_requests_through_the_router_is_exact(tiny_target):
    """A small step budget: the long prompt takes many steps of chunks while prompt-lookup requests
    speculate; every output equals generate()'s."""
    tokenizer = tokenizer_for(str(tiny_target))
    verifier = verifier_for(str(tiny_target))
    router = RouterThread(tokenizer, verifier.address, {"prompt_lookup": lookup_drafter().address}, drafter="prompt_lookup", max_step_tokens=24)
    try:
        words = "one two three four five six seven eight nine ten".split()
        texts = [" ".join(words[i:] + words[:i]) * 2 for i in range(3)] + [" ".join(random.Random(3).choice(words) for _ in range(220))]
        requests = [router_pb2.GenerateRequest(prompt=t, max_tokens=NEW_TOKENS, policy="fixed:3") for t in texts]
        refs = [reference_greedy(tiny_target, tokenizer(t).input_ids, NEW_TOKENS) for t in texts]
        assert len(tokenizer(texts[-1]).input_ids) > 8 * 24  # many chunks
        for text, reply, (want, gaps) in zip(texts, generate_many(router.stub, requests), refs):
            assert isinstance(reply, router_pb2.GenerateResponse), reply
            assert_lossless(reply.token_ids, want, gaps, text[:20])
        assert wait_until(lambda: not router.servicer.scheduler.running)
    finally:
        router.stop()


def verifier_holds(address: str) -> tuple[int, int]:
    """(live sequences, KV tokens) of a verifier."""
    with grpc.insecure_channel(address) as channel:
        info = verifier_pb2_grpc.VerifierServiceStub(channel).Info(verifier_pb2.InfoRequest(), timeout=10)
    return info.live_sequences, info.kv_used_tokens


def test_a_request_cancelled_mid_prefill_frees_its_state(tiny_target):
    """A long prompt admitted beside a decoding request (so it is chunked), cancelled while its second
    chunk is in flight: the verifier ends up holding only the other request, then nothing."""
    from verifier_svc.main import build_servicer
    from verifier_svc.server import SERVICE_NAME

    chunks: list[int] = []  # each prefilling Verify's chunk sizes, in order

    def holds(request) -> bool:
        chunks.extend(request.prefill_counts)
        return bool(request.prefill_request_ids)

    verifier = GatedVerifier(build_servicer(str(tiny_target), max_sequences=4), holds=holds, passing=2)  # the short prompt, the first chunk
    engine = verifier.inner.engine
    server = ServerThread(lambda s: verifier_pb2_grpc.add_VerifierServiceServicer_to_server(verifier, s), [SERVICE_NAME])
    router = RouterThread(tokenizer_for(str(tiny_target)), server.address, {}, drafter="none", max_step_tokens=20)
    try:
        decoding = router.stub.GenerateStream(router_pb2.GenerateRequest(prompt="Hello", max_tokens=400, ignore_eos=True), timeout=60)
        next(decoding)
        stream = router.stub.GenerateStream(router_pb2.GenerateRequest(prompt="word " * 100, max_tokens=5), timeout=60)
        assert verifier.verifying.wait(30)  # one chunk prefilled, the second in flight
        (held,) = engine._unfilled
        # the first chunk is sized by the cost model measured at startup: at most 20 - 1 for the decoding request
        first_chunk = chunks[1]
        assert 16 <= first_chunk <= 19 and engine.runner.length(held) == first_chunk and verifier_holds(server.address)[0] == 2
        stream.cancel()
        verifier.gate.set()
        assert wait_until(lambda: held not in engine.runner and not engine._unfilled), "the verifier still holds the request cancelled mid-prefill"
        assert verifier_holds(server.address)[0] == 1
        decoding.cancel()
        assert wait_until(lambda: verifier_holds(server.address) == (0, 0))
        assert wait_until(lambda: not router.servicer.scheduler.running and not router.servicer.scheduler.waiting)
        assert not engine._sampling
        assert len(router.stub.Generate(router_pb2.GenerateRequest(prompt="after", max_tokens=3), timeout=30).token_ids) == 3
    finally:
        verifier.gate.set()
        router.stop()
        server.stop()
        verifier.inner.thread.close()


def test_the_startup_sweep_also_times_steps_that_carry_a_prefill_chunk(tiny_target):
    """The cost profile covers the paced steps of serving under load: some of its Verify calls carry a
    chunk of a prompt admitted chunked, and the sweep leaves nothing behind in the verifier."""
    import asyncio

    from router.controller import profile

    server = verifier_for(str(tiny_target), max_sequences=32)  # a slot beside the 16 swept requests
    chunks: list[int] = []

    class Watched:  # the verifier's stub, noting each Verify's prefill chunks
        def __init__(self, stub) -> None:
            self._stub = stub

        def __getattr__(self, name: str):
            return getattr(self._stub, name)

        async def Verify(self, request, timeout=None):
            chunks.extend(request.prefill_counts)
            return await self._stub.Verify(request, timeout=timeout)

    async def sweep():
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = verifier_pb2_grpc.VerifierServiceStub(channel)
            info = await stub.Info(verifier_pb2.InfoRequest(), timeout=10)
            rows, seconds = await profile.measure(Watched(stub), info)
            return rows, seconds, await stub.Info(verifier_pb2.InfoRequest(), timeout=10)

    rows, seconds, after = asyncio.run(sweep())
    decoding_only = profile.sweep_plan(16, 1, random.Random(0)).steps  # the same sweep without chunks
    assert len(rows) == len(seconds) == len(decoding_only) + len(chunks) and min(seconds) > 0
    assert len(chunks) >= profile.ROUNDS and set(chunks) <= set(profile.CHUNK_TOKENS)
    assert after.live_sequences == 0 and after.kv_used_tokens == 0
