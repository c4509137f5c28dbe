"""Autocorrelation from mergeable sums, effective sample sizes, and drift tests that respect them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import stats

from collector.monitoring.dependence import (
    DEFF_MAX,
    LAGS,
    RHO_MAX,
    EffectiveSizes,
    categorical_lag_correlations,
    decay_design_effect,
    design_effect,
    design_effect_of,
    effective_size,
    lag_correlations,
    time_capped,
    total_effective,
    window_span,
)
from collector.monitoring.drift import (
    ReferenceCounts,
    ScoreHistogram,
    WindowCounts,
    binned_mann_whitney,
    chi_square_class_mix,
    evaluate_windows,
    mean_shift_test,
)
from collector.monitoring.performance import ExceedanceCounts, region_reliability
from collector.monitoring.sketches import ReferenceBins, sketch_block
from collector.training.reference import decorrelation_seconds, integrated_autocorrelation_time
from tests.collector.monitoring.test_sketches import T0, block, small_manifest


def ar1(n: int, rho: float, rng: np.random.Generator, columns: int = 1) -> np.ndarray:
    """A stationary Gaussian AR(1) series (unit variance) of ``n`` steps per column."""
    e = rng.standard_normal((n, columns)) * np.sqrt(1.0 - rho**2)
    x = np.empty((n, columns))
    x[0] = rng.standard_normal(columns)
    for t in range(1, n):
        x[t] = rho * x[t - 1] + e[t]
    return x


def sums(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, float, float]:
    """The sketch's sums of one series: successive differences at LAGS, pairs, n, Σx, Σx²."""
    d = np.array([np.square(x[lag:] - x[:-lag]).sum() for lag in LAGS])
    p = np.array([max(x.size - lag, 0) for lag in LAGS])
    return d, p, x.size, float(x.sum()), float(x @ x)


def rho_of(x: np.ndarray) -> float:
    rho, significant, _ = lag_correlations(*sums(x))
    return float(rho[0]) if significant[0] else 0.0


def deff_of(x: np.ndarray) -> float:
    return float(decay_design_effect(*lag_correlations(*sums(x)), LAGS))


def test_lag_correlations_of_seeded_series() -> None:
    rng = np.random.default_rng(7)
    for rho in (0.3, 0.8, 0.97):
        x = ar1(40_000, rho, rng)[:, 0]
        r, significant, constant = lag_correlations(*sums(x))
        assert r[0] == pytest.approx(rho, abs=0.015) and r[1] == pytest.approx(rho**8, abs=0.03)
        assert significant[0] and not constant
    # Independent records: not significantly positive.
    assert rho_of(rng.standard_normal(5_000)) == 0.0 and deff_of(rng.standard_normal(5_000)) == 1.0
    # Negative autocorrelation never inflates the sample size.
    assert deff_of(ar1(5_000, -0.5, rng)[:, 0]) == 1.0
    # Too few pairs: unknown. A value that never changes is as dependent as it gets (one reading, repeated).
    assert deff_of(np.arange(5.0)) == 1.0 and deff_of(np.full(500, 3.0)) == DEFF_MAX


def test_design_effect_of_an_ar1_process_is_its_own() -> None:
    rng = np.random.default_rng(8)
    for rho in (0.5, 0.9):
        # Exact autocorrelations: the fitted decay is rho itself and 1 + 2 rho / (1 - rho) = (1 + rho) / (1 - rho).
        exact = decay_design_effect(np.array([rho, rho**8]), np.array([True, True]), np.asarray(False), LAGS)
        assert float(exact) == pytest.approx(float(design_effect(rho)))
        # Estimated on a long seeded series, within a few percent.
        assert deff_of(ar1(200_000, rho, rng)[:, 0]) == pytest.approx(float(design_effect(rho)), rel=0.06)
    # Only lag 1 shows anything (short memory): AR(1) on it.
    only1 = decay_design_effect(np.array([0.4, 0.01]), np.array([True, False]), np.asarray(False), LAGS)
    assert float(only1) == pytest.approx(float(design_effect(0.4)))
    with pytest.raises(ValueError, match="lag 1 and one longer lag"):
        decay_design_effect(np.zeros(2), np.zeros(2, bool), np.asarray(False), (2, 8))


