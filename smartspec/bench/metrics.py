"""Per-request records of a benchmark run and what a results row says about them.

Definitions (also in docs/bench.md); every time is client-side, in seconds from the run's start, and a
request's clock starts when it was *due* (its scheduled arrival), so time spent waiting for the
client's in-flight bound counts against the server, as it would for a real user:

- latency = done - due; TTFT = first token - due; TPOT = (done - first token) / (tokens - 1), for
  requests with at least two tokens.
- wall time of a run = last completion - first arrival.
- goodput (the SmartSpec paper's) = generated tokens / wall time: only tokens that are output count.
- throughput = tokens the verifier processed / wall time = (generated + rejected draft tokens) / wall:
  it also counts the wasted speculation, so goodput / throughput is the share of useful work.
- mean accepted = accepted draft tokens per verify (request-step), the target's own token excluded.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence


@dataclass
class RequestRecord:
    """What the client saw of one request of a run."""

    index: int  # position in the schedule
    prompt_index: int  # position in the prompt set
    due_s: float  # scheduled arrival
    sent_s: float | None = None  # when it was sent (later than due when the in-flight bound held it)
    first_token_s: float | None = None
    done_s: float | None = None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    # GenerationStats of the final message
    steps: int = 0
    proposed: int = 0
    accepted: int = 0
    error: str | None = None  # 'STATUS: message' when the call failed
    prompt_tokens: int | None = None  # the router's count of the tokenized prompt

    @property
    def ok(self) -> bool:
        return self.error is None and self.done_s is not None

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    @property
    def latency_s(self) -> float:
        return self.done_s - self.due_s

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.due_s

    @property
    def tpot_s(self) -> float | None:
        if self.tokens < 2 or self.first_token_s is None or self.done_s is None:
            return None
        return (self.done_s - self.first_token_s) / (self.tokens - 1)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default); None when empty."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def k_distribution(histogram: Sequence[int]) -> dict[str, float]:
    """Entry k of a histogram of request-steps -> {'k': share}, zero entries left out."""
    total = sum(histogram)
    return {str(k): count / total for k, count in enumerate(histogram) if count} if total else {}


def summarize(records: Sequence[RequestRecord], stats: Mapping | None = None) -> dict:
    """The metrics of one run, from its per-request records and the router's Stats read after it
    (None when the router has no Stats: those columns are then null)."""
    done = [r for r in records if r.ok]
    errors = Counter(r.error for r in records if not r.ok)
    latencies = [r.latency_s for r in done]
    ttfts = [r.ttft_s for r in done if r.ttft_s is not None]
    tpots = [r.tpot_s for r in done if r.tpot_s is not None]
    generated = sum(r.tokens for r in done)
    steps = sum(r.steps for r in done)
    proposed = sum(r.proposed for r in done)
    accepted = sum(r.accepted for r in done)
    if done:
        wall = max(r.done_s for r in done) - min(r.due_s for r in records)
    else:
        wall = None
    rate = (lambda n: n / wall if wall else None)
    row = {
        "requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": dict(errors),
        "mean_latency_s": mean(latencies),
        "p50_latency_s": percentile(latencies, 50),
        "p99_latency_s": percentile(latencies, 99),
        "ttft_s": mean(ttfts),
        "p99_ttft_s": percentile(ttfts, 99),
        "tpot_s": mean(tpots),
        "wall_s": wall,
        "generated_tokens": generated,
        "goodput_tok_s": rate(generated),
        "throughput_tok_s": rate(generated + proposed - accepted),
        "request_throughput_s": rate(len(done)),
        "mean_accepted": accepted / steps if steps else 0.0,
        "acceptance_rate": accepted / proposed if proposed else None,
        "mean_k": proposed / steps if steps else 0.0,
        "verify_steps": steps,
        "proposed": proposed,
        "accepted": accepted,
    }
    histogram = list(stats.get("k_histogram", [])) if stats else []
    row.update(
        k_histogram=histogram if stats else None,
        k_distribution=k_distribution(histogram) if stats else None,
        cost_model_mape=stats.get("step_time_mape") if stats else None,
        mean_batch_size=stats.get("mean_batch_size") if stats else None,
        router_steps=stats.get("steps") if stats else None,
    )
    return row


CONFIDENCE = 0.95  # of the intervals on latency ratios


def paired_ratio(numerator: Mapping[int, float | None], denominator: Mapping[int, float | None], confidence: float = CONFIDENCE) -> dict | None:
    """Over the seeds where both sides have a latency: the geometric mean of numerator / denominator, and
    a `confidence` t-interval on the mean log ratio mapped back (pairing by seed removes what the seeds
    share: prompts, arrivals, controlled draws). With one seed the interval is null; None when no seed
    has both sides."""
    logs = [math.log(numerator[s] / denominator[s]) for s in sorted(numerator) if numerator[s] and denominator.get(s)]
    if not logs:
        return None
    n, centre = len(logs), sum(logs) / len(logs)
    low = high = None
    if n > 1:
        from scipy.stats import t

        half = t.ppf(0.5 + confidence / 2, n - 1) * math.sqrt(sum((x - centre) ** 2 for x in logs) / (n - 1) / n)
        low, high = math.exp(centre - half), math.exp(centre + half)
    return {"ratio": math.exp(centre), "low": low, "high": high, "seeds": n}


def inverse(ratio: Mapping | None) -> dict | None:
    """b / a from a / b (the interval's ends swap)."""
    if ratio is None:
        return None
    flip = lambda v: None if v is None else 1.0 / v  # noqa: E731
    return {"ratio": 1.0 / ratio["ratio"], "low": flip(ratio["high"]), "high": flip(ratio["low"]), "seeds": ratio["seeds"]}


def above_one(ratio: Mapping | None) -> bool:
    """Significantly above 1: the interval's lower end is (a single seed never is)."""
    return bool(ratio and ratio["low"] is not None and ratio["low"] > 1.0)


def headline(rows: Sequence[Mapping], policy: str = "goodput", baseline: str = "none") -> list[dict]:
    """Per cell (workload, drafter, rate or concurrency), paired by seed: every other policy's mean
    latency / `policy`'s (`ratios`, each a geometric mean over seeds with its interval), `policy`'s
    / the best other's (the lowest such ratio) and / `baseline`'s (below 1.0: `policy` is faster), and
    each fixed k / `baseline` (`fixed_vs_none`), with `slower_than_none` naming the fixed ks whose
    interval is above 1. A run that lost requests is left out of every ratio."""
    cells: dict[tuple, dict[str, dict[int, float | None]]] = {}
    controlled: dict[tuple, bool] = {}
    for row in rows:
        cell = (row["workload"], row["drafter"], row.get("rate"), row.get("concurrency"))
        cells.setdefault(cell, {}).setdefault(row["policy"], {})[row.get("seed", 0)] = _latency(row)
        controlled[cell] = controlled.get(cell, False) or bool(row.get("controlled"))
    out = []
    for cell, by_policy in cells.items():
        workload, drafter, rate, concurrency = cell
        ours = by_policy.get(policy, {})
        ratios = {name: paired_ratio(latencies, ours) for name, latencies in by_policy.items() if name != policy}
        ratios = {name: r for name, r in ratios.items() if r is not None}
        best = min(ratios, key=lambda name: ratios[name]["ratio"]) if ratios else None
        base = by_policy.get(baseline, {})
        fixed = {name: paired_ratio(latencies, base) for name, latencies in by_policy.items() if name.startswith("fixed:")}
        fixed = {name: r for name, r in fixed.items() if r is not None}
        vs_best, vs_base = inverse(ratios.get(best)), inverse(ratios.get(baseline))
        out.append({
            "workload": workload,
            "drafter": drafter,
            "rate": rate,
            "concurrency": concurrency,
            "controlled": controlled[cell],
            "policy": policy,
            "seeds": sum(1 for v in ours.values() if v is not None),
            "mean_latency_s": mean(v for v in ours.values() if v is not None),
            "best_other_policy": best,
            "best_other_latency_s": mean(v for v in by_policy[best].values() if v is not None) if best else None,
            "vs_best_other": vs_best["ratio"] if vs_best else None,
            "vs_best_other_low": vs_best["low"] if vs_best else None,
            "vs_best_other_high": vs_best["high"] if vs_best else None,
            f"vs_{baseline}": vs_base["ratio"] if vs_base else None,
            f"vs_{baseline}_low": vs_base["low"] if vs_base else None,
            f"vs_{baseline}_high": vs_base["high"] if vs_base else None,
            "ratios": ratios,
            f"fixed_vs_{baseline}": fixed,
            f"slower_than_{baseline}": [name for name, r in fixed.items() if above_one(r)],
        })
    return out


def _latency(row: Mapping | None) -> float | None:
    """A row's mean latency, or None when it is missing or lost requests (not comparable)."""
    if not row or row.get("failed") or row.get("mean_latency_s") is None:
        return None
    return row["mean_latency_s"]
