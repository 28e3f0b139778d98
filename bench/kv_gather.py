"""What reading the paged KV cache costs against what the padded layout paid: one layer's keys and values
for B sequences of L cached tokens, with SmolLM2-135M's attention shape (9 query heads, 3 KV heads, 64 dims).

    python bench/kv_gather.py [--repeats 20] [--out bench/results/kv_gather.json]

- gather: the paged cache's index_select of every sequence's slots into [B, 3, L, 64] (what
  smartspec.runtime.attention does per group and layer);
- repeat_kv: the padded layout's copy of a contiguous [B, 3, L, 64] view into [B, 9, L, 64] (what
  transformers does before SDPA whenever a mask is passed);
- and each followed by the one-token SDPA call it feeds (gather: enable_gqa, no repeat; repeat_kv: the
  repeated heads with a mask), so the copy is seen beside the attention it serves.
Medians of `repeats` runs, keys and values together.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 16


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@torch.inference_mode()
def cell(batch: int, length: int, repeats: int) -> dict:
    blocks = batch * (-(-length // BLOCK))
    keys = torch.randn(blocks * BLOCK, KV_HEADS, DIM)
    values = torch.randn_like(keys)
    order = torch.randperm(blocks)  # blocks scattered over the cache, as after many admissions
    slots = (order[:, None] * BLOCK + torch.arange(BLOCK)).reshape(batch, -1)[:, :length].reshape(-1)
    query = torch.randn(batch, HEADS, 1, DIM)
    view_k = torch.randn(batch, KV_HEADS, length, DIM)
    view_v = torch.randn_like(view_k)
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)

    def gather():
        k = keys.index_select(0, slots).view(batch, length, KV_HEADS, DIM).transpose(1, 2)
        v = values.index_select(0, slots).view(batch, length, KV_HEADS, DIM).transpose(1, 2)
        return k, v

    def repeat():
        return view_k.repeat_interleave(HEADS // KV_HEADS, 1), view_v.repeat_interleave(HEADS // KV_HEADS, 1)

    def gather_attend():
        k, v = gather()
        return F.scaled_dot_product_attention(query, k, v, enable_gqa=True)

    def repeat_attend():
        k, v = repeat()
        return F.scaled_dot_product_attention(query, k, v, attn_mask=mask)

    return dict(batch=batch, context=length, gather_ms=1e3 * timed(gather, repeats), repeat_kv_ms=1e3 * timed(repeat, repeats),
                gather_attend_ms=1e3 * timed(gather_attend, repeats), repeat_attend_ms=1e3 * timed(repeat_attend, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="bench/results/kv_gather.json")
    args = parser.parse_args()
    rows = []
    print(f"{'batch':>5} {'context':>7} {'gather ms':>9} {'repeat_kv ms':>12} {'gather+sdpa':>11} {'repeat+sdpa':>11}")
    for batch, length in ((1, 128), (8, 1024), (16, 128), (32, 2048)):
        row = cell(batch, length, args.repeats)
        rows.append(row)
        print(f"{batch:>5} {length:>7} {row['gather_ms']:>9.2f} {row['repeat_kv_ms']:>12.2f} {row['gather_attend_ms']:>11.2f} {row['repeat_attend_ms']:>11.2f}")
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(), repeats=args.repeats, per="one layer")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
