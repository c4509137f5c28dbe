"""Drift statistics on mergeable histograms: pure functions, no I/O.

The collector keeps, per (device, model version, window), counts on the reference bin edges of the
bundle (:mod:`collector.training.reference` fixes the binning: outer bins open-ended, non-finite
values not counted). Everything here compares such a *current* count histogram with the
*reference* one, vectorised over features: a feature histogram set is an array ``[features, bins]``.
Features whose edges collapsed to fewer bins are padded with zero bins on the right
(:func:`stack_counts`); a bin empty in both histograms contributes exactly 0 to every distance and
leaves both CDFs unchanged, so padding never changes a result.

Distances (``p`` reference proportions, ``q`` current proportions, ``B`` bins)
-----------------------------------------------------------------------------
* PSI ``= sum_k (q'_k - p'_k) ln(q'_k / p'_k)`` with ``p' = max(p, eps)``, ``q' = max(q, eps)``,
  ``eps = 1e-4`` by default (an empty bin would make it infinite; the floor is the usual practice,
  e.g. Evidently's). Conventions (Siddiqi 2006; Yurdakul 2018): < 0.1 no change, 0.1-0.25
  moderate, >= 0.25 major.
* Hellinger ``H = sqrt(1 - sum_k sqrt(p_k q_k))`` in [0, 1]; needs no smoothing.
* KL(current || reference) ``= sum_k q_k ln(q_k / p'_k)`` in nats; only the reference is floored
  (a bin empty now contributes 0); clipped at 0 because the floor can push it a hair below.
* Jensen-Shannon divergence ``= (KL(p||m) + KL(q||m)) / 2`` with ``m = (p + q) / 2``, base 2, in
  [0, 1]; needs no smoothing (``m_k > 0`` wherever ``p_k`` or ``q_k`` is). scipy's
  ``jensenshannon`` returns its square root.

Tests
-----
* KS from binned CDFs: ``D = max_k |P_k - Q_k|`` over the bin edges, p-value from the Kolmogorov
  distribution with the effective sample size ``n_e = n m / (n + m)`` (Stephens' corrected
  asymptotic form, within 3 % of ``scipy.stats.kstwo`` at ``round(n_e)``, which ``ks_2samp`` uses in
  its asymptotic mode, for p >= 1e-4). Binning only looks at the
  CDFs at the edges, so the binned ``D`` is at most the raw one: the test is conservative (it
  misses shifts inside a bin, never invents one).
* Raw samples: :func:`ks_exact` wraps ``scipy.stats.ks_2samp``; :func:`ks_columns` computes the
  raw ``D`` of all columns at once in numpy (one sort) with the asymptotic p-value.
* Class mix: chi-square goodness of fit of the predicted-class counts against the training priors,
  categories with expected count < 5 pooled (Cochran's rule), with a total-variation effect floor.
* Confidence shift: Welch-style z test of the difference of mean calibrated confidence, moments
  from the histograms (bin midpoints).
* PCA reconstruction error and rare co-activation count: one-sided Mann-Whitney U on the binned
  values (:func:`binned_mann_whitney`). Binning turns values into ties, and the tie-corrected normal
  approximation of U is exactly the test on the tied data; for the co-activation count, binned one
  value per bin, it *is* the raw test. We prefer it to a one-sided binned KS because both scores
  pile up in the lowest bins (most records fire no rare pair), where KS's sup-distance is very
  conservative, while U uses the whole ordering and its ``U / (n m)`` (the probability that a live
  record scores higher than a reference one) is a readable effect size.
* Benjamini-Hochberg across a family of p-values (features, signals and devices).

Every test returns a :class:`TestResult` and says ``"not_enough_data"`` below a minimum sample size
(default 100 current and 100 reference records) instead of guessing.

References
----------
Siddiqi, N. (2006). Credit Risk Scorecards. Wiley (PSI thresholds).
Lin, J. (1991). Divergence measures based on the Shannon entropy. IEEE Trans. Inf. Theory 37(1).
Hodges, J. L. (1958). The significance probability of the Smirnov two-sample test. Ark. Mat. 3.
Mann, H. B., Whitney, D. R. (1947). Ann. Math. Statist. 18(1).
Benjamini, Y., Hochberg, Y. (1995). Controlling the false discovery rate. JRSS B 57(1).
Myllyaho, L. et al. (2022). On misbehaviour and fault tolerance in machine learning systems. JSS 183.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
from scipy import stats

from collector.monitoring.dependence import EffectiveSizes, design_effect_of
from shared.bundle import Histogram, ReferenceProfile

log = logging.getLogger(__name__)

Verdict = Literal["drift", "ok", "not_enough_data"]
Alternative = Literal["two-sided", "less", "greater"]

DEFAULT_EPS = 1e-4
MIN_CURRENT = 100
MIN_REFERENCE = 100
MIN_EXPECTED = 5.0
STEPHENS_MIN_N = 100
MIN_EFFECTIVE = 20.0


# ------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class TestResult:
    """Outcome of one test: its statistic, p-value (None for thresholded distances), threshold and verdict."""

    __test__ = False  # not a pytest test class despite the name

    name: str
    statistic: float
    p_value: float | None
    threshold: float
    verdict: Verdict
    n_reference: int
    n_current: int
    q_value: float | None = None
    """Benjamini-Hochberg adjusted p-value when the test was decided within a family."""
    effect: float | None = None
    """Effect size the verdict also required, where the test has a floor (class mix: total variation)."""
    design_effect: float = 1.0
    """Variance inflation applied for autocorrelated current records (1: treated as independent)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _not_enough(name: str, threshold: float, n_reference: int, n_current: int) -> TestResult:
    return TestResult(name, 0.0, None, threshold, "not_enough_data", n_reference, n_current)


