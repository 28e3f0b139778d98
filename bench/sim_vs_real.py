"""The simulator checked against the real stack: the same policies, prompts, loads and seeds, measured
by `smartspec bench` and predicted by `smartspec simulate`.

    python bench/sim_vs_real.py [--concurrency 1 4 8] [--requests 6] [--seeds 0 1 2]
                                [--policies none fixed:3 goodput] [--out bench/results/sim_vs_real]
    python bench/sim_vs_real.py --report-only
    python bench/sim_vs_real.py --sim-only --cost-profile PROFILE.json    # a world measured on this machine today

The simulator's parameters come only from a CPU cost profile (`cpu-smollm2` unless --cost-profile names
another, measured by bench/step_table.py) and the shipped copy and chat traces (`smartspec bench --record-traces`), never from the latencies compared
here. Real runs start the stack on the embedded model (prompt lookup); run this alone on the machine
the profile was measured on, pinned like it (`taskset -c 0`). The report lists, per workload, load and
policy, the real and simulated mean latency (mean over seeds) and their ratio, and, for every pair of
policies of a cell whose real intervals (95%, t over seeds) do not overlap, whether the simulator orders
them the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from itertools import combinations
from pathlib import Path

from scipy import stats

from smartspec.commands.bench import FULL

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ("copy", "chat")
DRAFTER = "prompt_lookup"
MAX_BATCH = 16  # `smartspec bench`'s router default: the simulator is given the same
MAX_TOKENS = FULL["max_tokens"]  # `smartspec bench`'s output cap, given to both


def smartspec(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "smartspec.cli", *args], check=True, cwd=ROOT)


def run_real(args: argparse.Namespace) -> None:
    smartspec("bench", "--workloads", *WORKLOADS, "--drafters", DRAFTER, "--policies", *args.policies, "--concurrency", *map(str, args.concurrency),
              "--requests", str(args.requests), "--seeds", *map(str, args.seeds), "--max-batch", str(MAX_BATCH), "--max-tokens", str(MAX_TOKENS),
              "--out", str(args.out / "real"))


def run_sim(args: argparse.Namespace) -> None:
    for workload in WORKLOADS:
        for seed in args.seeds:
            smartspec("simulate", "--cost-profile", args.cost_profile, "--workload", workload, "--drafter", DRAFTER, "--policies", *args.policies, "--concurrency", *map(str, args.concurrency),
                      "--requests", str(args.requests), "--seed", str(seed), "--max-batch", str(MAX_BATCH), "--max-tokens", str(MAX_TOKENS),
                      "--out", str(args.out / "sim" / f"{workload}-{seed}"))


def interval(values: list[float]) -> tuple[float, float]:
    """95% t-interval of the mean (a point with one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


def compare(args: argparse.Namespace) -> dict:
    real: dict[tuple, list[float]] = {}
    for row in json.loads((args.out / "real" / "results.json").read_text()):
        if row.get("concurrency") is not None and not row.get("failed"):
            real.setdefault((row["workload"], row["concurrency"], row["policy"]), []).append(row["mean_latency_s"])
    sim: dict[tuple, list[float]] = {}
    for workload in WORKLOADS:
        for seed in args.seeds:
            for row in json.loads((args.out / "sim" / f"{workload}-{seed}" / "results.json").read_text()):
                if not row.get("reference"):
                    sim.setdefault((workload, row["concurrency"], row["policy"]), []).append(row["mean_latency_s"])
    rows = []
    for key in sorted(real):
        if key in sim:
            low, high = interval(real[key])
            rows.append({"workload": key[0], "concurrency": key[1], "policy": key[2], "real_s": statistics.fmean(real[key]), "real_low_s": low,
                         "real_high_s": high, "sim_s": statistics.fmean(sim[key]), "sim_over_real": statistics.fmean(sim[key]) / statistics.fmean(real[key])})
    orders = []
    for cell in sorted({(r["workload"], r["concurrency"]) for r in rows}):
        members = [r for r in rows if (r["workload"], r["concurrency"]) == cell]
        for a, b in combinations(members, 2):
            if a["real_high_s"] < b["real_low_s"] or b["real_high_s"] < a["real_low_s"]:  # the real intervals do not overlap
                orders.append({"workload": cell[0], "concurrency": cell[1], "pair": [a["policy"], b["policy"]],
                               "same_order": (a["real_s"] < b["real_s"]) == (a["sim_s"] < b["sim_s"])})
    errors = [abs(r["sim_over_real"] - 1) for r in rows]
    return {"rows": rows, "orders": orders, "max_error": max(errors, default=None), "mean_error": statistics.fmean(errors) if errors else None,
            "within_15_percent": sum(e <= 0.15 for e in errors), "compared": len(rows), "seeds": args.seeds}


def report(result: dict) -> str:
    lines = ["| workload | concurrency | policy | real mean s (95% interval) | simulated mean s | sim / real |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['workload']} | {r['concurrency']} | {r['policy']} | {r['real_s']:.2f} ({r['real_low_s']:.2f}-{r['real_high_s']:.2f}) | "
                     f"{r['sim_s']:.2f} | {r['sim_over_real']:.2f} |")
    same = sum(o["same_order"] for o in result["orders"])
    lines += ["", f"- within 15%: {result['within_15_percent']} of {result['compared']} (mean error {result['mean_error']:.1%}, worst {result['max_error']:.1%})",
              f"- pairs of policies whose real intervals do not overlap: {len(result['orders'])}, ordered the same by the simulator: {same}"]
    lines += [f"  - {o['workload']} concurrency {o['concurrency']}: {o['pair'][0]} vs {o['pair'][1]}" for o in result["orders"] if not o["same_order"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--policies", nargs="+", default=["none", "fixed:3", "goodput"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/sim_vs_real")
    parser.add_argument("--report-only", action="store_true", help="run nothing: compare the saved runs under --out")
    parser.add_argument("--sim-only", action="store_true", help="rerun the simulations only, against the saved real runs")
    parser.add_argument("--cost-profile", default="cpu-smollm2",
                        help="the simulator's world (a profile name or file): measure one with bench/step_table.py on the machine the real runs use")
    args = parser.parse_args()
    if not args.report_only:
        if not args.sim_only:
            run_real(args)
        run_sim(args)
    if not (args.out / "real" / "results.json").exists():
        raise SystemExit(f"no real runs under {args.out}: run without --report-only / --sim-only first")
    result = compare(args)
    (args.out / "comparison.json").write_text(json.dumps(result, indent=1) + "\n")
    text = report(result)
    (args.out / "comparison.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
