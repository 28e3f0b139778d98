"""`smartspec bench`: every speculation policy on the same seeded workload, side by side, in one run.

It starts the stack itself (verifier, the drafter services the chosen drafters need, router; the `up`
machinery, on loopback, free ports; sized so that --max-batch requests fit) unless given `--router
HOST:PORT`, runs a reference pass (each prompt's greedy output, policy none), then for every seed,
workload, drafter and load (a Poisson rate or a closed-loop concurrency), every policy in turn on the
same requests, resetting the router's controller state between runs. It writes, under --out:

    results.json         one row per (workload, drafter, policy, load, seed), rewritten after every run
    headline.json        per (workload, drafter, load), paired by seed: goodput latency / best other's,
                         / none's, every policy / goodput's (95% intervals), fixed ks slower than none
    report.txt           the tables and the headline (also printed on stdout)
    latency_vs_rate.png  mean latency against rate, one line per policy, one subplot per group
    meta.json            the configuration, the stack, and how long everything took
    traces/<set>.jsonl   with --record-traces: per greedy request and output position, how long an
                         accepted prefix each chain drafter's k_max proposal had (smartspec simulate replays it)

Progress goes to stderr. See docs/bench.md.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path

from smartspec.config import add_flag

# Profiles: what an unset flag means. --quick finishes within 5 minutes on a 2-core CPU, stack start
# included (42 runs of 6 requests of <= 40 tokens); the default (378 runs) has not been timed.
QUICK = {
    "workloads": ["copy"],
    "drafters": ["prompt_lookup", "controlled:0.7"],
    "rates": [0.8, 2.5, 10.0],
    "trace_rates": None,
    "requests": 6,
    "trace_requests": 9,
    "max_tokens": 40,
}
FULL = {
    "workloads": ["chat", "copy", "copy-trace"],
    "drafters": ["prompt_lookup", "draft_model", "auto", "controlled:0.5", "controlled:0.7", "controlled:0.9"],
    "rates": [0.7, 2.0, 5.0, 12.0],
    "trace_rates": None,
    "requests": 6,
    "trace_requests": 12,
    "max_tokens": 40,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--quick", action="store_true", default=False,
             help=f"the quick profile: workloads {','.join(QUICK['workloads'])}, drafters {','.join(QUICK['drafters'])}, "
                  f"rates {','.join(map(str, QUICK['rates']))}, {QUICK['requests']} requests of <= {QUICK['max_tokens']} tokens per run")
    add_flag(parser, "--out", default="bench-results", help="folder for results.json, headline.json, report.txt, latency_vs_rate.png")
    add_flag(parser, "--router", default=None, help="benchmark a running router HOST:PORT instead of starting a stack")
    add_flag(parser, "--rates", nargs="+", default=None, metavar="R",
             help=f"Poisson arrival rates, requests/s (space- or comma-separated; default {','.join(map(str, FULL['rates']))})")
    add_flag(parser, "--concurrency", nargs="+", default=None, metavar="N",
             help="closed-loop levels: N requests always in flight, each completion sending the next (a run sends max(--requests, N)); "
                  "given alone, no Poisson rates run unless --rates is given too")
    add_flag(parser, "--trace-rates", nargs="+", default=None, metavar="R",
             help="mean rates of the '-trace' workloads (default: the median of --rates)")
    add_flag(parser, "--workloads", nargs="+", default=None, metavar="W",
             help=f"chat, copy, chat-trace, copy-trace (default {','.join(FULL['workloads'])})")
    add_flag(parser, "--drafters", nargs="+", default=None, metavar="D",
             help=f"prompt_lookup, draft_model, tree, auto, controlled:A (default {','.join(FULL['drafters'])})")
    add_flag(parser, "--policies", nargs="+", default=None, metavar="P",
             help="policies to compare (default: none fixed:1 fixed:3 fixed:5 fixed:7 uniform goodput)")
    add_flag(parser, "--requests", type=int, default=None, help=f"requests per run (default {FULL['requests']})")
    add_flag(parser, "--trace-requests", type=int, default=None,
             help=f"requests per run of a '-trace' workload, a third per phase (default {FULL['trace_requests']}, or --requests when given)")
    add_flag(parser, "--seed", type=int, default=None, help="seed of the schedules (arrivals, prompt order) and of the controlled drafters' draws (default 0)")
    add_flag(parser, "--seeds", nargs="+", default=None, metavar="S",
             help="several seeds: every cell runs every policy once per seed, and the headline pairs the policies by seed "
                  "(geometric mean and 95%% interval of each latency ratio); instead of --seed")
    add_flag(parser, "--max-tokens", type=int, default=None,
             help=f"cap on every prompt's output length (default {FULL['max_tokens']}; 0: the prompts' own)")
    add_flag(parser, "--request-timeout-s", type=float, default=120.0, help="deadline of each request")
    add_flag(parser, "--max-in-flight", type=int, default=64, help="most requests the client has open at once")
    add_flag(parser, "--record-traces", action="store_true", default=False,
             help="after the runs, write traces/<prompt set>.jsonl under --out: per greedy reference output and output position, "
                  "the accepted prefix of a k_max proposal from each prompt_lookup / draft_model service the stack ran "
                  "(`smartspec simulate --workload FILE` replays them; needs the stack the benchmark starts)")
    # the stack it starts (ignored with --router)
    add_flag(parser, "--target-model", default="embedded", help="target model folder, or 'embedded'")
    add_flag(parser, "--draft-model", default="embedded", help="draft model folder for draft_model, or 'embedded'")
    add_flag(parser, "--device", default="cpu", help="torch device of the verifier and the draft model")
    add_flag(parser, "--dtype", default="float32", help="dtype of the verifier and the draft model")
    add_flag(parser, "--max-batch", type=int, default=16, help="router: most requests in the running batch")
    add_flag(parser, "--max-queue", type=int, default=64, help="router: most requests waiting for admission")
    add_flag(parser, "--max-step-tokens", type=int, default=0,
             help="router: token budget of a step, running requests and prefill chunks (0: the router's default); it bounds how fast "
                  "a closed loop's requests are admitted, hence the running batch")
    add_flag(parser, "--kv-cache-gb", type=float, default=0.0,
             help="KV cache of the verifier (and a draft model), GiB (0: enough for --max-batch of the longest requests, at least 1)")
    add_flag(parser, "--startup-timeout-s", type=float, default=600.0, help="how long the stack may take to come up")
    add_flag(parser, "--log-level", default="WARNING", help="logging level of the services it starts")


def _words(values) -> list[str] | None:
    """['a,b', 'c'] or 'a,b,c' -> ['a', 'b', 'c']; None stays None."""
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    return [part.strip() for value in values for part in str(value).split(",") if part.strip()]


def _numbers(values, flag: str) -> list[float] | None:
    words = _words(values)
    if words is None:
        return None
    try:
        return [float(w) for w in words]
    except ValueError:
        raise ValueError(f"{flag} takes numbers, got {' '.join(words)}") from None


def _integers(values, flag: str) -> list[int] | None:
    numbers = _numbers(values, flag)
    if numbers is not None and any(n != int(n) for n in numbers):
        raise ValueError(f"{flag} takes whole numbers, got {' '.join(f'{n:g}' for n in numbers)}")
    return None if numbers is None else [int(n) for n in numbers]


def build_config(args: argparse.Namespace):
    """The benchmark the flags describe (a profile's values where a flag is unset); ValueError names what is wrong."""
    from smartspec.bench.runner import POLICIES, BenchConfig

    profile = QUICK if args.quick else FULL
    pick = lambda value, key: profile[key] if value is None else value  # noqa: E731
    max_tokens = pick(args.max_tokens, "max_tokens")
    concurrency = _integers(args.concurrency, "--concurrency") or []
    rates = _numbers(args.rates, "--rates")
    if args.seeds is not None and args.seed is not None:
        raise ValueError("give --seed or --seeds, not both")
    seeds = _integers(args.seeds, "--seeds") or [args.seed or 0]
    if args.max_batch < 1 or args.max_queue < 0 or args.kv_cache_gb < 0 or args.max_step_tokens < 0:
        raise ValueError("--max-batch must be at least 1, --max-queue, --max-step-tokens and --kv-cache-gb at least 0")
    if not args.router and max(concurrency, default=0) > args.max_batch + args.max_queue:
        raise ValueError(f"concurrency {max(concurrency)} is more than the router holds (--max-batch {args.max_batch} + --max-queue {args.max_queue})")
    return BenchConfig(
        workloads=pick(_words(args.workloads), "workloads"),
        drafters=pick(_words(args.drafters), "drafters"),
        rates=rates if rates is not None else ([] if concurrency else profile["rates"]),
        concurrency=concurrency,
        seeds=seeds,
        policies=_words(args.policies) or list(POLICIES),
        trace_rates=pick(_numbers(args.trace_rates, "--trace-rates"), "trace_rates"),
        requests=pick(args.requests, "requests"),
        # --requests alone sets the traces' count too; the profile's own trace count goes with its own --requests
        trace_requests=args.trace_requests if args.trace_requests is not None else (profile["trace_requests"] if args.requests is None else None),
        max_tokens=max_tokens or None,
        request_timeout_s=args.request_timeout_s,
        max_in_flight=args.max_in_flight,
    )


async def _bench(args: argparse.Namespace, config, out: Path, meta: dict) -> list[dict]:
    from smartspec.bench.report import check_rows, write_json
    from smartspec.bench.runner import plan, run_bench

    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)  # stop the stack we started, then exit
    rows: list[dict] = []

    def save(row: dict) -> None:
        rows.append(row)
        check_rows(rows)
        write_json(out / "results.json", rows)

    total = len(plan(config))
    if args.router:
        meta["router"] = args.router
        print(f"smartspec bench: {total} runs against the router at {args.router}", file=sys.stderr, flush=True)
        return await run_bench(args.router, config, on_row=save)

    from smartspec.commands.up import running_stack, stack_options

    services = config.services()
    options = stack_options(
        port=0, host="127.0.0.1", drafters=",".join(services), target_model=args.target_model, draft_model=args.draft_model,
        device=args.device, dtype=args.dtype, max_batch=args.max_batch, max_queue=args.max_queue, max_step_tokens=args.max_step_tokens,
        startup_timeout_s=args.startup_timeout_s, grace_s=2.0, log_level=args.log_level, http_port=-1,
    )
    options.kv_cache_gb = args.kv_cache_gb or _kv_budget(args, config, options.kv_cache_gb)
    meta["stack_kv_cache_gb"] = options.kv_cache_gb
    started = time.monotonic()
    print(f"smartspec bench: starting the stack (verifier, {', '.join(services) or 'no drafter services'}, router)", file=sys.stderr, flush=True)
    async with running_stack(options) as addresses:
        meta["stack"] = addresses
        meta["stack_start_s"] = round(time.monotonic() - started, 2)
        print(f"smartspec bench: stack ready in {meta['stack_start_s']:.1f}s; {total} runs", file=sys.stderr, flush=True)
        references: dict = {}
        rows = await run_bench(addresses["router"], config, on_row=save, on_references=references.update)
        if args.record_traces:
            meta["traces"] = await _record(args, config, addresses, references, out)
        return rows


