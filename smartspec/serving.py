"""What every smartspec gRPC server shares: options, health and reflection, error mapping, the model
thread, the 'listening' line and graceful shutdown."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, Sequence, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from smartspec.errors import RequestError
from smartspec.security import MalformedRequests, ServerSecurity
from smartspec.telemetry import Tracing, server_interceptors

log = logging.getLogger("smartspec")

# Explicit limits (gRPC's default receive limit is 4 MB). Proposals are small (a sampled draft token's
# distribution travels as its top 64: ~0.45 KB); the headroom is for large batches and prompts.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MESSAGE_SIZE_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# grpcio sets SO_REUSEPORT by default, which lets a second server silently share a port in use.
SERVER_OPTIONS = [("grpc.so_reuseport", 0), *MESSAGE_SIZE_OPTIONS]
# A peer that was down (a restarted drafter or verifier) is reconnected to within 2 s of its return,
# not after gRPC's default backoff, which grows to 2 minutes.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2000)]
CHANNEL_OPTIONS = [*MESSAGE_SIZE_OPTIONS, *RECONNECT_OPTIONS]
# Longest status message sent: clients refuse trailers over 16 KiB (a non-ASCII character is sent
# percent-encoded, up to 9 bytes), which would replace a clear error with a transport one.
MAX_STATUS_CHARS = 1500

T = TypeVar("T")


def rpc_errors(method: Callable) -> Callable:
    """Decorates a servicer method: a RequestError aborts the call with its status and message.
    Works for unary methods and for server-streaming async generators."""

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except RequestError as err:
                await context.abort(grpc.StatusCode[err.status], err.message[:MAX_STATUS_CHARS])

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except RequestError as err:
            await context.abort(grpc.StatusCode[err.status], err.message[:MAX_STATUS_CHARS])

    return unary


class ModelThread:
    """Runs model work on one dedicated thread, off the event loop, so health checks and cancellation
    stay responsive; one thread also serialises every access to the model's state.

    Load the model on this thread too (``call``), not only run it here: OpenMP keeps one team of worker
    threads per calling thread, and a team left behind on the loading thread spins and competes with the
    team doing the work (measured on 2 cores: a 30 ms forward took 50 ms when the model was loaded on
    another thread).
    """

    def __init__(self, name: str) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Runs fn on the model thread and waits (for startup, before the event loop serves)."""
        return self._pool.submit(functools.partial(fn, *args, **kwargs)).result()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


LOADING_MESSAGE = "model still loading: the service is starting; its gRPC health check reports SERVING when it is ready"


async def _still_loading(request: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAVAILABLE, LOADING_MESSAGE)


class PendingHandlers(grpc.GenericRpcHandler):
    """Stands in for a service whose model is still loading, so the server can bind (and answer health
    checks) first. Until the servicer is added, calls to `service_names` fail at once with UNAVAILABLE
    instead of hanging or getting UNIMPLEMENTED; afterwards they go to the servicer.

    Generated ``add_*Servicer_to_server(servicer, server)`` functions accept it in place of a server.
    """

    def __init__(self, service_names: Sequence[str]) -> None:
        self._prefixes = tuple(f"/{name}/" for name in service_names)
        self._handlers: list[grpc.GenericRpcHandler] = []
        # Any method type works: the call is refused before a request is read.
        self._loading = grpc.unary_unary_rpc_method_handler(_still_loading)

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._handlers.extend(handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict) -> None:
        """The same methods the generic handlers route (the asyncio server ignores these too)."""

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        for handler in self._handlers:
            found = handler.service(handler_call_details)
            if found is not None:
                return found
        if not self._handlers and handler_call_details.method.startswith(self._prefixes):
            return self._loading
        return None


class HealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1 statuses by service name ('' = the whole server). Unlike grpcio's reference
    servicer, Watch streams end once the server stops (after sending NOT_SERVING): a watching client (a
    load balancer, client-side health checking) would otherwise hold a graceful stop for its whole grace."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        self._changed = asyncio.Condition()
        self._stopped = False

    async def set(self, service: str, status: int) -> None:
        async with self._changed:
            if not self._stopped:
                self._status[service] = status
                self._changed.notify_all()

    async def stop(self) -> None:
        """Reports NOT_SERVING for every service, for good, and ends every Watch."""
        async with self._changed:
            self._status = dict.fromkeys(self._status, health_pb2.HealthCheckResponse.NOT_SERVING)
            self._stopped = True
            self._changed.notify_all()

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        def current() -> int:
            return self._status.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)

        last = None
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: current() != last or self._stopped)
                status, stopped = current(), self._stopped
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if stopped:
                return


@dataclass
class RunningServer:
    """A started server, its bound port and its health servicer."""

    server: grpc.aio.Server
    host: str
    port: int
    health: HealthServicer
    service_names: tuple[str, ...]
    pending: PendingHandlers | None = None  # set when started without its servicer (still loading)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in (*self.service_names, ""):
            await self.health.set(name, status)

    async def add_servicer(self, register: Callable[[Any], None]) -> None:
        """For a server started with register=None: routes its calls to the loaded servicer, then reports SERVING."""
        if self.pending is None:
            raise RuntimeError("add_servicer is for a server started without a servicer (register=None)")
        register(self.pending)
        await self.set_serving(True)

    async def stop(self, grace_s: float) -> None:
        await self.health.stop()
        await self.server.stop(grace_s)


