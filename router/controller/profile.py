"""The startup profile: a short sweep of Verify steps over batch size x speculation length x context,
fitted by least squares into the verify cost model's prior, cached on disk per model, device and dtype.

It goes through the verifier's real RPC (as the router's own steps do), so what it measures includes
the RPC and bookkeeping the router will wait for. A few dozen steps: ~30 s for the embedded model on a
2-core CPU, then a cache hit at every later start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from pathlib import Path

from router.controller.cost_model import VERIFY_FEATURES, LinearCostModel, verify_features
from smartspec.wire import verifier_pb2

log = logging.getLogger("smartspec.router.profile")

PROFILE_VERSION = 3
BATCHES = (1, 4, 8, 16)
DRAFT_LENGTHS = (0, 1, 2, 4, 7)
CONTEXTS = (16, 384)
REPEATS = 2


def cache_path(info: verifier_pb2.InfoResponse) -> Path:
    from smartspec.models import cache_dir

    key = f"{info.model.model}|{info.model.device}|{info.model.dtype}|v{PROFILE_VERSION}"
    return cache_dir() / "profiles" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")


async def measure(verifier, info: verifier_pb2.InfoResponse, timeout_s: float = 120.0) -> tuple[list, list[float]]:
    """Runs the sweep against `verifier` (an aio VerifierService stub); returns features and seconds."""
    rng = random.Random(0)
    vocab = info.model.vocab_size
    most = min(max(BATCHES), info.max_sequences or max(BATCHES))
    rows, seconds = [], []
    for context in CONTEXTS:
        # each Verify of random drafts grows a sequence by about one token
        if context + len(BATCHES) * len(DRAFT_LENGTHS) * REPEATS + max(DRAFT_LENGTHS) + 1 >= info.model.max_context:
            continue
        ids = [f"__profile-{context}-{i}" for i in range(most)]
        items = [verifier_pb2.PrefillItem(request_id=i, token_ids=[rng.randrange(3, vocab) for _ in range(context)]) for i in ids]
        await verifier.Prefill(verifier_pb2.PrefillRequest(items=items), timeout=timeout_s)
        try:
            for batch in [b for b in BATCHES if b <= most]:
                for k in DRAFT_LENGTHS:
                    for _ in range(REPEATS):
                        drafts = [rng.randrange(3, vocab) for _ in range(batch * k)]
                        started = time.perf_counter()
                        reply = await verifier.Verify(
                            verifier_pb2.VerifyRequest(request_ids=ids[:batch], draft_counts=[k] * batch, draft_token_ids=drafts), timeout=timeout_s
                        )
                        seconds.append(time.perf_counter() - started)
                        rows.append(verify_features(batch, batch * (k + 1), reply.stats.num_context_tokens + batch, k > 0))
        finally:
            await verifier.Release(verifier_pb2.ReleaseRequest(request_ids=ids), timeout=timeout_s)
    return rows, seconds


async def load_or_measure(verifier, info: verifier_pb2.InfoResponse, model: LinearCostModel, mode: str) -> str:
    """Sets `model`'s prior from the cached profile, or measures one ('auto'); 'refresh' always
    measures; 'off' keeps the built-in defaults. Returns what happened, for the log."""
    if mode == "off":
        return "cost profile off: built-in defaults"
    path = cache_path(info)
    if mode == "auto" and path.exists():
        saved = json.loads(path.read_text())
        model.reset_prior([saved["coefficients"][name] for name in VERIFY_FEATURES])
        return f"cost profile loaded from {path}"
    started = time.perf_counter()
    rows, seconds = await measure(verifier, info)
    if not rows:
        return "cost profile skipped: the context limit is too small for the sweep"
    model.fit_batch(rows, seconds)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model": info.model.model, "device": info.model.device, "dtype": info.model.dtype,
                               "coefficients": model.as_dict(), "samples": len(rows)}, indent=1))
    tmp.replace(path)
    return f"cost profile measured in {time.perf_counter() - started:.1f}s ({len(rows)} steps), saved to {path}: {model.as_dict()}"
