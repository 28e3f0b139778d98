"""Service lifecycle over real `smartspec serve` processes: a service binds first and reports NOT_SERVING
(refusing calls with UNAVAILABLE) while it loads, SERVING once loaded; on SIGTERM it reports NOT_SERVING,
finishes its in-flight calls within --grace-s and exits 0. Also `smartspec health`'s exit codes.
Every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from drafter_svc.server import SERVICE_NAME as DRAFTER_SERVICE
from smartspec.commands.health import check
from smartspec.serving import LOADING_MESSAGE, wait_serving
from smartspec.wire import drafter_pb2, drafter_pb2_grpc, verifier_pb2, verifier_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
SMARTSPEC = [sys.executable, "-m", "smartspec.cli"]
GATED = "tests.gated_drafter:GatedDrafter"
PROPOSE = drafter_pb2.ProposeRequest(request_ids=["r"], committed_lengths=[3], appended_counts=[3], appended_token_ids=[5, 6, 7], max_draft_tokens=[2])


def _env() -> dict[str, str]:
    """This environment without SMARTSPEC_* flag variables (they would change the services' flags)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SMARTSPEC_") or k == "SMARTSPEC_CACHE_DIR"}


@contextlib.contextmanager
def serve(argv: list[str], log: Path, timeout_s: float = 60.0) -> Iterator[tuple[subprocess.Popen, str]]:
    """Starts `smartspec serve ...` and yields it with the address of its `listening ROLE=HOST:PORT` line."""
    with open(log, "w") as err:
        process = subprocess.Popen([*SMARTSPEC, "serve", *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, env=_env())
    try:
        ready, _, _ = select.select([process.stdout], [], [], timeout_s)
        line = process.stdout.readline().strip() if ready else ""
        assert line.startswith("listening ") and "=" in line, f"no listening line (got {line!r}); log:\n{log.read_text()[-3000:]}"
        yield process, line.split("=", 1)[1]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


class Watcher:
    """Every status a health Watch on the whole server reports, collected on a background thread."""

    def __init__(self, address: str) -> None:
        self.statuses: list[str] = []
        self._changed = threading.Condition()
        self._channel = grpc.insecure_channel(address)
        self._stream = health_pb2_grpc.HealthStub(self._channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(grpc.RpcError):  # the stream ends with an error when the server stops
            for reply in self._stream:
                with self._changed:
                    self.statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
                    self._changed.notify_all()

    def wait_for(self, sequence: list[str], timeout_s: float) -> list[str]:
        """Waits until the statuses seen (repeats collapsed) end with `sequence`; returns them."""
        with self._changed:
            self._changed.wait_for(lambda: self.seen()[-len(sequence):] == sequence, timeout_s)
            return self.seen()

    def seen(self) -> list[str]:
        return [s for i, s in enumerate(self.statuses) if i == 0 or self.statuses[i - 1] != s]

    def close(self) -> None:
        self._stream.cancel()
        self._channel.close()
        self._thread.join(timeout=5)


def health_cli(address: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SMARTSPEC, "health", address, "--timeout-s", "3", *extra], capture_output=True, text=True, timeout=30, env=_env())


def test_drafter_refuses_calls_while_loading_serves_when_loaded_and_drains_on_sigterm(tmp_path):
    gate, started = tmp_path / "gate", tmp_path / "started"
    argv = ["drafter", "--kind", GATED, "--port", "0", "--grace-s", "10",
            "--gate-file", str(gate), "--started-file", str(started), "--propose-delay-s", "1.5"]
    with serve(argv, tmp_path / "drafter.log") as (process, address):
        watcher = Watcher(address)
        channel = grpc.insecure_channel(address)
        stub = drafter_pb2_grpc.DrafterServiceStub(channel)
        try:
            # loading: health says NOT_SERVING, the service refuses at once, reflection works
            assert check(address) == "NOT_SERVING" and check(address, DRAFTER_SERVICE) == "NOT_SERVING"
            cli = health_cli(address)
            assert (cli.returncode, cli.stdout.strip()) == (1, "NOT_SERVING")
            began = time.monotonic()
            try:
                stub.Propose(PROPOSE, timeout=10)
                raise AssertionError("a call while loading must fail")
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE and err.details() == LOADING_MESSAGE
            assert time.monotonic() - began < 5
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            reply = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
            assert {DRAFTER_SERVICE, "grpc.health.v1.Health"} <= {s.name for s in reply.list_services_response.service}

            # loaded: SERVING, and the call works
            gate.touch()
            asyncio.run(wait_serving(address, 30))
            cli = health_cli(address)
            assert (cli.returncode, cli.stdout.strip()) == (0, "SERVING")
            unknown = health_cli(address, "--service", "no.such.Service")
            assert unknown.returncode == 1 and unknown.stdout == "" and unknown.stderr.startswith("NOT_FOUND: unknown service")

            # SIGTERM with a call in flight: NOT_SERVING at once, the call completes, exit 0 within the grace
            call = stub.Propose.future(PROPOSE, timeout=30)
            deadline = time.monotonic() + 10
            while not started.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert started.exists(), "the proposal never started"
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            assert watcher.wait_for(["NOT_SERVING", "SERVING", "NOT_SERVING"], 5) == ["NOT_SERVING", "SERVING", "NOT_SERVING"]
            assert not call.done()  # still draining while health already says NOT_SERVING
            assert list(call.result(timeout=20).draft_token_ids) == [7, 7]
            assert process.wait(timeout=15) == 0
            assert time.monotonic() - signalled < 10
        finally:
            watcher.close()
            channel.close()
    cli = health_cli(address)
    assert cli.returncode == 1 and cli.stdout == "" and cli.stderr.startswith("UNAVAILABLE: ")


def test_sigterm_while_loading_stops_serving_and_exits_0(tmp_path):
    gate = tmp_path / "gate"
    with serve(["drafter", "--kind", GATED, "--port", "0", "--gate-file", str(gate)], tmp_path / "drafter.log") as (process, address):
        assert check(address) == "NOT_SERVING"
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        # a check that lands while the server stops is CANCELLED with it; the one after finds no server
        while check(address, timeout_s=1).startswith(("NOT_SERVING", "CANCELLED")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert check(address, timeout_s=1).startswith("UNAVAILABLE")  # the server stopped without waiting for the load
        gate.touch()  # the load step in progress returns; then the process exits
        assert process.wait(timeout=15) == 0


def test_verifier_reports_not_serving_while_its_model_loads_then_serving(tiny_target, tmp_path):
    argv = ["verifier", "--port", "0", "--target-model", str(tiny_target), "--grace-s", "5"]
    with serve(argv, tmp_path / "verifier.log") as (process, address):
        watcher = Watcher(address)
        try:
            # Loading the model (transformers import, weights) takes seconds, far longer than opening the watch.
            assert watcher.wait_for(["SERVING"], 60) == ["NOT_SERVING", "SERVING"], (tmp_path / "verifier.log").read_text()[-3000:]
            with grpc.insecure_channel(address) as channel:
                info = verifier_pb2_grpc.VerifierServiceStub(channel).Info(verifier_pb2.InfoRequest(), timeout=10)
            assert info.model.model == str(tiny_target)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0
            assert watcher.wait_for(["NOT_SERVING"], 5)[-2:] == ["SERVING", "NOT_SERVING"]
        finally:
            watcher.close()