async def start_server(
    register: Callable[[grpc.aio.Server], None] | None, service_names: Sequence[str], host: str, port: int, tracing: Tracing | None = None,
    security: ServerSecurity | None = None,
) -> RunningServer:
    """Builds, binds (port 0 = any free port) and starts a server with health checking and reflection,
    with TLS and a bearer token when `security` asks for them.

    With register=None the server starts NOT_SERVING and refuses calls to `service_names` with
    UNAVAILABLE until `RunningServer.add_servicer`: a service binds before loading its model, so
    health checks and early clients get an answer while it loads."""
    security = security or ServerSecurity()
    credentials = security.credentials()  # unreadable PEM files fail here, with the flag named
    # Outermost first: the token check, tracing (none when off), then undecodable requests' INVALID_ARGUMENT.
    interceptors = [*security.interceptors(), *server_interceptors(tracing), MalformedRequests()]
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
    pending = None
    if register is None:
        pending = PendingHandlers(service_names)
        server.add_generic_rpc_handlers((pending,))
    else:
        register(server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    address = f"{host}:{port}"
    try:  # grpcio raises RuntimeError on failure
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}: the port is in use or the address is not local")
    await server.start()
    running = RunningServer(server, host, bound, health_servicer, tuple(service_names), pending)
    await running.set_serving(register is not None)
    return running


def announce(role: str, running: RunningServer, endpoints: Mapping[str, str] | None = None) -> None:
    """Prints the one line a parent process (``smartspec up``) waits for: ``listening ROLE=HOST:PORT``,
    followed by the service's other endpoints, e.g. the router's ``http=HOST:PORT``."""
    extra = "".join(f" {name}={address}" for name, address in (endpoints or {}).items())
    print(f"listening {role}={running.address}{extra}", flush=True)


def stop_event() -> asyncio.Event:
    """An event that SIGTERM or SIGINT sets (instead of raising into whatever runs)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve_until_signal(
    running: RunningServer, grace_s: float, on_stop: Callable[[], Awaitable[None]] | None = None, stop: asyncio.Event | None = None
) -> None:
    """Serves until SIGTERM or SIGINT (or `stop`), then reports NOT_SERVING, runs `on_stop` (the router
    drains its requests there), drains in-flight calls for up to `grace_s` seconds and returns."""
    stop = stop or stop_event()
    waiter = asyncio.create_task(running.server.wait_for_termination())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        log.info("stopping: draining for up to %.1fs", grace_s)
        await running.set_serving(False)  # first: balancers move away while calls drain
        if on_stop is not None:
            await on_stop()
        await running.stop(grace_s)
    waiter.cancel()
    stopper.cancel()


@dataclass
class LoadedService:
    """What a service's loader hands to `run_service`."""

    # Adds the servicer to a server, e.g. lambda server: add_FooServicer_to_server(servicer, server).
    register: Callable[[Any], None]
    # Runs first on SIGTERM, once health reports NOT_SERVING (the router drains its running batch).
    on_stop: Callable[[], Awaitable[None]] | None = None


async def run_service(
    role: str, service_names: Sequence[str], host: str, port: int, grace_s: float, load: Callable[[], Awaitable[LoadedService]],
    tracing: Tracing | None = None, security: ServerSecurity | None = None, endpoints: Mapping[str, str] | None = None,
) -> None:
    """The lifecycle every `smartspec serve ROLE` shares. Binds and prints the listening line at once,
    reporting NOT_SERVING and refusing calls with UNAVAILABLE while `load` runs (it must not block the
    event loop: load models with ``await ModelThread.run``); then SERVING until SIGTERM/SIGINT; then
    NOT_SERVING while in-flight calls drain for up to `grace_s`. A signal during loading stops at once
    (the process exits when the load step in progress returns); a failed load stops and raises.
    `endpoints` (name -> HOST:PORT) are other servers the service runs, shown on its listening line."""
    stop = stop_event()
    running = await start_server(None, service_names, host, port, tracing, security)
    announce(role, running, endpoints)
    loading = asyncio.ensure_future(load())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        loaded = None if stop.is_set() else loading.result()
    except BaseException:
        await running.stop(0)
        raise
    finally:
        loading.cancel()
        stopping.cancel()
    if loaded is None:
        log.info("%s: stopped while loading", role)
        await running.stop(0)
        return
    await running.add_servicer(loaded.register)
    log.info("%s serving on %s", role, running.address)
    await serve_until_signal(running, grace_s, loaded.on_stop, stop)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (for a child process to bind: another may take it meanwhile)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


async def wait_serving(address: str, timeout_s: float, service: str = "") -> None:
    """Waits until the server at `address` answers its gRPC health check for `service` ('' = the whole
    server) with SERVING; a service that is still loading its model answers NOT_SERVING."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0, wait_for_ready=True)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{address} did not report SERVING within {timeout_s:.0f}s")
            await asyncio.sleep(0.2)


def setup_logging(level: str = "INFO") -> None:
    """Logs go to stderr; stdout is kept for the 'listening'/'ready' lines and command output."""
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
