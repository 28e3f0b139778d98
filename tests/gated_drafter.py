"""A drafter backend that makes a service's lifecycle observable to tests, run as
`smartspec serve drafter --kind tests.gated_drafter:GatedDrafter`.

Building it (the service's "model load") waits until --gate-file exists, so a test decides how long the
service stays loading. Each proposal first creates --started-file and then takes --propose-delay-s, so a
test knows a call is in flight when it sends SIGTERM.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

from drafter_svc.base import Drafter, Proposal, SyncedRequest
from smartspec.config import add_flag

GATE_TIMEOUT_S = 60.0


class GatedDrafter(Drafter):
    """Proposes the request's last token repeated k times."""

    kind = "gated"

    def __init__(self, started_file: str = "", delay_s: float = 0.0) -> None:
        self.started_file = started_file
        self.delay_s = delay_s

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_flag(parser, "--gate-file", default="", help="loading waits until this file exists")
        add_flag(parser, "--started-file", default="", help="created when a proposal starts")
        add_flag(parser, "--propose-delay-s", type=float, default=0.0, help="how long each proposal takes")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "GatedDrafter":
        deadline = time.monotonic() + GATE_TIMEOUT_S
        while args.gate_file and not Path(args.gate_file).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{args.gate_file} did not appear within {GATE_TIMEOUT_S:.0f}s")
            time.sleep(0.05)
        return cls(args.started_file, args.propose_delay_s)

    def propose(self, batch: Sequence[SyncedRequest]) -> Proposal:
        if self.started_file:
            Path(self.started_file).touch()
        time.sleep(self.delay_s)
        return Proposal(drafts=[[request.context[-1]] * request.k for request in batch])
