"""Draft-model drafter: a small causal LM proposes its own continuation, batched over requests: its
greedy one for greedy requests; for sampling requests, tokens sampled from its processed distribution
truncated to the top N (``--sample-top-n``), which is the q sent along for rejection sampling.

Each request's KV row holds a prefix of its committed context, possibly followed by the drafts this
backend fed last time. On the next call the row is kept up to the longest common prefix of those drafts
and the newly committed tokens, and cut there (rollback after a rejection); only the committed tokens
past that point are fed, never the prefix again. Drafting runs one batched forward per draft position:
position j runs only the requests that asked for at least j tokens.

A request with k=0 costs no forward: its committed tokens are fed on its next call with k > 0, in that
call's first forward.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Sequence

import torch

from drafter_svc.base import Drafter, Proposal, SyncedRequest
from smartspec.config import add_flag, add_model_flags
from smartspec.protocol import common_prefix_length
from smartspec.runtime.runner import StepResult, StepRow
from smartspec.runtime.sampler import processed_probs, truncate_top_n
from smartspec.sampling import DRAFT, DraftDistribution, uniform
from smartspec.wire import common_pb2


@dataclass
class _Row:
    """What one request's KV row holds: `synced` committed tokens, then `drafts` fed last call."""

    synced: int = 0
    drafts: list[int] = field(default_factory=list)


class DraftModelDrafter(Drafter):
    """Drafting with a local causal LM sharing the target's tokenizer."""

    kind = "draft_model"

    def __init__(
        self,
        draft_model: str = "embedded",
        device: str = "cpu",
        dtype: str = "float32",
        max_sequences: int = 32,
        max_context: int = 0,
        sample_top_n: int = 64,
    ) -> None:
        from smartspec.runtime.loading import load_runner

        if sample_top_n < 1:
            raise ValueError(f"sample_top_n must be at least 1 (got {sample_top_n})")
        self.runner, self._info = load_runner(draft_model, "draft", device, dtype, max_sequences, max_context)
        self.sample_top_n = sample_top_n
        self._rows: dict[str, _Row] = {}

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_model_flags(parser, "draft")
        add_flag(parser, "--sample-top-n", type=int, default=64,
                 help="sampling requests draw each draft token from the draft model's N most likely tokens, and send those N probabilities")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DraftModelDrafter":
        return cls(args.draft_model, args.device, args.dtype, args.max_sequences, args.max_context, args.sample_top_n)

    @property
    def vocab_size(self) -> int:
        return self._info.vocab_size

    @property
    def max_sequences(self) -> int:
        return self.runner.max_sequences

    def model_info(self) -> common_pb2.ModelInfo:
        return self._info

    # --- state ----------------------------------------------------------------------------------
    def _sync_row(self, request: SyncedRequest) -> _Row:
        """Cuts the request's KV back to what is still valid for its committed context."""
        row = self._rows.get(request.request_id)
        if row is None:
            self.runner.admit(request.request_id)
            row = self._rows[request.request_id] = _Row()
        elif request.reset:
            row.synced = 0
        elif row.drafts:  # drafts are only held right after a call that fed the whole context
            row.synced += common_prefix_length(row.drafts, request.appended)
        row.drafts = []
        if request.k > 0:
            row.synced = min(row.synced, len(request.context) - 1)  # the last token is fed for its logits
        self.runner.truncate(request.request_id, row.synced)
        return row

    def release(self, request_id: str) -> None:
        if self._rows.pop(request_id, None) is not None:
            self.runner.release(request_id)

    # --- drafting -------------------------------------------------------------------------------
    def _forward(self, rows: list[StepRow], totals: Proposal) -> torch.Tensor:
        """Feeds the rows and returns each row's next-token logits ([rows, vocab]), adding the work to `totals`."""
        step: StepResult = self.runner.step(rows)
        totals.forward_s += step.forward_s
        totals.num_forwards += step.num_forwards
        totals.new_tokens += step.new_tokens
        totals.context_tokens += step.context_tokens
        return torch.cat(step.logits)

    def _pick(self, request: SyncedRequest, logits: torch.Tensor, index: int) -> tuple[int, DraftDistribution | None]:
        """The draft token at sequence index `index` from its logits ([vocab]): the argmax for a greedy
        request, else a draw from the processed top-N distribution, which is returned with it."""
        if request.sampling.greedy:
            return int(logits.argmax()), None
        dist = truncate_top_n(processed_probs(logits[None], request.sampling)[0], self.sample_top_n)
        return dist.sample(uniform(request.sampling.seed, index, DRAFT)), dist

    def propose(self, batch: Sequence[SyncedRequest]) -> Proposal:
        sampled = any(not request.sampling.greedy for request in batch)
        result = Proposal(drafts=[[] for _ in batch], distributions=[[] for _ in batch] if sampled else [])
        wanted: dict[int, int] = {}  # batch index -> tokens to draft (k within the context limit)
        for i, request in enumerate(batch):
            self._sync_row(request)
            k = min(request.k, self.runner.max_context - len(request.context) + 1)
            if k > 0:
                wanted[i] = k
        # Position 1 feeds each request's committed tokens not yet in its KV (at least its last one).
        feed = {i: list(batch[i].context[self._rows[batch[i].request_id].synced :]) for i in wanted}
        for j in range(1, max(wanted.values(), default=0) + 1):
            active = [i for i, k in wanted.items() if k >= j]
            logits = self._forward([StepRow(batch[i].request_id, feed[i], all_logits=False) for i in active], result)  # [active, vocab]
            for i, row in zip(active, logits):
                token, dist = self._pick(batch[i], row, len(batch[i].context) + j - 1)
                result.drafts[i].append(token)
                if sampled:
                    result.distributions[i].append(dist)
                feed[i] = [token]
        for i, k in wanted.items():
            row = self._rows[batch[i].request_id]
            row.synced = len(batch[i].context)
            row.drafts = result.drafts[i][: k - 1]  # the last draft was never fed
        return result
