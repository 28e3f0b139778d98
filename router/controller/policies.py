"""The speculation policies that ask the controller: 'goodput' (k per request) and 'uniform' (one k
for the whole batch, the published baseline). Both plug into the scheduler like any other policy."""

from __future__ import annotations

from typing import Sequence

from router.controller.controller import Slot, SpeculationController
from router.policy import RequestView, SpeculationPolicy

MODES = ("goodput", "uniform")


def slots_of(views: Sequence[RequestView], caps: Sequence[int]) -> list[Slot]:
    return [Slot(v.request_id, v.drafter, cap, v.context_tokens) for v, cap in zip(views, caps)]


class ControllerPolicy(SpeculationPolicy):
    """Decides k from predicted goodput (docs/design.md section 3).

    Every drafter is asked for the k the controller decides before drafting, and ``refine`` decides again
    once the proposals are known (a prompt-lookup request without a match drops out, which may make
    speculation no longer pay for the others). Asking a model-free drafter (prompt lookup) for everything
    a request may verify looks free but need not be at scale: in the simulator, with the GPU profile's
    *estimated* 1 microsecond per proposed token, asking 8 tokens of each of 256 requests added a share
    of every step that made goodput 1.15x slower than no speculation (1.00x asking the decided k); on
    the CPU profile the change made no difference.
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
        return self.controller.decide(slots_of(batch, caps), self.mode)

    def refine(self, batch: Sequence[RequestView], asked: Sequence[int], lengths: Sequence[int]) -> list[int]:
        caps = [min(a, n) for a, n in zip(asked, lengths)]
        return self.controller.decide(slots_of(batch, caps), self.mode)


def controller_policies(controller: SpeculationController) -> dict[str, SpeculationPolicy]:
    """The named policies to register with the router's PolicyRegistry."""
    return {mode: ControllerPolicy(controller, mode) for mode in MODES}
