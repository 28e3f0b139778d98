"""The verifier over real gRPC on loopback: exact output, KV accounting, clear errors, health, binding."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from smartspec.sampling import DraftDistribution, SamplingParams, pack_distributions
from smartspec.serving import CHANNEL_OPTIONS, wait_serving
from smartspec.wire import verifier_pb2 as pb
from smartspec.wire import verifier_pb2_grpc
from tests.support import ServerThread, first_mismatch, reference_greedy
from verifier_svc.main import build_servicer
from verifier_svc.server import SERVICE_NAME


@pytest.fixture(scope="module")
def server(tiny_target):
    servicer = build_servicer(str(tiny_target), max_sequences=4)
    thread = ServerThread(lambda s: verifier_pb2_grpc.add_VerifierServiceServicer_to_server(servicer, s), [SERVICE_NAME])
    yield thread
    thread.stop()
    servicer.thread.close()


@pytest.fixture
def stub(server):
    channel = grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS)
    yield verifier_pb2_grpc.VerifierServiceStub(channel)
    channel.close()


def _status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_verify_over_grpc_equals_generate(stub, tiny_target):
    prompts = {"g1": [5, 17, 300, 42], "g2": list(range(100, 190))}
    refs = {rid: reference_greedy(tiny_target, prompt, 16) for rid, prompt in prompts.items()}
    first = stub.Prefill(pb.PrefillRequest(items=[pb.PrefillItem(request_id=r, token_ids=p) for r, p in prompts.items()]))
    assert first.stats.num_sequences == 2 and first.stats.num_new_tokens == 94 and first.stats.forward_s > 0
    outputs = {rid: [tok] for rid, tok in zip(prompts, first.next_token_ids)}
    steps = 0
    while any(len(outputs[r]) < len(refs[r][0]) for r in prompts):
        # g1 proposes the next 3 reference tokens (all right); g2 proposes 2 wrong tokens
        d1 = refs["g1"][0][len(outputs["g1"]) : len(outputs["g1"]) + 3]
        d2 = [(t + 1) % 49152 for t in refs["g2"][0][len(outputs["g2"]) : len(outputs["g2"]) + 2]]
        reply = stub.Verify(pb.VerifyRequest(request_ids=["g1", "g2"], draft_counts=[len(d1), len(d2)], draft_token_ids=d1 + d2))
        assert list(reply.accepted_counts) == [len(d1), 0]
        assert reply.stats.num_new_tokens == len(d1) + len(d2) + 2
        emitted = list(reply.emitted_token_ids)
        outputs["g1"] += emitted[: len(d1) + 1]
        outputs["g2"] += emitted[len(d1) + 1 :]
        assert list(reply.committed_lengths) == [len(prompts[r]) + len(outputs[r]) for r in ("g1", "g2")]
        steps += 1
    for rid, (ref, gaps) in refs.items():
        assert first_mismatch(outputs[rid][: len(ref)], ref, gaps) is None, rid
    assert steps < 16  # g1's accepted drafts really shortened the run
    stub.Release(pb.ReleaseRequest(request_ids=list(prompts)))


def test_info_reports_kv_and_release_frees_it(stub):
    before = stub.Info(pb.InfoRequest())
    assert before.model.vocab_size == 49152 and before.model.max_context == 512 and before.max_sequences == 4
    stub.Prefill(pb.PrefillRequest(items=[pb.PrefillItem(request_id="kv1", token_ids=[1] * 30), pb.PrefillItem(request_id="kv2", token_ids=[2] * 10)]))
    during = stub.Info(pb.InfoRequest())
    assert during.live_sequences == before.live_sequences + 2
    assert during.kv_used_tokens == before.kv_used_tokens + 40
    assert stub.Release(pb.ReleaseRequest(request_ids=["kv1", "kv2", "never-existed"])).released == 2
    after = stub.Info(pb.InfoRequest())
    assert (after.live_sequences, after.kv_used_tokens) == (before.live_sequences, before.kv_used_tokens)


def test_bad_requests_get_clear_statuses(stub):
    code, msg = _status(lambda: stub.Verify(pb.VerifyRequest(request_ids=["ghost"], draft_counts=[0])))
    assert code == grpc.StatusCode.NOT_FOUND and "ghost" in msg
    code, msg = _status(lambda: stub.Prefill(pb.PrefillRequest(items=[pb.PrefillItem(request_id="e")])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "at least one token" in msg
    code, msg = _status(lambda: stub.Prefill(pb.PrefillRequest(items=[pb.PrefillItem(request_id="long", token_ids=[1] * 512)])))
    assert code == grpc.StatusCode.OUT_OF_RANGE and "512" in msg
    code, msg = _status(lambda: stub.Prefill(pb.PrefillRequest(items=[pb.PrefillItem(request_id="v", token_ids=[49152])])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "vocabulary" in msg
    too_many = [pb.PrefillItem(request_id=f"m{i}", token_ids=[1]) for i in range(5)]
    code, msg = _status(lambda: stub.Prefill(pb.PrefillRequest(items=too_many)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "slots" in msg

    stub.Prefill(pb.PrefillRequest(items=[pb.PrefillItem(request_id="x", token_ids=[1, 2])]))
    code, _ = _status(lambda: stub.Prefill(pb.PrefillRequest(items=[pb.PrefillItem(request_id="x", token_ids=[1])])))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, msg = _status(lambda: stub.Verify(pb.VerifyRequest(request_ids=["x"], draft_counts=[2], draft_token_ids=[1])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "add up" in msg
    code, msg = _status(lambda: stub.Verify(pb.VerifyRequest(request_ids=["x", "x"], draft_counts=[0, 0])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "more than once" in msg
    code, _ = _status(lambda: stub.Verify(pb.VerifyRequest(request_ids=["x"], draft_counts=[1, 1], draft_token_ids=[1, 1])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # a failed call changes nothing: x still verifies
    assert len(stub.Verify(pb.VerifyRequest(request_ids=["x"], draft_counts=[0])).emitted_token_ids) == 1
    stub.Release(pb.ReleaseRequest(request_ids=["x"]))


def test_invalid_drafts_are_cut_where_the_caller_asks_and_refused_where_not(stub, tiny_target):
    """A router passes on untrusted drafters' proposals with cut_invalid_drafts: the verifier checks
    them once and verifies each proposal's valid prefix (chains, trees and sampled drafts alike);
    without the flag the same call is refused with the token named."""
    prompt = [5, 17, 300, 42]
    ref, _ = reference_greedy(tiny_target, prompt, 12)
    first = stub.Prefill(pb.PrefillRequest(items=[pb.PrefillItem(request_id="cut", token_ids=prompt)])).next_token_ids[0]
    assert first == ref[0]
    bad = 49152 + 5
    code, msg = _status(lambda: stub.Verify(pb.VerifyRequest(request_ids=["cut"], draft_counts=[3], draft_token_ids=[ref[1], bad, ref[2]])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and str(bad) in msg and "vocabulary" in msg
    chain = stub.Verify(pb.VerifyRequest(request_ids=["cut"], draft_counts=[4], draft_token_ids=[ref[1], ref[2], bad, ref[3]], cut_invalid_drafts=True))
    assert list(chain.verified_draft_counts) == [2] and list(chain.accepted_counts) == [2]
    assert list(chain.emitted_token_ids) == ref[1:4] and chain.stats.num_new_tokens == 3
    # a tree: node 2 (a sibling of node 1) is invalid, so nodes 2 and 3 go; the path 0 -> 1 stays
    tree = stub.Verify(pb.VerifyRequest(request_ids=["cut"], draft_counts=[4], draft_token_ids=[ref[4], ref[5], bad, ref[6]],
                                        draft_parents=[-1, 0, 0, 1], cut_invalid_drafts=True))
    assert list(tree.verified_draft_counts) == [2] and list(tree.emitted_token_ids) == ref[4:7]
    clean = stub.Verify(pb.VerifyRequest(request_ids=["cut"], draft_counts=[1], draft_token_ids=[ref[7]], cut_invalid_drafts=True))
    assert list(clean.verified_draft_counts) == [1] and list(clean.emitted_token_ids) == ref[7:9]
    stub.Release(pb.ReleaseRequest(request_ids=["cut"]))

    sampling = SamplingParams(1.0, seed=3).to_wire()
    stub.Prefill(pb.PrefillRequest(items=[pb.PrefillItem(request_id="q", token_ids=prompt, sampling=sampling)]))
    impossible = DraftDistribution((7, 9), (1.0, 0.0))  # token 9 cannot have been sampled from it
    dists = pack_distributions([[DraftDistribution((7,), (1.0,)), impossible]])
    code, msg = _status(lambda: stub.Verify(pb.VerifyRequest(request_ids=["q"], draft_counts=[2], draft_token_ids=[7, 9], draft_distributions=dists)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "probability 0" in msg
    reply = stub.Verify(pb.VerifyRequest(request_ids=["q"], draft_counts=[2], draft_token_ids=[7, 9], draft_distributions=dists, cut_invalid_drafts=True))
    assert list(reply.verified_draft_counts) == [1] and reply.accepted_counts[0] <= 1
    stub.Release(pb.ReleaseRequest(request_ids=["q"]))


def test_health_and_reflection(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert SERVICE_NAME in names and "grpc.health.v1.Health" in names


def test_a_taken_port_is_refused(server):
    """grpcio's default SO_REUSEPORT would let two servers share a port; ours refuse."""
    from smartspec.serving import start_server

    port = int(server.address.rsplit(":", 1)[1])
    with pytest.raises(OSError, match="cannot bind"):
        server.call(start_server(lambda s: None, [], "127.0.0.1", port))


def test_serve_command_announces_its_port_and_stops_on_sigterm(tiny_target):
    env = {**os.environ, "SMARTSPEC_TARGET_MODEL": str(tiny_target)}
    proc = subprocess.Popen([sys.executable, "-m", "smartspec.cli", "serve", "verifier", "--port", "0"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("listening verifier=127.0.0.1:"), line
        asyncio.run(wait_serving(line.split("=", 1)[1], 60))  # it binds first, then loads the model
        with grpc.insecure_channel(line.split("=", 1)[1]) as channel:
            info = verifier_pb2_grpc.VerifierServiceStub(channel).Info(pb.InfoRequest(), timeout=10)
        assert info.model.model == str(tiny_target)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
