"""gRPC face of the router: validate, queue, then relay the request's chunks as they are committed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Callable, Sequence

import grpc

from router.controlled import ControlledDrafter
from router.controller.controller import SpeculationController
from router.controller.policies import controller_policies
from router.controller.profile import load_or_measure
from router.discovery import DEFAULT_GRACE_S, DEFAULT_REFRESH_S, ReplicaDiscovery, parse_address
from router.drafters import DrafterClient, DrafterReplicas
from router.follow import Follower, VerifierMembers, check_same_model
from router.policy import PolicyRegistry
from router.request import Chunk, RequestState
from router.scheduler import DEFAULT_MAX_STEP_TOKENS, Limits, Scheduler
from router.telemetry import RouterTelemetry
from router.validate import Defaults, PromptEncoder, RequestValidator
from router.verifiers import VerifierPool, VerifierReplica
from smartspec.errors import RequestError
from smartspec.serving import CHANNEL_OPTIONS, rpc_errors
from smartspec.wire import drafter_pb2_grpc, router_pb2, router_pb2_grpc, verifier_pb2, verifier_pb2_grpc

if TYPE_CHECKING:
    from router.shared_state import SharedState

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name
log = logging.getLogger("smartspec.router")


@dataclass(frozen=True)
class RouterSettings:
    """The router's knobs (each is a flag of `smartspec serve router`)."""

    defaults: Defaults = field(default_factory=Defaults)
    max_batch: int = 16
    max_queue: int = 64
    # Most tokens a step carries while a prompt is being prefilled (chunked prefill).
    max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS
    drafter_timeout_s: float = 2.0
    verifier_timeout_s: float = 120.0
    # Startup profile of the verify cost: 'auto' (cached, else measured), 'refresh' or 'off'.
    cost_profile: str = "auto"
    # Most draft tokens the controller gives one request in one step.
    k_max: int = 8
    # Redis shared by router replicas (acceptance evidence, cost profile); "" keeps all state local.
    redis_url: str = ""
    # Prefix of every Redis key, so that separate fleets (and tests) sharing one Redis do not mix.
    redis_namespace: str = "smartspec"
    # Replicas found by DNS (a dns: address): how often the name is resolved, and how long a replica
    # whose address vanished keeps its requests (unless a call to it fails) before they move.
    dns_refresh_s: float = DEFAULT_REFRESH_S
    replica_grace_s: float = DEFAULT_GRACE_S


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(
        self, validate: RequestValidator, scheduler: Scheduler, decode: Callable, eos_ids: frozenset[int], shared: SharedState | None = None,
        followers: Sequence[Follower] = (),
    ) -> None:
        self.validate = validate
        self.scheduler = scheduler
        self.decode = decode
        self.eos_ids = eos_ids
        self.shared = shared  # syncs the controller with other router replicas (None: local state only)
        self.followers = list(followers)  # the dns: addresses' replica sets, followed until shutdown
        # Prompts are tokenized here, off the event loop. One thread: a Hugging Face tokenizer is not
        # promised to be safe for concurrent calls, and one encodes ~250 tokens a millisecond on one core of
        # the reference CPU (the README, 18k tokens, in 73 ms).
        self.tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-tokenize")

    async def drain(self, timeout_s: float) -> None:
        """Graceful shutdown: the scheduler finishes what it admitted (Scheduler.drain), then the
        shared-state sync publishes its last evidence and stops."""
        try:
            await self.scheduler.drain(timeout_s)
        finally:
            await self._stop_sharing()

    async def close(self) -> None:
        """Immediate shutdown: unfinished requests fail (Scheduler.close); the sync stops."""
        try:
            await self.scheduler.close()
        finally:
            await self._stop_sharing()

    async def _stop_sharing(self) -> None:
        await asyncio.gather(*(follower.close() for follower in self.followers))
        for drafter in self.scheduler.drafters.values():
            if isinstance(drafter, DrafterReplicas):
                await drafter.close()
        self.tokenize_pool.shutdown(wait=False, cancel_futures=True)
        if self.shared is not None:
            await self.shared.close()

    async def Stats(self, request: router_pb2.StatsRequest, context: grpc.aio.ServicerContext) -> router_pb2.StatsResponse:
        reply = stats_reply(self.scheduler.controllers)
        if request.reset:  # only an authenticated caller gets here when the router has a token (BearerToken)
            self.scheduler.reset_controller()
        return reply

    # --- the request path every front end shares (gRPC here, HTTP in router/http) ---------------------
    async def submit(self, request: router_pb2.GenerateRequest) -> RequestState:
        """Validates (tokenizing off the event loop) and queues a request; a RequestError (invalid,
        overloaded, shutting down) is raised before anything is queued, and counted."""
        try:
            self.scheduler.check_open()
            prompt_ids, params = await self.validate.off_loop(request, self.tokenize_pool)
            state = RequestState(prompt_ids=prompt_ids, params=params, decode=self.decode, eos_ids=self.eos_ids)
            self.scheduler.submit(state)
        except RequestError as err:
            self.scheduler.telemetry.refused(err)
            raise
        self.scheduler.telemetry.arrived(state)
        return state

    async def chunks(self, state: RequestState) -> AsyncIterator[Chunk]:
        """The request's chunks until the last; cancels the request if the caller stops listening."""
        item = None
        try:
            while True:
                item = await state.outbox.get()
                if isinstance(item, RequestError):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            if not state.done:
                self.scheduler.cancel(state)
            self.scheduler.telemetry.finished(state, item)

    async def complete(self, state: RequestState) -> router_pb2.GenerateResponse:
        """The whole output of a submitted request; cancelling the caller cancels the request."""
        token_ids: list[int] = []
        text: list[str] = []
        async with contextlib.aclosing(self.chunks(state)) as chunks:  # ends the request (and reports it) before replying
            async for chunk in chunks:
                token_ids.extend(chunk.token_ids)
                text.append(chunk.text)
                if chunk.finish_reason:
                    return router_pb2.GenerateResponse(
                        token_ids=token_ids, text="".join(text), finish_reason=chunk.finish_reason, stats=chunk.stats
                    )
        raise RequestError("INTERNAL", "generation ended without a finish reason")

    @rpc_errors
    async def Generate(self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> router_pb2.GenerateResponse:
        return await self.complete(await self.submit(request))

    @rpc_errors
    async def GenerateStream(self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        state = await self.submit(request)
        async with contextlib.aclosing(self.chunks(state)) as chunks:  # a client that leaves ends the request now, not at GC
            async for chunk in chunks:
                yield router_pb2.GenerateStreamResponse(
                    token_ids=chunk.token_ids, text=chunk.text, finish_reason=chunk.finish_reason, stats=chunk.stats
                )


async def build_router(
    tokenizer,
    verifier_address: str | Sequence[str],
    drafter_addresses: dict[str, str],
    settings: RouterSettings,
    startup_timeout_s: float = 60.0,
    policies: PolicyRegistry | None = None,
    telemetry: RouterTelemetry | None = None,
) -> RouterServicer:
    """Connects to the verifier replicas (one address or several; reading their limits from Info) and
    the drafters, and starts the step loop. Must run on the event loop that will serve the router. `policies` may register policies
    beyond 'none' and 'fixed:K' by name (e.g. the goodput controller); `telemetry` traces and measures
    it (default: off). A `dns:` address (router/discovery.py) stands for every replica its name resolves
    to, followed while the router runs (router/follow.py); at startup the router waits for one of its
    verifiers to say SERVING, not for its drafters (a missing drafter costs only speculation)."""
    from router.detokenize import tokenizer_decoder

    telemetry = telemetry or RouterTelemetry()

    addresses = [verifier_address] if isinstance(verifier_address, str) else list(verifier_address)
    targets = {address: parse_address(address) for address in addresses}  # raises ValueError on a malformed dns: address
    verifier_followers = [Follower(ReplicaDiscovery(t, settings.dns_refresh_s), settings.replica_grace_s) for t in targets.values() if t]
    found = await asyncio.gather(*(follower.first_serving(startup_timeout_s) for follower in verifier_followers))
    static = [address for address, target in targets.items() if target is None]
    initial = [*static, *dict.fromkeys(a for serving in found for a in serving if a not in static)]
    pool, info = await connect_verifiers(initial, startup_timeout_s, settings.max_batch)
    verifier = pool.replicas[0].stub  # profiles the verify cost (replicas run the same model)
    limits = Limits(
        max_context=info.model.max_context,
        vocab_size=info.model.vocab_size,
        eos_ids=frozenset(info.model.eos_token_ids),
        max_sequences=pool.capacity,
    )
    drafters: dict[str, DrafterClient | DrafterReplicas] = {}
    drafter_followers: dict[str, Follower] = {}
    for name, address in drafter_addresses.items():
        target = parse_address(address)
        if target is None:
            drafters[name] = DrafterClient(
                name, drafter_pb2_grpc.DrafterServiceStub(grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)), settings.drafter_timeout_s,
                trace_metadata=telemetry.rpc_metadata,
            )
        else:
            drafters[name] = DrafterReplicas(name, settings.drafter_timeout_s, trace_metadata=telemetry.rpc_metadata)
            drafter_followers[name] = Follower(ReplicaDiscovery(target, settings.dns_refresh_s), settings.replica_grace_s)
    drafters[ControlledDrafter.name] = ControlledDrafter(limits.vocab_size)
    controller = SpeculationController(k_max=settings.k_max)
    shared = None
    if settings.redis_url:
        from router.shared_state import SharedState

        try:
            shared = SharedState(settings.redis_url, settings.redis_namespace, controller)
        except ValueError as err:
            raise ValueError(f"--redis-url {settings.redis_url!r}: {err}") from None
    log.info("%s", await load_or_measure(verifier, info, controller.verify_cost, settings.cost_profile, shared, settings.max_step_tokens))
    policies = policies or PolicyRegistry()
    for name, policy in controller_policies(controller).items():
        policies.register(name, policy)
    defaults = settings.defaults
    if defaults.drafter not in ("none", "auto") and defaults.drafter not in drafters:
        log.warning("default drafter %r is not configured; requests that name no drafter decode without one", defaults.drafter)
        defaults = Defaults(drafter="none", policy=defaults.policy, max_tokens=defaults.max_tokens)
    validate = RequestValidator(PromptEncoder(tokenizer), defaults, list(drafters), limits.max_context, policies)
    validate_defaults(validate)
    scheduler = Scheduler(
        pool, drafters, limits, max_batch=settings.max_batch, max_queue=settings.max_queue, verifier_timeout_s=settings.verifier_timeout_s,
        controller=controller, telemetry=telemetry, max_step_tokens=settings.max_step_tokens,
    )
    telemetry.watch(scheduler)
    if shared is not None:
        shared.controllers = scheduler.controllers  # every replica's evidence, and the fleet's to each
        scheduler.on_replicas_changed.append(lambda: setattr(shared, "controllers", scheduler.controllers))
    scheduler.start()
    if shared is not None:
        shared.start()
    for follower in verifier_followers:
        follower.start(VerifierMembers(scheduler, initial[0], info.model, settings.max_batch, startup_timeout_s))
    for name, follower in drafter_followers.items():
        follower.start(drafters[name])
    log.info(
        "router: verifier %s (%s, context %d, eos %s), drafters %s, batch %d, queue %d, step tokens %d",
        ", ".join(addresses), info.model.model, limits.max_context, sorted(limits.eos_ids), drafter_addresses or "none",
        scheduler.max_batch, scheduler.max_queue, scheduler.max_step_tokens,
    )
    return RouterServicer(validate, scheduler, tokenizer_decoder(tokenizer), limits.eos_ids, shared, [*verifier_followers, *drafter_followers.values()])


async def connect_verifiers(addresses: Sequence[str], timeout_s: float, default_slots: int) -> tuple[VerifierPool, verifier_pb2.InfoResponse]:
    """Reads every replica's Info; they must serve the same model (vocabulary, context limit, end of
    sequence), since a request may move from one to another. Returns the pool and the first's Info."""
    if not addresses:
        raise ValueError("give at least one --verifier address")
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"--verifier addresses repeat: {', '.join(addresses)}")
    stubs = [verifier_pb2_grpc.VerifierServiceStub(grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS)) for a in addresses]
    infos = await asyncio.gather(*(stub.Info(verifier_pb2.InfoRequest(), timeout=timeout_s, wait_for_ready=True) for stub in stubs))
    for address, info in zip(addresses[1:], infos[1:]):
        check_same_model(addresses[0], infos[0].model, address, info.model)
    replicas = [VerifierReplica(a, stub, info.max_sequences or default_slots) for a, stub, info in zip(addresses, stubs, infos)]
    return VerifierPool(replicas), infos[0]


