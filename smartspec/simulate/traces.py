"""Acceptance replayed from recorded traces (`smartspec bench --record-traces`; format in smartspec/bench/traces.py).

A simulated request replays one recorded request: its prompt and output lengths, and per output position
p the recorded proposal and accepted lengths of its drafter's k_max proposal. Asked for k drafts at p, the
drafter proposes min(k, proposed[p]) (none where it had none) and min(k, accepted[p]) are accepted,
exactly what the live greedy drafter and verifier would have done, whatever the policy. Which recorded
request a simulated one replays follows the benchmark's schedule (prompts in turn from seed + request
index), cycling when the cell has more requests than the trace.

Shipped traces (``recorded/<name>.jsonl``) were recorded on the embedded SmolLM2 pair with every
shipped prompt of the set, greedy, at the prompts' own output lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from smartspec.bench.traces import TraceSet, parse_traces, read_traces
from smartspec.simulate.load import RequestSpec

SHIPPED = "recorded"


def trace_names() -> list[str]:
    """The shipped trace sets."""
    folder = resources.files("smartspec.simulate").joinpath(SHIPPED)
    return sorted(p.name.removesuffix(".jsonl") for p in folder.iterdir() if p.name.endswith(".jsonl"))


def load_traces(name_or_file: str) -> TraceSet:
    """A shipped trace set by name ('copy', 'chat'), or a trace file."""
    if name_or_file in trace_names():
        text = resources.files("smartspec.simulate").joinpath(SHIPPED).joinpath(f"{name_or_file}.jsonl").read_text()
        return parse_traces(text.splitlines(), f"shipped trace {name_or_file}")
    path = Path(name_or_file)
    if path.suffix == ".jsonl" or path.exists():
        return read_traces(path)
    raise ValueError(f"unknown workload {name_or_file!r}: synthetic, a shipped trace ({', '.join(trace_names())}) or a trace file (.jsonl)")


class TraceTruth:
    """One recorded request's acceptance with one drafter: certain, position by position."""

    def __init__(self, proposed: Sequence[int], accepted: Sequence[int]) -> None:
        self.proposed = proposed  # [output positions]: tokens the drafter proposes when asked for k_max (0: none)
        self.landed = accepted  # [output positions]: leading proposed tokens the target agrees with
        self.base = sum(a > 0 for a in accepted) / len(accepted) if accepted else 0.0  # share of positions whose first draft lands

    def proposal(self, generated: int, asked: int) -> int:
        return min(asked, self.proposed[generated]) if generated < len(self.proposed) else 0

    def accepted(self, generated: int, k: int) -> int:
        return min(k, self.landed[generated]) if generated < len(self.landed) else 0

    def gains(self, generated: int, k: int) -> tuple[float, ...]:
        """1 for each draft the target will accept, 0 after it: a certain gain curve."""
        landed = self.accepted(generated, k)
        return tuple(1.0 if j <= landed else 0.0 for j in range(1, k + 1))


@dataclass(frozen=True)
class TraceAcceptance:
    """A cell's acceptance from a trace set: request i of the schedule replays recorded request
    spec.prompt_index (lengths() puts the recorded requests in the schedule's place of the prompts)."""

    traces: TraceSet
    source: str  # the name or file it came from

    @classmethod
    def load(cls, name_or_file: str) -> "TraceAcceptance":
        return cls(load_traces(name_or_file), name_or_file)

    @property
    def name(self) -> str:
        return Path(self.source).stem  # 'copy' for the shipped copy set, 'mine' for mine.jsonl

    def truth(self, seed: int, spec: RequestSpec, drafter: str) -> TraceTruth:
        request = self.traces.requests[spec.prompt_index]
        return TraceTruth(request.proposed[drafter], request.accepted[drafter])

    def lengths(self) -> list[tuple[int, int]]:
        return [(len(r.prompt_token_ids), len(r.output_token_ids)) for r in self.traces.requests]

    def labels(self) -> dict[str, Any]:
        return {
            "acceptance_mean": None, "acceptance_std": None, "position_decay": None, "phase_tokens": None, "proposal_rate": None,
            "acceptance_trace": self.source,
        }
