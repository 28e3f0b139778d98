"""Choosing speculation lengths by maximising predicted goodput (docs/design.md sections 2 and 3).

For one step over batch B with speculation lengths k_i:

    goodput(k) = sum_i E_i(k_i) / T_step(k),   E_i(k) = 1 + a_i + ... + a_i^k

(or, for a token tree, E_i(k) = 1 + the sum of its first k nodes' chances of being accepted: any
non-increasing per-request gain curve goes the same way)

where T_step = base + c_tok * sum(k) + c_jump * [sum(k) >= j] + c_excess * max(0, sum(k) - m)
             + sum over drafters d of (d_any * [d drafts] + d_pos * max k under d + d_tok * sum k under d),

j and m being how many draft tokens the step can add before it crosses the cost model's jump and knee
(cost_model.Breakpoints, less the tokens the step has anyway: one per request and its prefill chunks).

Our policy is per request: adding the j-th token to request i gains a_i^j tokens and costs
c_tok + d_tok of its drafter, so candidates are taken in order of gain per cost (marginal gains
fall with j, so each request's tokens come in order) and the best allocation seen on the way is kept.
The jump means goodput may dip before it rises, so the walk never stops at the first dip; the knee
only makes later tokens dearer. When only c_tok and the jump matter (one drafter, no per-position cost) this
ordering is exactly optimal for the model; the per-position and per-drafter terms make it a close
approximation (tests/test_controller_allocator.py bounds the gap against brute force).

The published baseline ("uniform") picks one k for the whole batch: argmax of goodput over k = 0..K,
stopping at the first k that is worse than the one before.

A step that also prefills (chunked prefill) completes its chunks' tokens whatever k is: they count in
goodput like generated tokens (``StepCost.fixed_tokens``), so a draft token must then beat a higher rate
to be worth its time, and speculation shrinks while prefill is heavy and grows when it is light. A
chunk also changes what a draft costs beside it (past the jump, nearer the knee): the controller's
StepCost says so. Two other rules were measured and not kept (docs/design.md, "Beside a prefill").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from router.controller.acceptance import expected_tokens


@dataclass(frozen=True)
class DrafterCost:
    """Per-step cost of one drafter: once if it drafts at all, per draft position, per draft token."""

    any_s: float = 0.0
    position_s: float = 0.0
    token_s: float = 0.0

    def time(self, drafting, deepest, tokens):
        """Seconds of a Propose: whether it drafts at all, its deepest draft and its draft tokens
        (numbers, or arrays of them alike)."""
        return self.any_s * drafting + self.position_s * deepest + self.token_s * tokens


@dataclass(frozen=True)
class StepCost:
    """The step-time model flattened for one step's decision (base = the step with every k = 0)."""

    base_s: float
    token_s: float
    jump_s: float
    drafters: dict[str, DrafterCost] = field(default_factory=dict)
    fixed_tokens: float = 0.0  # tokens the step completes whatever k is: its prefill chunks'
    jump_after: int = 1  # the jump is paid once the step verifies this many draft tokens
    knee_after: float = float("inf")  # draft tokens past this many cost excess_s more each
    excess_s: float = 0.0

    def drafts_time(self, drafts):
        """What `drafts` draft tokens in all (a number, or an array of them) add to the base step, before
        the drafters' own costs."""
        past_knee = np.maximum(drafts - self.knee_after, 0) if isinstance(drafts, np.ndarray) else max(drafts - self.knee_after, 0)
        return self.token_s * drafts + self.jump_s * (drafts >= self.jump_after) + self.excess_s * past_knee

    def step_time(self, ks: Sequence[int], drafters: Sequence[str]) -> float:
        total = self.base_s + self.drafts_time(sum(ks))
        for name, cost in self.drafters.items():
            mine = [k for k, d in zip(ks, drafters) if d == name]
            if any(mine):
                total += cost.time(1, max(mine), sum(mine))
        return total

    def alone_time(self, k: int, drafter: str) -> float:
        """step_time([k], [drafter]) for k > 0: one request alone in its step."""
        return self.base_s + self.drafts_time(k) + self.drafters[drafter].time(1, k, k)


@dataclass(frozen=True)
class Candidate:
    """One running request as the allocator sees it."""

    acceptance: float  # estimated a_i for its drafter
    cap: int  # most tokens it may speculate this step (K_max, token budget, proposal length); 0 = none
    drafter: str  # its drafter for this step
    # The marginal gain of its j-th draft token, j = 1.., non-increasing (a token tree's nodes in
    # best-first order: each one's chance of being accepted); None: the geometric a^j. Past its
    # end a token gains nothing.
    gains: tuple[float, ...] | None = None

    def expected(self, k: int) -> float:
        """E(k): tokens expected from one verify of k draft tokens (or tree nodes)."""
        if self.gains is not None:
            return 1.0 + float(sum(self.gains[:k]))
        return expected_tokens(self.acceptance, k)


