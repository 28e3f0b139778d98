"""What arrives: each request's prompt and output lengths, and when it arrives.

Lengths come from the shipped prompt sets (``smartspec/bench/prompts.json``, chat and copy; their
``max_tokens`` is the output length, and the prompt's length in tokens is estimated from its text) unless
``--prompt-tokens`` / ``--output-tokens`` fix them; a replayed trace gives its own requests' lengths. Poisson arrivals and the 1:4:1 trace reuse the
benchmark's seeded schedules; closed-loop arrivals are made by the step loop (each completion sends the next request).
Either way they depend only on the seed and the load, never on the policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from smartspec.bench.workload import (
    TRACE_SHAPE, Prompt, closed_loop_schedule, load_prompts, phase_counts, poisson_schedule, trace_rates, trace_schedule_counts,
)

PROMPT_SETS = ("chat", "copy")
# Prompt length estimate: English text is about 4 characters per token, and the chat template adds
# about 30 tokens (system prompt and role markers).
CHARS_PER_TOKEN = 4.0
TEMPLATE_TOKENS = 30


@dataclass(frozen=True)
class RequestSpec:
    """One request of a cell: its place in the schedule, lengths and (Poisson) arrival time."""

    index: int
    prompt_index: int
    prompt_tokens: int
    output_tokens: int
    arrival_s: float | None = None  # None: closed loop (sent when a slot frees up)


def prompt_tokens(prompt: Prompt) -> int:
    return TEMPLATE_TOKENS + round(sum(len(text) for _, text in prompt.messages) / CHARS_PER_TOKEN)


def shipped_prompts() -> list[Prompt]:
    return [p for name in PROMPT_SETS for p in load_prompts(name)]


def shipped_lengths() -> list[tuple[int, int]]:
    """(prompt, output) tokens of each shipped prompt."""
    return [(prompt_tokens(p), p.max_tokens) for p in shipped_prompts()]


def schedule(count: int, seed: int, rate: float | None, trace: bool, choices: int) -> list[tuple[float | None, int]]:
    """Per request: its arrival time (None in a closed loop) and which of `choices` prompts it sends,
    by the benchmark's seeded schedules (prompts in turn from (seed + request index))."""
    prompts = [Prompt((), 0)] * choices  # stand-ins: the schedules only count the prompts
    if trace:
        arrivals = trace_schedule_counts(prompts, trace_rates(rate), phase_counts(count, len(TRACE_SHAPE)), seed)
    elif rate is not None:
        arrivals = poisson_schedule(prompts, rate, count, seed)
    else:
        return [(None, a.index) for a in closed_loop_schedule(prompts, count, seed)]
    return [(a.at_s, a.index) for a in arrivals]


def cell_requests(
    count: int, seed: int, rate: float | None = None, prompt_len: int | None = None, output_len: int | None = None, trace: bool = False,
    lengths: list[tuple[int, int]] | None = None, max_tokens: int | None = None,
) -> list[RequestSpec]:
    """`count` requests: Poisson at `rate` requests/s (with `trace`: the benchmark's low-high-low phases
    of mean rate `rate`), or closed loop when `rate` is None. `lengths`: (prompt, output) tokens of the
    prompts to take in turn (default: the shipped prompts'); `prompt_index` is the position in it;
    `max_tokens` caps every output, as `smartspec bench --max-tokens` does."""
    lengths = shipped_lengths() if lengths is None else lengths
    return [
        RequestSpec(index=i, prompt_index=index, prompt_tokens=prompt_len or lengths[index][0], output_tokens=min(output_len or lengths[index][1], max_tokens or math.inf), arrival_s=at)
        for i, (at, index) in enumerate(schedule(count, seed, rate, trace, len(lengths)))
    ]
