"""Reliability figures: each failure scenario against a real stack (every service its own `smartspec
serve` process on loopback), counting the requests sent, finished, refused (by status) and lost. The
goal is 0 lost everywhere.

    python bench/reliability.py [--target-model embedded] [--draft-model embedded] [--out bench/results/reliability.json]

Scenarios (smartspec.bench.reliability sends the requests):
  validation      1,000 malformed requests, each breaking one rule (empty prompt, context overflow, bad
                  sampling values, unknown drafter, ...) and 200 undecodable messages; then valid ones
  overload        10x the router's capacity (max batch + max queue) sent at once
  cancellation    1,000 requests ended by the client (stream cancels, expired deadlines) with the real
                  drafters; the verifier's and drafters' state (their Info RPCs) before and after
  drafter killed  the prompt-lookup drafter SIGKILLed mid-load; outputs compared with the same prompts
                  without speculation; then restarted on its port
  drafter hung    the same drafter stopped (SIGSTOP) for longer than the router's Propose deadline
                  mid-load, then resumed
  verifier failover  a router in front of two verifier replicas; one SIGKILLed mid-load: its requests
                  are re-admitted on the other from their committed tokens; outputs compared as above

A request is lost when it ends with a status its scenario does not expect, or not within its deadline.
The services' logs go to a temporary folder, named on stderr. About 90 s on 2 CPU cores (bench/results/reliability.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smartspec.bench.reliability import (  # noqa: E402  (after the path fix, so the script runs from anywhere)
    CLIENT_ENDED, FINISHED, VALIDATION, Tally, burst, end_by_client, send_malformed, service_state,
)
from smartspec.commands.health import check  # noqa: E402
from smartspec.wire import router_pb2  # noqa: E402

COPY = ("Repeat the following text exactly, word for word:\n\nOur team meets every Monday at ten to review the previous week and "
        "plan the next one. Please bring a short update on your work, any blockers you have, and one thing you learned.")
PROMPTS = ["def fibonacci(n):", "Once upon a time, in a small village by the sea,", "The quick brown fox jumps over the lazy dog. " * 3]
# A chat request that copies its prompt, so prompt lookup proposes from its first steps.
COPY_CHAT = router_pb2.GenerateRequest(messages=[router_pb2.ChatMessage(role="user", content=COPY)])
MAX_BATCH, MAX_QUEUE = 4, 4  # of the router the overload scenario floods
DRAFTER_TIMEOUT_S = 0.5
CANCELLATIONS = 1000


class Service:
    """One `smartspec serve ROLE` process, its address read from its `listening` line; its log in a file."""

    def __init__(self, role: str, argv: list[str], logs: Path, timeout_s: float = 60.0) -> None:
        self.role = role
        self.argv = argv
        env = {k: v for k, v in os.environ.items() if not k.startswith("SMARTSPEC_") or k == "SMARTSPEC_CACHE_DIR"}
        with open(logs / f"{role}.log", "a") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "smartspec.cli", "serve", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                                            stderr=log, text=True, env=env, start_new_session=True)
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        line = self.process.stdout.readline().strip() if ready else ""
        if not line.startswith("listening "):
            self.process.kill()
            raise RuntimeError(f"{role} did not start (got {line!r}); see {logs / (role + '.log')}")
        self.address = line.split("=", 1)[1]

    def wait_serving(self, timeout_s: float = 600.0) -> float:
        """Seconds until its health check says SERVING."""
        started = time.monotonic()
        while check(self.address, timeout_s=2) != "SERVING":
            if self.process.poll() is not None or time.monotonic() - started > timeout_s:
                raise RuntimeError(f"{self.role} never reported SERVING")
            time.sleep(0.1)
        return time.monotonic() - started

    def send(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def wait_for_state(verifier: str, drafters: dict[str, str], want: dict[str, int], timeout_s: float = 30.0) -> dict[str, int]:
    """The services' state once it equals `want` (or whatever it is after `timeout_s`): releases run in the background."""
    deadline = time.monotonic() + timeout_s
    while (state := service_state(verifier, drafters)) != want and time.monotonic() < deadline:
        time.sleep(0.2)
    return state


# --- scenarios ----------------------------------------------------------------------------------------
def validation(router: str, max_context: int) -> Tally:
    tally = Tally("validation", VALIDATION)
    tally.outcomes.update(asyncio.run(send_malformed(router, max_context, total=1000, garbage=200, seed=1)))
    valid = [router_pb2.GenerateRequest(prompt=prompt, max_tokens=8) for prompt in PROMPTS]
    for reply in asyncio.run(burst(router, valid, timeout_s=300)):
        tally.add(reply.outcome)
    tally.notes = {"malformed": 1000, "undecodable": 200, "valid_after": len(valid)}
    return tally


