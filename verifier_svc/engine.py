"""The verifier's model-side logic, free of gRPC: admit requests, verify proposals, roll back KV.

Per live request the engine keeps one *pending* token: the last token the target emitted, which is
not in the KV cache yet, and the request's sampling parameters. A Verify step feeds
``[pending, d_1..d_k]`` at the request's own positions, accepts drafts (greedy: the longest prefix that
matches the target's argmax; sampling: rejection sampling), emits those plus the target's own next
token, and cuts the KV back to the accepted length. A prefix is never recomputed. Acceptance and
sampling cover the whole step in one batched pass with one device-to-host transfer
(``verifier_svc.acceptance``), which trusts the drafts: they are validated here, where they enter the
verifier.

A proposal may be a token tree (per draft, its parent's index; greedy requests only). The pending token
is then the tree's root, every node attends to the context, its ancestors and itself at position
start + depth, the accepted path is the longest one the target agrees with, and its nodes' KV is moved
into sequence order before the rest is cut. A chain goes through the same code as the tree it is.

Chunked prefill: ``admit`` takes a request's context without computing it, and each Verify may carry
prefill chunks (the next tokens of such a context) as rows of the same forward, so a long prompt never
holds up the running requests for a whole prefill; the chunk that completes a context yields the
request's first token. ``prefill`` is admission and one step over whole contexts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from smartspec.errors import RequestError
from smartspec.protocol import MAX_DRAFT_TOKENS
from smartspec.runtime.kv_pool import KVCacheFull
from smartspec.runtime.runner import BatchedRunner, StepResult, StepRow
from smartspec.sampling import GREEDY, DraftDistribution, SamplingParams
from smartspec.tree import chain_parents, depths, is_chain, parents_problem
from verifier_svc.acceptance import Proposal, decide

# Free KV blocks kept per live sequence when admitting: room for its next verify of up to 31 drafts.
DECODE_ROOM_BLOCKS = 2

# A request to admit: its id, context tokens and, unless greedy, its sampling parameters.
PrefillItem = tuple[str, Sequence[int]] | tuple[str, Sequence[int], SamplingParams]
# A prefill chunk of a step: a request admitted chunked, and how many of its context tokens to prefill.
PrefillChunk = tuple[str, int]


@dataclass
class VerifyOutcome:
    """Per verified request, in request order: accepted draft count and emitted tokens; per prefill
    chunk that completed its context, in chunk order, the request's first token; and the step."""

    accepted: list[int]
    emitted: list[list[int]]
    committed_lengths: list[int]
    step: StepResult
    first_tokens: list[int] = field(default_factory=list)
    verified_counts: list[int] = field(default_factory=list)  # draft tokens verified per request (fewer than sent where cut)


