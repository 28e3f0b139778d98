"""The simulated world: what steps really cost and which drafts are really accepted.

This is the truth the policies are judged against, and on purpose it is *not* the controller's model:

- step time comes from a cost profile (``profiles/*.json``): a measured step table, interpolated, or an
  analytic roofline, with multiplicative lognormal noise; the controller's linear cost model must learn
  it from the times it is shown, as in the router;
- acceptance is drawn per request from a Beta, decays with draft position and switches between phases
  within a request, where the controller assumes one independent rate per request; or it is replayed
  from recorded traces (traces.py). Either way it comes from an AcceptanceSource that gives each
  request its Truth.

Every random draw that a policy could change the order of is keyed by (seed, request, output position),
so all policies of a cell see the same arrivals, lengths and acceptance (common random numbers).
"""

from __future__ import annotations

import bisect
import itertools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Protocol, Sequence

import numpy as np

from router.controller.allocator import DrafterCost
from router.controller.profile import PrefillRow
from router.prefill_budget import DEFAULT_MAX_STEP_TOKENS

if TYPE_CHECKING:
    from smartspec.simulate.load import RequestSpec

# Streams of the seeded generators, so that no two kinds of draw share one.
ACCEPTANCE_STREAM = 1
NOISE_STREAM = 2
# In an "off" phase (a passage the drafter cannot guess) a request's rate is this share of its own.
OFF_PHASE_SCALE = 0.2
# Synthetic draws per request past its last output token: room for the deepest draft.
DRAFT_ROOM = 64


# --- costs ---------------------------------------------------------------------------------------
def profile_names() -> list[str]:
    """The shipped cost profiles."""
    folder = resources.files("smartspec.simulate").joinpath("profiles")
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def load_profile(name_or_file: str) -> dict:
    """A shipped profile by name, or a profile JSON file."""
    path = Path(name_or_file)
    if path.suffix == ".json" or path.exists():
        return json.loads(path.read_text())
    if name_or_file not in profile_names():
        raise ValueError(f"unknown cost profile {name_or_file!r}; shipped: {', '.join(profile_names())}, or a JSON file")
    return json.loads(resources.files("smartspec.simulate").joinpath("profiles").joinpath(f"{name_or_file}.json").read_text())


def interpolate(axes: Sequence[Sequence[float]], values: Mapping[tuple[int, ...], float], point: Sequence[float]) -> float:
    """Multilinear interpolation on a grid (sorted axes, not necessarily evenly spaced; values by grid
    index), extrapolated linearly past its edges: a table measured at a few sizes still answers for
    batches of 256. Plain Python: it runs once per simulated step."""
    weights: list[tuple[int, float]] = []
    for axis, x in zip(axes, point):
        if len(axis) == 1:
            weights.append((0, 0.0))
            continue
        i = min(max(bisect.bisect_left(axis, x) - 1, 0), len(axis) - 2)
        weights.append((i, (x - axis[i]) / (axis[i + 1] - axis[i])))
    total = 0.0
    for corner in itertools.product(*((0, 1) if len(a) > 1 else (0,) for a in axes)):
        w, index = 1.0, []
        for bit, (i, frac) in zip(corner, weights):
            w *= frac if bit else 1.0 - frac
            index.append(i + bit)
        total += w * values[tuple(index)]
    return total


