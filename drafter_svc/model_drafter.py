"""What the drafters that run a local causal LM share (``draft_model`` proposes chains, ``tree`` token
trees): loading the model and its flags, one KV row per request kept in sync with the committed
context, and batched forwards whose work is added to the Proposal's measurements.

Each request's KV row holds a prefix of its committed context, possibly followed by drafts the backend
fed last time and chose to keep (``_Row.drafts``). On the next call the row is kept up to the longest
common prefix of those drafts and the newly committed tokens, and cut there (rollback after a
rejection); only the committed tokens past that point are fed, never the prefix again. A request with
k=0 costs no forward: its committed tokens are fed on its next call with k > 0.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from drafter_svc.base import Drafter, Proposal, SyncedRequest
from smartspec.config import add_model_flags
from smartspec.protocol import common_prefix_length
from smartspec.runtime.runner import StepResult, StepRow
from smartspec.wire import common_pb2


def at_least_one(name: str, value: int) -> int:
    """A backend option that must be positive, checked before the model loads."""
    if value < 1:
        raise ValueError(f"{name} must be at least 1 (got {value})")
    return value


@dataclass
class _Row:
    """What one request's KV row holds: `synced` committed tokens, then `drafts` fed last call."""

    synced: int = 0
    drafts: list[int] = field(default_factory=list)


class ModelDrafter(Drafter):
    """Base of the drafters that run a local causal LM sharing the target's tokenizer."""

    def __init__(
        self, draft_model: str = "embedded", device: str = "cpu", dtype: str = "float32", max_sequences: int = 32, max_context: int = 0,
        kv_cache_gb: float = 1.0,
    ) -> None:
        from smartspec.runtime.loading import load_runner

        self.runner, self._info = load_runner(draft_model, "draft", device, dtype, max_sequences, max_context, kv_cache_gb)
        self._rows: dict[str, _Row] = {}

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_model_flags(parser, "draft")

    @staticmethod
    def model_options(args: argparse.Namespace) -> dict[str, Any]:
        """The constructor arguments that `add_model_flags` declared, from the parsed flags."""
        return dict(
            draft_model=args.draft_model, device=args.device, dtype=args.dtype, max_sequences=args.max_sequences,
            max_context=args.max_context, kv_cache_gb=args.kv_cache_gb,
        )

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

    def _budgets(self, batch: Sequence[SyncedRequest]) -> dict[int, int]:
        """Syncs every request's row; returns batch index -> tokens to draft, for the requests with
        any (k within the context limit: the last draft sits at the limit and is never fed)."""
        wanted: dict[int, int] = {}
        for i, request in enumerate(batch):
            self._sync_row(request)
            k = min(request.k, self.runner.max_context - len(request.context) + 1)
            if k > 0:
                wanted[i] = k
        return wanted

    def _unfed(self, request: SyncedRequest) -> list[int]:
        """The committed tokens not in the request's KV yet (at least its last one, for its logits)."""
        return list(request.context[self._rows[request.request_id].synced :])

    # --- forwards -------------------------------------------------------------------------------
    def _forward(self, rows: list[StepRow], totals: Proposal) -> list[torch.Tensor]:
        """Feeds the rows and returns each row's requested logits ([picked, vocab] per row), adding the
        work to `totals`."""
        step: StepResult = self.runner.step(rows)
        totals.forward_s += step.forward_s
        totals.num_forwards += step.num_forwards
        totals.new_tokens += step.new_tokens
        totals.context_tokens += step.context_tokens
        return step.logits