def overload(router: str) -> Tally:
    capacity = MAX_BATCH + MAX_QUEUE
    requests = [router_pb2.GenerateRequest(prompt=f"{PROMPTS[i % len(PROMPTS)]} ({i})", max_tokens=32, drafter="none") for i in range(10 * capacity)]
    replies = asyncio.run(burst(router, requests, timeout_s=600))
    tally = Tally("overload", frozenset({"RESOURCE_EXHAUSTED"}))
    for reply in replies:
        tally.add(reply.outcome)
    refused_s = [r.seconds for r in replies if r.outcome == "RESOURCE_EXHAUSTED"]
    finished_s = sorted(r.seconds for r in replies if r.outcome == FINISHED)
    tally.notes = {
        "capacity": capacity, "max_batch": MAX_BATCH, "max_queue": MAX_QUEUE,
        "slowest_refusal_ms": round(1000 * max(refused_s), 1) if refused_s else None,
        "median_finish_s": round(finished_s[len(finished_s) // 2], 2) if finished_s else None,
    }
    return tally


def cancellation(router: str, verifier: str, drafters: dict[str, str]) -> Tally:
    before = service_state(verifier, drafters)
    started = time.monotonic()
    outcomes = asyncio.run(end_by_client(router, PROMPTS, total=CANCELLATIONS, concurrency=25, seed=2,
                                         drafters=("prompt_lookup", "draft_model", "auto", "none"), policies=("fixed:3", "goodput", "fixed:1")))
    tally = Tally("cancellation", CLIENT_ENDED, outcomes)
    after = wait_for_state(verifier, drafters, before)
    tally.notes = {"seconds": round(time.monotonic() - started, 1), "state_before": before, "state_after": after, "state_leaked": after != before}
    return tally


def drafter_batch() -> list[router_pb2.GenerateRequest]:
    """What the drafter scenarios send: prompt lookup at k = 3, the copying chat request among them."""
    requests = []
    for template in [COPY_CHAT, *(router_pb2.GenerateRequest(prompt=prompt) for prompt in PROMPTS)]:
        for _ in range(3):
            request = router_pb2.GenerateRequest()
            request.CopyFrom(template)
            request.max_tokens, request.drafter, request.policy = 32, "prompt_lookup", "fixed:3"
            requests.append(request)
    return requests


def drafter_failure(
    name: str, router: str, verifier: str, drafters: dict[str, str], fail: Callable[[], None], recover: Callable[[], None], reference: list[list[int]]
) -> Tally:
    """Sends `drafter_batch()`, makes the prompt-lookup drafter fail mid-load (`fail`), checks every
    output against `reference` (the same requests without speculation), then `recover`s the drafter
    and times until its drafts are used again."""
    requests = drafter_batch()

    async def batch_with_failure():
        sending = asyncio.ensure_future(burst(router, requests, timeout_s=600))
        await asyncio.sleep(1.5)  # mid-load: every request admitted or queued, none finished
        fail()
        return await sending

    replies = asyncio.run(batch_with_failure())
    tally = Tally(name, frozenset())
    for reply in replies:
        tally.add(reply.outcome)
    exact = sum(r.response is not None and list(r.response.token_ids) == want for r, want in zip(replies, reference))
    recovering = time.monotonic()
    recover()
    probe = drafter_batch()[0]
    recovery_s = None
    while time.monotonic() - recovering < 60:
        [reply] = asyncio.run(burst(router, [probe], timeout_s=120))
        if reply.response is not None and reply.response.stats.proposed > 0:
            recovery_s = round(time.monotonic() - recovering, 1)
            break
        time.sleep(0.2)
    baseline = dict.fromkeys(service_state(verifier, drafters), 0)
    after = wait_for_state(verifier, drafters, baseline)
    tally.notes = {
        "token_exact": exact, "proposed_before_failure": sum(r.response.stats.proposed for r in replies if r.response is not None),
        "drafter_used_again_s": recovery_s, "state_after": after, "state_leaked": after != baseline,
    }
    return tally


def verifier_failover(router: str, victim: Service, reference: list[list[int]], router_log: Path) -> Tally:
    """Sends `drafter_batch()` to a router with two verifier replicas and kills `victim` (one of them)
    mid-load; every request must finish with the output it has without any failure."""
    requests = drafter_batch()

    async def batch_with_failure():
        sending = asyncio.ensure_future(burst(router, requests, timeout_s=600))
        await asyncio.sleep(1.5)  # mid-load: both replicas hold requests, none finished
        victim.send(signal.SIGKILL)
        return await sending

    started = time.monotonic()
    replies = asyncio.run(batch_with_failure())
    tally = Tally("verifier failover", frozenset())
    for reply in replies:
        tally.add(reply.outcome)
    moved = [int(n) for n in re.findall(r"(\d+) of its requests move to another replica", router_log.read_text())]
    tally.notes = {
        "token_exact": sum(r.response is not None and list(r.response.token_ids) == want for r, want in zip(replies, reference)),
        "requests_moved": sum(moved), "seconds": round(time.monotonic() - started, 1),
    }
    return tally


# --- output -------------------------------------------------------------------------------------------
def table(tally: Tally) -> str:
    row = tally.row()
    refused = ", ".join(f"{status} {n}" for status, n in row["refused"].items()) or "-"
    lines = [
        f"== {tally.scenario}",
        f"{'sent':>6} {'finished':>9} {'lost':>5}  refused (status)",
        f"{row['sent']:>6} {row['finished']:>9} {row['lost']:>5}  {refused}",
    ]
    if row["lost_by_status"]:
        lines.append(f"lost by status: {row['lost_by_status']}")
    lines += [f"  {key}: {value}" for key, value in tally.notes.items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-model", default="embedded")
    parser.add_argument("--draft-model", default="embedded")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "reliability.json"))
    args = parser.parse_args()

    from smartspec.models import resolve_model_path

    target = str(resolve_model_path(args.target_model, "target"))
    draft = str(resolve_model_path(args.draft_model, "draft"))
    logs = Path(tempfile.mkdtemp(prefix="smartspec-reliability-"))
    print(f"service logs: {logs}", file=sys.stderr, flush=True)
    started = time.monotonic()
    services: list[Service] = []
    try:
        verifier = Service("verifier", ["verifier", "--port", "0", "--target-model", target, "--max-sequences", "32"], logs)
        lookup = Service("prompt_lookup", ["drafter", "--kind", "prompt_lookup", "--port", "0"], logs)
        draft_model = Service("draft_model", ["drafter", "--kind", "draft_model", "--port", "0", "--draft-model", draft], logs)
        services += [verifier, lookup, draft_model]
        drafters = {"prompt_lookup": lookup.address, "draft_model": draft_model.address}
        for service in services:
            service.wait_serving()
        common = ["--verifier", verifier.address, "--target-model", target, "--cost-profile", "off", "--drafter-timeout-s", str(DRAFTER_TIMEOUT_S),
                  *(part for name, address in drafters.items() for part in ("--drafter-address", f"{name}={address}"))]
        router = Service("router", ["router", "--port", "0", *common], logs)
        small = Service("router-small", ["router", "--port", "0", "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE), *common], logs)
        replica = Service("verifier2", ["verifier", "--port", "0", "--target-model", target, "--max-sequences", "32"], logs)
        services += [router, small, replica]
        router.wait_serving()
        small.wait_serving()
        replica.wait_serving()
        replicated = Service("router-replicated", ["router", "--port", "0", "--verifier", replica.address, *common], logs)
        services.append(replicated)
        replicated.wait_serving()
        stack_s = time.monotonic() - started
        max_context = verifier_context(verifier.address)
        # The drafter scenarios' requests without speculation: their outputs must equal these.
        plain = drafter_batch()
        for request in plain:
            request.drafter, request.policy = "none", "none"
        reference = [list(reply.response.token_ids) for reply in asyncio.run(burst(router.address, plain, timeout_s=600))]

        tallies: list[Tally] = []
        for run in (
            lambda: validation(router.address, max_context),
            lambda: overload(small.address),
            lambda: cancellation(router.address, verifier.address, drafters),
            lambda: drafter_failure("drafter killed", router.address, verifier.address, drafters,
                                    fail=lambda: lookup.send(signal.SIGKILL), recover=lambda: restart(lookup, logs), reference=reference),
            lambda: drafter_failure("drafter hung", router.address, verifier.address, drafters,
                                    fail=lambda: lookup.send(signal.SIGSTOP), recover=lambda: lookup.send(signal.SIGCONT), reference=reference),
            lambda: verifier_failover(replicated.address, replica, reference, logs / "router-replicated.log"),
        ):
            tally = run()
            tallies.append(tally)
            print(table(tally), flush=True)
    finally:
        for service in reversed(services):
            service.stop()
    result = {
        "meta": {"target_model": args.target_model, "draft_model": args.draft_model, "python": platform.python_version(),
                 "cpus": os.cpu_count(), "stack_start_s": round(stack_s, 1), "elapsed_s": round(time.monotonic() - started, 1)},
        "scenarios": [tally.row() for tally in tallies],
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out} ({result['meta']['elapsed_s']:.0f}s)", flush=True)
    return 0 if all(tally.lost == 0 for tally in tallies) else 1


def verifier_context(address: str) -> int:
    import grpc

    from smartspec.wire import verifier_pb2, verifier_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        return verifier_pb2_grpc.VerifierServiceStub(channel).Info(verifier_pb2.InfoRequest(), timeout=30).model.max_context


def restart(service: Service, logs: Path) -> None:
    """Starts the (killed) service again on the same port."""
    service.process.wait(timeout=10)
    port = service.address.rsplit(":", 1)[1]
    argv = [*service.argv[: service.argv.index("--port")], "--port", port, *service.argv[service.argv.index("--port") + 2 :]]
    fresh = Service(service.role, argv, logs)
    fresh.wait_serving()
    service.process, service.address = fresh.process, fresh.address


if __name__ == "__main__":
    sys.exit(main())
