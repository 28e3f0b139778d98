"""`smartspec up` on the tiny models, as a real subprocess: the ready line, exact output through the
stack it started, surviving a dead child, and a clean stop on SIGTERM. Every wait is bounded."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from smartspec.client import Client
from tests.support import reference_greedy

READY = re.compile(
    r"^ready router=(127\.0\.0\.1:\d+) http=(127\.0\.0\.1:\d+) verifier=(127\.0\.0\.1:\d+) draft_model=(127\.0\.0\.1:\d+) prompt_lookup=(127\.0\.0\.1:\d+) tree=(127\.0\.0\.1:\d+)$"
)
PROMPT = "The quick brown fox jumps over the lazy dog near the river bank."


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("SMARTSPEC_") or k == "SMARTSPEC_CACHE_DIR"}


def _read_line(process: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            return process.stdout.readline()
        if process.poll() is not None:
            return ""
    return ""


def _children(pid: int) -> dict[int, str]:
    """pid -> command line of the direct children of `pid` (Linux /proc)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                out[int(child)] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except FileNotFoundError:
                pass
    return out


def _serving(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.fixture
def up(tiny_target, tiny_draft, tmp_path):
    log = open(tmp_path / "up.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "smartspec.cli", "up", "--port", "0", "--target-model", str(tiny_target), "--draft-model", str(tiny_draft),
         "--grace-s", "20", "--http-port", "0"],
        stdout=subprocess.PIPE, stderr=log, text=True, env=_env(),
    )
    try:
        yield process, tmp_path / "up.log"
    finally:
        if process.poll() is None:
            children = _children(process.pid)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                for pid in children:  # they run in their own process groups: do not leave them behind
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        log.close()


def test_up_prints_ready_serves_exactly_survives_a_dead_child_and_stops_on_sigterm(up, tiny_target):
    process, log = up
    line = _read_line(process, timeout=180)
    match = READY.match(line.rstrip("\n"))
    assert match, f"no ready line (got {line!r}); log:\n{log.read_text()[-3000:]}"
    router, http_address, verifier, draft_model, prompt_lookup, tree = match.groups()
    addresses = [router, verifier, draft_model, prompt_lookup, tree]
    assert all(_serving(address) for address in addresses)
    assert _read_line(process, timeout=0.5) == ""  # exactly one line on stdout

    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_target)(PROMPT).input_ids
    ref, _ = reference_greedy(tiny_target, ids, 16)
    with Client(router, timeout_s=60) as client:
        for drafter in ("draft_model", "prompt_lookup", "tree", "none"):
            done = client.generate(PROMPT, max_tokens=16, drafter=drafter)
            assert done.token_ids == ref, drafter
        assert client.generate(PROMPT, max_tokens=16, drafter="draft_model", policy="fixed:3").stats["proposed"] > 0
        # the same router through its OpenAI-compatible HTTP API, as the `openai` client calls it
        import openai

        api = openai.OpenAI(base_url=f"http://{http_address}/v1", api_key="unused", max_retries=0, timeout=60)
        (model,) = api.models.list().data
        completion = api.completions.create(model=model.id, prompt=PROMPT, max_tokens=16, temperature=0)
        assert completion.choices[0].text == done.text and completion.usage.completion_tokens == 16

        # a child that dies is logged; the others keep running and its requests lose only speculation
        children = _children(process.pid)
        assert len(children) == 5, children
        victim = next(pid for pid, cmd in children.items() if "--kind draft_model" in cmd)
        os.kill(victim, signal.SIGKILL)
        assert _wait(lambda: "draft_model" in log.read_text() and "exited with code" in log.read_text(), 10), log.read_text()[-2000:]
        done = client.generate(PROMPT, max_tokens=16, drafter="draft_model")
        assert done.token_ids == ref and done.stats["proposed"] == 0
        assert process.poll() is None and _serving(verifier) and _serving(prompt_lookup)

    # SIGTERM while a request runs: the router drains it (within --grace-s) before anything stops
    drained = {}
    client = Client(router, timeout_s=60)
    stream = client.generate_stream(PROMPT, max_tokens=100, drafter="none")
    first = next(stream)
    reader = threading.Thread(target=lambda: drained.update(chunks=[first, *stream]))
    reader.start()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
    reader.join(timeout=10)
    client.close()
    chunks = drained.get("chunks", [])
    assert chunks and chunks[-1].finish_reason == "length" and sum(len(c.token_ids) for c in chunks) == 100
    assert not any(_serving(address) for address in addresses)
    survivors = [pid for pid in children if pid != victim and Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]]
    assert survivors == []


def test_up_fails_fast_on_a_missing_model(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "smartspec.cli", "up", "--port", "0", "--target-model", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=60, env=_env(),
    )
    assert out.returncode != 0 and out.stdout == ""
    assert "is not a Hugging Face model folder" in out.stderr
