"""The simulation's report: `smartspec bench`'s table and plot (closed-loop rows in its `shown` view),
and a headline with the reference columns."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from smartspec.bench.metrics import headline
from smartspec.bench.report import CLOSED_LOOP, check_rows, plot, shown, table, write_json
from smartspec.simulate.oracle import NAME as CLAIRVOYANT
from smartspec.simulate.sweep import BEST_FIXED

def headline_entries(rows: Sequence[Mapping]) -> list[dict]:
    """Per cell: goodput / the best other policy (references left out), / none, / best-fixed and
    / clairvoyant (null where that reference was not run)."""
    view = shown(rows)
    entries = headline([r for r in view if not r.get("reference")])
    references = {(r["workload"], r["drafter"], r["rate"], r["policy"]): r for r in view if r.get("reference")}
    for entry in entries:
        cell = (entry["workload"], entry["drafter"], entry["rate"])
        ours = entry["mean_latency_s"]
        for name, key in ((BEST_FIXED, "vs_best_fixed"), (CLAIRVOYANT, "vs_clairvoyant")):
            ref = references.get((*cell, name))
            entry[key] = ours / ref["mean_latency_s"] if ours and ref and ref["mean_latency_s"] else None
        best = references.get((*cell, BEST_FIXED))
        entry["best_fixed_policy"] = best["best_fixed_policy"] if best else None
    return entries


def headline_lines(entries: Sequence[Mapping]) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = ["Headline: goodput mean latency / best other policy's, / best fixed k's (in hindsight), / clairvoyant's, / none's (below 1.0 = goodput is faster)"]
    for e in entries:
        load = f"concurrency={e['rate']:g}" if e["workload"].endswith(CLOSED_LOOP) else f"rate={e['rate']:g}/s"
        lines.append(
            f"  {e['workload'].removesuffix(CLOSED_LOOP)} / {e['drafter']} {load}: vs best other {fmt(e['vs_best_other'])} ({e['best_other_policy'] or '-'}), "
            f"vs best-fixed {fmt(e['vs_best_fixed'])} ({e['best_fixed_policy'] or '-'}), vs clairvoyant {fmt(e['vs_clairvoyant'])}, vs none {fmt(e['vs_none'])}"
        )
    return "\n".join(lines)


def write_outputs(rows: Sequence[Mapping], out: Path, meta: dict) -> str:
    """results.json, headline.json, report.txt, latency_vs_load.png and meta.json under `out`; returns the report text."""
    view = shown(rows)
    check_rows(view)
    write_json(out / "results.json", list(rows))
    entries = headline_entries(rows)
    write_json(out / "headline.json", entries)
    text = table(view) + "\n(closed-loop groups: the rate column is the concurrency)\n\n" + headline_lines(entries) + "\n"
    (out / "report.txt").write_text(text)
    plot(view, out / "latency_vs_load.png")
    write_json(out / "meta.json", meta)
    return text
