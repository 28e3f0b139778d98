"""The router's OpenAI-compatible HTTP API (`--http-port`): /v1/completions, /v1/chat/completions,
/v1/models, /health and /metrics, served by uvicorn on the router's own event loop, in front of the same
request path as the gRPC RouterService (RouterServicer.submit / chunks / complete), so both front ends
share one queue, one batch and one set of limits.

    errors.py     OpenAI-style error bodies and the HTTP status of each router status
    schemas.py    request bodies (pydantic) and their translation into a GenerateRequest
    responses.py  completion and chat objects, whole and as stream chunks
    streaming.py  server-sent events, and cancelling a request whose client went away
    app.py        the routes, the bearer token and the body-size limit
    server.py     uvicorn inside the router's loop, without its signal handlers
"""

from router.http.app import Backend
from router.http.server import HttpFrontend

__all__ = ["Backend", "HttpFrontend"]
