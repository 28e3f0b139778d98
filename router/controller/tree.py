"""Expected accepted length of a token tree, from the drafter's own probabilities calibrated online.

A tree node is accepted when the target agrees with every token on the path to it, and at most one
node per depth is, so a verify of a tree gains on average the sum over its nodes of P(the path to the
node is accepted), 1 + that sum with the target's own token (a chain's E(k) is the special case). The
drafter's path probability, the product of its probabilities along the path, estimates that chance
but a draft model is rarely well calibrated against the target, so ``TreeCalibration`` maps raw path
probabilities to observed acceptance, fitted online from which nodes each verify accepted: fading
evidence in bins of raw probability, each bin shrunk towards the raw value while it has little
evidence, kept non-decreasing across bins by pooling adjacent violators, and read between bins by
linear interpolation (proportionally outside them). The gains of a tree are then made consistent (a child never above its parent,
siblings never above their parent together) and non-increasing in the tree's best-first order, which
the allocator's marginal-gain walk relies on.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Sequence

# Bin edges over the raw path probability; fine where draft probabilities usually fall.
EDGES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def path_probs(parents: Sequence[int], probs: Sequence[float]) -> list[float]:
    """The drafter's probability of each node's whole path: the product along it (parents first)."""
    out: list[float] = []
    for parent, prob in zip(parents, probs):
        out.append((out[parent] if parent >= 0 else 1.0) * prob)
    return out


def _pool_adjacent_violators(values: list[float], weights: list[float]) -> list[float]:
    """The non-decreasing sequence closest to `values` in weighted least squares."""
    blocks: list[list[float]] = []  # [value, weight, size]
    for value, weight in zip(values, weights):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            value2, weight2, size2 = blocks.pop()
            value1, weight1, size1 = blocks.pop()
            total = weight1 + weight2
            blocks.append([(value1 * weight1 + value2 * weight2) / total, total, size1 + size2])
    return [value for value, _, size in blocks for _ in range(size)]


# Pseudo-observations at a bin's raw probability before its own evidence counts.
TREE_PRIOR_STRENGTH = 4.0


class TreeCalibration:
    """Raw path probability -> estimated chance the path is accepted, for one drafter, fitted online.

    Each bin holds fading counts of nodes verified, nodes accepted and their raw probabilities. A bin's
    estimate is (accepted + s * raw mean) / (nodes + s): the raw value itself until evidence arrives.
    """

    def __init__(self, prior_strength: float = TREE_PRIOR_STRENGTH) -> None:
        self.prior_strength = prior_strength
        bins = len(EDGES) - 1
        self._nodes = [0.0] * bins
        self._accepted = [0.0] * bins
        self._raw = [0.0] * bins
        self.observed = 0  # nodes seen in total (never faded)
        self._curve: tuple[list[float], list[float]] | None = None  # (x, y) points, rebuilt on change

    def _bin(self, raw: float) -> int:
        return min(max(bisect_right(EDGES, raw) - 1, 0), len(EDGES) - 2)

    def observe(self, raw: Sequence[float], accepted: Sequence[bool]) -> None:
        """One verified tree: each node's raw path probability and whether it was accepted."""
        for r, ok in zip(raw, accepted):
            b = self._bin(r)
            self._nodes[b] += 1.0
            self._accepted[b] += float(ok)
            self._raw[b] += r
            self.observed += 1
        self._curve = None

    def decay(self, factor: float) -> None:
        """Called once per step: evidence older than ~1 / (1 - factor) steps fades out."""
        self._nodes = [n * factor for n in self._nodes]
        self._accepted = [a * factor for a in self._accepted]
        self._raw = [r * factor for r in self._raw]
        self._curve = None

    def curve(self) -> tuple[list[float], list[float]]:
        """The fitted points (raw probability, estimate), x increasing and y non-decreasing."""
        if self._curve is None:
            s = self.prior_strength
            xs, ys, ws = [], [], []
            for b in range(len(EDGES) - 1):
                x = self._raw[b] / self._nodes[b] if self._nodes[b] > 1e-9 else (EDGES[b] + EDGES[b + 1]) / 2
                xs.append(x)
                ys.append((self._accepted[b] + s * x) / (self._nodes[b] + s))
                ws.append(self._nodes[b] + s)
            self._curve = (xs, _pool_adjacent_violators(ys, ws))
        return self._curve

    def __call__(self, raw: float) -> float:
        """Estimated chance that a path of raw probability `raw` is accepted."""
        xs, ys = self.curve()
        if raw <= xs[0]:
            return ys[0] * raw / xs[0] if xs[0] > 0 else ys[0]
        if raw >= xs[-1]:  # proportionally beyond the last point, as below the first
            return min(1.0, ys[-1] * raw / xs[-1])
        j = bisect_right(xs, raw)
        t = (raw - xs[j - 1]) / (xs[j] - xs[j - 1])
        return ys[j - 1] + t * (ys[j] - ys[j - 1])

    def gains(self, parents: Sequence[int], probs: Sequence[float]) -> list[float]:
        """Per node, in the tree's order, the estimated chance that it is accepted: its marginal gain.
        Consistent (siblings together never above their parent, the root counting 1) and
        non-increasing, so the first n nodes' sum is E(n) - 1 and concave in n."""
        gains = [self(r) for r in path_probs(parents, probs)]
        children: dict[int, list[int]] = {}
        for i, parent in enumerate(parents):
            children.setdefault(parent, []).append(i)
        for parent in sorted(children):  # the root (-1) first, then parents before their children
            limit = gains[parent] if parent >= 0 else 1.0
            total = sum(gains[c] for c in children[parent])
            if total > limit:
                for c in children[parent]:
                    gains[c] *= limit / total
        for i in range(1, len(gains)):
            gains[i] = min(gains[i], gains[i - 1])
        return gains
