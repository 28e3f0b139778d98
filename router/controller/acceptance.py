"""Acceptance-rate estimates: a Beta posterior per request, with a prior from its drafter's recent rate.

Model (docs/design.md section 3): each proposed token is accepted independently with probability a, and
verification stops at the first rejection, so a verify that proposed k and accepted n observed n
successes and, if n < k, one failure. The maximum-likelihood estimate of a over many verifies is
successes / (successes + failures); the expected tokens per step at speculation length k is
E(k) = (1 - a^(k+1)) / (1 - a).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Rates are kept inside (0, 1): a = 1 would make E(k) unbounded in k and a = 0 is never certain.
RATE_FLOOR, RATE_CEIL = 0.01, 0.99
# How many posterior standard deviations above its mean a drafter's rate is taken as, for requests with
# no evidence of their own (optimism in the face of uncertainty: DrafterRates.optimistic_rate).
OPTIMISM = 1.0
# How many verifies of its drafter's rate a request's own posterior starts from. A request keeps about
# ten verifies of evidence (the controller fades it by 0.9 a step), so with a weaker prior ten verifies'
# luck decides its k: where every request's drafts landed at 0.7, strength 4 spread their k from 0-1 (a
# third of request-steps) to 4 or more (a sixth) (docs/design.md, section 3, "Acceptance estimates").
REQUEST_PRIOR_STRENGTH = 16.0


def expected_tokens(a: float, k: int) -> float:
    """E(k) = 1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a): tokens expected from one verify of k drafts."""
    return (1.0 - a ** (k + 1)) / (1.0 - a) if a < 1.0 else k + 1.0


class DrafterRates:
    """Acceptance of one drafter over all requests, as exponentially fading counts (a sliding window
    of roughly 1 / (1 - decay) steps), smoothed towards an initial rate; and per-position counts for
    metrics.

    The smoothing keeps one unlucky verify from condemning a drafter, and the fading lets the rate
    drift back to the initial one when nobody speculates with the drafter any more, so it is tried
    again rather than never (an estimate with no fresh evidence must not stay stuck).

    Router replicas that share state (router/shared_state.py) add the other replicas' recent evidence
    with ``set_fleet``: it counts like local evidence in ``rate``, is replaced (not accumulated) at each
    sync, and has already been faded by its age there, so the local per-step fading is left alone.
    """

    def __init__(self, initial: float = 0.5, prior_strength: float = 4.0, max_position: int = 16) -> None:
        self._initial = initial
        self._prior_strength = prior_strength
        self._successes = 0.0
        self._failures = 0.0
        self.samples = 0  # verifies observed
        self.position_proposed = [0] * max_position
        self.position_accepted = [0] * max_position
        self.proposed_total = 0
        self.accepted_total = 0
        self.failures_total = 0
        self.fleet_successes = 0.0  # other replicas' evidence (set_fleet)
        self.fleet_failures = 0.0

    def observe(self, proposed: int, accepted: int) -> None:
        if proposed <= 0:
            return
        self.samples += 1
        self.proposed_total += proposed
        self.accepted_total += accepted
        self._successes += accepted
        self._failures += int(accepted < proposed)
        self.failures_total += int(accepted < proposed)
        for position in range(min(proposed, len(self.position_proposed))):
            self.position_proposed[position] += 1
            self.position_accepted[position] += int(position < accepted)

    def decay(self, factor: float) -> None:
        """Called once per step: evidence older than ~1 / (1 - factor) steps fades out."""
        self._successes *= factor
        self._failures *= factor

    def set_fleet(self, successes: float, failures: float) -> None:
        """The other replicas' recent evidence for this drafter (0, 0: none, or Redis unreachable)."""
        self.fleet_successes = max(successes, 0.0)
        self.fleet_failures = max(failures, 0.0)

    def totals(self) -> dict[str, int]:
        """Every count that only grows (never faded): what a replica shares as increments.
        'accepted' is the successes of the geometric model, 'failures' its failures; 'pN' / 'aN' are
        position N's proposed / accepted counts."""
        out = {"verifies": self.samples, "proposed": self.proposed_total, "accepted": self.accepted_total, "failures": self.failures_total}
        for position, (proposed, accepted) in enumerate(zip(self.position_proposed, self.position_accepted)):
            if proposed:
                out[f"p{position}"], out[f"a{position}"] = proposed, accepted
        return out

    def _beta(self) -> tuple[float, float]:
        """The rate's Beta posterior: (alpha, beta), the initial rate counting as prior_strength verifies."""
        strength = self._prior_strength
        alpha = self._successes + self.fleet_successes + strength * self._initial
        beta = self._failures + self.fleet_failures + strength * (1.0 - self._initial)
        return alpha, beta

    @property
    def rate(self) -> float:
        alpha, beta = self._beta()
        return min(max(alpha / (alpha + beta), RATE_FLOOR), RATE_CEIL)

    @property
    def optimistic_rate(self) -> float:
        """The rate plus OPTIMISM standard deviations of its posterior: what a request with no evidence
        of its own starts from. A drafter nobody has tried lately (its evidence faded) looks promising
        enough to be tried; one measured over many verifies is taken at its word. Without it a drafter
        whose first token looks too dear at the initial rate is never tried, and never learns that its
        drafts land (seen: copy at 16 requests, no speculation, 1.2x slower than fixed:7)."""
        alpha, beta = self._beta()
        mean = alpha / (alpha + beta)
        spread = math.sqrt(mean * (1.0 - mean) / (alpha + beta + 1.0))
        return min(max(mean + OPTIMISM * spread, RATE_FLOOR), RATE_CEIL)


