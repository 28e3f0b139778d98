"""smartspec next to vLLM's CPU build, measured by the same client: vLLM's own `vllm bench serve`
against each server's OpenAI-compatible API, same prompts, same loads.

    python bench/peers/side_by_side.py --out bench/results/peers         # 1.5-2 h on a 2-core CPU
    python bench/peers/side_by_side.py --dry-run                          # the plan and every command, nothing started

Systems (one server at a time, on the otherwise idle machine; never two benchmarks at once):
- vLLM without speculation; vLLM with n-gram speculation, k = 3 and k = 5 (n-grams of 1-3 tokens, the
  window of smartspec's prompt_lookup drafter);
- smartspec (`smartspec up --http-port`, one stack) with policy `none`, and with policy `goodput` and
  drafters `prompt_lookup` and `auto`, chosen per request through the API's extra fields.
Both serve the converted embedded model folder (SmolLM2-135M-Instruct) in float32 under one model name.

Workload: a custom dataset (JSONL) made from smartspec's shipped prompt sets (`copy` and `chat`, each
prompt with its own output length), sent in a fixed order, greedy (temperature 0). Each load is a
request rate (Poisson arrivals; inf = all at once) with an optional cap on requests in flight. Every run
starts with warm-up requests that are not measured; each (system, load) runs --repetitions times
(medians reported). smartspec's router gets --max-queue at least the number of prompts: it refuses work
beyond its queue by design, while vLLM queues everything, and a refused request would count as failed.
Between smartspec runs its controller's learned state is reset (Stats reset), as `smartspec bench` does.

Writes OUT/dataset.jsonl, OUT/raw/*.json (vLLM's own result files), OUT/logs/, OUT/results.json (every
run, medians, settings) and OUT/README.md (the table: throughput, TTFT, TPOT, mean latency, failures, and
each system's speed-up over its own no-speculation run at the same load).

vLLM is installed on first use into a venv of its own (bench/peers/vllm_env.py; --vllm-venv).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import vllm_env  # noqa: E402  (beside this file)

MODEL_NAME = "smollm2-135m-instruct"
NGRAM = {"method": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 3}
METRICS = ("output_throughput", "request_throughput", "mean_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "mean_e2el_ms")


@dataclass(frozen=True)
class Variant:
    """One row of the table: a server, and what its requests ask for."""

    system: str  # "vllm" or "smartspec"
    name: str  # e.g. "ngram k=3", "goodput prompt_lookup"
    server: str  # which server process serves it
    speculative_config: dict | None = None  # vLLM: per server
    extra_body: dict = field(default_factory=dict)  # smartspec: per request

    @property
    def label(self) -> str:
        return f"{self.system} {self.name}"

    @property
    def baseline(self) -> str:
        return f"{self.system} none"


VARIANTS = (
    Variant("vllm", "none", "vllm"),
    Variant("vllm", "ngram k=3", "vllm-ngram3", speculative_config={**NGRAM, "num_speculative_tokens": 3}),
    Variant("vllm", "ngram k=5", "vllm-ngram5", speculative_config={**NGRAM, "num_speculative_tokens": 5}),
    Variant("smartspec", "none", "smartspec", extra_body={"drafter": "none", "speculation_policy": "none"}),
    Variant("smartspec", "goodput prompt_lookup", "smartspec", extra_body={"drafter": "prompt_lookup", "speculation_policy": "goodput"}),
    Variant("smartspec", "goodput auto", "smartspec", extra_body={"drafter": "auto", "speculation_policy": "goodput"}),
)


@dataclass(frozen=True)
class Load:
    rate: float  # requests/s; inf: all at once
    concurrency: int | None = None  # most requests in flight; None: no cap

    @classmethod
    def parse(cls, spec: str) -> "Load":
        """'0.5' or 'inf@16' (rate@concurrency)."""
        rate, _, cap = spec.partition("@")
        return cls(float(rate), int(cap) if cap else None)

    @property
    def label(self) -> str:
        rate = "inf" if self.rate == float("inf") else f"{self.rate:g}"
        return f"{rate}/s" + (f", {self.concurrency} in flight" if self.concurrency else "")

    @property
    def slug(self) -> str:
        return self.label.replace("/s", "rps").replace(", ", "-").replace(" in flight", "c")


# --- the workload -------------------------------------------------------------------------------------
def write_dataset(path: Path) -> int:
    """vLLM's custom dataset format from smartspec's shipped prompts, in a fixed order (the sets
    alternating, so any prefix mixes them): {"prompt": the user message, "output_tokens": its output
    length}. Returns its size."""
    from importlib.resources import files

    sets = json.loads((files("smartspec.bench") / "prompts.json").read_text())
    items = [item for group in itertools.zip_longest(*(sets[name] for name in sorted(sets))) for item in group if item is not None]
    rows = [{"prompt": item["messages"][-1]["content"], "output_tokens": item["max_tokens"]} for item in items]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


# --- servers ----------------------------------------------------------------------------------------------
def wait_http(url: str, timeout_s: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before it was ready (see its log)")
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f}s")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its workers too), SIGKILL after a minute."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def vllm_server(args: argparse.Namespace, model: Path, variant: Variant, log: Path) -> Iterator[dict]:
    argv = [str(vllm_env.vllm_command(args.vllm_venv)), "serve", str(model), "--dtype", "float32", "--served-model-name", MODEL_NAME,
            "--host", "127.0.0.1", "--port", str(args.port), "--seed", "0"]
    if variant.speculative_config:
        argv += ["--speculative-config", json.dumps(variant.speculative_config)]
    env = vllm_env.serve_env(args.vllm_venv, args.threads_bind, args.kv_space_gb)
    settings = {"argv": argv, "VLLM_CPU_OMP_THREADS_BIND": args.threads_bind, "VLLM_CPU_KVCACHE_SPACE_GB": args.kv_space_gb,
                "LD_PRELOAD": env["LD_PRELOAD"]}
    if args.dry_run:
        print("  server $ " + shlex.join(argv), flush=True)
        yield settings
        return
    with open(log, "w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{args.port}/health", args.startup_timeout_s, process)
        yield settings
    finally:
        stop(process)


@contextlib.contextmanager
def smartspec_stack(args: argparse.Namespace, num_prompts: int, log: Path) -> Iterator[dict]:
    max_queue = max(64, num_prompts + args.warmups)
    argv = [sys.executable, "-m", "smartspec.cli", "up", "--port", "0", "--http-port", str(args.port), "--max-queue", str(max_queue),
            "--log-level", "WARNING"]
    settings = {"argv": argv, "max_queue": max_queue}
    if args.dry_run:
        print("  server $ " + shlex.join(argv), flush=True)
        yield settings
        return
    with open(log, "w") as err:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + args.startup_timeout_s
        for line in process.stdout:
            if line.startswith("ready "):
                settings["addresses"] = dict(part.split("=", 1) for part in line.split()[1:])
                break
            if time.monotonic() > deadline:
                raise TimeoutError("smartspec up was not ready in time")
        else:
            raise RuntimeError(f"smartspec up exited with code {process.wait()} before it was ready (see {log})")
        yield settings
    finally:
        stop(process)


def reset_smartspec(settings: dict) -> None:
    """Forget what the controller learned in the previous run (acceptance, cost refits)."""
    if "addresses" not in settings:
        return
    import grpc

    from smartspec.wire import router_pb2, router_pb2_grpc

    with grpc.insecure_channel(settings["addresses"]["router"]) as channel:
        router_pb2_grpc.RouterServiceStub(channel).Stats(router_pb2.StatsRequest(reset=True), timeout=30)


# --- runs ---------------------------------------------------------------------------------------------------
def bench_argv(args: argparse.Namespace, model: Path, dataset: Path, num_prompts: int, variant: Variant, load: Load, result: Path,
               warmups: int) -> list[str]:
    """One `vllm bench serve` run, the same for every system but for smartspec's extra body fields."""
    chat = args.backend == "openai-chat"
    argv = [str(vllm_env.vllm_command(args.vllm_venv)), "bench", "serve", "--backend", args.backend,
            "--base-url", f"http://127.0.0.1:{args.port}", "--endpoint", "/v1/chat/completions" if chat else "/v1/completions",
            "--model", MODEL_NAME, "--tokenizer", str(model),
            "--dataset-name", "custom", "--dataset-path", str(dataset), "--custom-output-len", "-1", "--disable-shuffle", "--no-oversample",
            "--num-prompts", str(num_prompts), "--request-rate", "inf" if load.rate == float("inf") else f"{load.rate:g}",
            "--seed", str(args.seed), "--num-warmups", str(warmups), "--temperature", "0",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name, "--disable-tqdm"]
    if chat:
        argv.append("--skip-chat-template")  # the server applies the model's chat template to the messages
    if load.concurrency:
        argv += ["--max-concurrency", str(load.concurrency)]
    if args.ignore_eos:
        argv.append("--ignore-eos")
    if variant.extra_body:
        argv += ["--extra-body", json.dumps(variant.extra_body)]
    return argv