# ----------------------------------------------------------------------------- histograms


def stack_counts(counts: Sequence[Sequence[int] | np.ndarray]) -> np.ndarray:
    """``[features, max_bins]`` int64 array of per-feature counts, zero-padded on the right."""
    rows = [np.asarray(c, dtype=np.int64).ravel() for c in counts]
    if not rows:
        return np.zeros((0, 1), dtype=np.int64)
    out = np.zeros((len(rows), max(r.size for r in rows)), dtype=np.int64)
    for i, r in enumerate(rows):
        if (r < 0).any():
            raise ValueError(f"histogram {i} has negative counts")
        out[i, : r.size] = r
    return out


def _as_2d(counts: np.ndarray | Sequence[Any]) -> np.ndarray:
    a = np.asarray(counts, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"counts must be [bins] or [features, bins], got shape {a.shape}")
    if (a < 0).any() or not np.isfinite(a).all():
        raise ValueError("counts must be finite and non-negative")
    return a


def _pair(reference: np.ndarray | Sequence[Any], current: np.ndarray | Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    r, c = _as_2d(reference), _as_2d(current)
    if r.shape != c.shape:
        raise ValueError(f"reference counts {r.shape} and current counts {c.shape} differ in shape")
    return r, c


def proportions(counts: np.ndarray | Sequence[Any]) -> np.ndarray:
    """Row-normalised counts ``[features, bins]``; an all-zero row stays all zero (no NaN)."""
    a = _as_2d(counts)
    total = a.sum(axis=1, keepdims=True)
    return np.divide(a, total, out=np.zeros_like(a), where=total > 0)


def _squeeze(x: np.ndarray, like: np.ndarray | Sequence[Any]) -> np.ndarray:
    return x[0] if np.ndim(like) == 1 else x


def psi(
    reference: np.ndarray | Sequence[Any], current: np.ndarray | Sequence[Any], eps: float = DEFAULT_EPS
) -> np.ndarray:
    """Population stability index per feature: ``sum (q' - p') ln(q'/p')`` with proportions floored at ``eps``."""
    r, c = _pair(reference, current)
    p, q = np.maximum(proportions(r), eps), np.maximum(proportions(c), eps)
    return _squeeze(((q - p) * np.log(q / p)).sum(axis=1), reference)


def hellinger(reference: np.ndarray | Sequence[Any], current: np.ndarray | Sequence[Any]) -> np.ndarray:
    """Hellinger distance per feature, ``sqrt(1 - sum sqrt(p q))`` in [0, 1]."""
    r, c = _pair(reference, current)
    bc = np.sqrt(proportions(r) * proportions(c)).sum(axis=1)
    return _squeeze(np.sqrt(np.clip(1.0 - bc, 0.0, 1.0)), reference)


def kl_divergence(
    reference: np.ndarray | Sequence[Any], current: np.ndarray | Sequence[Any], eps: float = DEFAULT_EPS
) -> np.ndarray:
    """KL(current || reference) per feature in nats, reference proportions floored at ``eps``."""
    r, c = _pair(reference, current)
    p, q = np.maximum(proportions(r), eps), proportions(c)
    ratio = np.divide(q, p, out=np.ones_like(q), where=q > 0)
    return _squeeze(np.maximum((q * np.log(ratio)).sum(axis=1), 0.0), reference)


def jensen_shannon(reference: np.ndarray | Sequence[Any], current: np.ndarray | Sequence[Any]) -> np.ndarray:
    """Jensen-Shannon divergence per feature, base 2, in [0, 1] (no smoothing needed)."""
    r, c = _pair(reference, current)
    p, q = proportions(r), proportions(c)
    m = (p + q) / 2

    def _kl2(a: np.ndarray) -> np.ndarray:
        ratio = np.divide(a, m, out=np.ones_like(a), where=a > 0)
        return (a * np.log2(ratio)).sum(axis=1)

    return _squeeze(np.clip((_kl2(p) + _kl2(q)) / 2, 0.0, 1.0), reference)


# -------------------------------------------------------------------------------------- KS


def _kolmogorov_sf(d: np.ndarray, n: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Two-sided KS p-value at the effective sample size ``n_e = n m / (n + m)``.

    Stephens' (1970) corrected asymptotic form, ``Q_KS((sqrt(n_e) + 0.12 + 0.11 / sqrt(n_e)) D)``
    with ``Q_KS`` the Kolmogorov distribution (``scipy.stats.kstwobign``): for ``n_e >= 100`` within
    3 % (relative) of ``kstwo.sf(D, round(n_e))``, which ``ks_2samp`` uses, wherever p >= 1e-4, and
    within 5 % down to p = 1e-6 (a test checks it); about a thousand times cheaper (``kstwo.sf``
    costs about a millisecond per value, which dominated the evaluation of a fleet's windows).
    Below ``n_e = 100`` (windows near the minimum sample size) ``kstwo`` itself is used.
    """
    n = np.asarray(n, dtype=np.float64)
    m = np.asarray(m, dtype=np.float64)
    en = np.divide(n * m, n + m, out=np.zeros_like(n * m), where=(n + m) > 0)
    en = np.maximum(np.round(en), 1.0)
    d = np.broadcast_to(np.asarray(d, dtype=np.float64), en.shape)
    root = np.sqrt(en)
    p = stats.kstwobign.sf((root + 0.12 + 0.11 / root) * d)
    small = en < STEPHENS_MIN_N
    if small.any():
        p = np.where(small, stats.kstwo.sf(np.where(small, d, 0.0), np.where(small, en, 1.0)), p)
    return np.clip(p, 0.0, 1.0)


def binned_ks(
    reference: np.ndarray | Sequence[Any], current: np.ndarray | Sequence[Any]
) -> tuple[np.ndarray, np.ndarray]:
    """KS statistic ``max |CDF_ref - CDF_cur|`` over the bin edges and its asymptotic p-value, per feature.

    Conservative: the binned statistic never exceeds the raw one. Rows with no counts on either
    side get ``D = 0, p = 1`` (callers check sample sizes first).
    """
    r, c = _pair(reference, current)
    d = np.abs(np.cumsum(proportions(r), axis=1) - np.cumsum(proportions(c), axis=1)).max(axis=1)
    p = _kolmogorov_sf(d, r.sum(axis=1), c.sum(axis=1))
    p = np.where((r.sum(axis=1) > 0) & (c.sum(axis=1) > 0), p, 1.0)
    return _squeeze(d, reference), _squeeze(p, reference)


def ks_columns(reference: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw two-sample KS of every column of ``[n, F]`` against ``[m, F]`` at once: (D, asymptotic p-value).

    Both samples are sorted per column in one call each; the two empirical CDFs are then read at
    every observed value with ``searchsorted(side="right")``, which counts ties fully, so D equals
    ``scipy.stats.ks_2samp``'s exactly (compared in integers, ``|F_n m n - F_m m n|``, to avoid
    rounding before the max). A per-column ``searchsorted`` on the sorted halves costs about half of
    one ``argsort`` of the stacked columns. The p-value is scipy's asymptotic one (``kstwo`` at
    ``round(n m / (n + m))``); scipy's default uses the exact distribution for samples up to 10,000,
    which differs only in the far tail of small samples.
    """
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(current, dtype=np.float64)
    if a.ndim == 1:
        a, b = a[:, None], b[:, None]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"samples must be [n, F] and [m, F], got {a.shape} and {b.shape}")
    n, m = a.shape[0], b.shape[0]
    if n == 0 or m == 0:
        raise ValueError("both samples need at least one row")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("samples contain non-finite values; drop them per column and use ks_exact")
    sa, sb = np.sort(a.T, axis=1), np.sort(b.T, axis=1)
    d = np.empty(a.shape[1])
    for col in range(a.shape[1]):
        at = np.concatenate([sa[col], sb[col]])
        below_a = np.searchsorted(sa[col], at, side="right")
        below_b = np.searchsorted(sb[col], at, side="right")
        d[col] = np.abs(below_a * m - below_b * n).max() / (n * m)
    return d, _kolmogorov_sf(d, np.full(d.shape, n), np.full(d.shape, m))


def ks_exact(
    reference: np.ndarray | Sequence[float],
    current: np.ndarray | Sequence[float],
    *,
    alpha: float = 0.05,
    min_current: int = MIN_CURRENT,
    min_reference: int = MIN_REFERENCE,
    name: str = "ks_exact",
) -> TestResult:
    """Two-sample KS on raw samples (``scipy.stats.ks_2samp``, exact up to 10,000 per side); NaNs dropped."""
    a = np.asarray(reference, dtype=np.float64).ravel()
    b = np.asarray(current, dtype=np.float64).ravel()
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size < min_reference or b.size < min_current:
        return _not_enough(name, alpha, a.size, b.size)
    res = stats.ks_2samp(a, b)
    p = float(res.pvalue)
    return TestResult(name, float(res.statistic), p, alpha, "drift" if p < alpha else "ok", a.size, b.size)


# ------------------------------------------------------------------------------ class mix


def chi_square_class_mix(
    current_counts: np.ndarray | Sequence[int],
    priors: np.ndarray | Sequence[float],
    *,
    alpha: float = 0.05,
    min_current: int = MIN_CURRENT,
    min_expected: float = MIN_EXPECTED,
    min_tvd: float = 0.0,
    design_effect: float = 1.0,
    min_effective: float = 0.0,
    name: str = "class_mix",
) -> TestResult:
    """Chi-square goodness of fit of predicted-class counts against the reference priors.

    Expected counts are ``m * prior``. Classes expected fewer than ``min_expected`` times are pooled
    into one category (Cochran: the chi-square approximation needs expected counts >= 5); if the
    pool itself is still short it joins the smallest remaining class. Fewer than two categories
    left, or fewer than ``min_current`` records, is ``not_enough_data``. A class the training data
    never had (prior 0) is thereby counted in the pool, so predictions of it still raise the
    statistic. ``n_reference`` is reported as 0: the priors carry no sample size. ``drift`` also
    needs the total variation distance between the class shares and the priors, ``effect``, to
    reach ``min_tvd``: a fleet-sized window makes any small departure from the training mix
    significant.
    """
    obs = np.asarray(current_counts, dtype=np.float64).ravel()
    pri = np.asarray(priors, dtype=np.float64).ravel()
    if obs.shape != pri.shape:
        raise ValueError(f"{obs.size} class counts but {pri.size} priors")
    if (obs < 0).any() or (pri < 0).any() or pri.sum() <= 0:
        raise ValueError("class counts and priors must be non-negative, priors not all zero")
    m = int(obs.sum())
    if design_effect < 1.0:
        raise ValueError(f"design effect must be >= 1, got {design_effect!r}")
    if m < min_current or m / design_effect < min_effective:
        return _not_enough(name, alpha, 0, m)
    exp = m * pri / pri.sum()
    # Cochran's rule on the counts the records are worth: dependent records count 1 / deff each.
    small = exp / design_effect < min_expected
    o, e = list(obs[~small]), list(exp[~small])
    if small.any():
        po, pe = float(obs[small].sum()), float(exp[small].sum())
        if pe >= min_expected or not e:
            o.append(po)
            e.append(pe)
        else:
            k = int(np.argmin(e))
            o[k] += po
            e[k] += pe
    if len(o) < 2 or min(e) / design_effect < min_expected:
        return _not_enough(name, alpha, 0, m)
    # Rao-Scott first-order correction: the Pearson statistic over the design effect.
    statistic = float(stats.chisquare(np.asarray(o), np.asarray(e)).statistic) / design_effect
    p = float(stats.chi2.sf(statistic, len(o) - 1))
    tvd = float(0.5 * np.abs(obs / m - pri / pri.sum()).sum())
    verdict: Verdict = "drift" if p < alpha and tvd >= min_tvd else "ok"
    return TestResult(name, statistic, p, alpha, verdict, 0, m, effect=tvd, design_effect=design_effect)


# ---------------------------------------------------------------------- score distributions


def binned_moments(counts: np.ndarray | Sequence[int], edges: np.ndarray | Sequence[float]) -> tuple[int, float, float]:
    """``(n, mean, sample variance)`` of a histogram, every value taken at its bin's midpoint."""
    c = np.asarray(counts, dtype=np.float64).ravel()
    e = np.asarray(edges, dtype=np.float64).ravel()
    if e.size != c.size + 1:
        raise ValueError(f"{c.size} counts need {c.size + 1} edges, got {e.size}")
    n = int(c.sum())
    if n == 0:
        return 0, 0.0, 0.0
    mid = (e[:-1] + e[1:]) / 2
    mean = float((c * mid).sum() / n)
    var = float((c * (mid - mean) ** 2).sum() / (n - 1)) if n > 1 else 0.0
    return n, mean, var


def _normal_p(z: float, alternative: Alternative) -> float:
    if alternative == "greater":
        return float(stats.norm.sf(z))
    if alternative == "less":
        return float(stats.norm.cdf(z))
    return float(min(1.0, 2 * stats.norm.sf(abs(z))))


def mean_shift_test(
    reference_counts: np.ndarray | Sequence[int],
    current_counts: np.ndarray | Sequence[int],
    edges: np.ndarray | Sequence[float],
    *,
    alternative: Alternative = "two-sided",
    alpha: float = 0.05,
    min_shift: float = 0.02,
    min_current: int = MIN_CURRENT,
    min_reference: int = MIN_REFERENCE,
    design_effect: float = 1.0,
    min_effective: float = 0.0,
    name: str = "confidence_shift",
) -> TestResult:
    """Welch-style z test of the shift of the mean between two histograms on the same edges.

    ``z = (mean_cur - mean_ref) / sqrt(var_cur / m + var_ref / n)`` with moments from bin midpoints
    (the midpoint rounding adds the same small within-bin error to both sides); with hundreds of
    records the normal approximation of Welch's t is exact enough. The statistic is the shift of
    the mean (for calibrated confidence: the change in expected accuracy). ``drift`` needs
    ``p < alpha`` *and* ``|shift| >= min_shift``: with the large windows of a fleet scope a
    shift of a tenth of a point is significant but not worth an alert. Exact current moments (from
    running sums) are deliberately not mixed in: the bundle keeps only the reference histogram, and
    the midpoint error cancels only when both sides carry it. ``design_effect`` inflates the current
    mean's variance for autocorrelated records (:mod:`collector.monitoring.dependence`).
    """
    n, mr, vr = binned_moments(reference_counts, edges)
    m, mc, vc = binned_moments(current_counts, edges)
    if design_effect < 1.0:
        raise ValueError(f"design effect must be >= 1, got {design_effect!r}")
    if n < min_reference or m < min_current or m / design_effect < min_effective:
        return _not_enough(name, alpha, n, m)
    shift = mc - mr
    se = math.sqrt(vc * design_effect / m + vr / n)
    # Both histograms in one bin: the means differ exactly or not at all.
    p = (1.0 if shift == 0.0 else 0.0) if se == 0.0 else _normal_p(shift / se, alternative)
    directional = {"two-sided": abs(shift), "greater": shift, "less": -shift}[alternative]
    drift = p < alpha and directional >= min_shift
    return TestResult(name, shift, p, alpha, "drift" if drift else "ok", n, m, design_effect=design_effect)


def binned_mann_whitney(
    reference_counts: np.ndarray | Sequence[Any],
    current_counts: np.ndarray | Sequence[Any],
    *,
    alternative: Alternative = "greater",
    continuity: bool = True,
    design_effect: np.ndarray | float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Mann-Whitney U of current vs reference on binned data: ``(U / (n m), p-value)`` per row.

    Values in one bin are ties. ``U = sum_j c_j (R_<j + r_j / 2)`` counts the (reference, current)
    pairs where the current value is higher, ties counting one half; ``U / (n m)`` estimates
    ``P(cur > ref) + P(cur = ref) / 2`` (0.5: no shift). The p-value uses the normal approximation
    with tie correction, ``sigma^2 = n m / 12 ((N + 1) - sum_k (t_k^3 - t_k) / (N (N - 1)))``,
    ``t_k = r_k + c_k``, and a continuity correction of 1/2 - exactly ``scipy.stats.mannwhitneyu(
    current, reference, method="asymptotic")`` on the tied values. ``alternative="greater"``: the
    current values are stochastically larger. Rows without counts or with every value in one bin
    get ``(0.5, 1.0)``.

    ``design_effect`` (per row) accounts for autocorrelated *current* records: the variance of
    ``U / (n m)`` is ``(1/n + 1/m) / 12`` for independent samples and ``(1/n + deff/m) / 12`` when the
    current records' mean rank varies ``deff`` times more, so the tie-corrected variance is scaled by
    ``(m + n deff + 1) / (N + 1)``. With ``deff = 1`` it is scipy's test exactly.
    """
    r, c = _pair(reference_counts, current_counts)
    n, m = r.sum(axis=1), c.sum(axis=1)
    below = np.cumsum(r, axis=1) - r
    u = (c * (below + r / 2)).sum(axis=1)
    big_n = n + m
    t = r + c
    ties = (t**3 - t).sum(axis=1)
    deff = np.broadcast_to(np.asarray(design_effect, dtype=np.float64), n.shape)
    if (deff < 1.0).any():
        raise ValueError("design effects must be >= 1")
    with np.errstate(divide="ignore", invalid="ignore"):
        var = n * m / 12 * ((big_n + 1) - ties / (big_n * (big_n - 1)))
        var = var * (m + n * deff + 1) / (big_n + 1)
    valid = (n > 0) & (m > 0) & (big_n > 1) & (var > 0)
    sigma = np.sqrt(np.where(valid, var, 1.0))
    mu = n * m / 2
    if alternative == "two-sided":
        dev = np.abs(u - mu)
    elif alternative == "greater":
        dev = u - mu
    else:
        dev = mu - u
    z = (dev - (0.5 if continuity else 0.0)) / sigma
    p = stats.norm.sf(z) * (2.0 if alternative == "two-sided" else 1.0)
    p = np.where(valid, np.clip(p, 0.0, 1.0), 1.0)
    auc = np.divide(u, n * m, out=np.full_like(u, 0.5), where=valid)
    return _squeeze(auc, reference_counts), _squeeze(p, reference_counts)


def score_increase_test(
    reference_counts: np.ndarray | Sequence[int],
    current_counts: np.ndarray | Sequence[int],
    *,
    alpha: float = 0.05,
    min_auc_gain: float = 0.02,
    min_current: int = MIN_CURRENT,
    min_reference: int = MIN_REFERENCE,
    design_effect: float = 1.0,
    min_effective: float = 0.0,
    name: str = "score_increase",
) -> TestResult:
    """One-sided binned Mann-Whitney: have the scores (PCA error, rare co-activations) risen?

    Only an increase alarms: lower reconstruction error or fewer rare co-activations than on the
    held-out reference mean the inputs sit deeper inside the training region. The statistic is
    ``U / (n m)``; ``drift`` needs ``p < alpha`` and ``U / (n m) >= 0.5 + min_auc_gain``.
    """
    r = np.asarray(reference_counts, dtype=np.float64).ravel()
    c = np.asarray(current_counts, dtype=np.float64).ravel()
    n, m = int(r.sum()), int(c.sum())
    if n < min_reference or m < min_current or m / design_effect < min_effective:
        return _not_enough(name, alpha, n, m)
    auc, p = binned_mann_whitney(r, c, alternative="greater", design_effect=design_effect)
    a, pv = float(auc), float(p)
    drift = pv < alpha and a >= 0.5 + min_auc_gain
    return TestResult(name, a, pv, alpha, "drift" if drift else "ok", n, m, design_effect=design_effect)


# ------------------------------------------------------------------------------------- FDR


def benjamini_hochberg(p_values: np.ndarray | Sequence[float], q: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini-Hochberg step-up over all finite entries: (rejected, adjusted q-values), same shape.

    ``q_(i) = min_{j >= i} p_(j) m / j`` over the ``m`` finite p-values sorted ascending, clipped at
    1 (scipy's ``false_discovery_control(method="bh")``); a hypothesis is rejected when its q-value
    is <= ``q``, which is the step-up rule. NaN marks an untested hypothesis: it is left out of
    the family (it does not raise ``m``), gets q-value NaN and is not rejected.
    """
    if not 0 < q < 1:
        raise ValueError("q must lie in (0, 1)")
    p = np.asarray(p_values, dtype=np.float64)
    flat = p.ravel()
    tested = np.isfinite(flat)
    if ((flat[tested] < 0) | (flat[tested] > 1)).any():
        raise ValueError("p-values must lie in [0, 1]")
    qv = np.full(flat.shape, np.nan)
    pt = flat[tested]
    if pt.size:
        order = np.argsort(pt)
        ranked = pt[order] * pt.size / np.arange(1, pt.size + 1)
        adjusted = np.minimum.accumulate(ranked[::-1])[::-1]
        out = np.empty_like(pt)
        out[order] = np.clip(adjusted, 0.0, 1.0)
        qv[tested] = out
    reject = np.zeros(flat.shape, dtype=bool)
    reject[tested] = qv[tested] <= q
    return reject.reshape(p.shape), qv.reshape(p.shape)


# ----------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class DriftThresholds:
    """Every threshold of a drift report, with its default and why."""

    fdr_q: float = 0.05
    """Benjamini-Hochberg level over all p-values of a report (or of a family of reports)."""
    psi_minor: float = 0.1
    """PSI from which a significant feature counts as drifting (convention: < 0.1 no change)."""
    psi_major: float = 0.25
    """PSI of a major shift (convention: >= 0.25); one significant major feature makes the overall verdict drift."""
    drift_share: float = 0.25
    """Share of tested features drifting from which the overall verdict is drift."""
    min_current: int = MIN_CURRENT
    min_reference: int = MIN_REFERENCE
    min_expected: float = MIN_EXPECTED
    min_effective: float = MIN_EFFECTIVE
    """Smallest effective sample size (records discounted for their autocorrelation) a test needs; below it
    the test says "not enough data": a device's fifteen minutes hold few independent readings of a slow signal."""
    confidence_min_shift: float = 0.02
    class_mix_min_tvd: float = 0.05
    """Smallest total variation distance between the predicted-class shares and the training priors that
    counts as class-mix drift (five percentage points of records moved between classes)."""
    score_min_auc_gain: float = 0.02
    eps: float = DEFAULT_EPS

    def __post_init__(self) -> None:
        if not 0 < self.fdr_q < 1:
            raise ValueError("fdr_q must lie in (0, 1)")
        if not 0 <= self.psi_minor <= self.psi_major:
            raise ValueError("need 0 <= psi_minor <= psi_major")
        if not 0 < self.drift_share <= 1:
            raise ValueError("drift_share must lie in (0, 1]")
        if self.min_current < 2 or self.min_reference < 2:
            raise ValueError("minimum sample sizes must be >= 2")
        if self.min_effective < 0:
            raise ValueError("min_effective must be >= 0")


@dataclass(frozen=True)
class ScoreHistogram:
    """Edges and counts of one monitored quantity."""

    edges: np.ndarray
    counts: np.ndarray

    @classmethod
    def of(cls, h: Histogram) -> ScoreHistogram:
        """From a manifest :class:`Histogram`."""
        return cls(np.asarray(h.edges, dtype=np.float64), np.asarray(h.counts, dtype=np.int64))


@dataclass(frozen=True)
class ReferenceCounts:
    """The reference side of :func:`evaluate_windows`: what a bundle's profile says."""

    feature_names: list[str]
    feature_edges: list[np.ndarray]
    feature_counts: list[np.ndarray]
    class_priors: np.ndarray
    confidence: ScoreHistogram
    pca_error: ScoreHistogram
    coactivation: ScoreHistogram

    @classmethod
    def from_profile(cls, profile: ReferenceProfile) -> ReferenceCounts:
        """Reference counts of a bundle's :class:`ReferenceProfile`."""
        return cls(
            feature_names=[f.name for f in profile.features],
            feature_edges=[np.asarray(f.histogram.edges, dtype=np.float64) for f in profile.features],
            feature_counts=[np.asarray(f.histogram.counts, dtype=np.int64) for f in profile.features],
            class_priors=np.asarray(profile.class_priors, dtype=np.float64),
            confidence=ScoreHistogram.of(profile.confidence_histogram),
            pca_error=ScoreHistogram.of(profile.pca.error_histogram),
            coactivation=ScoreHistogram.of(profile.coactivation.count_histogram),
        )


@dataclass(frozen=True)
class WindowCounts:
    """The current side: counts of one window on the reference edges (``None``: not collected)."""

    feature_counts: Sequence[np.ndarray | Sequence[int]]
    class_counts: np.ndarray | Sequence[int] | None = None
    confidence_counts: np.ndarray | Sequence[int] | None = None
    pca_error_counts: np.ndarray | Sequence[int] | None = None
    coactivation_counts: np.ndarray | Sequence[int] | None = None
    effective: EffectiveSizes | None = None
    """Effective sample sizes of the window's autocorrelated records (``None``: treated as independent)."""


@dataclass(frozen=True)
class FeatureDrift:
    """Every statistic of one feature, its threshold and verdict."""

    name: str
    n_reference: int
    n_current: int
    n_effective: float
    """Current records discounted for their autocorrelation (``n_current`` when independent)."""
    psi: float
    psi_bias: float
    """PSI expected from sampling alone, ``(B - 1) (1 / n_effective + 1 / n_reference)``; the score subtracts it."""
    hellinger: float
    kl: float
    jensen_shannon: float
    ks: TestResult
    severity: Literal["none", "moderate", "major"]
    verdict: Verdict

    @property
    def score(self) -> float:
        """The feature's drift score: its PSI beyond what sampling alone gives, at least 0."""
        return max(self.psi - self.psi_bias, 0.0)


@dataclass(frozen=True)
class DriftReport:
    """Per-feature and model-signal tests of one window, and the overall verdict with its reasons."""

    features: list[FeatureDrift]
    class_mix: TestResult
    confidence: TestResult
    pca_error: TestResult
    coactivation: TestResult
    n_tested: int
    n_drifting: int
    drift_share: float
    max_psi: float
    verdict: Verdict
    reasons: list[str]
    thresholds: DriftThresholds = field(default_factory=DriftThresholds)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (only floats, ints, strings, None, lists and dicts)."""
        out = asdict(self)
        for f, fd in zip(out["features"], self.features, strict=True):
            f["score"] = fd.score
        return out


def psi_bias(reference: np.ndarray | Sequence[Any], n_current: np.ndarray | float) -> np.ndarray:
    """PSI from sampling alone: ``(B - 1) (1 / n_current + 1 / n_reference)`` per feature.

    To second order the PSI is the chi-square distance ``sum (q - p)^2 / p``, whose expectation with
    ``q`` and ``p`` estimated from ``n`` and ``N`` independent records is ``(B - 1) (1/n + 1/N)``, ``B``
    the bins the reference occupies: 0.17 for 20 bins and 112 records, above the 0.1 "no change" floor.
    With ``n`` the effective size it also covers autocorrelated records.
    """
    r = _as_2d(reference)
    n_ref = r.sum(axis=1)
    occupied = np.maximum((r > 0).sum(axis=1) - 1, 0)
    n_cur = np.broadcast_to(np.asarray(n_current, dtype=np.float64), n_ref.shape)
    with np.errstate(divide="ignore"):
        bias = occupied * (1.0 / np.maximum(n_cur, 1.0) + 1.0 / np.maximum(n_ref, 1.0))
    return _squeeze(bias, reference)


def _feature_stats(ref: ReferenceCounts, cur: WindowCounts, thr: DriftThresholds) -> tuple[np.ndarray, ...]:
    nf = len(ref.feature_names)
    if len(cur.feature_counts) != nf:
        raise ValueError(f"window has {len(cur.feature_counts)} feature histograms, the reference {nf}")
    for i, (rc, cc) in enumerate(zip(ref.feature_counts, cur.feature_counts, strict=True)):
        if len(cc) != len(rc):
            raise ValueError(f"feature {ref.feature_names[i]!r}: window has {len(cc)} bins, the reference {len(rc)}")
    r = stack_counts(ref.feature_counts)
    c = stack_counts(list(cur.feature_counts))
    n_ref, n_cur = r.sum(axis=1), c.sum(axis=1)
    if cur.effective is None:
        n_eff = n_cur.astype(np.float64)
    else:
        n_eff = np.asarray(cur.effective.features, dtype=np.float64)
        if n_eff.shape != (nf,):
            raise ValueError(f"window has {n_eff.size} effective feature sizes, the reference {nf} features")
        n_eff = np.clip(n_eff, 0.0, n_cur)
    d, _ = binned_ks(r, c)
    p = np.where((n_ref > 0) & (n_cur > 0), _kolmogorov_sf(d, n_ref, np.maximum(n_eff, 1.0)), 1.0)
    return (
        n_ref,
        n_cur,
        n_eff,
        psi(r, c, thr.eps),
        psi_bias(r, n_eff),
        hellinger(r, c),
        kl_divergence(r, c, thr.eps),
        jensen_shannon(r, c),
        d,
        p,
    )


@dataclass(frozen=True)
class _Raw:
    """A window's tests before the FDR decision."""

    names: list[str]
    n_ref: np.ndarray
    n_cur: np.ndarray
    n_eff: np.ndarray
    psi: np.ndarray
    psi_bias: np.ndarray
    hel: np.ndarray
    kl: np.ndarray
    js: np.ndarray
    ks_d: np.ndarray
    ks_p: np.ndarray
    signals: list[TestResult]

    def p_values(self, thr: DriftThresholds) -> np.ndarray:
        """Feature KS p-values then model-signal p-values; NaN where a test abstained."""
        enough = (self.n_ref >= thr.min_reference) & (self.n_cur >= thr.min_current) & (self.n_eff >= thr.min_effective)
        fp = np.where(enough, self.ks_p, np.nan)
        sp = [np.nan if s.p_value is None else s.p_value for s in self.signals]
        return np.concatenate([fp, np.asarray(sp, dtype=np.float64)])


def _raw(ref: ReferenceCounts, cur: WindowCounts, thr: DriftThresholds) -> _Raw:
    n_ref, n_cur, n_eff, ps, bias, hel, kl, js, ks_d, ks_p = _feature_stats(ref, cur, thr)
    eff = cur.effective

    def deff(counts: np.ndarray | Sequence[int], effective: float | None) -> float:
        return 1.0 if effective is None else design_effect_of(float(np.sum(counts)), effective)

    def score(
        name: str, h: ScoreHistogram, counts: np.ndarray | Sequence[int] | None, effective: float | None
    ) -> TestResult:
        if counts is None:
            return _not_enough(name, thr.fdr_q, int(h.counts.sum()), 0)
        if len(counts) != h.counts.size:
            raise ValueError(f"{name}: window has {len(counts)} bins, the reference {h.counts.size}")
        return score_increase_test(
            h.counts,
            counts,
            alpha=thr.fdr_q,
            min_auc_gain=thr.score_min_auc_gain,
            min_current=thr.min_current,
            min_reference=thr.min_reference,
            design_effect=deff(counts, effective),
            min_effective=thr.min_effective,
            name=name,
        )

    if cur.class_counts is None:
        class_mix = _not_enough("class_mix", thr.fdr_q, 0, 0)
    else:
        class_mix = chi_square_class_mix(
            cur.class_counts,
            ref.class_priors,
            alpha=thr.fdr_q,
            min_current=thr.min_current,
            min_expected=thr.min_expected,
            min_tvd=thr.class_mix_min_tvd,
            design_effect=deff(cur.class_counts, None if eff is None else eff.classes),
            min_effective=thr.min_effective,
        )
    if cur.confidence_counts is None:
        confidence = _not_enough("confidence_shift", thr.fdr_q, int(ref.confidence.counts.sum()), 0)
    else:
        if len(cur.confidence_counts) != ref.confidence.counts.size:
            raise ValueError(
                f"confidence: window has {len(cur.confidence_counts)} bins, the reference {ref.confidence.counts.size}"
            )
        confidence = mean_shift_test(
            ref.confidence.counts,
            cur.confidence_counts,
            ref.confidence.edges,
            alpha=thr.fdr_q,
            min_shift=thr.confidence_min_shift,
            min_current=thr.min_current,
            min_reference=thr.min_reference,
            design_effect=deff(cur.confidence_counts, None if eff is None else eff.confidence),
            min_effective=thr.min_effective,
        )
    signals = [
        class_mix,
        confidence,
        score("pca_error", ref.pca_error, cur.pca_error_counts, None if eff is None else eff.pca),
        score("coactivation", ref.coactivation, cur.coactivation_counts, None if eff is None else eff.coact),
    ]
    return _Raw(list(ref.feature_names), n_ref, n_cur, n_eff, ps, bias, hel, kl, js, ks_d, ks_p, signals)


def _severity(value: float, thr: DriftThresholds) -> Literal["none", "moderate", "major"]:
    if value >= thr.psi_major:
        return "major"
    return "moderate" if value >= thr.psi_minor else "none"


def _decide(raw: _Raw, q_values: np.ndarray, thr: DriftThresholds) -> DriftReport:
    nf = len(raw.names)
    features: list[FeatureDrift] = []
    for i, name in enumerate(raw.names):
        n_r, n_c = int(raw.n_ref[i]), int(raw.n_cur[i])
        sev = _severity(float(raw.psi[i] - raw.psi_bias[i]), thr)
        if not np.isfinite(q_values[i]):
            ks = _not_enough("ks_binned", thr.fdr_q, n_r, n_c)
            verdict: Verdict = "not_enough_data"
        else:
            qv = float(q_values[i])
            # Significance alone alarms on negligible shifts in large windows, PSI alone on noise in small ones.
            verdict = "drift" if qv <= thr.fdr_q and sev != "none" else "ok"
            ks = TestResult(
                "ks_binned",
                float(raw.ks_d[i]),
                float(raw.ks_p[i]),
                thr.fdr_q,
                "drift" if qv <= thr.fdr_q else "ok",
                n_r,
                n_c,
                qv,
            )
        features.append(
            FeatureDrift(
                name,
                n_r,
                n_c,
                float(raw.n_eff[i]),
                float(raw.psi[i]),
                float(raw.psi_bias[i]),
                float(raw.hel[i]),
                float(raw.kl[i]),
                float(raw.js[i]),
                ks,
                sev,
                verdict,
            )
        )
    signals: list[TestResult] = []
    for j, s in enumerate(raw.signals):
        qv = q_values[nf + j]
        if s.verdict == "not_enough_data" or not np.isfinite(qv):
            signals.append(s)
            continue
        # q >= p, so a BH rejection implies the raw test's significance: its verdict then only adds the effect floor.
        verdict = "drift" if float(qv) <= thr.fdr_q and s.verdict == "drift" else "ok"
        signals.append(replace(s, q_value=float(qv), verdict=verdict))

    tested = [f for f in features if f.verdict != "not_enough_data"]
    drifting = [f for f in tested if f.verdict == "drift"]
    share = len(drifting) / len(tested) if tested else 0.0
    max_psi = max((f.psi for f in tested), default=0.0)
    reasons: list[str] = []
    if tested and share >= thr.drift_share:
        reasons.append(f"{len(drifting)} of {len(tested)} features drift (share {share:.2f} >= {thr.drift_share})")
    majors = [f.name for f in drifting if f.severity == "major"]
    if majors:
        reasons.append(f"major PSI (>= {thr.psi_major}) on {', '.join(majors)}")
    reasons.extend(f"{s.name} drift (q = {s.q_value:.3g})" for s in signals if s.verdict == "drift")
    any_tested = bool(tested) or any(s.verdict != "not_enough_data" for s in signals)
    overall: Verdict = "drift" if reasons else ("ok" if any_tested else "not_enough_data")
    class_mix, confidence, pca_error, coactivation = signals
    return DriftReport(
        features,
        class_mix,
        confidence,
        pca_error,
        coactivation,
        len(tested),
        len(drifting),
        share,
        max_psi,
        overall,
        reasons,
        thr,
    )


def evaluate_family(
    reference: ReferenceCounts | ReferenceProfile,
    windows: Mapping[str, WindowCounts],
    thresholds: DriftThresholds | None = None,
) -> dict[str, DriftReport]:
    """Drift reports of many windows (e.g. devices) with Benjamini-Hochberg over all their p-values jointly.

    False discoveries are then controlled across features *and* devices: one BH family holds every
    feature KS and model-signal p-value of every window.
    """
    thr = thresholds or DriftThresholds()
    ref = reference if isinstance(reference, ReferenceCounts) else ReferenceCounts.from_profile(reference)
    raws = {key: _raw(ref, w, thr) for key, w in windows.items()}
    if not raws:
        return {}
    pv = [r.p_values(thr) for r in raws.values()]
    _, q_all = benjamini_hochberg(np.concatenate(pv), thr.fdr_q)
    out: dict[str, DriftReport] = {}
    start = 0
    for (key, raw), p in zip(raws.items(), pv, strict=True):
        out[key] = _decide(raw, q_all[start : start + p.size], thr)
        start += p.size
    return out


def evaluate_windows(
    reference: ReferenceCounts | ReferenceProfile,
    current: WindowCounts,
    thresholds: DriftThresholds | None = None,
) -> DriftReport:
    """Drift report of one window against the reference: every statistic, threshold and verdict.

    Per feature: PSI (the drift score), Hellinger, KL, Jensen-Shannon and the binned KS; a feature
    drifts when its KS q-value is <= ``fdr_q`` and its PSI >= ``psi_minor``. Model signals: class
    mix (chi-square), confidence shift (z), PCA error and rare co-activations (one-sided U). All
    p-values of the window form one BH family. Overall ``drift`` when the share of drifting
    features reaches ``drift_share``, a drifting feature has PSI >= ``psi_major``, or a model
    signal drifts; ``not_enough_data`` when nothing could be tested.
    """
    return evaluate_family(reference, {"window": current}, thresholds)["window"]
