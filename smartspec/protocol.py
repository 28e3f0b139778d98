"""Wire-protocol helpers shared by the model services (torch-free): ragged batches, step stats, limits."""

from __future__ import annotations

import time
from typing import Sequence

from smartspec.errors import RequestError
from smartspec.wire import common_pb2

# Most draft tokens one request may propose or verify in one step (bounds the KV pool's padding slack).
MAX_DRAFT_TOKENS = 64


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two sequences share (acceptance of a greedy draft, KV still valid after
    a rejection)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_ragged(flat: Sequence[int], counts: Sequence[int], what: str) -> list[list[int]]:
    """Cuts a flat token list into per-request lists of the given counts (vLLM-style ragged batch)."""
    if sum(counts) != len(flat):
        raise RequestError("INVALID_ARGUMENT", f"{what}: counts add up to {sum(counts)} but {len(flat)} tokens were sent")
    parts, start = [], 0
    for count in counts:
        parts.append(list(flat[start : start + count]))
        start += count
    return parts


def step_stats(
    started: float, forward_s: float, num_sequences: int, new_tokens: int, context_tokens: int, num_forwards: int
) -> common_pb2.StepStats:
    """Wire form of a step's shape and timing; handler time runs from `started` (perf_counter) to now."""
    return common_pb2.StepStats(
        forward_s=forward_s,
        handler_s=time.perf_counter() - started,
        num_sequences=num_sequences,
        num_new_tokens=new_tokens,
        num_context_tokens=context_tokens,
        num_forwards=num_forwards,
    )