def run_bench(argv: list[str], log: Path, dry_run: bool) -> None:
    print("  $ " + shlex.join(argv), flush=True)
    if dry_run:
        return
    with open(log, "a") as out:
        subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=3600, cwd=log.parent)


def plan(args: argparse.Namespace) -> list[tuple[str, list[Variant]]]:
    """Servers in the order they run, each with the variants it serves."""
    chosen = [v for v in VARIANTS if not args.systems or v.label in args.systems]
    servers: dict[str, list[Variant]] = {}
    for variant in chosen:
        servers.setdefault(variant.server, []).append(variant)
    return list(servers.items())


def measure(args: argparse.Namespace) -> dict:
    from smartspec.models import embedded_paths

    out: Path = Path(tempfile.mkdtemp(prefix="peers-dry-run-")) if args.dry_run else args.out
    model = embedded_paths().target
    dataset = out / "dataset.jsonl"
    num_prompts = min(args.num_prompts or 10**9, write_dataset(dataset))
    loads = [Load.parse(spec) for spec in args.loads]
    version = "(dry run)" if args.dry_run else vllm_env.install(args.vllm_venv)
    meta = {"vllm": version, "smartspec_commit": _git_commit(), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "cores_used": sorted(os.sched_getaffinity(0))},
            "model": MODEL_NAME, "model_folder": model.name, "backend": args.backend, "num_prompts": num_prompts,
            "loads": [load.label for load in loads], "repetitions": args.repetitions, "warmups": args.warmups, "temperature": 0,
            "ignore_eos": args.ignore_eos, "servers": {}}
    runs: list[dict] = []
    for server, variants in plan(args):
        (out / "raw").mkdir(parents=True, exist_ok=True)
        (out / "logs").mkdir(parents=True, exist_ok=True)
        log = out / "logs" / f"{server}.log"
        print(f"server {server}: {', '.join(v.label for v in variants)}", flush=True)
        start = smartspec_stack(args, num_prompts, log) if server == "smartspec" else vllm_server(args, model, variants[0], log)
        with start as settings:
            meta["servers"][server] = {k: v for k, v in settings.items() if k != "addresses"}
            # a discarded first run: caches, compilation, the controller's first refits
            run_bench(bench_argv(args, model, dataset, min(8, num_prompts), variants[0], Load(float("inf")), out / "raw" / f"{server}-warmup.json",
                                 args.warmups), out / "logs" / f"{server}-bench.log", args.dry_run)
            for repetition in range(args.repetitions):
                for load in loads:
                    for variant in variants:  # interleaved, so slow drift does not favour one variant
                        reset_smartspec(settings)
                        result = out / "raw" / f"{variant.label.replace(' ', '_').replace('=', '')}-{load.slug}-r{repetition}.json"
                        run_bench(bench_argv(args, model, dataset, num_prompts, variant, load, result, args.warmups),
                                  out / "logs" / f"{server}-bench.log", args.dry_run)
                        runs.append({"variant": variant.label, "baseline": variant.baseline, "load": load.label, "repetition": repetition,
                                     "result": str(result.relative_to(out))})
    return {"meta": meta, "runs": runs}


