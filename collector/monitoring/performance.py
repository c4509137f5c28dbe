"""Accuracy without labels (CBPE), whether that estimate can be trusted, and accuracy from late labels.

Pure functions on mergeable sufficient statistics: no I/O, no clock, no database.

Expected accuracy (confidence-based performance estimation)
-----------------------------------------------------------
If the model is calibrated, record ``i`` is predicted correctly with probability ``p_i``, its calibrated
top-class confidence. The number of correct predictions ``K`` of a window of ``n`` records is then
Poisson-binomial:

.. math::

    E[K] = \\sum_i p_i, \\qquad Var[K] = \\sum_i p_i (1 - p_i)

so a window is summarised by ``ConfidenceStats(n, sum_p, sum_p1mp)``, and windows (device, group, model
version, fleet) merge by addition. The interval reported is a prediction interval for the window's realized
accuracy ``K / n``:

* ``method="exact"``: the raw ``p_i`` are at hand and ``n <= exact_max_n``; the pmf of ``K`` is computed from
  its characteristic function with one FFT (Hong 2013, "DFT-CF"), fully vectorised, and the bounds are the
  ``alpha/2`` and ``1 - alpha/2`` quantiles of ``K``.
* ``method="normal"``: only the sufficient statistics are at hand (merged windows) or ``n`` is large; the
  quantiles come from the normal approximation with continuity correction,
  ``ceil(mu -+ z sigma - 1/2)``, clipped to ``[0, n]``. By the Lyapunov CLT it is accurate once
  ``sigma^2 = sum p(1-p)`` is more than a few units.
* ``method="not_enough_data"``: ``n < min_n``; no interval is given (a guess is worse than "not enough data").

In reference region
-------------------
Calibration was fitted on the reference inputs; it says nothing about inputs outside the region the model
was trained on. A window is "in region" when the shares of its records above the reference 99th percentile
of the PCA reconstruction error and of the rare co-activation count are not significantly above what the
reference itself has there (nominally 1%). Each share is tested with a one-sided exact binomial test
(``scipy.stats.binomtest``, ``alternative="greater"``) at ``alpha / 2`` (Bonferroni over the two signals).
To keep fleet-sized windows (``n ~ 10^6``) from flagging an irrelevant 1.02%, a rate also has to be at least
``min_rate_ratio`` times the expected rate to count.

Realized accuracy
-----------------
Late labels give ``RealizedStats(n_labelled, n_correct)``; the interval is Wilson's score interval. The
gap ``realized - estimated`` is measured on the labelled records only (their own ``p_i``), per model version,
by ``GapTracker``.

References
----------
Hong, Y. (2013). On computing the distribution function for the Poisson binomial distribution.
Computational Statistics & Data Analysis 59, 41-51.
Wilson, E. B. (1927). Probable inference, the law of succession, and statistical inference. JASA 22, 209-212.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import stats as sps

from shared.bundle import Histogram, ReferenceProfile

MIN_N = 30
"""Below this many records a window gets no accuracy interval and no region verdict."""

EXACT_MAX_N = 2000
"""Largest window for which the exact Poisson-binomial pmf is computed (an (n/2) x n complex matrix)."""

NOMINAL_EXCEEDANCE = 0.01
"""Share of reference records above the reference p99, by definition."""

Method = Literal["exact", "normal", "wilson", "not_enough_data"]


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level!r}")
    return float(sps.norm.ppf(0.5 + level / 2.0))


def _as_probabilities(p: npt.ArrayLike, what: str) -> npt.NDArray[np.float64]:
    arr = np.asarray(p, dtype=np.float64).ravel()
    if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
        bad = int(np.count_nonzero(~(np.isfinite(arr) & (arr >= 0.0) & (arr <= 1.0))))
        raise ValueError(f"{what}: {bad} value(s) are not probabilities in [0, 1]")
    return arr


# --------------------------------------------------------------------------------------------------------
# Expected accuracy
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfidenceStats:
    """Sufficient statistics of a window's calibrated top-class confidences (merge with ``+``)."""

    n: int = 0
    sum_p: float = 0.0
    sum_p1mp: float = 0.0

    def __post_init__(self) -> None:
        if self.n < 0 or self.sum_p < 0.0 or self.sum_p1mp < 0.0 or self.sum_p > self.n + 1e-9 * max(self.n, 1):
            raise ValueError(f"inconsistent confidence statistics: {self!r}")

    @classmethod
    def from_confidences(cls, p: npt.ArrayLike) -> ConfidenceStats:
        """Summarise raw calibrated confidences (each in [0, 1])."""
        arr = _as_probabilities(p, "calibrated confidences")
        return cls(n=int(arr.size), sum_p=float(arr.sum()), sum_p1mp=float((arr * (1.0 - arr)).sum()))

    def __add__(self, other: ConfidenceStats) -> ConfidenceStats:
        """Merge two windows."""
        return ConfidenceStats(self.n + other.n, self.sum_p + other.sum_p, self.sum_p1mp + other.sum_p1mp)


