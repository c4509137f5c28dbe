"""The inference engine on the packaged reference bundle: golden agreement, manifest-indexed outputs,
calibration, bit-packed activations, rare co-activation counts, imputation, and refusal of bad bundles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.config import DEFAULT_BUNDLE, DEFAULT_KEY
from edge_agent.inference import Engine
from shared.bundle import (
    Bundle,
    BundleError,
    GoldenCase,
    calibrate,
    load_bundle,
    manifest_json,
    rare_pair_indices,
    write_bundle,
)
from shared.features import FLAG_AUDIO_MISSING, FLAG_IMPUTED
from shared.interpreter import load_interpreter
from shared.signing import generate_private_key, load_private_key, load_public_keys, sign


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return load_bundle(DEFAULT_BUNDLE, load_public_keys([DEFAULT_KEY]))


@pytest.fixture(scope="module")
def engine(bundle: Bundle) -> Engine:
    return Engine(bundle, act_sample_fraction=0.25, seed=7)


def inputs(bundle: Bundle, n: int, seed: int = 0) -> np.ndarray:
    """Inputs around the training data, from typical to far off (0.2 to 4 reference spreads)."""
    norm = bundle.manifest.normalisation
    mean, std = np.asarray(norm.mean, np.float32), np.asarray(norm.std, np.float32)
    rng = np.random.default_rng(seed)
    spread = rng.uniform(0.2, 4.0, (n, 1))
    return (mean + rng.normal(size=(n, mean.size)) * std * spread).astype(np.float32)


def raw_outputs(bundle: Bundle, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and hidden activations straight from a separate interpreter, by manifest index."""
    m = bundle.manifest
    interp = load_interpreter(bundle.model)
    out = interp.get_output_details()
    inp = interp.get_input_details()[0]["index"]
    mean, std = np.asarray(m.normalisation.mean, np.float32), np.asarray(m.normalisation.std, np.float32)
    probs, hidden = [], []
    for x in X:
        interp.set_tensor(inp, ((x - mean) / std).reshape(1, -1).astype(np.float32))
        interp.invoke()
        probs.append(interp.get_tensor(out[m.probabilities.index]["index"])[0].copy())
        hidden.append(interp.get_tensor(out[m.hidden.index]["index"])[0].copy())
    return np.array(probs), np.array(hidden)


def resigned(bundle: Bundle, tmp_path: Path, **changes: object) -> tuple[Path, Path]:
    """The bundle with manifest changes, signed by a fresh key; returns (bundle path, public key path)."""
    key = tmp_path / "test-release.pem"
    generate_private_key(key)
    manifest = bundle.manifest.model_copy(update=changes)
    data = manifest_json(manifest)
    path = tmp_path / "changed.tar"
    write_bundle(path, bundle.model, data, sign(data, load_private_key(key)))
    return path, Path(str(key) + ".pub")


def test_golden_inputs_reproduce_the_manifest(bundle: Bundle, engine: Engine) -> None:
    m = bundle.manifest
    assert engine.golden_deviation <= m.golden_tolerance
    for case in m.golden:
        record = engine.infer(np.array(case.input, np.float32))
        np.testing.assert_allclose(record.probs, case.probabilities, atol=m.golden_tolerance)
        assert record.pred == int(np.argmax(case.probabilities))
        assert record.sensor_flags == 0


def test_outputs_are_read_by_manifest_index(bundle: Bundle, engine: Engine, tmp_path: Path) -> None:
    m = bundle.manifest
    # The reference model's converter put the hidden layer first: position assumptions would break.
    assert m.probabilities.index != 0
    X = inputs(bundle, 50)
    cols = engine.infer_many(X, np.zeros(50, np.uint16))
    probs, hidden = raw_outputs(bundle, X)
    assert cols.probs.shape == (50, len(m.labels))
    np.testing.assert_allclose(cols.probs, probs, atol=1e-6)
    np.testing.assert_array_equal(cols.act_bits, np.packbits(hidden > 0, axis=1))
    # A manifest that names the outputs the other way round is refused, not silently misread.
    swapped, key = resigned(bundle, tmp_path, probabilities=m.hidden, hidden=m.probabilities)
    with pytest.raises(BundleError):
        Engine(load_bundle(swapped, load_public_keys([key])))


def test_confidences_and_calibration(bundle: Bundle, engine: Engine) -> None:
    X = inputs(bundle, 200, seed=1)
    cols = engine.infer_many(X, np.zeros(200, np.uint16))
    rows = np.arange(200)
    np.testing.assert_array_equal(cols.pred, cols.probs.argmax(axis=1))
    np.testing.assert_allclose(cols.confidence, cols.probs.max(axis=1))
    expected = calibrate(cols.probs, bundle.manifest.calibration.temperature)[rows, cols.pred]
    np.testing.assert_allclose(cols.calibrated, expected, rtol=1e-6)
    assert ((cols.probs >= 0) & (cols.probs <= 1)).all()


