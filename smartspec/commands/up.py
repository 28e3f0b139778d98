"""`smartspec up`: the whole stack on loopback, as child processes, until Ctrl-C or SIGTERM.

Each service is its own `smartspec serve ROLE ...` process. The verifier and drafters bind port 0 and
report their address on stdout (`listening ROLE=HOST:PORT`) as soon as they are bound, before loading
their models; the router is started once it knows them. When every service's health check reports
SERVING (every model loaded), one line goes to stdout:

    ready router=HOST:PORT http=HOST:PORT verifier=HOST:PORT draft_model=HOST:PORT prompt_lookup=HOST:PORT tree=HOST:PORT

(`http=` is the router's OpenAI-compatible HTTP API, --http-port; absent with --http-port -1.)

With `--verifiers N` there are N verifier replicas (`verifier`, `verifier2`, ...); the router spreads
requests over them and moves the requests of one that dies to the others.

After that a child that dies is logged and the others keep running. On SIGINT/SIGTERM/SIGHUP the
router is stopped first (it drains its requests), then the rest. Children run in their own process
groups, so a terminal's Ctrl-C reaches only `up`, which orders the shutdown; each child also watches
`up` through a pipe on its stdin (smartspec.lifeline), so none outlives it, even a SIGKILLed `up`.

Each torch process gets a thread count from the cores `up` may use (smartspec.threads.plan_threads),
and every child runs with OMP_WAIT_POLICY=PASSIVE, unless the user set those variables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import AsyncIterator

from smartspec.config import DEFAULT_MAX_SEQUENCES, add_flag
from smartspec.lifeline import child_env
from smartspec.telemetry import add_trace_flags, trace_argv
from smartspec.threads import MODEL_DRAFTERS, available_cores, plan_threads, quiet_env, user_sized

log = logging.getLogger("smartspec.up")

DRAFTER_KINDS = ("draft_model", "prompt_lookup", "tree")
# Flags `up` always sets on a child's command line; their variables are dropped from the child's
# environment so that an append flag (the router's --drafter) does not also pick them up.
_EXPLICIT_ENV = ("SMARTSPEC_HOST", "SMARTSPEC_PORT", "SMARTSPEC_KIND", "SMARTSPEC_VERIFIER", "SMARTSPEC_DRAFTER_ADDRESS")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--port", type=int, default=50051, help="router port (0 picks a free one; the ready line shows it)")
    add_flag(parser, "--host", default="127.0.0.1", help="address every service binds")
    add_flag(parser, "--target-model", default="embedded", help="target model folder for the verifier and the router's tokenizer, or 'embedded'")
    add_flag(parser, "--draft-model", default="embedded", help="draft model folder for the draft_model and tree drafters, or 'embedded'")
    add_flag(parser, "--device", default="cpu", help="torch device of the verifier and the draft model")
    add_flag(parser, "--dtype", default="float32", help="dtype of the verifier and the draft model")
    add_flag(parser, "--kv-cache-gb", type=float, default=1.0,
             help="KV cache budget of the verifier and of each model drafter, in GiB, allocated at start-up")
    add_flag(parser, "--max-sequences", type=int, default=0,
             help="requests whose KV cache each verifier and model drafter holds at once (0: enough for --max-batch over the "
                  f"verifiers, at least {DEFAULT_MAX_SEQUENCES}; the router never batches more than the verifiers hold)")
    add_flag(parser, "--cores", type=int, default=0,
             help="CPU cores the services' torch threads share (0: the cores this process may run on); "
                  "ignored when OMP_NUM_THREADS, MKL_NUM_THREADS or SMARTSPEC_THREADS is set")
    add_flag(parser, "--verifiers", type=int, default=1, help="verifier replicas to start (the router fails requests over between them)")
    add_flag(parser, "--drafters", default=",".join(DRAFTER_KINDS), help="drafter services to start, comma-separated (empty: none)")
    add_flag(parser, "--max-batch", type=int, default=16, help="router: most requests in the running batch")
    add_flag(parser, "--max-queue", type=int, default=64, help="router: most requests waiting for admission")
    add_flag(parser, "--max-step-tokens", type=int, default=0,
             help="router: token budget of a step, for the running requests and chunks of the prompts being prefilled (0: the router's default)")
    add_flag(parser, "--startup-timeout-s", type=float, default=600.0, help="how long every service may take to come up")
    add_flag(parser, "--grace-s", type=float, default=5.0, help="seconds each service may drain on shutdown")
    add_flag(parser, "--log-level", default="INFO", help="logging level (also passed to the services)")
    add_flag(parser, "--redis-url", default="", help="router: Redis shared with other router replicas, e.g. redis://127.0.0.1:6379/0 (empty: local state only)")
    add_flag(parser, "--metrics-port", type=int, default=0, help="router: serve Prometheus metrics on http://HOST:PORT/metrics (0: no metrics)")
    add_flag(parser, "--http-port", type=int, default=8000,
             help="router: OpenAI-compatible HTTP API port (0 picks a free one; the ready line shows it as http=HOST:PORT; -1: off)")
    add_trace_flags(parser)  # passed to every service


@dataclass
class Child:
    """One service process and what it reported."""

    role: str
    argv: list[str]
    process: asyncio.subprocess.Process
    address: str | None = None
    endpoints: dict[str, str] = field(default_factory=dict)  # its other servers, e.g. the router's {'http': HOST:PORT}
    pumps: list[asyncio.Task] = field(default_factory=list)


def smartspec_command() -> list[str]:
    """How to run `smartspec` with this very interpreter (the entry point may not be on PATH)."""
    return [sys.executable, "-m", "smartspec.cli"]


def service_argvs(args: argparse.Namespace, target: str, draft: str) -> dict[str, list[str]]:
    """Command lines of the verifier and drafters (the router's comes later: it needs their addresses)."""
    common = ["--host", args.host, "--port", "0", "--log-level", args.log_level, "--grace-s", str(args.grace_s), *trace_argv(args)]
    model = ["--device", args.device, "--dtype", args.dtype, "--kv-cache-gb", str(args.kv_cache_gb)]
    slots = sequence_slots(args)
    if slots != DEFAULT_MAX_SEQUENCES:  # only when it matters: the services' own default otherwise
        model += ["--max-sequences", str(slots)]
    argvs = {role: ["serve", "verifier", *common, "--target-model", target, *model] for role in verifier_roles(args)}
    for kind in _drafter_kinds(args):
        extra = ["--draft-model", draft, *model] if kind in MODEL_DRAFTERS else []
        argvs[kind] = ["serve", "drafter", "--kind", kind, *common, *extra]
    if not user_sized(os.environ):
        threads = plan_threads(args.cores or available_cores(), verifier_roles(args), _drafter_kinds(args))
        for role, argv in argvs.items():
            argv += ["--threads", str(threads[role])]
    return argvs


def router_argv(args: argparse.Namespace, target: str, addresses: dict[str, str]) -> list[str]:
    argv = ["serve", "router", "--host", args.host, "--port", str(args.port), "--log-level", args.log_level, "--grace-s", str(args.grace_s),
            *(part for role in verifier_roles(args) for part in ("--verifier", addresses[role])), "--target-model", target,
            "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue), "--startup-timeout-s", str(args.startup_timeout_s)]
    for kind in _drafter_kinds(args):
        argv += ["--drafter-address", f"{kind}={addresses[kind]}"]
    if "prompt_lookup" not in addresses:
        argv += ["--default-drafter", "none"]
    if args.max_step_tokens:
        argv += ["--max-step-tokens", str(args.max_step_tokens)]
    if args.redis_url:
        argv += ["--redis-url", args.redis_url]
    if args.metrics_port:
        argv += ["--metrics-port", str(args.metrics_port)]
    argv += ["--http-port", str(args.http_port)]  # always: -1 must not be overridden by a variable the router inherits
    return [*argv, *trace_argv(args)]


def sequence_slots(args: argparse.Namespace) -> int:
    """--max-sequences of each verifier and model drafter: as given, or enough for --max-batch spread over
    the verifiers (at least the services' default), since the router caps its batch at their sum."""
    if args.max_sequences < 0:
        raise ValueError(f"--max-sequences must be >= 0 (got {args.max_sequences})")
    return args.max_sequences or max(DEFAULT_MAX_SEQUENCES, math.ceil(args.max_batch / len(verifier_roles(args))))


def verifier_roles(args: argparse.Namespace) -> list[str]:
    """'verifier', then 'verifier2', 'verifier3', ... for --verifiers N."""
    if args.verifiers < 1:
        raise ValueError(f"--verifiers must be at least 1 (got {args.verifiers})")
    return ["verifier", *(f"verifier{i}" for i in range(2, args.verifiers + 1))]


def _drafter_kinds(args: argparse.Namespace) -> list[str]:
    return [kind.strip() for kind in args.drafters.split(",") if kind.strip()]


class Stack:
    """The child processes, started in order and stopped in reverse."""

    def __init__(self, log_level: str) -> None:
        self.children: dict[str, Child] = {}
        self.stopping = False
        self._log_level = log_level
        self._env = quiet_env({k: v for k, v in os.environ.items() if k not in _EXPLICIT_ENV})

    async def spawn(self, role: str, argv: list[str]) -> Child:
        full = [*smartspec_command(), *argv]
        log.info("starting %s: smartspec %s", role, " ".join(argv))
        # Own process group: a terminal's Ctrl-C reaches only `up`, which then stops the router first.
        # The stdin pipe stays open, unwritten, while we live: the child stops when it closes.
        process = await asyncio.create_subprocess_exec(
            *full, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=child_env(self._env), process_group=0
        )
        child = self.children[role] = Child(role, full, process)
        return child

    async def wait_listening(self, child: Child) -> str:
        """Reads the child's stdout up to its `listening ROLE=HOST:PORT` line; then keeps forwarding
        its stdout to our stderr (so the pipe never fills) and watches for its exit."""
        assert child.process.stdout is not None
        while True:
            line = await child.process.stdout.readline()
            if not line:
                code = await child.process.wait()
                raise RuntimeError(f"{child.role} exited with code {code} before it was listening (see its log above)")
            text = line.decode(errors="replace").strip()
            if text.startswith("listening ") and "=" in text:
                # listening ROLE=HOST:PORT [NAME=HOST:PORT ...]: its address, then its other servers
                (_, child.address), *others = (part.split("=", 1) for part in text.split()[1:] if "=" in part)
                child.endpoints = dict(others)
                break
            print(f"[{child.role}] {text}", file=sys.stderr, flush=True)
        child.pumps = [asyncio.create_task(self._forward(child)), asyncio.create_task(self._watch(child))]
        return child.address

    async def wait_serving(self, child: Child) -> None:
        """Waits for a listening child to report SERVING (services bind first, then load their model);
        fails at once if it exits first. The caller bounds the wait (--startup-timeout-s)."""
        from smartspec.serving import wait_serving

        assert child.address is not None
        serving = asyncio.ensure_future(wait_serving(child.address, math.inf))
        exited = asyncio.ensure_future(child.process.wait())
        try:
            done, _ = await asyncio.wait({serving, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            serving.cancel()
            exited.cancel()
        if serving in done:
            serving.result()
            return
        raise RuntimeError(f"{child.role} exited with code {exited.result()} before it was serving (see its log above)")

    async def _forward(self, child: Child) -> None:
        assert child.process.stdout is not None
        async for line in child.process.stdout:
            print(f"[{child.role}] {line.decode(errors='replace').rstrip()}", file=sys.stderr, flush=True)

    async def _watch(self, child: Child) -> None:
        code = await child.process.wait()
        if not self.stopping:
            log.error("%s (pid %d) exited with code %s; the other services keep running", child.role, child.process.pid, code)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM the router first (it drains), then the others; SIGKILL whatever outlives its grace."""
        self.stopping = True
        first = [c for r, c in self.children.items() if r == "router"]
        rest = [c for r, c in self.children.items() if r != "router"]
        for group in (first, rest):
            await asyncio.gather(*(self._stop_one(child, grace_s + 10.0) for child in group))
        for child in self.children.values():
            for task in child.pumps:
                task.cancel()

    @staticmethod
    async def _stop_one(child: Child, timeout_s: float) -> None:
        if child.process.returncode is not None:
            return
        try:
            child.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(child.process.wait(), timeout_s)
        except ProcessLookupError:
            return
        except asyncio.TimeoutError:
            log.warning("%s did not stop within %.0fs; killing it", child.role, timeout_s)
            child.process.kill()
            await child.process.wait()


async def _start(stack: Stack, args: argparse.Namespace, target: str, draft: str) -> dict[str, str]:
    services = [await stack.spawn(role, argv) for role, argv in service_argvs(args, target, draft).items()]
    addresses = dict(zip([c.role for c in services], await _all_or_first_error(stack.wait_listening(c) for c in services)))
    router = await stack.spawn("router", router_argv(args, target, addresses))
    addresses = {"router": await stack.wait_listening(router), **router.endpoints, **addresses}
    await _all_or_first_error(stack.wait_serving(child) for child in stack.children.values())
    return addresses


async def _all_or_first_error(coroutines) -> list:
    """Like gather, but the first failure cancels the others at once (a dead verifier should not wait
    for a draft model to finish loading)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((task for task in done if task.exception() is not None), None)
        if failed is not None:
            raise failed.exception()
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()


def stack_options(**overrides) -> argparse.Namespace:
    """`up`'s options as a namespace, for starting a stack from code: the flags' defaults (and their
    SMARTSPEC_* variables), then `overrides` (e.g. port=0, drafters="prompt_lookup", log_level="WARNING")."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    args = parser.parse_args([])
    for name, value in overrides.items():
        if not hasattr(args, name):
            raise TypeError(f"unknown stack option {name!r}")
        setattr(args, name, value)
    return args


@contextlib.asynccontextmanager
async def running_stack(args: argparse.Namespace) -> AsyncIterator[dict[str, str]]:
    """Starts the stack `up` starts (verifier, drafters, router; see `stack_options`) and yields the
    addresses by role once every service is healthy ({'router': 'HOST:PORT', 'verifier': ..., and one per
    drafter}); stops it on exit, router first, also when the body fails or is cancelled. A service that
    fails to start, or a stack not ready within args.startup_timeout_s, raises RuntimeError / TimeoutError
    after the others are stopped. Installs no signal handlers (that is the caller's business)."""
    target, draft = resolve_models(args)
    stack = Stack(args.log_level)
    try:
        try:
            addresses = await asyncio.wait_for(_start(stack, args, target, draft), args.startup_timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"the stack was not ready within {args.startup_timeout_s:.0f}s") from None
        yield addresses
    finally:
        await stack.stop(args.grace_s)


async def up(args: argparse.Namespace) -> int:
    target, draft = resolve_models(args)
    stack = Stack(args.log_level)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(_start(stack, args, target, draft))
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopper}, timeout=args.startup_timeout_s, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if starting.done() and starting.exception() is None:
        addresses = starting.result()
        line = " ".join(f"{role}={addresses[role]}" for role in ("router", "http", *verifier_roles(args), *DRAFTER_KINDS) if role in addresses)
        print(f"ready {line}", flush=True)
        await stopper
        log.info("stopping the stack")
    elif stop.is_set():
        starting.cancel()
        log.info("interrupted during startup; stopping")
    else:
        error = starting.exception() if starting.done() else TimeoutError(f"the stack was not ready within {args.startup_timeout_s:.0f}s")
        starting.cancel()
        log.error("startup failed: %s", error)
        code = 1
    stopper.cancel()
    await stack.stop(args.grace_s)
    return code


def resolve_models(args: argparse.Namespace) -> tuple[str, str]:
    """Converts the embedded models once, here, before children start (so they don't all race to do it)."""
    from smartspec.models import resolve_model_path

    needs_draft = any(kind in MODEL_DRAFTERS for kind in _drafter_kinds(args))
    target = str(resolve_model_path(args.target_model, "target"))
    draft = str(resolve_model_path(args.draft_model, "draft")) if needs_draft else args.draft_model
    return target, draft


def run(args: argparse.Namespace) -> int:
    from smartspec.serving import setup_logging

    setup_logging(args.log_level)
    try:
        return asyncio.run(up(args))
    except (FileNotFoundError, RuntimeError, ValueError) as err:  # e.g. a model folder that does not exist
        print(f"smartspec up: {err}", file=sys.stderr)
        return 2
