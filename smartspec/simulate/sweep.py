"""A simulation sweep: every policy in every cell (one load), as rows shaped like `smartspec bench`'s.

A cell is one load (a Poisson rate, a 1:4:1 trace's mean rate, or a closed-loop concurrency) of one world; every policy of a cell
replays the same requests and acceptance draws (synthetic, or recorded traces replayed). A row's
workload names the acceptance source: `synthetic`, or the trace set. Beside the policies, the reference `best-fixed` is the
fixed k with the lowest mean latency in the cell, in hindsight (a copy of that row, naming it), and
`clairvoyant` (oracle.py) runs like a policy; both are marked `reference: true`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from smartspec.bench.metrics import summarize
from smartspec.bench.workload import TRACE_SUFFIX, trace_rates
from smartspec.simulate.load import cell_requests
from smartspec.simulate.loop import Cell, simulate
from smartspec.simulate.world import AcceptanceSource, StepCosts

POLICIES = ("none", "fixed:1", "fixed:3", "fixed:5", "fixed:7", "uniform", "goodput", "clairvoyant")
BEST_FIXED = "best-fixed"


@dataclass(frozen=True)
class SweepConfig:
    costs: StepCosts
    acceptance: AcceptanceSource
    policies: Sequence[str] = POLICIES
    rates: Sequence[float] = ()
    concurrency: Sequence[int] = ()
    trace_rates: Sequence[float] = ()  # mean rates of the low-high-low trace
    requests: int = 1000
    seed: int = 0
    drafter: str = "prompt_lookup"
    max_batch: int = 64
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    max_tokens: int | None = None  # a cap on every output (a trace's requests too), as `smartspec bench --max-tokens`
    noise_sigma: float | None = None  # None: the profile's
    profile_scale: float = 1.0  # the startup profile times this: a stale cached profile
    max_step_tokens: int | None = None  # the router's --max-step-tokens (None: the profile's)
    loads: list[tuple[str, float]] = field(init=False)

    def __post_init__(self) -> None:
        loads = [("rate", float(r)) for r in self.rates] + [("trace", float(r)) for r in self.trace_rates]
        object.__setattr__(self, "loads", loads + [("concurrency", int(c)) for c in self.concurrency])


def cell_of(config: SweepConfig, kind: str, load: float) -> Cell:
    rate = None if kind == "concurrency" else load
    requests = cell_requests(
        config.requests, config.seed, rate, config.prompt_tokens, config.output_tokens, trace=kind == "trace", lengths=config.acceptance.lengths(),
        max_tokens=config.max_tokens,
    )
    return Cell(
        costs=config.costs, acceptance=config.acceptance, requests=tuple(requests), drafter=config.drafter,
        max_batch=config.max_batch, concurrency=int(load) if kind == "concurrency" else None, seed=config.seed,
        noise_sigma=config.costs.noise_sigma if config.noise_sigma is None else config.noise_sigma, profile_scale=config.profile_scale,
        max_step_tokens=config.max_step_tokens,
    )


def run_sweep(config: SweepConfig, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Every policy in every cell, then the cell's references; `on_row` sees each row as it is made."""
    rows: list[dict] = []
    for kind, load in config.loads:
        cell = cell_of(config, kind, load)
        cell_rows = []
        for policy in config.policies:
            records, stats = simulate(cell, policy)
            row = {**key_of(config, policy, kind, load), **summarize(records, stats), "reference": policy == "clairvoyant"}
            cell_rows.append(row)
            if on_row:
                on_row(row)
        best = best_fixed(cell_rows)
        if best is not None:
            cell_rows.append(best)
            if on_row:
                on_row(best)
        rows.extend(cell_rows)
    return rows


def key_of(config: SweepConfig, policy: str, kind: str, load: float) -> dict:
    return {
        "workload": config.acceptance.name + (TRACE_SUFFIX if kind == "trace" else ""), "drafter": config.drafter, "policy": policy,
        "rate": None if kind == "concurrency" else load, "concurrency": int(load) if kind == "concurrency" else None,
        "trace": kind == "trace", "phase_rates": trace_rates(load) if kind == "trace" else None,
        "controlled": False, "cost_profile": config.costs.name, **config.acceptance.labels(), "max_batch": config.max_batch, "seed": config.seed,
    }


def best_fixed(cell_rows: Sequence[dict]) -> dict | None:
    """The fixed-k row with the lowest mean latency, relabelled `best-fixed` (None without fixed rows)."""
    fixed = [r for r in cell_rows if r["policy"].startswith("fixed:") and r["mean_latency_s"] is not None]
    if not fixed:
        return None
    best = min(fixed, key=lambda r: r["mean_latency_s"])
    return {**best, "policy": BEST_FIXED, "best_fixed_policy": best["policy"], "reference": True}
