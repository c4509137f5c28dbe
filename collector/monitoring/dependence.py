"""How far a window's records are from independent: autocorrelation and effective sample sizes.

One vehicle's records of a window are seconds apart, and most of what they measure changes slowly:
cabin temperature, humidity and pressure over minutes, an event (a cigarette, an open window) over
tens of records. Treated as independent, a few hundred such records look like strong evidence for
any small difference from the reference, and every stationary vehicle is "drifting" in most windows
(measured: docs/MONITORING.md, "Experiment: no alarm storm"). The drift tests therefore use
*effective* sample sizes.

Autocorrelation from mergeable sums (pure functions, no I/O)
------------------------------------------------------------
The sketches (:class:`~collector.monitoring.sketches.WindowSketch`) keep, at the lags ``l`` of
``LAGS`` (1 and 8 records), the successive differences ``D_l = Σ (x_t - x_{t-l})²`` over the ``P_l``
pairs ``l`` records apart within a block, and ``n``, ``Σx``, ``Σx²``. Since
``E[(x_t - x_{t-l})²] = 2 σ² (1 - ρ_l)``, von Neumann's ratio gives

    ρ_l = 1 - (D_l / P_l) / (2 s²),      s² = (Σx² - (Σx)² / n) / (n - 1).

A predicted class is categorical: with ``S_l`` of ``P_l`` pairs predicting the same class and class
shares ``p_k``, the chance agreement is ``c = Σ p_k²`` and ``ρ_l = (S_l / P_l - c) / (1 - c)`` (the
kappa of a record with the one ``l`` back; for a Markov chain that stays with probability ``a`` and
otherwise draws from ``p``, ``ρ_1 = a``).

An estimate counts only when it is significantly positive (one-sided, ``z = 2`` standard errors of its
value under independence: ``1 / sqrt(P)`` for the ratio, the binomial one for the class): independent
records keep their full sample size, and negative autocorrelation, rare in sensor data, never inflates
it. A window whose value never changed between neighbours is as dependent as it gets (one reading,
repeated), not independent.

Design effect: an exponential decay under noise
-----------------------------------------------
The variance of a mean of ``n`` records is ``σ² / n`` times the design effect
``deff = 1 + 2 Σ_k ρ_k``. An AR(1) process has ``ρ_k = ρ^k`` and ``deff = (1 + ρ) / (1 - ρ)`` (Bayley and
Hammersley 1946), but sensor streams are a slow signal under fast noise (measurement noise, the
flicker of a reading on a coarse grid, record-to-record scatter of a model's confidence within an
event): ``ρ_k = a φ^k`` with ``a < 1`` the slow part's share of the variance, an ARMA(1,1). Its lag-1
correlation is small while its memory is long, and AR(1) fitted to ``ρ_1`` alone understates the
design effect many times (cabin pressure flickering between two float16 steps: ``ρ_1 = 0.2``, design
effect 1.5 by AR(1), about 12 from the decay). The two lags fit it: ``φ = (ρ_L / ρ_1)^(1 / (L - 1))``,
``a = ρ_1 / φ``, and

    deff = 1 + 2 a φ / (1 - φ) = 1 + 2 ρ_1 / (1 - φ)

(AR(1), ``φ = ρ``, when only one lag shows a significant correlation). ``n_eff = n /
deff``; it is at most ``n`` and at least 1. For the indicator ``1{x <= e}`` behind a binned CDF the
autocorrelation of a Gaussian process is ``(2 / π) arcsin ρ <= ρ``, so the values' design effect is
conservative for the KS test.

Effective sizes are computed on one vehicle's window (its stored sketch) and *added* over the windows a
group, fleet or longer span merges (:class:`EffectiveSizes`). Blocks shorter than the longer lag (a
vehicle sending a handful of records per batch) give it no pairs, and the estimate falls back to AR(1).

References
----------
von Neumann, J. (1941). Distribution of the ratio of the mean square successive difference to the
variance. Ann. Math. Statist. 12(4).
Bayley, G. V., Hammersley, J. M. (1946). The "effective" number of independent observations in an
autocorrelated time series. JRSS Suppl. 8(2).
Box, G. E. P., Jenkins, G. M. (1976). Time Series Analysis: Forecasting and Control (ARMA(1,1) autocorrelation).
Rao, J. N. K., Scott, A. J. (1981). The analysis of categorical data from complex sample surveys.
JASA 76(374) (chi-square divided by a design effect).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

if TYPE_CHECKING:
    from collector.monitoring.sketches import WindowSketch

LAGS: Final = (1, 8)
"""Record lags of the successive-difference sums the sketches keep: the nearest neighbour, and one that
sees past fast noise (the decay of the autocorrelation between the two is what :func:`decay_design_effect`
fits)."""
RHO_MAX: Final = 0.999
"""Largest autocorrelation or decay rate used."""
DEFF_MAX: Final = (1.0 + RHO_MAX) / (1.0 - RHO_MAX)
"""Largest design effect (1,999): a window of one reading, repeated."""
SIGNIFICANCE_Z: Final = 2.0
"""An estimate counts only this many standard errors above zero (under independence)."""
MIN_PAIRS: Final = 10
"""Fewer pairs than this at a lag: that lag's autocorrelation is unknown."""


