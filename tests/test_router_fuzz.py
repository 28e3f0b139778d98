"""Malformed input against a real router over loopback: generated GenerateRequest messages over every
field, and raw bytes that are not a GenerateRequest at all. Each call must end with a clean status a
client can act on (never UNKNOWN or INTERNAL, never a hang), and the router must keep serving."""

from __future__ import annotations

import asyncio
import collections
import random

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.validate import MAX_STOP_CHARS, MAX_STOPS, PROMPT_CHARS_PER_TOKEN, ROLES
from smartspec.bench.reliability import FINISHED, VALIDATION, Tally, malformed_catalog, send_malformed
from smartspec.wire import router_pb2
from tests.test_router_stack import RouterThread, lookup_drafter, tokenizer_for, verifier_for, verifier_live, wait_until

MAX_CONTEXT = 512  # the tiny target's
DEFAULT_MAX_TOKENS = 4  # what an unset max_tokens means on the fuzzed router, so accepted requests are quick
CLEAN = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE}
CALL_TIMEOUT_S = 30.0  # a call that takes this long is a hang
GENERATE = "/smartspec.router.v1.RouterService/Generate"
GENERATE_STREAM = "/smartspec.router.v1.RouterService/GenerateStream"


@pytest.fixture(scope="module")
def router(tiny_target):
    verifier = verifier_for(str(tiny_target))
    router = RouterThread(
        tokenizer_for(str(tiny_target)), verifier.address, {"prompt_lookup": lookup_drafter().address}, max_tokens=DEFAULT_MAX_TOKENS,
        cost_profile="off",
    )
    yield router
    router.stop()


# --- strategies ------------------------------------------------------------------------------------
def _some(values, other: st.SearchStrategy) -> st.SearchStrategy:
    """Named interesting values or anything `other` draws."""
    return st.one_of(st.sampled_from(values), other)


floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
not_finite = st.sampled_from([float("nan"), float("inf"), float("-inf")])
# Per field: values a valid request may have, and values that are mostly invalid (boundaries, nonsense,
# huge), with a few valid extremes among them.
VALID = {
    "prompt": st.builds(lambda text: dict(prompt=text), st.text(min_size=1, max_size=40)),
    "max_tokens": st.none() | st.integers(1, DEFAULT_MAX_TOKENS + 2),
    "stop": st.lists(st.text(min_size=1, max_size=8), max_size=4),
    "drafter": st.sampled_from(["", "none", "auto", "prompt_lookup"]),
    "policy": st.sampled_from(["", "none", "fixed:0", "fixed:3", "fixed:32", "goodput", "uniform", " fixed:2 "]),
    "temperature": st.just(0.0) | st.floats(0.0625, 2.0, width=32),
    "top_p": st.none() | st.floats(0.015625, 1.0, width=32),
    "top_k": st.integers(0, 100),
    "seed": st.none() | st.integers(0, 2**64 - 1),
}
messages = st.lists(
    st.builds(router_pb2.ChatMessage, role=_some([*ROLES, "", "tool", "USER", "r" * 20_000], st.text(max_size=10)), content=st.text(max_size=40)),
    max_size=3,
)
WILD = {
    "prompt": st.one_of(
        st.just({}),
        st.builds(lambda text, turns: dict(prompt=text, messages=turns), st.text(min_size=1, max_size=10), messages.filter(bool)),
        st.builds(lambda turns: dict(messages=turns), messages),
        st.integers(500, 700).map(lambda n: dict(prompt="hi " * n)),  # at the context limit, in tokens
        st.just(dict(prompt="x" * (PROMPT_CHARS_PER_TOKEN * MAX_CONTEXT + 1))),  # refused before tokenizing
        st.builds(lambda n: dict(messages=[router_pb2.ChatMessage(role="user")] * n), st.integers(MAX_CONTEXT + 1, 2 * MAX_CONTEXT)),
    ),
    "max_tokens": st.one_of(st.integers(-(2**31), 0), st.integers(MAX_CONTEXT - 2, 2**31 - 1)),
    "stop": st.one_of(
        st.lists(st.text(max_size=8), max_size=3).map(lambda stops: [*stops, ""]),
        st.lists(st.text(min_size=1, max_size=3), min_size=MAX_STOPS + 1, max_size=MAX_STOPS + 3),
        st.lists(st.just("s" * (MAX_STOP_CHARS + 1)), min_size=1, max_size=2),
    ),
    "drafter": _some(["controlled", "draft_model", "tree", "None", "d" * 100_000], st.text(min_size=1, max_size=12)),
    "policy": _some(["fixed:33", "fixed:-1", "fixed:", "fixed:²", "fixed:٣", "fixed:1e3", "p" * 100_000], st.text(min_size=1, max_size=12)),
    "temperature": st.one_of(not_finite, st.floats(max_value=-1.401298464324817e-45, width=32), st.sampled_from([1e-38, 1e-45, 3.4e38])),
    "top_p": st.one_of(not_finite, st.floats(max_value=0.0, width=32), st.floats(min_value=1.0000001192092896, width=32), st.just(1e-45)),
    "top_k": st.integers(-(2**31), -1) | st.just(2**31 - 1),
    "benchmark": st.builds(  # a controlled request, with nonsense options
        lambda options: dict(drafter="controlled", benchmark=options),
        st.builds(
            router_pb2.BenchmarkOptions,
            reference_token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=8),
            controlled_acceptance=st.floats(allow_nan=True, allow_infinity=True),
            seed=st.integers(0, 2**64 - 1),
        ),
    ),
}