@dataclass
class RequestAcceptance:
    """Beta posterior over one request's acceptance rate with one drafter, and over the same rate given
    how its last verify ended.

    The prior is `prior_strength` pseudo-observations at the drafter's *current* global rate, so what
    the drafter shows on all requests informs each one; the request's own verifies add successes and
    failures. ``decay`` lets old evidence fade: a request's acceptance drifts (a copied passage ends, a
    new one starts), and a request that stopped speculating because its drafts missed drifts back to
    the drafter's rate and so is tried again later instead of never.

    Acceptance comes in runs: inside a passage the drafter can copy, a verify whose drafts were all
    accepted is usually followed by another; after a miss, the next verify often misses too. So the
    evidence is also kept per state, the state being whether the request's last verify accepted every
    draft it verified (a first-order Markov model of the outcomes), and the estimate for the next verify
    is that state's posterior, with the request's overall rate as its prior.
    """

    successes: float = 0.0
    failures: float = 0.0
    verifies: int = 0
    asks: float = 0.0  # times the drafter was asked for tokens (decayed like the rest)
    empty: float = 0.0  # of those, times it had nothing to propose (prompt lookup without a match)
    last_full: bool | None = None  # whether the last verify accepted all its drafts (None: no verify yet)
    # per state (after a full verify, after a miss): successes and failures of the verifies that followed it
    by_state: dict[bool, list[float]] = field(default_factory=lambda: {True: [0.0, 0.0], False: [0.0, 0.0]})

    def decay(self, factor: float) -> None:
        """Keeps `factor` of the evidence gathered so far (1.0 keeps all of it)."""
        self.successes *= factor
        self.failures *= factor
        self.asks *= factor
        self.empty *= factor
        for counts in self.by_state.values():
            counts[0] *= factor
            counts[1] *= factor

    def observe_ask(self, proposed: int) -> None:
        self.asks += 1
        self.empty += int(proposed == 0)

    @property
    def proposal_rate(self) -> float:
        """Chance the drafter proposes anything when asked: 1 until it is seen coming back empty
        (two pseudo-observations of a proposal)."""
        return (self.asks - self.empty + 2.0) / (self.asks + 2.0)

    def observe(self, proposed: int, accepted: int) -> None:
        if proposed <= 0:
            return
        missed = int(accepted < proposed)
        self.successes += accepted
        self.failures += missed
        self.verifies += 1
        if self.last_full is not None:
            counts = self.by_state[self.last_full]
            counts[0] += accepted
            counts[1] += missed
        self.last_full = not missed

    def mean(self, prior_rate: float, prior_strength: float = REQUEST_PRIOR_STRENGTH) -> float:
        """Posterior mean for the next verify: the overall rate (successes + s * rate) / (successes +
        failures + s), refined by the evidence gathered in the request's current state."""
        value = (self.successes + prior_strength * prior_rate) / (self.successes + self.failures + prior_strength)
        if self.last_full is not None:
            hits, misses = self.by_state[self.last_full]
            value = (hits + prior_strength * value) / (hits + misses + prior_strength)
        return min(max(value, RATE_FLOOR), RATE_CEIL)