def test_packbits_and_rare_coactivation_count_brute_force(bundle: Bundle, engine: Engine) -> None:
    m = bundle.manifest
    X = inputs(bundle, 300, seed=2)
    cols = engine.infer_many(X, np.zeros(300, np.uint16))
    _probs, hidden = raw_outputs(bundle, X)
    active = hidden > 0
    assert cols.act_bits.shape == (300, (m.n_hidden + 7) // 8)
    np.testing.assert_array_equal(np.unpackbits(cols.act_bits, axis=1)[:, : m.n_hidden].astype(bool), active)
    pi, pj = rare_pair_indices(m.reference.coactivation, m.n_hidden)
    rare = set(zip(pi.tolist(), pj.tolist(), strict=True))
    expected = [
        sum(1 for i in range(m.n_hidden) for j in range(i + 1, m.n_hidden) if (i, j) in rare and row[i] and row[j])
        for row in active
    ]
    assert cols.coact.tolist() == expected
    assert len(set(expected)) > 3, "the inputs exercise several counts"
    assert cols.coact.dtype == np.uint16


def test_missing_inputs_are_imputed_and_flagged(bundle: Bundle, engine: Engine) -> None:
    m = bundle.manifest
    means = np.array([f.mean for f in m.reference.features], np.float32)
    x = inputs(bundle, 1, seed=3)[0]
    broken = x.copy()
    broken[20:] = np.nan  # the microphone failed
    broken[2] = np.inf  # and a reading overflowed
    record = engine.infer(broken, FLAG_AUDIO_MISSING)
    assert record.sensor_flags == FLAG_AUDIO_MISSING | FLAG_IMPUTED
    assert np.isnan(record.features[20:]).all() and np.isnan(record.features[2])  # sent as missing
    filled = np.where(np.isfinite(broken), broken, means)
    expected = engine.infer(filled)
    np.testing.assert_allclose(record.probs, expected.probs, atol=1e-6)
    assert expected.sensor_flags == 0


def test_activation_sampling_is_seeded(bundle: Bundle) -> None:
    X = inputs(bundle, 400, seed=4)
    a = Engine(bundle, act_sample_fraction=0.1, seed=11).infer_many(X, np.zeros(400, np.uint16))
    b = Engine(bundle, act_sample_fraction=0.1, seed=11).infer_many(X, np.zeros(400, np.uint16))
    np.testing.assert_array_equal(a.act_sample_idx, b.act_sample_idx)
    assert 10 < a.act_sample_idx.size < 80
    _probs, hidden = raw_outputs(bundle, X[a.act_sample_idx])
    np.testing.assert_array_equal(a.act_sample, hidden.astype(np.float16))
    none = Engine(bundle, act_sample_fraction=0.0).infer_many(X, np.zeros(400, np.uint16))
    assert none.act_sample_idx.size == 0 and none.act_sample.shape == (0, bundle.manifest.n_hidden)


def test_infer_many_matches_infer(bundle: Bundle, engine: Engine) -> None:
    X = inputs(bundle, 20, seed=5)
    cols = engine.infer_many(X, np.zeros(20, np.uint16))
    for i in range(20):
        one = engine.infer(X[i])
        assert one.pred == cols.pred[i] and one.coact == cols.coact[i]
        np.testing.assert_array_equal(one.act_bits, cols.act_bits[i])
        np.testing.assert_allclose(one.probs, cols.probs[i])


def test_wrong_input_width_is_an_error(engine: Engine) -> None:
    with pytest.raises(ValueError, match="features must be"):
        engine.infer_many(np.zeros((2, 3), np.float32), np.zeros(2, np.uint16))


def test_tampered_bundle_is_refused(bundle: Bundle, tmp_path: Path) -> None:
    path = tmp_path / "tampered.tar"
    data = bytearray(bundle.manifest_bytes)
    pos = data.index(b'"version"')
    data[pos + 11 : pos + 12] = b"9" if data[pos + 11 : pos + 12] != b"9" else b"8"
    write_bundle(path, bundle.model, bytes(data), bundle.signature)
    with pytest.raises(BundleError) as err:
        load_bundle(path, load_public_keys([DEFAULT_KEY]))
    assert err.value.reason == "bad_signature"


def test_bundle_failing_its_golden_test_is_refused(bundle: Bundle, tmp_path: Path) -> None:
    case = bundle.manifest.golden[0]
    wrong = GoldenCase(input=case.input, probabilities=list(reversed(case.probabilities)), hidden=case.hidden)
    path, key = resigned(bundle, tmp_path, golden=[wrong, *bundle.manifest.golden[1:]])
    changed = load_bundle(path, load_public_keys([key]))  # signature fine, model fine ...
    with pytest.raises(BundleError) as err:
        Engine(changed)  # ... but the self-test on load catches the lie
    assert err.value.reason == "golden_mismatch"
