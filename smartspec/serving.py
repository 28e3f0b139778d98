"""What every smartspec gRPC server shares: options, health and reflection, error mapping, the model
thread, the 'listening' line and graceful shutdown."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import signal
import sys
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from smartspec.errors import RequestError

log = logging.getLogger("smartspec")

# Explicit limits (gRPC's default receive limit is 4 MB). Proposals and token lists are small; the
# headroom is for future dense draft-probability rows and large prompts.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MESSAGE_SIZE_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# grpcio sets SO_REUSEPORT by default, which lets a second server silently share a port in use.
SERVER_OPTIONS = [("grpc.so_reuseport", 0), *MESSAGE_SIZE_OPTIONS]
CHANNEL_OPTIONS = list(MESSAGE_SIZE_OPTIONS)

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
                await context.abort(grpc.StatusCode[err.status], err.message)

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except RequestError as err:
            await context.abort(grpc.StatusCode[err.status], err.message)

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


@dataclass
class RunningServer:
    """A started server, its bound port and its health servicer."""

    server: grpc.aio.Server
    host: str
    port: int
    health: health.aio.HealthServicer
    service_names: tuple[str, ...]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in (*self.service_names, ""):
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        await self.set_serving(False)
        await self.server.stop(grace_s)


async def start_server(
    register: Callable[[grpc.aio.Server], None], service_names: Sequence[str], host: str, port: int
) -> RunningServer:
    """Builds, binds (port 0 = any free port) and starts a server with health checking and reflection."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    try:
        bound = server.add_insecure_port(f"{host}:{port}")  # grpcio raises RuntimeError on failure
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}: the port is in use or the address is not local")
    await server.start()
    running = RunningServer(server, host, bound, health_servicer, tuple(service_names))
    await running.set_serving(True)
    return running


def announce(role: str, running: RunningServer) -> None:
    """Prints the one line a parent process (``smartspec up``) waits for: ``listening ROLE=HOST:PORT``."""
    print(f"listening {role}={running.address}", flush=True)


async def serve_until_signal(running: RunningServer, grace_s: float, on_stop: Callable[[], Awaitable[None]] | None = None) -> None:
    """Serves until SIGTERM or SIGINT, then reports NOT_SERVING, drains in-flight calls for up to
    `grace_s` seconds and returns."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(running.server.wait_for_termination())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        log.info("stopping: draining for up to %.1fs", grace_s)
        if on_stop is not None:
            await on_stop()
        await running.stop(grace_s)
    waiter.cancel()
    stopper.cancel()


def setup_logging(level: str = "INFO") -> None:
    """Logs go to stderr; stdout is kept for the 'listening'/'ready' lines and command output."""
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