def lag_correlations(
    diff_sq: np.ndarray,
    pairs: np.ndarray,
    n: np.ndarray | float,
    total: np.ndarray | float,
    total_sq: np.ndarray | float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Von Neumann autocorrelation at each lag (first axis of ``diff_sq``/``pairs``) from mergeable sums.

    Returns ``(rho, significant, constant)``: the raw estimates (NaN where unknown), whether each is
    significantly positive with at least :data:`MIN_PAIRS` pairs, and, per quantity, whether no pair at
    the first lag differed at all.
    """
    d = np.asarray(diff_sq, dtype=np.float64)
    p = np.asarray(pairs, dtype=np.float64)
    m = np.asarray(n, dtype=np.float64)
    s1 = np.asarray(total, dtype=np.float64)
    s2 = np.asarray(total_sq, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = (s2 - s1 * s1 / m) / (m - 1.0)
        # A variance lost in rounding leaves the estimate unknown.
        known = (m > 1) & (var > 1e-12 * np.abs(s2 / m))
        rho = np.where(known & (p > 0), 1.0 - (d / p) / (2.0 * var), np.nan)
        significant = (p >= MIN_PAIRS) & (rho > SIGNIFICANCE_Z / np.sqrt(np.maximum(p, 1.0)))
    constant = (p[0] >= MIN_PAIRS) & (d[0] == 0.0)
    return rho, significant, constant


def categorical_lag_correlations(
    same: np.ndarray, pairs: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Agreement beyond chance at each lag, ``(S / P - Σ p²) / (1 - Σ p²)``: ``(rho, significant, constant)``."""
    s = np.asarray(same, dtype=np.float64)
    p = np.asarray(pairs, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    total = float(c.sum())
    chance = float(((c / total) ** 2).sum()) if total > 0 else 1.0
    if chance >= 1.0 - 1e-12:
        # One class only: nothing to agree about beyond chance (every test of the mix abstains anyway).
        nan = np.full(p.shape, np.nan)
        return nan, np.zeros(p.shape, dtype=bool), np.asarray(False)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(p > 0, (s / p - chance) / (1.0 - chance), np.nan)
        z = (s - p * chance) / np.sqrt(p * chance * (1.0 - chance))
    significant = (p >= MIN_PAIRS) & (z > SIGNIFICANCE_Z)
    return rho, significant, np.asarray(False)


def decay_design_effect(
    rho: np.ndarray, significant: np.ndarray, constant: np.ndarray, lags: Sequence[int]
) -> np.ndarray:
    """Design effect of an exponentially decaying autocorrelation under noise, from two lags (module docstring).

    The decay is fitted only when both lags show a significant correlation; with lag 1 alone it is AR(1)
    on lag 1, and with the longer lag alone (lag 1 lost in noise) AR(1) on the longer lag's value, which
    keeps a chance significance at one lag of independent records from turning into a large effect.
    """
    if len(lags) != 2 or lags[0] != 1 or lags[1] <= 1:
        raise ValueError(f"the decay is fitted on lag 1 and one longer lag, got {tuple(lags)}")
    span = lags[1] - 1
    r = np.clip(np.where(significant, np.nan_to_num(rho), 0.0), 0.0, RHO_MAX)
    r1, r_long = r[0], r[1]
    both = significant[0] & significant[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(r1 > 0, r_long / r1, 0.0)
        decay = np.where(ratio >= 1.0, RHO_MAX, np.power(np.clip(ratio, 0.0, 1.0), 1.0 / span))
    short = np.where(significant[0], r1, r_long)  # AR(1) on whichever lag showed a correlation
    phi = np.clip(np.where(both, decay, short), 0.0, RHO_MAX)
    deff = 1.0 + 2.0 * np.where(both, r1, short) / (1.0 - phi)
    return np.where(constant, DEFF_MAX, np.clip(deff, 1.0, DEFF_MAX))


def design_effect(rho: np.ndarray | float) -> np.ndarray:
    """AR(1): ``(1 + ρ) / (1 - ρ)``, how much a mean's variance grows over independent records."""
    r = np.clip(np.asarray(rho, dtype=np.float64), 0.0, RHO_MAX)
    return (1.0 + r) / (1.0 - r)


def design_effect_of(n: float, effective: float) -> float:
    """``n / effective``, at least 1 (1 when there is nothing to discount)."""
    return 1.0 if effective <= 0 or n <= 0 else max(n / effective, 1.0)


def effective_size(n: np.ndarray | float, deff: np.ndarray | float) -> np.ndarray:
    """``n / deff``, kept within ``[min(n, 1), n]``: independent records worth as much as ``n`` dependent ones."""
    m = np.asarray(n, dtype=np.float64)
    return np.clip(m / np.maximum(np.asarray(deff, dtype=np.float64), 1.0), np.minimum(m, 1.0), m)


@dataclass(frozen=True)
class EffectiveSizes:
    """Effective sample size of every quantity a window's drift tests look at; merge windows with ``+``.

    Computed per stored (device, model version, window) sketch, whose records are one vehicle's, and
    *added* over the sketches a group, fleet or longer span merges: vehicles are independent of each
    other, and a window's autocorrelation is a property of one vehicle's stream. (Estimating it on the
    merged sums instead would read the spread between vehicles as dependence, and a few drifted
    vehicles would hide themselves by making the merged window look less informative.)
    """

    features: np.ndarray
    """``[F]`` per input feature (finite values only)."""
    classes: float
    """Predicted classes (valid predictions)."""
    confidence: float
    """Calibrated confidences (finite values)."""
    pca: float
    coact: float

    def __add__(self, other: EffectiveSizes) -> EffectiveSizes:
        return EffectiveSizes(
            self.features + other.features,
            self.classes + other.classes,
            self.confidence + other.confidence,
            self.pca + other.pca,
            self.coact + other.coact,
        )

    @classmethod
    def of(cls, sketch: WindowSketch, decorrelation_s: np.ndarray | None = None) -> EffectiveSizes:
        """The effective sizes of one vehicle's window: its successive differences and moments, and its time.

        ``decorrelation_s`` (``[F + 4]``: features, then predicted class, confidence, PCA error and
        co-activation count; seconds per independent record on the reference drives) caps every size
        at ``span / seconds``, ``span`` the time the window's records cover: what moves slower than the
        window is invisible to its own records (:func:`time_capped`).
        """
        n = sketch.n
        n_feat = (n - sketch.feature_nan).astype(np.float64)  # finite values per feature
        conf_sq = sketch.conf_sum - sketch.conf_var_sum  # Σp² = Σp - Σp(1 - p)
        feature_deff = decay_design_effect(
            *lag_correlations(
                sketch.feature_diff_sq, sketch.feature_pairs, n_feat, sketch.feature_sum, sketch.feature_sumsq
            ),
            LAGS,
        )
        # Confidence, PCA error and co-activation count as three columns of the same estimator.
        score_deff = decay_design_effect(
            *lag_correlations(
                np.stack([sketch.conf_diff_sq, sketch.pca_diff_sq, sketch.coact_diff_sq], axis=1),
                np.stack([sketch.conf_pairs, sketch.score_pairs, sketch.score_pairs], axis=1),
                np.array([sketch.conf_n, n, n]),
                np.array([sketch.conf_sum, sketch.pca_sum, sketch.coact_sum]),
                np.array([conf_sq, sketch.pca_sumsq, sketch.coact_sumsq]),
            ),
            LAGS,
        )
        class_deff = decay_design_effect(
            *categorical_lag_correlations(sketch.class_same, sketch.class_pairs, sketch.class_counts), LAGS
        )
        sizes = np.concatenate(
            [
                effective_size(n_feat, feature_deff),
                [
                    effective_size(float(sketch.class_counts.sum()), class_deff),
                    effective_size(sketch.conf_n, score_deff[0]),
                    effective_size(n, score_deff[1]),
                    effective_size(n, score_deff[2]),
                ],
            ]
        )
        if decorrelation_s is not None:
            sizes = time_capped(sizes, window_span(sketch), decorrelation_s)
        nf = n_feat.size
        return cls(sizes[:nf], float(sizes[nf]), float(sizes[nf + 1]), float(sizes[nf + 2]), float(sizes[nf + 3]))


def window_span(sketch: WindowSketch) -> float:
    """Seconds one vehicle's window of records covers: first to last record, plus one record's spacing."""
    n = sketch.n
    if n < 2 or not (math.isfinite(sketch.ts_min) and math.isfinite(sketch.ts_max)):
        return 0.0
    return max(sketch.ts_max - sketch.ts_min, 0.0) * n / (n - 1)


def time_capped(sizes: np.ndarray, span_s: float, decorrelation_s: np.ndarray) -> np.ndarray:
    """``min(size, max(span / seconds, 1))``: at most one independent look per decorrelation time."""
    if span_s <= 0:
        return np.minimum(sizes, 1.0)
    cap = np.maximum(span_s / np.asarray(decorrelation_s, dtype=np.float64), 1.0)
    return np.minimum(sizes, cap)


def total_effective(
    sketches: Iterable[WindowSketch], n_features: int, decorrelation_s: np.ndarray | None = None
) -> EffectiveSizes:
    """The effective sizes of many vehicles' windows together: each window's own, added."""
    total = EffectiveSizes(np.zeros(n_features), 0.0, 0.0, 0.0, 0.0)
    for s in sketches:
        total = total + EffectiveSizes.of(s, decorrelation_s)
    return total
