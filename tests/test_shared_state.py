"""Router replicas sharing controller state through a real Redis (router/shared_state.py): acceptance
evidence between two replicas, a router whose Redis dies and comes back mid-run, and the cost profile."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import subprocess
import time
import uuid

import grpc
import pytest
import redis

from router.controller import profile
from router.controller.controller import SpeculationController
from router.controller.cost_model import new_verify_model
from router.shared_state import SharedState
from smartspec.serving import free_port
from smartspec.wire import router_pb2, verifier_pb2, verifier_pb2_grpc
from tests.test_router_stack import RouterThread, generate_many, lookup_drafter, tokenizer_for, verifier_for, wait_until

REDIS_URL = "redis://127.0.0.1:6379/0"  # the machine's Redis
LOGGER = "smartspec.router.shared_state"


def run(coroutine, timeout_s: float = 30.0):
    return asyncio.run(asyncio.wait_for(coroutine, timeout_s))


def messages(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and text in r.getMessage()]


@pytest.fixture
def namespace():
    """A namespace of this test's own on the shared Redis; its keys are deleted afterwards."""
    name = f"test-{uuid.uuid4().hex}"
    yield name
    with redis.Redis.from_url(REDIS_URL) as client:
        keys = list(client.scan_iter(f"{name}:*"))
        if keys:
            client.delete(*keys)


