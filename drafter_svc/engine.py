"""The drafter's request bookkeeping, free of gRPC: validation and the incremental-sync protocol.

This is the one place the protocol lives, whatever the backend. Per request the router sends the tokens
committed since its last call and the committed length:

- appended count == committed length: a full (re)send. The request's state is reset to exactly those
  tokens (this is how a request starts, and how it recovers);
- stored length + appended count == committed length: the tokens are appended;
- anything else (unknown id, lost or diverged state): RESYNC_REQUIRED, no proposal, state untouched.

Requests in sync reach the backend with their whole committed context (``SyncedRequest``).
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

from drafter_svc.base import Drafter, Proposal, SyncedRequest
from smartspec.errors import RequestError
from smartspec.protocol import MAX_DRAFT_TOKENS
from smartspec.sampling import GREEDY, DraftDistribution, SamplingParams
from smartspec.tree import parents_problem

log = logging.getLogger("smartspec.drafter")


@dataclass
class ProposeOutcome:
    """Per request, in request order: whether it was in sync, its drafts (empty when not), their
    distributions (None per deterministic token), parents (empty lists when every draft is a chain)
    and token probabilities (empty lists when not reported); plus the backend's measurements."""

    in_sync: list[bool]
    drafts: list[list[int]]
    distributions: list[list[DraftDistribution | None]]
    proposal: Proposal
    parents: list[list[int]] = field(default_factory=list)
    token_probs: list[list[float]] = field(default_factory=list)


