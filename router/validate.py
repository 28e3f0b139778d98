"""Turning a client's GenerateRequest into prompt tokens and Params, or a clear INVALID_ARGUMENT /
OUT_OF_RANGE error. Everything a client can get wrong is caught here, before the request queues."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Mapping, Sequence

from router.drafters import TREE_DRAFTERS
from router.policy import PolicyRegistry, SpeculationPolicy
from router.request import Params
from smartspec.errors import RequestError, shown
from smartspec.sampling import GREEDY, SamplingParams, random_seed
from smartspec.wire import router_pb2

KNOWN_DRAFTERS = ("none", "auto", "draft_model", "prompt_lookup", "tree", "controlled")
ROLES = ("system", "user", "assistant")
MAX_STOPS = 16
MAX_STOP_CHARS = 256
# A prompt longer than this many characters per token of context is refused before it is tokenized: no
# tokenizer packs that much text into a token, and tokenizing megabytes would stall the router's loop.
PROMPT_CHARS_PER_TOKEN = 32


@dataclass(frozen=True)
class Defaults:
    """What an unset field means on this router."""

    drafter: str = "auto"
    policy: str = "goodput"
    max_tokens: int = 128


class PromptEncoder:
    """The target's tokenizer: plain text is tokenized as ``tokenizer(text).input_ids``; messages go
    through the chat template with a generation prompt."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def text(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt).input_ids)

    def messages(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return [int(t) for t in ids]


@dataclass(frozen=True)
class _Checked:
    """A request's checked fields, before its prompt is tokenized."""

    drafter: str
    policy: SpeculationPolicy
    sampling: SamplingParams
    stop: tuple[str, ...]


class RequestValidator:
    """Checks a request against the router's settings and the verifier's limits."""

    def __init__(
        self, encoder: PromptEncoder, defaults: Defaults, drafters: Sequence[str], max_context: int, policies: PolicyRegistry | None = None
    ) -> None:
        self.encoder = encoder
        self.policies = policies or PolicyRegistry()
        self.defaults = defaults
        self.available = ("none", "auto", *drafters)
        self.max_context = max_context

    def __call__(self, request: router_pb2.GenerateRequest) -> tuple[list[int], Params]:
        """The request's prompt ids and Params, its prompt tokenized on this thread."""
        checked = self._check(request)
        return self._complete(request, checked, self._prompt(request))

    async def off_loop(self, request: router_pb2.GenerateRequest, pool: Executor) -> tuple[list[int], Params]:
        """As calling it, with the prompt tokenized (or chat-templated) on `pool`: a long prompt never
        holds the router's event loop (the tokenizers library releases the GIL while it encodes). The
        same checks in the same order, so the same errors."""
        checked = self._check(request)
        prompt_ids = await asyncio.get_running_loop().run_in_executor(pool, self._prompt, request)
        return self._complete(request, checked, prompt_ids)

    def _check(self, request: router_pb2.GenerateRequest) -> _Checked:
        """Everything but the prompt (checked first, as it is cheap)."""
        drafter = self._drafter(request.drafter or self.defaults.drafter)
        policy = self.policies.get(request.policy or self.defaults.policy)
        sampling = self._sampling(request)
        if drafter in TREE_DRAFTERS and not sampling.greedy:
            raise RequestError(
                "INVALID_ARGUMENT",
                f"drafter {drafter!r} proposes token trees, which are verified greedily only, so it cannot serve a sampling request "
                f"(temperature {sampling.temperature:g}); use temperature 0, or a chain drafter (draft_model, prompt_lookup, or auto)",
            )
        stop = self._stops(request.stop)
        if request.HasField("max_tokens") and request.max_tokens < 1:
            raise RequestError("INVALID_ARGUMENT", f"max_tokens must be at least 1 (got {request.max_tokens})")
        if request.HasField("max_tokens") and request.max_tokens >= self.max_context:
            raise RequestError(
                "OUT_OF_RANGE",
                f"max_tokens ({request.max_tokens}) leaves no room for the prompt within the model's context limit of "
                f"{self.max_context} tokens; lower max_tokens",
            )
        return _Checked(drafter, policy, sampling, stop)

    def _complete(self, request: router_pb2.GenerateRequest, checked: _Checked, prompt_ids: list[int]) -> tuple[list[int], Params]:
        """The checks that need the prompt's length, and the Params."""
        drafter = checked.drafter
        room = self.max_context - len(prompt_ids)
        if request.HasField("max_tokens"):
            max_tokens = request.max_tokens
            if max_tokens > room:
                raise RequestError(
                    "OUT_OF_RANGE",
                    f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) = {len(prompt_ids) + max_tokens} tokens exceeds "
                    f"the model's context limit of {self.max_context}; shorten the prompt or lower max_tokens",
                )
        else:
            if room < 1:
                raise RequestError(
                    "OUT_OF_RANGE",
                    f"the prompt has {len(prompt_ids)} tokens, which leaves no room to generate within the model's context "
                    f"limit of {self.max_context}; shorten the prompt",
                )
            max_tokens = min(self.defaults.max_tokens, room)
        benchmark = self._benchmark(request) if drafter == "controlled" else None
        return prompt_ids, Params(
            max_tokens=max_tokens, stop=checked.stop, drafter=drafter, policy=checked.policy, benchmark=benchmark, sampling=checked.sampling, ignore_eos=request.ignore_eos
        )

    @staticmethod
    def _sampling(request: router_pb2.GenerateRequest) -> SamplingParams:
        """Checked sampling parameters; a sampling request without a seed gets a random one."""
        top_p = request.top_p if request.HasField("top_p") else 1.0
        seed = request.seed if request.HasField("seed") else None
        params = SamplingParams(request.temperature, top_p, request.top_k, seed or 0).check()
        if params.greedy:
            return GREEDY
        return params if seed is not None else SamplingParams(params.temperature, params.top_p, params.top_k, random_seed())

    @staticmethod
    def _benchmark(request: router_pb2.GenerateRequest) -> router_pb2.BenchmarkOptions:
        options = request.benchmark
        if not options.reference_token_ids:
            raise RequestError(
                "INVALID_ARGUMENT",
                "drafter 'controlled' needs benchmark.reference_token_ids: the target's greedy output for this prompt (run it once with policy 'none')",
            )
        if not 0.0 <= options.controlled_acceptance <= 1.0:
            raise RequestError("INVALID_ARGUMENT", f"benchmark.controlled_acceptance must be in [0, 1] (got {options.controlled_acceptance})")
        return options

    def _prompt(self, request: router_pb2.GenerateRequest) -> list[int]:
        if request.prompt and request.messages:
            raise RequestError("INVALID_ARGUMENT", "give either prompt or messages, not both")
        if not request.prompt and not request.messages:
            raise RequestError("INVALID_ARGUMENT", "the prompt is empty: give a non-empty prompt or at least one message")
        limit = PROMPT_CHARS_PER_TOKEN * self.max_context
        if request.prompt:
            if len(request.prompt) > limit:
                raise RequestError("OUT_OF_RANGE", self._too_long(f"the prompt has {len(request.prompt)} characters", limit))
            ids = self._encode(self.encoder.text, request.prompt)
        else:
            if len(request.messages) > self.max_context:
                raise RequestError(
                    "OUT_OF_RANGE", f"{len(request.messages)} messages cannot fit in the model's context limit of {self.max_context} tokens"
                )
            for i, message in enumerate(request.messages):
                if message.role not in ROLES:
                    raise RequestError("INVALID_ARGUMENT", f"messages[{i}].role is {shown(message.role)}; use one of {', '.join(ROLES)}")
            chars = sum(len(m.content) for m in request.messages)
            if chars > limit:
                raise RequestError("OUT_OF_RANGE", self._too_long(f"the messages have {chars} characters", limit))
            ids = self._encode(self.encoder.messages, [{"role": m.role, "content": m.content} for m in request.messages])
        if not ids:
            raise RequestError("INVALID_ARGUMENT", "the prompt tokenizes to no tokens; give a non-empty prompt")
        return ids

    def _too_long(self, what: str, limit: int) -> str:
        return (
            f"{what}, more than the {limit} accepted for the model's context limit of {self.max_context} tokens "
            f"({PROMPT_CHARS_PER_TOKEN} per token); shorten the prompt"
        )

    @staticmethod
    def _encode(encode, prompt) -> list[int]:
        """The tokenizer's (or chat template's) ids; its refusal of an input is the client's error."""
        try:
            return encode(prompt)
        except Exception as err:  # jinja's TemplateError, a tokenizer's ValueError, ...
            raise RequestError("INVALID_ARGUMENT", f"the prompt cannot be tokenized: {type(err).__name__}: {str(err)[:300]}") from None

    def _drafter(self, name: str) -> str:
        if name not in self.available:
            known = "not running behind this router" if name in KNOWN_DRAFTERS else "unknown"
            raise RequestError("INVALID_ARGUMENT", f"drafter {shown(name)} is {known}; use one of {', '.join(self.available)}")
        return name

    @staticmethod
    def _stops(stops: Sequence[str]) -> tuple[str, ...]:
        if len(stops) > MAX_STOPS:
            raise RequestError("INVALID_ARGUMENT", f"{len(stops)} stop sequences given; at most {MAX_STOPS} are allowed")
        for stop in stops:
            if not stop:
                raise RequestError("INVALID_ARGUMENT", "stop sequences must not be empty strings")
            if len(stop) > MAX_STOP_CHARS:
                raise RequestError("INVALID_ARGUMENT", f"a stop sequence has {len(stop)} characters; at most {MAX_STOP_CHARS} are allowed")
        return tuple(stops)