class RedisServer:
    """A redis-server of the test's own on a free port, without persistence, that can be killed and
    started again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        assert wait_until(self._answers, 10), "redis-server did not start"

    def _answers(self) -> bool:
        try:
            with self.client() as client:
                return client.ping()
        except redis.ConnectionError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def own_redis():
    server = RedisServer()
    server.start()
    yield server
    server.kill()


# --- acceptance evidence -------------------------------------------------------------------------------
def test_replicas_see_each_others_acceptance(namespace):
    async def scenario() -> None:
        first, second = SpeculationController(), SpeculationController()
        # no fading here (test_fleet_evidence_fades_with_age covers it), so counts compare exactly
        one = SharedState(REDIS_URL, namespace, first, interval_s=0.05, half_life_s=1e9)
        two = SharedState(REDIS_URL, namespace, second, interval_s=0.05, half_life_s=1e9)
        try:
            for _ in range(40):  # only the first replica sees prompt lookup's drafts land
                first.observe_request("a", "prompt_lookup", 4, 4)
            for _ in range(30):  # only the second sees the draft model's drafts miss
                second.observe_request("b", "draft_model", 3, 0)
            local_first = first.drafter_rates("prompt_lookup").rate
            local_second = second.drafter_rates("draft_model").rate
            assert second.drafter_rates("prompt_lookup").rate == pytest.approx(0.5)  # its prior knows nothing yet
            assert second.acceptance("new", "prompt_lookup") > 0.6  # so a new request takes it optimistically
            one.start()
            two.start()
            assert await until(lambda: second.drafter_rates("prompt_lookup").rate > 0.95)
            assert second.acceptance("new", "prompt_lookup") > 0.95  # a new request's prior moved
            assert await until(lambda: first.drafter_rates("draft_model").rate < 0.1)
            # a replica's own evidence is not counted twice
            assert first.drafter_rates("prompt_lookup").rate == pytest.approx(local_first)
            assert second.drafter_rates("draft_model").rate == pytest.approx(local_second)
            assert one.fleet["draft_model"]["failures"] == pytest.approx(30)

            # increments add up, also across a reset of the controller (its counts restart at 0)
            first.reset()
            for _ in range(5):
                first.observe_request("c", "prompt_lookup", 2, 1)
            assert await until(lambda: two.fleet.get("prompt_lookup", {}).get("proposed") == pytest.approx(170))
            assert two.fleet["prompt_lookup"]["accepted"] == pytest.approx(165) and two.fleet["prompt_lookup"]["failures"] == pytest.approx(5)
        finally:
            await one.close()
            await two.close()
        with redis.Redis.from_url(REDIS_URL, decode_responses=True) as client:
            keys = list(client.scan_iter(f"{namespace}:acceptance:*"))
            assert keys and all(0 < client.ttl(key) <= 70 for key in keys)  # fleet evidence expires
            fields = {}
            for key in keys:
                for field, value in client.hgetall(key).items():
                    replica, stat, drafter = field.split("|", 2)
                    if replica == one.replica and drafter == "prompt_lookup":
                        fields[stat] = fields.get(stat, 0) + int(value)
            assert fields["proposed"] == 170 and fields["accepted"] == 165 and fields["failures"] == 5
            assert fields["p0"] == 45 and fields["a0"] == 45 and fields["p3"] == 40

    run(scenario())


def test_fleet_evidence_fades_with_age(namespace):
    """Other replicas' evidence counts less as it ages (half-life) and not at all past the window; the
    local per-step fading does not fade it a second time."""
    async def scenario() -> None:
        reader = SharedState(REDIS_URL, namespace, SpeculationController(), bucket_s=5, window_s=60, half_life_s=10)
        try:
            now_bucket = int(time.time() // 5)
            async with reader.client.pipeline(transaction=False) as pipe:
                pipe.hincrby(f"{namespace}:acceptance:{now_bucket}", "other|accepted|fresh", 100)
                pipe.hincrby(f"{namespace}:acceptance:{now_bucket - 10}", "other|accepted|old", 100)  # ~50 s old
                pipe.hincrby(f"{namespace}:acceptance:{now_bucket - 20}", "other|accepted|gone", 100)  # outside the window
                await pipe.execute()
            await reader.sync_once()
            assert reader.fleet["fresh"]["accepted"] > 70
            assert 100 * 0.5 ** 5.5 < reader.fleet["old"]["accepted"] < 100 * 0.5 ** 4.5
            assert "gone" not in reader.fleet
            rates = reader.controller.drafter_rates("fresh")
            assert rates.fleet_successes == reader.fleet["fresh"]["accepted"]
            rates.decay(0.0)  # a step's fading forgets local evidence only
            assert rates.fleet_successes == reader.fleet["fresh"]["accepted"] and rates.rate > 0.9
        finally:
            await reader.close()

    run(scenario())


async def until(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


# --- Redis going away under load -------------------------------------------------------------------------
PROMPTS = ["one two three one two three one two", "red green blue red green blue red", "a b c d a b c d a b"]


def test_router_keeps_serving_when_redis_dies_and_reconnects(own_redis, tiny_target, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    verifier = verifier_for(str(tiny_target))
    router = RouterThread(
        tokenizer_for(str(tiny_target)), verifier.address, {"prompt_lookup": lookup_drafter().address},
        redis_url=own_redis.url, redis_namespace="fleet", cost_profile="off", drafter="prompt_lookup", policy="fixed:3",
    )
    router.servicer.shared.max_backoff_s = 0.5  # retry quickly, so the test is short
    try:
        reference = {p: list(router.stub.Generate(router_pb2.GenerateRequest(prompt=p, max_tokens=16, drafter="none"), timeout=60).token_ids) for p in PROMPTS}

        def serve_round() -> None:
            replies = generate_many(router.stub, [router_pb2.GenerateRequest(prompt=p, max_tokens=16) for p in PROMPTS], timeout=60)
            for prompt, reply in zip(PROMPTS, replies):
                assert isinstance(reply, router_pb2.GenerateResponse), reply
                assert list(reply.token_ids) == reference[prompt]
            assert sum(reply.stats.proposed for reply in replies) > 0  # speculated, so there is evidence to share

        def published() -> bool:
            with own_redis.client() as client:
                return bool(client.keys("fleet:acceptance:*"))

        serve_round()
        assert wait_until(published, 5), "the router never published its acceptance evidence"
        assert messages(caplog, "sharing controller state through redis")

        own_redis.kill()
        outage_ends = time.monotonic() + 2.5
        while time.monotonic() < outage_ends:  # requests keep succeeding while every sync fails
            serve_round()
        assert wait_until(lambda: messages(caplog, "redis unavailable"), 5)
        serve_round()
        down = messages(caplog, "redis unavailable")
        assert len(down) == 1 and f"at {own_redis.url}: using local state; will retry" in down[0]
        assert all(rates.fleet_successes == rates.fleet_failures == 0 for rates in router.servicer.scheduler.controller.rates.values())

        own_redis.start()  # empty: nothing survived the restart
        assert wait_until(lambda: messages(caplog, "redis reconnected"), 10), "the router did not reconnect"
        serve_round()
        assert wait_until(published, 5), "the router did not publish again after reconnecting"
        assert len(messages(caplog, "redis unavailable")) == 1 and len(messages(caplog, "redis reconnected")) == 1
    finally:
        router.stop()
    assert router.servicer.shared._task is None  # the sync stopped with the router


def test_up_passes_the_redis_url_to_its_router():
    from smartspec.commands.up import router_argv, stack_options

    argv = router_argv(stack_options(drafters="", redis_url="redis://10.0.0.5:6379/1"), "target", {"verifier": "127.0.0.1:1"})
    assert argv[argv.index("--redis-url") + 1] == "redis://10.0.0.5:6379/1"
    assert "--redis-url" not in router_argv(stack_options(drafters="", redis_url=""), "target", {"verifier": "127.0.0.1:1"})


# --- cost profile -------------------------------------------------------------------------------------------
class NoVerifier:
    """A verifier that fails the test if anything tries to measure a profile with it."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the profile was measured (Verifier.{name}) instead of found")