class DrafterEngine:
    """Committed tokens of every live request, kept in sync for one backend. Not thread-safe."""

    def __init__(self, drafter: Drafter) -> None:
        self.drafter = drafter
        # request id -> committed tokens, least recently proposed first (eviction order)
        self._contexts: OrderedDict[str, list[int]] = OrderedDict()

    @property
    def live(self) -> int:
        return len(self._contexts)

    # --- validation -----------------------------------------------------------------------------
    def _validate(self, ids: Sequence[str], committed: Sequence[int], appended: Sequence[Sequence[int]], ks: Sequence[int]) -> None:
        """Rejects the whole batch before any state changes, so a bad call leaves everything as it was."""
        if not len(ids) == len(committed) == len(appended) == len(ks):
            raise RequestError(
                "INVALID_ARGUMENT",
                "request_ids, committed_lengths, appended_counts and max_draft_tokens need one entry per request; "
                f"got {len(ids)}, {len(committed)}, {len(appended)} and {len(ks)}",
            )
        duplicate = next((rid for rid, n in Counter(ids).items() if n > 1), None)
        if duplicate is not None:
            raise RequestError("INVALID_ARGUMENT", f"request id {duplicate!r} appears more than once in one batch")
        cap = self.drafter.max_sequences
        if cap is not None and len(ids) > cap:
            raise RequestError("RESOURCE_EXHAUSTED", f"{len(ids)} requests in one batch but this drafter holds at most {cap}")
        vocab = self.drafter.vocab_size
        for rid, length, tokens, k in zip(ids, committed, appended, ks):
            if not rid:
                raise RequestError("INVALID_ARGUMENT", "request ids must not be empty")
            if length < 1:
                raise RequestError("INVALID_ARGUMENT", f"request {rid!r}: committed length must be at least 1 (the prompt)")
            if len(tokens) > length:
                raise RequestError(
                    "INVALID_ARGUMENT",
                    f"request {rid!r}: {len(tokens)} appended tokens but committed length {length} (the appended tokens are part of it)",
                )
            if k > MAX_DRAFT_TOKENS:
                raise RequestError("INVALID_ARGUMENT", f"request {rid!r}: {k} draft tokens asked, at most {MAX_DRAFT_TOKENS} per step")
            if vocab is not None:
                bad = next((t for t in tokens if not 0 <= t < vocab), None)
                if bad is not None:
                    raise RequestError(
                        "INVALID_ARGUMENT", f"request {rid!r}: token id {bad} is outside the draft model's vocabulary (size {vocab})"
                    )

    # --- the protocol ---------------------------------------------------------------------------
    def _sync(self, rid: str, committed: int, appended: Sequence[int], k: int, sampling: SamplingParams) -> SyncedRequest | None:
        """Applies one request's appended tokens; None when its state does not match (RESYNC_REQUIRED)."""
        stored = self._contexts.get(rid)
        reset = len(appended) == committed
        if reset:
            stored = self._contexts[rid] = list(appended)
        elif stored is not None and len(stored) + len(appended) == committed:
            stored.extend(appended)
        else:
            return None
        self._contexts.move_to_end(rid)
        return SyncedRequest(rid, stored, len(appended), reset, k, sampling)

    def _evict_over_capacity(self) -> None:
        """Keeps at most max_sequences requests by dropping the least recently used ones (never one of
        the current batch: those were just moved to the end and the batch fits, see _validate)."""
        cap = self.drafter.max_sequences
        while cap is not None and len(self._contexts) > cap:
            rid, _ = self._contexts.popitem(last=False)
            self.drafter.release(rid)
            log.warning("evicted request %r: more than %d live requests (was it released?)", rid, cap)

    def propose(
        self,
        ids: Sequence[str],
        committed: Sequence[int],
        appended: Sequence[Sequence[int]],
        ks: Sequence[int],
        sampling: Sequence[SamplingParams] = (),
    ) -> ProposeOutcome:
        """Syncs every request and asks the backend for proposals for those in sync. `sampling` is
        empty (all greedy) or one entry per request."""
        self._validate(ids, committed, appended, ks)
        if sampling and len(sampling) != len(ids):
            raise RequestError("INVALID_ARGUMENT", f"sampling needs one entry per request or none; got {len(sampling)} for {len(ids)} requests")
        sampling = sampling or [GREEDY] * len(ids)
        synced = [self._sync(*request) for request in zip(ids, committed, appended, ks, sampling)]
        batch = [request for request in synced if request is not None]
        self._evict_over_capacity()
        try:
            proposal = self.drafter.propose(batch)
            self._check(batch, proposal)
        except BaseException:
            # The backend may have half-applied the batch: forget these requests so that they resync.
            for request in batch:
                self._drop(request.request_id)
            raise

        def per_request(parts: list[list]) -> list[list]:
            """The backend's per-batch lists spread over every request (empty for the out-of-sync)."""
            it = iter(parts)
            return [next(it) if request is not None else [] for request in synced]

        return ProposeOutcome(
            in_sync=[request is not None for request in synced],
            drafts=per_request(proposal.drafts),
            distributions=per_request(proposal.distributions or [[None] * len(draft) for draft in proposal.drafts]),
            proposal=proposal,
            parents=per_request(proposal.parents or [[] for _ in proposal.drafts]),
            token_probs=per_request(proposal.token_probs or [[] for _ in proposal.drafts]),
        )

    def _check(self, batch: Sequence[SyncedRequest], proposal: Proposal) -> None:
        """A backend that breaks its contract is a server bug: say which backend and request."""
        kind = self.drafter.kind
        if len(proposal.drafts) != len(batch):
            raise RequestError("INTERNAL", f"drafter {kind!r} returned {len(proposal.drafts)} proposals for {len(batch)} requests")
        for what, parts in (("distribution", proposal.distributions), ("parent", proposal.parents), ("token probability", proposal.token_probs)):
            if parts and len(parts) != len(batch):
                raise RequestError("INTERNAL", f"drafter {kind!r} returned {len(parts)} {what} lists for {len(batch)} requests")
        for i, (request, draft) in enumerate(zip(batch, proposal.drafts)):
            if len(draft) > request.k:
                raise RequestError(
                    "INTERNAL", f"drafter {kind!r} proposed {len(draft)} tokens for request {request.request_id!r}, more than the {request.k} asked"
                )
            if proposal.distributions and len(proposal.distributions[i]) != len(draft):
                raise RequestError(
                    "INTERNAL", f"drafter {kind!r} returned {len(proposal.distributions[i])} distributions for {len(draft)} tokens of request {request.request_id!r}"
                )
            problem = parents_problem(proposal.parents[i], len(draft)) if proposal.parents else None
            if problem is not None:
                raise RequestError("INTERNAL", f"drafter {kind!r} returned a malformed tree for request {request.request_id!r}: {problem}")
            if proposal.token_probs and (len(proposal.token_probs[i]) != len(draft) or any(not 0.0 <= p <= 1.0 for p in proposal.token_probs[i])):
                raise RequestError(
                    "INTERNAL", f"drafter {kind!r} returned {len(proposal.token_probs[i])} token probabilities for {len(draft)} tokens of request "
                    f"{request.request_id!r} (each must be in [0, 1])"
                )

    def _drop(self, rid: str) -> bool:
        if self._contexts.pop(rid, None) is None:
            return False
        self.drafter.release(rid)
        return True

    def release(self, ids: Sequence[str]) -> int:
        """Frees each live request's state; unknown ids are ignored. Returns how many were freed."""
        return sum(self._drop(rid) for rid in ids)