class StepCosts:
    """True, noiseless seconds of a Verify, a Prefill and a drafter's Propose, from a cost profile."""

    def __init__(self, profile: Mapping) -> None:
        self.profile = profile
        self.name = str(profile.get("name", "custom"))
        self.kind = profile["kind"]
        self.max_context = int(profile.get("max_context", 8192))
        self.noise_sigma = float(profile.get("noise_sigma", 0.0))
        # the router's --max-step-tokens on this hardware (a GPU affords a few thousand)
        self.max_step_tokens = int(profile.get("max_step_tokens", DEFAULT_MAX_STEP_TOKENS))
        if self.kind == "table":
            axes = profile["verify"]["axes"]
            self._axes = [[float(x) for x in axes[name]] for name in ("batch", "new_tokens_per_seq", "context_per_seq")]
            table = np.asarray(profile["verify"]["seconds"], dtype=float)  # [batch, new per seq, context per seq]
            self._table = {index: float(table[index]) for index in np.ndindex(*table.shape)}
            self._floor = float(table.min()) / 2
        elif self.kind != "roofline":
            raise ValueError(f"cost profile {self.name}: kind must be 'table' or 'roofline', not {self.kind!r}")
        self.drafters = {name: DrafterCost(d.get("any_s", 0.0), d.get("position_s", 0.0), d.get("token_s", 0.0)) for name, d in profile["drafters"].items()}

    def verify_s(self, sequences: int, new_tokens: int, context_tokens: int, attended_tokens: float) -> float:
        """One Verify of `sequences` requests processing `new_tokens` in all over `context_tokens` of KV."""
        if self.kind == "table":
            point = (sequences, new_tokens / sequences, context_tokens / sequences)
            return max(interpolate(self._axes, self._table, point), self._floor)
        return self._roofline(new_tokens, context_tokens, attended_tokens)

    def step_s(self, contexts: Sequence[int], ks: Sequence[int], chunks: Sequence[PrefillRow] = ()) -> float:
        """One Verify (chunked prefill): requests with these contexts verifying these ks, and prefill
        chunks in the same forward. A measured table has no chunk rows, so there a chunk adds its
        tokens at the measured prefill rate (and a step of chunks alone is a Prefill); a roofline
        prices every row together."""
        new = sum(k + 1 for k in ks)
        context = sum(contexts)
        attended = sum((k + 1) * c for k, c in zip(ks, contexts))
        if self.kind == "roofline":
            for chunk in chunks:  # causal: the chunk's i-th token attends to cached + i keys
                new += chunk.tokens
                context += chunk.cached + chunk.tokens
                attended += chunk.tokens * chunk.cached + chunk.tokens * (chunk.tokens + 1) / 2
            return self._roofline(new, context, attended)
        prefill = self.profile["prefill"]
        chunk_tokens = sum(chunk.tokens for chunk in chunks)
        if not ks:
            return prefill["base_s"] + prefill["token_s"] * chunk_tokens
        return self.verify_s(len(ks), new, context, attended) + prefill["token_s"] * chunk_tokens

    def draft_s(self, drafter: str, ks: Sequence[int]) -> float:
        """One Propose call of `drafter` for requests asking `ks` tokens."""
        cost = self.drafters.get(drafter, DrafterCost())
        return cost.any_s * any(ks) + cost.position_s * max(ks, default=0) + cost.token_s * sum(ks)

    def _roofline(self, new_tokens: int, context_tokens: int, attended_tokens: float) -> float:
        r = self.profile["roofline"]
        kv_bytes_per_token = 2 * r["layers"] * r["kv_heads"] * r["head_dim"] * r["bytes_per_parameter"]  # K and V, every layer
        memory_s = (r["parameters"] * r["bytes_per_parameter"] + kv_bytes_per_token * context_tokens) / r["hbm_bytes_per_s"]
        attention_flops = 4 * r["layers"] * r["attention_heads"] * r["head_dim"]  # QK^T and PV per (query, key) pair
        compute_s = (2 * r["parameters"] * new_tokens + attention_flops * attended_tokens) / r["peak_flops"]
        return max(memory_s, compute_s) + r["step_overhead_s"]


class Noise:
    """Multiplicative lognormal noise on measured times (median 1). Every policy of a cell gets the same
    stream (`tag` 0: its steps; 1: the startup profile), so the n-th step's noise is the same for all."""

    def __init__(self, sigma: float, seed: int, tag: int = 0) -> None:
        self.sigma = sigma
        self._rng = np.random.default_rng([seed, NOISE_STREAM, tag])

    def __call__(self, seconds: float) -> float:
        return seconds * float(np.exp(self.sigma * self._rng.standard_normal())) if self.sigma > 0 else seconds


# --- acceptance ----------------------------------------------------------------------------------
class Truth(Protocol):
    """One request's true acceptance, as the step loop asks it (the policies never see it; the
    clairvoyant reference reads its gains)."""

    base: float  # its overall acceptance rate (the allocator's rate where no gain curve is given)

    def proposal(self, generated: int, asked: int) -> int:
        """Draft tokens the drafter returns when asked for `asked` after `generated` output tokens."""

    def accepted(self, generated: int, k: int) -> int:
        """Drafts accepted from a verify of k drafts after `generated` output tokens."""

    def gains(self, generated: int, k: int) -> tuple[float, ...]:
        """Per next draft j = 1..k, the chance that it and all drafts before it are accepted."""


