"""Reference trainer: a real bundle from real data, the reference-profile maths, and bad input."""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import math
from pathlib import Path

import numpy as np
import pytest

from collector.training import add_arguments, run
from collector.training.errors import TrainingError
from collector.training.evaluation import expected_calibration_error, fit_temperature, macro_f1, nll
from collector.training.labelled import load_labelled_csv, stratified_split
from collector.training.reference import (
    active_units,
    as_wire,
    bin_counts,
    bin_index,
    class_priors,
    coactivation_reference,
    fit_pca,
    histogram,
    integer_edges,
    pca_reference,
    quantile_edges,
    rare_coactivation_counts,
    rare_pair_mask,
    reconstruction_error,
    wire_edges,
)
from shared.bundle import BundleError, calibrate, load_bundle, rare_pair_indices, run_golden
from shared.interpreter import interpreter_class, load_interpreter
from shared.signing import generate_private_key, load_public_keys
from tests.services import REPO

GAS = REPO.parent / "shared" / "data" / "gas-sensor-drift" / "gas_drift_raw_batches_1-6_8_9.csv.gz"
DEV_KEY = REPO / "collector" / "training" / "dev-release-key.pem"
DEV_PUB = REPO / "edge_agent" / "keys" / "dev-release.pub"
CABIN_BUNDLE = REPO / "edge_agent" / "bundles" / "cabin-v1.tar"
GAS_FEATURES = [f"f{k}" for k in range(1, 129)]
GAS_LABELS = ["acetaldehyde", "acetone", "ammonia", "ethanol", "ethylene", "toluene"]


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    data = buf.getvalue().encode()
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def tflite_runtime_interpreter(model: bytes):
    """The fleet's runtime, or a skip when this machine lacks it (it is part of the edge extra)."""
    try:
        _, backend = interpreter_class("tflite_runtime")
    except RuntimeError as exc:
        pytest.skip(f"no TFLite runtime: {exc}")
    if not backend.startswith("tflite_runtime"):
        pytest.skip(f"tflite-runtime is not installed (found {backend})")
    return load_interpreter(model, preferred="tflite_runtime")


@pytest.fixture(scope="module")
def gas_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Batches 1 and 2 of the real gas-sensor data (1,689 rows), read from the shared data folder."""
    if not GAS.exists():
        pytest.skip(f"shared data set missing: {GAS}")
    with gzip.open(GAS, "rt", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = [row for row in reader if row[0] in ("1", "2")]
    return write_csv(tmp_path_factory.mktemp("gas") / "gas_b12.csv.gz", header, rows)


@pytest.fixture(scope="module")
def trained(gas_csv: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real training run shared by the module (TensorFlow is slow to import)."""
    pytest.importorskip("tensorflow", reason="the train extra is not installed")
    from collector.training.trainer import train_bundle

    out = tmp_path_factory.mktemp("bundle") / "gas.tar"
    return train_bundle(
        gas_csv,
        label_column="gas",
        feature_columns=GAS_FEATURES,
        out=out,
        signing_key=DEV_KEY,
        name="gas-test",
        version="0.0.1",
        epochs=12,
        seed=0,
        dataset_version="gas_b12",
    )


# ----------------------------------------------------------------------------- trained bundle


def test_bundle_verifies_with_the_pinned_dev_key_and_passes_golden_on_tflite_runtime(trained) -> None:
    bundle = load_bundle(trained.bundle_path, trusted=load_public_keys([DEV_PUB]))
    assert bundle.key_id == trained.key_id
    assert bundle.manifest == trained.manifest
    deviation = run_golden(bundle, tflite_runtime_interpreter(bundle.model))
    assert 0.0 <= deviation <= bundle.manifest.golden_tolerance
    assert trained.backend.startswith("tflite_runtime")
    data = trained.bundle_path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == trained.bundle_sha256
    assert len(data) == trained.bundle_bytes
    assert not trained.bundle_path.with_name(trained.bundle_path.name + ".partial").exists()


