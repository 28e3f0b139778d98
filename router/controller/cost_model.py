"""Step-time cost models, linear in batch features, fitted from measurements and refitted online.

docs/design.md ("Cost model"). The verifier's step time is

    T_verify = c0 + c_tok * N_tok + c_ctx * N_ctx + c_att * N_att + c_seq * B + c_spec * [any k_i > 0]

with N_tok = sum(k_i + 1) the step's new tokens (what the projections, MLP and head process: the engine
runs exactly these, no padding), N_ctx = sum(L_i) the cached context read (attention gathers each
request's KV once per layer), N_att = sum((k_i + 1) * L_i) the query-key pairs attention computes, each
request over its own context, and B the batch size. The indicator captures the jump measured on CPU from
one token per request to several (a matrix-vector to matrix-matrix switch). A draft model
runs one batched forward per draft position, so

    T_draft = d_any * [any k_i > 0] + d_pos * max(k_i) + d_tok * sum(k_i)

and a model-free proposer (prompt lookup) is the same form with tiny coefficients.

Coefficients start from a startup profile (or defaults) and are refitted by least squares over a sliding
window of the timings each response reports, regularised towards the profile so that a window in which
some feature never varies (e.g. a constant batch size) cannot send its coefficient anywhere.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import nnls

VERIFY_FEATURES = ("const", "new_tokens", "context_tokens", "attended_tokens", "sequences", "any_speculation")
DRAFT_FEATURES = ("any_speculation", "max_k", "sum_k")


def verify_features(
    num_sequences: int, new_tokens: int, context_tokens: int, any_speculation: bool, attended_tokens: float | None = None
) -> np.ndarray:
    """One step's features. attended_tokens = sum((k_i + 1) * L_i); None estimates it as if every
    request had the mean context (exact when they do)."""
    if attended_tokens is None:
        attended_tokens = new_tokens * context_tokens / max(num_sequences, 1)
    return np.array([1.0, new_tokens, context_tokens, attended_tokens, num_sequences, float(any_speculation)])


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

    def predict(self, features: np.ndarray) -> float:
        return float(features @ self.coef)

    def observe(self, features: np.ndarray, measured_s: float) -> None:
        """Records one measurement (and the error the current model made on it); refits periodically."""
        predicted = self.predict(features)
        if measured_s > 0:
            self._errors.append(abs(predicted - measured_s) / measured_s)
        by_prior = float(features @ self.prior)
        if measured_s > 0 and by_prior > 0:
            self._prior_ratios.append(measured_s / by_prior)
        self._x.append(np.asarray(features, dtype=float))
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
        x, y = np.stack(rows), np.asarray(measured, dtype=float)
        weight = 1.0 / np.maximum(y, 1e-6)
        scale = np.maximum(np.abs(x).max(axis=0), 1e-9)
        self.reset_prior(nnls((x / scale) * weight[:, None], y * weight)[0] / scale)

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.names, map(float, self.coef)))


# Defaults close to SmolLM2-135M on a 2-core CPU (docs/models.md): used until a profile is available.
DEFAULT_VERIFY_PRIOR = (0.030, 0.0035, 0.000010, 0.0000015, 0.002, 0.020)
DEFAULT_DRAFT_MODEL_PRIOR = (0.004, 0.020, 0.001)
DEFAULT_PROMPT_LOOKUP_PRIOR = (0.0005, 0.0, 0.00002)


def new_verify_model() -> LinearCostModel:
    return LinearCostModel(VERIFY_FEATURES, DEFAULT_VERIFY_PRIOR)


def new_draft_model(model_free: bool) -> LinearCostModel:
    return LinearCostModel(DRAFT_FEATURES, DEFAULT_PROMPT_LOOKUP_PRIOR if model_free else DEFAULT_DRAFT_MODEL_PRIOR)
