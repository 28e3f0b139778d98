"""The objects the OpenAI API answers with: a completion (`text_completion`) or a chat completion
(`chat.completion`, streamed as `chat.completion.chunk`), built from the router's chunks and replies.

Beyond the OpenAI fields, each finished choice's object carries `speculation`: the request's Verify
steps, draft tokens proposed and accepted (smartspec's GenerationStats).
"""

from __future__ import annotations

import time
from typing import Any

from router.request import Chunk
from smartspec.wire import router_pb2

# An end-of-sequence token and a stop sequence are both "stop" in the OpenAI API.
FINISH_REASONS = {
    router_pb2.FINISH_REASON_LENGTH: "length",
    router_pb2.FINISH_REASON_EOS: "stop",
    router_pb2.FINISH_REASON_STOP: "stop",
}


def usage(stats: router_pb2.GenerationStats, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": stats.prompt_tokens + completion_tokens}


def speculation(stats: router_pb2.GenerationStats) -> dict[str, int]:
    return {"steps": stats.steps, "proposed": stats.proposed, "accepted": stats.accepted}


class CompletionFormat:
    """/v1/completions objects for one request."""

    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, model: str, request_id: str) -> None:
        self.model = model
        self.id = self.id_prefix + request_id
        self.created = int(time.time())
        self.completion_tokens = 0  # streamed so far

    def choice(self, text: str, finish_reason: str | None, first: bool, whole: bool) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, reply: router_pb2.GenerateResponse) -> dict[str, Any]:
        """The non-streamed answer, with usage."""
        body = self._envelope(self.object)
        body["choices"] = [self.choice(reply.text, FINISH_REASONS.get(reply.finish_reason), first=True, whole=True)]
        body["usage"] = usage(reply.stats, len(reply.token_ids))
        body["speculation"] = speculation(reply.stats)
        return body

    def chunk(self, chunk: Chunk, first: bool, include_usage: bool) -> dict[str, Any]:
        """One streamed chunk: the tokens one step committed (the first carries the first token)."""
        self.completion_tokens += len(chunk.token_ids)
        finish = FINISH_REASONS.get(chunk.finish_reason)
        body = self._envelope(self.chunk_object)
        body["choices"] = [self.choice(chunk.text, finish, first=first, whole=False)]
        if include_usage:
            body["usage"] = None  # as the OpenAI API: only the last chunk has usage
        if chunk.stats is not None:
            body["speculation"] = speculation(chunk.stats)
        return body

    def usage_chunk(self, stats: router_pb2.GenerationStats) -> dict[str, Any]:
        """The last chunk when stream_options.include_usage is set: no choices, the request's usage."""
        body = self._envelope(self.chunk_object)
        body["choices"] = []
        body["usage"] = usage(stats, self.completion_tokens)
        return body


class ChatFormat(CompletionFormat):
    """/v1/chat/completions objects for one request."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def choice(self, text: str, finish_reason: str | None, first: bool, whole: bool) -> dict[str, Any]:
        if whole:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish_reason}
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
