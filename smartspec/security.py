"""What stands between a service and its callers: optional TLS and bearer token (the router's
--tls-cert, --tls-key, --auth-token), and a clean INVALID_ARGUMENT for bytes that are not the message a
method expects (grpcio itself would answer UNKNOWN with a parser's traceback text).

Health checks stay open without a token, so load balancers and `smartspec health` need no secret.
"""

from __future__ import annotations

import argparse
import hmac
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc

from smartspec.config import add_flag

AUTHORIZATION = "authorization"
BEARER = "Bearer "
# Methods callable without a token: the standard health service (load balancers, container checks).
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


def add_security_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of a service that can face clients directly (the router)."""
    add_flag(parser, "--tls-cert", default="", help="PEM certificate chain: serve TLS instead of plaintext (needs --tls-key)")
    add_flag(parser, "--tls-key", default="", help="PEM private key of --tls-cert")
    add_flag(parser, "--auth-token", default="",
             help="require metadata 'authorization: Bearer TOKEN' on every call except health checks; empty: no token")


@dataclass(frozen=True)
class ServerSecurity:
    """TLS files and bearer token of one server; all empty (the default) means plaintext, no token."""

    tls_cert: str = ""
    tls_key: str = ""
    auth_token: str = ""

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together: give both (TLS) or neither (plaintext)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ServerSecurity":
        return cls(args.tls_cert, args.tls_key, args.auth_token)

    def credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials from the PEM files, or None for plaintext; unreadable files fail at startup."""
        if not self.tls_cert:
            return None
        pem = {}
        for flag, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key)):
            try:
                pem[flag] = Path(path).read_bytes()
            except OSError as err:
                raise ValueError(f"{flag} {path!r}: {err.strerror or err}") from None
        return grpc.ssl_server_credentials([(pem["--tls-key"], pem["--tls-cert"])])

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [BearerToken(self.auth_token)] if self.auth_token else []


def refusing_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails every call with `code` before reading a
    request (its bytes are never parsed)."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    kind = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return kind(refuse, response_serializer=handler.response_serializer)


class BearerToken(grpc.aio.ServerInterceptor):
    """Refuses calls without metadata 'authorization: Bearer <token>' with UNAUTHENTICATED (health
    checks excepted). The comparison takes the same time whatever the guess."""

    def __init__(self, token: str) -> None:
        self._expected = (BEARER + token).encode()

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        sent = [value for key, value in (details.invocation_metadata or ()) if key == AUTHORIZATION]
        if not sent:
            message = "this router requires a bearer token: send metadata 'authorization: Bearer TOKEN' (smartspec generate --auth-token)"
        elif hmac.compare_digest(str(sent[0]).encode(), self._expected):
            return handler
        else:
            message = "the bearer token is wrong (metadata 'authorization: Bearer TOKEN' must carry the router's --auth-token)"
        return refusing_handler(handler, grpc.StatusCode.UNAUTHENTICATED, message)


class _Undecodable:
    """Stands in for a request whose bytes did not parse; the wrapped behavior refuses it."""

    def __init__(self, message: str) -> None:
        self.message = message


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Answers INVALID_ARGUMENT, naming the expected message type, when a unary request's bytes do
    not parse (corrupt wire data, a string field that is not UTF-8), instead of grpcio's UNKNOWN."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _checked(handler, details.method)
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped


def _checked(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    decode = handler.request_deserializer

    def safe_decode(data: bytes) -> Any:
        try:
            return decode(data)
        except Exception as err:  # protobuf raises DecodeError; anything else is the same problem to the caller
            reason = str(err).split(":", 1)[-1].strip() or type(err).__name__
            return _Undecodable(f"the request to {method} is not a valid message of its type ({len(data)} bytes): {reason}"[:500])

    codec = {"request_deserializer": safe_decode, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        behavior = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, **codec)
    behavior = handler.unary_stream
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext):
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            async for item in behavior(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(stream, **codec)

    async def writer(request: Any, context: grpc.aio.ServicerContext) -> Any:  # a stream written with context.write
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behavior(request, context)

    return grpc.unary_stream_rpc_method_handler(writer, **codec)
