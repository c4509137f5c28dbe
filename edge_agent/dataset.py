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
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from edge_agent.sensors.simulated import Scenario, ScenarioError, SimulatedCabin, load_scenario
from shared.features import FEATURE_NAMES, FeaturePipeline

logger = logging.getLogger(__name__)

LABEL_COLUMN = "label"


def generate(
    scenario: Scenario, *, seconds: float, rate_hz: float = 10.0, seed: int = 0
) -> Iterator[tuple[np.ndarray, str]]:
    """Yield ``(features[40] float32, label)`` for ``round(seconds * rate_hz)`` simulated windows."""
    if not seconds >= 0 or not math.isfinite(seconds):
        raise ValueError("seconds must be a non-negative number")
    cabin = SimulatedCabin(scenario, seed=seed, rate_hz=rate_hz, start_ts=0.0)
    pipeline = FeaturePipeline(sample_rate=cabin.sample_rate)
    for _ in range(round(seconds * rate_hz)):
        obs = cabin.read()
        features, _flags = pipeline(obs.env, obs.audio)
        yield features, obs.truth or "normal"


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


def _write(path: Path, rows: Iterable[tuple[np.ndarray, str]]) -> Counter[str]:
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
                    counts = write_rows(text, rows)
            else:
                with io.TextIOWrapper(raw, encoding="utf-8", newline="") as text:
                    counts = write_rows(text, rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return counts


def write_dataset(path: Path | str, scenario: Scenario, *, seconds: float, rate_hz: float = 10.0, seed: int = 0) -> int:
    """Generate a dataset and write it to ``path`` (gzip if it ends in ``.gz``); returns the row count."""
    counts = _write(Path(path), generate(scenario, seconds=seconds, rate_hz=rate_hz, seed=seed))
    return sum(counts.values())


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
    try:
        counts = _write(args.out, generate(scenario, seconds=args.seconds, rate_hz=args.rate, seed=args.seed))
    except OSError as exc:
        logger.error("cannot write %s: %s", args.out, exc)
        return 2
    total = sum(counts.values())
    mix = ", ".join(f"{label} {n} ({100.0 * n / total:.1f}%)" for label, n in counts.most_common()) if total else ""
    print(f"wrote {total} rows to {args.out}: {mix}")
    return 0
