"""Offline evaluation on the committed cabin data and bundle: real verdicts, exact KS, bad input, the CLI."""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from collector.fleetctl import main
from collector.monitoring.offline import OfflineInputError, evaluate_files, read_table, render_text
from shared.signing import generate_private_key

REPO = Path(__file__).resolve().parents[3]
CABIN_BUNDLE = REPO / "edge_agent" / "bundles" / "cabin-v1.tar"
DEV_PUB = REPO / "edge_agent" / "keys" / "dev-release.pub"
CABIN_DATA = REPO / "collector" / "training" / "data" / "cabin_v1.csv.gz"
KEYS = [DEV_PUB]


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2,000-row reference, a 500-row current sample of the same data and a drifted copy of it.

    Drift as a cabin sees it: the temperature sensor reads 4 °C high (HVAC fault) and the microphone
    gain went up 6 dB (RMS and peak level).
    """
    if not (CABIN_BUNDLE.exists() and CABIN_DATA.exists()):
        pytest.skip("the cabin bundle or dataset is not committed")
    with gzip.open(CABIN_DATA, "rt", newline="") as f:
        header, *rows = list(csv.reader(f))
    order = np.random.default_rng(7).permutation(len(rows))
    reference = [rows[i] for i in order[:2000]]
    current = [rows[i] for i in order[2000:2500]]
    drifted = [list(r) for r in current]
    shifts = {"temperature_c": 4.0, "audio_rms_dbfs": 6.0, "audio_peak_dbfs": 6.0}
    for r in drifted:
        for name, delta in shifts.items():
            k = header.index(name)
            r[k] = repr(float(r[k]) + delta)
    folder = tmp_path_factory.mktemp("offline")
    return {
        "reference": write_csv(folder / "reference.csv", header, reference),
        "current": write_csv(folder / "current.csv", header, current),
        "drifted": write_csv(folder / "drifted.csv", header, drifted),
        "folder": folder,
    }


@pytest.fixture(scope="module")
def stable(files: dict[str, Path]) -> dict:
    return evaluate_files(CABIN_BUNDLE, files["reference"], files["current"], trusted_keys=KEYS, label_column="label")


@pytest.fixture(scope="module")
def drifted(files: dict[str, Path]) -> dict:
    return evaluate_files(CABIN_BUNDLE, files["reference"], files["drifted"], trusted_keys=KEYS, label_column="label")


def features(report: dict) -> dict[str, dict]:
    return {f["name"]: f for f in report["drift"]["features"]}


def test_same_distribution_is_ok(stable: dict) -> None:
    assert stable["verdict"] == "ok" and stable["reasons"] == []
    assert stable["bundle"]["model_name"] == "cabin-events" and stable["bundle"]["verified"] is True
    assert stable["reference"]["rows"] == 2000 and stable["current"]["rows"] == 500
    assert stable["current"]["labelled"] == 500 and stable["current"]["ignored_columns"] == []
    feats = features(stable)
    assert len(feats) == 40
    assert all(f["verdict"] == "ok" and f["ks_exact"]["verdict"] == "ok" for f in feats.values())
    assert all(f["n_reference"] == 2000 and f["n_current"] == 500 for f in feats.values())
    for signal in ("class_mix", "confidence", "pca_error", "coactivation"):
        assert stable["drift"][signal]["verdict"] == "ok", signal
    model = stable["model"]["current"]
    assert model["region"]["verdict"] == "reliable"
    # The model is as good on the held-back rows as it expects to be: the realized accuracy lies in the interval.
    est, real = model["expected_accuracy"], model["realized_accuracy"]
    assert est["method"] == "exact" and est["low"] <= real["estimate"] <= est["high"]
    assert sum(model["class_counts"].values()) == 500
    json.dumps(stable, allow_nan=False)


def test_drifted_sensors_are_found_and_the_estimate_is_marked_unreliable(drifted: dict) -> None:
    assert drifted["verdict"] == "drift"
    feats = features(drifted)
    shifted = {"temperature_c", "audio_rms_dbfs", "audio_peak_dbfs"}
    for name in shifted:
        assert feats[name]["verdict"] == "drift" and feats[name]["severity"] == "major", name
        assert feats[name]["ks_exact"]["verdict"] == "drift", name
    # The other 37 features are the same rows, unchanged.
    assert {n for n, f in feats.items() if f["verdict"] == "drift"} == shifted
    assert set(drifted["ks_exact"]["drifting"]) == shifted
    assert any("major PSI" in r and "temperature_c" in r for r in drifted["reasons"])
    # The model sees inputs it was not trained on: reconstruction error and rare co-activations rise,
    # and the label-free estimate is marked unreliable instead of being trusted.
    assert drifted["drift"]["pca_error"]["verdict"] == "drift"
    assert drifted["drift"]["coactivation"]["verdict"] == "drift"
    model = drifted["model"]["current"]
    assert model["region"]["verdict"] == "unreliable" and "PCA" in model["region"]["reason"]
    assert model["realized_accuracy"]["estimate"] < drifted["model"]["reference"]["realized_accuracy"]["estimate"] - 0.2
    assert model["gap"]["gap"] < -0.1


def test_exact_ks_is_scipy_ks_2samp_with_benjamini_hochberg(files: dict[str, Path], drifted: dict) -> None:
    names = [f["name"] for f in drifted["drift"]["features"]]
    ref = read_table(files["reference"], names)
    cur = read_table(files["drifted"], names)
    p = []
    for f, feature in enumerate(drifted["drift"]["features"]):
        a = ref.features[:, f].astype(np.float64)
        b = cur.features[:, f].astype(np.float64)
        expected = stats.ks_2samp(a[np.isfinite(a)], b[np.isfinite(b)])
        ks = feature["ks_exact"]
        assert ks["statistic"] == pytest.approx(float(expected.statistic), abs=1e-12), feature["name"]
        assert ks["p_value"] == pytest.approx(float(expected.pvalue), rel=1e-9, abs=1e-300), feature["name"]
        p.append(float(expected.pvalue))
    q = stats.false_discovery_control(np.asarray(p), method="bh")
    got = [f["ks_exact"]["q_value"] for f in drifted["drift"]["features"]]
    assert got == pytest.approx(q.tolist(), rel=1e-9, abs=1e-300)
    # The binned KS never exceeds the exact statistic (binning only reads the CDFs at the edges).
    assert all(f["ks"]["statistic"] <= f["ks_exact"]["statistic"] + 1e-9 for f in drifted["drift"]["features"])


def test_text_report_names_the_verdict_and_every_feature(drifted: dict) -> None:
    text = render_text(drifted)
    assert "VERDICT: DRIFT" in text
    assert all(f["name"] in text for f in drifted["drift"]["features"])
    assert "calibration region unreliable" in text and "realized accuracy" in text


def test_missing_values_are_counted_not_fatal(files: dict[str, Path]) -> None:
    with files["current"].open() as f:
        header, *rows = list(csv.reader(f))
    k = header.index("humidity_pct")
    for r in rows[:50]:
        r[k] = ""
    rows[60][k] = "NaN"
    path = write_csv(files["folder"] / "gaps.csv", header, rows)
    report = evaluate_files(CABIN_BUNDLE, files["reference"], path, trusted_keys=KEYS)
    assert report["current"]["missing"] == {"humidity_pct": 51}
    assert report["current"]["rows_with_missing"] == 51
    assert features(report)["humidity_pct"]["n_current"] == 449
    assert features(report)["humidity_pct"]["ks_exact"]["n_current"] == 449
    assert report["current"]["ignored_columns"] == ["label"] and report["model"]["current"]["realized_accuracy"] is None


# ---------------------------------------------------------------------------------- bad input


def expect(reason: str, match: str, *args: Path, **kwargs: object) -> None:
    with pytest.raises(OfflineInputError, match=match) as err:
        evaluate_files(*args, trusted_keys=kwargs.pop("keys", KEYS), **kwargs)  # type: ignore[arg-type]
    assert err.value.reason == reason


def test_bad_csv_files_are_clear_errors(files: dict[str, Path]) -> None:
    folder = files["folder"]
    with files["current"].open() as f:
        header, *rows = list(csv.reader(f))
    ref = write_csv(folder / "small_reference.csv", header, rows[:50])  # the errors are in the current file

    no_temp = write_csv(folder / "no_temp.csv", [h for h in header if h != "temperature_c"], [r[1:] for r in rows])
    expect("missing_columns", "lacks 1 of the model's 40 feature columns: 'temperature_c'", CABIN_BUNDLE, ref, no_temp)

    bad_cell = [list(r) for r in rows]
    bad_cell[9][header.index("pressure_hpa")] = "12,5 hPa"
    path = write_csv(folder / "bad_cell.csv", header, bad_cell)
    expect("non_numeric", r"line 11, column 'pressure_hpa': '12,5 hPa' is not a number", CABIN_BUNDLE, ref, path)

    empty = folder / "empty.csv"
    empty.write_text("")
    expect("empty", "the file is empty", CABIN_BUNDLE, ref, empty)
    header_only = write_csv(folder / "header_only.csv", header, [])
    expect("empty", "a header but no data rows", CABIN_BUNDLE, header_only, files["current"])

    ragged = folder / "ragged.csv"
    ragged.write_text(files["current"].read_text().replace("\n", "\n1,2,3\n", 1))
    expect("ragged_row", "line 2 has 3 cells, the header 41", CABIN_BUNDLE, ref, ragged)

    expect("missing_columns", "no label column 'truth'", CABIN_BUNDLE, ref, files["current"], label_column="truth")
    bad_label = [list(r) for r in rows]
    bad_label[0][header.index("label")] = "sneezing"
    path = write_csv(folder / "bad_label.csv", header, bad_label)
    expect(
        "bad_label",
        r"line 2, column 'label': 'sneezing' is neither a class",
        CABIN_BUNDLE,
        ref,
        path,
        label_column="label",
    )

    expect("unreadable", "No such file", CABIN_BUNDLE, ref, folder / "absent.csv")


def test_bad_bundles_and_keys_are_clear_errors(files: dict[str, Path], tmp_path: Path) -> None:
    ref, cur = files["reference"], files["current"]
    expect("bad_bundle", "no such file", tmp_path / "absent.tar", ref, cur)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar archive at all" * 40)
    expect("bad_bundle", "not a tar archive", junk, ref, cur)
    # A real key, but not the one that signed the bundle.
    generate_private_key(tmp_path / "other")
    expect("bad_bundle", "not among the 1 pinned keys", CABIN_BUNDLE, ref, cur, keys=[tmp_path / "other.pub"])
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("ed25519:not-base64\n")
    expect("bad_key", "not a public key file", CABIN_BUNDLE, ref, cur, keys=[garbage])
    expect("no_trusted_key", "trusted public key", CABIN_BUNDLE, ref, cur, keys=[])


# ------------------------------------------------------------------------------------------ CLI


def test_fleetctl_drift_evaluate_prints_the_report(
    files: dict[str, Path], drifted: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["drift", "evaluate", "--bundle", str(CABIN_BUNDLE), "--reference", str(files["reference"])]
    args += ["--current", str(files["drifted"]), "--trusted-key", str(DEV_PUB), "--label-column", "label"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # The same report as the module's, bar the time it took.
    out.pop("elapsed_s")
    assert out == {k: v for k, v in drifted.items() if k != "elapsed_s"}
    assert main(args) == 0
    text = capsys.readouterr().out
    assert text.startswith("Offline drift evaluation: cabin-events") and "VERDICT: DRIFT" in text


def test_fleetctl_drift_evaluate_bad_input_exits_2(
    files: dict[str, Path], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["drift", "evaluate", "--bundle", str(CABIN_BUNDLE), "--reference", str(files["reference"])]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--current", str(files["folder"] / "absent.csv"), "--key", str(DEV_PUB)])
    assert exit_.value.code == 2 and "absent.csv: No such file" in caplog.text
    monkeypatch.delenv("FLEET_MONITORING_TRUSTED_KEYS", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--current", str(files["current"])])
    assert exit_.value.code == 2 and "no trusted key" in caplog.text
    # The collector's configured monitoring keys are the default.
    monkeypatch.setenv("FLEET_MONITORING_TRUSTED_KEYS", json.dumps([str(DEV_PUB)]))
    assert main([*args, "--current", str(files["current"]), "--json"]) == 0
