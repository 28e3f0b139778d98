"""The startup profile: a short sweep of Verify steps over batch size x speculation length x context,
some of them carrying a prefill chunk as paced steps do (router/prefill_budget.py), fitted by least squares into the verify cost model's prior, cached on disk per model, device and dtype,
and, when router replicas share state, in a shared store under the same key (so only the first replica
of a fleet pays for the sweep).

It goes through the verifier's real RPC (as the router's own steps do), so what it measures includes
the RPC and bookkeeping the router will wait for. A few dozen steps: tens of seconds for the embedded model on a
2-core CPU, then a cache hit at every later start. See docs/design.md ("Cost model").
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import grpc

from router.controller.cost_model import VERIFY_FEATURES, Breakpoints, VerifyCostModel, verify_features
from router.prefill_budget import DEFAULT_MAX_STEP_TOKENS
from smartspec.wire import verifier_pb2

log = logging.getLogger("smartspec.router.profile")

PROFILE_VERSION = 8
BATCHES = (1, 4, 8, 16)
# The swept requests' cached lengths are spread over this range (the contexts serving sees), and each step
# draws its own subset of them: batch size, context and k then vary independently, as they do in serving.
CONTEXT_RANGE = (16, 1400)
K_MAX = 7
# Per batch size: these ks for every request, then requests of mixed k (the controller's usual step: each
# request its own k), then one request at K_MAX beside requests verifying none. A single request runs
# every k, so the fit can tell where a step of a few new tokens leaves its fast path (cost_model.Breakpoints).
UNIFORM_KS = (0, 1, 3, K_MAX)
MIXED_STEPS = 2
ROUNDS = 2  # the plan's steps this many times over, each round with its own draws
WARMUP_STEPS = 3
PREFILL_GROUP = 4  # the swept requests are prefilled this many per call
# Per round, one step carrying a prefill chunk of each of these sizes beside decoding requests of mixed k:
# the router paces prompts into its steps in chunks (router/prefill_budget.py), so under load most steps
# carry one, and a model fitted on decoding steps alone extrapolates to them (seen: 15% step-time error in
# Poisson load runs against 7% on held-out decoding steps). One request, admitted chunked, supplies
# them all, so its cached part grows over the sweep as a prompt's does.
# The sizes up to the router's --max-step-tokens are timed (a paced chunk is never larger): on a GPU, whose
# budget is thousands of tokens, the largest show where the step turns compute-bound (the cost model's knee).
CHUNK_TOKENS = (16, 64, 256, 512, 1024)  # ascending: where the room is short, the largest sizes go first
ALL_CHUNKS = ROUNDS * sum(CHUNK_TOKENS)  # the chunked request's context when every size fits
CHUNK_ID = "__profile-chunk"


@dataclass(frozen=True)
class PrefillRow:
    """A prefill chunk in a step, as the cost model sees it: a row of `tokens` new tokens after the
    `cached` tokens of its context already in the KV cache (each attends to at most cached + tokens)."""

    cached: int
    tokens: int


@dataclass(frozen=True)
class SweepPlan:
    """The sweep's requests (their cached lengths at the start) and its steps, in the order they run:
    each step is the indices of the requests it verifies, their ks, and the chunk of the chunked request
    it prefills beside them (None: none; chunks follow one another through that request's context)."""

    contexts: list[int]
    steps: list[tuple[list[int], list[int], PrefillRow | None]]

    @property
    def chunk_tokens(self) -> int:
        """The context the chunked request needs: all its chunks."""
        return sum(chunk.tokens for _, _, chunk in self.steps if chunk)


def sweep_plan(sequences: int, longest: int, rng: random.Random, chunk_room: int = 0, largest_chunk: int = DEFAULT_MAX_STEP_TOKENS) -> SweepPlan:
    """Steps in a random order, so that the machine's drift over the sweep (thermal, a neighbour) is
    noise rather than aliased into one feature's coefficient, as it would be with one context after
    the other. Chunk steps take the smallest CHUNK_TOKENS sizes, up to `largest_chunk`, whose chunks,
    over all rounds, fit in `chunk_room` tokens (ALL_CHUNKS: every size)."""
    high = max(1, min(CONTEXT_RANGE[1], longest))
    low = min(CONTEXT_RANGE[0], high)
    contexts = [round(low + (high - low) * i / max(sequences - 1, 1)) for i in range(sequences)]
    batches = [b for b in BATCHES if b <= sequences]
    sizes = [size for size, total in zip(CHUNK_TOKENS, itertools.accumulate(CHUNK_TOKENS)) if ROUNDS * total <= chunk_room and size <= largest_chunk]
    steps: list[tuple[list[int], list[int], int]] = []
    for _ in range(ROUNDS):
        for batch in batches:
            for ks in _patterns(batch, rng):
                steps.append((sorted(rng.sample(range(sequences), batch)), ks, 0))
        for size in sizes:
            batch = rng.choice(batches)
            steps.append((sorted(rng.sample(range(sequences), batch)), [rng.randint(0, K_MAX) for _ in range(batch)], size))
    rng.shuffle(steps)
    cached = list(itertools.accumulate((size for _, _, size in steps), initial=0))  # the chunked request's, before each step
    return SweepPlan(contexts, [(picked, ks, PrefillRow(before, size) if size else None) for (picked, ks, size), before in zip(steps, cached)])


def _patterns(batch: int, rng: random.Random) -> list[list[int]]:
    """The per-request ks of the steps measured at one batch size."""
    patterns = [[k] * batch for k in (UNIFORM_KS if batch > 1 else range(K_MAX + 1))]
    if batch > 1:
        patterns += [[rng.randint(0, K_MAX) for _ in range(batch)] for _ in range(MIXED_STEPS)]
        patterns.append([K_MAX] + [0] * (batch - 1))
    return patterns


def profile_key(info: verifier_pb2.InfoResponse) -> str:
    """Names a profile by what its timings depend on: model, device (its own name, not only its type),
    dtype and the sweep's version."""
    key = f"{info.model.model}|{info.model.device}|{info.model.device_name}|{info.model.dtype}|v{PROFILE_VERSION}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def cache_path(info: verifier_pb2.InfoResponse) -> Path:
    from smartspec.models import cache_dir

    return cache_dir() / "profiles" / f"{profile_key(info)}.json"


class ProfileStore(Protocol):
    """A store that router replicas share (router/shared_state.py: Redis). Its methods never raise:
    an unreachable store answers None and drops what it was given, and the local file is used."""

    def location(self, key: str) -> str: ...

    async def get_profile(self, key: str) -> dict[str, Any] | None: ...

    async def put_profile(self, key: str, profile: dict[str, Any]) -> None: ...


async def measure(
    verifier, info: verifier_pb2.InfoResponse, timeout_s: float = 120.0, largest_chunk: int = DEFAULT_MAX_STEP_TOKENS
) -> tuple[list, list[float]]:
    """Runs the sweep against `verifier` (an aio VerifierService stub), its chunks up to `largest_chunk`
    tokens (the router's --max-step-tokens); returns the steps' shapes and seconds."""
    rng = random.Random(0)
    vocab = info.model.vocab_size
    sequences = min(max(BATCHES), info.max_sequences or max(BATCHES))
    # a request grows about one token per step it is in (random drafts are rejected), plus slack
    steps = ROUNDS * (sum(len(_patterns(batch, random.Random(0))) for batch in BATCHES) + len(CHUNK_TOKENS))  # the plan's, at most
    growth = steps + WARMUP_STEPS + 2 * K_MAX
    longest = min(CONTEXT_RANGE[1], info.model.max_context - growth)
    # the chunked request needs a sequence slot of its own, its context under the limit, and its share of the cache
    chunk_room = ALL_CHUNKS if not info.max_sequences or info.max_sequences > sequences else 0
    chunk_room = min(chunk_room, info.model.max_context - 1)
    if info.kv_capacity_tokens:  # they must fit the KV cache: shorter contexts first, then fewer requests
        budget = int(0.9 * info.kv_capacity_tokens)
        chunk_room = min(chunk_room, budget // 4)
        budget -= chunk_room
        while sequences and budget // sequences - growth - 32 < 4 * CONTEXT_RANGE[0]:
            sequences //= 2
        if sequences:
            longest = min(longest, budget // sequences - growth - 32)
    if sequences < 1 or longest < 1:
        return [], []
    plan = sweep_plan(sequences, longest, rng, chunk_room, largest_chunk)
    ids = [f"__profile-{i}" for i in range(sequences)]
    items = [verifier_pb2.PrefillItem(request_id=i, token_ids=[rng.randrange(3, vocab) for _ in range(n)]) for i, n in zip(ids, plan.contexts)]
    lengths = dict(zip(ids, plan.contexts))
    chunked = [CHUNK_ID] if plan.chunk_tokens else []
    rows, seconds = [], []
    try:
        for start in range(0, len(items), PREFILL_GROUP):  # small calls: each within the timeout on a slow machine
            await verifier.Prefill(verifier_pb2.PrefillRequest(items=items[start : start + PREFILL_GROUP]), timeout=timeout_s)
        if chunked:
            prompt = [rng.randrange(3, vocab) for _ in range(plan.chunk_tokens)]
            await verifier.Prefill(verifier_pb2.PrefillRequest(items=[verifier_pb2.PrefillItem(request_id=CHUNK_ID, token_ids=prompt)], chunked=True), timeout=timeout_s)
        warmup = [(list(range(sequences)), [1] * sequences, None)] * WARMUP_STEPS
        for n, (picked, ks, chunk) in enumerate(warmup + plan.steps):
            batch = [ids[i] for i in picked]
            drafts = [rng.randrange(3, vocab) for _ in range(sum(ks))]
            message = verifier_pb2.VerifyRequest(request_ids=batch, draft_counts=ks, draft_token_ids=drafts)
            if chunk:
                message.prefill_request_ids.append(CHUNK_ID)
                message.prefill_counts.append(chunk.tokens)
            started = time.perf_counter()
            reply = await verifier.Verify(message, timeout=timeout_s)
            elapsed = time.perf_counter() - started
            if n >= WARMUP_STEPS:
                seconds.append(elapsed)
                rows.append(step_features([lengths[i] for i in batch], ks, [chunk] if chunk else []))
            for i, accepted in zip(batch, reply.accepted_counts):
                lengths[i] += accepted + 1
    finally:
        await verifier.Release(verifier_pb2.ReleaseRequest(request_ids=ids + chunked), timeout=timeout_s)
    return rows, seconds


@dataclass(frozen=True)
class VerifyRows:
    """What a step's verify rows contribute to its shape, summed once: a caller that prices the same
    rows beside many candidate prefill chunks (the prefill pacer) need not sum them again."""

    rows: int
    new_tokens: int
    context_tokens: int
    attended_tokens: int
    longest_row: int

    @classmethod
    def of(cls, contexts: Sequence[int], ks: Sequence[int]) -> "VerifyRows":
        """Requests with these cached lengths verifying these ks (a row's few drafts are counted at its
        request's context)."""
        return cls(len(ks), sum(k + 1 for k in ks), sum(contexts), sum((k + 1) * c for k, c in zip(ks, contexts)), max((k + 1 for k in ks), default=1))

    def beside(self, prefill: Sequence[PrefillRow] = ()):
        """The step's shape (cost_model.STEP_SHAPE) with these prefill chunks: each a row of `tokens` new
        tokens that leaves `cached + tokens` in the KV cache, its tokens attending causally (cached +
        (tokens + 1) / 2 keys each on average)."""
        attended = self.attended_tokens + sum(p.tokens * (p.cached + (p.tokens + 1) / 2) for p in prefill)
        new_tokens = self.new_tokens + sum(p.tokens for p in prefill)
        context = self.context_tokens + sum(p.cached + p.tokens for p in prefill)
        longest = max([self.longest_row] + [p.tokens for p in prefill])
        return verify_features(self.rows + len(prefill), new_tokens, context, longest, attended_tokens=attended)


def step_features(contexts: Sequence[int], ks: Sequence[int], prefill: Sequence[PrefillRow] = ()):
    """The cost model's shape of a Verify (cost_model.STEP_SHAPE) over requests with these cached
    lengths and ks, beside these prefill chunks (VerifyRows)."""
    return VerifyRows.of(contexts, ks).beside(prefill)


async def load_or_measure(
    verifier, info: verifier_pb2.InfoResponse, model: VerifyCostModel, mode: str, shared: ProfileStore | None = None,
    largest_chunk: int = DEFAULT_MAX_STEP_TOKENS,
) -> str:
    """Sets `model`'s prior from a cached profile (the shared store's, else the local file's), or
    measures one ('auto'); 'refresh' always measures; 'off' keeps the built-in defaults. A measured
    profile goes to both places, and so does a profile that live steps later rescale (the model's
    recalibration), so a stale one is not read again. Returns what happened, for the log."""
    if mode == "off":
        return "cost profile off: built-in defaults"
    path, key = cache_path(info), profile_key(info)
    if mode == "auto":
        saved, source = await _cached(path, key, shared)
        if saved is not None:
            model.reset_prior([saved["coefficients"][name] for name in VERIFY_FEATURES], Breakpoints(**saved["breakpoints"]))
            _keep_current(model, saved, path, key, shared)
            return f"cost profile loaded from {source}"
    started = time.perf_counter()
    try:
        rows, seconds = await measure(verifier, info, largest_chunk=largest_chunk)
    except grpc.aio.AioRpcError as err:  # a slow or overloaded verifier: serve with what we have, say so
        return f"cost profile not measured ({err.code().name}: {err.details()}): built-in defaults, refitted from live steps"
    if not rows:
        return "cost profile skipped: the context limit is too small for the sweep"
    model.fit_batch(rows, seconds)
    profile = {"model": info.model.model, "device": info.model.device, "dtype": info.model.dtype,
               "coefficients": model.as_dict(), "breakpoints": model.breaks.as_dict(), "samples": len(rows)}
    _save(path, profile)
    where = str(path)
    if shared is not None:
        await shared.put_profile(key, profile)
        where += f" and {shared.location(key)}"
    _keep_current(model, profile, path, key, shared)
    return f"cost profile measured in {time.perf_counter() - started:.1f}s ({len(rows)} steps), saved to {where}: {model.as_dict()}, {model.breaks}"


_publishing: set[asyncio.Task] = set()  # profile writes in flight (the loop keeps only weak references)


def _keep_current(model: VerifyCostModel, profile: dict[str, Any], path: Path, key: str, shared: ProfileStore | None) -> None:
    """When live steps rescale the model's prior, the cached profile is replaced by the rescaled one,
    locally and in the shared store, in the background: the step loop that triggered it never waits
    for a disk or a network write. Writes go out in the order of the recalibrations (one lock)."""
    in_order = asyncio.Lock()  # FIFO: a later rescale is never overwritten by an earlier one

    async def publish(current: dict[str, Any]) -> None:
        async with in_order:
            await asyncio.to_thread(_save, path, current)
            if shared is not None:
                await shared.put_profile(key, current)

    def replace(prior) -> None:
        current = dict(profile, coefficients=dict(zip(VERIFY_FEATURES, map(float, prior))),
                       recalibrations=int(profile.get("recalibrations", 0)) + model.recalibrations)
        log.warning("cost profile disagreed with live steps: rescaled; saving to %s: %s", path, current["coefficients"])
        task = asyncio.get_running_loop().create_task(publish(current))
        _publishing.add(task)
        task.add_done_callback(_publishing.discard)

    model.on_recalibrate = replace


async def _cached(path: Path, key: str, shared: ProfileStore | None) -> tuple[dict[str, Any] | None, str]:
    """The shared store's profile (copied to the local file, for a later start without it), else the
    local file's (published to the store, so the next replica finds it); (None, '') when neither has one."""
    if shared is not None:
        saved = await shared.get_profile(key)
        if saved is not None and _complete(saved):
            if not path.exists():
                _save(path, saved)
            return saved, shared.location(key)
    if not path.exists():
        return None, ""
    saved = json.loads(path.read_text())
    if not _complete(saved):
        log.warning("cost profile %s lacks coefficients or breakpoints: measuring a new one", path)
        return None, ""
    if shared is not None:
        await shared.put_profile(key, saved)
    return saved, str(path)


def _complete(saved: dict[str, Any]) -> bool:
    """Whether a cached profile holds everything the verify model needs."""
    return all(name in saved.get("coefficients", {}) for name in VERIFY_FEATURES) and isinstance(saved.get("breakpoints"), dict)


def _save(path: Path, profile: dict[str, Any]) -> None:
    """Writes atomically: replicas starting together on one machine may write the same file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(profile, indent=1))
    tmp.replace(path)
