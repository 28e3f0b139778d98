"""Acceptance traces: the file format, and recording through a drafter service's Propose RPC gives, at
every output position, exactly what that drafter proposes with the context up to there."""

from __future__ import annotations

import asyncio
import random

import pytest

from drafter_svc.main import build_servicer
from drafter_svc.prompt_lookup import NgramIndex
from drafter_svc.server import SERVICE_NAME
from smartspec.bench.record import drafter_proposals, trace_of
from smartspec.bench.traces import FORMAT, RequestTrace, TraceSet, accepted_prefix, parse_traces, read_traces, write_traces
from smartspec.wire import drafter_pb2, drafter_pb2_grpc
from tests.support import ServerThread

K_MAX = 8


def serve(servicer) -> ServerThread:
    return ServerThread(lambda s: drafter_pb2_grpc.add_DrafterServiceServicer_to_server(servicer, s), [SERVICE_NAME])


def copying_requests(count: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts and outputs that partly copy the prompt (prompt lookup has long matches, misses and no-matches)."""
    rng = random.Random(seed)
    prompts, outputs = [], []
    for _ in range(count):
        prompt = [rng.randrange(50) for _ in range(rng.randrange(20, 40))]
        output: list[int] = []
        while len(output) < 30:
            if rng.random() < 0.5:
                start = rng.randrange(len(prompt) - 6)
                output.extend(prompt[start : start + rng.randrange(2, 7)])
            else:
                output.append(50 + rng.randrange(50))  # never in the prompt
        prompts.append(prompt)
        outputs.append(output[:30])
    return prompts, outputs


def lookup_trace(prompt: list[int], output: list[int]) -> tuple[list[int], list[int]]:
    """What a fresh prompt-lookup index proposes at each output position, from the whole context."""
    proposed, accepted = [], []
    for p in range(len(output)):
        draft = NgramIndex(1, 3).propose([*prompt, *output[:p]], K_MAX)
        proposed.append(len(draft))
        accepted.append(accepted_prefix(draft, output, p, K_MAX))
    return proposed, accepted


class ForgetfulStub:
    """A DrafterService stub whose drafter loses every request's state before every `every`-th Propose
    (as after an eviction or a restart): the recorder must resend whole and still get the same drafts."""

    def __init__(self, stub, every: int) -> None:
        self.stub, self.every, self.calls, self.resyncs = stub, every, 0, 0

    async def Propose(self, message, timeout=None):
        self.calls += 1
        if self.calls % self.every == 0:
            await self.stub.Release(drafter_pb2.ReleaseRequest(request_ids=list(message.request_ids)), timeout=timeout)
        response = await self.stub.Propose(message, timeout=timeout)
        self.resyncs += sum(s == drafter_pb2.PROPOSE_STATUS_RESYNC_REQUIRED for s in response.statuses)
        return response

    async def Release(self, message, timeout=None):
        return await self.stub.Release(message, timeout=timeout)


def test_the_format_round_trips_and_refuses_impossible_lengths(tmp_path):
    request = RequestTrace(3, (1, 2, 3), (4, 5, 6), {"prompt_lookup": (2, 0, 1)}, {"prompt_lookup": (2, 0, 0)})
    traces = TraceSet("copy", K_MAX, ("prompt_lookup",), (request,), {"target_model": "m"})
    path = tmp_path / "copy.jsonl"
    write_traces(path, traces)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and FORMAT in lines[0] and " " not in lines[1]  # a header, then one compact line per request
    assert read_traces(path) == traces
    bad = RequestTrace(3, (1, 2, 3), (4, 5, 6), {"prompt_lookup": (2, 0, 1)}, {"prompt_lookup": (2, 0, 2)})  # 2 accepted past the end
    write_traces(path, TraceSet("copy", K_MAX, ("prompt_lookup",), (bad,)))
    with pytest.raises(ValueError, match="position 2"):
        read_traces(path)
    with pytest.raises(ValueError, match="not an acceptance trace"):
        parse_traces(['{"prompt_index": 0}'], "x")
    with pytest.raises(ValueError, match="malformed"):
        parse_traces([lines[0], '{"prompt_index": 0}'], "x")


def test_accepted_prefix_is_the_common_prefix_within_k_max():
    output = [1, 2, 3, 4, 5]
    assert accepted_prefix([2, 3, 9], output, 1, K_MAX) == 2
    assert accepted_prefix([], output, 0, K_MAX) == 0
    assert accepted_prefix([4, 5, 6], output, 3, K_MAX) == 2  # the output ends
    assert accepted_prefix([1, 2, 3], output, 0, 2) == 2  # k_max


def test_recorded_prompt_lookup_lengths_are_what_it_proposes_at_each_position():
    prompts, outputs = copying_requests(5, seed=1)
    servicer = build_servicer("prompt_lookup")
    server = serve(servicer)
    try:
        proposals = asyncio.run(drafter_proposals(server.address, [f"r{i}" for i in range(5)], prompts, outputs, K_MAX, 30.0, batch=2))
    finally:
        server.stop()
        servicer.thread.close()
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        trace = trace_of(i, prompt, output, {"prompt_lookup": proposals[i]}, K_MAX)
        proposed, accepted = lookup_trace(prompt, output)
        assert list(trace.proposed["prompt_lookup"]) == proposed and list(trace.accepted["prompt_lookup"]) == accepted
        trace.check(K_MAX, ["prompt_lookup"])
    every = [x for i in range(5) for x in lookup_trace(prompts[i], outputs[i])[0]]
    assert 0 in every and max(every) == K_MAX  # no proposal somewhere, full proposals elsewhere


def test_a_drafter_that_loses_state_is_resent_whole_and_proposes_the_same():
    import grpc

    from smartspec.bench import record

    prompts, outputs = copying_requests(3, seed=2)
    servicer = build_servicer("prompt_lookup")
    server = serve(servicer)

    async def replay() -> tuple[list, ForgetfulStub]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = ForgetfulStub(drafter_pb2_grpc.DrafterServiceStub(channel), every=4)
            return await record._replay(stub, ["a", "b", "c"], prompts, outputs, K_MAX, 30.0), stub

    try:
        proposals, stub = asyncio.run(replay())
    finally:
        server.stop()
        servicer.thread.close()
    assert stub.resyncs > 0
    for i in range(3):
        assert [len(d) for d in proposals[i]] == lookup_trace(prompts[i], outputs[i])[0]


def test_recorded_draft_model_lengths_are_what_a_fresh_draft_model_proposes(tiny_draft, tiny_target):
    """Incremental sync over the RPC (KV kept and rolled back) against a fresh drafter fed the whole context."""
    from drafter_svc.engine import DrafterEngine
    from drafter_svc.registry import load
    from tests.support import reference_greedy

    rng = random.Random(0)
    prompts = [[rng.randrange(1, 2000) for _ in range(12)] for _ in range(3)]
    outputs = [reference_greedy(tiny_target, prompt, 16)[0] for prompt in prompts]  # what a verifier would commit
    servicer = build_servicer("draft_model", draft_model=str(tiny_draft), max_sequences=2)
    server = serve(servicer)
    try:
        proposals = asyncio.run(drafter_proposals(server.address, ["a", "b", "c"], prompts, outputs, K_MAX, 60.0, batch=2))
    finally:
        server.stop()
        servicer.thread.close()
    fresh = DrafterEngine(load("draft_model")(draft_model=str(tiny_draft), max_sequences=2))
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        for p in range(len(output)):
            context = [*prompt, *output[:p]]
            want = fresh.propose([f"{i}-{p}"], [len(context)], [context], [K_MAX]).drafts[0]
            fresh.release([f"{i}-{p}"])
            assert proposals[i][p] == want, (i, p)