class VerifierEngine:
    """Target-model state for every live request. Not thread-safe: call from one thread."""

    def __init__(self, runner: BatchedRunner, vocab_size: int) -> None:
        self.runner = runner
        self.vocab_size = vocab_size
        self._pending: dict[str, int] = {}
        self._sampling: dict[str, SamplingParams] = {}
        self._unfilled: dict[str, list[int]] = {}  # admitted context tokens not prefilled yet

    @property
    def max_context(self) -> int:
        return self.runner.max_context

    # --- validation -----------------------------------------------------------------------------
    def _check_tokens(self, request_id: str, tokens: Sequence[int], what: str) -> None:
        bad = next((t for t in tokens if t >= self.vocab_size), None)
        if bad is not None:
            raise RequestError(
                "INVALID_ARGUMENT", f"request {request_id!r}: {what} token id {bad} is outside the vocabulary (size {self.vocab_size})"
            )

    @staticmethod
    def _check_unique(ids: Sequence[str]) -> None:
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if list(ids).count(i) > 1)
            raise RequestError("INVALID_ARGUMENT", f"request id {dup!r} appears more than once in one batch")

    def _check_live(self, request_id: str) -> None:
        if request_id not in self.runner:
            raise RequestError("NOT_FOUND", f"request {request_id!r} is not live on this verifier (never prefilled, or released)")

    def _check_chunk(self, request_id: str, count: int) -> None:
        self._check_live(request_id)
        left = len(self._unfilled.get(request_id, ()))
        if not 1 <= count <= left:
            raise RequestError(
                "INVALID_ARGUMENT", f"request {request_id!r}: a prefill chunk of {count} tokens, but {left} of its context are left to prefill"
            )

    # --- operations -----------------------------------------------------------------------------
    def prefill(self, items: Sequence[PrefillItem]) -> tuple[list[int], StepResult]:
        """Caches each request's context and returns the target's next token for each: admission and
        one step that prefills every context whole."""
        ids = self.admit(items)
        try:  # nothing half-admitted survives a failure, whatever fails
            outcome = self.verify([], [], prefill=[(request_id, len(self._unfilled[request_id])) for request_id in ids])
        except BaseException:
            self.release(ids)
            raise
        return outcome.first_tokens, outcome.step

    def admit(self, items: Sequence[PrefillItem]) -> list[str]:
        """Admits requests without computing anything: their contexts wait for prefill chunks (`verify`'s
        `prefill`). Refused as a whole (nothing admitted) when a context, a slot or the KV room is
        missing. Returns the ids."""
        items = [(item[0], item[1], item[2] if len(item) > 2 else GREEDY) for item in items]
        ids = [request_id for request_id, _, _ in items]
        self._check_unique(ids)
        for request_id, tokens, _ in items:
            if not request_id:
                raise RequestError("INVALID_ARGUMENT", "request_id must not be empty")
            if request_id in self.runner:
                raise RequestError("ALREADY_EXISTS", f"request {request_id!r} is already live; release it first")
            if not tokens:
                raise RequestError("INVALID_ARGUMENT", f"request {request_id!r}: the context must have at least one token")
            if len(tokens) >= self.max_context:
                raise RequestError(
                    "OUT_OF_RANGE",
                    f"request {request_id!r}: context of {len(tokens)} tokens leaves no room to generate (context limit {self.max_context})",
                )
            self._check_tokens(request_id, tokens, "context")
        free = self.runner.max_sequences - self.runner.live
        if len(items) > free:
            raise RequestError(
                "RESOURCE_EXHAUSTED", f"{len(items)} requests to admit but only {free} of {self.runner.max_sequences} sequence slots are free"
            )
        self._check_kv_room([len(tokens) for _, tokens, _ in items])
        for request_id, tokens, sampling in items:
            self.runner.admit(request_id)
            self._unfilled[request_id] = list(tokens)
            self._sampling[request_id] = sampling
        return ids

    def _check_kv_room(self, lengths: list[int]) -> None:
        """Admits contexts only while the KV cache keeps, besides them and the chunks still to prefill of
        requests admitted before, DECODE_ROOM_BLOCKS of room per live sequence, so the running requests
        can go on verifying; the router queues what is refused."""
        cache = self.runner.cache
        unfilled = sum(cache.extra_blocks(i, self.runner.length(i) + len(rest)) for i, rest in self._unfilled.items())
        need = sum(cache.blocks_for(n) for n in lengths) + unfilled + DECODE_ROOM_BLOCKS * (self.runner.live + len(lengths))
        if need > cache.free_blocks:
            raise RequestError(
                "RESOURCE_EXHAUSTED",
                f"the KV cache is full: admitting {sum(lengths)} context tokens needs {need} blocks of {cache.block_size} "
                f"tokens with room to decode, and {cache.free_blocks} of {cache.num_blocks} are free; retry when requests finish",
            )

    def _step(self, rows: list[StepRow]) -> StepResult:
        """runner.step, with a full KV cache reported as RESOURCE_EXHAUSTED (nothing changed): the router
        then preempts a request and retries the step without it."""
        try:
            return self.runner.step(rows)
        except KVCacheFull as err:
            raise RequestError("RESOURCE_EXHAUSTED", f"the KV cache is full: {err}") from None

    def verify(
        self,
        ids: Sequence[str],
        drafts: Sequence[Sequence[int]],
        dists: Sequence[Sequence[DraftDistribution | None]] | None = None,
        parents: Sequence[Sequence[int] | None] | None = None,
        prefill: Sequence[PrefillChunk] = (),
        cut_invalid: bool = False,
    ) -> VerifyOutcome:
        """Verifies one proposal per request in a single batched forward (a proposal may be empty).
        `dists` gives, per request and draft token, the distribution it was sampled from (None, or no
        `dists` at all: deterministic proposals); greedy requests ignore it. `parents` makes a request's
        proposal a token tree (per draft, its parent's index or -1; None, or no `parents` at all: a chain);
        trees are verified greedily only. `prefill` adds chunks of admitted contexts to the same forward.
        `cut_invalid` ends a proposal at its first token the verifier would refuse (an id outside the
        vocabulary, a distribution it cannot have been sampled from) instead of failing the call: the
        router's way of taking untrusted drafters' proposals, checked here once."""
        self._check_unique([*ids, *(request_id for request_id, _ in prefill)])
        if parents is not None and len(parents) != len(ids):
            raise RequestError("INVALID_ARGUMENT", f"{len(parents)} parent lists for {len(ids)} requests")
        dists = dists if dists is not None else [[None] * len(draft) for draft in drafts]
        trees = [list(tree) if tree is not None else chain_parents(len(draft)) for tree, draft in zip(parents or [None] * len(ids), drafts)]
        valid = [self._valid_length(request_id, draft, draft_dists, cut_invalid) for request_id, draft, draft_dists in zip(ids, drafts, dists)]
        if cut_invalid:  # a prefix of a tree whose parents come first is a tree
            drafts = [draft[:n] for draft, n in zip(drafts, valid)]
            dists = [draft_dists[:n] for draft_dists, n in zip(dists, valid)]
            trees = [tree[:n] for tree, n in zip(trees, valid)]
        for request_id, draft, draft_dists, tree in zip(ids, drafts, dists, trees):
            self._check_live(request_id)
            if request_id in self._unfilled:
                raise RequestError(
                    "INVALID_ARGUMENT",
                    f"request {request_id!r} has {len(self._unfilled[request_id])} context tokens left to prefill: it verifies once they are",
                )
            if len(draft) > MAX_DRAFT_TOKENS:
                raise RequestError("INVALID_ARGUMENT", f"request {request_id!r}: {len(draft)} draft tokens, at most {MAX_DRAFT_TOKENS} per step")
            self._check_tree(request_id, draft, tree)
            end = self.runner.length(request_id) + 1 + max(depths(tree), default=0)
            if end > self.max_context:
                raise RequestError(
                    "OUT_OF_RANGE",
                    f"request {request_id!r}: verifying {len(draft)} drafts would reach {end} tokens, over the context limit {self.max_context}",
                )
            cache = self.runner.cache
            if cache.blocks_for(self.runner.length(request_id) + 1 + len(draft)) > cache.num_blocks:
                raise RequestError(
                    "OUT_OF_RANGE",
                    f"request {request_id!r}: verifying {len(draft)} drafts needs more KV cache than the whole cache holds "
                    f"({cache.capacity_tokens} tokens)",
                )
        for request_id, count in prefill:
            self._check_chunk(request_id, count)
        completes = [count == len(self._unfilled[request_id]) for request_id, count in prefill]
        starts = {request_id: self.runner.length(request_id) for request_id in [*ids, *(request_id for request_id, _ in prefill)]}
        rows = [
            StepRow(request_id, [self._pending[request_id], *draft], parents=None if is_chain(tree) else [-1, *(p + 1 for p in tree)])
            for request_id, draft, tree in zip(ids, drafts, trees)
        ] + [
            StepRow(request_id, self._unfilled[request_id][:count], logits_at=[count - 1] if last else [])
            for (request_id, count), last in zip(prefill, completes)
        ]
        step = self._step(rows)
        try:  # decide every row before changing any state, so a failure leaves the step undone
            firsts = [(request_id, row, starts[request_id] + count)
                      for (request_id, count), last, row in zip(prefill, completes, step.first_rows[len(ids):]) if last]
            decisions = decide(step.flat_logits, [  # the whole step at once: one device-to-host transfer
                *(Proposal(row, draft, tree, draft_dists, self._sampling[request_id], starts[request_id] + 1)
                  for request_id, draft, draft_dists, tree, row in zip(ids, drafts, dists, trees, step.first_rows)),
                *(Proposal(row, (), (), (), self._sampling[request_id], position) for request_id, row, position in firsts),
            ])
            first_tokens = [decision.token for decision in decisions[len(ids):]]
        except BaseException:
            for request_id, start in starts.items():
                self.runner.truncate(request_id, start)
            raise
        accepted, emitted, committed = [], [], []
        for request_id, draft, decision in zip(ids, drafts, decisions):
            start = starts[request_id]
            self.runner.keep(request_id, start, [0, *(node + 1 for node in decision.path)])  # pending + the accepted path
            self._pending[request_id] = decision.token
            accepted.append(len(decision.path))
            emitted.append([*(draft[node] for node in decision.path), decision.token])
            committed.append(start + len(decision.path) + 2)
        tokens = iter(first_tokens)
        for (request_id, count), last in zip(prefill, completes):
            if last:
                del self._unfilled[request_id]
                self._pending[request_id] = next(tokens)
            else:
                del self._unfilled[request_id][:count]
        return VerifyOutcome(accepted, emitted, committed, step, first_tokens, [len(draft) for draft in drafts])

    def _check_tree(self, request_id: str, draft: Sequence[int], tree: list[int]) -> None:
        problem = parents_problem(tree, len(draft))
        if problem is not None:
            raise RequestError("INVALID_ARGUMENT", f"request {request_id!r}: draft_parents do not describe a tree: {problem}")
        if not self._sampling[request_id].greedy and not is_chain(tree):
            raise RequestError(
                "INVALID_ARGUMENT",
                f"request {request_id!r} samples (temperature > 0) but its proposal is a token tree: trees are verified greedily only; "
                "send a chain (no draft_parents) for a sampling request",
            )

    def _valid_length(self, request_id: str, draft: Sequence[int], dists: Sequence[DraftDistribution | None], cut: bool) -> int:
        """How many leading draft tokens the verifier accepts to verify; a token it refuses (an id
        outside the vocabulary, a distribution it cannot have been sampled from) fails the call unless
        `cut`, which ends the proposal before it."""
        if len(dists) != len(draft):
            raise RequestError("INVALID_ARGUMENT", f"request {request_id!r}: {len(dists)} draft distributions for {len(draft)} draft tokens")
        bad = self._first_invalid(draft, dists)
        if bad is None:
            return len(draft)
        if not cut:
            raise RequestError("INVALID_ARGUMENT", f"request {request_id!r}: {bad[1]}")
        return bad[0]

    def _first_invalid(self, draft: Sequence[int], dists: Sequence[DraftDistribution | None]) -> tuple[int, str] | None:
        """The first draft token the verifier refuses, and why (None: every one is valid)."""
        for j, (token, dist) in enumerate(zip(draft, dists)):
            if not 0 <= token < self.vocab_size:
                return j, f"draft token id {token} is outside the vocabulary (size {self.vocab_size})"
            problem = dist.problem(token, self.vocab_size) if dist is not None else None
            if problem is not None:
                return j, f"draft token {j} has a distribution it cannot have been sampled from: {problem}"
        return None

    def release(self, ids: Sequence[str]) -> int:
        """Frees each live request's state; unknown ids are ignored. Returns how many were freed."""
        freed = 0
        for request_id in ids:
            if self.runner.release(request_id):
                self._pending.pop(request_id, None)
                self._sampling.pop(request_id, None)
                self._unfilled.pop(request_id, None)
                freed += 1
        return freed
