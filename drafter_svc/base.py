"""The one interface every drafter backend implements, and what it is given and returns.

Modelled on vLLM v1's spec-decode proposers: one batched ``propose`` over the running requests and a
``release`` for finished ones. The incremental-sync protocol (appended tokens + committed length,
RESYNC_REQUIRED, full resends) is handled once, in ``drafter_svc.engine.DrafterEngine``; a backend only
ever sees requests that are in sync, each with its whole committed context.
"""

from __future__ import annotations

import abc
import argparse
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

from smartspec.sampling import GREEDY, DraftDistribution, SamplingParams
from smartspec.wire import common_pb2


@dataclass(frozen=True)
class SyncedRequest:
    """One request of a Propose batch, after the sync protocol has been applied.

    ``context`` is the engine's own list of the request's committed tokens (prompt + accepted output). It
    only grows by appends between calls unless ``reset`` is set, so a backend may keep incremental state
    (an n-gram index, a KV cache) keyed by request id and look only at the appended tail. Read-only.
    """

    request_id: str
    context: Sequence[int]
    # The last `num_appended` tokens of `context` arrived in this call.
    num_appended: int
    # The context was (re)sent whole: drop whatever this backend holds for the id.
    reset: bool
    # Most tokens to propose; 0 asks only to keep state in sync.
    k: int
    # How the request samples. A backend that samples its drafts draws from
    # smartspec.sampling.uniform(sampling.seed, token index, DRAFT) and reports the distribution it
    # drew from; a deterministic backend may ignore this (its proposals count as one-hot).
    sampling: SamplingParams = GREEDY

    @property
    def appended(self) -> Sequence[int]:
        """The tokens committed since this request's previous call."""
        return self.context[len(self.context) - self.num_appended :]


@dataclass
class Proposal:
    """A backend's answer for one batch: drafts in batch order (at most k each) and the model work done.

    ``distributions``: empty when every draft is deterministic; else one list per request with, per
    draft token, the distribution it was sampled from (or None where deterministic). ``parents``: empty
    when every draft is a chain; else one list per request with, per draft token, its parent's index in
    that draft or -1 (a child of the last committed token), parents before children (``smartspec.tree``).
    ``token_probs``: empty, or per request and draft token the backend's probability of the token given
    the path to it (the router's controller estimates acceptance from them). The timing fields feed
    the router's cost model (StepStats); model-free backends leave them at 0.
    """

    drafts: list[list[int]]
    distributions: list[list[DraftDistribution | None]] = field(default_factory=list)
    parents: list[list[int]] = field(default_factory=list)
    token_probs: list[list[float]] = field(default_factory=list)
    forward_s: float = 0.0
    num_forwards: int = 0
    new_tokens: int = 0
    context_tokens: int = 0


class Drafter(abc.ABC):
    """A proposer backend. Instances are used from one thread only (the service's model thread)."""

    # Registered name, shown by Info and in the 'listening KIND=HOST:PORT' line.
    kind: ClassVar[str]

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Adds this backend's own flags (use smartspec.config.add_flag so each has an env variable)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Drafter":
        """Builds the backend from the parsed flags that `add_arguments` declared."""
        return cls()

    @property
    def vocab_size(self) -> int | None:
        """Token ids must be below this (checked before `propose`); None when any id is acceptable."""
        return None

    @property
    def max_sequences(self) -> int | None:
        """Most requests whose state the backend can hold; None for no limit. Past it the engine evicts
        the least recently used request (which then answers RESYNC_REQUIRED)."""
        return None

    def model_info(self) -> common_pb2.ModelInfo | None:
        """The draft model's description for Info, when the backend runs one."""
        return None

    @abc.abstractmethod
    def propose(self, batch: Sequence[SyncedRequest]) -> Proposal:
        """Proposes up to `request.k` tokens for every request of the batch (an empty list is fine)."""

    def release(self, request_id: str) -> None:
        """Frees what the backend holds for `request_id` (called once per live id). Override when the
        backend keeps per-request state."""