def expected_total(candidates: Sequence[Candidate], ks: Sequence[int]) -> float:
    """sum_i E_i(k_i)."""
    return float(sum(c.expected(k) for c, k in zip(candidates, ks)))


def predicted_goodput(candidates: Sequence[Candidate], ks: Sequence[int], cost: StepCost) -> float:
    """Expected tokens per second of the whole step for speculation lengths `ks`: generated, and
    prefilled beside them (cost.fixed_tokens)."""
    return (expected_total(candidates, ks) + cost.fixed_tokens) / cost.step_time(ks, [c.drafter for c in candidates])


def allocate_goodput(candidates: Sequence[Candidate], cost: StepCost) -> list[int]:
    """Per-request k maximising predicted goodput: greedy by marginal gain per marginal cost.

    A draft model pays per draft *position* (one forward each), which the per-token ordering cannot
    see, so the walk is repeated under each depth cap D = 1..K (tokens deeper than D skipped) and the
    best allocation over all walks is returned.
    """
    n = len(candidates)
    caps = np.array([c.cap for c in candidates], dtype=np.int64)  # [batch]
    k_max = int(caps.max(initial=0))
    if n == 0 or k_max == 0:
        return [0] * n
    rates = np.array([c.acceptance for c in candidates])  # [batch]
    names = sorted({c.drafter for c in candidates})
    drafter_of = np.array([names.index(c.drafter) for c in candidates])  # [batch]
    drafter_costs = [cost.drafters.get(name, DrafterCost()) for name in names]
    drafter_token = np.array([d.token_s for d in drafter_costs])[drafter_of]  # [batch]: the drafter's cost per token
    token_cost = cost.token_s + drafter_token  # [batch]

    positions = np.arange(1, k_max + 1)  # [K]
    gains = rates[:, None] ** positions[None, :]  # [batch, K]: a_i^j, the gain of request i's j-th token
    for i, c in enumerate(candidates):
        if c.gains is not None:  # its own curve (a token tree's nodes)
            own = np.array(c.gains[:k_max], dtype=float)  # [<= K]
            gains[i] = np.pad(own, (0, k_max - len(own)))
    rows, cols = np.nonzero(positions[None, :] <= caps[:, None])  # row-major: each request's tokens in order
    ratio = gains[rows, cols] / np.maximum(token_cost[rows], 1e-12)
    order = np.argsort(-ratio, kind="stable")
    rows, cols = rows[order], cols[order]  # [M]: the walk, best gain per cost first
    walk_gain, walk_cost = gains[rows, cols], drafter_token[rows]  # [M]

    # Walks to try, all evaluated at once as rows of [walks, M] arrays: every depth cap for the drafters
    # that pay per position, and each drafter with a fixed cost left out entirely (the per-token order
    # cannot see fixed costs). A skipped token adds nothing, so its prefix repeats the one before it.
    positional = np.array([d.position_s > 0 for d in drafter_costs])[drafter_of[rows]]  # [M]
    depth_caps = range(1, k_max + 1) if positional.any() else [k_max]
    walks = [(cols < cap) | ~positional for cap in depth_caps]
    if len(names) > 1:
        walks += [drafter_of[rows] != index for index, d in enumerate(drafter_costs) if d.any_s > 0 or d.position_s > 0]
    keep = np.stack(walks)  # [W, M]
    zero = np.zeros((len(keep), 1))
    tokens = n + cost.fixed_tokens + np.hstack([zero, np.cumsum(walk_gain * keep, axis=1)])  # [W, M + 1]
    drafts = np.hstack([zero, np.cumsum(keep, axis=1)])  # [W, M + 1]: draft tokens verified
    time_s = cost.base_s + cost.drafts_time(drafts) + np.hstack([zero, np.cumsum(walk_cost * keep, axis=1)])  # [W, M + 1]
    for index, drafter in enumerate(drafter_costs):
        if drafter.any_s == 0 and drafter.position_s == 0:
            continue
        mine = (drafter_of[rows] == index) & keep  # [W, M]
        used = np.cumsum(mine, axis=1) > 0  # [W, M]
        depth = np.maximum.accumulate(np.where(mine, cols + 1, 0), axis=1)  # [W, M]
        time_s[:, 1:] += drafter.time(used, depth, 0)  # its tokens are in walk_cost
    goodput = tokens / time_s  # [W, M + 1]
    walk, prefix = np.unravel_index(int(np.argmax(goodput)), goodput.shape)
    best_rows = rows[:prefix][keep[walk, :prefix]]
    return np.bincount(best_rows, minlength=n).tolist()


def allocate_uniform(candidates: Sequence[Candidate], cost: StepCost, k_max: int) -> list[int]:
    """The published batch-wide policy: one k for all (each capped by its request), argmax of
    predicted goodput over k = 0..k_max with early exit at the first decrease."""
    best_ks, best = [0] * len(candidates), -1.0
    for k in range(k_max + 1):
        ks = [min(k, c.cap) for c in candidates]
        value = predicted_goodput(candidates, ks, cost)
        if value < best:
            break
        best_ks, best = ks, value
    return best_ks
