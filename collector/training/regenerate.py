"""Regenerate the committed cabin dataset and reference bundle (``make reference-model``).

1. ``collector/training/data/cabin_v1.csv.gz``: the simulated cabin's training scenario
   (``edge_agent/scenarios/training.yaml``), 2,400 simulated seconds at 10 windows/s, seed 1,
   written by ``edge_agent.dataset.write_dataset`` in a subprocess (the collector never imports
   the agent) through the same feature pipeline the vehicles run.
2. The monitoring reference's drives (a temporary CSV, not committed): 20 independent simulated
   vehicles (seeds and loop phases of their own, none of the training drive's or the benchmarks'
   fleets') driving the same scenario for 12 hours each, one 100 ms window every 8 s.
3. ``edge_agent/bundles/cabin-v1.tar``: the reference trainer on the training CSV (seed 0), name
   ``cabin-events``, version ``1.0.0``, its monitoring reference (input histograms, score
   distributions, predicted-class priors) computed on the drives of 2., signed with the
   development key.

Why a reference on other drives: one 40-minute recording of one vehicle is one realisation of slow
processes (cabin temperature, humidity, pressure) with its start-up transient, and its random
held-out split scores better than any new vehicle does; a fleet judged against it was "drifting" all
day (docs/MONITORING.md, "Experiment: no alarm storm").

All of it is deterministic: the generators are seeded and gzip with a fixed timestamp, and training
runs with TensorFlow's op determinism, so the model is the same bytes on the same software; only
the manifest's ``created_at`` changes (set ``SOURCE_DATE_EPOCH`` to pin it).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from collector.training.errors import TrainingError

if TYPE_CHECKING:
    from collector.training.trainer import TrainResult

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SCENARIO = REPO / "edge_agent" / "scenarios" / "training.yaml"
DATASET = REPO / "collector" / "training" / "data" / "cabin_v1.csv.gz"
BUNDLE = REPO / "edge_agent" / "bundles" / "cabin-v1.tar"
DEV_KEY = REPO / "collector" / "training" / "dev-release-key.pem"
SECONDS = 2400.0
RATE_HZ = 10.0
DATA_SEED = 1
TRAIN_SEED = 0
LABEL_COLUMN = "label"
MAX_DATASET_BYTES = 3 * 1024 * 1024
REFERENCE_VEHICLES = 20
REFERENCE_HOURS = 12.0
REFERENCE_EVERY_S = 8.0
REFERENCE_SEED = 2


def generate_dataset(
    out: Path = DATASET,
    *,
    seconds: float = SECONDS,
    rate_hz: float = RATE_HZ,
    seed: int = DATA_SEED,
    vehicles: int = 1,
    every_s: float | None = None,
) -> int:
    """Write a cabin CSV with the agent's ``dataset`` command; return its row count.

    One drive recording every window by default; ``vehicles`` independent drives recording one window
    every ``every_s`` seconds otherwise. The agent's command runs as a child process: the collector
    never imports edge_agent, not even lazily.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "edge_agent",
        "dataset",
        "--scenario",
        str(SCENARIO),
        "--seconds",
        repr(seconds),
        "--rate",
        repr(rate_hz),
        "--seed",
        str(seed),
        "--out",
        str(out),
    ]
    if vehicles != 1 or every_s is not None:
        cmd += ["--vehicles", str(vehicles), "--every", repr(every_s if every_s is not None else 1.0 / rate_hz)]
    log.info("generating %s (%d x %g s at %g Hz, every %s s, seed %d)", out, vehicles, seconds, rate_hz, every_s, seed)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise TrainingError(
            "dataset_failed", f"the cabin generator exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
        )
    # The command's last line: "wrote N rows to PATH: <label mix>".
    rows = int(proc.stdout.strip().splitlines()[-1].split()[1])
    size = out.stat().st_size
    log.info("wrote %d rows, %d bytes", rows, size)
    if size > MAX_DATASET_BYTES:
        log.warning("%s is %d bytes, over the %d meant for the repository", out, size, MAX_DATASET_BYTES)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Regenerate the dataset (unless ``--reuse-dataset``) and the reference bundle."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m collector.training.regenerate", description=__doc__)
    parser.add_argument("--reuse-dataset", action="store_true", help="train on the existing CSV, do not regenerate it")
    parser.add_argument("--dataset", type=Path, default=DATASET, help="CSV to write and train on")
    parser.add_argument("--out", type=Path, default=BUNDLE, help="bundle to write")
    args = parser.parse_args(argv)
    try:
        if not args.reuse_dataset:
            generate_dataset(args.dataset)
        with tempfile.TemporaryDirectory(prefix="cabin-reference-") as tmp:
            drives = Path(tmp) / "drives.csv"
            generate_dataset(
                drives,
                seconds=REFERENCE_HOURS * 3600.0,
                seed=REFERENCE_SEED,
                vehicles=REFERENCE_VEHICLES,
                every_s=REFERENCE_EVERY_S,
            )
            result = _train(args, drives)
    except TrainingError as exc:
        log.error("%s", exc)
        return 1
    for key, value in sorted(result.metrics.items()):
        print(f"{key:32s} {value:.6g}")
    print(f"bundle {result.bundle_path} ({result.bundle_bytes} bytes) sha256 {result.bundle_sha256}")
    print(f"dataset {args.dataset} ({args.dataset.stat().st_size} bytes)")
    return 0


def _train(args: argparse.Namespace, reference_csv: Path) -> TrainResult:
    """The committed model (same data, same seed) with its monitoring reference on ``reference_csv``."""
    from collector.training.trainer import train_bundle

    return train_bundle(
        args.dataset,
        label_column=LABEL_COLUMN,
        out=args.out,
        signing_key=DEV_KEY,
        name="cabin-events",
        version="1.0.0",
        seed=TRAIN_SEED,
        dataset_version="cabin_v1",
        description=(
            "Cabin event classifier (normal, smoking, vaping, impact, window_open) on the 40 shared "
            "features of the simulated cabin; the reference model of the demo, signed with the DEVELOPMENT key; "
            f"monitoring reference on {REFERENCE_VEHICLES} independent simulated drives of {REFERENCE_HOURS:g} h"
        ),
        reference_csv=reference_csv,
    )


if __name__ == "__main__":
    sys.exit(main())
