"""A verifier in its own process for the engine benchmarks: `smartspec serve verifier` on a free port."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc

from smartspec.serving import CHANNEL_OPTIONS
from smartspec.wire import verifier_pb2, verifier_pb2_grpc


class VerifierProcess:
    """Starts the verifier (embedded target unless `flags` say otherwise) and waits until it answers;
    a context manager that stops it on exit (its stdin closes: the verifier's signal to stop)."""

    def __init__(self, flags: list[str], startup_s: float = 300.0) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "smartspec.cli", "serve", "verifier", "--port", "0", *flags],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.address = ""
        for line in self.process.stdout:
            if line.startswith("listening"):
                self.address = line.split("=", 1)[1].strip()
                break
        if not self.address:
            raise RuntimeError("the verifier exited before it was listening")
        self.stub = verifier_pb2_grpc.VerifierServiceStub(grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS))
        deadline = time.monotonic() + startup_s
        while True:
            try:
                self.info = self.stub.Info(verifier_pb2.InfoRequest(), timeout=5)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the verifier did not load its model in time") from None
                time.sleep(0.5)

    def __enter__(self) -> "VerifierProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.stdin.close()
        self.process.terminate()
        self.process.wait(30)
