"""`smartspec serve router`: the client-facing RouterService in front of a verifier and drafters."""

from __future__ import annotations

import argparse
import asyncio
import logging

from smartspec.config import add_flag, add_server_flags
from smartspec.security import ServerSecurity, add_security_flags

log = logging.getLogger("smartspec.router")

DEFAULT_PORT = 50051


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from router.discovery import DEFAULT_GRACE_S, DEFAULT_REFRESH_S
    from router.prefill_budget import DEFAULT_MAX_STEP_TOKENS

    add_server_flags(parser, default_port=DEFAULT_PORT)
    add_flag(parser, "--verifier", action="append", default=["127.0.0.1:50052"], metavar="HOST:PORT",
             help="a verifier replica (repeatable; env: comma-separated); requests of a replica that fails move to another. "
             "dns:///NAME:PORT or dns://RESOLVER/NAME:PORT: every address NAME resolves to, followed as replicas come and go")
    add_flag(parser, "--drafter-address", action="append", default=[], metavar="NAME=HOST:PORT",
             help="a drafter service, e.g. prompt_lookup=127.0.0.1:50053 (repeatable; env: comma-separated); "
             "NAME=dns:///HOST:PORT: its replicas found by DNS, each request sticking to one")
    add_flag(parser, "--dns-refresh-s", type=float, default=DEFAULT_REFRESH_S, help="how often the name of a dns: address is resolved again")
    add_flag(parser, "--replica-grace-s", type=float, default=DEFAULT_GRACE_S,
             help="how long a replica whose address vanished from DNS keeps its requests (unless a call to it fails) before they "
             "move to another (re-prefilled; drafters: resynced), so a readiness flap moves nothing")
    add_flag(parser, "--target-model", default="embedded", help="folder whose tokenizer the router uses (the verifier's target), or 'embedded'")
    add_flag(parser, "--max-batch", type=int, default=16, help="most requests in the running batch")
    add_flag(parser, "--max-queue", type=int, default=64, help="most requests waiting for admission; beyond it, RESOURCE_EXHAUSTED")
    add_flag(parser, "--max-step-tokens", type=int, default=DEFAULT_MAX_STEP_TOKENS,
             help="most tokens a step carries: one per running request, the rest for chunks of the prompts being prefilled, "
             "first come first served, paced so that the cost model prices a step that prefills at about 2.25x the same "
             "step without prefill (at least 16 prefill tokens a step); drafts come on top"),
    add_flag(parser, "--default-drafter", default="auto", help="drafter for requests that name none: auto (the controller picks per step), none, prompt_lookup, draft_model, tree")
    add_flag(parser, "--default-policy", default="goodput", help="speculation policy for requests that name none: goodput, uniform, none or fixed:K")
    add_flag(parser, "--k-max", type=int, default=8, help="most draft tokens the goodput and uniform policies give one request per step")
    add_flag(parser, "--cost-profile", default="auto", choices=["auto", "refresh", "off"],
             help="verify cost model prior: auto (cached per model/device/dtype, else measured at startup, tens of seconds), refresh, or off (built-in defaults)")
    add_flag(parser, "--default-max-tokens", type=int, default=128, help="max_tokens for requests that leave it unset")
    add_flag(parser, "--drafter-timeout-s", type=float, default=2.0, help="deadline of one Propose call; past it the step goes on without speculation")
    add_flag(parser, "--verifier-timeout-s", type=float, default=120.0, help="deadline of one Prefill or Verify call")
    add_flag(parser, "--startup-timeout-s", type=float, default=120.0, help="how long to wait at startup for the verifier to report SERVING (it binds, then loads its model)")
    add_flag(parser, "--metrics-port", type=int, default=0, help="serve Prometheus metrics on http://HOST:PORT/metrics (HOST: --host); 0: no metrics")
    add_flag(parser, "--redis-url", default="", help="Redis that router replicas share acceptance statistics and cost profiles through, "
             "e.g. redis://127.0.0.1:6379/0; empty: local state only (also the fallback while Redis is unreachable)")
    add_flag(parser, "--redis-namespace", default="smartspec", help="prefix of this fleet's Redis keys (separate fleets sharing one Redis use different ones)")
    add_flag(parser, "--http-port", type=int, default=-1,
             help="serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, ...) on HOST:PORT (HOST: --host; "
             "TLS and token as for gRPC); 0 picks a free one (shown on the listening line as http=HOST:PORT); -1: off")
    add_flag(parser, "--http-max-body-bytes", type=int, default=8 * 1024 * 1024, help="largest HTTP request body accepted; larger ones get 413")
    add_flag(parser, "--served-model-name", default="", help="the model id of the HTTP API (/v1/models, a request's model field); "
             "empty: the target model folder's name")
    add_security_flags(parser)


