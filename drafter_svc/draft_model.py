"""Draft-model drafter: a small causal LM proposes its own continuation, batched over requests: its
greedy one for greedy requests; for sampling requests, tokens sampled from its processed distribution
truncated to the top N (``--sample-top-n``), which is the q sent along for rejection sampling.

KV rows are kept in sync as ``drafter_svc.model_drafter`` describes; this backend keeps the drafts it fed
in the row, so an accepted draft is never fed again. Drafting runs one batched forward per draft
position: position j runs only the requests that asked for at least j tokens.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import torch

from drafter_svc.base import Proposal, SyncedRequest
from drafter_svc.model_drafter import ModelDrafter, at_least_one
from smartspec.config import add_flag
from smartspec.runtime.runner import StepRow
from smartspec.runtime.sampler import draft_distribution
from smartspec.sampling import DRAFT, DraftDistribution, uniform


class DraftModelDrafter(ModelDrafter):
    """Drafting chains with a local causal LM sharing the target's tokenizer."""

    kind = "draft_model"

    def __init__(self, draft_model: str = "embedded", *, sample_top_n: int = 64, **model: Any) -> None:
        """`model`: ModelDrafter's other arguments (device, dtype, max_sequences, max_context)."""
        self.sample_top_n = at_least_one("sample_top_n", sample_top_n)
        super().__init__(draft_model, **model)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        add_flag(parser, "--sample-top-n", type=int, default=64,
                 help="sampling requests draw each draft token from the draft model's N most likely tokens, and send those N probabilities")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DraftModelDrafter":
        return cls(**cls.model_options(args), sample_top_n=args.sample_top_n)

    # --- drafting -------------------------------------------------------------------------------
    def _sample(self, request: SyncedRequest, logits: torch.Tensor, index: int) -> tuple[int, DraftDistribution]:
        """A sampling request's draft token at sequence index `index` from its logits ([vocab]): a draw
        from the processed top-N distribution, which is returned with it."""
        dist = draft_distribution(logits, request.sampling, self.sample_top_n)
        return dist.sample(uniform(request.sampling.seed, index, DRAFT)), dist

    def propose(self, batch: Sequence[SyncedRequest]) -> Proposal:
        sampled = any(not request.sampling.greedy for request in batch)
        result = Proposal(drafts=[[] for _ in batch], distributions=[[] for _ in batch] if sampled else [])
        wanted = self._budgets(batch)  # batch index -> tokens to draft
        # Position 1 feeds each request's committed tokens not yet in its KV (at least its last one).
        feed = {i: self._unfed(batch[i]) for i in wanted}
        for j in range(1, max(wanted.values(), default=0) + 1):
            active = [i for i, k in wanted.items() if k >= j]
            logits = torch.cat(self._forward([StepRow(batch[i].request_id, feed[i], all_logits=False) for i in active], result))  # [active, vocab]
            argmax = logits.argmax(dim=-1).tolist()  # [active]: one transfer for the greedy rows
            for i, row, best in zip(active, logits, argmax):
                token, dist = (best, None) if batch[i].sampling.greedy else self._sample(batch[i], row, len(batch[i].context) + j - 1)
                result.drafts[i].append(token)
                if sampled:
                    result.distributions[i].append(dist)
                feed[i] = [token]
        for i, k in wanted.items():
            row = self._rows[batch[i].request_id]
            row.synced = len(batch[i].context)
            row.drafts = result.drafts[i][: k - 1]  # the last draft was never fed
        return result
