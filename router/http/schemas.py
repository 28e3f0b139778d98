"""Request bodies of /v1/completions and /v1/chat/completions, and their translation into the router's
GenerateRequest.

Only what is particular to the OpenAI API is checked here: `n`, fields smartspec does not implement,
prompt shapes. Values (max_tokens, temperature, stop sequences, context length, drafter, policy) are
checked by router/validate.py on the GenerateRequest, exactly as for gRPC clients. As in the OpenAI API,
`null` means absent and unknown fields are ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from router.http.errors import ApiError
from smartspec.wire import router_pb2

INT32_MAX = 2**31 - 1
# The OpenAI API samples at temperature 1 when none is given (send 0 for greedy decoding).
DEFAULT_TEMPERATURE = 1.0
# Fields smartspec does not implement, and the values at which they change nothing: accepted at those
# (or null), refused with a 400 naming them otherwise. Fields known to neither list are ignored.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "best_of": (1,),
    "echo": (False,),
    "suffix": ("",),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "prompt_logprobs": (),
    "presence_penalty": (0.0,),
    "frequency_penalty": (0.0,),
    "repetition_penalty": (1.0,),
    "length_penalty": (1.0,),
    "min_p": (0.0,),
    "min_tokens": (0,),
    "use_beam_search": (False,),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "functions": ([],),
    "function_call": ("none", "auto"),
    "response_format": ({"type": "text"},),
    "stop_token_ids": ([],),
    "bad_words": ([],),
    "include_stop_str_in_output": (False,),
    "skip_special_tokens": (True,),
    "add_generation_prompt": (True,),
    "continue_final_message": (False,),
    "chat_template": (),
    "chat_template_kwargs": ({},),
    "guided_json": (),
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
    "structured_outputs": (),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
}


def _same(value: Any, neutral: Any) -> bool:
    """Equal, with booleans kept apart from numbers (logprobs 0 is not logprobs false)."""
    return isinstance(value, bool) == isinstance(neutral, bool) and value == neutral


def _int32(value: int) -> int:
    """Clamped to what the wire carries; the router then explains what is out of range."""
    return max(-INT32_MAX - 1, min(INT32_MAX, value))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = None


class GenerationFields(BaseModel):
    """What both endpoints take. Extra fields are kept (in model_extra) only to refuse the unsupported
    ones that are not neutral."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # -1 or 0: off (vLLM's convention)
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    ignore_eos: bool | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # smartspec's own per-request controls (router defaults when absent)
    drafter: str | None = None
    speculation_policy: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def completion_limit(self) -> int | None:
        return self.max_tokens

    def generate_request(self) -> router_pb2.GenerateRequest:
        """The router's request for this body; an ApiError for what only the HTTP API can get wrong."""
        self._check_supported()
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        request = router_pb2.GenerateRequest(
            stop=stop,
            drafter=self.drafter or "",
            policy=self.speculation_policy or "",
            temperature=DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            top_k=0 if self.top_k in (None, -1) else _int32(self.top_k),
            ignore_eos=bool(self.ignore_eos),
        )
        limit = self.completion_limit()
        if limit is not None:
            request.max_tokens = _int32(limit)
        if self.top_p is not None:
            request.top_p = self.top_p
        if self.seed is not None:
            request.seed = self.seed
        self.add_prompt(request)
        return request

    def add_prompt(self, request: router_pb2.GenerateRequest) -> None:
        raise NotImplementedError

    def _check_supported(self) -> None:
        if self.n not in (None, 1):
            raise ApiError(400, f"n must be 1 (got {self.n}): smartspec returns one choice per request; send separate requests",
                           param="n", code="unsupported_value")
        extra = self.model_extra or {}
        refused = [name for name in NEUTRAL if name in extra and not self._neutral(name, extra[name])]
        if refused:
            accepted = "; ".join(f"{name}: {' or '.join(repr(v) for v in NEUTRAL[name]) or 'null'}" for name in refused)
            raise ApiError(400, f"smartspec does not implement {', '.join(refused)}; leave them out or send their neutral values ({accepted})",
                           param=refused[0], code="unsupported_parameter")

    @staticmethod
    def _neutral(name: str, value: Any) -> bool:
        return value is None or any(_same(value, neutral) for neutral in NEUTRAL[name])


class CompletionRequest(GenerationFields):
    """POST /v1/completions. The prompt is text (a one-element list of text is taken as that text)."""

    prompt: str | list[Any]

    def add_prompt(self, request: router_pb2.GenerateRequest) -> None:
        prompt = self.prompt
        if isinstance(prompt, list):
            if any(not isinstance(item, str) for item in prompt):
                raise ApiError(400, "token-id prompts are not supported: send the prompt as text", param="prompt", code="unsupported_value")
            if len(prompt) != 1:
                raise ApiError(400, f"list prompts are not supported (got {len(prompt)} prompts): send one request per prompt",
                               param="prompt", code="unsupported_value")
            prompt = prompt[0]
        request.prompt = prompt


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[ContentPart] | None = None

    def text(self, index: int) -> str:
        """The content as one string: text parts are joined with newlines (as vLLM does)."""
        if (self.model_extra or {}).get("tool_calls"):
            raise ApiError(400, f"messages[{index}] has tool_calls: tool calling is not supported", param="messages", code="unsupported_value")
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise ApiError(400, f"messages[{index}].content[{j}] is of type {part.type!r}: only text parts are supported",
                               param="messages", code="unsupported_value")
        return "\n".join(part.text or "" for part in self.content)


class ChatCompletionRequest(GenerationFields):
    """POST /v1/chat/completions: the messages go through the model's chat template (in the router)."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None

    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def add_prompt(self, request: router_pb2.GenerateRequest) -> None:
        for i, message in enumerate(self.messages):
            role = "system" if message.role == "developer" else message.role  # the newer name of the system role
            request.messages.add(role=role, content=message.text(i))