def _git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


# --- results ------------------------------------------------------------------------------------------------
def summarize(out: Path, measured: dict) -> dict:
    """Per (variant, load): the median of each metric over the repetitions, failures summed, and the
    speed-up over the same system's no-speculation run at the same load (throughput ratio, and mean
    latency of the baseline over this one's)."""
    rows: dict[tuple[str, str], dict] = {}
    for run in measured["runs"]:
        result = json.loads((out / run["result"]).read_text())
        row = rows.setdefault((run["variant"], run["load"]), {"variant": run["variant"], "baseline": run["baseline"], "load": run["load"],
                                                              "completed": 0, "failed": 0, "samples": {m: [] for m in METRICS}})
        row["completed"] += result.get("completed", 0)
        row["failed"] += result.get("failed", 0)
        for metric in METRICS:
            if result.get(metric) is not None:
                row["samples"][metric].append(result[metric])
    for row in rows.values():
        row["median"] = {m: statistics.median(v) for m, v in row["samples"].items() if v}
    for row in rows.values():
        base = rows.get((row["baseline"], row["load"]), {}).get("median", {})
        mine = row["median"]
        row["speedup_throughput"] = mine["output_throughput"] / base["output_throughput"] if base.get("output_throughput") else None
        row["speedup_latency"] = base["mean_e2el_ms"] / mine["mean_e2el_ms"] if base.get("mean_e2el_ms") and mine.get("mean_e2el_ms") else None
    return {**measured, "rows": list(rows.values())}


