"""The simulator's CPU world, measured: Verify time of the embedded target through its RPC over a grid
of batch x new tokens per sequence x context per sequence, Prefill time by prompt tokens, and the
step-to-step noise, written as the `cpu-smollm2` cost profile of `smartspec simulate`.

    python bench/step_table.py [--repeats 7] [--out smartspec/simulate/profiles/cpu-smollm2.json]
                               [--raw bench/results/step_table.json]

Starts `smartspec serve verifier` (embedded target, float32) as its own process. Each context length
and batch size gets requests of its own (so contexts grow only by the steps of that point: about one
token per step, random drafts being rejected), prefilled together, which also samples the Prefill
cost. Each point is the median of `repeats` Verify calls after one warm-up, every call of the grid in
one random order so that drift spreads over every point. The noise is the standard deviation of
log(time / its point's median) over every repeat: what the simulator multiplies its steps by. The
drafters' costs are kept from the existing profile (estimates; the file says so).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import random
import statistics
import time
from pathlib import Path

import numpy as np

from smartspec.bench.verifier_process import VerifierProcess
from smartspec.wire import verifier_pb2

BATCHES = (1, 4, 16, 32)
NEW_TOKENS = (1, 2, 4, 8)  # per sequence: k + 1
CONTEXTS = (128, 512, 1024)
PROFILE = Path("smartspec/simulate/profiles/cpu-smollm2.json")


def measure(verifier: VerifierProcess, repeats: int) -> tuple[np.ndarray, list[float], list[tuple[int, float]]]:
    """Returns seconds[batch, new tokens, context], the log ratios of every repeat to its median, and
    (prompt tokens, seconds) of every Prefill.

    Every point's repeats run in one random order over the whole grid (all contexts held at once), so
    the machine's drift over the run (a neighbour, heat) is noise on every point rather than aliased
    into one axis: measured context after context, a slow first minute once read as short contexts
    costing more than long ones."""
    rng = random.Random(0)
    vocab = verifier.info.model.vocab_size
    groups = {(context, batch): [f"c{context}-b{batch}-{i}" for i in range(batch)] for context in CONTEXTS for batch in BATCHES}
    prefills: list[tuple[int, float]] = []
    for (context, _), ids in groups.items():
        items = [verifier_pb2.PrefillItem(request_id=i, token_ids=[rng.randrange(3, vocab) for _ in range(context)]) for i in ids]
        started = time.perf_counter()
        verifier.stub.Prefill(verifier_pb2.PrefillRequest(items=items), timeout=900)
        prefills.append((len(ids) * context, time.perf_counter() - started))
    points = list(itertools.product(range(len(CONTEXTS)), range(len(BATCHES)), range(len(NEW_TOKENS))))
    order = [point for point in points for _ in range(repeats + 1)]
    rng.shuffle(order)
    times: dict[tuple[int, int, int], list[float]] = {point: [] for point in points}
    warmed: set[tuple[int, int, int]] = set()
    for done, (ci, bi, ni) in enumerate(order, 1):
        batch, n = BATCHES[bi], NEW_TOKENS[ni]
        drafts = [rng.randrange(3, vocab) for _ in range(batch * (n - 1))]
        ids = groups[CONTEXTS[ci], batch]
        request = verifier_pb2.VerifyRequest(request_ids=ids, draft_counts=[n - 1] * batch, draft_token_ids=drafts)
        started = time.perf_counter()
        verifier.stub.Verify(request, timeout=900)
        if (ci, bi, ni) in warmed:  # each point's first call warms it up
            times[ci, bi, ni].append(time.perf_counter() - started)
        warmed.add((ci, bi, ni))
        if done % 48 == 0:
            print(f"{done}/{len(order)} verifies", flush=True)
    seconds = np.zeros((len(BATCHES), len(NEW_TOKENS), len(CONTEXTS)))  # [batch, new tokens, context]
    spread: list[float] = []
    for (ci, bi, ni), measured in times.items():
        median = statistics.median(measured)
        seconds[bi, ni, ci] = median
        spread += [math.log(t / median) for t in measured]
    for ci, context in enumerate(CONTEXTS):
        for bi, batch in enumerate(BATCHES):
            print(f"context {context} batch {batch}: " + ", ".join(f"{n} new {1000 * seconds[bi, ni, ci]:.0f} ms" for ni, n in enumerate(NEW_TOKENS)))
    return seconds, spread, prefills


def prefill_line(prefills: list[tuple[int, float]]) -> tuple[float, float]:
    """(base seconds, seconds per prompt token) of the Prefill calls, fitted on relative error (a
    128-token call counts as much as a 49,152-token one), neither below 0."""
    tokens, times = np.array([p[0] for p in prefills], dtype=float), np.array([p[1] for p in prefills])
    token_s, base_s = np.polyfit(tokens, times, 1, w=1.0 / times)
    if base_s < 0:
        ratio = tokens / times  # through the origin, still on relative error: min sum (1 - token_s * ratio)^2
        base_s, token_s = 0.0, float(np.sum(ratio) / np.sum(ratio**2))
    return float(base_s), float(token_s)


def write_profile(out: Path, raw: dict) -> dict:
    """The simulator's cost profile from the raw measurements."""
    prefills = [(p["tokens"], p["seconds"]) for p in raw["prefills"]][1:]  # the first call warms the verifier up
    base_s, token_s = prefill_line(prefills)
    previous = json.loads(PROFILE.read_text())
    profile = {
        "name": "cpu-smollm2",
        "kind": "table",
        "source": f"measured: python bench/step_table.py (SmolLM2-135M-Instruct, {raw['dtype']}, {raw['machine']}; Verify RPC time, median of "
                  f"{raw['repeats']} per point; raw figures in bench/results/step_table.json). Outside the grid it is extrapolated linearly.",
        "model": "SmolLM2-135M-Instruct",
        "device": raw["machine"],
        "dtype": raw["dtype"],
        "max_context": raw["max_context"],
        "noise_sigma": round(raw["noise_sigma"], 4),
        "noise_source": f"measured: standard deviation of log(step time / its point's median) over {raw['noise_samples']} repeated Verify steps",
        "verify": {"axes": raw["axes"], "seconds": raw["seconds"]},
        "prefill": {"base_s": round(base_s, 6), "token_s": round(token_s, 8),
                    "source": f"measured: a line through {len(prefills)} Prefill calls of {min(p[0] for p in prefills)}-{max(p[0] for p in prefills)} "
                              "prompt tokens, fitted on relative error"},
        "drafters": previous["drafters"],
    }
    out.write_text(json.dumps(profile, indent=1) + "\n")
    return profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=PROFILE, help="the cost profile to write")
    parser.add_argument("--kv-cache-gb", type=int, default=8, help="the verifier's KV cache (the whole grid is held at once: about 100,000 tokens)")
    parser.add_argument("--raw", type=Path, default=Path("bench/results/step_table.json"), help="every measurement, with the machine")
    parser.add_argument("--from-raw", action="store_true", help="measure nothing: rewrite the profile from --raw")
    args = parser.parse_args()
    if args.from_raw:
        write_profile(args.out, json.loads(args.raw.read_text()))
        return
    # every group at once; a step adds about one token to each of its requests (random drafts are rejected)
    held = sum(BATCHES) * (sum(CONTEXTS) + len(CONTEXTS) * (2 * (args.repeats + 1) * len(NEW_TOKENS) + 32))
    started = time.monotonic()
    with VerifierProcess(["--max-sequences", str(sum(BATCHES) * len(CONTEXTS)), "--kv-cache-gb", str(args.kv_cache_gb)]) as verifier:
        if verifier.info.kv_capacity_tokens < held:
            raise SystemExit(f"--kv-cache-gb {args.kv_cache_gb} holds {verifier.info.kv_capacity_tokens} tokens; the grid needs {held}")
        seconds, spread, prefills = measure(verifier, args.repeats)
        info = verifier.info
    raw = {"machine": f"{info.model.device_name}, {platform.machine()}", "dtype": info.model.dtype, "max_context": info.model.max_context,
           "elapsed_s": round(time.monotonic() - started, 1), "repeats": args.repeats,
           "axes": {"batch": list(BATCHES), "new_tokens_per_seq": list(NEW_TOKENS), "context_per_seq": list(CONTEXTS)},
           "seconds": np.round(seconds, 6).tolist(), "noise_sigma": float(np.std(spread)), "noise_samples": len(spread),
           "prefills": [{"tokens": n, "seconds": s} for n, s in prefills]}
    args.raw.parent.mkdir(parents=True, exist_ok=True)
    args.raw.write_text(json.dumps(raw, indent=1) + "\n")
    profile = write_profile(args.out, raw)
    print(f"noise sigma {raw['noise_sigma']:.3f}; prefill {1000 * profile['prefill']['base_s']:.0f} ms + "
          f"{1e6 * profile['prefill']['token_s']:.0f} us/token; wrote {args.out} and {args.raw}")


if __name__ == "__main__":
    main()
