"""Verify-step cost of the embedded target: smartspec's ragged batched runner vs a plain transformers
forward of the same shape (B sequences x C cached context x n new tokens).

    python bench/verify_cost.py [--repeats 7] [--out bench/results/verify_cost.json]

Both paths run the same model with SDPA attention in float32; the runner additionally scatters the new
keys into its slot pool and builds a per-row mask. Each cell is the median of `repeats` forwards.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from smartspec.models import embedded_paths
from smartspec.runtime.loading import load_causal_lm
from smartspec.runtime.runner import BatchedRunner, StepRow


def time_runner(runner: BatchedRunner, batch: int, context: int, new: int, repeats: int) -> float:
    ids = [f"s{i}" for i in range(batch)]
    for seq in ids:
        runner.admit(seq)
    runner.step([StepRow(seq, [7] * context, all_logits=False) for seq in ids])
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        runner.step([StepRow(seq, [11] * new) for seq in ids])
        times.append(time.perf_counter() - started)
        for seq in ids:
            runner.truncate(seq, context)
    for seq in ids:
        runner.release(seq)
    return statistics.median(times[1:])


@torch.inference_mode()
def time_plain(model, batch: int, context: int, new: int, repeats: int) -> float:
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.full((batch, context), 7), past_key_values=cache, use_cache=True)
    tokens = torch.full((batch, new), 11)
    mask = torch.ones(batch, context + new, dtype=torch.long)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        model(input_ids=tokens, attention_mask=mask, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - started)
        cache.crop(-new)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="bench/results/verify_cost.json")
    args = parser.parse_args()
    model = load_causal_lm(embedded_paths().target)
    runner = BatchedRunner(model, max_sequences=8, max_context=2048)
    rows = []
    print(f"{'batch':>5} {'context':>7} {'new':>3} {'smartspec ms':>12} {'transformers ms':>15} {'ratio':>6}")
    for batch in (1, 8):
        for context in (128, 1024):
            for new in (1, 5):
                ours = time_runner(runner, batch, context, new, args.repeats)
                plain = time_plain(model, batch, context, new, args.repeats)
                rows.append(dict(batch=batch, context=context, new_tokens=new, smartspec_ms=ours * 1e3, transformers_ms=plain * 1e3))
                print(f"{batch:>5} {context:>7} {new:>3} {ours * 1e3:>12.1f} {plain * 1e3:>15.1f} {ours / plain:>6.2f}", flush=True)
    meta = dict(model="SmolLM2-135M-Instruct", dtype="float32", device="cpu", torch=torch.__version__,
                threads=torch.get_num_threads(), machine=platform.machine(), repeats=args.repeats)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
