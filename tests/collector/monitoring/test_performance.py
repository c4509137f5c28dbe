"""Label-free accuracy (CBPE), the in-region test and realized accuracy, on seeded data."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from collector.monitoring.performance import (
    AccuracyEstimate,
    ConfidenceStats,
    ExceedanceCounts,
    GapStats,
    GapTracker,
    RealizedStats,
    exceedance_from_histogram,
    expected_accuracy,
    poisson_binomial_pmf,
    realized_accuracy,
    region_reliability,
    region_reliability_from_histograms,
    wilson_interval,
)
from collector.training.reference import bin_counts, histogram, integer_edges, quantile_edges
from shared.bundle import CoactivationReference, Histogram, PcaReference, ReferenceProfile


def brute_force_pmf(p: np.ndarray) -> np.ndarray:
    """Pmf of the number of successes by enumerating all 2^n outcomes."""
    pmf = np.zeros(p.size + 1)
    for outcome in itertools.product((0, 1), repeat=p.size):
        o = np.array(outcome, dtype=bool)
        pmf[o.sum()] += float(np.prod(np.where(o, p, 1.0 - p)))
    return pmf


# ------------------------------------------------------------------------------- Poisson-binomial


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 11, 12])
def test_pmf_equals_brute_force_enumeration(n: int) -> None:
    p = np.random.default_rng(n).uniform(0.0, 1.0, n)
    np.testing.assert_allclose(poisson_binomial_pmf(p), brute_force_pmf(p), rtol=0, atol=1e-13)


def test_pmf_with_certain_outcomes_and_empty_input() -> None:
    p = np.array([1.0, 0.0, 0.5, 1.0])
    np.testing.assert_allclose(poisson_binomial_pmf(p), [0.0, 0.0, 0.5, 0.5, 0.0], atol=1e-15)
    np.testing.assert_array_equal(poisson_binomial_pmf([]), [1.0])


def test_pmf_of_equal_probabilities_is_binomial() -> None:
    pmf = poisson_binomial_pmf(np.full(400, 0.83))
    np.testing.assert_allclose(pmf, sps.binom.pmf(np.arange(401), 400, 0.83), atol=1e-13)


def test_pmf_moments_on_a_large_window() -> None:
    p = np.random.default_rng(3).beta(8, 2, 1500)
    pmf = poisson_binomial_pmf(p)
    k = np.arange(p.size + 1)
    assert pmf.sum() == pytest.approx(1.0, abs=1e-12)
    assert (pmf >= 0).all()
    assert (k * pmf).sum() == pytest.approx(p.sum(), rel=1e-10)
    mean = (k * pmf).sum()
    assert ((k - mean) ** 2 * pmf).sum() == pytest.approx((p * (1 - p)).sum(), rel=1e-8)


def test_pmf_rejects_values_that_are_not_probabilities() -> None:
    with pytest.raises(ValueError, match="not probabilities"):
        poisson_binomial_pmf([0.2, 1.2])
    with pytest.raises(ValueError, match="not probabilities"):
        ConfidenceStats.from_confidences([0.5, float("nan")])


# ------------------------------------------------------------------------------- expected accuracy


def test_exact_interval_equals_binomial_quantiles_for_equal_confidences() -> None:
    est = expected_accuracy(np.full(100, 0.5))
    assert est.method == "exact"
    assert est.estimate == pytest.approx(0.5)
    assert est.low == sps.binom.ppf(0.025, 100, 0.5) / 100 == 0.40
    assert est.high == sps.binom.ppf(0.975, 100, 0.5) / 100 == 0.60


def test_normal_interval_from_sufficient_statistics() -> None:
    stats = ConfidenceStats(n=100, sum_p=50.0, sum_p1mp=25.0)
    est = expected_accuracy(stats)
    # mu -+ z sigma - 1/2 = 50 -+ 9.7998 - 0.5 -> ceil: 40 and 60
    assert est == AccuracyEstimate(100, 0.5, 0.40, 0.60, "normal", 0.95)


def test_normal_interval_is_clipped_to_unit_range() -> None:
    est = expected_accuracy(ConfidenceStats.from_confidences(np.full(50, 0.999)))
    assert est.high == 1.0
    assert est.low is not None and 0.9 <= est.low <= 1.0
    certain = expected_accuracy(ConfidenceStats.from_confidences(np.ones(50)))
    assert (certain.low, certain.high) == (1.0, 1.0)


def test_large_raw_window_falls_back_to_normal_and_agrees_with_exact() -> None:
    p = np.random.default_rng(11).beta(6, 2, 3000)
    exact = expected_accuracy(p, exact_max_n=5000)
    normal = expected_accuracy(p)
    assert (exact.method, normal.method) == ("exact", "normal")
    assert exact.low is not None and normal.low is not None and exact.high is not None and normal.high is not None
    assert abs(exact.low - normal.low) <= 1 / 3000 + 1e-12
    assert abs(exact.high - normal.high) <= 1 / 3000 + 1e-12


def test_not_enough_data() -> None:
    est = expected_accuracy(np.full(29, 0.9))
    assert est.method == "not_enough_data"
    assert est.low is None and est.high is None
    assert est.estimate == pytest.approx(0.9)
    empty = expected_accuracy(ConfidenceStats())
    assert (empty.n, empty.estimate, empty.method) == (0, None, "not_enough_data")


def test_level_is_validated() -> None:
    with pytest.raises(ValueError, match="level"):
        expected_accuracy(np.full(100, 0.9), level=1.5)


@pytest.mark.parametrize("raw", [True, False], ids=["exact", "normal"])
def test_interval_coverage_on_calibrated_predictions(raw: bool) -> None:
    rng = np.random.default_rng(2024)
    windows, n = 1000, 200
    covered = 0
    for _ in range(windows):
        p = rng.beta(7, 2, n)
        realized = (rng.random(n) < p).mean()
        est = expected_accuracy(p if raw else ConfidenceStats.from_confidences(p))
        assert est.method == ("exact" if raw else "normal")
        assert est.low is not None and est.high is not None
        covered += est.low <= realized <= est.high
    # Quantile intervals of a discrete count cover at least 95%; the binomial sd of the rate is 0.7 points.
    assert abs(covered / windows - 0.95) <= 0.025, covered


def test_confidence_stats_merge_equals_stats_of_union() -> None:
    rng = np.random.default_rng(5)
    parts = [rng.beta(5, 2, size) for size in (10, 0, 333, 71)]
    merged = sum((ConfidenceStats.from_confidences(p) for p in parts), ConfidenceStats())
    union = ConfidenceStats.from_confidences(np.concatenate(parts))
    assert merged.n == union.n == 414
    assert merged.sum_p == pytest.approx(union.sum_p, rel=1e-12)
    assert merged.sum_p1mp == pytest.approx(union.sum_p1mp, rel=1e-12)


def test_inconsistent_confidence_stats_are_rejected() -> None:
    with pytest.raises(ValueError, match="inconsistent"):
        ConfidenceStats(n=10, sum_p=11.0, sum_p1mp=0.0)
    with pytest.raises(ValueError, match="inconsistent"):
        ConfidenceStats(n=-1)


# ------------------------------------------------------------------------------- in reference region


def test_binomial_test_is_exact() -> None:
    verdict = region_reliability(ExceedanceCounts(1000, 20), ExceedanceCounts(1000, 10))
    assert verdict.pca_pvalue == pytest.approx(sps.binom.sf(19, 1000, 0.01), rel=1e-9)
    assert verdict.coact_pvalue == pytest.approx(sps.binom.sf(9, 1000, 0.01), rel=1e-9)
    # 2% is significant at alpha/2 = 0.005 (p = 0.0034) and twice the expected rate.
    assert verdict.verdict == "unreliable"
    assert verdict.reason is not None and verdict.reason.startswith("PCA reconstruction error")


def test_rate_ratio_guard_on_huge_windows() -> None:
    slight = ExceedanceCounts(1_000_000, 10_500)  # 1.05%: significant, irrelevant
    assert region_reliability(slight, ExceedanceCounts(1_000_000, 10_000)).reliable
    assert not region_reliability(slight, ExceedanceCounts(1_000_000, 10_000), min_rate_ratio=1.0).reliable


def test_region_not_enough_data_and_validation() -> None:
    verdict = region_reliability(ExceedanceCounts(10, 5), ExceedanceCounts(10, 5))
    assert (verdict.verdict, verdict.reliable) == ("not_enough_data", False)
    with pytest.raises(ValueError):
        ExceedanceCounts(10, 11)
    with pytest.raises(ValueError):
        region_reliability(ExceedanceCounts(100, 1), ExceedanceCounts(100, 1), alpha=0.0)
    with pytest.raises(ValueError, match="different references"):
        _ = ExceedanceCounts(10, 1, 0.01) + ExceedanceCounts(10, 1, 0.02)


def test_exceedance_merge_equals_counts_of_union() -> None:
    a, b = ExceedanceCounts(120, 3, 0.02), ExceedanceCounts(80, 5, 0.02)
    assert a + b == ExceedanceCounts(200, 8, 0.02)


def _profile(rng: np.random.Generator) -> tuple[ReferenceProfile, np.ndarray, np.ndarray]:
    """A reference profile built the way the trainer builds it, from seeded reference data."""
    errors = rng.chisquare(5, 20_000)
    coact = rng.poisson(0.8, 20_000).astype(np.float64)
    placeholder = Histogram(edges=[0.0, 1.0], counts=[1])
    profile = ReferenceProfile(
        n_samples=20_000,
        features=[],
        class_priors=[0.5, 0.5],
        confidence_histogram=placeholder,
        activation_frequency=[],
        coactivation=CoactivationReference(
            threshold=0.01,
            pair_mask_b64="",
            n_pairs=0,
            count_histogram=histogram(coact, integer_edges(coact)),
            mean=float(coact.mean()),
            p99=float(np.quantile(coact, 0.99)),
        ),
        pca=PcaReference(
            components=[],
            error_histogram=histogram(errors, quantile_edges(errors, lower=0.0)),
            error_p99=float(np.quantile(errors, 0.99)),
        ),
    )
    return profile, errors, coact


def test_exceedance_from_histograms_uses_the_reference_share_of_the_same_bins() -> None:
    profile, errors, coact = _profile(np.random.default_rng(8))
    # Integer edges: the bins wholly above p99 hold the records with a count above it.
    c_ref = profile.coactivation.count_histogram
    c = exceedance_from_histogram(c_ref.counts, c_ref, profile.coactivation.p99)
    assert c.n == 20_000
    assert c.n_above == int((coact > profile.coactivation.p99).sum())
    assert c.expected_rate == pytest.approx(c.n_above / 20_000)
    assert 0 < c.expected_rate <= 0.01
    # Quantile edges: the top bin spans p95..max, so the bin holding p99 is tested at its own 5% share.
    e_ref = profile.pca.error_histogram
    e = exceedance_from_histogram(e_ref.counts, e_ref, profile.pca.error_p99)
    assert e.n_above == int((errors >= e_ref.edges[-2]).sum())
    assert e.expected_rate == pytest.approx(0.05, abs=0.001)
    # Under/overflow layout gives the same counts.
    padded = [0, *c_ref.counts[:-1], c_ref.counts[-1] - 7, 7]
    assert exceedance_from_histogram(padded, c_ref, profile.coactivation.p99) == c
    with pytest.raises(ValueError, match="bins"):
        exceedance_from_histogram([1, 2], c_ref, profile.coactivation.p99)
    with pytest.raises(ValueError, match="non-negative integers"):
        exceedance_from_histogram(np.full(len(c_ref.counts), 0.5), c_ref, profile.coactivation.p99)


def test_reliability_flips_when_exceedance_is_injected() -> None:
    rng = np.random.default_rng(21)
    profile, _, _ = _profile(rng)
    pca_edges = profile.pca.error_histogram.edges
    coact_edges = profile.coactivation.count_histogram.edges
    errors = rng.chisquare(5, 2000)
    coact = rng.poisson(0.8, 2000).astype(np.float64)
    clean = region_reliability_from_histograms(profile, bin_counts(errors, pca_edges), bin_counts(coact, coact_edges))
    assert (clean.verdict, clean.reason) == ("reliable", None)

    shifted = errors.copy()
    shifted[:200] = rng.chisquare(5, 200) + 15.0  # 10% of records far outside the reference
    bad_pca = region_reliability_from_histograms(
        profile, bin_counts(shifted, pca_edges), bin_counts(coact, coact_edges)
    )
    assert not bad_pca.reliable
    assert bad_pca.reason is not None and bad_pca.reason.startswith("PCA reconstruction error")
    assert "co-activation" not in bad_pca.reason

    novel = coact.copy()
    novel[:100] = rng.poisson(6.0, 100) + 4  # 5% of records from a class absent in training
    bad_coact = region_reliability_from_histograms(
        profile, bin_counts(errors, pca_edges), bin_counts(novel, coact_edges)
    )
    assert not bad_coact.reliable
    assert bad_coact.reason is not None and bad_coact.reason.startswith("rare co-activation count")


# ------------------------------------------------------------------------------- realized accuracy and gap


def test_wilson_interval_against_hand_computed_value() -> None:
    # k=8, n=10, z=1.959964: centre = (8 + z^2/2)/(10 + z^2) = 9.920729/13.841459 = 0.716740,
    # half = z/(10 + z^2) * sqrt(8*2/10 + z^2/4) = 0.141601 * 1.600115 = 0.226578.
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.490162, abs=2e-6)
    assert high == pytest.approx(0.943318, abs=2e-6)
    assert wilson_interval(0, 50)[0] == 0.0
    assert wilson_interval(50, 50)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_realized_accuracy() -> None:
    est = realized_accuracy(RealizedStats(200, 170))
    assert est.method == "wilson"
    assert est.estimate == 0.85
    assert (est.low, est.high) == wilson_interval(170, 200)
    assert realized_accuracy(RealizedStats(5, 4)).method == "not_enough_data"
    assert RealizedStats(10, 7) + RealizedStats(30, 20) == RealizedStats(40, 27)
    with pytest.raises(ValueError):
        RealizedStats(3, 4)


def test_gap_stats_merge_and_empirical_stderr() -> None:
    rng = np.random.default_rng(13)
    p = rng.beta(6, 2, 500)
    c = rng.random(500) < p
    merged = GapStats.from_records(p[:123], c[:123]) + GapStats.from_records(p[123:], c[123:])
    union = GapStats.from_records(p, c)
    assert (merged.n, merged.n_correct) == (union.n, union.n_correct)
    assert merged.sum_p_correct == pytest.approx(union.sum_p_correct, rel=1e-12)
    tracker = GapTracker()
    tracker.add_stats("m1", merged)
    gap = tracker.gap("m1")
    d = c.astype(float) - p
    assert gap.gap == pytest.approx(d.mean(), abs=1e-12)
    assert gap.stderr == pytest.approx(d.std(ddof=1) / math.sqrt(500), rel=1e-9)


def test_gap_tracker_separates_model_versions_and_sees_miscalibration() -> None:
    rng = np.random.default_rng(99)
    tracker = GapTracker()
    for _ in range(10):
        p = rng.beta(8, 2, 300)
        tracker.add("v1", p, rng.random(300) < p)  # calibrated
        tracker.add("v2", p, rng.random(300) < p - 0.15)  # overconfident by 15 points
    v1, v2 = tracker.gap("v1"), tracker.gap("v2")
    assert tracker.model_versions == ["v1", "v2"] == [g.model_version for g in tracker.gaps()]
    assert v1.low is not None and v1.high is not None and v1.calibration_pvalue is not None
    assert v1.low <= 0.0 <= v1.high
    assert v1.calibration_pvalue > 0.01
    assert v2.gap == pytest.approx(-0.15, abs=0.02)
    assert v2.high is not None and v2.high < 0.0
    assert v2.calibration_pvalue is not None and v2.calibration_pvalue < 1e-10
    assert tracker.gap("unknown").n == 0
    tracker.reset()
    assert tracker.model_versions == []


def test_gap_tracker_validates_records() -> None:
    tracker = GapTracker()
    with pytest.raises(ValueError, match="correctness flags"):
        tracker.add("v1", [0.5, 0.6], [True])
    with pytest.raises(ValueError, match="0/1"):
        tracker.add("v1", [0.5, 0.6], [2, 0])
    tracker.add("v1", [0.5, 0.6], [1, 0])
    small = tracker.gap("v1")
    assert (small.n, small.realized, small.low) == (2, 0.5, None)
