"""The verifier's model-side logic, free of gRPC: admit requests, verify proposals, roll back KV.

Per live request the engine keeps one *pending* token: the last token the target emitted, which is
not in the KV cache yet. A Verify step feeds ``[pending, d_1..d_k]`` at the request's own positions,
accepts the longest prefix of the drafts that matches the target's argmax, emits those plus the target's
own next token, and cuts the KV back to the accepted length. A prefix is never recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from smartspec.errors import RequestError
from smartspec.protocol import MAX_DRAFT_TOKENS
from smartspec.runtime.runner import BatchedRunner, StepResult, StepRow
from verifier_svc.acceptance import greedy_accept

@dataclass
class VerifyOutcome:
    """Per request, in request order: accepted draft count and emitted tokens; and the step."""

    accepted: list[int]
    emitted: list[list[int]]
    committed_lengths: list[int]
    step: StepResult


class VerifierEngine:
    """Target-model state for every live request. Not thread-safe: call from one thread."""

    def __init__(self, runner: BatchedRunner, vocab_size: int) -> None:
        self.runner = runner
        self.vocab_size = vocab_size
        self._pending: dict[str, int] = {}

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

    # --- operations -----------------------------------------------------------------------------
    def prefill(self, items: Sequence[tuple[str, Sequence[int]]]) -> tuple[list[int], StepResult]:
        """Caches each request's context and returns the target's next token for each."""
        ids = [request_id for request_id, _ in items]
        self._check_unique(ids)
        for request_id, tokens in items:
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
        for request_id in ids:
            self.runner.admit(request_id)
        try:
            step = self.runner.step([StepRow(request_id, list(tokens), all_logits=False) for request_id, tokens in items])
        except BaseException:
            for request_id in ids:
                self.runner.release(request_id)
            raise
        next_tokens = [int(logits[-1].argmax()) for logits in step.logits]
        self._pending.update(zip(ids, next_tokens))
        return next_tokens, step

    def verify(self, ids: Sequence[str], drafts: Sequence[Sequence[int]]) -> VerifyOutcome:
        """Verifies one proposal per request in a single batched forward (a proposal may be empty)."""
        self._check_unique(ids)
        for request_id, draft in zip(ids, drafts):
            self._check_live(request_id)
            if len(draft) > MAX_DRAFT_TOKENS:
                raise RequestError("INVALID_ARGUMENT", f"request {request_id!r}: {len(draft)} draft tokens, at most {MAX_DRAFT_TOKENS} per step")
            self._check_tokens(request_id, draft, "draft")
            end = self.runner.length(request_id) + 1 + len(draft)
            if end > self.max_context:
                raise RequestError(
                    "OUT_OF_RANGE",
                    f"request {request_id!r}: verifying {len(draft)} drafts would reach {end} tokens, over the context limit {self.max_context}",
                )
        starts = [self.runner.length(request_id) for request_id in ids]
        rows = [StepRow(request_id, [self._pending[request_id], *draft]) for request_id, draft in zip(ids, drafts)]
        step = self.runner.step(rows)
        accepted, emitted, committed = [], [], []
        for request_id, draft, start, logits in zip(ids, drafts, starts, step.logits):
            choices = logits.argmax(dim=-1).tolist()  # [k + 1]: the target's token after each prefix
            n = greedy_accept(list(draft), choices)
            self.runner.truncate(request_id, start + n + 1)  # keep pending + accepted drafts
            self._pending[request_id] = choices[n]
            accepted.append(n)
            emitted.append([*draft[:n], choices[n]])
            committed.append(start + n + 2)
        return VerifyOutcome(accepted, emitted, committed, step)

    def release(self, ids: Sequence[str]) -> int:
        """Frees each live request's state; unknown ids are ignored. Returns how many were freed."""
        freed = 0
        for request_id in ids:
            if self.runner.release(request_id):
                del self._pending[request_id]
                freed += 1
        return freed
