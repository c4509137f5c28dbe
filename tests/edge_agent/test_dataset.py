"""Dataset generator: file format, determinism, agreement with the cabin + feature pipeline, the CLI command."""

from __future__ import annotations

import argparse
import csv
import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from edge_agent import dataset
from edge_agent.sensors.replay import ReplaySource
from edge_agent.sensors.simulated import SimulatedCabin, load_scenario, parse_scenario
from shared.features import FEATURE_NAMES, FeaturePipeline

LABELS = ["normal", "vaping", "smoking", "impact", "window_open"]


def short_scenario():
    return parse_scenario(
        {
            "name": "short",
            "repeat": True,
            "timeline": [
                {"at": 2, "duration": 4, "event": "vaping"},
                {"at": 7, "duration": 1, "event": "impact", "interval_s": 0.1},
                {"at": 9, "duration": 3, "event": "window_open"},
                {"at": 13, "duration": 3, "event": "smoking"},
                {"at": 16, "duration": 2, "event": "normal"},
            ],
        }
    )


def test_generate_is_the_cabin_through_the_feature_pipeline() -> None:
    sc = short_scenario()
    rows = list(dataset.generate(sc, seconds=3.0, rate_hz=10.0, seed=3))
    cabin = SimulatedCabin(sc, seed=3, rate_hz=10.0, start_ts=0.0)
    pipeline = FeaturePipeline()
    assert len(rows) == 30
    for features, label in rows:
        obs = cabin.read()
        assert label == obs.truth
        assert np.array_equal(features, pipeline(obs.env, obs.audio)[0])
        assert features.dtype == np.float32 and features.shape == (40,)


def test_csv_has_header_rows_and_labels(tmp_path: Path) -> None:
    out = tmp_path / "d.csv"
    n = dataset.write_dataset(out, short_scenario(), seconds=18.0, rate_hz=10.0, seed=1)
    assert n == 180
    with open(out, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        body = list(reader)
    assert header == [*FEATURE_NAMES, "label"]
    assert len(body) == 180 and all(len(r) == 41 for r in body)
    counts = Counter(r[-1] for r in body)
    assert counts == {"normal": 70, "vaping": 40, "impact": 10, "window_open": 30, "smoking": 30}
    values = np.array([[float(v) for v in r[:-1]] for r in body])
    assert np.isfinite(values).all()
    expected = np.array([f for f, _ in dataset.generate(short_scenario(), seconds=18.0, rate_hz=10.0, seed=1)])
    np.testing.assert_allclose(values, expected, rtol=1e-5)  # 6 significant digits
    assert max(len(v.lstrip("-").replace(".", "").split("e")[0].lstrip("0")) for r in body for v in r[:-1]) <= 6
    # Physical units: PM2.5 in µg/m³ rises during vaping, temperature in °C.
    pm25 = values[:, FEATURE_NAMES.index("pm25_ug_m3")]
    assert pm25[50:60].mean() > 5 * pm25[:10].mean()
    assert 15.0 < values[:, 0].mean() < 30.0


def test_gzip_output_is_deterministic_and_replays(tmp_path: Path) -> None:
    a, b = tmp_path / "a.csv.gz", tmp_path / "b.csv.gz"
    dataset.write_dataset(a, short_scenario(), seconds=5.0, rate_hz=10.0, seed=2)
    dataset.write_dataset(b, short_scenario(), seconds=5.0, rate_hz=10.0, seed=2)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes()[:2] == b"\x1f\x8b"
    plain = tmp_path / "c.csv"
    dataset.write_dataset(plain, short_scenario(), seconds=5.0, rate_hz=10.0, seed=2)
    assert gzip.decompress(a.read_bytes()) == plain.read_bytes()
    src = ReplaySource(a, FEATURE_NAMES, label_column="label", labels=LABELS)
    chunk = src.read_chunk(1000)
    assert chunk.n == 50 and src.missing_cells == 0
    assert chunk.labels.tolist() == [0] * 20 + [1] * 30
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temporary file


def test_cli_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="edge-agent")
    dataset.register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "t.csv.gz"
    args = parser.parse_args(
        ["dataset", "--scenario", "training", "--seconds", "4", "--rate", "5", "--seed", "9", "--out", str(out)]
    )
    assert args.func(args) == 0
    assert "wrote 20 rows" in capsys.readouterr().out
    direct = tmp_path / "direct.csv.gz"
    dataset.write_dataset(direct, load_scenario("training"), seconds=4, rate_hz=5, seed=9)
    assert out.read_bytes() == direct.read_bytes()
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbogus: 1\n")
    args = parser.parse_args(["dataset", "--scenario", str(bad), "--seconds", "1", "--out", str(tmp_path / "x.csv")])
    assert args.func(args) == 2
    assert not (tmp_path / "x.csv").exists()
    args = parser.parse_args(["dataset", "--scenario", "training", "--seconds", "-1", "--out", str(tmp_path / "y.csv")])
    assert args.func(args) == 2