def test_cost_profile_measured_by_one_router_is_found_by_another(namespace, tiny_target, tmp_path, monkeypatch, caplog):
    verifier_address = verifier_for(str(tiny_target)).address
    files = {"path": tmp_path / "first.json"}
    monkeypatch.setattr(profile, "cache_path", lambda info: files["path"])  # each replica its own disk

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(verifier_address) as channel:
            verifier = verifier_pb2_grpc.VerifierServiceStub(channel)
            info = await verifier.Info(verifier_pb2.InfoRequest(), timeout=10)
            first = SharedState(REDIS_URL, namespace, SpeculationController())
            measured = new_verify_model()
            try:
                message = await profile.load_or_measure(verifier, info, measured, "auto", first)
            finally:
                await first.close()
            assert "measured" in message and "redis" in message

        files["path"] = tmp_path / "second.json"
        second = SharedState(REDIS_URL, namespace, SpeculationController())
        found = new_verify_model()
        try:
            message = await profile.load_or_measure(NoVerifier(), info, found, "auto", second)
        finally:
            await second.close()
        assert message.startswith("cost profile loaded from redis") and namespace in message
        assert found.prior.tolist() == pytest.approx(measured.prior.tolist())
        assert found.breaks == measured.breaks  # the fitted breakpoints travel with the coefficients
        assert files["path"].exists()  # kept locally too

        # Redis unreachable: the local file is the fallback, and that is said once
        caplog.set_level(logging.INFO, logger=LOGGER)
        down = SharedState(f"redis://127.0.0.1:{free_port()}/0", namespace, SpeculationController())
        fallback = new_verify_model()
        try:
            message = await profile.load_or_measure(NoVerifier(), info, fallback, "auto", down)
        finally:
            await down.close()
        assert message == f"cost profile loaded from {files['path']}"
        assert fallback.prior.tolist() == pytest.approx(measured.prior.tolist())
        assert len(messages(caplog, "redis unavailable")) == 1

    run(scenario(), timeout_s=60)


