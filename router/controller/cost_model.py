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
from typing import Sequence

import numpy as np

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


class LinearCostModel:
    """y ~ features . coef, refitted every `refit_every` observations over the last `window` ones."""

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

    def predict(self, features: np.ndarray) -> float:
        return float(features @ self.coef)

    def observe(self, features: np.ndarray, measured_s: float) -> None:
        """Records one measurement (and the error the current model made on it); refits periodically."""
        predicted = self.predict(features)
        if measured_s > 0:
            self._errors.append(abs(predicted - measured_s) / measured_s)
        self._x.append(np.asarray(features, dtype=float))
        self._y.append(float(measured_s))
        self._since_fit += 1
        if self._since_fit >= self._refit_every:
            self.refit()

    def refit(self) -> None:
        """Ridge least squares towards the prior, with columns scaled so the pull is comparable across
        features of very different magnitude (tokens vs. context tokens); coefficients kept >= 0."""
        self._since_fit = 0
        if not self._x:
            return
        x = np.stack(self._x)  # [window, features]
        y = np.asarray(self._y)  # [window]
        scale = np.maximum(np.abs(x).max(axis=0), 1e-9)  # [features]
        xs = x / scale
        weight = self._prior_weight * np.ones(len(self.names))
        lhs = xs.T @ xs + np.diag(weight)
        rhs = xs.T @ y + weight * (self.prior * scale)
        self.coef = np.maximum(np.linalg.solve(lhs, rhs) / scale, 0.0)

    def reset_prior(self, prior: Sequence[float]) -> None:
        """Adopts a new prior (e.g. a fresh startup profile) and forgets the window."""
        self.prior = np.asarray(prior, dtype=float)
        self.coef = self.prior.copy()
        self._x.clear()
        self._y.clear()
        self._errors.clear()

    def error(self) -> FitError:
        errors = list(self._errors)
        return FitError(float(np.mean(errors)) if errors else float("nan"), len(errors))

    def fit_batch(self, rows: Sequence[np.ndarray], measured: Sequence[float]) -> None:
        """Least squares of the relative error over a profile sweep (each step weighted by 1 / its time,
        so a batch-1 step counts as much as a batch-16 one: the controller compares steps by ratio);
        the result becomes the prior."""
        x, y = np.stack(rows), np.asarray(measured, dtype=float)
        weight = 1.0 / np.maximum(y, 1e-6)
        scale = np.maximum(np.abs(x).max(axis=0), 1e-9)
        coef, *_ = np.linalg.lstsq((x / scale) * weight[:, None], y * weight, rcond=None)
        self.reset_prior(np.maximum(coef / scale, 0.0))

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
