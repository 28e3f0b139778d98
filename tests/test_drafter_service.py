"""The drafter over real gRPC on loopback, its command line, and the backend registry."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import grpc
import pytest

from drafter_svc import registry
from drafter_svc.examples.repeat_last import RepeatLastDrafter
from drafter_svc.main import build_servicer
from drafter_svc.server import SERVICE_NAME
from smartspec.serving import CHANNEL_OPTIONS, wait_serving
from smartspec.wire import drafter_pb2 as pb
from smartspec.wire import drafter_pb2_grpc
from tests.support import ServerThread

ROOT = Path(__file__).resolve().parents[1]
OK, RESYNC = pb.PROPOSE_STATUS_OK, pb.PROPOSE_STATUS_RESYNC_REQUIRED


def serve(servicer) -> ServerThread:
    return ServerThread(lambda s: drafter_pb2_grpc.add_DrafterServiceServicer_to_server(servicer, s), [SERVICE_NAME])


@pytest.fixture(scope="module")
def lookup_stub():
    servicer = build_servicer("prompt_lookup")
    server = serve(servicer)
    channel = grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS)
    yield drafter_pb2_grpc.DrafterServiceStub(channel)
    channel.close()
    server.stop()
    servicer.thread.close()


def request(*items: tuple[str, int, list[int], int]) -> pb.ProposeRequest:
    """items: (request id, committed length, appended tokens, k)."""
    return pb.ProposeRequest(
        request_ids=[i[0] for i in items],
        committed_lengths=[i[1] for i in items],
        appended_counts=[len(i[2]) for i in items],
        appended_token_ids=[t for i in items for t in i[2]],
        max_draft_tokens=[i[3] for i in items],
    )


def error_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_sync_protocol_over_grpc(lookup_stub):
    stub = lookup_stub
    reply = stub.Propose(request(("p", 6, [1, 2, 3, 4, 1, 2], 2), ("q", 2, [9, 8], 2)))
    assert list(reply.statuses) == [OK, OK]
    assert list(reply.draft_counts) == [2, 0] and list(reply.draft_token_ids) == [3, 4]
    assert reply.stats.num_sequences == 2 and reply.stats.num_forwards == 0 and reply.stats.handler_s > 0
    reply = stub.Propose(request(("p", 7, [3], 3)))  # the delta: context is now 1 2 3 4 1 2 3
    assert list(reply.statuses) == [OK] and list(reply.draft_token_ids) == [4, 1, 2]
    reply = stub.Propose(request(("p", 9, [4], 3), ("ghost", 3, [1], 3)))  # 7 + 1 != 9; unknown id
    assert list(reply.statuses) == [RESYNC, RESYNC] and list(reply.draft_counts) == [0, 0]
    reply = stub.Propose(request(("p", 4, [5, 6, 5, 6], 3)))  # full resend
    assert list(reply.statuses) == [OK] and list(reply.draft_token_ids) == [5, 6]
    assert stub.Info(pb.InfoRequest()).live_sequences == 2
    assert stub.Release(pb.ReleaseRequest(request_ids=["p", "q", "never"])).released == 2
    info = stub.Info(pb.InfoRequest())
    assert info.kind == "prompt_lookup" and info.live_sequences == 0 and not info.HasField("model")


def test_malformed_batches_are_invalid_argument(lookup_stub):
    stub = lookup_stub
    code, msg = error_of(lambda: stub.Propose(pb.ProposeRequest(request_ids=["a", "b"], committed_lengths=[1, 1], appended_counts=[1, 1], appended_token_ids=[1, 2], max_draft_tokens=[1])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "one entry per request" in msg
    code, msg = error_of(lambda: stub.Propose(pb.ProposeRequest(request_ids=["a"], committed_lengths=[2], appended_counts=[2], appended_token_ids=[1], max_draft_tokens=[1])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "add up to 2 but 1" in msg
    code, msg = error_of(lambda: stub.Propose(request(("a", 1, [1], 1), ("a", 1, [1], 1))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "more than once" in msg


def test_draft_model_over_grpc(tiny_draft):
    servicer = build_servicer("draft_model", draft_model=str(tiny_draft), max_sequences=2)
    server = serve(servicer)
    try:
        with grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
            stub = drafter_pb2_grpc.DrafterServiceStub(channel)
            info = stub.Info(pb.InfoRequest())
            assert info.kind == "draft_model" and info.model.model == str(tiny_draft) and info.model.vocab_size == 49152
            reply = stub.Propose(request(("a", 3, [5, 17, 300], 3), ("b", 1, [9], 1)))
            assert list(reply.statuses) == [OK, OK] and list(reply.draft_counts) == [3, 1]
            assert reply.stats.num_forwards == 3 and reply.stats.num_new_tokens == 4 + 2 and reply.stats.forward_s > 0
            code, msg = error_of(lambda: stub.Propose(request(("a", 4, [49152], 1))))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "vocabulary" in msg
            code, msg = error_of(lambda: stub.Propose(request(*[(f"r{i}", 1, [1], 1) for i in range(3)])))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 2" in msg
            assert stub.Info(pb.InfoRequest()).live_sequences == 2
    finally:
        server.stop()
        servicer.thread.close()


# --- registry ------------------------------------------------------------------------------------
def test_pyproject_declares_the_builtins():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][registry.GROUP]
    assert declared == registry.BUILTINS
    for name in declared:
        assert registry.load(name).kind == name


def test_unknown_or_wrong_kinds_are_refused():
    with pytest.raises(ValueError, match="unknown drafter kind 'nope'.*prompt_lookup"):
        registry.load("nope")
    with pytest.raises(ValueError, match="not a subclass"):
        registry.load("drafter_svc.engine:DrafterEngine")
    with pytest.raises(ValueError, match="no attribute"):
        registry.load("drafter_svc.engine:Nothing")


def test_another_package_registers_through_the_entry_point_group(tmp_path, monkeypatch):
    """What docs/drafters.md tells a package to declare, as an installed distribution would carry it."""
    dist = tmp_path / "my_drafters-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-drafters\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{registry.GROUP}]\nrepeat_last = drafter_svc.examples.repeat_last:RepeatLastDrafter\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert registry.available()["repeat_last"] == "drafter_svc.examples.repeat_last:RepeatLastDrafter"
    assert registry.load("repeat_last") is RepeatLastDrafter


def test_docs_show_the_example_backend_verbatim():
    docs = (ROOT / "docs" / "drafters.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", docs, flags=re.S)
    assert (ROOT / "drafter_svc" / "examples" / "repeat_last.py").read_text() in blocks


# --- command line --------------------------------------------------------------------------------
def test_help_lists_the_chosen_backends_flags(capsys):
    from smartspec.cli import main

    for argv, present, absent in [
        (["serve", "drafter", "--help"], "--max-n", "--draft-model"),
        (["serve", "drafter", "--kind", "draft_model", "--help"], "--draft-model", "--max-n"),
        (["serve", "drafter", "--kind=drafter_svc.examples.repeat_last:RepeatLastDrafter", "--help"], "--max-repeat", "--max-n"),
    ]:
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert present in out and absent not in out, argv
    with pytest.raises(SystemExit):
        main(["serve", "drafter", "--kind", "nope"])
    assert "unknown drafter kind 'nope'" in capsys.readouterr().err


def test_cli_import_stays_light():
    code = "import sys, smartspec.cli, drafter_svc.main; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_serve_command_runs_a_backend_given_as_module_and_class():
    env = {**os.environ, "SMARTSPEC_MAX_REPEAT": "2"}
    kind = "drafter_svc.examples.repeat_last:RepeatLastDrafter"
    proc = subprocess.Popen(
        [sys.executable, "-m", "smartspec.cli", "serve", "drafter", "--kind", kind, "--port", "0"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("listening repeat_last=127.0.0.1:"), line
        asyncio.run(wait_serving(line.split("=", 1)[1], 30))  # it binds first, then builds the backend
        with grpc.insecure_channel(line.split("=", 1)[1]) as channel:
            stub = drafter_pb2_grpc.DrafterServiceStub(channel)
            reply = stub.Propose(request(("r", 2, [7, 9], 5)), timeout=10)
            assert list(reply.draft_token_ids) == [9, 9]  # --max-repeat from its environment variable
            assert stub.Info(pb.InfoRequest(), timeout=10).kind == "repeat_last"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
