"""Speculation policies: each step, how many draft tokens (k) every running request should verify.

A policy is pure (no I/O, no clock: measured seconds are passed in), so it can be unit tested,
compared with others in one run and driven by a simulator. Each step the scheduler groups the running
requests by policy and, per group:

1. ``choose(views)``: k to ask each request's drafter for (0 = plain decoding this step);
2. the drafters propose (up to that k; possibly fewer tokens come back);
3. ``refine(views, asked, lengths)``: k to actually verify, at most the proposal's length (the
   controller decides again once it knows which proposals came back, docs/design.md section 3); the
   default verifies everything that came back;
4. after the Verify, ``observe(outcome)`` with what was proposed, accepted and measured; and
   ``forget(request_id)`` when a request leaves.

The scheduler clamps every answer to the request's room (``RequestView.max_k``: its max_tokens and the
context limit), so a policy cannot make a request overrun. The goodput controller plugs in as one more
subclass; ``PolicyRegistry`` hands every request naming the same spec the same instance, so a stateful
policy sees all of its requests.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from smartspec.errors import RequestError, shown

# Most draft tokens a policy may ask for per request and step (the verifier accepts up to 64).
MAX_SPECULATION = 32


@dataclass(frozen=True)
class RequestView:
    """What a policy may know about one running request at the start of a step."""

    request_id: str
    # Drafter serving the request this step ("none" when it has none, or its drafter is backing off).
    drafter: str
    # Committed tokens: prompt + generated.
    context_tokens: int
    # Tokens generated so far.
    generated: int
    # Most draft tokens this request may verify this step (its max_tokens and the context limit).
    max_k: int
    # Counters so far (see GenerationStats): Verify steps, draft tokens verified, draft tokens accepted.
    steps: int = 0
    proposed: int = 0
    accepted: int = 0


@dataclass(frozen=True)
class RequestOutcome:
    """One request's part of a verified step."""

    request_id: str
    drafter: str
    asked: int  # k asked of the drafter
    proposed: int  # draft tokens verified
    accepted: int  # of those, accepted by the verifier
    context_tokens: int  # committed tokens before the step


@dataclass(frozen=True)
class StepOutcome:
    """What a step did and cost: this policy's requests, and the whole batch's shape and timing."""

    requests: tuple[RequestOutcome, ...]
    num_sequences: int  # requests in the Verify
    new_tokens: int  # tokens the verifier processed: sum of (proposed + 1)
    context_tokens: int  # KV tokens attended to, as the verifier reported
    verify_s: float  # wall time of the Verify call seen by the router
    step_s: float  # wall time of the whole step (propose + verify) seen by the router
    # per drafter called this step: the ks asked of it and the wall time of its Propose call
    drafts: Mapping[str, tuple[tuple[int, ...], float]] = field(default_factory=dict)
    prefill_tokens: int = 0  # context tokens of other requests prefilled in the same forward (chunked prefill)


class SpeculationPolicy(abc.ABC):
    """Chooses k per request for one step; deterministic given its inputs and what it observed."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The spec that selects it, e.g. 'fixed:3'."""

    @abc.abstractmethod
    def choose(self, batch: Sequence[RequestView]) -> list[int]:
        """k to ask each request's drafter for, in order."""

    def refine(self, batch: Sequence[RequestView], asked: Sequence[int], lengths: Sequence[int]) -> list[int]:
        """k to verify once proposals are known (lengths[i] tokens came back): all of them by default."""
        return [min(a, n) for a, n in zip(asked, lengths)]

    def observe(self, outcome: StepOutcome) -> None:
        """Feedback after each Verify (closed-loop policies learn here)."""

    def forget(self, request_id: str) -> None:
        """The request finished or was cancelled."""


@dataclass(frozen=True)
class NoSpeculation(SpeculationPolicy):
    """k = 0 always: plain decoding, the baseline every other policy must beat."""

    @property
    def name(self) -> str:
        return "none"

    def choose(self, batch: Sequence[RequestView]) -> list[int]:
        return [0] * len(batch)


@dataclass(frozen=True)
class FixedSpeculation(SpeculationPolicy):
    """The same k for every request, every step (what most servers do today)."""

    k: int

    @property
    def name(self) -> str:
        return f"fixed:{self.k}"

    def choose(self, batch: Sequence[RequestView]) -> list[int]:
        return [min(self.k, view.max_k) for view in batch]


def parse_policy(spec: str) -> SpeculationPolicy:
    """'none' or 'fixed:K' -> a new policy; anything else is an INVALID_ARGUMENT naming the valid forms."""
    text = spec.strip()
    if text == "none":
        return NoSpeculation()
    if text.startswith("fixed:"):
        raw = text.removeprefix("fixed:")
        if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_SPECULATION:  # str.isdigit alone admits '²'
            raise RequestError("INVALID_ARGUMENT", f"policy {shown(spec)}: fixed:K needs an integer K from 0 to {MAX_SPECULATION}")
        return FixedSpeculation(int(raw))
    raise RequestError("INVALID_ARGUMENT", f"unknown policy {shown(spec)}: use 'none' or 'fixed:K' (e.g. fixed:3)")


class PolicyRegistry:
    """One policy instance per spec for the router's lifetime (stateful policies see all their requests).
    Extra policies (e.g. the goodput controller) are registered by name."""

    def __init__(self, extra: Mapping[str, SpeculationPolicy] | None = None) -> None:
        self._cache: dict[str, SpeculationPolicy] = dict(extra or {})

    def get(self, spec: str) -> SpeculationPolicy:
        key = spec.strip()
        if key not in self._cache:
            try:
                policy = parse_policy(key)
            except RequestError as err:
                named = sorted(k for k, v in self._cache.items() if not isinstance(v, (NoSpeculation, FixedSpeculation)))
                if named and err.message.startswith("unknown policy"):
                    raise RequestError("INVALID_ARGUMENT", f"unknown policy {shown(spec)}: use 'none', 'fixed:K' or {', '.join(named)}") from None
                raise
            # Kept under its canonical name only ('fixed:03' is 'fixed:3'), so spellings cannot grow the cache.
            return self._cache.setdefault(policy.name, policy)
        return self._cache[key]

    def register(self, name: str, policy: SpeculationPolicy) -> None:
        """Adds a named policy unless one is registered under that name already."""
        self._cache.setdefault(name, policy)

    def __contains__(self, spec: str) -> bool:
        return spec.strip() in self._cache


def clamp_k(wanted: int, limit: int) -> int:
    """What the scheduler actually uses: never negative, never past the request's limit."""
    return max(0, min(int(wanted), limit))