def test_a_cached_profile_from_before_breakpoints_is_measured_again(tmp_path, monkeypatch):
    """A profile file an older version wrote (coefficients of another model, no breakpoints) under the
    same key is not read into this model: the router measures a new one."""
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"coefficients": {"const": 0.05, "new_tokens": 0.001, "any_speculation": 0.01}}))
    monkeypatch.setattr(profile, "cache_path", lambda info: path)
    info = verifier_pb2.InfoResponse()
    info.model.max_context, info.model.vocab_size = 2048, 100
    with pytest.raises(AssertionError, match="was measured"):
        run(profile.load_or_measure(NoVerifier(), info, new_verify_model(), "auto"), timeout_s=10)


@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_a_stale_cached_profile_is_rescaled_by_live_steps_and_replaced_everywhere(scale, namespace, tiny_target, tmp_path, monkeypatch):
    """A profile cached while the machine was busier (3x) or quieter (0.3x) than now: the router's
    live steps rescale it, and the rescaled profile replaces the cached one in the file and in Redis.
    (The simulator's test checks 0.5x and 2x exactly; here the reference is a sweep measured moments
    before the live steps, and a neighbour that slows one of them by 1.3x would hide a 2x profile
    inside the 1.5x margin, so the stack is given profiles that no neighbour can excuse.)"""
    monkeypatch.setenv("SMARTSPEC_CACHE_DIR", str(tmp_path))
    verifier = verifier_for(str(tiny_target))
    tokenizer = tokenizer_for(str(tiny_target))
    settings = dict(drafter="none", redis_url=REDIS_URL, redis_namespace=namespace)
    router = RouterThread(tokenizer, verifier.address, {}, cost_profile="refresh", **settings)
    router.stop()
    [path] = (tmp_path / "profiles").glob("*.json")
    saved = json.loads(path.read_text())
    measured = saved["coefficients"]
    stale = {name: value * scale for name, value in measured.items()}
    path.write_text(json.dumps(dict(saved, coefficients=stale)))  # its breakpoints kept
    with redis.Redis.from_url(REDIS_URL) as client:
        [key] = client.keys(f"{namespace}:profile:*")
        client.delete(key)  # the replica finds the stale file and publishes it, as a restarted fleet would

    router = RouterThread(tokenizer, verifier.address, {}, cost_profile="auto", **settings)
    try:
        assert router.servicer.scheduler.controller.verify_cost.prior.tolist() == pytest.approx(list(stale.values()))
        generate_many(router.stub, [router_pb2.GenerateRequest(prompt=f"count {i}:", max_tokens=40, policy="none", ignore_eos=True) for i in range(2)])
        assert wait_until(lambda: json.loads(path.read_text()).get("recalibrations", 0) >= 1)  # written off the step loop
        replaced = json.loads(path.read_text())
        # the cached profile moved from the stale one back towards what the live steps cost
        ratio = replaced["coefficients"]["const"] / measured["const"]
        assert abs(math.log(ratio)) < abs(math.log(scale)) - 0.15, (ratio, scale)
        with redis.Redis.from_url(REDIS_URL) as client:
            assert wait_until(lambda: json.loads(client.get(key))["coefficients"] == replaced["coefficients"])
    finally:
        router.stop()


def test_a_profile_sweep_the_verifier_cannot_finish_leaves_the_defaults(tmp_path, monkeypatch):
    """A verifier too slow for the sweep's deadlines (an overloaded machine): the router starts with
    the built-in defaults, refitted from live steps, instead of failing to start."""
    monkeypatch.setattr(profile, "cache_path", lambda info: tmp_path / "profile.json")

    class TooSlow:
        async def Prefill(self, request, timeout):
            raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(), "Deadline Exceeded")

        async def Release(self, request, timeout):
            return verifier_pb2.ReleaseResponse()

    info = verifier_pb2.InfoResponse(max_sequences=16, kv_capacity_tokens=100_000)
    info.model.max_context, info.model.vocab_size = 2048, 1000
    model = new_verify_model()
    defaults = model.prior.copy()
    message = run(profile.load_or_measure(TooSlow(), info, model, "auto"))
    assert "not measured (DEADLINE_EXCEEDED" in message and "built-in defaults" in message
    assert (model.prior == defaults).all() and not (tmp_path / "profile.json").exists()