def test_slow_signal_under_noise_needs_the_longer_lag() -> None:
    """An AR(1) with phi = 0.95 carrying half the variance, plus white noise: rho_k = 0.5 * 0.95^k.

    Its mean's true design effect is 1 + 2 sum_k rho_k = 1 + 0.95 / 0.05 = 20; AR(1) on rho_1 = 0.475
    alone says 2.8. The two-lag fit recovers it.
    """
    rng = np.random.default_rng(9)
    slow = ar1(400_000, 0.95, rng)[:, 0] * np.sqrt(0.5)
    x = slow + rng.standard_normal(slow.size) * np.sqrt(0.5)
    rho1 = rho_of(x)
    assert rho1 == pytest.approx(0.475, abs=0.01) and float(design_effect(rho1)) < 3.0
    assert deff_of(x) == pytest.approx(20.0, rel=0.1)
    # Check the target itself: the variance of means of 400-record stretches, against sigma^2 / 400.
    means = x[: 400 * 1000].reshape(1000, 400).mean(axis=1)
    assert means.var(ddof=1) * 400 / x.var() == pytest.approx(20.0, rel=0.25)


def test_categorical_agreement_beyond_chance() -> None:
    rng = np.random.default_rng(3)
    shares = np.array([0.5, 0.3, 0.2])
    n = 50_000
    for stay in (0.0, 0.6, 0.9):
        c = np.empty(n, np.int64)
        c[0] = 0
        draws = rng.choice(3, size=n, p=shares)
        keep = rng.random(n) < stay
        for t in range(1, n):
            c[t] = c[t - 1] if keep[t] else draws[t]
        same = np.array([int((c[lag:] == c[:-lag]).sum()) for lag in LAGS])
        rho, significant, _ = categorical_lag_correlations(same, np.array([n - lag for lag in LAGS]), np.bincount(c))
        assert rho[0] == pytest.approx(stay, abs=0.015) and rho[1] == pytest.approx(stay**8, abs=0.02)
        assert bool(significant[0]) == (stay > 0)
    one = categorical_lag_correlations(np.array([10, 3]), np.array([10, 3]), np.array([10, 0, 0]))
    assert not one[1].any()  # one class: nothing beyond chance
    few = categorical_lag_correlations(np.array([5, 1]), np.array([9, 2]), np.array([5, 5]))
    assert not few[1].any()  # too few pairs


def test_effective_size_and_design_effect() -> None:
    assert float(effective_size(112, design_effect(0.97))) == pytest.approx(112 * 0.03 / 1.97, rel=1e-12)
    assert float(effective_size(112, 1e6)) == 1.0 and float(effective_size(0, 3.0)) == 0.0
    assert float(design_effect(0.0)) == 1.0 and float(design_effect(0.5)) == pytest.approx(3.0)
    assert float(design_effect(1.0)) == pytest.approx(DEFF_MAX) and RHO_MAX < 1  # clipped
    assert design_effect_of(100, 25.0) == 4.0 and design_effect_of(100, 200.0) == 1.0 and design_effect_of(0, 0) == 1.0


def test_effective_sizes_of_sketches_add_over_vehicles() -> None:
    bins = ReferenceBins.from_manifest(small_manifest())
    rng = np.random.default_rng(11)
    windows, preds, xs = [], [], []
    for rho in (0.9, 0.5):
        x = (ar1(4_000, rho, rng, columns=3) * [0.4, 3.0, 0.3] + [1.0, 0.0, 0.5]).astype(np.float32)
        pred = np.repeat(rng.integers(0, 3, 400), 10).astype(np.int16)  # runs of ten: sticky classes
        preds.append(pred)
        xs.append(x)
        calibrated = np.full(4_000, 0.5, np.float16)
        windows.append(sketch_block(bins, block(x, pred=pred, calibrated=calibrated), received_at=T0))
    one = EffectiveSizes.of(windows[0])
    # The sketch's effective sizes are the estimator's on the same series (float32 inputs as stored).
    expected = [float(effective_size(4_000, deff_of(xs[0][:, f].astype(np.float64)))) for f in range(3)]
    assert one.features == pytest.approx(expected, rel=1e-6)
    assert one.features == pytest.approx(float(effective_size(4_000, design_effect(0.9))), rel=0.2)
    # Runs of ten equal classes agree with the record before far beyond chance: few effective records.
    same = np.array([int((preds[0][lag:] == preds[0][:-lag]).sum()) for lag in LAGS])
    class_deff = decay_design_effect(
        *categorical_lag_correlations(same, np.array([4_000 - lag for lag in LAGS]), np.bincount(preds[0])), LAGS
    )
    assert float(class_deff) > 10 and one.classes == pytest.approx(float(effective_size(4_000, class_deff)))
    assert one.confidence == pytest.approx(4_000 / DEFF_MAX)  # one value, repeated
    total = total_effective(windows, 3)
    both = EffectiveSizes.of(windows[0]) + EffectiveSizes.of(windows[1])
    assert np.array_equal(total.features, both.features) and total.classes == both.classes
    # Merged naively, the two vehicles' different spreads would read as one stream: the sum is what counts.
    merged = EffectiveSizes.of(windows[0] + windows[1])
    assert not np.allclose(merged.features, total.features)


