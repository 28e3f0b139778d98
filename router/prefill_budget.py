"""How much prefill rides along with the decoding requests in a step, paced by the cost model.

One token goes to each decoding request and the rest of the step's room to prefill chunks, in
admission order (first come, first served), so that running streams slow down, never stall, while a
prompt is prefilled. The room is sized so that a step carrying prefill is predicted to take about
PREFILL_STRETCH times the same step without it, both priced with no speculation: the running streams'
gaps grow by that much while a prompt goes in, and the prompt takes about
PREFILL_STRETCH / (PREFILL_STRETCH - 1) times its prefill alone (a step of decoding per chunk). When
more prompts wait than requests decode, the stretch grows with the prompts per stream (stretch_for). A fixed
token budget cannot hold that balance: a chunk's cost grows with the context it attends to and the
decoding step's with the batch, and both differ by orders of magnitude between a CPU and a GPU.

The prices come from the controller's verify cost model (`SpeculationController.prefill_pricer`), which
is fitted at startup and refitted from every live step. Priced at k = 0, a prompt's chunks are the
same whatever policy the running requests speculate under, so policies are compared on equal prompt
waits; an earlier pacer sized chunks from the loop's measured step times, whose speculation then set
how fast prompts went in (docs/engine.md, "Chunked prefill"). The router's replica loops and the
simulator's step loop both plan their chunks here, so the simulator steps the way the router does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

# The most tokens a step carries (decoding requests' and prefill chunks'; drafts come on top): a bound
# on one step's memory and time whatever the pacing says (--max-step-tokens).
DEFAULT_MAX_STEP_TOKENS = 512
# A step that prefills takes about this many times a step that only decodes (more when the prompts
# outnumber the decoding requests: PrefillPacer.stretch_for). The two goals it balances
# (docs/engine.md, "Chunked prefill"): the longest gap between a stream's tokens, about this factor
# times the usual one, and a prompt's time to first token beside running streams, about
# factor / (factor - 1) times its prefill alone.
PREFILL_STRETCH = 2.25
# However many requests decode, a prefill advances at least this many tokens a step.
MIN_PREFILL_TOKENS = 16

# Predicted seconds of the coming step with no speculation when the prompts being prefilled get these
# many tokens each (in admission order; 0 for one that waits this step).
StepPricer = Callable[[Sequence[int]], float]


def plan_chunks(room: int, decoding: int, prefill_left: Sequence[int]) -> list[int]:
    """Prefill tokens this step for each request still being prefilled (`prefill_left`: its tokens not
    yet in the KV cache, in admission order; 0 for a request that is decoding), `room` tokens in all.
    With no request decoding there is no stream to hold back, so the first prompt in line goes whole
    (the others would wait for it anyway), in one forward rather than a step per chunk."""
    if not decoding:
        room = max(room, next((left for left in prefill_left if left), 0))
    chunks = []
    for left in prefill_left:
        take = min(left, room)
        chunks.append(take)
        room -= take
    return chunks


@dataclass(frozen=True)
class PrefillPacer:
    """Sizes each step's prefill: the most tokens (within the step cap, at least MIN_PREFILL_TOKENS)
    whose step is priced at no more than `stretch` times the step without them."""

    max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS
    stretch: float = PREFILL_STRETCH

    def __post_init__(self) -> None:
        if self.max_step_tokens < 1:
            raise ValueError(f"max_step_tokens must be at least 1 (got {self.max_step_tokens})")
        if self.stretch <= 1.0:
            raise ValueError(f"stretch must be above 1 (got {self.stretch}): a step that prefills costs more than one that does not")

    def stretch_for(self, decoding: int, prefilling: int) -> float:
        """How many times the decode-only step a step may take with `prefilling` prompts beside
        `decoding` streams. Up to as many prompts as streams, `stretch`; beyond, what prefill adds grows
        with the prompts per stream: each waiting prompt is a user waiting as much as each stream, and a
        pace set by a handful of streams (few because the rest are still waiting for their prompts)
        would otherwise starve admission and keep the batch small."""
        return 1.0 + (self.stretch - 1.0) * max(1.0, prefilling / max(decoding, 1))

    def room(self, decoding: int, prefill_left: Sequence[int], price: StepPricer) -> int:
        """Prefill tokens the coming step may carry beside `decoding` decoding requests. With nothing
        decoding there is no stream to hold back: the whole cap. Prices grow with the room, so the
        largest room within the stretch is found by bisection (about ten prices)."""
        if not decoding:
            return self.max_step_tokens
        low, high = MIN_PREFILL_TOKENS, max(self.max_step_tokens - decoding, MIN_PREFILL_TOKENS)
        high = min(high, max(sum(prefill_left), low))  # more room than the prompts need changes nothing
        target = self.stretch_for(decoding, sum(1 for left in prefill_left if left)) * price([0] * len(prefill_left))
        while low < high:  # the largest room in [low, high] priced within target (low when none is)
            middle = (low + high + 1) // 2
            if price(plan_chunks(middle, decoding, prefill_left)) <= target:
                low = middle
            else:
                high = middle - 1
        return low

    def plan(self, decoding: int, prefill_left: Sequence[int], price: StepPricer) -> list[int]:
        """The coming step's prefill tokens per request being prefilled (see plan_chunks)."""
        return plan_chunks(self.room(decoding, prefill_left, price), decoding, prefill_left)
