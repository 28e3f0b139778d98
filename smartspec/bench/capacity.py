"""Sizing the stack the benchmark starts so that `--max-batch` requests fit at once.

The router never batches more requests than its verifiers hold (`--max-sequences`, which `smartspec up`
raises to the batch), and a verifier whose KV cache is full makes requests wait or be preempted, which
would cap the batch below the level a saturating run asks for. So the benchmark gives the verifier a
KV budget that holds `--max-batch` of its longest requests, never less than `up`'s default.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable

from smartspec.bench.workload import Prompt

# A prompt's length in tokens is bounded by twice the simulator's estimate (4 characters a token plus
# the chat template), so the budget errs on the roomy side without a tokenizer.
PROMPT_MARGIN = 2.0


def tokens_per_sequence(prompts: Iterable[Prompt], max_tokens: int | None, k_max: int) -> int:
    """KV tokens the longest request of `prompts` may hold: prompt, output, a verify of k_max drafts,
    and the verifier's decode room (DECODE_ROOM_BLOCKS) plus one partly filled block."""
    from smartspec.runtime.kv_pool import BLOCK_SIZE
    from smartspec.simulate.load import prompt_tokens
    from verifier_svc.engine import DECODE_ROOM_BLOCKS

    longest = max(math.ceil(PROMPT_MARGIN * prompt_tokens(p)) + (min(p.max_tokens, max_tokens) if max_tokens else p.max_tokens) for p in prompts)
    return longest + k_max + 1 + (DECODE_ROOM_BLOCKS + 1) * BLOCK_SIZE


def kv_cache_gb(model_dir: Path, dtype: str, sequences: int, tokens: int, floor_gb: float) -> float:
    """GiB of KV cache for `sequences` sequences of `tokens` tokens of the model in `model_dir` (its
    config.json), at least `floor_gb`."""
    import torch

    from smartspec.runtime.kv_pool import bytes_per_token
    from smartspec.runtime.runner import kv_shape

    config = SimpleNamespace(**json.loads((Path(model_dir) / "config.json").read_text()))
    per_token = bytes_per_token(*kv_shape(config), getattr(torch, dtype))
    return max(floor_gb, math.ceil(sequences * tokens * per_token / 2**30 * 100) / 100)