class AcceptanceSource(Protocol):
    """Where a cell's acceptance comes from: a synthetic model or recorded traces."""

    name: str  # the rows' workload

    def truth(self, seed: int, spec: "RequestSpec", drafter: str) -> Truth:
        """Request `spec`'s truth with `drafter`; keyed by (seed, request) only, never by the policy."""

    def lengths(self) -> list[tuple[int, int]] | None:
        """(prompt, output) tokens of each request the source can replay, in order; None: any lengths."""

    def labels(self) -> dict[str, Any]:
        """What the rows and meta.json say about the source."""


@dataclass(frozen=True)
class AcceptanceModel:
    """Synthetic acceptance: a rate per request from Beta(mean, std), decaying with draft position
    (the j-th draft of a verify is accepted with the rate times decay^(j - 1)), switching between an
    'on' and an 'off' phase (mean phase length `phase_tokens` output tokens; 0: one phase). The drafter
    has a proposal at an output position with probability `proposal_rate` (prompt lookup finds no
    match otherwise)."""

    mean: float
    std: float
    position_decay: float = 1.0
    phase_tokens: float = 0.0
    proposal_rate: float = 1.0
    name: ClassVar[str] = "synthetic"

    def truth(self, seed: int, spec: "RequestSpec", drafter: str) -> "RequestTruth":
        return RequestTruth(self, seed, spec.index, spec.output_tokens + DRAFT_ROOM)

    def lengths(self) -> None:
        return None

    def labels(self) -> dict[str, Any]:
        return {
            "acceptance_mean": self.mean, "acceptance_std": self.std, "position_decay": self.position_decay, "phase_tokens": self.phase_tokens,
            "proposal_rate": self.proposal_rate, "acceptance_trace": None,
        }

    def base_rate(self, rng: np.random.Generator) -> float:
        if self.std <= 0 or self.mean <= 0 or self.mean >= 1:
            return float(np.clip(self.mean, 0.0, 1.0))
        spread = self.mean * (1 - self.mean) / self.std**2 - 1
        if spread <= 0:
            raise ValueError(f"acceptance std {self.std} is too large for mean {self.mean} (a Beta needs std^2 < mean (1 - mean))")
        return float(rng.beta(self.mean * spread, (1 - self.mean) * spread))


class RequestTruth:
    """One request's true acceptance at each output position, and the uniforms that decide it."""

    def __init__(self, model: AcceptanceModel, seed: int, index: int, positions: int) -> None:
        rng = np.random.default_rng([seed, ACCEPTANCE_STREAM, index])
        self.base = model.base_rate(rng)
        self.decay = model.position_decay
        rate = np.full(positions, self.base)  # [positions]
        if model.phase_tokens > 0:
            switch = rng.random(positions) < 1.0 / model.phase_tokens  # [positions]
            on = (np.cumsum(switch) + int(rng.random() < 0.5)) % 2 == 0
            rate = np.where(on, rate, rate * OFF_PHASE_SCALE)
        self.rate = rate
        self.uniform = rng.random(positions)  # [positions]: the draw for the draft at each output position
        self.proposes = rng.random(positions) < model.proposal_rate  # [positions]: the drafter has something to propose

    def chance(self, position: int, depth: int) -> float:
        """Probability that a draft at output `position`, the `depth`-th (1-based) of its verify, is accepted."""
        return float(self.rate[min(position, len(self.rate) - 1)]) * self.decay ** (depth - 1)

    def proposal(self, generated: int, asked: int) -> int:
        """Draft tokens the drafter returns when asked for `asked` after `generated` output tokens."""
        return asked if self.proposes[min(generated, len(self.proposes) - 1)] else 0

    def accepted(self, generated: int, k: int) -> int:
        """Drafts accepted from a verify of k drafts after `generated` output tokens: the leading run of
        drafts whose position's uniform falls under their chance."""
        for j in range(1, k + 1):
            position = generated + j - 1
            if self.uniform[min(position, len(self.uniform) - 1)] >= self.chance(position, j):
                return j - 1
        return k

    def gains(self, generated: int, k: int) -> tuple[float, ...]:
        """True expected gain of each of the next k drafts: the chance that all drafts up to it are accepted."""
        out, alive = [], 1.0
        for j in range(1, k + 1):
            alive *= self.chance(generated + j - 1, j)
            out.append(alive)
        return tuple(out)
