"""Server-sent events, and a client that goes away.

A request belongs to its connection: when the client disconnects, streamed or not, its request is
cancelled at once (leaving the queue, or the batch at the next step boundary) and its state is freed
in the verifier and drafters, exactly as when a gRPC client cancels.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from router.http.errors import from_request_error
from router.http.responses import CompletionFormat
from router.request import Chunk
from smartspec.errors import RequestError

T = TypeVar("T")
DONE = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _disconnected(receive: Receive) -> None:
    """Returns when the client disconnects (the request body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(work: Awaitable[T], receive: Receive) -> T:
    """Awaits `work`; if the client disconnects first, cancels it (which cancels the router request it
    waits on) and raises ClientGone."""
    task = asyncio.ensure_future(work)  # first: it starts (and holds its request) before the watch
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def events(form: CompletionFormat, first: Chunk, chunks: AsyncIterator[Chunk], include_usage: bool) -> AsyncIterator[bytes]:
    """The SSE body: one event per committed step, the first carrying the first token (clients time
    the first token from the first event); then the usage event if asked; then [DONE]. An error after
    the first event ends the stream with an error event (no [DONE])."""
    chunk, is_first = first, True
    try:
        while True:
            yield event(form.chunk(chunk, is_first, include_usage))
            if chunk.finish_reason:
                break
            chunk, is_first = await anext(chunks), False
    except RequestError as err:
        yield event(from_request_error(err).body())
        return
    if include_usage and chunk.stats is not None:
        yield event(form.usage_chunk(chunk.stats))
    yield DONE


class EventStream(StreamingResponse):
    """text/event-stream that stops at once when the client disconnects, whatever the ASGI server's
    spec version (Starlette only listens for the disconnect below ASGI 2.4), and always runs `on_close`
    (which ends the router request, also when the body never started)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.ensure_future(self.stream_response(send))
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({streaming, gone}, return_when=asyncio.FIRST_COMPLETED)
            if streaming.done():
                with contextlib.suppress(OSError):  # the client left during the last write
                    streaming.result()
        finally:
            for task in (streaming, gone):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await streaming
            await self.on_close()
