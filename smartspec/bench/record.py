"""`smartspec bench --record-traces`: acceptance traces (smartspec/bench/traces.py) of the benchmark's
greedy requests, asked of the very drafter services the benchmark ran.

After the runs, each greedy reference output (the target's tokens for a prompt, which every policy
reproduces) is replayed to each chain drafter through its Propose RPC and the sync protocol, as the
router drives it (docs/drafters.md): a full send first, then one appended token per output position,
k = k_max every time. What the drafter answers at position p is what it would have proposed live with
context prompt + output[:p], so the recorded lengths are the live drafter's, not a re-implementation's.
Requests go in batches, so a draft model runs one batched forward per draft position.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Mapping, Sequence

from smartspec.bench.metrics import RequestRecord
from smartspec.bench.traces import CHAIN_DRAFTERS, RequestTrace, TraceSet, accepted_prefix, write_traces
from smartspec.bench.workload import load_prompts

# Requests replayed together in one Propose batch (within every drafter's default --max-sequences).
BATCH = 16
TRACES_DIR = "traces"


async def drafter_proposals(
    address: str, ids: Sequence[str], prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], k_max: int, timeout_s: float,
    batch: int = BATCH,
) -> list[list[list[int]]]:
    """Per request and output position p: the drafter's proposal of up to k_max tokens after prompt + output[:p]."""
    import grpc

    from smartspec.serving import CHANNEL_OPTIONS
    from smartspec.wire import drafter_pb2_grpc

    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = drafter_pb2_grpc.DrafterServiceStub(channel)
        out: list[list[list[int]]] = []
        for start in range(0, len(ids), batch):
            part = slice(start, start + batch)
            out.extend(await _replay(stub, ids[part], prompts[part], outputs[part], k_max, timeout_s))
        return out


async def _replay(stub, ids: Sequence[str], prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], k_max: int, timeout_s: float) -> list[list[list[int]]]:
    """One batch of requests, every output position in turn; releases their state at the end."""
    from smartspec.wire import drafter_pb2

    held = [0] * len(ids)  # committed tokens the drafter holds per request (0: send the whole context)
    proposals: list[list[list[int]]] = [[] for _ in ids]
    try:
        for p in range(max(len(o) for o in outputs)):
            active = [i for i, output in enumerate(outputs) if p < len(output)]
            contexts = {i: [*prompts[i], *outputs[i][:p]] for i in active}
            drafts = await _propose(stub, ids, active, contexts, held, k_max, timeout_s)
            lost = [i for i in active if drafts[i] is None]
            if lost:  # evicted or restarted: resend whole, as the router does
                drafts.update(await _propose(stub, ids, lost, contexts, held, k_max, timeout_s))
            if any(drafts[i] is None for i in active):
                raise RuntimeError("a drafter kept answering RESYNC_REQUIRED to full sends while recording traces")
            for i in active:
                proposals[i].append(drafts[i])
    finally:
        await stub.Release(drafter_pb2.ReleaseRequest(request_ids=list(ids)), timeout=timeout_s)
    return proposals


async def _propose(
    stub, ids: Sequence[str], active: Sequence[int], contexts: Mapping[int, list[int]], held: list[int], k_max: int, timeout_s: float
) -> dict[int, list[int] | None]:
    """One Propose of the `active` requests (each sends what the drafter does not hold yet); their
    drafts, None where the drafter asked for a resync. Updates `held`."""
    from smartspec.protocol import split_ragged
    from smartspec.wire import drafter_pb2

    appended = [contexts[i][held[i]:] if held[i] else contexts[i] for i in active]
    message = drafter_pb2.ProposeRequest(
        request_ids=[ids[i] for i in active], committed_lengths=[len(contexts[i]) for i in active], appended_counts=[len(a) for a in appended],
        appended_token_ids=[t for a in appended for t in a], max_draft_tokens=[k_max] * len(active),
    )
    response = await stub.Propose(message, timeout=timeout_s)
    if response.draft_parents:
        raise RuntimeError("the drafter proposes token trees; traces record chain drafters only")
    drafts = split_ragged(list(response.draft_token_ids), list(response.draft_counts), "draft_token_ids")
    out: dict[int, list[int] | None] = {}
    for i, status, draft in zip(active, response.statuses, drafts, strict=True):
        ok = status == drafter_pb2.PROPOSE_STATUS_OK
        held[i] = len(contexts[i]) if ok else 0
        out[i] = draft if ok else None
    return out


def trace_of(prompt_index: int, prompt: Sequence[int], output: Sequence[int], proposals: Mapping[str, Sequence[Sequence[int]]], k_max: int) -> RequestTrace:
    """A request's trace from each drafter's proposals by output position."""
    return RequestTrace(
        prompt_index, tuple(prompt), tuple(output),
        {d: tuple(len(x[:k_max]) for x in props) for d, props in proposals.items()},
        {d: tuple(accepted_prefix(x, output, p, k_max) for p, x in enumerate(props)) for d, props in proposals.items()},
    )


async def record_traces(
    addresses: Mapping[str, str], drafters: Sequence[str], references: Mapping[tuple[str, int], RequestRecord], target_model: str,
    out: Path, k_max: int, timeout_s: float, meta: Mapping[str, object] | None = None,
) -> list[Path]:
    """Writes out/<prompt set>.jsonl for every prompt set of `references` (the benchmark's greedy
    outputs by (set, prompt index)), recording the chain drafters among `drafters` at `addresses`."""
    from router.main import load_tokenizer
    from router.validate import PromptEncoder

    recorded = [d for d in CHAIN_DRAFTERS if d in drafters]
    if not recorded:
        raise ValueError(f"--record-traces needs a chain drafter service ({', '.join(CHAIN_DRAFTERS)}) among the drafters")
    encoder = PromptEncoder(await asyncio.to_thread(load_tokenizer, target_model))
    written = []
    for base in sorted({key[0] for key in references}):
        prompts = load_prompts(base)
        indexes = sorted(i for s, i in references if s == base)
        prompt_ids = [encoder.messages([{"role": role, "content": text} for role, text in prompts[i].messages]) for i in indexes]
        outputs = [list(references[(base, i)].token_ids) for i in indexes]
        for i, ids in zip(indexes, prompt_ids):
            shown = references[(base, i)].prompt_tokens
            if shown is not None and shown != len(ids):
                raise RuntimeError(f"{base} prompt {i}: {len(ids)} prompt tokens here, but the router tokenized {shown}")
        names = [f"trace-{base}-{i}" for i in indexes]
        proposals = {d: await drafter_proposals(addresses[d], names, prompt_ids, outputs, k_max, timeout_s) for d in recorded}
        requests = tuple(trace_of(i, prompt, output, {d: proposals[d][j] for d in recorded}, k_max)
                         for j, (i, prompt, output) in enumerate(zip(indexes, prompt_ids, outputs)))
        path = out / f"{base}.jsonl"
        write_traces(path, TraceSet(base, k_max, tuple(recorded), requests, dict(meta or {})))
        written.append(path)
    return written
