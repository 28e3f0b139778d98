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
c_tok + d_tok of its drafter. A first walk takes candidates in order of gain per cost (marginal gains
fall with j, so each request's tokens come in order) and keeps the best allocation seen on the way; the
jump means goodput may dip before it rises, so no walk stops at the first dip. That order alone misses
when the jump comes a few tokens in: which tokens to take before it is a small knapsack, where a dearer
token of higher gain can beat a cheaper one of better ratio (6.4% lost in a pinned test). So Dinkelbach
steps follow: with lambda the best goodput found, a walk by
gain - lambda * cost. The jump and the knee depend only on how many drafts the step verifies, so at
every count that walk's prefix has the most tokens - lambda * seconds, and if any allocation beats
lambda, so does one of its prefixes; steps repeat while lambda improves (DINKELBACH_STEPS caps them). A drafter's cost per step and per position no per-token order can
see, so every walk is scored under each depth cap and with each set of fixed-cost drafters left out.
With at most one drafter paying per position this reaches the model's optimum (asserted against brute
force in tests/test_controller_allocator.py); two such drafters share one depth cap and can miss (the
tests bound it at 5%).

The published baseline ("uniform") picks one k for the whole batch: argmax of goodput over k = 0..K,
stopping at the first k that is worse than the one before.

A step that also prefills (chunked prefill) runs its chunks whatever k is, and the prefill pacer sizes
them at k = 0 (router/prefill_budget.py), so drafts never displace prompt tokens: they only add time.
The chunks' own time is therefore kept out of the goodput (``StepCost.base_s`` is the step at k = 0
without them) and a draft must beat the rate the decoding rows have on their own; what a draft costs
beside a chunk (past the jump the chunk pays, nearer the knee) the controller's StepCost says. Two
other rules were measured and not kept (docs/design.md, "Beside a prefill"); so was weighing a draft's
seconds by the prompts waiting beside it, once the prefill pacer widened with them (docs/design.md,
"Beside waiting prompts").
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from router.controller.acceptance import expected_tokens

DINKELBACH_STEPS = 4  # at most; each is one more walk


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
    """The step-time model flattened for one step's decision (base = the step with every k = 0, less the
    time of any prefill chunks it carries: module docstring)."""

    base_s: float
    token_s: float
    jump_s: float
    drafters: dict[str, DrafterCost] = field(default_factory=dict)
    jump_after: int = 1  # the jump is paid once the step verifies this many draft tokens
    knee_after: float = float("inf")  # draft tokens past this many cost excess_s more each
    excess_s: float = 0.0
    prefill_s: float = 0.0  # the prefill chunks' own time: in the step, not in the goodput a draft must raise

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
    """Expected tokens per second the step generates with speculation lengths `ks`."""
    return expected_total(candidates, ks) / cost.step_time(ks, [c.drafter for c in candidates])


