"""A KV cache smaller than the load: requests wait or are preempted, never failed, and stay exact."""

from __future__ import annotations

import grpc
import pytest

from smartspec.wire import router_pb2
from tests.support import ServerThread, reference_greedy
from tests.test_router_lossless import assert_lossless
from tests.test_router_stack import RouterThread, generate_many, tokenizer_for, verifier_live, wait_until

BLOCK_TOKENS = 16


def small_verifier(path: str, tokens: int) -> ServerThread:
    """A verifier whose KV cache holds `tokens` tokens of the tiny target (512 bytes per token)."""
    from smartspec.wire import verifier_pb2_grpc
    from verifier_svc.main import build_servicer
    from verifier_svc.server import SERVICE_NAME

    servicer = build_servicer(path, max_sequences=8, kv_cache_gb=tokens * 512 / 2**30)
    return ServerThread(lambda s: verifier_pb2_grpc.add_VerifierServiceServicer_to_server(servicer, s), [SERVICE_NAME])


@pytest.fixture(scope="module")
def tight(tiny_target):
    verifier = small_verifier(str(tiny_target), 20 * BLOCK_TOKENS)
    router = RouterThread(tokenizer_for(str(tiny_target)), verifier.address, {}, drafter="none", max_batch=8)
    yield router, verifier
    router.stop()
    verifier.stop()


def test_more_tokens_than_the_cache_holds_all_finish_exactly(tiny_target, tight):
    router, verifier = tight
    tokenizer = tokenizer_for(str(tiny_target))
    prompts = [f"Request {i}: the numbers go {' '.join(str(i * 7 + j) for j in range(6))} and" for i in range(6)]
    refs = {p: reference_greedy(tiny_target, tokenizer(p).input_ids, 48) for p in prompts}
    # 6 requests x (about 25 prompt + 48 generated) tokens: well over the 320 the cache holds
    replies = generate_many(router.stub, [router_pb2.GenerateRequest(prompt=p, max_tokens=48, policy="none") for p in prompts])
    for prompt, reply in zip(prompts, replies):
        assert isinstance(reply, router_pb2.GenerateResponse), f"request lost: {reply}"
        assert_lossless(reply.token_ids, *refs[prompt], prompt)
    assert router.servicer.scheduler.preemptions > 0, "the cache never ran out: the test is too small to show preemption"
    assert wait_until(lambda: verifier_live(verifier.address) == 0)


def test_a_request_larger_than_the_whole_cache_is_refused_at_once(tiny_target, tight):
    router, _ = tight
    with pytest.raises(grpc.RpcError) as err:
        router.stub.Generate(router_pb2.GenerateRequest(prompt="word " * 400, max_tokens=8), timeout=30)
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "context limit of 304" in err.value.details()