@dataclass(frozen=True, slots=True)
class AccuracyEstimate:
    """An accuracy with its interval; ``low``/``high`` are ``None`` when there is not enough data."""

    n: int
    estimate: float | None
    low: float | None
    high: float | None
    method: Method
    level: float


def poisson_binomial_pmf(p: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Pmf of the number of successes of independent Bernoulli(p_i) trials, by DFT of the char. function."""
    probs = _as_probabilities(p, "success probabilities")
    n = int(probs.size)
    if n == 0:
        return np.ones(1)
    size = n + 1
    # phi(l) = prod_j (1 - p_j + p_j w^l), w = exp(2 pi i / (n+1)); phi(n+1-l) = conj(phi(l)), so half is enough.
    half = size // 2 + 1
    w = np.exp(2j * np.pi * np.arange(half) / size)
    factors = 1.0 - probs[None, :] + probs[None, :] * w[:, None]
    # A plain product (20x faster than summing complex logs): every factor has modulus <= 1, so it can only
    # underflow to 0 where phi itself is below 1e-300, far under the pmf's round-off.
    phi_half = np.prod(factors, axis=1)
    phi = np.empty(size, dtype=np.complex128)
    phi[:half] = phi_half
    phi[half:] = np.conj(phi_half[1 : size - half + 1][::-1])
    pmf = np.fft.fft(phi).real / size
    # Round-off leaves values of order 1e-16 around zero; a pmf is non-negative and sums to one.
    np.clip(pmf, 0.0, None, out=pmf)
    return pmf / pmf.sum()


def _quantile_index(cdf: npt.NDArray[np.float64], q: float) -> int:
    # Smallest k with P(K <= k) >= q; the tolerance stops round-off from moving a bound by one.
    return int(np.searchsorted(cdf, q - 1e-12, side="left"))


def expected_accuracy(
    stats: ConfidenceStats | npt.ArrayLike,
    level: float = 0.95,
    *,
    min_n: int = MIN_N,
    exact_max_n: int = EXACT_MAX_N,
) -> AccuracyEstimate:
    """Expected accuracy of a window and a prediction interval for its realized accuracy (CBPE).

    Pass the raw calibrated confidences to get the exact Poisson-binomial interval (``n <= exact_max_n``),
    or ``ConfidenceStats`` (e.g. merged windows) for the continuity-corrected normal approximation.

    Examples
    --------
    >>> est = expected_accuracy([0.9] * 100)
    >>> est.method, round(est.estimate, 3), est.low, est.high
    ('exact', 0.9, 0.84, 0.95)
    >>> expected_accuracy(ConfidenceStats.from_confidences([0.9] * 100)).method
    'normal'
    """
    z = _z(level)
    raw: npt.NDArray[np.float64] | None = None
    if isinstance(stats, ConfidenceStats):
        summary = stats
    else:
        raw = _as_probabilities(stats, "calibrated confidences")
        summary = ConfidenceStats.from_confidences(raw)
    n = summary.n
    point = min(max(summary.sum_p / n, 0.0), 1.0) if n else None
    if n < max(min_n, 1):
        return AccuracyEstimate(n, point, None, None, "not_enough_data", level)
    alpha = 1.0 - level
    if raw is not None and n <= exact_max_n:
        cdf = np.cumsum(poisson_binomial_pmf(raw))
        k_low = _quantile_index(cdf, alpha / 2.0)
        k_high = _quantile_index(cdf, 1.0 - alpha / 2.0)
        method: Method = "exact"
    else:
        mu = summary.sum_p
        sigma = math.sqrt(summary.sum_p1mp)
        # P(K <= k) ~ Phi((k + 1/2 - mu) / sigma): smallest k reaching alpha/2 and 1 - alpha/2.
        k_low = math.ceil(mu - z * sigma - 0.5 - 1e-9)
        k_high = math.ceil(mu + z * sigma - 0.5 - 1e-9)
        method = "normal"
    k_low = min(max(k_low, 0), n)
    k_high = min(max(k_high, 0), n)
    return AccuracyEstimate(n, point, k_low / n, k_high / n, method, level)


# --------------------------------------------------------------------------------------------------------
# In reference region
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExceedanceCounts:
    """How many of a window's records lie above a reference threshold (merge with ``+``)."""

    n: int = 0
    n_above: int = 0
    expected_rate: float = NOMINAL_EXCEEDANCE

    def __post_init__(self) -> None:
        if self.n < 0 or not 0 <= self.n_above <= self.n:
            raise ValueError(f"inconsistent exceedance counts: {self!r}")
        if not 0.0 < self.expected_rate < 1.0:
            raise ValueError(f"expected exceedance rate must be in (0, 1), got {self.expected_rate!r}")

    def __add__(self, other: ExceedanceCounts) -> ExceedanceCounts:
        """Merge two windows measured against the same reference."""
        if not math.isclose(self.expected_rate, other.expected_rate, rel_tol=1e-9):
            raise ValueError("cannot merge exceedance counts measured against different references")
        return ExceedanceCounts(self.n + other.n, self.n_above + other.n_above, self.expected_rate)

    @property
    def rate(self) -> float | None:
        """Observed share above the threshold (``None`` for an empty window)."""
        return self.n_above / self.n if self.n else None


def exceedance_from_histogram(counts: npt.ArrayLike, reference: Histogram, threshold: float) -> ExceedanceCounts:
    """Count a window's records above ``threshold`` from its histogram on the reference edges.

    ``counts`` has ``len(edges) - 1`` bins with open-ended outer bins (the convention of
    ``collector.training.reference.bin_counts``), or ``len(edges) + 1`` (an underflow bin first and an
    overflow bin last). The bins tested are those lying wholly at or above the threshold when the
    reference has mass there (half-integer edges of a count: the records with a count above its p99);
    otherwise (quantile edges, whose top bin spans p95 to the maximum) the bin holding the threshold and
    those above it. The expected rate is the reference's own share in the same bins, so the coarse
    binning loses sensitivity but cannot bias the test.
    """
    window = np.asarray(counts, dtype=np.float64).ravel()
    edges = np.asarray(reference.edges, dtype=np.float64)
    ref = np.asarray(reference.counts, dtype=np.float64)
    if window.size == edges.size + 1:
        # Fold the under/overflow bins into the outer bins: the reference's outer bins are open-ended too.
        window = np.concatenate([[window[0] + window[1]], window[2:-2], [window[-2] + window[-1]]])
    elif window.size != edges.size - 1:
        raise ValueError(
            f"histogram has {window.size} bins; the reference edges need {edges.size - 1} or {edges.size + 1}"
        )
    if not (np.isfinite(window).all() and window.min(initial=0.0) >= 0.0 and np.all(window == np.round(window))):
        raise ValueError("histogram counts must be non-negative integers")
    if not math.isfinite(threshold):
        raise ValueError(f"reference threshold must be finite, got {threshold!r}")
    ref_total = float(ref.sum())
    # Inner edges only: the outer bins are open-ended, so an outer edge is never a bin boundary.
    inner = edges[1:-1]
    wholly_above = int(np.searchsorted(inner, threshold, side="left")) + 1
    holding = int(np.searchsorted(inner, threshold, side="right"))
    first = wholly_above if wholly_above < ref.size and ref[wholly_above:].sum() > 0 else holding
    ref_share = float(ref[first:].sum()) / ref_total if ref_total > 0 else 0.0
    if ref_share >= 1.0:
        raise ValueError(f"threshold {threshold!r} lies in the reference's first bin: every record would exceed it")
    expected = ref_share if ref_share > 0.0 else NOMINAL_EXCEEDANCE
    return ExceedanceCounts(n=int(window.sum()), n_above=int(window[first:].sum()), expected_rate=expected)


@dataclass(frozen=True, slots=True)
class RegionVerdict:
    """Whether a window is inside the region the calibration was fitted on, and why not."""

    verdict: Literal["reliable", "unreliable", "not_enough_data"]
    reliable: bool
    reason: str | None
    pca_rate: float | None
    pca_pvalue: float | None
    coact_rate: float | None
    coact_pvalue: float | None


def region_reliability(
    pca: ExceedanceCounts,
    coact: ExceedanceCounts,
    *,
    alpha: float = 0.01,
    min_rate_ratio: float = 1.5,
    min_n: int = MIN_N,
    design_effects: tuple[float, float] = (1.0, 1.0),
) -> RegionVerdict:
    """Decide whether the calibration still applies to a window (one-sided binomial tests, Bonferroni).

    ``design_effects`` (PCA error, co-activations) discount autocorrelated records: the binomial test
    runs on the counts the records are worth, ``n / deff`` records with ``k / deff`` above the threshold
    (the usual design-effect adjustment of a binomial proportion; the rate itself is unchanged).

    Examples
    --------
    >>> region_reliability(ExceedanceCounts(1000, 12), ExceedanceCounts(1000, 9)).verdict
    'reliable'
    >>> v = region_reliability(ExceedanceCounts(1000, 60), ExceedanceCounts(1000, 9))
    >>> v.verdict, v.reason.split(" (")[0]
    ('unreliable', 'PCA reconstruction error above reference p99 for 6.0% of records')
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if min_rate_ratio < 1.0:
        raise ValueError(f"min_rate_ratio must be >= 1, got {min_rate_ratio!r}")
    if min(pca.n, coact.n) < max(min_n, 1):
        return RegionVerdict("not_enough_data", False, f"fewer than {min_n} records", pca.rate, None, coact.rate, None)
    reasons: list[str] = []
    pvalues: list[float] = []
    if min(design_effects) < 1.0:
        raise ValueError(f"design effects must be >= 1, got {design_effects!r}")
    for (label, counts), deff in zip(
        (("PCA reconstruction error", pca), ("rare co-activation count", coact)), design_effects, strict=True
    ):
        n_eff = max(round(counts.n / deff), 1)
        k_eff = min(round(counts.n_above / deff), n_eff)
        pvalue = float(sps.binomtest(k_eff, n_eff, counts.expected_rate, alternative="greater").pvalue)
        pvalues.append(pvalue)
        rate = counts.n_above / counts.n
        if pvalue < alpha / 2.0 and rate >= min_rate_ratio * counts.expected_rate:
            reasons.append(
                f"{label} above reference p99 for {rate:.1%} of records "
                f"(expected {counts.expected_rate:.1%}, p={pvalue:.2g})"
            )
    reliable = not reasons
    return RegionVerdict(
        "reliable" if reliable else "unreliable",
        reliable,
        "; ".join(reasons) or None,
        pca.rate,
        pvalues[0],
        coact.rate,
        pvalues[1],
    )


def region_reliability_from_histograms(
    profile: ReferenceProfile,
    pca_error_counts: npt.ArrayLike,
    coact_counts: npt.ArrayLike,
    *,
    alpha: float = 0.01,
    min_rate_ratio: float = 1.5,
    min_n: int = MIN_N,
    design_effects: tuple[float, float] = (1.0, 1.0),
) -> RegionVerdict:
    """``region_reliability`` from a window's histograms on the bundle's reference edges."""
    pca = exceedance_from_histogram(pca_error_counts, profile.pca.error_histogram, profile.pca.error_p99)
    coact = exceedance_from_histogram(coact_counts, profile.coactivation.count_histogram, profile.coactivation.p99)
    return region_reliability(
        pca, coact, alpha=alpha, min_rate_ratio=min_rate_ratio, min_n=min_n, design_effects=design_effects
    )


# --------------------------------------------------------------------------------------------------------
# Realized accuracy and the gap
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RealizedStats:
    """Labelled records of a window and how many were predicted correctly (merge with ``+``)."""

    n_labelled: int = 0
    n_correct: int = 0

    def __post_init__(self) -> None:
        if self.n_labelled < 0 or not 0 <= self.n_correct <= self.n_labelled:
            raise ValueError(f"inconsistent realized statistics: {self!r}")

    def __add__(self, other: RealizedStats) -> RealizedStats:
        """Merge two windows."""
        return RealizedStats(self.n_labelled + other.n_labelled, self.n_correct + other.n_correct)


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``k / n``."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"Wilson interval needs 0 <= k <= n and n > 0, got k={k}, n={n}")
    z = _z(level)
    z2 = z * z
    centre = (k + z2 / 2.0) / (n + z2)
    half = z / (n + z2) * math.sqrt(k * (n - k) / n + z2 / 4.0)
    return max(centre - half, 0.0), min(centre + half, 1.0)


def realized_accuracy(stats: RealizedStats, level: float = 0.95, *, min_n: int = MIN_N) -> AccuracyEstimate:
    """Accuracy measured on late labels, with Wilson's interval.

    Examples
    --------
    >>> est = realized_accuracy(RealizedStats(40, 32))
    >>> est.estimate, round(est.low, 4), round(est.high, 4)
    (0.8, 0.6524, 0.895)
    """
    _z(level)
    n = stats.n_labelled
    point = stats.n_correct / n if n else None
    if n < max(min_n, 1):
        return AccuracyEstimate(n, point, None, None, "not_enough_data", level)
    low, high = wilson_interval(stats.n_correct, n, level)
    return AccuracyEstimate(n, point, low, high, "wilson", level)


@dataclass(frozen=True, slots=True)
class GapStats:
    """Sufficient statistics of labelled records for the estimate-vs-realized gap (merge with ``+``).

    ``sum_p_correct`` is the sum of confidences over correctly predicted records; with it the empirical
    variance of ``d_i = c_i - p_i`` follows from ``sum d^2 = n_correct - 2 sum_p_correct + sum p^2`` and
    ``sum p^2 = sum_p - sum_p1mp``.
    """

    n: int = 0
    sum_p: float = 0.0
    sum_p1mp: float = 0.0
    n_correct: int = 0
    sum_p_correct: float = 0.0

    @classmethod
    def from_records(cls, confidences: npt.ArrayLike, correct: npt.ArrayLike) -> GapStats:
        """Summarise labelled records: calibrated confidence and whether the prediction was right."""
        p = _as_probabilities(confidences, "calibrated confidences")
        c = np.asarray(correct).ravel()
        if c.shape != p.shape:
            raise ValueError(f"{p.size} confidences but {c.size} correctness flags")
        if c.dtype != np.bool_:
            if c.size and not np.isin(c, (0, 1)).all():
                raise ValueError("correctness flags must be booleans or 0/1")
            c = c.astype(bool)
        return cls(
            n=int(p.size),
            sum_p=float(p.sum()),
            sum_p1mp=float((p * (1.0 - p)).sum()),
            n_correct=int(np.count_nonzero(c)),
            sum_p_correct=float(p[c].sum()),
        )

    def __add__(self, other: GapStats) -> GapStats:
        """Merge two sets of labelled records."""
        return GapStats(
            self.n + other.n,
            self.sum_p + other.sum_p,
            self.sum_p1mp + other.sum_p1mp,
            self.n_correct + other.n_correct,
            self.sum_p_correct + other.sum_p_correct,
        )


@dataclass(frozen=True, slots=True)
class AccuracyGap:
    """Realized minus estimated accuracy on the same labelled records, with its uncertainty.

    ``low``/``high`` use the empirical standard error of ``c_i - p_i``; ``calibration_pvalue`` is the
    two-sided test of "the model is still calibrated", whose variance ``sum p(1-p)`` needs no labels.
    """

    model_version: str
    n: int
    estimated: float | None
    realized: float | None
    gap: float | None
    stderr: float | None
    low: float | None
    high: float | None
    calibration_pvalue: float | None
    level: float


class GapTracker:
    """Estimate-vs-realized accuracy gap accumulated per model version.

    Examples
    --------
    >>> tracker = GapTracker()
    >>> tracker.add("m1", [0.9, 0.8, 0.7, 0.6] * 10, [True, True, False, True] * 10)
    >>> g = tracker.gap("m1")
    >>> round(g.estimated, 3), g.realized, round(g.gap, 3)
    (0.75, 0.75, 0.0)
    """

    def __init__(self, level: float = 0.95, min_n: int = MIN_N) -> None:
        _z(level)
        if min_n < 1:
            raise ValueError(f"min_n must be >= 1, got {min_n!r}")
        self.level = level
        self.min_n = min_n
        self._stats: dict[str, GapStats] = {}

    def reset(self) -> None:
        """Forget every model version."""
        self._stats.clear()

    def add(self, model_version: str, confidences: npt.ArrayLike, correct: npt.ArrayLike) -> None:
        """Add labelled records of one model version."""
        self.add_stats(model_version, GapStats.from_records(confidences, correct))

    def add_stats(self, model_version: str, stats: GapStats) -> None:
        """Merge already summarised labelled records of one model version."""
        self._stats[model_version] = self._stats.get(model_version, GapStats()) + stats

    @property
    def model_versions(self) -> list[str]:
        """Model versions seen so far, sorted."""
        return sorted(self._stats)

    def stats(self, model_version: str) -> GapStats:
        """The accumulated statistics of one model version (empty if never seen)."""
        return self._stats.get(model_version, GapStats())

    def gap(self, model_version: str) -> AccuracyGap:
        """The gap of one model version; ``None`` fields when fewer than ``min_n`` labelled records."""
        s = self.stats(model_version)
        if s.n == 0:
            return AccuracyGap(model_version, 0, None, None, None, None, None, None, None, self.level)
        estimated = s.sum_p / s.n
        realized = s.n_correct / s.n
        gap = realized - estimated
        if s.n < self.min_n:
            return AccuracyGap(model_version, s.n, estimated, realized, gap, None, None, None, None, self.level)
        sum_p2 = s.sum_p - s.sum_p1mp
        sum_d2 = s.n_correct - 2.0 * s.sum_p_correct + sum_p2
        var_d = max(sum_d2 - s.n * gap * gap, 0.0) / (s.n - 1)
        stderr = math.sqrt(var_d / s.n)
        z = _z(self.level)
        if s.sum_p1mp > 0.0:
            z_cal = (s.n_correct - s.sum_p) / math.sqrt(s.sum_p1mp)
            pvalue = float(2.0 * sps.norm.sf(abs(z_cal)))
        else:
            pvalue = 1.0 if s.n_correct == round(s.sum_p) else 0.0
        return AccuracyGap(
            model_version, s.n, estimated, realized, gap, stderr, gap - z * stderr, gap + z * stderr, pvalue, self.level
        )

    def gaps(self) -> list[AccuracyGap]:
        """The gap of every model version, sorted by version."""
        return [self.gap(v) for v in self.model_versions]
