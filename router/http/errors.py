"""Errors as the OpenAI API shapes them: ``{"error": {"message", "type", "param", "code"}}`` with the
HTTP status that clients map to their own exception classes (the `openai` library: 400 BadRequestError,
401 AuthenticationError, 404 NotFoundError, 429 RateLimitError, 5xx InternalServerError).

The router's own checks (router/validate.py, the scheduler's queue limit and shutdown) raise
RequestError with a gRPC status name; `from_request_error` maps those, so no check is written twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse

from smartspec.errors import RequestError

# gRPC status of a RequestError -> (HTTP status, error type, error code)
STATUS_MAP: dict[str, tuple[int, str, str | None]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error", None),
    "OUT_OF_RANGE": (400, "invalid_request_error", "context_length_exceeded"),
    "NOT_FOUND": (404, "invalid_request_error", "not_found"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error", "rate_limit_exceeded"),
    "UNAVAILABLE": (503, "server_error", "service_unavailable"),
    "DEADLINE_EXCEEDED": (504, "server_error", "timeout"),
}
INTERNAL = (500, "server_error", "internal_error")
# Seconds an overloaded client is asked to wait (the queue drains at the speed of a few steps).
RETRY_AFTER_S = 1
# Request fields a router message may name, and the HTTP field each is called here.
_PARAMS = re.compile(r"\b(max_tokens|temperature|top_p|top_k|seed|drafter|policy|stop|prompt|messages)\b")
_PARAM_NAMES = {"policy": "speculation_policy"}


@dataclass(eq=False)  # exceptions keep identity equality and stay hashable
class ApiError(Exception):
    """An error answered as OpenAI-style JSON."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers or None)


def from_request_error(err: RequestError, prompt_field: str = "prompt") -> ApiError:
    """The HTTP form of a router error. `prompt_field` is what the endpoint calls its prompt ('prompt'
    or 'messages'), named as the param of errors about the prompt."""
    status, kind, code = STATUS_MAP.get(err.status, INTERNAL)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else {}
    found = _PARAMS.search(err.message) if status == 400 else None
    param = None
    if found:
        name = found.group(1)
        param = prompt_field if name in ("prompt", "messages") else _PARAM_NAMES.get(name, name)
    return ApiError(status, err.message, kind, param, code, headers)


def status_error(status: int, message: str) -> ApiError:
    """An error of the HTTP layer itself (unknown path, wrong method, body too large)."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    return ApiError(status, message, kind, None, codes.get(status))
