"""The controller with token trees: the calibration of draft probabilities against observed acceptance,
the consistency of a tree's gains, the allocator on per-request gain curves (against brute force), and
the controller's expected accepted length after learning from simulated verifies."""

from __future__ import annotations

import heapq
import itertools
import random

import pytest

from router.controller.allocator import Candidate, DrafterCost, StepCost, allocate_goodput, predicted_goodput
from router.controller.controller import Slot, SpeculationController
from router.controller.tree import TreeCalibration, path_probs
from smartspec.tree import parents_problem


def test_without_evidence_the_calibration_is_the_raw_probability():
    calibration = TreeCalibration()
    for raw in (0.004, 0.035, 0.15, 0.35, 0.62, 0.84, 0.97, 1.0):
        assert calibration(raw) == pytest.approx(raw, abs=1e-9)
    assert calibration(0.0) == 0.0


@pytest.mark.parametrize("truth", [lambda r: r / 3, lambda r: min(1.0, 1.6 * r), lambda r: r * r])
def test_the_calibration_learns_the_observed_acceptance_and_stays_monotone(truth):
    rng = random.Random(1)
    calibration = TreeCalibration()
    for _ in range(400):
        raws = [rng.random() for _ in range(8)]
        calibration.observe(raws, [rng.random() < truth(r) for r in raws])
    _, ys = calibration.curve()
    assert all(a <= b + 1e-12 for a, b in zip(ys, ys[1:]))
    for raw in (0.15, 0.35, 0.55, 0.75):
        assert calibration(raw) == pytest.approx(truth(raw), abs=0.06), raw
    for _ in range(2000):  # evidence fades: back towards the raw value
        calibration.decay(0.99)
    assert calibration(0.35) == pytest.approx(0.35, abs=0.01)


def test_tree_gains_are_consistent_and_non_increasing():
    calibration = TreeCalibration()
    for _ in range(50):  # a drafter that is badly underconfident: observed acceptance 1.0 from raw 0.3 up
        calibration.observe([0.3, 0.4, 0.5, 0.6], [True] * 4)
    parents, probs = [-1, -1, -1, 0, 0, 3], [0.5, 0.4, 0.3, 0.9, 0.1, 0.8]
    gains = calibration.gains(parents, probs)
    assert sum(gains[:3]) <= 1.0 + 1e-9  # the root's children cannot be accepted together
    assert gains[3] + gains[4] <= gains[0] + 1e-9 and gains[5] <= gains[3] + 1e-9
    assert all(a >= b for a, b in zip(gains, gains[1:]))
    assert path_probs(parents, probs) == pytest.approx([0.5, 0.4, 0.3, 0.45, 0.05, 0.36])


def brute_force(candidates, cost):
    best, best_ks = -1.0, None
    for ks in itertools.product(*(range(c.cap + 1) for c in candidates)):
        value = predicted_goodput(candidates, list(ks), cost)
        if value > best:
            best, best_ks = value, list(ks)
    return best, best_ks


def test_the_allocator_is_exact_on_tree_gain_curves():
    rng = random.Random(7)
    cost = StepCost(base_s=0.03, token_s=0.004, jump_s=0.006, drafters={"tree": DrafterCost(token_s=0.001)})
    for _ in range(40):
        candidates = []
        for _ in range(3):
            gains = sorted((rng.random() ** 2 for _ in range(5)), reverse=True)
            if rng.random() < 0.5:
                candidates.append(Candidate(0.5, 5, "tree", tuple(gains)))
            else:
                candidates.append(Candidate(rng.random(), 5, "tree"))
        best, _ = brute_force(candidates, cost)
        assert predicted_goodput(candidates, allocate_goodput(candidates, cost), cost) == pytest.approx(best, rel=1e-9)