def test_drives_are_independent_vehicles_recorded_every_few_seconds() -> None:
    sc = short_scenario()
    drives = list(dataset.generate_drives(sc, vehicles=3, seconds=16.0, every_s=0.8, seed=5))
    assert len(drives) == 3 * 20
    # Vehicle k is the cabin with seed 5 * stride + k, started at its phase in the loop, one 100 ms window
    # every 0.8 s: the same features the agent computes, with the audio between records skipped.
    k = 2
    phase = dataset.drive_phase(sc, 5, k)
    assert 0.0 <= phase < sc.period and phase == pytest.approx(round(phase * 10) / 10)
    cabin = SimulatedCabin(sc, seed=5 * dataset.DRIVE_SEED_STRIDE + k, rate_hz=10.0, start_ts=-phase)
    cabin.advance(phase)
    pipeline = FeaturePipeline()
    assert [v for v, _ in drives] == [0] * 20 + [1] * 20 + [2] * 20
    for vehicle, r in drives[40:]:
        obs = cabin.read()
        assert vehicle == k and r.truth == (obs.truth or "normal") and r.ts == obs.ts
        assert np.array_equal(r.features, pipeline(obs.env, obs.audio)[0])
        cabin.advance(0.7)
    assert np.allclose(np.diff([r.ts for _, r in drives[40:]]), 0.8)
    # Same seed, same drives; another seed, other vehicles.
    again = list(dataset.generate_drives(sc, vehicles=3, seconds=16.0, every_s=0.8, seed=5))
    assert all(np.array_equal(a[1].features, b[1].features) for a, b in zip(drives, again, strict=True))
    other = list(dataset.generate_drives(sc, vehicles=1, seconds=16.0, every_s=0.8, seed=6))
    assert not np.array_equal(np.stack([r.features for _, r in other]), np.stack([r.features for _, r in drives[:20]]))
    with pytest.raises(ValueError, match="every_s"):
        next(dataset.drive(sc, records=1, every_s=0.05))


def test_cli_writes_drives(tmp_path: Path) -> None:
    out = tmp_path / "drives.csv"
    parser = argparse.ArgumentParser()
    dataset.register(parser.add_subparsers())
    scenario = tmp_path / "s.yaml"
    scenario.write_text(
        "name: s\nrepeat: true\ntimeline:\n"
        "  - {at: 1, duration: 2, event: vaping}\n"
        "  - {at: 4, duration: 1, event: normal}\n"
    )
    args = parser.parse_args(
        ["dataset", "--scenario", str(scenario), "--seconds", "8", "--every", "2", "--vehicles", "2", "--out", str(out)]
    )
    assert args.func(args) == 0
    header, *body = out.read_text().splitlines()
    # Drives carry which vehicle and when: the trainer measures decorrelation times on them.
    assert header.split(",")[-3:] == ["label", "drive", "ts_s"] and len(body) == 2 * 4
    assert [line.split(",")[-2] for line in body] == ["0"] * 4 + ["1"] * 4
    bad = parser.parse_args(
        ["dataset", "--scenario", str(scenario), "--seconds", "8", "--every", "0.01", "--out", str(out)]
    )
    assert bad.func(bad) == 2
