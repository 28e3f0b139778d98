"""How much prefill rides along with the decoding requests in a step, paced by measured step times.

One token goes to each decoding request and the rest of the step's room to prefill chunks, in
admission order (first come, first served), so that running streams slow down, never stall, while a
prompt is prefilled. The room is sized so that a step carrying prefill takes about PREFILL_STRETCH
times a step that does not (`PrefillPacer`, from the loop's own step times): the running streams'
gaps grow by that much while a prompt goes in, and the prompt takes about
PREFILL_STRETCH / (PREFILL_STRETCH - 1) times its prefill alone (a step of decoding per chunk). A fixed
token budget cannot hold that balance: a chunk's cost grows with the context it attends to and the
decoding step's with the batch, and both differ by orders of magnitude between a CPU and a GPU. Until a
loop has measured both kinds of step it uses UNPACED_STEP_TOKENS, and while prompts keep every step
busy it leaves a step without prefill now and then to keep its measure of decoding current. The router's replica loops and the
simulator's step loop both plan their chunks here, so the simulator steps the way the router does.
"""

from __future__ import annotations

from typing import Sequence

# The most tokens a step carries (decoding requests' and prefill chunks'; drafts come on top): a bound
# on one step's memory and time whatever the pacing says (--max-step-tokens).
DEFAULT_MAX_STEP_TOKENS = 512
# A step that prefills takes about this many times a step that only decodes. The two goals it balances
# (docs/engine.md, "Chunked prefill"): the longest gap between a stream's tokens, about this factor
# times the usual one, and a prompt's time to first token beside running streams, about
# factor / (factor - 1) times its prefill alone.
PREFILL_STRETCH = 2.25
# The step budget before the loop has timed a step with prefill and one without: on one core of the
# reference CPU a decode step of 8 requests costs ~150 ms and a prefill token ~4 ms, so 40 prefill
# tokens beside 8 decoding keep such a step near 2x a decode step.
UNPACED_STEP_TOKENS = 48
# However many requests decode, a prefill advances at least this many tokens a step.
MIN_PREFILL_TOKENS = 16
# Weight of the newest step in the running estimates (about the last 1 / SMOOTHING steps count).
SMOOTHING = 0.3
# While prompts wait, every step may carry prefill and none shows what decoding alone costs: the pacer
# then leaves one step without prefill (a probe) when it has no such measurement, when the decoding batch
# has changed by more than this factor since, or after PROBE_EVERY steps.
PROBE_BATCH_CHANGE = 1.25
PROBE_EVERY = 32


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


class PrefillPacer:
    """Sizes each step's prefill from the step times one loop measures: a running estimate of a step
    that only decodes and of the extra seconds a prefill token adds beside it. Feed it every step
    (`observe`); ask it for the coming step's chunks (`plan`)."""

    def __init__(self, max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS, stretch: float = PREFILL_STRETCH) -> None:
        if max_step_tokens < 1:
            raise ValueError(f"max_step_tokens must be at least 1 (got {max_step_tokens})")
        if stretch <= 1.0:
            raise ValueError(f"stretch must be above 1 (got {stretch}): a step that prefills costs more than one that does not")
        self.max_step_tokens = max_step_tokens
        self.stretch = stretch
        self.decode_s: float | None = None  # a step of `_decode_batch` decoding requests without prefill
        self.token_s: float | None = None  # what one prefill token adds to such a step
        self._decode_batch = 0
        self._since_decode = 0  # steps with prefill since the last without

    def room(self, decoding: int) -> int:
        """Prefill tokens the coming step may carry beside `decoding` decoding requests (0: a probe).
        With nothing decoding there is no stream to hold back: the whole cap."""
        if not decoding:
            return self.max_step_tokens
        if self._stale(decoding):
            return 0
        cap = self.max_step_tokens - decoding
        if self.decode_s is None or self.token_s is None:
            paced = UNPACED_STEP_TOKENS - decoding
        else:
            paced = int((self.stretch - 1.0) * self.decode_s / self.token_s)
        return max(min(paced, cap), MIN_PREFILL_TOKENS)

    def _stale(self, decoding: int) -> bool:
        """Whether the decode-only estimate no longer stands for a step of `decoding` requests."""
        if self.decode_s is None or self._since_decode >= PROBE_EVERY:
            return True
        return not 1 / PROBE_BATCH_CHANGE <= decoding / self._decode_batch <= PROBE_BATCH_CHANGE

    def plan(self, decoding: int, prefill_left: Sequence[int]) -> list[int]:
        """The coming step's prefill tokens per request being prefilled (see plan_chunks)."""
        return plan_chunks(self.room(decoding), decoding, prefill_left)

    def observe(self, step_s: float, decoding: int, prefill_tokens: int) -> None:
        """A finished step: its wall time, how many requests it decoded and how many prefill tokens it
        carried. Steps that only prefill (nothing decoding) say nothing about the balance."""
        if decoding == 0 or step_s <= 0:
            return
        if prefill_tokens == 0:
            alike = self.decode_s is not None and not self._stale(decoding)
            self.decode_s = _blend(self.decode_s if alike else None, step_s)
            self._decode_batch, self._since_decode = decoding, 0
        elif self.decode_s is not None:
            self._since_decode += 1
            extra = max(step_s - self.decode_s, 0.01 * self.decode_s) / prefill_tokens  # noise can put a step below the estimate
            self.token_s = _blend(self.token_s, extra)


def _blend(estimate: float | None, sample: float) -> float:
    return sample if estimate is None else (1.0 - SMOOTHING) * estimate + SMOOTHING * sample
