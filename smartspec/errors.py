"""Request errors that services raise in plain code and turn into gRPC statuses at the edge.

Engines stay free of gRPC: they raise ``RequestError("INVALID_ARGUMENT", "...")`` and the servicer
(see ``smartspec.serving.rpc_errors``) aborts the call with that status and message.
"""

from __future__ import annotations

# The gRPC status names a request can fail with.
STATUS_NAMES = frozenset(
    {"INVALID_ARGUMENT", "OUT_OF_RANGE", "NOT_FOUND", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED",
     "FAILED_PRECONDITION", "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "INTERNAL", "UNIMPLEMENTED"}
)


class RequestError(Exception):
    """A request that cannot be served, with the gRPC status name to report and a message a person can act on."""

    def __init__(self, status: str, message: str) -> None:
        if status not in STATUS_NAMES:
            raise ValueError(f"unknown status name {status!r}")
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def shown(value: str, limit: int = 64) -> str:
    """How a value a client sent is quoted in an error message: its repr, cut to `limit` characters, so
    that a megabyte-long name cannot turn a clear error into an oversized status."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}...' ({len(value)} characters)"
