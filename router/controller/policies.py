"""The speculation policies that ask the controller: 'goodput' (k per request) and 'uniform' (one k
for the whole batch, the published baseline). Both plug into the scheduler like any other policy."""

from __future__ import annotations

from typing import Sequence

from router.controller.controller import MODEL_FREE_DRAFTERS, Slot, SpeculationController
from router.policy import RequestView, SpeculationPolicy

MODES = ("goodput", "uniform")


def slots_of(views: Sequence[RequestView], caps: Sequence[int]) -> list[Slot]:
    return [Slot(v.request_id, v.drafter, cap, v.context_tokens) for v, cap in zip(views, caps)]


class ControllerPolicy(SpeculationPolicy):
    """Decides k from predicted goodput (docs/design.md section 3).

    Propose-then-truncate: a model-free drafter (prompt lookup) is asked for everything the request may
    verify, since proposing costs next to nothing, and ``refine`` then picks what to verify once it is
    known which requests matched and how far. A draft model pays a forward per token, so its k is
    decided before drafting (and may still be cut after).
    """

    def __init__(self, controller: SpeculationController, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown controller policy {mode!r}; one of {', '.join(MODES)}")
        self.controller = controller
        self.mode = mode

    @property
    def name(self) -> str:
        return self.mode

    def choose(self, batch: Sequence[RequestView]) -> list[int]:
        caps = [min(v.max_k, self.controller.k_max) for v in batch]
        ks = self.controller.decide(slots_of(batch, caps), self.mode)
        return [cap if v.drafter in MODEL_FREE_DRAFTERS else k for v, cap, k in zip(batch, caps, ks)]

    def refine(self, batch: Sequence[RequestView], asked: Sequence[int], lengths: Sequence[int]) -> list[int]:
        caps = [min(a, n) for a, n in zip(asked, lengths)]
        return self.controller.decide(slots_of(batch, caps), self.mode)


def controller_policies(controller: SpeculationController) -> dict[str, SpeculationPolicy]:
    """The named policies to register with the router's PolicyRegistry."""
    return {mode: ControllerPolicy(controller, mode) for mode in MODES}
