"""A step's token budget (--max-step-tokens): how much prefill rides along with the decoding requests.

One token goes to each decoding request and the rest to prefill chunks, in admission order (first
come, first served), so that running streams slow down, never stall, while a prompt is prefilled. The
router's scheduler and the simulator's step loop both plan their chunks here, so the simulator steps
the way the router does.
"""

from __future__ import annotations

from typing import Sequence

# On one core of the reference CPU a decode step of 8 requests costs ~170 ms and a prefill token ~4 ms:
# 40 prefill tokens beside 8 decoding keep such a step near 2x a decode step (docs/engine.md, "Chunked
# prefill"). A GPU affords far more: a few thousand.
DEFAULT_MAX_STEP_TOKENS = 48
# However many requests decode, a prefill advances at least this many tokens a step.
MIN_PREFILL_TOKENS = 16


def plan_chunks(max_step_tokens: int, decoding: int, prefill_left: Sequence[int]) -> list[int]:
    """Prefill tokens this step for each request still being prefilled (`prefill_left`: its tokens not
    yet in the KV cache, in admission order; 0 for a request that is decoding). With no request decoding
    there is no stream to hold back, so the first prompt in line goes whole (the others would wait for it
    anyway), in one forward rather than a step per chunk."""
    room = max(max_step_tokens - decoding, MIN_PREFILL_TOKENS)
    if not decoding:
        room = max(room, next((left for left in prefill_left if left), 0))
    chunks = []
    for left in prefill_left:
        take = min(left, room)
        chunks.append(take)
        room -= take
    return chunks
