"""Step-time cost models, piecewise linear in batch features, fitted from measurements and refitted online.

docs/design.md ("Cost model"). The verifier's step time is

    T_verify = c0 + c_tok * N_tok + c_ctx * N_ctx + c_att * N_att + c_seq * B
             + c_jump * [some k_i > 0 and N_tok >= J] + c_excess * max(0, N_tok - K)

with N_tok = sum(k_i + 1) the step's new tokens (what the projections, MLP and head process: the engine
runs exactly these, no padding; prefill chunks' tokens included), N_ctx = sum(L_i) the cached context
read (attention gathers each request's KV once per layer), N_att = sum((k_i + 1) * L_i) the query-key
pairs attention computes, each request over its own context, and B the batch size. The two breakpoints
bend the line where the hardware does: the jump is paid by a step with a row of several new tokens (a
speculating request or a prefill chunk) once the step has J new tokens (J = 2: at the first draft
token; on one CPU a single request verifying 1 or 2 drafts cost about the same as none and 3 drafts
about 40% more, a jump at J = 4: bench/results/cost_model_fit_ablation/earlier_machine.json), and K
is where the forward turns from memory-bound to compute-bound (a GPU's roofline: below it a new token
is nearly free). Both are chosen when the startup profile is
fitted (``VerifyCostModel.fit_batch``), from the candidates below, whichever explains the sweep best.
A draft model runs one batched forward per draft position, so

    T_draft = d_any * [any k_i > 0] + d_pos * max(k_i) + d_tok * sum(k_i)

and a model-free proposer (prompt lookup) is the same form with tiny coefficients.

Coefficients start from a startup profile (or defaults) and are refitted by least squares over a sliding
window of the timings each response reports, regularised towards the profile so that a window in which
some feature never varies (e.g. a constant batch size) cannot send its coefficient anywhere.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import nnls

STEP_SHAPE = ("const", "new_tokens", "context_tokens", "attended_tokens", "sequences", "longest_row")  # what a step is
VERIFY_FEATURES = STEP_SHAPE[:5] + ("multi_token", "excess_tokens")  # what it costs by: the line, and the breakpoints crossed
NEW_TOKENS, LONGEST_ROW = STEP_SHAPE.index("new_tokens"), STEP_SHAPE.index("longest_row")
DRAFT_FEATURES = ("any_speculation", "max_k", "sum_k")
# Breakpoints the profile fit chooses from. J = 2 is a jump at any step with a row of several tokens
# (as the model was before it had breakpoints); no knee is a line throughout.
JUMP_CANDIDATES = (2, 3, 4, 5, 6, 8, 12, 16)
KNEE_CANDIDATES = (None, 16, 32, 64, 128, 256, 512, 1024, 2048)
# A knee is kept only if it explains the sweep this much better (relative sum of squares) than a line:
# with timing noise some knee always fits a little better, and a spurious one prices late tokens wrongly.
KNEE_MIN_GAIN = 0.1


def verify_features(num_sequences: int, new_tokens: int, context_tokens: int, longest_row: int, attended_tokens: float | None = None) -> np.ndarray:
    """One step's shape (STEP_SHAPE); longest_row: the most new tokens of one row (1: nobody speculates
    and no prompt is chunked in). attended_tokens = sum((k_i + 1) * L_i); None estimates it as if every
    request had the mean context (exact when they do)."""
    if attended_tokens is None:
        attended_tokens = new_tokens * context_tokens / max(num_sequences, 1)
    return np.array([1.0, new_tokens, context_tokens, attended_tokens, num_sequences, longest_row])


@dataclass(frozen=True)
class Breakpoints:
    """Where a step's time bends with its new tokens N: a jump once N >= jump_tokens (for a step with a
    row of several tokens), and a steeper slope past knee_tokens (None: none)."""

    jump_tokens: int = 2
    knee_tokens: int | None = None

    def features(self, shape: np.ndarray) -> np.ndarray:
        """STEP_SHAPE -> VERIFY_FEATURES."""
        new = shape[NEW_TOKENS]
        features = np.empty(len(VERIFY_FEATURES))
        features[:LONGEST_ROW] = shape[:LONGEST_ROW]
        features[LONGEST_ROW] = shape[LONGEST_ROW] > 1 and new >= self.jump_tokens  # multi_token
        features[LONGEST_ROW + 1] = 0.0 if self.knee_tokens is None else max(new - self.knee_tokens, 0.0)  # excess_tokens
        return features

    def as_dict(self) -> dict[str, int | None]:
        return asdict(self)


def draft_features(ks: Sequence[int]) -> np.ndarray:
    return np.array([float(any(ks)), float(max(ks, default=0)), float(sum(ks))])


@dataclass
class FitError:
    """Running accuracy of a model's predictions: mean absolute percentage error over the window."""

    mape: float
    samples: int


