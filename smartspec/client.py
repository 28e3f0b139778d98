"""Python client for the smartspec router. Imports only grpc and the generated stubs (no torch, no
transformers), so scripts and the CLI start fast.

    from smartspec.client import Client

    with Client("127.0.0.1:50051") as client:
        done = client.generate("def fibonacci(n):", max_tokens=32, stop=["\\n\\n"])
        print(done.text, done.finish_reason, done.stats["accepted"])
        for chunk in client.generate_stream("Once upon a time"):
            print(chunk.text, end="", flush=True)

Every failure raises ``ClientError`` with the gRPC status name and the router's message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import grpc

from smartspec.wire import router_pb2, router_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
# Same limits as the services (smartspec.serving.CHANNEL_OPTIONS), without importing the server side.
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 * 1024 * 1024), ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
AUTHORIZATION = "authorization"  # metadata key of the bearer token (smartspec.security)
_STATS_FIELDS = ("steps", "proposed", "accepted", "prompt_tokens", "ttft_s", "total_s", "queue_s", "seed")


def open_channel(address: str, tls_ca: str | None = None) -> grpc.Channel:
    """A channel to `address`: plaintext, or TLS checked against the PEM file `tls_ca`."""
    if not tls_ca:
        return grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
    try:
        roots = Path(tls_ca).read_bytes()
    except OSError as err:
        raise ClientError("INVALID_ARGUMENT", f"cannot read the TLS CA file {tls_ca!r}: {err.strerror or err}") from None
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=roots), options=_CHANNEL_OPTIONS)


class ClientError(Exception):
    """A failed call: ``status`` is the gRPC status name (e.g. 'INVALID_ARGUMENT'), ``message`` the
    router's explanation. ``str(error)`` is 'STATUS: message'."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> "ClientError":
        code = err.code() if hasattr(err, "code") else None
        return cls(code.name if code is not None else "UNKNOWN", (err.details() if hasattr(err, "details") else None) or str(err))


@dataclass
class Completion:
    """A whole generation: ids (an end-of-sequence token included), text without the stop sequence,
    finish reason ('length', 'eos' or 'stop') and the per-request stats as a dict."""

    token_ids: list[int]
    text: str
    finish_reason: str
    stats: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"token_ids": self.token_ids, "text": self.text, "finish_reason": self.finish_reason, "stats": self.stats}


@dataclass
class StreamChunk:
    """Tokens committed since the previous chunk and their text; the last chunk has a finish reason
    and stats (None before)."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    stats: dict[str, float] | None = None


def finish_reason_name(value: int) -> str:
    """FINISH_REASON_LENGTH -> 'length'."""
    return router_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def stats_dict(stats: router_pb2.GenerationStats) -> dict[str, float]:
    return {name: getattr(stats, name) for name in _STATS_FIELDS}


class Client:
    """A connection to one router. Thread-safe (one gRPC channel); close it, or use it as a context manager."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout_s: float | None = None, tls_ca: str | None = None, auth_token: str | None = None) -> None:
        """`tls_ca`: PEM file of the CA (or the self-signed certificate) the router's TLS certificate is
        checked against; None: plaintext. `auth_token`: the router's --auth-token, sent as a bearer token."""
        self.address = address
        self.timeout_s = timeout_s
        self._metadata = ((AUTHORIZATION, f"Bearer {auth_token}"),) if auth_token else None
        self._channel = open_channel(address, tls_ca)
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    @staticmethod
    def request(
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] = (),
        drafter: str = "",
        policy: str = "",
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int = 0,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> router_pb2.GenerateRequest:
        """The wire request; nothing is checked here (the router validates and explains).

        temperature 0 (the default) is greedy; above 0 the request samples, optionally within top_p and
        top_k. A seed makes a sampling run reproducible (same drafter, policy "none" or "fixed:K"); the
        seed used comes back in ``stats["seed"]``. ignore_eos keeps generating past end-of-sequence
        tokens, up to max_tokens or a stop sequence.
        """
        try:
            message = router_pb2.GenerateRequest(
                prompt=prompt or "", stop=list(stop), drafter=drafter or "", policy=policy or "", temperature=temperature, top_k=top_k,
                ignore_eos=ignore_eos,
            )
            for turn in messages or ():
                message.messages.add(role=turn["role"], content=turn["content"])
            if max_tokens is not None:
                message.max_tokens = int(max_tokens)
            if top_p is not None:
                message.top_p = top_p
            if seed is not None:
                message.seed = int(seed)
        except (TypeError, ValueError) as err:  # a value the wire cannot carry, e.g. a negative seed
            raise ClientError("INVALID_ARGUMENT", f"cannot send this request: {err}") from None
        return message

    def generate(self, prompt: str | None = None, **options) -> Completion:
        """Generates a completion (unary call). Options: those of ``request``."""
        try:
            reply = self._stub.Generate(self.request(prompt, **options), timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as err:
            raise ClientError.from_rpc(err) from None
        return Completion(list(reply.token_ids), reply.text, finish_reason_name(reply.finish_reason), stats_dict(reply.stats))

    def generate_stream(self, prompt: str | None = None, **options) -> Iterator[StreamChunk]:
        """Yields chunks as tokens are committed. Closing the iterator early cancels the request."""
        call = self._stub.GenerateStream(self.request(prompt, **options), timeout=self.timeout_s, metadata=self._metadata)
        try:
            for reply in call:
                last = reply.finish_reason != router_pb2.FINISH_REASON_UNSPECIFIED
                yield StreamChunk(
                    list(reply.token_ids),
                    reply.text,
                    finish_reason_name(reply.finish_reason) if last else None,
                    stats_dict(reply.stats) if last else None,
                )
        except grpc.RpcError as err:
            raise ClientError.from_rpc(err) from None
        finally:
            call.cancel()  # no-op once the stream ended; frees the request when the caller stops early
