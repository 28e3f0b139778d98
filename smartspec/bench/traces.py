"""Acceptance traces: what each drafter would have had accepted at every output position of a greedy request.

`smartspec bench --record-traces` writes them and `smartspec simulate --workload FILE` replays them. A
trace file is JSON lines: a header, then one line per request (token ids only):

    {"format": "smartspec-acceptance-trace/1", "workload": "copy", "k_max": 8, "drafters": [...], ...}
    {"prompt_index": 0, "prompt_token_ids": [...], "output_token_ids": [...],
     "proposed": {"prompt_lookup": [...], ...}, "accepted": {"prompt_lookup": [...], ...}}

Per drafter and output position p (one entry per output token): `proposed[p]` is how many tokens the
drafter proposed when asked for k_max with context prompt + output[:p] (0: it had no proposal), and
`accepted[p]` the length of the common prefix of that proposal and output[p:p + k_max]. A greedy
drafter's proposal of k tokens is the first k of its k_max proposal, so for any k <= k_max it proposes
min(k, proposed[p]) tokens and min(k, accepted[p]) of them are accepted: the trace answers for any policy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from smartspec.protocol import common_prefix_length

FORMAT = "smartspec-acceptance-trace/1"
# Drafters whose proposals are chains, so that a prefix of the proposal is what a smaller k gets
# (a token tree is cut best-first, not by depth; a controlled drafter's acceptance is synthetic anyway).
CHAIN_DRAFTERS = ("prompt_lookup", "draft_model")


def accepted_prefix(proposal: Sequence[int], output: Sequence[int], position: int, k_max: int) -> int:
    """How many of the first k_max proposed tokens a greedy verifier accepts at output `position`."""
    return common_prefix_length(proposal[:k_max], output[position : position + k_max])


@dataclass(frozen=True)
class RequestTrace:
    """One greedy request: its tokens, and per drafter its proposal and accepted lengths by output position."""

    prompt_index: int  # position in its prompt set (the benchmark's schedules pick prompts by it)
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    proposed: Mapping[str, tuple[int, ...]]  # drafter -> [output positions]: tokens proposed when asked for k_max
    accepted: Mapping[str, tuple[int, ...]]  # drafter -> [output positions]: leading proposed tokens the target agrees with

    def check(self, k_max: int, drafters: Sequence[str]) -> None:
        """Raises ValueError when the arrays cannot be a trace of these tokens (a hand-edited or truncated file)."""
        n = len(self.output_token_ids)
        for drafter in drafters:
            proposed, accepted = self.proposed.get(drafter), self.accepted.get(drafter)
            if proposed is None or accepted is None:
                raise ValueError(f"request {self.prompt_index}: no entry for drafter {drafter!r}")
            if len(proposed) != n or len(accepted) != n:
                raise ValueError(f"request {self.prompt_index}, {drafter}: {len(proposed)} and {len(accepted)} positions for {n} output tokens")
            for p, (m, a) in enumerate(zip(proposed, accepted)):
                if not 0 <= a <= m <= k_max or a > n - p:
                    raise ValueError(f"request {self.prompt_index}, {drafter}, position {p}: accepted {a} of {m} proposed (k_max {k_max})")

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_index": self.prompt_index, "prompt_token_ids": list(self.prompt_token_ids), "output_token_ids": list(self.output_token_ids),
            "proposed": {d: list(v) for d, v in self.proposed.items()}, "accepted": {d: list(v) for d, v in self.accepted.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "RequestTrace":
        return cls(
            int(data["prompt_index"]), tuple(int(t) for t in data["prompt_token_ids"]), tuple(int(t) for t in data["output_token_ids"]),
            {d: tuple(int(x) for x in v) for d, v in data["proposed"].items()}, {d: tuple(int(x) for x in v) for d, v in data["accepted"].items()},
        )


@dataclass(frozen=True)
class TraceSet:
    """One trace file: which workload and drafters it recorded, with what k_max, and its requests."""

    workload: str  # the prompt set ('copy', 'chat')
    k_max: int
    drafters: tuple[str, ...]
    requests: tuple[RequestTrace, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)  # target and draft model names, output cap, seed

    def header(self) -> dict[str, Any]:
        return {"format": FORMAT, "workload": self.workload, "k_max": self.k_max, "drafters": list(self.drafters), **self.meta}


def write_traces(path: Path, traces: TraceSet) -> None:
    """The header line, then one compact line per request."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [traces.header(), *(r.to_json() for r in traces.requests)]
    path.write_text("".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines))


def parse_traces(lines: Iterable[str], source: str) -> TraceSet:
    """A trace file's lines; ValueError names `source` and what is wrong."""
    try:
        rows = [json.loads(line) for line in lines if line.strip()]
        if not rows or not isinstance(rows[0], dict) or rows[0].get("format") != FORMAT:
            raise ValueError(f"not an acceptance trace (the first line must be a header with format {FORMAT!r})")
        header, requests = rows[0], [RequestTrace.from_json(row) for row in rows[1:]]
        if not requests:
            raise ValueError("the trace holds no requests")
        k_max, drafters = int(header["k_max"]), tuple(header["drafters"])
        for request in requests:
            request.check(k_max, drafters)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{source}: {err if isinstance(err, ValueError) else f'malformed line ({type(err).__name__}: {err})'}") from None
    meta = {k: v for k, v in header.items() if k not in ("format", "workload", "k_max", "drafters")}
    return TraceSet(str(header["workload"]), k_max, drafters, tuple(requests), meta)


def read_traces(path: Path) -> TraceSet:
    return parse_traces(path.read_text().splitlines(), str(path))