STALE_STEPS = 32  # live steps compared with the prior before it is judged
STALE_MARGIN = 1.5  # a prior whose median prediction is off by more than this factor is replaced


class LinearCostModel:
    """y ~ features . coef, refitted every `refit_every` observations over the last `window` ones.

    The prior (a startup profile) is itself checked against live steps: a profile measured while the
    machine was busy, or on another machine, is rescaled to them (and `on_recalibrate` is told, so the
    cached copy can be replaced), rather than holding the refit back for good."""

    def __init__(
        self,
        names: Sequence[str],
        prior: Sequence[float],
        window: int = 256,
        refit_every: int = 8,
        prior_weight: float = 4.0,
    ) -> None:
        if len(prior) != len(names):
            raise ValueError(f"{len(names)} features but {len(prior)} prior coefficients")
        self.names = tuple(names)
        self.prior = np.asarray(prior, dtype=float)
        self.coef = self.prior.copy()
        self._x: deque[np.ndarray] = deque(maxlen=window)
        self._y: deque[float] = deque(maxlen=window)
        self._errors: deque[float] = deque(maxlen=window)
        self._refit_every = refit_every
        self._prior_weight = prior_weight
        self._since_fit = 0
        self._prior_ratios: deque[float] = deque(maxlen=STALE_STEPS)  # measured / the prior's prediction
        self.recalibrations = 0
        self.on_recalibrate: Callable[[np.ndarray], None] | None = None

    def design(self, features: np.ndarray) -> np.ndarray:
        """The row the coefficients multiply, from what callers pass (here the same)."""
        return np.asarray(features, dtype=float)

    def predict(self, features: np.ndarray) -> float:
        return float(self.design(features) @ self.coef)

    def observe(self, features: np.ndarray, measured_s: float) -> None:
        """Records one measurement (and the error the current model made on it); refits periodically."""
        features = self.design(features)
        predicted = float(features @ self.coef)
        if measured_s > 0:
            self._errors.append(abs(predicted - measured_s) / measured_s)
        by_prior = float(features @ self.prior)
        if measured_s > 0 and by_prior > 0:
            self._prior_ratios.append(measured_s / by_prior)
        self._x.append(features)
        self._y.append(float(measured_s))
        self._since_fit += 1
        if len(self._prior_ratios) == STALE_STEPS:
            self._check_prior()
        elif self._since_fit >= self._refit_every:
            self.refit()

    def _check_prior(self) -> None:
        """Replaces a prior that the last STALE_STEPS live steps contradict by more than STALE_MARGIN:
        by the refit towards the prior rescaled by their median ratio (so features the window never
        varied keep the profile's proportions). The replacement survives `reset_prior` of the same
        prior (benchmarks reset between runs) and is what `on_recalibrate` publishes."""
        bias = float(np.median(self._prior_ratios))
        self._prior_ratios.clear()
        if 1 / STALE_MARGIN <= bias <= STALE_MARGIN:
            self.refit()
            return
        self.prior = self.prior * bias
        self.recalibrations += 1
        self.refit()
        self.prior = self.coef.copy()  # the refit towards the rescaled prior: live shapes where the window has them
        if self.on_recalibrate is not None:
            self.on_recalibrate(self.prior)

    def refit(self) -> None:
        """Ridge least squares towards the prior, with columns scaled so the pull is comparable across
        features of very different magnitude (tokens vs. context tokens); coefficients kept >= 0."""
        self._since_fit = 0
        if not self._x:
            return
        x = np.stack(self._x)  # [window, features]
        y = np.asarray(self._y)  # [window]
        scale = np.maximum(np.abs(x).max(axis=0), 1e-9)  # [features]
        pull = np.sqrt(self._prior_weight) * np.eye(len(self.names))  # [features, features]: the ridge as extra rows
        lhs = np.vstack([x / scale, pull])
        rhs = np.concatenate([y, pull @ (self.prior * scale)])
        self.coef = nnls(lhs, rhs)[0] / scale

    def reset_prior(self, prior: Sequence[float]) -> None:
        """Adopts a new prior (e.g. a fresh startup profile) and forgets the window."""
        self.prior = np.asarray(prior, dtype=float)
        self.coef = self.prior.copy()
        self._x.clear()
        self._y.clear()
        self._errors.clear()
        self._prior_ratios.clear()

    def error(self) -> FitError:
        errors = list(self._errors)
        return FitError(float(np.mean(errors)) if errors else float("nan"), len(errors))

    def fit_batch(self, rows: Sequence[np.ndarray], measured: Sequence[float]) -> None:
        """Least squares of the relative error over a profile sweep (each step weighted by 1 / its time,
        so a batch-1 step counts as much as a batch-16 one: the controller compares steps by ratio),
        coefficients >= 0 (non-negative least squares: clipping a free fit's negative coefficient would leave
        the others fitted to a model that no longer exists); the result becomes the prior."""
        self.reset_prior(_relative_nnls(np.stack([self.design(row) for row in rows]), np.asarray(measured, dtype=float))[0])

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.names, map(float, self.coef)))


