"""Labelled feature datasets from the simulated cabin (for the reference model and benchmarks).

Rows are computed by the same :class:`shared.features.FeaturePipeline` the agent runs, from the
same :class:`~edge_agent.sensors.simulated.SimulatedCabin`, so a model trained on them sees
exactly the features it will see on a simulated vehicle. The CSV has the 40 feature columns in
``FEATURE_NAMES`` order (physical units, 6 significant digits, an empty cell for NaN) and a
``label`` column; a path ending in ``.gz`` is gzip-compressed with a fixed timestamp, so the
same scenario, seed and length always give the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import io
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from edge_agent.sensors.simulated import Scenario, ScenarioError, SimulatedCabin, load_scenario
from shared.features import FEATURE_NAMES, FeaturePipeline

logger = logging.getLogger(__name__)

LABEL_COLUMN = "label"


DRIVE_SEED_STRIDE = 100_003
"""Vehicle ``k`` of a set of drives with seed ``s`` gets the cabin seed ``s * DRIVE_SEED_STRIDE + k``."""


@dataclass(frozen=True)
class DriveRecord:
    """One inference of a simulated drive: the features the agent computes, its sensor flags, time and truth."""

    features: np.ndarray  # float32 [40]
    flags: int
    ts: float  # end of the record's audio window
    truth: str


def drive(
    scenario: Scenario,
    *,
    records: int,
    window_s: float = 0.1,
    every_s: float | None = None,
    seed: int = 0,
    phase_s: float = 0.0,
    start_ts: float = 0.0,
) -> Iterator[DriveRecord]:
    """``records`` inferences of one simulated vehicle, one ``window_s`` audio window every ``every_s`` seconds.

    The cabin produces ``window_s`` windows (the window the reference model is trained on); between two
    inferences the audio is skipped while the cabin air is still simulated, so a low inference rate gives
    the same features as the training data, only further apart. ``phase_s`` starts the vehicle that far
    into its scenario's timeline (the clock then reads ``start_ts`` at the first window's start).
    """
    every = window_s if every_s is None else every_s
    if not (window_s > 0 and math.isfinite(window_s) and every >= window_s and math.isfinite(every)):
        raise ValueError("window_s must be positive and every_s at least window_s")
    if records < 0 or not phase_s >= 0:
        raise ValueError("records and phase_s must be non-negative")
    cabin = SimulatedCabin(scenario, seed=seed, rate_hz=1.0 / window_s, start_ts=start_ts - phase_s)
    if phase_s:
        cabin.advance(phase_s)
    pipeline = FeaturePipeline(sample_rate=cabin.sample_rate)
    skip = every - window_s
    for _ in range(records):
        obs = cabin.read()
        features, flags = pipeline(obs.env, obs.audio)
        yield DriveRecord(features, int(flags), obs.ts, obs.truth or "normal")
        if skip > 1e-9:
            cabin.advance(skip)


def drive_phase(scenario: Scenario, seed: int, vehicle: int, window_s: float = 0.1) -> float:
    """Vehicle ``vehicle``'s random start in its scenario's loop (whole windows), stable for the seed."""
    rng = np.random.default_rng([seed, vehicle, 0xA1A])
    phase = float(rng.uniform(0.0, scenario.period)) if scenario.period > 0 else 0.0
    return round(phase / window_s) * window_s


def generate(
    scenario: Scenario, *, seconds: float, rate_hz: float = 10.0, seed: int = 0
) -> Iterator[tuple[np.ndarray, str]]:
    """Yield ``(features[40] float32, label)`` for ``round(seconds * rate_hz)`` consecutive simulated windows."""
    if not seconds >= 0 or not math.isfinite(seconds):
        raise ValueError("seconds must be a non-negative number")
    for r in drive(scenario, records=round(seconds * rate_hz), window_s=1.0 / rate_hz, seed=seed):
        yield r.features, r.truth


def generate_drives(
    scenario: Scenario, *, vehicles: int, seconds: float, every_s: float, seed: int = 0, window_s: float = 0.1
) -> Iterator[tuple[int, DriveRecord]]:
    """Independent drives, one vehicle after the other: ``(vehicle, record)`` of ``vehicles`` simulated vehicles.

    Each vehicle has its own cabin seed and a random start in the scenario's loop (:func:`drive_phase`),
    and records one ``window_s`` window every ``every_s`` seconds for ``seconds``. Drives like these,
    not one long recording, describe what a fleet sees: the monitoring reference is built on them.
    """
    if vehicles < 1 or not (seconds >= 0 and math.isfinite(seconds)):
        raise ValueError("need at least one vehicle and a non-negative number of seconds")
    records = int(seconds / every_s)
    for k in range(vehicles):
        for r in drive(
            scenario,
            records=records,
            window_s=window_s,
            every_s=every_s,
            seed=seed * DRIVE_SEED_STRIDE + k,
            phase_s=drive_phase(scenario, seed, k, window_s),
        ):
            yield k, r


def _format(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6g}"


def write_rows(out: IO[str], rows: Iterable[tuple[np.ndarray, str]]) -> Counter[str]:
    """Write the header and rows as CSV text; returns the row count per label."""
    counts: Counter[str] = Counter()
    out.write(",".join((*FEATURE_NAMES, LABEL_COLUMN)) + "\n")
    lines: list[str] = []
    for features, label in rows:
        if "," in label or '"' in label or "\n" in label:
            raise ValueError(f"label {label!r} cannot be written to a CSV cell unquoted")
        lines.append(",".join(map(_format, features.tolist())) + "," + label + "\n")
        counts[label] += 1
        if len(lines) >= 1024:
            out.writelines(lines)
            lines.clear()
    out.writelines(lines)
    return counts


def write_drive_rows(out: IO[str], rows: Iterable[tuple[int, DriveRecord]]) -> Counter[str]:
    """:func:`write_rows` plus the ``drive`` and ``ts_s`` columns a monitoring reference file may carry.

    With them the trainer measures how long every monitored quantity takes to decorrelate in a vehicle's
    stream (``collector.training.labelled.TIME_COLUMNS``).
    """
    counts: Counter[str] = Counter()
    out.write(",".join((*FEATURE_NAMES, LABEL_COLUMN, "drive", "ts_s")) + "\n")
    lines: list[str] = []
    for vehicle, r in rows:
        lines.append(",".join(map(_format, r.features.tolist())) + f",{r.truth},{vehicle},{r.ts:.3f}\n")
        counts[r.truth] += 1
        if len(lines) >= 1024:
            out.writelines(lines)
            lines.clear()
    out.writelines(lines)
    return counts


def _write(
    path: Path, rows: Iterable[Any], writer: Callable[[IO[str], Iterable[Any]], Counter[str]] = write_rows
) -> Counter[str]:
    """Write atomically (temporary file, then rename), gzip when the name ends in ``.gz``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as raw:
            if path.suffix == ".gz":
                with (
                    gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
                    io.TextIOWrapper(gz, encoding="utf-8", newline="") as text,
                ):
                    counts = writer(text, rows)
            else:
                with io.TextIOWrapper(raw, encoding="utf-8", newline="") as text:
                    counts = writer(text, rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return counts


def write_dataset(path: Path | str, scenario: Scenario, *, seconds: float, rate_hz: float = 10.0, seed: int = 0) -> int:
    """Generate a dataset and write it to ``path`` (gzip if it ends in ``.gz``); returns the row count."""
    counts = _write(Path(path), generate(scenario, seconds=seconds, rate_hz=rate_hz, seed=seed))
    return sum(counts.values())


def _write_from_args(args: argparse.Namespace, scenario: Scenario) -> Counter[str]:
    """One recording at the rate (the default), or independent drives with their drive and time columns."""
    if args.vehicles == 1 and args.every is None:
        return _write(args.out, generate(scenario, seconds=args.seconds, rate_hz=args.rate, seed=args.seed))
    drives = generate_drives(
        scenario,
        vehicles=args.vehicles,
        seconds=args.seconds,
        every_s=args.every if args.every is not None else 1.0 / args.rate,
        seed=args.seed,
        window_s=1.0 / args.rate,
    )
    return _write(args.out, drives, write_drive_rows)


def register(subparsers: argparse._SubParsersAction[Any]) -> argparse.ArgumentParser:
    """Add the ``dataset`` command to an ``edge-agent`` argument parser."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "dataset",
        help="write a labelled feature CSV from a simulated cabin scenario",
        description="Simulate a cabin scenario and write its features and ground-truth labels as CSV.",
    )
    parser.add_argument("--scenario", required=True, help="scenario YAML file, or a built-in name (training)")
    parser.add_argument("--seconds", required=True, type=float, help="simulated seconds to generate")
    parser.add_argument("--rate", type=float, default=10.0, help="inference windows per simulated second")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same file)")
    parser.add_argument(
        "--vehicles",
        type=int,
        default=1,
        help="independent drives, one after the other, each with its own seed and start in the scenario's loop",
    )
    parser.add_argument(
        "--every",
        type=float,
        default=None,
        help="seconds between two recorded windows (default 1/rate: every window); the windows stay 1/rate long",
    )
    parser.add_argument("--out", required=True, type=Path, help="output CSV (.csv or .csv.gz)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the ``dataset`` command: 0 on success, 2 on bad input."""
    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        logger.error("%s", exc)
        return 2
    if not (args.seconds > 0 and math.isfinite(args.seconds)) or not (args.rate > 0 and math.isfinite(args.rate)):
        logger.error("--seconds and --rate must be positive numbers")
        return 2
    if args.vehicles < 1 or (
        args.every is not None and not (math.isfinite(args.every) and args.every >= 1.0 / args.rate)
    ):
        logger.error("--vehicles must be >= 1 and --every at least one window (1/rate)")
        return 2
    try:
        counts = _write_from_args(args, scenario)
    except OSError as exc:
        logger.error("cannot write %s: %s", args.out, exc)
        return 2
    total = sum(counts.values())
    mix = ", ".join(f"{label} {n} ({100.0 * n / total:.1f}%)" for label, n in counts.most_common()) if total else ""
    print(f"wrote {total} rows to {args.out}: {mix}")
    return 0
