"""The HTTP API's routes, its bearer token and its request-body limit (a FastAPI app).

Every generation goes through the router's own request path (RouterServicer.submit, then chunks or
complete): the same validation, queue, batch and cancellation as a gRPC call, in the same process.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from router.http.errors import ApiError, from_request_error, status_error
from router.http.responses import ChatFormat, CompletionFormat
from router.http.schemas import ChatCompletionRequest, CompletionRequest, GenerationFields
from router.http.streaming import ClientGone, EventStream, events, until_disconnected
from router.server import RouterServicer
from smartspec.errors import RequestError
from smartspec.serving import LOADING_MESSAGE

# Paths open without the bearer token, as gRPC health checks are (load balancers, container checks).
OPEN_PATHS = frozenset({"/health"})
# Status of a response to a client that is no longer there (nobody reads it; nginx's convention).
CLIENT_CLOSED = 499


@dataclass
class Backend:
    """What the API serves: the router (None while it loads) and the name clients call its model by."""

    model: str
    servicer: RouterServicer | None = None
    root: str = ""  # where the model lives (the tokenizer's folder), shown in /v1/models
    created: int = field(default_factory=lambda: int(time.time()))

    def attach(self, servicer: RouterServicer, root: str = "") -> None:
        """The router is loaded: from now on the API serves (until the router drains)."""
        self.servicer, self.root = servicer, root or self.root

    @property
    def serving(self) -> bool:
        return self.servicer is not None and not self.servicer.scheduler.draining

    def router(self) -> RouterServicer:
        """The router, or a 503 while it loads or drains."""
        if self.servicer is None:
            raise ApiError(503, LOADING_MESSAGE, "server_error", code="service_unavailable")
        if self.servicer.scheduler.draining:
            raise ApiError(503, "the router is shutting down; retry on another router", "server_error", code="service_unavailable")
        return self.servicer

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model:
            raise ApiError(404, f"the model {name!r} does not exist here; this server serves {self.model!r} (GET /v1/models)",
                           param="model", code="model_not_found")

    def model_card(self) -> dict[str, Any]:
        card = {"id": self.model, "object": "model", "created": self.created, "owned_by": "smartspec", "root": self.root or self.model, "parent": None}
        if self.servicer is not None:
            card["max_model_len"] = self.servicer.validate.max_context
        return card


def build_app(backend: Backend, auth_token: str = "", max_body_bytes: int = 8 * 1024 * 1024) -> ASGIApp:
    """The ASGI app: FastAPI routes behind the token check (outermost) and the body-size limit."""
    app = FastAPI(title="smartspec", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> Response:
        return err.response()

    @app.exception_handler(RequestError)
    async def router_error(request: Request, err: RequestError) -> Response:
        prompt_field = "messages" if request.url.path.endswith("/chat/completions") else "prompt"
        return from_request_error(err, prompt_field).response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError) -> Response:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request body"}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        where = ".".join(loc)
        return ApiError(400, f"{where}: {first['msg']}" if where else str(first["msg"]), param=where or None).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> Response:
        return status_error(err.status_code, str(err.detail)).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> Response:  # Starlette then re-raises it, and uvicorn logs it
        return status_error(500, "the router failed while serving this request (see the router's log)").response()

    @app.get("/health")
    async def health() -> Response:
        if not backend.serving:
            return ApiError(503, "not serving: the router is loading or shutting down", "server_error", code="service_unavailable").response()
        return JSONResponse({"status": "SERVING"})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        backend.router()
        return {"object": "list", "data": [backend.model_card()]}

    @app.get("/metrics")
    async def metrics() -> Response:
        telemetry = backend.router().scheduler.telemetry
        if telemetry.metrics is None:
            raise status_error(404, "metrics are off on this router")
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(telemetry.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await generate(backend, body, CompletionFormat, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await generate(backend, body, ChatFormat, request)

    return BearerToken(BodyLimit(app, max_body_bytes), auth_token)


async def generate(backend: Backend, body: GenerationFields, form_class: type[CompletionFormat], request: Request) -> Response:
    """One generation: submitted like a gRPC call, answered whole or as events; a client that leaves
    cancels it."""
    router = backend.router()
    backend.check_model(body.model)
    state = await router.submit(body.generate_request())
    form = form_class(backend.model, state.id)
    if not body.stream:
        try:
            reply = await until_disconnected(router.complete(state), request.receive)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse(form.whole(reply))
    chunks = router.chunks(state)
    try:
        # Before the 200: a request that fails before its first token (overload in the verifier,
        # shutdown while queued) gets an error status, not a broken stream.
        first = await until_disconnected(anext(chunks), request.receive)
    except ClientGone:
        await chunks.aclose()
        return Response(status_code=CLIENT_CLOSED)
    return EventStream(events(form, first, chunks, body.include_usage), on_close=chunks.aclose)


class BodyLimit:
    """Refuses request bodies over `max_bytes` with 413, by their Content-Length before reading, and
    while reading when the length is not announced."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await status_error(413, self._too_large(int(declared))).response()(scope, receive, send)
            return
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # FastAPI passes an HTTPException out of its body reading
                    raise HTTPException(413, self._too_large(received))
            return message

        await self.app(scope, limited, send)

    def _too_large(self, size: int) -> str:
        return f"the request body has {size} bytes or more; this server accepts at most {self.max_bytes} (--http-max-body-bytes)"


class BearerToken:
    """With a token set, refuses every request without `Authorization: Bearer TOKEN` with 401 (except
    OPEN_PATHS). The comparison takes the same time whatever the guess."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode() if token else b""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._expected and scope["path"] not in OPEN_PATHS:
            sent = [value for key, value in scope["headers"] if key == b"authorization"]
            if not sent:
                message = "this server requires a bearer token: send the header 'Authorization: Bearer TOKEN' (the openai client's api_key)"
            elif not hmac.compare_digest(sent[0], self._expected):
                message = "the bearer token is wrong: send the router's --auth-token as 'Authorization: Bearer TOKEN'"
            else:
                message = ""
            if message:
                error = ApiError(401, message, "authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
