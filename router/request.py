"""One request's life inside the router: its committed tokens, text, counters and outbox.

The router owns every request's committed tokens (prompt + generated): that is what drafters are
synced from, what a re-prefill would resend, and where the stop rules (max_tokens, end of sequence,
stop strings) are applied token by token, so tokens the verifier accepted past a stop are dropped.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Sequence

from router.detokenize import Decode, detokenizer_for
from router.policy import SpeculationPolicy
from router.stops import StopMatcher
from smartspec.errors import RequestError
from smartspec.sampling import GREEDY, SamplingParams
from smartspec.wire import router_pb2

LENGTH = router_pb2.FINISH_REASON_LENGTH
EOS = router_pb2.FINISH_REASON_EOS
STOP = router_pb2.FINISH_REASON_STOP


@dataclass(frozen=True)
class Params:
    """A validated request: what to generate and how to speculate."""

    max_tokens: int
    stop: tuple[str, ...]
    drafter: str  # "none" or a configured drafter name
    policy: SpeculationPolicy
    benchmark: router_pb2.BenchmarkOptions | None = None  # inputs of the "controlled" drafter only
    sampling: SamplingParams = GREEDY  # temperature 0: greedy; else seeded (the router picks a seed if the client gave none)
    ignore_eos: bool = False  # end-of-sequence tokens do not finish the request (fixed-length benchmarks)


@dataclass
class Chunk:
    """What one step produced for a request: ids committed, text released, and, on the last chunk,
    the finish reason and stats."""

    token_ids: list[int]
    text: str
    finish_reason: int = router_pb2.FINISH_REASON_UNSPECIFIED
    stats: router_pb2.GenerationStats | None = None


@dataclass
class Counters:
    """GenerationStats' counters: Verify steps taken part in, drafts verified, drafts accepted."""

    steps: int = 0
    proposed: int = 0
    accepted: int = 0


@dataclass(eq=False)
class RequestState:
    """Mutable state of one request, touched only from the router's event loop."""

    prompt_ids: list[int]
    params: Params
    decode: Decode
    eos_ids: frozenset[int]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrived: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(init=False)  # prompt + generated: the committed context
    counters: Counters = field(default_factory=Counters)
    # per drafter: committed tokens it holds (absent or 0 = send the full context next time)
    drafter_synced: dict[str, int] = field(default_factory=dict)
    drafter_contacted: set[str] = field(default_factory=set)  # drafters that may hold state to release
    verifier: str = ""  # address of the verifier replica that holds its KV cache ("" while it holds none)
    failovers: int = 0  # moves to another replica since its last successful Prefill or Verify
    prefill_left: int = 0  # while running: context tokens its verifier has still to prefill (0: it decodes)
    admitted: float | None = None
    first_token: float | None = None
    finish_reason: int | None = None
    cancelled: bool = False
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt_ids)
        self._detok = detokenizer_for(self.decode)
        self._stops = StopMatcher(self.params.stop)

    # --- views --------------------------------------------------------------------------------
    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.prompt_ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def draft_room(self, max_context: int) -> int:
        """Most draft tokens this request may verify now: the step emits k + 1 tokens, which must fit
        its max_tokens, and the verifier's KV (committed - 1 tokens plus k + 1) must fit the context."""
        return max(0, min(self.params.max_tokens - self.generated - 1, max_context - len(self.tokens)))

    # --- progress -----------------------------------------------------------------------------
    def commit(self, emitted: Sequence[int]) -> Chunk:
        """Appends the tokens the verifier emitted, one at a time, stopping at the first finish rule:
        a stop string (its text dropped), an end-of-sequence token (kept; unless ignore_eos) or max_tokens."""
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
        kept: list[int] = []
        text: list[str] = []
        for token in emitted:
            self.tokens.append(token)
            kept.append(token)
            released, stopped = self._stops.feed(self._detok.add([token]))
            text.append(released)
            if stopped:
                self.finish_reason = STOP
            elif token in self.eos_ids and not self.params.ignore_eos:
                self.finish_reason = EOS
            elif self.generated >= self.params.max_tokens:
                self.finish_reason = LENGTH
            if self.finish_reason is not None:
                break
        chunk = Chunk(kept, "".join(text))
        if self.finish_reason is not None:
            if self.finish_reason != STOP:
                released, stopped = self._stops.feed(self._detok.flush())
                if stopped:  # the last held character completed a stop string
                    self.finish_reason = STOP
                    chunk.text += released
                else:
                    chunk.text += released + self._stops.flush()
            chunk.finish_reason = self.finish_reason
            chunk.stats = self.stats(now)
        return chunk

    def stats(self, now: float | None = None) -> router_pb2.GenerationStats:
        """The request's GenerationStats:

        - steps: Verify calls this request took part in. The first token comes from the prefill, so
          without speculation a request of n tokens takes n - 1 steps; with it, fewer.
        - proposed: draft tokens sent to the verifier for it, after clamping to the policy's k and to
          its token budget (what a drafter returned beyond k, or invalid ids, never count).
        - accepted: of those, how many the verifier accepted (including any a stop rule then dropped).
          accepted / proposed is the request's acceptance rate; (n - 1) / steps its tokens per step.
        - prompt_tokens: tokens in the tokenized prompt (after the chat template, for messages).
        - ttft_s, total_s, queue_s: seconds from arrival at the router to the first token (the
          prefill), to completion, and to admission into the running batch.
        - seed: what a sampling request drew its random numbers from (to reproduce it); 0 for greedy.
        """
        now = time.perf_counter() if now is None else now
        return router_pb2.GenerationStats(
            steps=self.counters.steps,
            proposed=self.counters.proposed,
            accepted=self.counters.accepted,
            prompt_tokens=len(self.prompt_ids),
            ttft_s=(self.first_token - self.arrived) if self.first_token is not None else 0.0,
            total_s=now - self.arrived,
            queue_s=((self.admitted or now) - self.arrived),
            seed=0 if self.params.sampling.greedy else self.params.sampling.seed,
        )

    # --- outbox (read by the RPC handler) -----------------------------------------------------
    def send(self, chunk: Chunk) -> None:
        self.outbox.put_nowait(chunk)

    def fail(self, error: RequestError) -> None:
        """Ends the request with an error the handler turns into a gRPC status."""
        if self.finish_reason is None:
            self.finish_reason = router_pb2.FINISH_REASON_UNSPECIFIED
            self.outbox.put_nowait(error)