def _kv_budget(args: argparse.Namespace, config, floor_gb: float) -> float:
    """GiB of KV cache that hold --max-batch of the benchmark's longest requests (at least `floor_gb`)."""
    from router.server import RouterSettings
    from smartspec.bench.capacity import kv_cache_gb, tokens_per_sequence
    from smartspec.bench.workload import load_prompts, parse_workload
    from smartspec.models import resolve_model_path

    prompts = [p for w in config.workloads for p in load_prompts(parse_workload(w)[0])]
    tokens = tokens_per_sequence(prompts, config.max_tokens, RouterSettings.k_max)
    return kv_cache_gb(resolve_model_path(args.target_model, "target"), args.dtype, args.max_batch, tokens, floor_gb)


async def _record(args: argparse.Namespace, config, addresses: dict, references: dict, out: Path) -> list[str]:
    """Records the acceptance traces of the reference outputs with the stack's drafter services."""
    from router.server import RouterSettings
    from smartspec.bench.record import TRACES_DIR, record_traces
    from smartspec.models import resolve_model_path

    started = time.monotonic()
    print("smartspec bench: recording acceptance traces", file=sys.stderr, flush=True)
    target = resolve_model_path(args.target_model, "target")
    names = {"target_model": target.name, "max_tokens_cap": config.max_tokens, "seed": config.seeds[0]}
    if "draft_model" in addresses:
        names["draft_model"] = resolve_model_path(args.draft_model, "draft").name
    paths = await record_traces(addresses, list(addresses), references, str(target), out / TRACES_DIR, RouterSettings.k_max,
                                config.request_timeout_s, names)
    print(f"smartspec bench: wrote {', '.join(map(str, paths))} in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    return [str(p.relative_to(out)) for p in paths]


def run(args: argparse.Namespace) -> int:
    from smartspec.bench.record import TRACES_DIR
    from smartspec.bench.traces import CHAIN_DRAFTERS

    started = time.monotonic()
    try:
        config = build_config(args)
        if args.record_traces and args.router:
            raise ValueError("--record-traces asks the drafter services the benchmark starts; it does not work with --router")
        if args.record_traces and not set(CHAIN_DRAFTERS) & set(config.services()):
            raise ValueError(f"--record-traces needs a drafter that runs {' or '.join(CHAIN_DRAFTERS)} (e.g. --drafters prompt_lookup)")
    except ValueError as err:
        print(f"smartspec bench: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "headline.json", "report.txt", "latency_vs_rate.png", "meta.json"):
        (out / name).unlink(missing_ok=True)  # never leave a previous run's files beside this one's
    for old in (out / TRACES_DIR).glob("*.jsonl"):
        old.unlink()
    meta: dict = {
        "profile": "quick" if args.quick else "default",
        "config": {
            "workloads": list(config.workloads), "drafters": list(config.drafters), "policies": list(config.policies),
            "rates": list(config.rates), "concurrency": list(config.concurrency), "trace_rates": config.trace_rates, "requests": config.requests,
            "trace_requests": config.trace_requests, "seeds": list(config.seeds),
            "max_tokens": config.max_tokens, "request_timeout_s": config.request_timeout_s, "max_in_flight": config.max_in_flight,
            "record_traces": args.record_traces, "max_batch": args.max_batch, "max_queue": args.max_queue,
            "max_step_tokens": args.max_step_tokens or None,
        },
    }
    try:
        rows = asyncio.run(_bench(args, config, out, meta))
    except KeyboardInterrupt:
        print("\nsmartspec bench: interrupted; results so far are in " + str(out / "results.json"), file=sys.stderr)
        return 130
    except asyncio.CancelledError:
        print("\nsmartspec bench: stopped; results so far are in " + str(out / "results.json"), file=sys.stderr)
        return 143
    except (RuntimeError, TimeoutError, FileNotFoundError, OSError) as err:
        print(f"smartspec bench: {err}", file=sys.stderr)
        return 1
    return finish(rows, out, meta, time.monotonic() - started)


def finish(rows: list[dict], out: Path, meta: dict, elapsed_s: float) -> int:
    """Writes the outputs, prints the tables and the headline; non-zero when a run lost all its requests."""
    from smartspec.bench.metrics import headline
    from smartspec.bench.report import check_rows, headline_text, plot, shown, table, write_json
    from smartspec.bench.workload import Load

    check_rows(rows)
    write_json(out / "results.json", rows)
    entries = headline(rows)
    write_json(out / "headline.json", entries)
    view = shown(rows)
    closed = " (closed-loop groups: the rate column is the concurrency)" if any(r.get("concurrency") is not None for r in rows) else ""
    report = table(view) + closed + "\n\n" + headline_text(entries) + "\n"
    (out / "report.txt").write_text(report)
    plot(view, out / "latency_vs_rate.png")
    meta["elapsed_s"] = round(elapsed_s, 1)
    meta["stats_available"] = any(row.get("k_histogram") is not None for row in rows)
    write_json(out / "meta.json", meta)
    print(report, flush=True)
    if not meta["stats_available"]:
        print("smartspec bench: the router has no Stats RPC; k distribution and cost-model error are empty", file=sys.stderr)
    mismatched = sum(row.get("mismatched_outputs", 0) for row in rows)
    if mismatched:
        print(f"smartspec bench: warning: {mismatched} outputs differ from the greedy reference (lossless check; "
              "a rare difference can be a numeric tie)", file=sys.stderr)
    dead = [row for row in rows if not row["completed"]]
    for row in dead:
        print(f"smartspec bench: {row['workload']}/{row['drafter']} {row['policy']} at {Load.of(row).label} seed {row.get('seed')}: every request failed: "
              f"{next(iter(row['errors']), '?')}", file=sys.stderr)
    print(f"smartspec bench: {len(rows)} runs in {elapsed_s:.0f}s; wrote {out}/results.json, headline.json, report.txt, "
          "latency_vs_rate.png", file=sys.stderr, flush=True)
    return 1 if dead else 0
