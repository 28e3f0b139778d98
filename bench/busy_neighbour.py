"""The demo's generation speed with the machine quiet and beside a CPU-heavy neighbour process.

    python bench/busy_neighbour.py --label after                          # this checkout
    git worktree add OLD_CHECKOUT COMMIT
    python bench/busy_neighbour.py --label before --tree OLD_CHECKOUT     # an older one

It starts `smartspec up` from the checkout --tree (default: this one) on the embedded models, sends the
demo's prompts as `smartspec demo` does (drafter auto + policy goodput, and no speculation) and measures
generated tokens per second per request: first quiet, then beside a neighbour, a process at nice 19
running torch matrix products on every core (as another CPU-heavy service would). Each label's results
are merged into --out (bench/results/busy_neighbour.json), and every label saved there is printed as a
table. Beside a neighbour a request can take minutes on a slow tree: --request-timeout-s bounds it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the client and the lifeline come from this checkout

from smartspec.bench.checkout import add_checkout_flags, commit_of, up_from  # noqa: E402
from smartspec.commands.demo import PROMPTS  # noqa: E402
from smartspec.lifeline import child_env  # noqa: E402

VARIANTS = {"auto + goodput": {}, "no speculation": {"drafter": "none", "policy": "none"}}
# The neighbour: torch matrix products on every core, at the lowest priority, until its parent goes.
NEIGHBOUR = """
import os, sys
os.nice(19)
from smartspec.lifeline import watch_parent
watch_parent()
import torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(1024, 1024)
while True:
    a @ a
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkout_flags(parser, ROOT)
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request (the demo's default)")
    parser.add_argument("--repeats", type=int, default=2, help="requests per prompt, variant and condition; the median counts")
    parser.add_argument("--neighbour-threads", type=int, default=0, help="the neighbour's torch threads (0: one per core)")
    parser.add_argument("--request-timeout-s", type=float, default=900.0, help="deadline of one request")
    parser.add_argument("--target-model", default="embedded", help="passed to `smartspec up`")
    parser.add_argument("--draft-model", default="embedded", help="passed to `smartspec up`")
    parser.add_argument("--out", default=str(ROOT / "bench/results/busy_neighbour.json"), help="JSON file the results are merged into")
    return parser.parse_args()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def neighbour(threads: int) -> Iterator[None]:
    """A CPU-heavy process beside the stack while the block runs (it also ends if this script dies)."""
    argv = [sys.executable, "-c", NEIGHBOUR, str(threads)]
    process = subprocess.Popen(argv, cwd=ROOT, env=child_env(os.environ), stdin=subprocess.PIPE)
    try:
        time.sleep(2.0)  # torch imported, every core busy
        if process.poll() is not None:
            raise RuntimeError(f"the neighbour exited with code {process.returncode}")
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


def measure(router: str, condition: str, args: argparse.Namespace) -> list[dict]:
    """Tokens/s of every prompt and variant (median of --repeats requests), after one warm-up request."""
    from smartspec.client import Client

    rows = []
    with Client(router, timeout_s=args.request_timeout_s) as client:
        client.generate(messages=[{"role": "user", "content": "Hello"}], max_tokens=min(4, args.max_tokens))
        for number, prompt in enumerate(PROMPTS):
            messages = [{"role": "user", "content": prompt}]
            for variant, options in VARIANTS.items():
                speeds, done = [], None
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    done = client.generate(messages=messages, max_tokens=args.max_tokens, **options)
                    speeds.append(len(done.token_ids) / (time.perf_counter() - started))
                rows.append(dict(condition=condition, prompt=number, variant=variant, tokens=len(done.token_ids),
                                 tok_s=round(statistics.median(speeds), 2), runs=[round(s, 2) for s in speeds]))
                print(f"  {condition:<10} prompt {number} {variant:<15} {rows[-1]['tok_s']:7.2f} tok/s", file=sys.stderr, flush=True)
    return rows


def table(runs: dict[str, dict]) -> str:
    lines = ["| run | variant | quiet tok/s | beside a neighbour tok/s | neighbour / quiet |", "|---|---|---|---|---|"]
    for label, run in runs.items():
        for variant in VARIANTS:
            speed = {c: statistics.mean(r["tok_s"] for r in run["rows"] if r["condition"] == c and r["variant"] == variant) for c in ("quiet", "neighbour")}
            lines.append(f"| {label} ({run['meta']['commit']}) | {variant} | {speed['quiet']:.1f} | {speed['neighbour']:.1f} | "
                         f"{speed['neighbour'] / speed['quiet']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    tree = Path(args.tree).resolve()
    meta = dict(commit=commit_of(tree), cores=cores(), machine=platform.machine(), max_tokens=args.max_tokens, repeats=args.repeats,
                target_model=args.target_model, draft_model=args.draft_model, neighbour_threads=args.neighbour_threads or cores())
    label = args.label or meta["commit"]
    print(f"busy_neighbour: {label}: starting the stack of {tree}", file=sys.stderr, flush=True)
    # a first start also measures the cost profile
    with up_from(tree, ["--target-model", args.target_model, "--draft-model", args.draft_model]) as (router, startup_s):
        meta["stack_start_s"] = round(startup_s, 1)
        rows = measure(router, "quiet", args)
        with neighbour(meta["neighbour_threads"]):
            rows += measure(router, "neighbour", args)
    out = Path(args.out)
    runs = json.loads(out.read_text())["runs"] if out.exists() else {}
    runs[label] = {"meta": meta, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    print(table(runs))


if __name__ == "__main__":
    main()
