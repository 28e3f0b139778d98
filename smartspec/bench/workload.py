"""Benchmark workloads: the shipped prompt set and seeded arrival schedules.

Two prompt sets ship in ``prompts.json`` (made for this project): ``chat`` (open questions, where
proposals rarely match) and ``copy`` (repeat / fix / rewrite / quote a given text, where the answer
copies the prompt and prompt lookup shines). Each prompt carries its output length (max_tokens).
Arrivals are Poisson at a fixed rate, or follow a trace whose rate changes over time; every policy of
a comparison replays the same schedule.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from typing import Mapping, Sequence


@dataclass(frozen=True)
class Prompt:
    messages: tuple[tuple[str, str], ...]  # (role, content) turns
    max_tokens: int


@dataclass(frozen=True)
class Arrival:
    """One request of a schedule: when it is sent (seconds from the start) and what it asks."""

    at_s: float
    prompt: Prompt
    index: int  # position in the prompt set (keys per-prompt references)


@dataclass(frozen=True)
class Load:
    """One load level of a run: a Poisson (or trace mean) rate in requests/s, or a closed-loop
    concurrency (that many requests always in flight). Exactly one is set."""

    rate: float | None = None
    concurrency: int | None = None

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("a load is a rate or a concurrency, not both or neither")

    @classmethod
    def of(cls, row: Mapping) -> "Load":
        """The load of a results row (closed-loop rows carry `concurrency` and `rate: null`)."""
        return cls(concurrency=row["concurrency"]) if row.get("concurrency") is not None else cls(rate=row["rate"])

    @property
    def label(self) -> str:
        return f"concurrency={self.concurrency}" if self.concurrency is not None else f"rate={self.rate:g}"


def load_prompts(name: str) -> list[Prompt]:
    """The shipped prompt set `name` ('chat' or 'copy')."""
    data = json.loads(resources.files("smartspec.bench").joinpath("prompts.json").read_text())
    if name not in data:
        raise ValueError(f"unknown workload {name!r}; shipped: {', '.join(sorted(data))}")
    return [Prompt(tuple((m["role"], m["content"]) for m in p["messages"]), int(p["max_tokens"])) for p in data[name]]


def poisson_schedule(prompts: Sequence[Prompt], rate: float, count: int, seed: int) -> list[Arrival]:
    """`count` arrivals with exponential gaps at `rate` requests/s, prompts drawn in a seeded order."""
    rng = random.Random(seed)
    at, out = 0.0, []
    for i in range(count):
        at += rng.expovariate(rate) if i else 0.0
        index = (i + seed) % len(prompts)
        out.append(Arrival(at, prompts[index], index))
    return out


def trace_schedule(prompts: Sequence[Prompt], rates: Sequence[float], per_phase: int, seed: int) -> list[Arrival]:
    """A time-varying load: `per_phase` Poisson arrivals at each rate in turn (e.g. low, high, low)."""
    rng = random.Random(seed)
    at, out = 0.0, []
    for phase, rate in enumerate(rates):
        for i in range(per_phase):
            at += rng.expovariate(rate) if out else 0.0
            index = (len(out) + seed) % len(prompts)
            out.append(Arrival(at, prompts[index], index))
    return out


def closed_loop_schedule(prompts: Sequence[Prompt], count: int, seed: int) -> list[Arrival]:
    """`count` requests of a closed loop, prompts in the same seeded turn as the Poisson schedules'. They
    have no arrival time (at_s 0): each is sent when a finished one frees its slot."""
    return [Arrival(0.0, prompts[(i + seed) % len(prompts)], (i + seed) % len(prompts)) for i in range(count)]


def mean_rate(schedule: Sequence[Arrival]) -> float:
    """Requests per second over the schedule (its label in results)."""
    span = schedule[-1].at_s - schedule[0].at_s if len(schedule) > 1 else 0.0
    return (len(schedule) - 1) / span if span > 0 else float("inf")


# --- workloads by name ------------------------------------------------------------------------------
# A workload is a prompt set ('chat', 'copy') with Poisson arrivals, or '<set>-trace': the same prompts
# with a time-varying rate. A trace's phases have rates in the proportions TRACE_SHAPE (low, high, low)
# and equal numbers of arrivals, scaled so that the trace's mean rate (arrivals / expected span) is the
# rate it is run at; that mean is its `rate` in results.
TRACE_SUFFIX = "-trace"
TRACE_SHAPE = (1.0, 4.0, 1.0)


def parse_workload(name: str) -> tuple[str, bool]:
    """'copy' -> ('copy', False); 'copy-trace' -> ('copy', True)."""
    if name.endswith(TRACE_SUFFIX):
        return name[: -len(TRACE_SUFFIX)], True
    return name, False


def trace_rates(mean: float, shape: Sequence[float] = TRACE_SHAPE) -> list[float]:
    """Phase rates in the proportions `shape` whose mean, over equal arrivals per phase, is `mean`:
    len(shape) * n arrivals over an expected span of sum(n / rate_i) seconds."""
    if mean <= 0 or not shape or min(shape) <= 0:
        raise ValueError("a trace needs a positive mean rate and positive phase proportions")
    scale = mean * sum(1.0 / s for s in shape) / len(shape)
    return [scale * s for s in shape]


def phase_counts(count: int, phases: int) -> list[int]:
    """`count` arrivals split over `phases` as evenly as possible (earlier phases get the remainder)."""
    return [count // phases + (1 if i < count % phases else 0) for i in range(phases)]


def trace_schedule_counts(prompts: Sequence[Prompt], rates: Sequence[float], counts: Sequence[int], seed: int) -> list[Arrival]:
    """Like trace_schedule, with its own number of arrivals per phase."""
    rng = random.Random(seed)
    at, out = 0.0, []
    for rate, count in zip(rates, counts):
        for _ in range(count):
            at += rng.expovariate(rate) if out else 0.0
            index = (len(out) + seed) % len(prompts)
            out.append(Arrival(at, prompts[index], index))
    return out


def workload_schedule(name: str, rate: float, count: int, seed: int, prompts: Sequence[Prompt] | None = None) -> list[Arrival]:
    """The arrivals of workload `name` at (mean) `rate` requests/s: `count` requests, seeded. The same
    (name, rate, count, seed) always gives the same schedule, so every policy replays it."""
    base, is_trace = parse_workload(name)
    prompts = load_prompts(base) if prompts is None else prompts
    if count < 1:
        raise ValueError("a schedule needs at least one request")
    if rate <= 0:
        raise ValueError(f"rate must be positive (got {rate})")
    if not is_trace:
        return poisson_schedule(prompts, rate, count, seed)
    return trace_schedule_counts(prompts, trace_rates(rate), phase_counts(count, len(TRACE_SHAPE)), seed)
