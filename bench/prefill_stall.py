"""Running streams beside a long prompt's prefill: how long do they wait between messages, and what
does the long prompt pay for not stalling them?

    python bench/prefill_stall.py --label after                             # this checkout, default budget
    python bench/prefill_stall.py --label "budget 256" --max-step-tokens 256
    git worktree add OLD_CHECKOUT COMMIT
    python bench/prefill_stall.py --label before --tree OLD_CHECKOUT        # an older one (whole prefills)

It starts `smartspec up` from the checkout --tree (default: this one) on the embedded model, with no
drafter service (policy none needs none) and the startup cost profile (--cost-profile, default auto:
the cached one, else measured; the prefill pacer prices chunks with the cost model), and measures, all
requests greedy with policy none:

1. idle: the long prompt (--long-tokens tokens) alone, --idle-repeats times: its TTFT on an idle stack;
2. loaded: --streams requests streaming (short prompts, as many tokens as the run lasts); --rounds
   times, --margin-s after the streams started (or after the last long prompt's first message), a long
   prompt (8 tokens to generate) is sent; --margin-s after the last one's first message every stream
   is closed. Every message's arrival time is recorded.

Gaps are between consecutive messages of one stream, counted where both lie. A round's window is from
--margin-s before its long prompt is sent to --margin-s after that prompt's first message (so the
prefill is in the middle of it); "steady" is the --margin-s before it is sent, so "window p99 / steady
p50" compares the worst gaps with the usual one even when the prefill fills most of the window. TTFT is
measured by the client, from sending a request to its first message. Reported: the median over rounds
(the machine may be shared: a round hit by a neighbour's burst shows in its own figures, all saved).
Each label's results are merged into --out (bench/results/prefill_stall.json), and every label saved
there is printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the client and the tokenizer come from this checkout

from smartspec.bench.checkout import add_checkout_flags, commit_of, up_from  # noqa: E402

WORDS = (
    "the river stone cloud paper green quick brown fox jumps over lazy dog seven eleven market garden window silver music "
    "table orange planet engine yellow winter summer bridge forest"
).split()
OPTIONS = dict(drafter="none", policy="none", ignore_eos=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkout_flags(parser, ROOT)
    parser.add_argument("--max-step-tokens", type=int, default=0, help="passed to `smartspec up` (0: the tree's default; an old tree has no such flag)")
    parser.add_argument("--cost-profile", default="auto", choices=["auto", "refresh", "off"], help="the router's startup cost profile, which the prefill pacer prices chunks with")
    parser.add_argument("--streams", type=int, default=8, help="requests streaming when the long prompt arrives")
    parser.add_argument("--long-tokens", type=int, default=1500, help="tokens of the long prompt")
    parser.add_argument("--margin-s", type=float, default=10.0, help="seconds of streaming before each long prompt and after its first token")
    parser.add_argument("--rounds", type=int, default=3, help="long prompts sent one after the other beside the same streams")
    parser.add_argument("--idle-repeats", type=int, default=3, help="TTFTs of the long prompt alone; the median counts")
    parser.add_argument("--note", default="", help="recorded with the run (e.g. what else the machine was doing)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/prefill_stall.json"), help="JSON file the results are merged into")
    return parser.parse_args()


def long_prompt(tokens: int) -> str:
    """A text that the embedded target's tokenizer cuts into exactly `tokens` tokens."""
    from router.main import load_tokenizer

    tokenizer = load_tokenizer("embedded")
    words = [WORDS[(i * 7 + i // len(WORDS)) % len(WORDS)] for i in range(tokens)]  # one token each, in a varied order
    for count in range(tokens, 0, -1):
        text = " ".join(words[:count])
        if len(tokenizer(text).input_ids) == tokens:
            return text
    raise RuntimeError(f"no prefix of the word list is {tokens} tokens long")


class Stream(threading.Thread):
    """One streaming request; records each message's arrival time (perf_counter) until `stop` is set."""

    def __init__(self, client, prompt: str, max_tokens: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.client, self.prompt, self.max_tokens, self.stop = client, prompt, max_tokens, stop
        self.sent = 0.0
        self.times: list[float] = []
        self.first = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.sent = time.perf_counter()
            for _ in self.client.generate_stream(self.prompt, max_tokens=self.max_tokens, **OPTIONS):
                self.times.append(time.perf_counter())
                self.first.set()
                if self.stop.is_set():
                    return  # closing the stream cancels the request
        except Exception as err:  # reported by the caller
            self.error = err
        finally:
            self.first.set()

    @property
    def ttft_s(self) -> float:
        return self.times[0] - self.sent


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linear between closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def gap_stats(streams: list[Stream], start: float, stop: float) -> dict:
    """p50, p99 and the longest of the gaps between consecutive messages of each stream that lie in
    [start, stop] (both messages), in seconds."""
    gaps = [b - a for s in streams for a, b in zip(s.times, s.times[1:]) if start <= a and b <= stop]
    if not gaps:
        return {"gaps": 0}
    p50, p99 = statistics.median(gaps), percentile(gaps, 99)
    return {"gaps": len(gaps), "p50_s": round(p50, 4), "p99_s": round(p99, 4), "max_s": round(max(gaps), 4), "p99_over_p50": round(p99 / p50, 2)}


def idle_ttft(client, prompt: str, repeats: int) -> list[float]:
    stop = threading.Event()
    stop.set()  # one message is all it needs
    ttfts = []
    for _ in range(repeats):
        stream = Stream(client, prompt, 1, stop)
        stream.run()
        if stream.error or not stream.times:
            raise RuntimeError(f"the long prompt failed on an idle stack: {stream.error}")
        ttfts.append(round(stream.ttft_s, 3))
        print(f"  idle: TTFT {ttfts[-1]:.2f}s", file=sys.stderr, flush=True)
    return ttfts


def loaded(client, prompt: str, args: argparse.Namespace) -> dict:
    stop = threading.Event()
    streams = [Stream(client, f"Story {i}: once upon a time, in a {WORDS[i]} land far away,", 4000, stop) for i in range(args.streams)]
    for stream in streams:
        stream.start()
    for stream in streams:
        stream.first.wait()
        if stream.error:
            raise RuntimeError(f"a stream failed: {stream.error}")
    longs = []
    for _ in range(args.rounds):
        time.sleep(args.margin_s)
        longs.append(Stream(client, prompt, 8, stop))
        longs[-1].start()
        longs[-1].first.wait()
        if longs[-1].error:
            raise RuntimeError(f"the long prompt failed: {longs[-1].error}")
    time.sleep(args.margin_s)
    stop.set()
    for stream in [*streams, *longs]:
        stream.join(timeout=120)
    failed = [s.error for s in [*streams, *longs] if s.error]
    if failed:
        raise RuntimeError(f"{len(failed)} streams failed: {failed[0]}")
    rounds = []
    for long in longs:
        sent, first = long.sent, long.times[0]
        rounds.append({
            "ttft_s": round(long.ttft_s, 3),
            "window": gap_stats(streams, sent - args.margin_s, first + args.margin_s),
            "steady": gap_stats(streams, sent - args.margin_s, sent),
            "prefill": gap_stats(streams, sent, first),
        })
        print(f"  loaded: TTFT {rounds[-1]['ttft_s']:.2f}s, window {rounds[-1]['window']}", file=sys.stderr, flush=True)
    origin = longs[0].sent
    return {
        "rounds": rounds,
        # arrival times relative to the first long prompt's sending: the streams, then the long prompts
        "messages_s": [[round(t - origin, 4) for t in s.times] for s in [*streams, *longs]],
        "long_sent_s": [round(long.sent - origin, 4) for long in longs],
    }


def median_of(rounds: list[dict], *keys: str) -> float:
    """The median over rounds of one figure, e.g. median_of(rounds, "window", "p99_s")."""

    def figure(entry: dict) -> float:
        for key in keys:
            entry = entry[key]
        return entry

    return statistics.median(figure(round_) for round_ in rounds)


def table(runs: dict[str, dict]) -> str:
    lines = [
        "| run | step budget | long prompt TTFT, idle (s) | TTFT beside the streams (s) | ratio | stream gap p50 / p99 in the window (ms) | "
        "p99 / p50 | longest gap (ms) | steady p50 / p99 (ms) | window p99 / steady p50 |",  # medians over rounds
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, run in runs.items():
        idle, rounds = statistics.median(run["idle_ttft_s"]), run["loaded"]["rounds"]
        ttft = median_of(rounds, "ttft_s")
        figure = lambda *keys: median_of(rounds, *keys) * 1e3  # noqa: E731  milliseconds
        lines.append(
            f"| {label} ({run['meta']['commit']}) | {run['meta']['max_step_tokens'] or 'default'} | {idle:.2f} | {ttft:.2f} | {ttft / idle:.2f} | "
            f"{figure('window', 'p50_s'):.0f} / {figure('window', 'p99_s'):.0f} | {median_of(rounds, 'window', 'p99_over_p50'):.2f} | "
            f"{figure('window', 'max_s'):.0f} | {figure('steady', 'p50_s'):.0f} / {figure('steady', 'p99_s'):.0f} | "
            f"{statistics.median(r['window']['p99_s'] / r['steady']['p50_s'] for r in rounds):.2f} |"
        )
    return "\n".join(lines)


def to_json(runs: dict) -> str:
    """The results, indented, with each list of numbers (a stream's message times) on one line."""
    numbers: list[str] = []

    def hide(value):
        if isinstance(value, dict):
            return {k: hide(v) for k, v in value.items()}
        if isinstance(value, list) and value and all(isinstance(x, (int, float)) for x in value):
            numbers.append(json.dumps(value))
            return f"@{len(numbers) - 1}@"
        return [hide(v) for v in value] if isinstance(value, list) else value

    text = json.dumps({"runs": hide(runs)}, indent=1)
    for i, dumped in enumerate(numbers):
        text = text.replace(f'"@{i}@"', dumped, 1)
    return text + "\n"


def main() -> None:
    from smartspec.client import Client

    args = parse_args()
    tree = Path(args.tree).resolve()
    prompt = long_prompt(args.long_tokens)
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    meta = dict(commit=commit_of(tree), max_step_tokens=args.max_step_tokens, cost_profile=args.cost_profile, streams=args.streams, long_tokens=args.long_tokens,
                margin_s=args.margin_s, rounds=args.rounds, idle_repeats=args.idle_repeats, cpu_affinity=affinity, machine=platform.machine(),
                note=args.note, load_average_before=os.getloadavg())
    label = args.label or meta["commit"]
    flags = ["--drafters", "", "--http-port", "-1"]
    if args.max_step_tokens:
        flags += ["--max-step-tokens", str(args.max_step_tokens)]
    print(f"prefill_stall: {label}: starting the stack of {tree}", file=sys.stderr, flush=True)
    with up_from(tree, flags, env={"SMARTSPEC_COST_PROFILE": args.cost_profile}) as (router, startup_s):
        meta["stack_start_s"] = round(startup_s, 1)
        with Client(router, timeout_s=900) as client:
            client.generate("Hello", max_tokens=2, **OPTIONS)  # warm-up
            run = {"meta": meta, "idle_ttft_s": idle_ttft(client, prompt, args.idle_repeats), "loaded": loaded(client, prompt, args)}
    meta["load_average_after"] = os.getloadavg()
    out = Path(args.out)
    runs = json.loads(out.read_text())["runs"] if out.exists() else {}
    runs[label] = run
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_json(runs))
    print(table(runs))


if __name__ == "__main__":
    main()