# ----------------------------------------------------------------------- tests with design effects


def test_class_mix_is_rao_scott_corrected() -> None:
    counts, priors = np.array([70, 20, 10]), np.array([0.6, 0.25, 0.15])
    plain = chi_square_class_mix(counts, priors, min_current=50)
    three = chi_square_class_mix(counts, priors, min_current=50, design_effect=3.0)
    assert three.statistic == pytest.approx(plain.statistic / 3.0)
    assert three.p_value == pytest.approx(float(stats.chi2.sf(plain.statistic / 3.0, 2)))
    assert three.design_effect == 3.0 and plain.design_effect == 1.0
    # Cochran's rule counts what the records are worth: with deff 3 the 15 % class expects 5 effective records.
    assert chi_square_class_mix(counts, priors, min_current=50, design_effect=3.0, min_effective=40).verdict == (
        "not_enough_data"
    )
    with pytest.raises(ValueError, match="design effect"):
        chi_square_class_mix(counts, priors, design_effect=0.5)


def test_mean_shift_variance_is_inflated() -> None:
    edges = np.linspace(0.0, 1.0, 11)
    ref = np.full(10, 100)
    cur = np.array([0, 0, 0, 0, 0, 50, 50, 50, 50, 50])
    plain = mean_shift_test(ref, cur, edges)
    four = mean_shift_test(ref, cur, edges, design_effect=4.0)
    # se = sqrt(vc deff / m + vr / n): the same shift, a smaller z.
    vc, vr = np.var([0.55, 0.65, 0.75, 0.85, 0.95], ddof=0) * 250 / 249, 0.0825 * 1000 / 999
    z = plain.statistic / np.sqrt(vc * 4.0 / 250 + vr / 1000)
    assert four.statistic == plain.statistic and four.p_value == pytest.approx(2 * stats.norm.sf(z), rel=1e-6)


def test_mann_whitney_design_effect_scales_the_variance() -> None:
    ref = np.array([400, 300, 200, 100])
    cur = np.array([30, 30, 20, 20])
    auc1, p1 = binned_mann_whitney(ref, cur)
    auc2, p2 = binned_mann_whitney(ref, cur, design_effect=5.0)
    assert auc1 == auc2 and p2 > p1
    # deff = 1 is scipy's test on the tied values.
    values = np.arange(4.0)
    expected = stats.mannwhitneyu(np.repeat(values, cur), np.repeat(values, ref), alternative="greater")
    assert p1 == pytest.approx(expected.pvalue, rel=1e-9)


def test_region_test_counts_what_the_records_are_worth() -> None:
    pca, coact = ExceedanceCounts(1000, 25, 0.01), ExceedanceCounts(1000, 10, 0.01)
    assert region_reliability(pca, coact).verdict == "unreliable"
    # Records in runs of ten: 100 records with 2.5 above p99 are no evidence.
    slow = region_reliability(pca, coact, design_effects=(10.0, 10.0))
    assert slow.verdict == "reliable"
    assert slow.pca_pvalue == pytest.approx(stats.binomtest(2, 100, 0.01, alternative="greater").pvalue)


def test_autocorrelated_windows_are_not_drift_with_effective_sizes() -> None:
    """The case that made the alarm storm: stationary AR(1) windows judged against a faithful reference.

    400 windows of 112 records with lag-1 autocorrelation 0.9 (a slow sensor sampled every few seconds)
    from the same stationary distribution as the reference. Treated as independent, most are "drift"; with
    their effective sizes (about 6 records each, below the 30 the tests need) they abstain, and with a
    lag-1 autocorrelation of 0.5 (about 37 records each) the false-alarm rate is near the nominal level.
    """
    rng = np.random.default_rng(2026)
    edges = np.concatenate([[-np.inf], stats.norm.ppf(np.linspace(0, 1, 21)[1:-1]), [np.inf]])
    ref_counts = np.full(20, 5_000)
    hist = ScoreHistogram(np.linspace(0, 1, 11), np.full(10, 100))
    ref = ReferenceCounts(["x"], [edges[1:-1].copy()], [ref_counts], np.array([1.0, 0.0]), hist, hist, hist)
    ref = dataclasses.replace(ref, feature_edges=[np.concatenate([[-5.0], edges[1:-1], [5.0]])])
    outcomes: dict[tuple[float, bool], list[str]] = {}
    for rho in (0.9, 0.5):
        for _ in range(400):
            x = ar1(112, rho, rng)[:, 0]
            counts = np.bincount(np.searchsorted(edges[1:-1], x, side="right"), minlength=20)
            eff = EffectiveSizes(np.atleast_1d(effective_size(112, deff_of(x))), 0.0, 0.0, 0.0, 0.0)
            for use in (False, True):
                rep = evaluate_windows(ref, WindowCounts([counts], effective=eff if use else None))
                outcomes.setdefault((rho, use), []).append(rep.features[0].ks.verdict)
    rate = {k: v.count("drift") / len(v) for k, v in outcomes.items()}
    abstain = {k: v.count("not_enough_data") / len(v) for k, v in outcomes.items()}
    assert rate[(0.9, False)] > 0.4 and rate[(0.5, False)] > 0.1  # independent: far above the 5 % level
    assert abstain[(0.9, True)] > 0.95  # a few independent readings: not enough data
    assert rate[(0.9, True)] <= 0.02 and rate[(0.5, True)] <= 0.08


