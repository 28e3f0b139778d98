"""`smartspec simulate`: the router's step loop on a virtual clock, every policy on the same simulated
world (no model, no services; seconds per cell), its acceptance synthetic or replayed from recorded
traces. See docs/bench.md ("smartspec simulate").

It writes, under --out: results.json (one row per load and policy, as `smartspec bench`'s), headline.json,
report.txt (also printed), latency_vs_load.png and meta.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from smartspec.config import add_flag

MAX_LOAD = 256  # most concurrent requests and batch size simulated
DEFAULT_CONCURRENCY = (1, 16, 64)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--out", default="simulate-results", help="folder for results.json, headline.json, report.txt, latency_vs_load.png, meta.json")
    add_flag(parser, "--cost-profile", default="cpu-smollm2",
             help="the world's step costs: a shipped profile (cpu-smollm2, gpu-analytic-llama3-8b-h100) or a profile JSON file")
    add_flag(parser, "--workload", default="synthetic", metavar="W",
             help="where acceptance and lengths come from: synthetic (drawn per request, the --acceptance-* flags below), copy or chat "
                  "(shipped traces recorded on the embedded SmolLM2 pair), or a FILE.jsonl that `smartspec bench --record-traces` wrote")
    add_flag(parser, "--acceptance-mean", type=float, default=0.7, help="synthetic: mean of the Beta each request's acceptance rate is drawn from")
    add_flag(parser, "--acceptance-std", type=float, default=0.15, help="synthetic: standard deviation of that Beta (0: every request the mean)")
    add_flag(parser, "--position-decay", type=float, default=0.95,
             help="synthetic: the j-th draft of a verify is accepted with the request's rate times this^(j-1) (1: no decay)")
    add_flag(parser, "--phases", type=float, default=32.0,
             help="synthetic: mean length in output tokens of a request's on / off phases (off: a fifth of its rate); 0: one phase")
    add_flag(parser, "--proposal-rate", type=float, default=1.0,
             help="synthetic: chance that the drafter has a proposal at a step (prompt lookup finds no match otherwise)")
    add_flag(parser, "--rates", nargs="+", default=None, metavar="R", help="Poisson arrival rates, requests/s")
    add_flag(parser, "--trace-rates", nargs="+", default=None, metavar="R",
             help="mean rates of a time-varying load: three phases of equal arrivals at rates 1 : 4 : 1 (workload <workload>-trace)")
    add_flag(parser, "--concurrency", nargs="+", default=None, metavar="N",
             help=f"closed-loop levels: N requests always in the system, 1 to {MAX_LOAD} (default {' '.join(map(str, DEFAULT_CONCURRENCY))} when no rate is given)")
    add_flag(parser, "--policies", nargs="+", default=None, metavar="P",
             help="none, fixed:K, uniform, goodput, and the reference clairvoyant (default: all of these with K = 1, 3, 5, 7); "
                  "the reference best-fixed is added whenever fixed ks run")
    add_flag(parser, "--requests", type=int, default=1000, help="requests per cell (load)")
    add_flag(parser, "--seed", type=int, default=0, help="seed of arrivals, lengths, acceptance and step-time noise")
    add_flag(parser, "--drafter", default="prompt_lookup",
             help="the drafter every request uses; its cost comes from the profile (a trace workload: one of the drafters it recorded)")
    add_flag(parser, "--max-batch", type=int, default=64, help=f"most requests in the running batch (1 to {MAX_LOAD})")
    add_flag(parser, "--prompt-tokens", type=int, default=None, help="synthetic: every prompt's length in tokens (default: the shipped prompts')")
    add_flag(parser, "--output-tokens", type=int, default=None,
             help="synthetic: every output's length in tokens (default: the shipped prompts' max_tokens; a trace's requests keep their own)")
    add_flag(parser, "--max-tokens", type=int, default=None,
             help="cap on every output's length, a trace's requests too (as smartspec bench --max-tokens; default: none)")
    add_flag(parser, "--noise-sigma", type=float, default=None, help="sigma of the lognormal step-time noise (default: the profile's)")
    add_flag(parser, "--max-step-tokens", type=int, default=None,
             help="the router's step token budget: prompts are prefilled in chunks beside the decoding requests (default: the profile's)")
    add_flag(parser, "--profile-scale", type=float, default=1.0,
             help="the router's startup cost profile times this (e.g. 2: a cached profile measured on a busy machine)")


def build_config(args: argparse.Namespace):
    """The sweep the flags describe; ValueError names what is wrong."""
    import numpy as np

    from router.controller.controller import SpeculationController
    from smartspec.commands.bench import _numbers, _words
    from smartspec.errors import RequestError
    from smartspec.simulate.loop import make_policy
    from smartspec.simulate.sweep import POLICIES, SweepConfig
    from smartspec.simulate.traces import TraceAcceptance
    from smartspec.simulate.world import AcceptanceModel, StepCosts, load_profile

    rates = _numbers(args.rates, "--rates") or []
    traces = _numbers(args.trace_rates, "--trace-rates") or []
    concurrency = [int(c) for c in (_numbers(args.concurrency, "--concurrency") or ([] if rates or traces else DEFAULT_CONCURRENCY))]
    if any(r <= 0 for r in rates + traces):
        raise ValueError("--rates and --trace-rates must be positive")
    if any(not 1 <= c <= MAX_LOAD for c in concurrency):
        raise ValueError(f"--concurrency levels go from 1 to {MAX_LOAD}")
    if not 1 <= args.max_batch <= MAX_LOAD:
        raise ValueError(f"--max-batch goes from 1 to {MAX_LOAD}")
    if args.requests < 1:
        raise ValueError("--requests must be at least 1")
    if args.profile_scale <= 0:
        raise ValueError("--profile-scale must be positive")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError("--max-tokens must be at least 1")
    if args.max_step_tokens is not None and args.max_step_tokens < 1:
        raise ValueError("--max-step-tokens must be at least 1")
    if not 0 <= args.acceptance_mean <= 1 or args.acceptance_std < 0 or not 0 < args.position_decay <= 1 or args.phases < 0 or not 0 <= args.proposal_rate <= 1:
        raise ValueError("--acceptance-mean in 0..1, --acceptance-std >= 0, --position-decay in (0, 1], --phases >= 0, --proposal-rate in 0..1")
    costs = StepCosts(load_profile(args.cost_profile))
    if args.drafter not in costs.drafters:
        raise ValueError(f"--drafter {args.drafter}: the profile {costs.name} prices {', '.join(sorted(costs.drafters))}")
    if args.workload == "synthetic":
        acceptance = AcceptanceModel(args.acceptance_mean, args.acceptance_std, args.position_decay, args.phases, args.proposal_rate)
        acceptance.base_rate(np.random.default_rng(0))  # checks that the Beta exists
    else:
        acceptance = TraceAcceptance.load(args.workload)
        if args.prompt_tokens is not None or args.output_tokens is not None:
            raise ValueError(f"--workload {args.workload}: a trace's requests keep their own lengths (no --prompt-tokens / --output-tokens)")
        if args.drafter not in acceptance.traces.drafters:
            raise ValueError(f"--drafter {args.drafter}: the trace {args.workload} recorded {', '.join(acceptance.traces.drafters)}")
    policies = _words(args.policies) or list(POLICIES)
    for policy in policies:  # a policy the router's registry does not know fails here, not mid-sweep
        try:
            make_policy(policy, SpeculationController(), costs, {})
        except RequestError as err:
            raise ValueError(err.message) from None
    return SweepConfig(
        costs=costs, acceptance=acceptance, policies=policies, rates=rates, trace_rates=traces, concurrency=concurrency,
        requests=args.requests, seed=args.seed, drafter=args.drafter, max_batch=args.max_batch,
        prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens, noise_sigma=args.noise_sigma, profile_scale=args.profile_scale,
        max_step_tokens=args.max_step_tokens, max_tokens=args.max_tokens,
    )


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        config = build_config(args)
    except (ValueError, OSError) as err:
        print(f"smartspec simulate: {err}", file=sys.stderr)
        return 2
    from smartspec.simulate.report import write_outputs
    from smartspec.simulate.sweep import run_sweep
    from smartspec.simulate.traces import TraceAcceptance

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = len(config.loads) * len(config.policies)
    done = 0

    def progress(row: dict) -> None:
        nonlocal done
        if row.get("policy") != "best-fixed":
            done += 1
        load = f"{row['workload']} rate {row['rate']:g}/s" if row["rate"] is not None else f"concurrency {row['concurrency']}"
        print(f"[{done}/{total}] {load} {row['policy']}: mean {row['mean_latency_s']:.3f}s ({time.monotonic() - started:.0f}s)", file=sys.stderr, flush=True)

    rows = run_sweep(config, on_row=progress)
    a = config.acceptance
    meta = {
        "cost_profile": config.costs.name, "cost_profile_source": config.costs.profile.get("source"),
        "workload": args.workload, "acceptance": a.labels(), "trace": a.traces.header() if isinstance(a, TraceAcceptance) else None,
        "policies": list(config.policies), "rates": list(config.rates), "trace_rates": list(config.trace_rates), "concurrency": list(config.concurrency), "requests": config.requests,
        "seed": config.seed, "drafter": config.drafter, "max_batch": config.max_batch, "prompt_tokens": config.prompt_tokens,
        "output_tokens": config.output_tokens, "max_tokens": config.max_tokens, "noise_sigma": config.noise_sigma if config.noise_sigma is not None else config.costs.noise_sigma,
        "profile_scale": config.profile_scale, "max_step_tokens": config.max_step_tokens or config.costs.max_step_tokens, "elapsed_s": round(time.monotonic() - started, 1),
    }
    print(write_outputs(rows, out, meta), flush=True)
    print(f"smartspec simulate: {len(rows)} rows in {meta['elapsed_s']:.0f}s; wrote {out}/results.json, headline.json, report.txt, latency_vs_load.png",
          file=sys.stderr, flush=True)
    return 0