def test_bundle_is_rejected_under_another_key(trained, tmp_path: Path) -> None:
    other = generate_private_key(tmp_path / "other.pem")
    with pytest.raises(BundleError) as err:
        load_bundle(trained.bundle_path, trusted=[other])
    assert err.value.reason == "bad_signature"


def test_output_indexes_point_at_probabilities_and_hidden(trained) -> None:
    m = trained.manifest
    interp = tflite_runtime_interpreter(load_bundle(trained.bundle_path, trusted=load_public_keys([DEV_PUB])).model)
    outputs = interp.get_output_details()
    assert {m.probabilities.index, m.hidden.index} == {0, 1}
    mean, std = np.asarray(m.normalisation.mean, np.float32), np.asarray(m.normalisation.std, np.float32)
    for case in m.golden:
        interp.set_tensor(interp.get_input_details()[0]["index"], ((np.float32(case.input) - mean) / std)[None])
        interp.invoke()
        probs = interp.get_tensor(outputs[m.probabilities.index]["index"])[0]
        hidden = interp.get_tensor(outputs[m.hidden.index]["index"])[0]
        assert probs.shape == (6,) and hidden.shape == (64,)
        assert math.isclose(float(probs.sum()), 1.0, abs_tol=1e-5)
        assert (hidden >= 0).all()  # ReLU
    assert trained.conversion_deviation <= m.golden_tolerance


def test_manifest_sizes_and_training_record(trained, gas_csv: Path) -> None:
    m = trained.manifest
    metrics = m.training.metrics
    assert m.features == GAS_FEATURES and m.labels == GAS_LABELS
    assert m.input.shape == [1, 128] and m.probabilities.shape == [1, 6] and m.hidden.shape == [1, 64]
    assert len(m.golden) == len(trained.golden_labels) >= 8
    assert set(trained.golden_labels) == set(GAS_LABELS)  # at least one golden case per class
    assert m.training.dataset_version == "gas_b12" and m.training.rows == 1689
    assert m.training.dataset_sha256 == hashlib.sha256(gas_csv.read_bytes()).hexdigest()
    n_train = int(metrics["rows_train"])
    assert n_train + metrics["rows_validation"] + metrics["rows_test"] == 1689
    ref = m.reference
    assert ref.n_samples == n_train
    assert all(sum(f.histogram.counts) == n_train for f in ref.features)
    assert all(f.histogram.edges[0] < f.min and f.max < f.histogram.edges[-1] for f in ref.features)
    assert math.isclose(sum(ref.class_priors), 1.0)
    held_out = int(metrics["rows_validation"] + metrics["rows_test"])
    assert sum(ref.confidence_histogram.counts) == held_out
    assert sum(ref.coactivation.count_histogram.counts) == held_out
    assert sum(ref.pca.error_histogram.counts) == held_out
    v = np.asarray(ref.pca.components)
    assert 1 <= v.shape[0] < 128 and np.allclose(v @ v.T, np.eye(v.shape[0]), atol=1e-9)
    assert len(rare_pair_indices(ref.coactivation, 64)[0]) == metrics["rare_pairs"]
    assert metrics["test_accuracy"] > 0.9 and 0 < metrics["test_macro_f1"] <= 1
    assert 0 <= metrics["test_ece_calibrated"] < 1 and 0 <= metrics["test_ece_uncalibrated"] < 1


def test_calibration_temperature_is_positive_and_does_not_raise_validation_nll(trained) -> None:
    m = trained.manifest.training.metrics
    assert trained.manifest.calibration.temperature > 0
    assert m["temperature"] == trained.manifest.calibration.temperature
    assert m["validation_nll_calibrated"] <= m["validation_nll_uncalibrated"]


# --------------------------------------------------------------------------- committed bundle


