"""Drift statistics: hand-computed values on tiny histograms, agreement with scipy on seeded data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from collector.monitoring import drift
from collector.monitoring.drift import (
    DriftThresholds,
    ReferenceCounts,
    WindowCounts,
    benjamini_hochberg,
    binned_ks,
    binned_mann_whitney,
    chi_square_class_mix,
    evaluate_family,
    evaluate_windows,
    hellinger,
    jensen_shannon,
    kl_divergence,
    ks_columns,
    ks_exact,
    mean_shift_test,
    psi,
    score_increase_test,
    stack_counts,
)
from collector.training.reference import (
    ReferenceInputs,
    bin_counts,
    build_reference_profile,
    quantile_edges,
    rare_coactivation_counts,
    reconstruction_error,
)
from shared.bundle import rare_pair_indices

# ------------------------------------------------------------------------------ distances

REF = [1, 1]  # p = (1/2, 1/2)
CUR = [3, 1]  # q = (3/4, 1/4)


def test_distances_by_hand() -> None:
    assert psi(REF, CUR) == pytest.approx(0.25 * math.log(1.5) + 0.25 * math.log(2), abs=1e-12)  # = ln(3) / 4
    assert psi(REF, CUR) == pytest.approx(math.log(3) / 4, abs=1e-12)
    bc = math.sqrt(3 / 8) + math.sqrt(1 / 8)  # = cos(15 degrees)
    assert hellinger(REF, CUR) == pytest.approx(math.sqrt(1 - bc), abs=1e-12)
    assert hellinger(REF, CUR) == pytest.approx(math.sqrt(1 - math.cos(math.pi / 12)), abs=1e-12)
    assert kl_divergence(REF, CUR) == pytest.approx(0.75 * math.log(3) - math.log(2), abs=1e-12)
    js = 0.5 * (0.5 * math.log2(0.5 / 0.625) + 0.5 * math.log2(0.5 / 0.375)) + 0.5 * (
        0.75 * math.log2(0.75 / 0.625) + 0.25 * math.log2(0.25 / 0.375)
    )
    assert jensen_shannon(REF, CUR) == pytest.approx(js, abs=1e-12)


def test_distances_agree_with_scipy() -> None:
    rng = np.random.default_rng(7)
    r = rng.integers(1, 50, size=(40, 12))
    c = rng.integers(1, 50, size=(40, 12))
    p, q = r / r.sum(axis=1, keepdims=True), c / c.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(jensen_shannon(r, c), jensenshannon(p, q, base=2, axis=1) ** 2, atol=1e-12)
    # scipy.stats.entropy(q, p) is KL(q || p) (no empty reference bin here, so no smoothing).
    np.testing.assert_allclose(kl_divergence(r, c), stats.entropy(q, p, axis=1), rtol=1e-12)
    assert psi(r, c).shape == (40,)


def test_empty_bins_are_smoothed_without_nan() -> None:
    r, c = [2, 2, 0], [0, 2, 2]
    eps = 1e-4
    assert psi(r, c) == pytest.approx(2 * (0.5 - eps) * math.log(0.5 / eps), abs=1e-12)
    assert hellinger(r, c) == pytest.approx(math.sqrt(0.5), abs=1e-12)
    assert kl_divergence(r, c) == pytest.approx(0.5 * math.log(0.5 / eps), abs=1e-12)
    assert jensen_shannon(r, c) == pytest.approx(0.5, abs=1e-12)
    # Disjoint supports: the JS divergence reaches its maximum 1, Hellinger 1.
    assert jensen_shannon([5, 0], [0, 5]) == pytest.approx(1.0)
    assert hellinger([5, 0], [0, 5]) == pytest.approx(1.0)
    # An all-empty row (a feature the window never saw) yields zeros, not NaN.
    rows = np.array([[0, 0, 0], [1, 2, 3]])
    for f in (psi, hellinger, kl_divergence, jensen_shannon):
        assert np.isfinite(f(rows, rows[::-1])).all()
    d, p = binned_ks(rows, rows[::-1])
    assert np.isfinite(d).all() and np.isfinite(p).all()


def test_identical_histograms_give_zero() -> None:
    h = np.array([[5, 0, 7, 3], [1, 1, 1, 1]])
    for f in (psi, hellinger, kl_divergence, jensen_shannon):
        np.testing.assert_allclose(f(h, h * 3), 0.0, atol=1e-12)
    d, p = binned_ks(h * 100, h * 30)
    np.testing.assert_allclose(d, 0.0, atol=1e-12)
    np.testing.assert_allclose(p, 1.0)


def test_zero_padding_changes_nothing() -> None:
    r, c = [3, 5, 2], [1, 6, 4]
    padded = stack_counts([r, [1, 2, 3, 4, 5]])
    padded_c = stack_counts([c, [5, 4, 3, 2, 1]])
    assert padded.shape == (2, 5)
    for f in (psi, hellinger, kl_divergence, jensen_shannon):
        assert f(padded, padded_c)[0] == pytest.approx(f(r, c), abs=1e-15)
    assert binned_ks(padded, padded_c)[0][0] == pytest.approx(binned_ks(r, c)[0])


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        psi([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        hellinger([1, -2], [1, 2])


# -------------------------------------------------------------------------------------- KS


def test_binned_ks_by_hand() -> None:
    # CDFs (.25, .5, .75, 1) and (.4, .6, .8, 1): D = .15; n_e = 400 * 400 / 800 = 200.
    r, c = [100, 100, 100, 100], [160, 80, 80, 80]
    d, p = binned_ks(r, c)
    assert d == pytest.approx(0.15, abs=1e-12)
    assert p == pytest.approx(stats.kstwo.sf(0.15, 200), rel=0.03)  # Stephens' form (see the next test)
    # The same values as raw ties: scipy's statistic and asymptotic p-value are identical.
    raw_r = np.repeat(np.arange(4), r)
    raw_c = np.repeat(np.arange(4), c)
    ref = stats.ks_2samp(raw_r, raw_c, method="asymp")
    assert d == pytest.approx(ref.statistic, abs=1e-12)
    assert p == pytest.approx(ref.pvalue, rel=0.03)


def test_ks_columns_equals_scipy_statistic_and_decisions() -> None:
    rng = np.random.default_rng(42)
    ref = rng.normal(size=(5000, 40))
    shifts = np.linspace(0.0, 0.15, 40)
    cur = rng.normal(loc=shifts, size=(1000, 40))
    cur[:, 0] = np.round(cur[:, 0], 1)  # ties
    ref[:, 0] = np.round(ref[:, 0], 1)
    d, p = ks_columns(ref, cur)
    exact = [stats.ks_2samp(ref[:, i], cur[:, i]) for i in range(40)]
    np.testing.assert_allclose(d, [e.statistic for e in exact], atol=1e-12)
    agree = np.mean((p < 0.05) == (np.array([e.pvalue for e in exact]) < 0.05))
    assert agree >= 0.95
    assert (p[shifts >= 0.12] < 0.05).all()


def test_ks_columns_refuses_nan() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        ks_columns(np.array([[1.0], [np.nan]]), np.array([[1.0]]))


def test_binned_ks_agrees_with_exact_ks_on_seeded_normals() -> None:
    """20 quantile bins (the trainer's default) against scipy's exact test, 5,000 vs 1,000 records.

    A third of the windows unchanged, a third shifted by up to 0.25 sd (where the exact test's
    power goes from 5 % to 100 %, the hard region), a third by 0.25-0.5 sd.
    """
    rng = np.random.default_rng(2026)
    shifts = np.concatenate([np.zeros(100), rng.uniform(0.0, 0.25, 100), rng.uniform(0.25, 0.5, 100)])
    binned, exact = [], []
    for shift in shifts:
        ref = rng.normal(size=5000)
        cur = rng.normal(loc=shift, size=1000)
        edges = quantile_edges(ref, 20)
        _, p = binned_ks(bin_counts(ref, edges), bin_counts(cur, edges))
        binned.append(float(p) < 0.05)
        exact.append(stats.ks_2samp(ref, cur).pvalue < 0.05)
    b, e = np.array(binned), np.array(exact)
    assert np.mean(b == e) >= 0.95
    assert np.mean(b[100:200] == e[100:200]) >= 0.9
    # Binning only hides differences inside a bin: where they disagree, the binned test is the one that missed.
    assert not (b & ~e).any()


def test_ks_exact_wrapper() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=300), rng.normal(loc=0.5, size=200)
    res = ks_exact(a, b)
    sp = stats.ks_2samp(a, b)
    assert (res.statistic, res.p_value) == (pytest.approx(sp.statistic), pytest.approx(sp.pvalue))
    assert res.verdict == "drift" and (res.n_reference, res.n_current) == (300, 200)
    assert ks_exact(a, a[:150]).verdict == "ok"
    small = ks_exact(a, np.concatenate([b[:99], [np.nan] * 5]))
    assert small.verdict == "not_enough_data" and small.p_value is None and small.n_current == 99


# ------------------------------------------------------------------------------ class mix


def test_chi_square_class_mix_by_hand() -> None:
    same = chi_square_class_mix([30, 30, 40], [0.3, 0.3, 0.4])
    assert same.statistic == pytest.approx(0.0) and same.p_value == pytest.approx(1.0) and same.verdict == "ok"
    # Expected 100/3 each: chi2 = (16.67^2 + 2 * 8.33^2) / 33.33 = 12.5; df 2: p = exp(-12.5 / 2).
    shifted = chi_square_class_mix([50, 25, 25], [1 / 3, 1 / 3, 1 / 3])
    assert shifted.statistic == pytest.approx(12.5)
    assert shifted.p_value == pytest.approx(math.exp(-6.25))
    assert shifted.verdict == "drift" and shifted.n_current == 100


def test_chi_square_pools_small_expected_counts() -> None:
    # Expected (49, 49, 1, 1): the pool (2) is still < 5, so it joins the first smallest class: (51, 49).
    res = chi_square_class_mix([45, 45, 5, 5], [0.49, 0.49, 0.01, 0.01])
    assert res.statistic == pytest.approx(16 / 51 + 16 / 49)
    assert res.p_value == pytest.approx(stats.chi2.sf(16 / 51 + 16 / 49, 1))


def test_chi_square_not_enough_data() -> None:
    assert chi_square_class_mix([30, 30, 39], [0.3, 0.3, 0.4]).verdict == "not_enough_data"
    # 30 classes at 1/30 with 100 records: every expected count is 3.3, one pooled category remains.
    res = chi_square_class_mix([4] * 25 + [0] * 5, [1 / 30] * 30)
    assert res.verdict == "not_enough_data" and res.p_value is None
    with pytest.raises(ValueError, match="priors"):
        chi_square_class_mix([1, 2], [0.5, 0.25, 0.25])


# ---------------------------------------------------------------------- score distributions


def test_mean_shift_by_hand() -> None:
    edges = [0.0, 0.5, 1.0]  # midpoints .25 and .75
    res = mean_shift_test([100, 100], [50, 150], edges)
    var_r, var_c = 200 * 0.0625 / 199, (50 * 0.375**2 + 150 * 0.125**2) / 199
    z = 0.125 / math.sqrt(var_r / 200 + var_c / 200)
    assert res.statistic == pytest.approx(0.125)
    assert res.p_value == pytest.approx(2 * stats.norm.sf(z))
    assert res.verdict == "drift"
    assert mean_shift_test([100, 100], [50, 150], edges, alternative="less").verdict == "ok"
    assert mean_shift_test([100, 100], [100, 100], edges).verdict == "ok"
    # Significant but below the effect floor: not an alarm.
    big = mean_shift_test([100_000, 100_000], [99_000, 101_000], edges)
    assert big.p_value is not None and big.p_value < 0.05 and big.verdict == "ok"
    assert mean_shift_test([100, 100], [40, 59], edges).verdict == "not_enough_data"


def test_binned_mann_whitney_by_hand() -> None:
    auc, p = binned_mann_whitney([1, 1], [1, 1])
    assert auc == pytest.approx(0.5)
    auc, _ = binned_mann_whitney([2, 0], [0, 2])
    assert auc == pytest.approx(1.0)
    # Everything in one bin: no ordering information.
    auc, p = binned_mann_whitney([5, 0], [7, 0])
    assert (auc, p) == (pytest.approx(0.5), pytest.approx(1.0))


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_binned_mann_whitney_equals_scipy_on_counts(alternative: drift.Alternative) -> None:
    rng = np.random.default_rng(11)
    ref = rng.poisson(1.0, size=800)
    cur = rng.poisson(1.25, size=300)
    edges = np.arange(-0.5, max(ref.max(), cur.max()) + 1.0)  # one bin per count, as integer_edges does
    auc, p = binned_mann_whitney(bin_counts(ref, edges), bin_counts(cur, edges), alternative=alternative)
    sp = stats.mannwhitneyu(cur, ref, alternative=alternative, method="asymptotic")
    assert p == pytest.approx(sp.pvalue, rel=1e-9)
    assert auc == pytest.approx(stats.mannwhitneyu(cur, ref, alternative="greater").statistic / (800 * 300))


def test_score_increase_is_one_sided() -> None:
    rng = np.random.default_rng(5)
    edges = np.arange(-0.5, 15.5)
    ref = bin_counts(rng.poisson(1.0, size=2000), edges)
    up = score_increase_test(ref, bin_counts(rng.poisson(2.0, size=500), edges), name="coactivation")
    assert up.verdict == "drift" and up.statistic > 0.6 and up.name == "coactivation"
    down = score_increase_test(ref, bin_counts(rng.poisson(0.5, size=500), edges))
    assert down.verdict == "ok" and down.statistic < 0.5
    # Under no change the one-sided test alarms in at most alpha of the samples (the effect floor only lowers it).
    # A fresh reference per trial: against one fixed reference sample the windows share its sampling error.
    null = [
        score_increase_test(
            bin_counts(rng.poisson(1.0, size=2000), edges), bin_counts(rng.poisson(1.0, size=500), edges)
        ).verdict
        for _ in range(400)
    ]
    assert null.count("drift") / len(null) <= 0.06
    few = score_increase_test(ref, bin_counts(rng.poisson(3.0, size=99), edges))
    assert few.verdict == "not_enough_data" and few.n_current == 99 and few.n_reference == 2000


# ------------------------------------------------------------------------------------- FDR


def test_benjamini_hochberg_by_hand() -> None:
    reject, q = benjamini_hochberg([0.01, 0.04, 0.03, 0.5])
    np.testing.assert_allclose(q, [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.5])
    assert reject.tolist() == [True, False, False, False]


def test_benjamini_hochberg_equals_scipy() -> None:
    rng = np.random.default_rng(9)
    # 40 features x 25 devices: mostly null, some real effects.
    p = rng.uniform(size=(25, 40))
    p[:3, :5] = rng.uniform(0, 1e-4, size=(3, 5))
    reject, q = benjamini_hochberg(p, 0.05)
    expected = stats.false_discovery_control(p.ravel(), method="bh").reshape(p.shape)
    np.testing.assert_allclose(q, expected, rtol=1e-12)
    assert (reject == (expected <= 0.05)).all()
    assert reject[:3, :5].all()


def test_benjamini_hochberg_leaves_untested_out() -> None:
    p = np.array([0.01, np.nan, 0.04, 0.03, np.nan, 0.5])
    reject, q = benjamini_hochberg(p)
    tested = np.isfinite(p)
    np.testing.assert_allclose(q[tested], stats.false_discovery_control(p[tested]))
    assert np.isnan(q[~tested]).all() and not reject[~tested].any()
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        benjamini_hochberg([0.5, 1.5])


# ----------------------------------------------------------------------------- the report

N_FEATURES, N_HIDDEN, N_CLASSES = 6, 16, 3


def _model(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return rng.normal(size=(N_FEATURES, N_HIDDEN)), rng.normal(size=(N_HIDDEN, N_CLASSES))


def _records(
    rng: np.random.Generator, model: tuple[np.ndarray, np.ndarray], n: int, shift: np.ndarray | float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded records through a small ReLU network: inputs, hidden activations, classes and confidences."""
    w1, w2 = model
    x = rng.normal(size=(n, N_FEATURES)) + shift
    hidden = np.maximum(x @ w1, 0.0)
    logits = hidden @ w2
    prob = np.exp(logits - logits.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    return x, hidden, prob.argmax(axis=1), prob.max(axis=1)


@pytest.fixture(scope="module")
def setup() -> tuple[ReferenceCounts, tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(20261125)
    model = _model(rng)
    x, h, y, _ = _records(rng, model, 4000)
    xh, hh, _, ch = _records(rng, model, 2000)
    profile = build_reference_profile(
        ReferenceInputs(x, x, y, h, xh, hh, ch), [f"f{i}" for i in range(N_FEATURES)], N_CLASSES
    )
    i, j = rare_pair_indices(profile.coactivation, N_HIDDEN)
    mask = np.zeros((N_HIDDEN, N_HIDDEN), dtype=bool)
    mask[i, j] = True
    components = np.asarray(profile.pca.components)
    return ReferenceCounts.from_profile(profile), model, mask, components


def _window(
    ref: ReferenceCounts,
    model: tuple[np.ndarray, np.ndarray],
    mask: np.ndarray,
    components: np.ndarray,
    n: int,
    seed: int,
    shift: np.ndarray | float = 0.0,
) -> WindowCounts:
    x, h, y, conf = _records(np.random.default_rng(seed), model, n, shift)
    return WindowCounts(
        feature_counts=[bin_counts(x[:, i], e) for i, e in enumerate(ref.feature_edges)],
        class_counts=np.bincount(y, minlength=N_CLASSES),
        confidence_counts=bin_counts(conf, ref.confidence.edges),
        pca_error_counts=bin_counts(reconstruction_error(x, components), ref.pca_error.edges),
        coactivation_counts=bin_counts(rare_coactivation_counts(h > 0, mask), ref.coactivation.edges),
    )


def test_stationary_window_is_ok(
    setup: tuple[ReferenceCounts, tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray],
) -> None:
    ref, model, mask, comps = setup
    report = evaluate_windows(ref, _window(ref, model, mask, comps, 1000, seed=1))
    assert report.verdict == "ok", report.reasons
    assert report.n_tested == N_FEATURES and report.n_drifting == 0 and report.reasons == []
    assert all(f.verdict == "ok" and f.ks.q_value is not None for f in report.features)
    for s in (report.class_mix, report.confidence, report.pca_error, report.coactivation):
        assert s.verdict == "ok" and s.q_value is not None
    assert report.max_psi < 0.1


def test_identical_window_gives_zero(
    setup: tuple[ReferenceCounts, tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray],
) -> None:
    ref = setup[0]
    window = WindowCounts(
        feature_counts=ref.feature_counts,
        confidence_counts=ref.confidence.counts,
        pca_error_counts=ref.pca_error.counts,
        coactivation_counts=ref.coactivation.counts,
    )
    report = evaluate_windows(ref, window)
    assert report.verdict == "ok" and report.max_psi == 0.0
    assert all(f.psi == 0 and f.hellinger == 0 and f.kl == 0 and f.jensen_shannon == 0 for f in report.features)
    assert report.class_mix.verdict == "not_enough_data"  # not collected in this window
    assert report.confidence.statistic == pytest.approx(0.0) and report.pca_error.statistic == pytest.approx(0.5)


def test_shifted_features_drift(
    setup: tuple[ReferenceCounts, tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray],
) -> None:
    ref, model, mask, comps = setup
    shift = np.array([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    report = evaluate_windows(ref, _window(ref, model, mask, comps, 1000, seed=2, shift=shift))
    verdicts = [f.verdict for f in report.features]
    assert verdicts[:2] == ["drift", "drift"] and set(verdicts[2:]) == {"ok"}
    assert [f.severity for f in report.features[:2]] == ["major", "major"]
    assert report.verdict == "drift" and report.n_drifting == 2
    assert report.drift_share == pytest.approx(2 / N_FEATURES)
    assert report.max_psi == max(f.psi for f in report.features) > 0.25
    assert any("major PSI" in r and "f0" in r for r in report.reasons)


def test_out_of_region_inputs_raise_model_signals(
    setup: tuple[ReferenceCounts, tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray],
) -> None:
    ref, model, mask, comps = setup
    # Inputs scaled far outside the training cloud: reconstruction error and class mix move.
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1000, N_FEATURES)) * 3.0
    w1, w2 = model
    h = np.maximum(x @ w1, 0.0)
    logits = h @ w2
    window = WindowCounts(
        feature_counts=[bin_counts(x[:, i], e) for i, e in enumerate(ref.feature_edges)],
        pca_error_counts=bin_counts(reconstruction_error(x, comps), ref.pca_error.edges),
        coactivation_counts=bin_counts(rare_coactivation_counts(h > 0, mask), ref.coactivation.edges),
        class_counts=np.bincount(logits.argmax(axis=1), minlength=N_CLASSES),
    )
    report = evaluate_windows(ref, window)
    assert report.pca_error.verdict == "drift" and report.pca_error.statistic > 0.7
    assert report.verdict == "drift"
    assert any(r.startswith("pca_error drift") for r in report.reasons)


def test_small_window_is_not_enough_data(
    setup: tuple[ReferenceCounts, tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray],
) -> None:
    ref, model, mask, comps = setup
    report = evaluate_windows(ref, _window(ref, model, mask, comps, 99, seed=3, shift=2.0))
    assert report.verdict == "not_enough_data" and report.n_tested == 0 and report.reasons == []
    assert {f.verdict for f in report.features} == {"not_enough_data"}
    assert all(f.ks.p_value is None for f in report.features)
    for s in (report.class_mix, report.confidence, report.pca_error, report.coactivation):
        assert s.verdict == "not_enough_data" and s.p_value is None
    # The distances are still computed (and finite): only the verdicts abstain.
    assert all(math.isfinite(f.psi) and f.psi > 0.25 for f in report.features)
    lenient = evaluate_windows(
        ref, _window(ref, model, mask, comps, 99, seed=3, shift=2.0), DriftThresholds(min_current=50)
    )
    assert lenient.verdict == "drift"


def test_report_is_json_and_nan_free(
    setup: tuple[ReferenceCounts, tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray],
) -> None:
    ref, model, mask, comps = setup
    for n in (10, 1000):
        d = evaluate_windows(ref, _window(ref, model, mask, comps, n, seed=6, shift=0.5)).to_dict()
        text = json.dumps(d, allow_nan=False)
        back = json.loads(text)
        assert back["thresholds"]["psi_major"] == 0.25 and len(back["features"]) == N_FEATURES
        assert {
            "psi", "psi_bias", "n_effective", "hellinger", "kl", "jensen_shannon", "ks", "score", "verdict", "severity",
        } <= set(back["features"][0])  # fmt: skip
        assert set(back["confidence"]) == {
            "name", "statistic", "p_value", "threshold", "verdict", "n_reference", "n_current", "q_value", "effect",
            "design_effect",
        }  # fmt: skip


def test_window_with_wrong_bins_is_refused(
    setup: tuple[ReferenceCounts, tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray],
) -> None:
    ref = setup[0]
    bad = WindowCounts(feature_counts=[*ref.feature_counts[:-1], np.zeros(ref.feature_counts[-1].size + 1)])
    with pytest.raises(ValueError, match="'f5': window has"):
        evaluate_windows(ref, bad)
    with pytest.raises(ValueError, match="feature histograms"):
        evaluate_windows(ref, WindowCounts(feature_counts=ref.feature_counts[:2]))


def test_family_controls_fdr_across_devices(
    setup: tuple[ReferenceCounts, tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray],
) -> None:
    ref, model, mask, comps = setup
    windows = {f"dev{i}": _window(ref, model, mask, comps, 500, seed=100 + i) for i in range(12)}
    windows["aged"] = _window(ref, model, mask, comps, 500, seed=99, shift=np.array([0.0, 0.0, 0.0, 0.8, 0.8, 0.8]))
    reports = evaluate_family(ref, windows)
    assert reports["aged"].verdict == "drift"
    assert [f.verdict for f in reports["aged"].features][3:] == ["drift"] * 3
    assert [k for k, r in reports.items() if r.verdict == "drift"] == ["aged"]
    # One family: the reported q-values are BH over the p-values of every window together.
    tests = [t for r in reports.values() for t in [f.ks for f in r.features] + [r.class_mix, r.confidence]]
    tests += [t for r in reports.values() for t in (r.pca_error, r.coactivation)]
    p = np.array([t.p_value for t in tests], dtype=np.float64)
    _, q = benjamini_hochberg(p)
    np.testing.assert_allclose([t.q_value for t in tests], q, rtol=1e-12)
    assert evaluate_family(ref, {}) == {}


@pytest.mark.parametrize("en", [20, 100, 500, 4_500, 100_000])
def test_kolmogorov_sf_follows_scipys_kstwo(en: int) -> None:
    # The p-value at the D that gives each target p under kstwo at n_e = n m / (n + m) (n = m = 2 n_e).
    targets = np.array([1e-6, 1e-4, 1e-3, 1e-2, 0.05, 0.2, 0.5, 0.9])
    d = stats.kstwo.isf(targets, en)
    got = drift._kolmogorov_sf(d, np.full(d.shape, 2 * en), np.full(d.shape, 2 * en))
    exact = stats.kstwo.sf(d, en)
    rel = np.abs(got / exact - 1)
    if en < drift.STEPHENS_MIN_N:
        np.testing.assert_allclose(got, exact, rtol=1e-12)
    else:
        assert rel[targets >= 1e-4].max() <= 0.03
        assert rel.max() <= 0.05


def test_class_mix_needs_an_effect_as_well_as_significance() -> None:
    priors = np.array([0.5, 0.3, 0.2])
    # 3 points of records moved between classes in a fleet-sized window: significant, below the 0.05 floor.
    small = drift.chi_square_class_mix([53_000, 27_000, 20_000], priors, min_tvd=0.05)
    assert small.p_value is not None and small.p_value < 1e-6
    assert small.effect == pytest.approx(0.03) and small.verdict == "ok"
    large = drift.chi_square_class_mix([5_800, 2_200, 2_000], priors, min_tvd=0.05)
    assert large.effect == pytest.approx(0.08) and large.verdict == "drift"
    assert drift.chi_square_class_mix([53_000, 27_000, 20_000], priors).verdict == "drift"  # no floor
