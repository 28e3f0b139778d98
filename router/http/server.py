"""uvicorn serving the HTTP API as one more task on the router's event loop.

Two things differ from `uvicorn.run`:
- the socket is bound here, before the router loads (a port in use fails the start with a clear
  OSError, port 0 picks a free one, and the API answers 503 while the model loads);
- uvicorn installs no signal handlers: SIGTERM stays with the router (smartspec.serving), which stops
  taking requests, drains them within its --grace-s, and only then stops this server. Open event streams
  end with their requests, so they never hold shutdown past the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import Iterator

import uvicorn

from router.http.app import Backend, build_app
from smartspec.security import ServerSecurity

log = logging.getLogger("smartspec.router.http")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
# How long stopping waits for connections still open after the router drained (idle keep-alive
# connections close at once; a client that stopped reading is cut off after this).
STOP_TIMEOUT_S = 2.0


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals alone (the router's drain is in charge of SIGTERM)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpFrontend:
    """The OpenAI-compatible API on HOST:PORT: `start` binds and serves (503 until the backend has a
    router), `stop` closes it."""

    def __init__(
        self, backend: Backend, host: str, port: int, security: ServerSecurity | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, access_log: bool = False,
    ) -> None:
        self.backend = backend
        self.host = host
        self.port = port
        self.security = security or ServerSecurity()
        self.max_body_bytes = max_body_bytes
        self.access_log = access_log
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.security.tls_cert else "http"

    async def start(self) -> None:
        """Binds (port 0: a free one, then in `port`) and starts serving on the running loop."""
        security = self.security
        config = uvicorn.Config(
            build_app(self.backend, security.auth_token, self.max_body_bytes),
            lifespan="off", log_config=None, access_log=self.access_log, http="h11", ws="none", proxy_headers=False,
            server_header=False, timeout_graceful_shutdown=STOP_TIMEOUT_S,
            ssl_certfile=security.tls_cert or None, ssl_keyfile=security.tls_key or None,
        )
        try:
            config.load()  # reads the TLS files now, not in the serving task
        except (OSError, ssl.SSLError) as err:
            raise ValueError(f"--tls-cert / --tls-key: cannot serve HTTPS with them: {err}") from None
        sock = _bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]), name="router-http")
        while not self._server.started:
            if self._task.done():
                sock.close()
                self._task.result()  # its error, if it failed
                raise RuntimeError(f"the HTTP API on {self.address} stopped while starting")
            await asyncio.sleep(0.01)
        log.info("HTTP API on %s://%s/v1", self.scheme, self.address)

    async def stop(self) -> None:
        """Stops serving; calling it again does nothing."""
        if self._task is None or self._server is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), STOP_TIMEOUT_S + 5.0)
        except asyncio.TimeoutError:
            self._task.cancel()
        except Exception:
            log.exception("the HTTP API failed while stopping")
        self._task = None


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (IPv4 or IPv6, as the host resolves)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as err:
        raise OSError(f"cannot serve the HTTP API on {host}:{port}: {err.strerror or err}") from None
    sock.setblocking(False)
    return sock
