"""Verify-step cost of the embedded target: smartspec's flat ragged runner vs a plain transformers
forward of the same shape (B sequences x C cached context x n new tokens).

    python bench/verify_cost.py [--repeats 7] [--out bench/results/verify_cost.json]

The cached context is filled with random keys and values rather than prefilled (what the cache holds
does not change a step's cost). Uniform shapes: both paths run the same weights in float32, transformers with its SDPA attention and a
DynamicCache, smartspec with its own attention over the paged KV cache. Mixed shapes (rows of different
context and new-token counts) are timed on the runner only, with the shape a padded batch would have
had (every row at the longest context and the most new tokens) beside it, timed on transformers. Each
cell is the median of `repeats` forwards after one warm-up, the better of two runs alternating with the
other side.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from smartspec.models import embedded_paths
from smartspec.runtime.loading import load_causal_lm
from smartspec.runtime.runner import BatchedRunner, StepRow, kv_shape

UNIFORM = [(1, 128), (1, 1024), (8, 128), (8, 1024), (32, 128), (32, 2048)]  # (batch, context), each at 1 and 5 new tokens
# (contexts, new tokens per row): one request speculating beside many that do not; contexts 10x apart
MIXED = {
    "16 x 128 ctx, one k=7, 15 k=0": ([128] * 16, [8] + [1] * 15),
    "16 x 128 ctx, k = 0..7 mixed": ([128] * 16, [1 + i % 8 for i in range(16)]),
    "8 rows, ctx 128..1280, k=3": ([128 * (i + 1) for i in range(8)] + [128], [4] * 9),
    "1 x 1000 prompt + 10 x 100 prompts": ([0] * 11, [1000] + [100] * 10),
}


def time_mixed(runner: BatchedRunner, contexts: list[int], new: list[int], repeats: int) -> float:
    ids = [f"m{i}" for i in range(len(contexts))]
    for seq, context in zip(ids, contexts):
        fill_runner(runner, [seq], context)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        runner.step([StepRow(seq, [11] * n) for seq, n in zip(ids, new)])
        times.append(time.perf_counter() - started)
        for seq, context in zip(ids, contexts):
            runner.truncate(seq, context)
    for seq in ids:
        runner.release(seq)
    return statistics.median(times[1:])


def fill_runner(runner: BatchedRunner, ids: list[str], context: int) -> None:
    """Gives each sequence `context` cached tokens without running the model: what the cache holds
    does not change what a step costs, and a 32 x 2,048 prefill would take minutes here."""
    for seq in ids:
        runner.admit(seq)
    runner.cache.reserve({seq: context for seq in ids})
    for seq in ids:
        runner.cache.set_length(seq, context)


def time_runner(runner: BatchedRunner, ids: list[str], context: int, new: int, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        runner.step([StepRow(seq, [11] * new) for seq in ids])
        times.append(time.perf_counter() - started)
        for seq in ids:
            runner.truncate(seq, context)
    return statistics.median(times[1:])


def filled_cache(model, batch: int, context: int) -> DynamicCache:
    """A DynamicCache holding `context` random positions per row (see fill_runner)."""
    layers, kv_heads, head_dim = kv_shape(model.config)
    cache = DynamicCache(config=model.config)
    for layer in range(layers):
        cache.update(torch.randn(batch, kv_heads, context, head_dim), torch.randn(batch, kv_heads, context, head_dim), layer)
    return cache


@torch.inference_mode()
def time_plain(model, cache: DynamicCache, batch: int, context: int, new: int, repeats: int) -> float:
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="bench/results/verify_cost.json")
    args = parser.parse_args()
    path = embedded_paths().target
    runner = BatchedRunner(load_causal_lm(path), max_sequences=32, max_context=2100)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    rows, mixed = [], []
    print(f"{'batch':>5} {'context':>7} {'new':>3} {'smartspec ms':>12} {'transformers ms':>15} {'ratio':>6}")
    for batch, context in UNIFORM:
        ids = [f"s{i}" for i in range(batch)]
        fill_runner(runner, ids, context)
        cache = filled_cache(plain, batch, context)
        for new in (1, 5):
            ours, theirs = interleaved(lambda: time_runner(runner, ids, context, new, args.repeats),
                                       lambda: time_plain(plain, cache, batch, context, new, args.repeats))
            rows.append(dict(batch=batch, context=context, new_tokens=new, smartspec_ms=ours * 1e3, transformers_ms=theirs * 1e3))
            print(f"{batch:>5} {context:>7} {new:>3} {ours * 1e3:>12.1f} {theirs * 1e3:>15.1f} {ours / theirs:>6.2f}", flush=True)
        for seq in ids:
            runner.release(seq)
    print(f"\n{'mixed shape':<36} {'smartspec ms':>12} {'padded transformers ms':>22}")
    for name, (contexts, new) in MIXED.items():
        if max(contexts):
            cache = filled_cache(plain, len(contexts), max(contexts))
            padded_run = lambda: time_plain(plain, cache, len(contexts), max(contexts), max(new), args.repeats)  # noqa: E731
        else:
            padded_run = lambda: time_prefill(plain, len(contexts), max(new), args.repeats)  # noqa: E731
        ours, padded = interleaved(lambda: time_mixed(runner, contexts, new, args.repeats), padded_run)
        mixed.append(dict(shape=name, contexts=contexts, new_tokens=new, smartspec_ms=ours * 1e3, padded_transformers_ms=padded * 1e3))
        print(f"{name:<36} {ours * 1e3:>12.1f} {padded * 1e3:>22.1f}", flush=True)
    meta = dict(model="SmolLM2-135M-Instruct", dtype="float32", device="cpu", torch=torch.__version__,
                threads=torch.get_num_threads(), machine=platform.machine(), repeats=args.repeats)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "mixed": mixed}, indent=2) + "\n")


def interleaved(ours, theirs, rounds: int = 2) -> tuple[float, float]:
    """Each side's best median over `rounds` alternating runs: a burst of load elsewhere on the machine
    then hits both sides alike instead of deciding one of them."""
    a, b = [], []
    for _ in range(rounds):
        a.append(ours())
        b.append(theirs())
    return min(a), min(b)


@torch.inference_mode()
def time_prefill(model, batch: int, length: int, repeats: int) -> float:
    tokens = torch.full((batch, length), 7)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        model(input_ids=tokens, use_cache=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


if __name__ == "__main__":
    main()