def stats_reply(controllers: Sequence[SpeculationController]) -> router_pb2.StatsResponse:
    """Stats over every verifier replica's controller (each replica learns on its own): steps, the
    k histogram and drafters' counts add up; the mean batch size and the step-time error are means over
    all steps; a drafter's acceptance rate is its replicas' rates weighted by the drafts each verified;
    verify_cost is the first replica's model (the replicas run the same model; each refits its own)."""
    steps = sum(c.steps for c in controllers)
    errors = [(c.step_error(), c.steps) for c in controllers if c.steps and not math.isnan(c.step_error())]
    histogram = [sum(c.k_histogram[k] for c in controllers if k < len(c.k_histogram)) for k in range(max(len(c.k_histogram) for c in controllers))]
    reply = router_pb2.StatsResponse(
        steps=steps,
        mean_batch_size=sum(c.batch_sizes for c in controllers) / steps if steps else 0.0,
        step_time_mape=sum(e * n for e, n in errors) / sum(n for _, n in errors) if errors else float("nan"),
        k_histogram=histogram,
        verify_cost=controllers[0].verify_cost.as_dict(),
    )
    for name in sorted({name for c in controllers for name in c.rates}):
        rates = [c.rates[name] for c in controllers if name in c.rates]
        proposed = sum(r.proposed_total for r in rates)
        positions = max(len(r.position_proposed) for r in rates)
        by_position = [
            (sum(r.position_accepted[j] for r in rates if j < len(r.position_accepted)), sum(r.position_proposed[j] for r in rates if j < len(r.position_proposed)))
            for j in range(positions)
        ]
        reply.drafters.add(
            name=name,
            acceptance_rate=sum(r.rate * r.proposed_total for r in rates) / proposed if proposed else rates[0].rate,
            proposed=proposed,
            accepted=sum(r.accepted_total for r in rates),
            acceptance_by_position=[a / p for a, p in by_position if p],
        )
    return reply


def validate_defaults(validate: RequestValidator) -> None:
    """Fails at startup, not on the first request, when a default policy or drafter is malformed."""
    try:
        validate.policies.get(validate.defaults.policy)
        if validate.defaults.max_tokens < 1:
            raise RequestError("INVALID_ARGUMENT", "the default max_tokens must be at least 1")
    except RequestError as err:
        raise ValueError(err.message) from None


def parse_drafters(specs: Sequence[str]) -> dict[str, str]:
    """['prompt_lookup=127.0.0.1:5001', ...] -> {'prompt_lookup': '127.0.0.1:5001'}."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, address = spec.partition("=")
        if not sep or not name or not address:
            raise ValueError(f"--drafter-address {spec!r}: expected NAME=HOST:PORT, e.g. prompt_lookup=127.0.0.1:50053")
        if name in ("none", "auto", "controlled"):
            raise ValueError(f"--drafter-address: {name!r} is reserved (none: no drafter; auto: the controller's choice; controlled: benchmark-only)")
        out[name] = address
    return out
