"""The verifier's model-side logic, free of gRPC: admit requests, verify proposals, roll back KV.

Per live request the engine keeps one *pending* token: the last token the target emitted, which is
not in the KV cache yet, and the request's sampling parameters. A Verify step feeds
``[pending, d_1..d_k]`` at the request's own positions, accepts drafts (greedy: the longest prefix that
matches the target's argmax; sampling: rejection sampling), emits those plus the target's own next
token, and cuts the KV back to the accepted length. A prefix is never recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from smartspec.errors import RequestError
from smartspec.protocol import MAX_DRAFT_TOKENS
from smartspec.runtime.runner import BatchedRunner, StepResult, StepRow
from smartspec.runtime.sampler import processed_probs, sample_index
from smartspec.sampling import EMIT, GREEDY, DraftDistribution, SamplingParams, uniform
from verifier_svc import acceptance

# A request to admit: its id, context tokens and, unless greedy, its sampling parameters.
PrefillItem = tuple[str, Sequence[int]] | tuple[str, Sequence[int], SamplingParams]

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
        self._sampling: dict[str, SamplingParams] = {}

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
    def prefill(self, items: Sequence[PrefillItem]) -> tuple[list[int], StepResult]:
        """Caches each request's context and returns the target's next token for each."""
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
        for request_id in ids:
            self.runner.admit(request_id)
        try:
            step = self.runner.step([StepRow(request_id, list(tokens), all_logits=False) for request_id, tokens, _ in items])
        except BaseException:
            for request_id in ids:
                self.runner.release(request_id)
            raise
        next_tokens = []
        for (request_id, tokens, sampling), logits in zip(items, step.logits):
            if sampling.greedy:
                next_tokens.append(int(logits[-1].argmax()))
            else:
                probs = processed_probs(logits[-1:], sampling)[0]  # [vocab]
                next_tokens.append(sample_index(probs, uniform(sampling.seed, len(tokens), EMIT)))
            self._sampling[request_id] = sampling
        self._pending.update(zip(ids, next_tokens))
        return next_tokens, step

    def verify(
        self, ids: Sequence[str], drafts: Sequence[Sequence[int]], dists: Sequence[Sequence[DraftDistribution | None]] | None = None
    ) -> VerifyOutcome:
        """Verifies one proposal per request in a single batched forward (a proposal may be empty).
        `dists` gives, per request and draft token, the distribution it was sampled from (None, or no
        `dists` at all: deterministic proposals); greedy requests ignore it."""
        self._check_unique(ids)
        dists = dists if dists is not None else [[None] * len(draft) for draft in drafts]
        for request_id, draft, draft_dists in zip(ids, drafts, dists):
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
            self._check_distributions(request_id, draft, draft_dists)
        starts = [self.runner.length(request_id) for request_id in ids]
        rows = [StepRow(request_id, [self._pending[request_id], *draft]) for request_id, draft in zip(ids, drafts)]
        step = self.runner.step(rows)
        accepted, emitted, committed = [], [], []
        for request_id, draft, draft_dists, start, logits in zip(ids, drafts, dists, starts, step.logits):
            n, token = self._accept(self._sampling[request_id], list(draft), draft_dists, logits, start + 1)
            self.runner.truncate(request_id, start + n + 1)  # keep pending + accepted drafts
            self._pending[request_id] = token
            accepted.append(n)
            emitted.append([*draft[:n], token])
            committed.append(start + n + 2)
        return VerifyOutcome(accepted, emitted, committed, step)

    @staticmethod
    def _accept(
        sampling: SamplingParams, draft: list[int], dists: Sequence[DraftDistribution | None], logits, first_index: int
    ) -> tuple[int, int]:
        """(accepted count, the target's token after them) for one request. logits: [k + 1, vocab]."""
        if sampling.greedy:
            choices = logits.argmax(dim=-1).tolist()  # [k + 1]: the target's token after each prefix
            n = acceptance.greedy_accept(draft, choices)
            return n, choices[n]
        return acceptance.speculative_accept(draft, dists, processed_probs(logits, sampling), sampling.seed, first_index)

    def _check_distributions(self, request_id: str, draft: Sequence[int], dists: Sequence[DraftDistribution | None]) -> None:
        if len(dists) != len(draft):
            raise RequestError("INVALID_ARGUMENT", f"request {request_id!r}: {len(dists)} draft distributions for {len(draft)} draft tokens")
        for j, (token, dist) in enumerate(zip(draft, dists)):
            if dist is None:
                continue
            self._check_tokens(request_id, dist.token_ids, "draft distribution")
            if any(not 0.0 <= p <= 1.0 for p in dist.probs) or not dist.total > 0.0:
                raise RequestError("INVALID_ARGUMENT", f"request {request_id!r}: draft token {j} has a distribution that is not made of probabilities")
            if dist.prob(token) <= 0.0:
                raise RequestError(
                    "INVALID_ARGUMENT", f"request {request_id!r}: draft token {j} ({token}) has probability 0 in the distribution it was said to be sampled from"
                )

    def release(self, ids: Sequence[str]) -> int:
        """Frees each live request's state; unknown ids are ignored. Returns how many were freed."""
        freed = 0
        for request_id in ids:
            if self.runner.release(request_id):
                del self._pending[request_id]
                del self._sampling[request_id]
                freed += 1
        return freed