def test_committed_cabin_bundle_verifies_and_passes_golden() -> None:
    if not CABIN_BUNDLE.exists():
        pytest.skip("edge_agent/bundles/cabin-v1.tar is not committed yet (make reference-model)")
    bundle = load_bundle(CABIN_BUNDLE, trusted=load_public_keys([DEV_PUB]))
    m = bundle.manifest
    assert (m.name, m.version, m.training.dataset_version) == ("cabin-events", "1.0.0", "cabin_v1")
    assert run_golden(bundle, tflite_runtime_interpreter(bundle.model)) <= m.golden_tolerance


# ------------------------------------------------------------------------------- CLI and runs


def synthetic_csv(path: Path, *, rows: int = 600, seed: int = 3) -> Path:
    """Three well-separated classes in 5 numeric features, plus a text column and a few broken rows."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, rows)
    x = rng.normal(size=(rows, 5)) + 3.0 * np.eye(3, 5)[y]
    body: list[list[object]] = [[f"c{c}", "note", *map(float, v)] for c, v in zip(y, x, strict=True)]
    body[0][3] = "nan"  # a missing feature: dropped
    body[1][0] = ""  # no label: dropped
    body.append(["c1", "short row"])  # malformed: dropped
    return write_csv(path, ["cls", "comment", "a", "b", "c", "d", "e"], body)


def cli_args(argv: list[str]) -> argparse.Namespace:
    return add_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_cli_trains_with_key_from_environment(tmp_path: Path, monkeypatch, capsys) -> None:
    pytest.importorskip("tensorflow", reason="the train extra is not installed")
    data = synthetic_csv(tmp_path / "syn.csv")
    monkeypatch.setenv("FLEET_SIGNING_KEY", str(DEV_KEY))
    out = tmp_path / "out" / "syn.tar"
    argv = ["--csv", str(data), "--label-column", "cls", "--out", str(out), "--epochs", "4", "--name", "syn"]
    assert run(cli_args(argv)) == 0
    printed = capsys.readouterr().out
    bundle = load_bundle(out, trusted=load_public_keys([DEV_PUB]))
    assert hashlib.sha256(out.read_bytes()).hexdigest() in printed
    assert bundle.manifest.features == ["a", "b", "c", "d", "e"]  # "comment" is text: skipped
    assert bundle.manifest.labels == ["c0", "c1", "c2"]
    assert bundle.manifest.training.rows == 598
    assert bundle.manifest.training.metrics["rows_dropped"] == 3

    # Same seed, same data: the same model, byte for byte.
    again = tmp_path / "again.tar"
    assert run(cli_args([*argv[:5], str(again), *argv[6:]])) == 0
    assert load_bundle(again, trusted=load_public_keys([DEV_PUB])).sha256 == bundle.sha256


def test_cli_without_a_signing_key_fails_clearly(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.delenv("FLEET_SIGNING_KEY", raising=False)
    args = cli_args(["--csv", str(tmp_path / "x.csv"), "--label-column", "y", "--out", str(tmp_path / "b.tar")])
    assert run(args) == 1
    assert "FLEET_SIGNING_KEY" in caplog.text


# --------------------------------------------------------------------------------- bad input


def test_missing_label_column(tmp_path: Path) -> None:
    path = synthetic_csv(tmp_path / "syn.csv")
    with pytest.raises(TrainingError) as err:
        load_labelled_csv(path, label_column="label")
    assert err.value.reason == "missing_column"
    with pytest.raises(TrainingError) as err:
        load_labelled_csv(path, label_column="cls", feature_columns=["a", "zz"])
    assert err.value.reason == "missing_column" and "zz" in err.value.detail


def test_no_numeric_features(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "text.csv", ["y", "colour"], [["a", "red"], ["b", "blue"], ["a", "green"]])
    with pytest.raises(TrainingError) as err:
        load_labelled_csv(path, label_column="y")
    assert err.value.reason == "no_features"
    with pytest.raises(TrainingError) as err:
        load_labelled_csv(path, label_column="y", feature_columns=["colour"])
    assert err.value.reason == "non_numeric_feature"


def test_single_class_fails_before_training(tmp_path: Path) -> None:
    from collector.training.trainer import train_bundle

    path = write_csv(tmp_path / "one.csv", ["y", "x"], [["only", k] for k in range(10)] + [["", 99]])
    with pytest.raises(TrainingError) as err:
        train_bundle(path, label_column="y", out=tmp_path / "b.tar", signing_key=DEV_KEY, name="m", version="1")
    assert err.value.reason == "single_class"
    assert not (tmp_path / "b.tar").exists()


def test_other_bad_input(tmp_path: Path) -> None:
    from collector.training.trainer import train_bundle

    tiny = write_csv(tmp_path / "tiny.csv", ["y", "x"], [["a", 1], ["a", 2], ["a", 3], ["b", 4], ["b", 5]])
    with pytest.raises(TrainingError) as err:
        load_labelled_csv(tiny, label_column="y")
    assert err.value.reason == "class_too_small" and "b=2" in err.value.detail
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(TrainingError) as err:
        load_labelled_csv(empty, label_column="y")
    assert err.value.reason == "bad_csv"
    broken_gz = tmp_path / "broken.csv.gz"
    broken_gz.write_bytes(gzip.compress(b"y,x\na,1\n")[:12])
    with pytest.raises(TrainingError) as err:
        load_labelled_csv(broken_gz, label_column="y")
    assert err.value.reason == "bad_csv"
    with pytest.raises(TrainingError) as err:
        load_labelled_csv(tmp_path / "absent.csv", label_column="y")
    assert err.value.reason == "unreadable"
    data = synthetic_csv(tmp_path / "syn.csv")
    with pytest.raises(TrainingError) as err:
        train_bundle(data, label_column="cls", out=tmp_path / "b.tar", signing_key=DEV_PUB, name="m", version="1")
    assert err.value.reason == "signing_key"
    with pytest.raises(TrainingError) as err:
        train_bundle(
            data, label_column="cls", out=tmp_path / "b.tar", signing_key=DEV_KEY, name="bad name", version="1"
        )
    assert err.value.reason == "bad_argument"


def test_csv_cleaning_counts_every_dropped_row(tmp_path: Path) -> None:
    table = load_labelled_csv(synthetic_csv(tmp_path / "syn.csv.gz"), label_column="cls")
    assert table.feature_names == ["a", "b", "c", "d", "e"]
    assert table.skipped_columns.keys() == {"comment"}
    assert table.rows_read == 601
    assert table.rows_dropped == {"malformed": 1, "missing_label": 1, "non_finite_feature": 1}
    assert table.x.shape == (598, 5) and np.isfinite(table.x).all()
    assert table.labels == ["c0", "c1", "c2"] and table.y.shape == (598,)


def test_stratified_split_keeps_every_class_in_every_split() -> None:
    y = np.repeat([0, 1, 2], [100, 20, 3])
    train, val, test = stratified_split(y, seed=7)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(y.size))
    for part in (train, val, test):
        assert set(y[part].tolist()) == {0, 1, 2}
    assert np.bincount(y[val]).tolist() == [15, 3, 1] and np.bincount(y[test]).tolist() == [15, 3, 1]
    again = stratified_split(y, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again, strict=True))


# ------------------------------------------------------------------------- reference maths


def test_quantile_edges_and_counts_on_a_uniform_grid() -> None:
    x = np.arange(100.0)
    edges = quantile_edges(x, 4)
    assert edges.tolist() == pytest.approx([-4.95, 24.75, 49.5, 74.25, 103.95])
    assert bin_counts(x, edges).tolist() == [25, 25, 25, 25]


def test_quantile_edges_merge_ties_and_outer_bins_are_open() -> None:
    x = np.concatenate([np.zeros(80), np.arange(1.0, 21.0)])
    edges = quantile_edges(x, 10)
    # deciles 0.1..0.7 are all 0 (merged), 0.8 is 0.2 and 0.9 is 10.1; range 0..20 widened by 1
    assert edges.tolist() == pytest.approx([-1.0, 0.0, 0.2, 10.1, 21.0])
    counts = bin_counts(x, edges)
    assert counts.tolist() == [0, 80, 10, 10]
    # values beyond the outer edges land in the outer bins; NaN is not counted
    assert bin_counts(np.array([-1e9, 1e9, np.nan]), edges).tolist() == [1] + [0] * (len(edges) - 3) + [1]
    assert bin_index(np.array([np.nan, -5.0, 0.0]), edges).tolist() == [-1, 0, 1]
    hist = histogram(x, edges)
    assert hist.counts == counts.tolist() and hist.edges == edges.tolist()


def test_quantile_edges_of_a_constant_and_of_a_bounded_quantity() -> None:
    # a constant still gets positive-width bins, split at its value: any change shows
    constant = quantile_edges(np.full(5, 5.0))
    assert constant.tolist() == [4.0, 5.0, 6.0]
    assert bin_counts(np.full(5, 5.0), constant).tolist() == [0, 5]
    assert quantile_edges(np.zeros(5)).tolist() == [-1.0, 0.0, 1.0]
    conf = np.array([0.5, 0.9, 1.0, 1.0, 1.0, 1.0])
    edges = quantile_edges(conf, 2, lower=0.0, upper=1.0)
    assert edges.tolist() == [0.0, 1.0]  # the median is 1.0, the upper bound itself
    assert bin_counts(conf, edges).tolist() == [6]


def test_integer_edges() -> None:
    counts = np.array([0] * 90 + [1] * 8 + [3] * 2)
    edges = integer_edges(counts)
    assert edges.tolist() == [-0.5, 0.5, 1.5, 2.5, 3.5]
    assert bin_counts(counts, edges).tolist() == [90, 8, 0, 2]
    many = np.arange(1000)
    wide = integer_edges(many, bins=4)
    assert wide.tolist() == [-0.5, 249.5, 499.5, 749.5, 999.5]
    assert bin_counts(many, wide).tolist() == [250, 250, 250, 250]


def test_class_priors() -> None:
    assert class_priors(np.array([0, 0, 1, 2]), 4) == [0.5, 0.25, 0.25, 0.0]


def constructed_activations(n: int = 1000) -> np.ndarray:
    """Unit 0 fires on even records, unit 1 on odd ones (never together), unit 2 always, unit 3 rarely."""
    k = np.arange(n)
    hidden = np.zeros((n, 4))
    hidden[:, 0] = np.where(k % 2 == 0, 1.5, 0.0)
    hidden[:, 1] = np.where(k % 2 == 1, 0.7, -0.0)
    hidden[:, 2] = 2.0
    hidden[:, 3] = np.where(k % 20 == 1, 0.3, 0.0)  # 5 % of records, always with unit 1, never with unit 0
    return hidden


def test_rare_pair_mask_on_constructed_activations() -> None:
    active = active_units(constructed_activations())
    mask = rare_pair_mask(active, threshold=0.01)
    # (0, 1) never fire together though each fires half the time; unit 3 fires too seldom (5 % <
    # sqrt(1 %) = 10 %) for its pairs to count; unit 2 fires with everyone.
    assert np.argwhere(mask).tolist() == [[0, 1]]
    lowered = rare_pair_mask(active, threshold=0.01, min_unit_frequency=0.05)
    assert np.argwhere(lowered).tolist() == [[0, 1], [0, 3]]
    with pytest.raises(ValueError):
        rare_pair_mask(active, threshold=0.0)


def test_rare_coactivation_counts_and_reference() -> None:
    train = active_units(constructed_activations())
    held_out = active_units(constructed_activations(100))
    held_out[:3, :2] = True  # three unusual records fire units 0 and 1 together
    mask = rare_pair_mask(train)
    counts = rare_coactivation_counts(held_out, mask)
    assert counts.tolist() == [1, 1, 1] + [0] * 97
    ref, ref_mask = coactivation_reference(train, held_out)
    assert np.array_equal(ref_mask, mask)
    assert ref.n_pairs == 6 and ref.threshold == 0.01
    i, j = rare_pair_indices(ref, 4)
    assert i.tolist() == [0] and j.tolist() == [1]
    assert ref.mean == pytest.approx(0.03)
    assert ref.p99 == pytest.approx(np.quantile(counts, 0.99))
    assert ref.count_histogram.edges == [-0.5, 0.5, 1.5] and ref.count_histogram.counts == [97, 3]
    assert rare_coactivation_counts(held_out, np.zeros((4, 4), bool)).tolist() == [0] * 100


def test_pca_recovers_a_subspace() -> None:
    rng = np.random.default_rng(11)
    basis, _ = np.linalg.qr(rng.normal(size=(10, 3)))
    z = rng.normal(size=(2000, 3)) @ basis.T  # 3 equally strong directions in R^10
    v = fit_pca(z, 0.95)
    assert v.shape == (3, 10)
    assert np.allclose(v @ v.T, np.eye(3), atol=1e-12)
    assert (v[np.arange(3), np.abs(v).argmax(axis=1)] > 0).all()  # sign convention
    assert reconstruction_error(z, v).max() < 1e-20
    off = rng.normal(size=(50, 10))
    assert reconstruction_error(off, v).mean() > 0.3  # 7 of 10 unit-variance directions are not in the basis
    ref = pca_reference(z, z[:500])
    assert sum(ref.error_histogram.counts) == 500 and ref.error_histogram.edges[0] == 0.0
    assert ref.error_p99 < 1e-20
    assert np.array_equal(fit_pca(z, 0.95), v)  # deterministic, signs included


def test_metrics_on_exact_cases() -> None:
    probs = np.tile([0.8, 0.2], (10, 1))
    y = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(probs, y) == pytest.approx(0.0)
    assert expected_calibration_error(probs, np.zeros(10, int)) == pytest.approx(0.2)
    assert nll(probs, y) == pytest.approx(-(8 * math.log(0.8) + 2 * math.log(0.2)) / 10)
    # predictions 0,0,1,1 for labels 0,1,1,1: F1 class 0 = 2/3, class 1 = 0.8
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
    assert macro_f1(p, np.array([0, 1, 1, 1]), 2) == pytest.approx((2 / 3 + 0.8) / 2)


def test_fit_temperature_undoes_overconfidence() -> None:
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(20_000, 4)) * 2
    true_p = calibrate(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 1.0)
    y = (rng.random((20_000, 1)) > np.cumsum(true_p, axis=1)).sum(axis=1)  # a draw from each row
    overconfident = calibrate(true_p, 1 / 3)  # logits multiplied by 3
    t = fit_temperature(overconfident, y)
    assert t == pytest.approx(3.0, rel=0.05)
    assert nll(calibrate(overconfident, t), y) < nll(overconfident, y)
    assert fit_temperature(true_p, y) == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize(
    "values",
    [
        np.round(np.random.default_rng(0).normal(1013.3, 0.2, 20_000), 2),  # pressure: grid step 0.5 > bins
        np.random.default_rng(1).integers(0, 5_000, 20_000).astype(np.float64),  # counts past 2048 (step 2)
        np.round(np.random.default_rng(2).normal(0.0, 1.0, 20_000), 3),
        np.random.default_rng(3).lognormal(9.0, 1.5, 20_000),  # partly beyond float16's range
    ],
)
def test_wire_edges_bin_a_value_alike_as_float64_float32_and_float16(values: np.ndarray) -> None:
    edges = wire_edges(values)
    assert np.all(np.diff(edges) > 0) and edges.size >= 2
    exact = bin_index(values, edges)
    np.testing.assert_array_equal(bin_index(as_wire(values), edges), exact)
    np.testing.assert_array_equal(bin_index(values.astype(np.float32).astype(np.float64), edges), exact)
    # Midpoints of the float16 grid (which two-decimal CSV values hit) follow round-half-to-even.
    grid = np.arange(1000.0, 1030.0, 0.5)
    ties = (grid[:-1] + grid[1:]) / 2
    tie_edges = wire_edges(np.concatenate([grid, ties]))
    np.testing.assert_array_equal(bin_index(ties, tie_edges), bin_index(as_wire(ties), tie_edges))


def test_reference_csv_makes_the_monitoring_reference(gas_csv: Path, tmp_path: Path) -> None:
    """Independent records (batch 3 of the gas data) become input histograms, score distributions and priors."""
    pytest.importorskip("tensorflow", reason="the train extra is not installed")
    from collector.training.trainer import train_bundle

    with gzip.open(GAS, "rt", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = [row for row in reader if row[0] == "3"]
    reference = write_csv(tmp_path / "gas_b3.csv.gz", header, rows)
    result = train_bundle(
        gas_csv,
        label_column="gas",
        feature_columns=GAS_FEATURES,
        out=tmp_path / "gas.tar",
        signing_key=DEV_KEY,
        name="gas-test",
        version="0.0.2",
        epochs=4,
        seed=0,
        reference_csv=reference,
    )
    manifest = load_bundle(result.bundle_path, load_public_keys([DEV_PUB])).manifest
    ref = manifest.reference
    assert ref.n_samples == len(rows)
    first = ref.features[0]
    assert sum(first.histogram.counts) == len(rows)
    values = np.array([float(r[header.index(first.name)]) for r in rows])
    assert first.mean == pytest.approx(float(values.mean()))
    assert sum(ref.coactivation.count_histogram.counts) == len(rows)
    assert sum(ref.pca.error_histogram.counts) == len(rows)
    assert sum(ref.confidence_histogram.counts) == len(rows)
    # Priors are the model's predicted mix on those records: shares of whole records.
    assert sum(ref.class_priors) == pytest.approx(1.0)
    assert all(round(p * len(rows), 6) == round(p * len(rows)) for p in ref.class_priors)
    # Without drive and time columns nothing says how records follow each other: no decorrelation times.
    assert ref.decorrelation is None


def test_reference_with_drive_and_time_columns_measures_decorrelation(gas_csv: Path, tmp_path: Path) -> None:
    """Batches 3 and 4 of the gas data as two time-ordered drives: the trainer measures decorrelation times."""
    pytest.importorskip("tensorflow", reason="the train extra is not installed")
    from collector.training.reference import decorrelation_seconds
    from collector.training.trainer import train_bundle

    with gzip.open(GAS, "rt", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = [row for row in reader if row[0] in ("3", "4")]
    drive = [int(r[0]) for r in rows]
    ts = [10.0 * sum(1 for d in drive[:k] if d == drive[k]) for k in range(len(rows))]
    timed = [[*r, d, t] for r, d, t in zip(rows, drive, ts, strict=True)]
    reference = write_csv(tmp_path / "gas_b34.csv", [*header, "drive", "ts_s"], timed)
    result = train_bundle(
        gas_csv,
        label_column="gas",
        feature_columns=GAS_FEATURES,
        out=tmp_path / "gas.tar",
        signing_key=DEV_KEY,
        name="gas-test",
        version="0.0.3",
        epochs=4,
        seed=0,
        reference_csv=reference,
    )
    ref = load_bundle(result.bundle_path, load_public_keys([DEV_PUB])).manifest.reference
    assert ref.n_samples == len(rows)  # the time columns are not features
    dec = ref.decorrelation
    assert dec is not None and dec.spacing_s == 10.0 and len(dec.features) == len(GAS_FEATURES)
    x = np.array([[float(r[header.index(f)]) for f in GAS_FEATURES] for r in rows])
    _, expected = decorrelation_seconds(x, np.array(drive), np.array(ts))
    assert dec.features == pytest.approx(expected.tolist())
    assert min(dec.features) >= 10.0 and min(dec.classes, dec.confidence, dec.pca_error, dec.coactivation) >= 10.0
