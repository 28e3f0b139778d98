"""The committed simulator sweep: every policy over workloads x loads x cost profiles, and its headline.

    python bench/simulate_sweep.py [--requests 1000] [--jobs 2] [--out bench/results/simulate]
    python bench/simulate_sweep.py --report-only          # rebuild the headline from saved runs
    python bench/simulate_sweep.py --profiles cpu-smollm2  # rerun one profile's runs (after re-measuring it)

One `smartspec simulate` per (cost profile, workload), in parallel up to --jobs (the simulator runs on a
virtual clock, so sharing cores changes how long it takes, never what it reports). Workloads: the
recorded copy and chat traces replayed, and synthetic acceptance of mean 0.3, 0.6 and 0.9 (the CLI's
defaults otherwise: std 0.15, position decay 0.95, phases of 32 tokens). Loads: closed-loop concurrency
1, 16, 64 on the CPU profile (its table is measured up to batch 32) and 1, 16, 64, 256 on the GPU one.
Each run's bench-shaped outputs go under OUT/PROFILE/WORKLOAD/; the headline over all of them (goodput
against the best other policy, clairvoyant and none, per cell, with the worst cell and the geometric
mean) goes to OUT/headline.json and OUT/headline.md.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = {"copy": ["--workload", "copy"], "chat": ["--workload", "chat"]} | {
    f"synthetic-{mean}": ["--workload", "synthetic", "--acceptance-mean", mean] for mean in ("0.3", "0.6", "0.9")
}
PROFILES = {"cpu-smollm2": ["1", "16", "64"], "gpu-analytic-llama3-8b-h100": ["1", "16", "64", "256"]}


def run_one(profile: str, workload: str, out: Path, requests: int) -> float:
    """One `smartspec simulate` run; returns its wall seconds."""
    started = time.monotonic()
    loads = PROFILES[profile]
    command = [sys.executable, "-m", "smartspec.cli", "simulate", "--cost-profile", profile, *WORKLOADS[workload],
               "--concurrency", *loads, "--max-batch", str(max(64, *map(int, loads))), "--requests", str(requests),
               "--out", str(out / profile / workload)]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    print(f"{profile} {workload}: {time.monotonic() - started:.0f} s", flush=True)
    return time.monotonic() - started


def collect(out: Path) -> list[dict]:
    """Every run's headline entries, labelled with its profile and workload."""
    cells = []
    for profile in PROFILES:
        for workload in WORKLOADS:
            path = out / profile / workload / "headline.json"
            if path.exists():
                cells += [{"cost_profile": profile, "workload_run": workload, **entry} for entry in json.loads(path.read_text())]
    return cells


def summary(cells: list[dict]) -> dict:
    def stats(key: str) -> dict:
        values = [c[key] for c in cells if c.get(key)]
        worst = max(cells, key=lambda c: c.get(key) or 0.0)
        return {"max": max(values), "geomean": math.exp(sum(map(math.log, values)) / len(values)),
                "worst_cell": f"{worst['cost_profile']} {worst['workload_run']} concurrency {worst['rate']}"}

    return {"cells": len(cells), "vs_best_other": stats("vs_best_other"), "vs_clairvoyant": stats("vs_clairvoyant"), "vs_none": stats("vs_none")}


def markdown(cells: list[dict], totals: dict) -> str:
    """A table per profile: a row per workload, a column per load; each cell 'goodput / best other
    (that policy), / clairvoyant, / none'."""
    lines = []
    for profile, loads in PROFILES.items():
        lines += [f"**{profile}**: goodput mean latency / best other policy (which), / clairvoyant, / none", "",
                  "| workload | " + " | ".join(f"concurrency {load}" for load in loads) + " |", "|---|" + "---|" * len(loads)]
        for workload in WORKLOADS:
            row = {int(c["rate"]): c for c in cells if c["cost_profile"] == profile and c["workload_run"] == workload}
            shown = [f"{row[int(load)]['vs_best_other']:.3f} ({row[int(load)]['best_other_policy']}), {row[int(load)]['vs_clairvoyant']:.3f}, "
                     f"{row[int(load)]['vs_none']:.3f}" if int(load) in row else "-" for load in loads]
            lines.append(f"| {workload} | " + " | ".join(shown) + " |")
        lines.append("")
    for key, label in (("vs_best_other", "best other"), ("vs_clairvoyant", "clairvoyant"), ("vs_none", "none")):
        s = totals[key]
        lines.append(f"- goodput / {label}: worst cell {s['max']:.3f} ({s['worst_cell']}), geometric mean {s['geomean']:.3f} over {totals['cells']} cells")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="requests per cell")
    parser.add_argument("--jobs", type=int, default=2, help="simulations at once")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/simulate")
    parser.add_argument("--profiles", nargs="+", choices=list(PROFILES), default=list(PROFILES), help="rerun these profiles' runs only")
    parser.add_argument("--report-only", action="store_true", help="run nothing: rebuild the headline from --out")
    args = parser.parse_args()
    started = time.monotonic()
    if not args.report_only:
        runs = [(profile, workload) for profile in args.profiles for workload in WORKLOADS]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda run: run_one(*run, args.out, args.requests), runs))
    cells = collect(args.out)
    if not cells:
        raise SystemExit(f"no simulation runs under {args.out}: run without --report-only first")
    totals = summary(cells)
    totals["elapsed_s"] = round(time.monotonic() - started, 1)
    totals["run_elapsed_s"] = {  # per run, from its meta.json
        f"{workload}@{profile}": json.loads(meta.read_text()).get("elapsed_s")
        for profile in PROFILES for workload in WORKLOADS if (meta := args.out / profile / workload / "meta.json").exists()
    }
    totals["requests_per_cell"] = args.requests
    (args.out / "headline.json").write_text(json.dumps({**totals, "entries": cells}, indent=1) + "\n")
    text = markdown(cells, totals)
    (args.out / "headline.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