class _Walks:
    """One step's candidate draft tokens, and the best prefix of a walk through them in a given order.

    Only tokens worth more than the step without speculation are kept: with every cost non-negative (the
    NNLS fits make them so), removing a request's last token from an allocation whose goodput is at
    least `floor` raises it when the token's gain is below floor * its cost per token, so the optimum
    never takes one.

    A walk's prefixes are scored under several variants at once (rows of [W, m] arrays): every depth cap
    for the drafters that pay per position, crossed with every set of the drafters that have a fixed cost
    left out (a per-token order sees neither cost). Which tokens a variant skips does not depend on the
    order, so it is worked out once here; `best` is then called once per ordering.
    """

    def __init__(self, candidates: Sequence[Candidate], cost: StepCost, caps: np.ndarray, k_max: int) -> None:
        self.n, self.cost = len(candidates), cost
        self.floor = self.n / max(cost.base_s, 1e-12)  # goodput with every k = 0
        names = sorted({c.drafter for c in candidates})
        self.drafter_costs = [cost.drafters.get(name, DrafterCost()) for name in names]
        index = {name: i for i, name in enumerate(names)}
        drafter_of = np.array([index[c.drafter] for c in candidates])  # [batch]
        drafter_token = np.array([d.token_s for d in self.drafter_costs])[drafter_of]  # [batch]: the drafter's cost per token

        positions = np.arange(1, k_max + 1)  # [K]
        rates = np.array([c.acceptance for c in candidates])  # [batch]
        gains = rates[:, None] ** positions[None, :]  # [batch, K]: a_i^j, the gain of request i's j-th token
        for i, c in enumerate(candidates):
            if c.gains is not None:  # its own curve (a token tree's nodes)
                own = np.array(c.gains[:k_max], dtype=float)  # [<= K]
                gains[i] = np.pad(own, (0, k_max - len(own)))
        token_cost = cost.token_s + drafter_token  # [batch]: what one more draft token adds to the step
        # a tie is kept (float rounding decides it, as in the walk)
        worth = (positions[None, :] <= caps[:, None]) & (gains >= self.floor * token_cost[:, None] * (1 - 1e-9))  # [batch, K]
        self.rows, cols = np.nonzero(worth)  # [M]: row-major, so each request's tokens in order
        self.gain, self.token_cost, self.depth = gains[self.rows, cols], token_cost[self.rows], cols + 1  # [M]
        self.drafter = drafter_of[self.rows]  # [M]
        self.per_token = np.stack([self.gain, drafter_token[self.rows]])  # [2, M]: what it adds to tokens and drafter seconds
        self.step_s = cost.base_s + cost.drafts_time(np.arange(len(cols) + 1))  # [M + 1]: the step by how many drafts it verifies

        # the drafters with a fixed cost (per step or per position) that have tokens left
        self.fixed = [i for i in np.unique(self.drafter) if self.drafter_costs[i].any_s > 0 or self.drafter_costs[i].position_s > 0]
        positional = np.array([d.position_s > 0 for d in self.drafter_costs])  # [drafters]
        keep = []  # [W, M] blocks
        for size in range(min(len(self.fixed), len(names) - 1) + 1):  # never every drafter
            for left_out in itertools.combinations(self.fixed, size):
                present = np.ones(len(names), dtype=bool)  # [drafters]
                present[list(left_out)] = False
                capped = (positional & present)[self.drafter]  # [M]: tokens a depth cap applies to
                depth_caps = np.arange(1, self.depth[capped].max(initial=1) + 1)  # [caps]: the last one caps nothing
                keep.append(present[self.drafter] & ((self.depth <= depth_caps[:, None]) | ~capped))
        self.keep = np.concatenate(keep)  # [W, M]: whether each variant takes each token

    def best(self, order: np.ndarray) -> tuple[float, np.ndarray]:
        """Best predicted goodput over every prefix of the walk `order` (indices of tokens, each request's
        in order) under every variant, with its ks [batch]. A token a variant skips adds nothing, so its
        prefix repeats the one before it."""
        keep = self.keep[:, order]  # [W, m]
        sums = np.zeros((2, len(keep), len(order) + 1))  # [2, W, m + 1]: tokens and drafter seconds of each prefix
        np.cumsum(keep * self.per_token[:, None, order], axis=2, out=sums[:, :, 1:])
        drafts = np.zeros(sums.shape[1:], dtype=np.int64)  # [W, m + 1]: draft tokens verified
        np.cumsum(keep, axis=1, out=drafts[:, 1:])
        time_s = self.step_s[drafts] + sums[1]  # [W, m + 1]
        drafter = self.drafter[order]  # [m]
        for index in self.fixed:
            cost, mine = self.drafter_costs[index], keep & (drafter == index)  # [W, m]
            if cost.position_s > 0:
                depth = np.maximum.accumulate(mine * self.depth[order], axis=1)  # [W, m]
                time_s[:, 1:] += cost.time(depth > 0, depth, 0)  # its tokens are in sums[1]
            else:
                time_s[:, 1:] += cost.any_s * np.logical_or.accumulate(mine, axis=1)
        goodput = (self.n + sums[0]) / time_s  # [W, m + 1]
        walk, prefix = np.unravel_index(int(np.argmax(goodput)), goodput.shape)
        taken = order[:prefix][keep[walk, :prefix]]
        return float(goodput[walk, prefix]), np.bincount(self.rows[taken], minlength=self.n)


def allocate_goodput(candidates: Sequence[Candidate], cost: StepCost) -> list[int]:
    """Per-request k maximising predicted goodput: a walk by gain per cost, then Dinkelbach walks by
    gain - lambda * cost while lambda, the best goodput found, improves (module docstring). Each walk is
    scored under every depth cap and with fixed-cost drafters left out (`_Walks`)."""
    n = len(candidates)
    caps = np.array([c.cap for c in candidates], dtype=np.int64)  # [batch]
    k_max = int(caps.max(initial=0))
    if n == 0 or k_max == 0:
        return [0] * n
    walks = _Walks(candidates, cost, caps, k_max)
    # Stable sorts of the row-major tokens: a request's gains do not rise and its cost per token is one
    # number, so its tokens keep their order in every walk.
    order = np.argsort(-walks.gain / np.maximum(walks.token_cost, 1e-12), kind="stable")  # [M]
    best, ks = walks.best(order)
    for _ in range(DINKELBACH_STEPS):
        value = walks.gain - best * walks.token_cost  # [M]
        previous, order = order, np.argsort(-value, kind="stable")[: np.count_nonzero(value > 0)]  # a token worth <= 0 never helps
        if np.array_equal(order, previous[: len(order)]):
            break  # the same walk, cut shorter: nothing new
        found, found_ks = walks.best(order)
        if found <= best * (1 + 1e-12):
            break
        best, ks = found, found_ks
    return ks.tolist()


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