def _relative_nnls(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-negative coefficients minimising the squared relative error of x @ coef against y, and
    that sum of squares. x [steps, features], y [steps]."""
    weight = 1.0 / np.maximum(y, 1e-6)  # [steps]
    scale = np.maximum(np.abs(x).max(axis=0), 1e-9)  # [features]
    coef, residual = nnls((x / scale) * weight[:, None], y * weight)
    return coef / scale, float(residual) ** 2


class VerifyCostModel(LinearCostModel):
    """The verify model: callers pass a step's shape (STEP_SHAPE, ``profile.step_features``), and its
    breakpoints turn that into VERIFY_FEATURES. The profile fit chooses the breakpoints; live refits
    keep them and move the coefficients."""

    def __init__(self, prior: Sequence[float], breaks: Breakpoints = Breakpoints(), **settings: int | float) -> None:
        super().__init__(VERIFY_FEATURES, prior, **settings)
        self.breaks = breaks

    def design(self, features: np.ndarray) -> np.ndarray:
        return self.breaks.features(np.asarray(features, dtype=float))

    def reset_prior(self, prior: Sequence[float], breaks: Breakpoints | None = None) -> None:
        """As LinearCostModel's; with `breaks`, these breakpoints from now on (the window is forgotten)."""
        if breaks is not None:
            self.breaks = breaks
        super().reset_prior(prior)

    def fit_batch(self, rows: Sequence[np.ndarray], measured: Sequence[float], breaks: Breakpoints | None = None) -> None:
        """The profile fit (LinearCostModel.fit_batch) at every pair of candidate breakpoints that the
        sweep's steps straddle, keeping the pair whose fit leaves the least relative error: on a CPU
        a jump at a few tokens, on a GPU a knee near the roofline's ridge. With `breaks`, at those."""
        if breaks is not None:
            self.breaks = breaks
            super().fit_batch(rows, measured)
            return
        shapes, y = np.stack(rows), np.asarray(measured, dtype=float)
        new = shapes[:, NEW_TOKENS]
        best: tuple[float, np.ndarray, Breakpoints] | None = None
        for jump, knee in itertools.product(JUMP_CANDIDATES, KNEE_CANDIDATES):
            if not new.min() < jump <= new.max() or (knee is not None and not new.min() <= knee < new.max()):
                continue  # a breakpoint no step crosses says nothing the line does not
            breaks = Breakpoints(jump, knee)
            coef, residual = _relative_nnls(np.stack([breaks.features(row) for row in shapes]), y)
            score = residual if knee is None else residual / (1 - KNEE_MIN_GAIN)
            if best is None or score < best[0] * (1 - 1e-9):
                best = (score, coef, breaks)
        if best is None:
            super().fit_batch(rows, measured)
            return
        self.reset_prior(best[1], best[2])


# Defaults close to SmolLM2-135M on a 2-core CPU (docs/models.md): used until a profile is available.
DEFAULT_VERIFY_PRIOR = (0.030, 0.0035, 0.000010, 0.0000015, 0.002, 0.020, 0.0)
DEFAULT_DRAFT_MODEL_PRIOR = (0.004, 0.020, 0.001)
# A model-free proposer's prior is optimistic (a host-side match: next to nothing), as a drafter's
# acceptance prior is: too low a cost is corrected by the first steps that draft, too high a one would
# stop the drafting that could correct it (in the simulator, a 0.5 ms prior against the GPU profile's
# 0.2 ms: goodput 1.034x fixed:1 at acceptance 0.3 and 64 requests, 1.000 with this one;
# bench/results/simulate_ablation/prompt_lookup_prior_pessimistic).
DEFAULT_PROMPT_LOOKUP_PRIOR = (0.0001, 0.0, 0.000001)


def new_verify_model() -> VerifyCostModel:
    return VerifyCostModel(DEFAULT_VERIFY_PRIOR)


def new_draft_model(model_free: bool) -> LinearCostModel:
    return LinearCostModel(DRAFT_FEATURES, DEFAULT_PROMPT_LOOKUP_PRIOR if model_free else DEFAULT_DRAFT_MODEL_PRIOR)