# ------------------------------------------------------------------ decorrelation times and the time cap


def test_integrated_autocorrelation_time_of_ar1_drives() -> None:
    rng = np.random.default_rng(21)
    for rho in (0.0, 0.5, 0.9):
        drives = [ar1(20_000, rho, rng)[:, 0] for _ in range(4)]
        assert integrated_autocorrelation_time(drives) == pytest.approx((1 + rho) / (1 - rho), rel=0.08)
    assert integrated_autocorrelation_time([np.full(100, 2.0)]) == 1.0  # constant: nothing to say
    assert integrated_autocorrelation_time([np.arange(5.0)]) == 1.0  # too short to estimate
    # Offsets between drives count as slow variation: one vehicle's window cannot see them either.
    offset = [rng.standard_normal(2_000) + 3.0 * k for k in range(4)]
    assert integrated_autocorrelation_time(offset) > 10


def test_decorrelation_seconds_orders_rows_and_splits_at_gaps() -> None:
    rng = np.random.default_rng(22)
    x = np.concatenate([ar1(3_000, 0.8, rng)[:, 0], ar1(3_000, 0.8, rng)[:, 0]])
    drive = np.repeat([7, 3], 3_000)
    ts = np.concatenate([np.arange(3_000) * 8.0, np.arange(3_000) * 8.0 + 1e6])
    order = rng.permutation(x.size)  # the rows' order in the file does not matter
    spacing, seconds = decorrelation_seconds(x[order], drive[order], ts[order])
    assert spacing == 8.0 and seconds[0] == pytest.approx(8.0 * 9.0, rel=0.15)  # (1 + 0.8) / (1 - 0.8) records
    # A gap inside a drive splits it: pairs never span it.
    gap = ts.copy()
    gap[1_500:3_000] += 3_600.0
    assert decorrelation_seconds(x, drive, gap)[1][0] == pytest.approx(seconds[0], rel=0.1)
    with pytest.raises(ValueError, match="one entry per row"):
        decorrelation_seconds(x[:10], drive[:10], ts[:10])


def test_effective_sizes_are_capped_by_the_window_span() -> None:
    bins = ReferenceBins.from_manifest(small_manifest())
    rng = np.random.default_rng(23)
    x = rng.normal([1.0, 0.0, 0.5], [0.4, 3.0, 0.3], (113, 3)).astype(np.float32)
    ts = T0 + np.arange(113) * 8.0  # 113 records 8 s apart: a 15-minute window spans 904 s
    pred = rng.integers(0, 3, 113).astype(np.int16)
    coact = rng.poisson(2.0, 113).astype(np.uint16)
    s = sketch_block(bins, block(x, ts=ts, pred=pred, coact=coact), received_at=T0 + 1e3)
    assert window_span(s) == pytest.approx(904.0)
    free = EffectiveSizes.of(s)
    # Independent records, but the reference says temperature decorrelates in 175 s: about 5 looks in 904 s.
    decorrelation = np.array([175.0, 20.0, 1.0, 37.0, 17.0, 17.0, 19.0])
    capped = EffectiveSizes.of(s, decorrelation)
    assert capped.features.tolist() == pytest.approx([904 / 175, 904 / 20, free.features[2]])
    assert capped.classes == pytest.approx(min(free.classes, 904 / 37)) and capped.coact == pytest.approx(904 / 19)
    assert time_capped(np.array([50.0]), 0.0, np.array([10.0])).tolist() == [1.0]  # one record: one look
    assert time_capped(np.array([0.0, 3.0]), 100.0, np.array([1000.0, 1.0])).tolist() == [0.0, 3.0]