def table(summary: dict) -> str:
    def num(value, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    lines = ["| load | system | output tok/s | TTFT ms | TPOT ms | mean latency ms | failed | speed-up: throughput | speed-up: latency |",
             "|---|---|---|---|---|---|---|---|---|"]
    loads = summary["meta"]["loads"]
    order = [v.label for v in VARIANTS]
    for row in sorted(summary["rows"], key=lambda r: (loads.index(r["load"]) if r["load"] in loads else len(loads), order.index(r["variant"]))):
        m = row["median"]
        lines.append(f"| {row['load']} | {row['variant']} | {num(m.get('output_throughput'), '.1f')} | {num(m.get('mean_ttft_ms'), '.0f')} | "
                     f"{num(m.get('mean_tpot_ms'), '.1f')} | {num(m.get('mean_e2el_ms'), '.0f')} | {row['failed']} | "
                     f"{num(row['speedup_throughput'], '.2f')} | {num(row['speedup_latency'], '.2f')} |")
    return "\n".join(lines)


def portable(text: str, vllm_venv: Path) -> str:
    """Results name no machine's folders: vLLM's venv becomes VLLM_VENV, this interpreter `python`,
    the checkout `.` and the home folder `~`."""
    for path, name in ((str(vllm_venv), "VLLM_VENV"), (sys.executable, "python"), (str(ROOT), "."), (str(Path.home()), "~")):
        text = text.replace(path, name)
    return text


def make_portable(out: Path, vllm_venv: Path) -> None:
    """Rewrites vLLM's own result files (they record the tokenizer's folder) with `portable` paths."""
    for result in (out / "raw").glob("*.json"):
        result.write_text(portable(result.read_text(), vllm_venv))


def write_report(out: Path, summary: dict, command: str, vllm_venv: Path) -> None:
    meta = summary["meta"]
    cores = meta["machine"].get("cores_used")
    machine = f"{len(cores)} of {meta['machine']['cpus']} CPU cores (both systems pinned to the same ones)" if cores else f"{meta['machine']['cpus']} CPUs"
    summary = json.loads(portable(json.dumps(summary), vllm_venv))
    meta = summary["meta"]
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    servers = "\n".join(f"- `{name}`: `{shlex.join(s['argv'])}`" + (f" (VLLM_CPU_OMP_THREADS_BIND={s['VLLM_CPU_OMP_THREADS_BIND']}, "
                        f"VLLM_CPU_KVCACHE_SPACE={s['VLLM_CPU_KVCACHE_SPACE_GB']} GB)" if "VLLM_CPU_OMP_THREADS_BIND" in s else "")
                        for name, s in meta["servers"].items())
    (out / "README.md").write_text(
        f"# smartspec and vLLM ({meta['vllm']}) side by side, measured by `vllm bench serve`\n\n"
        f"`{command}`\n\n"
        f"{meta['num_prompts']} prompts (smartspec's copy and chat sets, alternating; greedy), backend `{meta['backend']}`, "
        f"{meta['warmups']} warm-up requests per run, medians of {meta['repetitions']} repetitions; "
        f"{machine}, smartspec {meta['smartspec_commit']}. Speed-ups are over the same system's "
        "no-speculation run at the same load (throughput ratio; mean latency of the baseline divided by this one's).\n\n"
        f"{table(summary)}\n\nServers:\n\n{servers}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "peers")
    parser.add_argument("--vllm-venv", type=Path, default=vllm_env.default_venv(), help="vLLM's own venv (installed on first use)")
    parser.add_argument("--loads", nargs="+", default=["0.5", "1", "inf@1", "inf@16"],
                        help="request rate per second, optionally @ most requests in flight (default: %(default)s)")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--warmups", type=int, default=4, help="unmeasured requests at the start of every run")
    parser.add_argument("--num-prompts", type=int, default=0, help="prompts per run (default: the whole dataset)")
    parser.add_argument("--backend", choices=["openai-chat", "openai"], default="openai-chat",
                        help="openai-chat: messages, templated by the server; openai: /v1/completions with the template applied by the client")
    parser.add_argument("--systems", nargs="*", default=[], help=f"a subset of: {', '.join(repr(v.label) for v in VARIANTS)}")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of whichever server runs")
    parser.add_argument("--threads-bind", default=",".join(map(str, sorted(os.sched_getaffinity(0)))),
                        help="vLLM's VLLM_CPU_OMP_THREADS_BIND: the cores its model runs on (default: every core this process may use, "
                             "as smartspec's services share them; under `taskset -c 0` both systems get core 0 alone)")
    parser.add_argument("--kv-space-gb", type=int, default=2, help="vLLM's VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--ignore-eos", action="store_true", help="every request generates exactly its output length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-timeout-s", type=float, default=900.0)
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the commands; start nothing")
    parser.add_argument("--report-only", action="store_true", help="rewrite OUT/README.md and results.json from OUT's saved runs")
    args = parser.parse_args()
    if args.repetitions < 1:
        parser.error("--repetitions must be at least 1 (the protocol asks for 3 or more)")
    if args.report_only:
        saved = json.loads((args.out / "results.json").read_text())
        measured, command = {"meta": saved["meta"], "runs": saved["runs"]}, saved["meta"].get("command", "")
    else:
        measured = measure(args)
        if args.dry_run:
            return
        command = "python bench/peers/side_by_side.py " + shlex.join(sys.argv[1:])
        measured["meta"]["command"] = command
    make_portable(args.out, args.vllm_venv)
    write_report(args.out, summarize(args.out, measured), command, args.vllm_venv)
    print(f"results in {args.out}/README.md and results.json", flush=True)


if __name__ == "__main__":
    main()
