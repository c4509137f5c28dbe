"""Classification metrics and temperature calibration (pure numpy)."""

from __future__ import annotations

import math

import numpy as np

from shared.bundle import calibrate

ECE_BINS = 15
TEMPERATURE_BOUNDS = (0.05, 20.0)
_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0


def accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    """Share of rows whose most probable class is the label."""
    return float((np.argmax(probs, axis=1) == y).mean())


def macro_f1(probs: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of the per-class F1 scores (a class never predicted nor present scores 0)."""
    pred = np.argmax(probs, axis=1)
    scores = []
    for c in range(n_classes):
        tp = float(np.sum((pred == c) & (y == c)))
        fp = float(np.sum((pred == c) & (y != c)))
        fn = float(np.sum((pred != c) & (y == c)))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0)
    return float(np.mean(scores))


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels (probabilities floored at 1e-12)."""
    p = np.clip(probs[np.arange(y.size), y].astype(np.float64), 1e-12, 1.0)
    return float(-np.log(p).mean())


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: ``sum_b |B_b|/n * |accuracy(B_b) - confidence(B_b)|`` on equal-width top-confidence bins."""
    conf = probs.max(axis=1).astype(np.float64)
    correct = (np.argmax(probs, axis=1) == y).astype(np.float64)
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def fit_temperature(
    probs: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = TEMPERATURE_BOUNDS, iterations: int = 60
) -> float:
    """Temperature minimising the NLL of :func:`shared.bundle.calibrate` on held-out ``probs``.

    The NLL is convex in ``1/T`` (a log-sum-exp of functions linear in it minus a linear term), so
    it is unimodal in ``log T`` and a golden-section search on ``log T`` within ``bounds`` finds the
    minimum; 60 iterations narrow the bracket to about 1e-12 of its width. T = 1 (no change) is
    kept unless the search does strictly better.
    """
    lo, hi = math.log(bounds[0]), math.log(bounds[1])

    def loss(log_t: float) -> float:
        return nll(calibrate(probs, math.exp(log_t)), y)

    c, d = hi - _INV_PHI * (hi - lo), lo + _INV_PHI * (hi - lo)
    fc, fd = loss(c), loss(d)
    for _ in range(iterations):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - _INV_PHI * (hi - lo)
            fc = loss(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + _INV_PHI * (hi - lo)
            fd = loss(d)
    best = (lo + hi) / 2
    return math.exp(best) if loss(best) < loss(0.0) else 1.0
