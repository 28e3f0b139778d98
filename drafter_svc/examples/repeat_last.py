"""A complete custom drafter: it proposes the request's last committed token, repeated.

Run it with `smartspec serve drafter --kind drafter_svc.examples.repeat_last:RepeatLastDrafter`.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from drafter_svc.base import Drafter, Proposal, SyncedRequest
from smartspec.config import add_flag


class RepeatLastDrafter(Drafter):
    """Stateless and model-free: every request in the batch gets min(k, max_repeat) copies of its
    last token (the context is already in sync when `propose` is called)."""

    kind = "repeat_last"

    def __init__(self, max_repeat: int = 4) -> None:
        self.max_repeat = max_repeat

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_flag(parser, "--max-repeat", type=int, default=4, help="most copies proposed per request")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RepeatLastDrafter":
        return cls(max_repeat=args.max_repeat)

    def propose(self, batch: Sequence[SyncedRequest]) -> Proposal:
        return Proposal(drafts=[[request.context[-1]] * min(request.k, self.max_repeat) for request in batch])