@st.composite
def generate_requests(draw) -> router_pb2.GenerateRequest:
    """A GenerateRequest with one to three fields drawn from anything (mostly invalid values) and the rest
    from valid values, so that every check is reached, not only the first one a random request trips."""
    valid = draw(st.sampled_from([False] * 19 + [True]))  # about one in twenty is a valid request
    wild = set() if valid else draw(st.sets(st.sampled_from(sorted(WILD)), min_size=1, max_size=3))
    fields = {name: draw(VALID[name]) for name in VALID if name not in wild}
    fields.update({name: draw(WILD[name]) for name in sorted(wild)})
    for name in ("prompt", "benchmark"):  # drawn as several fields at once
        fields.update(fields.pop(name, {}))
    return router_pb2.GenerateRequest(**{name: value for name, value in fields.items() if value is not None})  # None: left unset


@st.composite
def garbage(draw) -> bytes:
    """Bytes that are not a valid GenerateRequest, or only barely: random, or a valid encoding cut,
    overwritten or given invalid UTF-8."""
    valid = router_pb2.GenerateRequest(prompt=draw(st.text(max_size=20)), max_tokens=3, drafter="none").SerializeToString()
    kind = draw(st.sampled_from(["random", "cut", "flip", "bad-utf8"]))
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=64))
    if kind == "cut":
        return valid[: draw(st.integers(0, max(0, len(valid) - 1)))]
    if kind == "flip":
        at = draw(st.integers(0, len(valid) - 1))
        return valid[:at] + bytes([draw(st.integers(0, 255))]) + valid[at + 1 :]
    return b"\x0a\x03\xc3\x28\xff" + valid  # field 1 (prompt): 3 bytes that are not UTF-8


# --- the checks -----------------------------------------------------------------------------------
def outcome(call) -> str:
    """'OK' or the status name; a status outside CLEAN fails the test with the router's message."""
    try:
        call()
    except grpc.RpcError as err:
        assert err.code() in CLEAN, f"{err.code().name}: {err.details()}"
        assert err.details(), "an error status without a message"
        return err.code().name
    return "OK"


def send(router: RouterThread, request: router_pb2.GenerateRequest, stream: bool) -> str:
    def call() -> None:
        if stream:
            chunks = list(router.stub.GenerateStream(request, timeout=CALL_TIMEOUT_S))
            assert chunks[-1].finish_reason != router_pb2.FINISH_REASON_UNSPECIFIED
            tokens = sum(len(c.token_ids) for c in chunks)
        else:
            reply = router.stub.Generate(request, timeout=CALL_TIMEOUT_S)
            assert reply.finish_reason != router_pb2.FINISH_REASON_UNSPECIFIED
            tokens = len(reply.token_ids)
        assert 1 <= tokens <= (request.max_tokens if request.HasField("max_tokens") else DEFAULT_MAX_TOKENS)

    return outcome(call)


def assert_still_serving(router: RouterThread, tiny_target) -> None:
    reply = router.stub.Generate(router_pb2.GenerateRequest(prompt="still there?", max_tokens=3, drafter="prompt_lookup"), timeout=CALL_TIMEOUT_S)
    assert len(reply.token_ids) == 3
    assert wait_until(lambda: verifier_live(verifier_for(str(tiny_target)).address) == 0)
    assert not router.servicer.scheduler.running and not router.servicer.scheduler.waiting


def fuzz_settings(examples: int) -> settings:
    """Many examples, no per-example deadline (a few are real generations), nothing stored between runs."""
    return settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)


def test_a_thousand_malformed_requests_get_clean_errors(router, tiny_target):
    seen: collections.Counter[str] = collections.Counter()

    @fuzz_settings(1500)
    @given(request=generate_requests(), stream=st.booleans())
    def fuzz(request: router_pb2.GenerateRequest, stream: bool) -> None:
        seen[send(router, request, stream)] += 1

    fuzz()
    refused = sum(n for status, n in seen.items() if status != "OK")
    assert refused >= 1000, seen
    assert seen["OK"] > 0, "no generated request was valid: the strategies never reach the accepted side"
    assert_still_serving(router, tiny_target)


def test_bytes_that_are_not_a_request_get_invalid_argument(router, tiny_target):
    seen: collections.Counter[str] = collections.Counter()
    unary = router.channel.unary_unary(GENERATE)  # no serializers: raw bytes in and out
    streaming = router.channel.unary_stream(GENERATE_STREAM)

    @fuzz_settings(300)
    @given(data=garbage(), stream=st.booleans())
    def fuzz(data: bytes, stream: bool) -> None:
        seen[outcome(lambda: list(streaming(data, timeout=CALL_TIMEOUT_S)) if stream else unary(data, timeout=CALL_TIMEOUT_S))] += 1

    fuzz()
    assert seen["INVALID_ARGUMENT"] > 100, seen
    with pytest.raises(grpc.RpcError) as info:
        unary(b"\x0a\x02\xc3\x28", timeout=CALL_TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a valid message of its type" in info.value.details() and "RouterService/Generate" in info.value.details()
    assert_still_serving(router, tiny_target)


def test_every_kind_of_mistake_the_benchmark_sends_is_refused(router):
    """bench/reliability.py's figures count these as malformed: each kind must really be refused."""
    rng = random.Random(0)
    for name, make in malformed_catalog(MAX_CONTEXT).items():
        for _ in range(3):
            assert send(router, make(rng), stream=False) != "OK", f"{name}: the router served it"
    tally = Tally("validation", VALIDATION, asyncio.run(send_malformed(router.address, MAX_CONTEXT, total=100, garbage=50, seed=0)))
    assert (tally.sent, tally.finished, tally.lost) == (150, 0, 0), tally.row()
    assert tally.outcomes[FINISHED] == 0 and sum(tally.refused.values()) == 150