class SyntheticDrafter:
    """An overconfident drafter: each node's children carry random draft probabilities p (a top-4 of
    a distribution), while the target agrees with a child with probability p^2. Trees are grown
    best-first by cumulative draft probability, as the tree drafter does."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def children(self) -> list[float]:
        weights = sorted((self.rng.random() ** 3 for _ in range(4)), reverse=True)
        mass = self.rng.uniform(0.6, 1.0)
        return [mass * w / sum(weights) for w in weights]

    def tree(self, budget: int) -> tuple[list[int], list[float]]:
        parents, probs, cums = [], [], []
        heap = [(-p, n, -1, p) for n, p in enumerate(self.children())]
        counter = len(heap)
        heapq.heapify(heap)
        while len(parents) < budget:
            neg_cum, _, parent, prob = heapq.heappop(heap)
            parents.append(parent)
            probs.append(prob)
            cums.append(-neg_cum)
            for p in self.children():
                heapq.heappush(heap, (neg_cum * p, counter, len(parents) - 1, p))
                counter += 1
        return parents, probs

    def verify(self, parents: list[int], probs: list[float]) -> list[int]:
        """Which nodes the target accepts: from the root, at most one child per level, child c with
        probability probs[c]^2."""
        path, node = [], -1
        while True:
            kids = [c for c, p in enumerate(parents) if p == node]
            u, chosen = self.rng.random(), None
            for c in kids:
                u -= probs[c] ** 2
                if u < 0:
                    chosen = c
                    break
            if chosen is None:
                return path
            path.append(chosen)
            node = chosen


def true_expected(parents: list[int], probs: list[float]) -> float:
    return 1.0 + sum(r * r for r in path_probs(parents, probs))


def test_the_controller_learns_the_expected_accepted_length_of_trees():
    controller = SpeculationController(k_max=8)
    drafter = SyntheticDrafter(seed=3)
    for step in range(300):
        parents, probs = drafter.tree(8)
        assert parents_problem(parents, 8) is None
        controller.observe_tree("r", "tree", parents, probs)
        accepted = drafter.verify(parents, probs)
        controller.observe_request("r", "tree", 8, len(accepted), asked=8, accepted_nodes=accepted)
    assert controller.calibration("tree").observed == 300 * 8
    predicted, truth, raw = [], [], []
    for _ in range(100):
        parents, probs = drafter.tree(8)
        controller.observe_tree("q", "tree", parents, probs)
        predicted.append(controller.expected("q", "tree", 8))
        truth.append(true_expected(parents, probs))
        raw.append(1.0 + sum(path_probs(parents, probs)))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(predicted) == pytest.approx(mean(truth), rel=0.08)
    assert mean(raw) > 1.3 * mean(truth)  # the raw draft probabilities alone would be far off


def test_a_tree_request_is_given_a_budget_from_its_gains_and_cut_to_what_pays():
    controller = SpeculationController(k_max=8)
    controller.verify_cost.reset_prior((0.050, 0.0035, 0.000012, 0.0, 0.004, 0.005, 0.0))  # a small jump at the first draft token
    controller.drafter_cost("tree").reset_prior((0.001, 0.002, 0.0005))
    # no tree yet: the drafter's geometric prior stands in (optimistic while it has no evidence)
    a = controller.drafter_rates("tree").optimistic_rate
    assert controller.expected("r", "tree", 3) == pytest.approx(1 + a + a**2 + a**3)
    # a confident first node, then hopeless ones: only the first node pays
    controller.observe_tree("r", "tree", [-1, 0, 1, 2], [0.97, 0.001, 0.001, 0.001])
    assert controller.expected("r", "tree", 1) == pytest.approx(1.97, abs=0.01)
    slots = [Slot("r", "tree", 4, 100)]
    assert controller.decide(slots) == [1]
    controller.observe_tree("r", "tree", [-1, 0, 1, 2], [0.02, 0.001, 0.001, 0.001])  # nothing pays
    assert controller.decide(slots) == [0]
    controller.observe_tree("r", "tree", [-1, 0, 1, 2], [0.99, 0.99, 0.99, 0.99])  # everything pays
    assert controller.decide(slots) == [4]
    # before the next tree, the budget comes from this one, its tail extended geometrically
    assert len(controller._gains("r", "tree", 8)) == 8
    controller.forget("r")
    assert controller.expected("r", "tree", 1) == pytest.approx(1 + a)