def served_model_name(args: argparse.Namespace) -> str:
    """--served-model-name, else the target folder's name (the embedded model's without converting it)."""
    from pathlib import Path

    from smartspec.models import TARGET_NAME

    if args.served_model_name:
        return args.served_model_name
    return TARGET_NAME if args.target_model == "embedded" else Path(args.target_model).resolve().name


def load_tokenizer(spec: str):
    """Only the tokenizer: the router never loads model weights."""
    from transformers import AutoTokenizer

    from smartspec.models import resolve_model_path

    return AutoTokenizer.from_pretrained(str(resolve_model_path(spec, "target")), local_files_only=True)


async def serve(args: argparse.Namespace) -> None:
    from router.discovery import parse_address
    from router.server import SERVICE_NAME, RouterSettings, build_router, parse_drafters
    from router.telemetry import telemetry_from_args
    from router.validate import Defaults
    from smartspec.serving import LoadedService, run_service, setup_logging, wait_serving
    from smartspec.wire import router_pb2_grpc

    setup_logging(args.log_level)
    settings = RouterSettings(
        defaults=Defaults(drafter=args.default_drafter, policy=args.default_policy, max_tokens=args.default_max_tokens),
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_step_tokens=args.max_step_tokens,
        drafter_timeout_s=args.drafter_timeout_s,
        verifier_timeout_s=args.verifier_timeout_s,
        cost_profile=args.cost_profile,
        k_max=args.k_max,
        redis_url=args.redis_url,
        redis_namespace=args.redis_namespace,
        dns_refresh_s=args.dns_refresh_s,
        replica_grace_s=args.replica_grace_s,
    )
    drafters = parse_drafters(args.drafter_address)
    security = ServerSecurity.from_args(args)
    http = None
    if args.http_port >= 0:  # bound first: it answers 503 while the router loads
        from router.http import Backend, HttpFrontend

        http = HttpFrontend(Backend(served_model_name(args)), args.host, args.http_port, security, args.http_max_body_bytes,
                            access_log=args.log_level.upper() == "DEBUG")

    async def load() -> LoadedService:
        tokenizer = await asyncio.to_thread(load_tokenizer, args.target_model)
        # The verifier binds before loading its model: wait for SERVING, not just for a connection
        # (build_router waits so for the replicas of a dns: address).
        static = [address for address in args.verifier if parse_address(address) is None]
        await asyncio.gather(*(wait_serving(address, args.startup_timeout_s) for address in static))
        servicer = await build_router(tokenizer, args.verifier, drafters, settings, startup_timeout_s=args.startup_timeout_s, telemetry=telemetry)
        if http is not None:
            http.backend.attach(servicer, root=str(tokenizer.name_or_path))

        async def drain() -> None:
            await servicer.drain(args.grace_s)  # HTTP requests too: their streams end with them
            if http is not None:
                await http.stop()

        return LoadedService(lambda server: router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server), on_stop=drain)

    telemetry = telemetry_from_args(args)
    try:
        if http is not None:
            await http.start()
        endpoints = {"http": http.address} if http is not None else None
        await run_service("router", [SERVICE_NAME], args.host, args.port, args.grace_s, load, telemetry.tracing, security, endpoints)
    finally:
        if http is not None:
            await http.stop()
        telemetry.close()  # ends spans still open and stops the metrics endpoint


def run(args: argparse.Namespace) -> int:
    asyncio.run(serve(args))
    return 0
