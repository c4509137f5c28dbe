"""Real sensor drift: the UCI gas sensor array replayed through agents, and what monitoring says about it.

The experiment of issue 4 ("What it must show", first bullet). Sixteen metal-oxide gas sensors
aged for 36 months without maintenance (``../shared/data/gas-sensor-drift``, see its SOURCE.md):
the same gas gives different responses in later batches. We

1. train models with the project's reference trainer (``fleet-collector train``, a subprocess) on
   batches 1-2, one per training seed (default 5), each a signed bundle with its calibration and
   reference profile;
2. start a private Mosquitto (production configuration) and ``fleet-collector serve`` on SQLite with
   the bundles as its monitoring references (``FLEET_MONITORING_BUNDLES``), windows of
   ``--window-s`` seconds;
3. per seed, one device (``gas-array-s<seed>``, its own state folder and spool) runs
   ``edge-agent replay`` over the phases in time order: first the held-out rows of batches 1-2
   (the trainer's own validation + test split of that seed: the reference period), then batches
   3, 4, 5, 6, 8 and 9, each a separate replay of a CSV with the features and the ``gas`` label
   column. Every record thus gets the agent's inference (prediction, calibrated confidence, rare
   co-activation count, activations), goes through the spool, MQTT and the collector's ingest, and
   is sketched into the per-window monitoring histograms in the transaction that stores it.
   Phases are separated in time (the next starts more than a window after the previous one was
   acknowledged), so each phase is the time range of its own windows, as an operator would query;
4. per seed and phase, merges the phase's windows from ``monitoring_window`` and evaluates them as the
   monitoring service does (its catalog and helpers, default thresholds), i.e. with the pure
   functions: realized accuracy (labels arrived with the records), the CBPE estimate with its
   Poisson-binomial interval (normal approximation: merged windows keep only ``n, sum p,
   sum p(1-p)``), the in-reference-region verdict, the drift report (features, class mix,
   confidence, PCA error, co-activations) and the rare co-activation rate;
5. runs NannyML's CBPE (peer environment ``.venv-peers``, a subprocess) on the very records the
   collector stored, for the same seeds and phases.

It prints the per-seed figures, the per-batch mean and range over seeds, whether the issue's two
targets hold, and ends with one JSON line. Targets (issue 4): wherever the estimate is marked
reliable it is within 8 accuracy points of the realized value; no batch whose realized accuracy
fell by more than 10 points (from the reference phase's realized accuracy) is shown as healthy, i.e.
either the estimate shows a fall of more than 10 points too, or drift is flagged and the estimate
is marked unreliable.

``--quick`` (the test's mode): one seed, a quarter of the training rows, 5 epochs, the reference
phase and batch 9 cut to its first 150 rows, no peers; about 20 s on an idle machine.

``--reuse DIR`` evaluates a kept work folder (``--workdir DIR`` or ``--keep``) again without training
or replaying.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import gzip
import json
import logging
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository importable

from benchmarks.common import (
    REPO,
    Collector,
    ServiceUnavailable,
    emit,
    machine,
    private_broker,
    setup_logging,
    table,
    venv_bin,
)

log = logging.getLogger("benchmarks.gas_drift")

DATA = REPO.parent / "shared" / "data" / "gas-sensor-drift" / "gas_drift_raw_batches_1-6_8_9.csv.gz"
TRAIN_BATCHES = (1, 2)
REPLAY_BATCHES = (3, 4, 5, 6, 8, 9)
LABEL = "gas"
N_FEATURES = 128
MODEL_NAME = "gas-drift"
SIGNING_KEY = REPO / "collector" / "training" / "dev-release-key.pem"
TRUSTED_KEY = REPO / "edge_agent" / "keys" / "dev-release.pub"
PEER_PYTHON = REPO / ".venv-peers" / "bin" / "python"
PEER_SCRIPT = Path(__file__).resolve().parent / "gas_drift_nannyml.py"
REFERENCE_PHASE = "ref"

TOLERANCE = 0.08
"""Target 1: a reliable estimate is within this many accuracy points (as a fraction) of the realized one."""
FALL = 0.10
"""Target 2: a fall of more than this from the reference phase must never look healthy."""

QUICK_ROWS = 150
QUICK_BATCHES = (9,)
QUICK_TRAIN_STRIDE = 4
QUICK_EPOCHS = 5


# ----------------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class GasData:
    """The raw CSV as text cells (written out again unchanged), with each row's batch."""

    columns: list[str]  # the label column, then f1..f128
    rows: list[list[str]]
    batch: np.ndarray  # int [n]

    def write(self, path: Path, index: np.ndarray | Sequence[int]) -> int:
        """Write the rows ``index`` (in that order) as a CSV with the label and feature columns."""
        idx = [int(i) for i in index]
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(self.columns)
            writer.writerows(self.rows[i] for i in idx)
        return len(idx)

    def of_batches(self, batches: Sequence[int]) -> np.ndarray:
        """Row indexes of ``batches``, in file (time) order."""
        return np.flatnonzero(np.isin(self.batch, np.asarray(batches)))


def load_data(path: Path) -> GasData:
    """Read the gas-drift CSV (gzip); keep the label and the 128 features as the original text."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the gas sensor drift data is not there (see the issue for its location)")
    features = [f"f{k}" for k in range(1, N_FEATURES + 1)]
    with gzip.open(path, "rt", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        missing = [c for c in ("batch", LABEL, *features) if c not in header]
        if missing:
            raise ValueError(f"{path}: missing columns {missing[:5]}")
        pick = [header.index(c) for c in (LABEL, *features)]
        at_batch = header.index("batch")
        rows, batch = [], []
        for cells in reader:
            rows.append([cells[i] for i in pick])
            batch.append(int(cells[at_batch]))
    return GasData([LABEL, *features], rows, np.asarray(batch, dtype=np.int64))


def held_out_rows(train_csv: Path, seed: int) -> np.ndarray:
    """Rows of ``train_csv`` the trainer kept out of training for ``seed`` (validation + test), in file order.

    The trainer's own loader and split, so these are exactly the records its calibration and
    reference score histograms were measured on.
    """
    from collector.training.labelled import load_labelled_csv, stratified_split

    table_ = load_labelled_csv(train_csv, label_column=LABEL)
    if table_.n_dropped:
        raise ValueError(f"{train_csv}: the trainer drops {table_.n_dropped} rows; row numbers would not match")
    _, val, test = stratified_split(table_.y, seed=seed)
    return np.sort(np.concatenate([val, test]))


# --------------------------------------------------------------------------------- training


def train(seed: int, csv_path: Path, out: Path, *, epochs: int | None) -> dict[str, Any]:
    """``fleet-collector train`` for one seed; its ``--json`` summary."""
    cmd = [
        venv_bin("fleet-collector"),
        "train",
        "--csv",
        str(csv_path),
        "--label-column",
        LABEL,
        "--signing-key",
        str(SIGNING_KEY),
        "--out",
        str(out),
        "--name",
        MODEL_NAME,
        "--version",
        f"1.0.0+seed{seed}",
        "--seed",
        str(seed),
        "--json",
    ]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode == 2:
        raise ServiceUnavailable(f"TensorFlow (the train extra) is missing: {proc.stderr.strip()[-300:]}")
    if proc.returncode != 0:
        raise RuntimeError(f"training seed {seed} failed: {proc.stderr.strip()[-2000:]}")
    summary: dict[str, Any] = json.loads(proc.stdout)
    return summary


# --------------------------------------------------------------------------------- replaying


@dataclass
class Phase:
    """One replayed CSV and the time range its records were inferred in."""

    name: str  # "ref" or the batch number
    csv: Path
    rows: int
    started: float = 0.0
    ended: float = 0.0
    seconds: float = 0.0


@dataclass
class Device:
    """One seed's agent: its bundle, configuration and phases in replay order."""

    seed: int
    device_id: str
    bundle: Path
    version: str
    config: Path
    phases: list[Phase] = field(default_factory=list)


def write_agent_config(path: Path, *, device_id: str, bundle: Path, mqtt_url: str, state_dir: Path) -> None:
    """An agent YAML: the seed's bundle, the dev key, the private broker, a short batch age for prompt acks."""
    import yaml

    doc = {
        "device": {"id": device_id, "profile": "gas-array"},
        "mqtt": {"url": mqtt_url, "protocol": "5"},
        "model": {"bundle": str(bundle), "trusted_keys": [str(TRUSTED_KEY)]},
        # A replay ends by waiting for every ack; the default 60 s batch age would hold the last partial batch.
        "uplink": {"batch_max_age_s": 0.2},
        "state_dir": str(state_dir),
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def replay_device(device: Device, *, window_s: float, logs: Path) -> None:
    """``edge-agent replay`` of each phase in order; between phases wait until a new window has begun."""
    for k, phase in enumerate(device.phases):
        if k:
            # Every record of the previous phase is acknowledged, so stored: start this one more than a
            # window later, so that no window holds records of two phases.
            time.sleep(window_s * 1.2)
        phase.started = time.time()
        t0 = time.perf_counter()
        with (logs / f"{device.device_id}-{phase.name}.log").open("wb") as out:
            proc = subprocess.run(
                [
                    venv_bin("edge-agent"),
                    "--log-level",
                    "WARNING",
                    "replay",
                    "--config",
                    str(device.config),
                    "--csv",
                    str(phase.csv),
                    "--label-column",
                    LABEL,
                    "--progress-interval",
                    "3600",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        phase.seconds = time.perf_counter() - t0
        phase.ended = time.time()
        if proc.returncode != 0:
            tail = (logs / f"{device.device_id}-{phase.name}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"edge-agent replay of {device.device_id} phase {phase.name} failed: {tail}")
        log.info(
            "%s phase %s: %d rows replayed and acknowledged in %.1f s",
            device.device_id,
            phase.name,
            phase.rows,
            phase.seconds,
        )


# ----------------------------------------------------------------------------- reading back


def phase_windows(engine: Any, device: Device, phase: Phase, window_s: float) -> list[Any]:
    """The stored window sketches of ``device`` whose start lies in the phase's time range."""
    import sqlalchemy as sa

    from collector.monitoring.sketches import WindowSketch
    from collector.monitoring.windows import WINDOW_TABLE

    c = WINDOW_TABLE.c
    since = math.floor(phase.started / window_s) * window_s
    stmt = (
        sa.select(c.window_start, c.n, c.sketch)
        .where(
            c.device_id == device.device_id,
            c.model_name == MODEL_NAME,
            c.model_version == device.version,
            c.window_s == window_s,
            c.window_start >= since,
            c.window_start <= phase.ended,
        )
        .order_by(c.window_start)
    )
    with engine.connect() as conn:
        return [WindowSketch.from_bytes(bytes(row.sketch)) for row in conn.execute(stmt)]


def phase_records(engine: Any, device: Device, phase: Phase, n_classes: int) -> dict[str, np.ndarray]:
    """The stored records of the phase (seq order): probabilities as sent (float16), prediction, label."""
    import sqlalchemy as sa

    from collector.db.models import Inference

    t = Inference.__table__  # type: ignore[attr-defined]
    stmt = (
        sa.select(t.c.probs, t.c.pred, t.c.label)
        .where(t.c.device_id == device.device_id, t.c.ts_corrected >= phase.started, t.c.ts_corrected <= phase.ended)
        .order_by(t.c.spool_epoch, t.c.seq)
    )
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    probs = np.frombuffer(b"".join(bytes(r.probs) for r in rows), dtype="<f2").reshape(len(rows), n_classes)
    return {
        "probs": probs.astype(np.float64),
        "pred": np.asarray([r.pred for r in rows], dtype=np.int64),
        "label": np.asarray([-1 if r.label is None else r.label for r in rows], dtype=np.int64),
    }


# ------------------------------------------------------------------------------- evaluation


@dataclass
class Cell:
    """What monitoring says about one seed's phase, and what was true."""

    seed: int
    phase: str
    n: int
    windows: int
    realized: float
    realized_low: float | None
    realized_high: float | None
    estimate: float
    low: float | None
    high: float | None
    interval_method: str
    region: str
    region_reason: str | None
    marked_reliable: bool
    unreliable_reasons: list[str]
    pca_rate: float | None
    coact_rate: float | None
    drift: str
    drift_reasons: list[str]
    features_drifting: int
    features_tested: int
    max_psi: float
    class_mix: str
    confidence: str
    pca_error: str
    coactivation: str
    coact_mean: float
    coact_above_p99: float
    pca_above_p99: float
    t2_above_p99: float | None = None
    """Diagnostic, no collector signal: share of records whose Hotelling T^2 in the PCA subspace is above its p99."""
    realized_fall: float = 0.0
    estimated_fall: float = 0.0
    healthy: bool = False
    nannyml: dict[str, Any] | None = None

    @property
    def reliable(self) -> bool:
        """The estimate is marked reliable (inside the reference region, inputs not drifted wholesale)."""
        return self.marked_reliable

    @property
    def error(self) -> float:
        """Estimated minus realized accuracy."""
        return self.estimate - self.realized


def evaluate_phase(seed: int, phase: str, sketches: list[Any], entry: Any) -> Cell:
    """Every figure of one phase from its merged window sketch, as the monitoring service computes them.

    ``entry`` is the phase's :class:`~collector.monitoring.catalog.CatalogEntry`; the service's own
    helpers turn the merged sketch into the label-free accuracy with its region verdict and into the
    drift report, with the default thresholds of the pure functions (``StatusThresholds()``).
    """
    from collector.monitoring.drift import evaluate_windows
    from collector.monitoring.service import StatusThresholds, accuracy_status
    from collector.monitoring.sketches import merge_all, window_counts

    thr = StatusThresholds()
    s = merge_all(sketches)
    report = evaluate_windows(entry.reference, window_counts(entry.bins, s), thr.drift)
    status = accuracy_status(entry, s, thr, drift=report)
    est, region, real = status.expected, status.region, status.realized
    # n > 0 and every record labelled: checked by the caller.
    assert est.estimate is not None and real is not None and real.estimate is not None
    return Cell(
        seed=seed,
        phase=phase,
        n=s.n,
        windows=len(sketches),
        realized=real.estimate,
        realized_low=real.low,
        realized_high=real.high,
        estimate=est.estimate,
        low=est.low,
        high=est.high,
        interval_method=est.method,
        region=region.verdict,
        region_reason=region.reason,
        marked_reliable=status.reliable,
        unreliable_reasons=list(status.unreliable_reasons),
        pca_rate=region.pca_rate,
        coact_rate=region.coact_rate,
        drift=report.verdict,
        # "major PSI on f1, f2, ..., f128" is the same long list in every drifted batch: keep its start.
        drift_reasons=[r if len(r) <= 100 else r[:97] + "..." for r in report.reasons],
        features_drifting=report.n_drifting,
        features_tested=report.n_tested,
        max_psi=report.max_psi,
        class_mix=report.class_mix.verdict,
        confidence=report.confidence.verdict,
        pca_error=report.pca_error.verdict,
        coactivation=report.coactivation.verdict,
        coact_mean=s.coact_sum / s.n,
        coact_above_p99=s.coact_exceed / s.n,
        pca_above_p99=s.pca_exceed / s.n,
    )


def judge(cells: list[Cell]) -> None:
    """Falls from the seed's reference phase, and whether each phase would look healthy to an operator.

    Healthy: the estimate shows no fall of more than ``FALL`` and not (drift flagged and estimate
    marked unreliable), the issue's definition.
    """
    by_seed: dict[int, Cell] = {c.seed: c for c in cells if c.phase == REFERENCE_PHASE}
    for c in cells:
        base = by_seed[c.seed].realized
        c.realized_fall = base - c.realized
        c.estimated_fall = base - c.estimate
        warned = c.estimated_fall > FALL or (c.drift == "drift" and not c.reliable)
        c.healthy = not warned


@dataclass
class Targets:
    """The issue's two targets over every (seed, batch) cell."""

    reliable_cells: int
    reliable_within: int
    worst_reliable_error: float | None
    fallen_cells: int
    fallen_shown_healthy: int
    nannyml_fallen_without_alert: int | None
    """For comparison: fallen cells on which NannyML's CBPE raised no alert (None: peer not run)."""

    @property
    def within_8_points(self) -> bool:
        """Target 1."""
        return self.reliable_within == self.reliable_cells

    @property
    def no_fall_healthy(self) -> bool:
        """Target 2."""
        return self.fallen_shown_healthy == 0


def check_targets(cells: list[Cell]) -> Targets:
    """Count the cells behind both targets (the replayed batches only, not the reference phase)."""
    batches = [c for c in cells if c.phase != REFERENCE_PHASE]
    reliable = [c for c in batches if c.reliable]
    fallen = [c for c in batches if c.realized_fall > FALL]
    return Targets(
        reliable_cells=len(reliable),
        reliable_within=sum(abs(c.error) <= TOLERANCE for c in reliable),
        worst_reliable_error=max((abs(c.error) for c in reliable), default=None),
        fallen_cells=len(fallen),
        fallen_shown_healthy=sum(c.healthy for c in fallen),
        nannyml_fallen_without_alert=(
            None if any(c.nannyml is None for c in fallen) else sum(not (c.nannyml or {}).get("alert") for c in fallen)
        ),
    )


# ---------------------------------------------------------------------------- a diagnostic


def subspace_t2(work: Path, devices: list[Device]) -> dict[tuple[int, str], float]:
    """Share of each phase's records above the held-out p99 of Hotelling's T^2 on the bundle's PCA scores.

    Not a collector signal: it asks whether a phase the in-region test calls reliable is inside the
    reference region by the other classic PCA monitoring statistic too. The reconstruction error is
    the distance *from* the PCA subspace (Q, or SPE, in multivariate process monitoring); T^2 is the
    distance *within* it, scaled by each component's training variance (Jackson & Mudholkar 1979;
    MacGregor & Kourti 1995). Inputs that stay near the subspace but move far along it raise only T^2.
    """
    from collector.training.labelled import load_labelled_csv, stratified_split
    from collector.training.trainer import normalise
    from shared.bundle import load_bundle
    from shared.signing import load_public_keys

    table_ = load_labelled_csv(work / "train_batches_1-2.csv", label_column=LABEL)
    keys = load_public_keys([TRUSTED_KEY])
    phase_x = {p.name: _features(p.csv, table_.feature_names) for p in devices[0].phases if p.name != REFERENCE_PHASE}
    out: dict[tuple[int, str], float] = {}
    for d in devices:
        m = load_bundle(d.bundle, keys, check_tensors=False).manifest
        mean = np.asarray(m.normalisation.mean, np.float32)
        std = np.asarray(m.normalisation.std, np.float32)
        components = np.asarray(m.reference.pca.components, dtype=np.float64)
        train_rows, val, test = stratified_split(table_.y, seed=d.seed)
        z = normalise(table_.x, mean, std).astype(np.float64)
        variance = (z[train_rows] @ components.T).var(axis=0)

        def t2(zz: np.ndarray, components: np.ndarray = components, variance: np.ndarray = variance) -> np.ndarray:
            return np.asarray((((zz @ components.T) ** 2) / variance).sum(axis=1))

        held = t2(z[np.concatenate([val, test])])
        p99 = float(np.quantile(held, 0.99))
        out[(d.seed, REFERENCE_PHASE)] = float((held > p99).mean())
        for name, x in phase_x.items():
            out[(d.seed, name)] = float((t2(normalise(x, mean, std).astype(np.float64)) > p99).mean())
    return out


def _features(path: Path, names: Sequence[str]) -> np.ndarray:
    """The named columns of a phase CSV as float64 (any class mix: no training-set checks)."""
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        cols = [header.index(n) for n in names]
        return np.asarray([[float(row[i]) for i in cols] for row in reader], dtype=np.float64)


# --------------------------------------------------------------------------------- the peer


def run_nannyml(npz: Path) -> dict[str, Any]:
    """NannyML's CBPE in the peer environment (a subprocess); its JSON."""
    if not PEER_PYTHON.exists():
        raise ServiceUnavailable(f"{PEER_PYTHON} missing: create it with benchmarks/peers/setup.sh")
    proc = subprocess.run(
        [str(PEER_PYTHON), str(PEER_SCRIPT), str(npz)], capture_output=True, text=True, check=False, timeout=900
    )
    if proc.returncode != 0:
        raise RuntimeError(f"NannyML peer failed: {proc.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# ------------------------------------------------------------------------------------ output


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _span(values: Sequence[float]) -> str:
    """Mean and range in accuracy points: ``77.6 (77.0-79.5)``."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 1:
        return f"{100 * v[0]:.1f}"
    return f"{100 * v.mean():.1f} ({100 * v.min():.1f}-{100 * v.max():.1f})"


def _count(flags: Sequence[bool]) -> str:
    return f"{sum(flags)}/{len(flags)}"


def per_seed_table(cells: list[Cell]) -> str:
    """Every cell."""
    rows = []
    for c in cells:
        nm = c.nannyml or {}
        rows.append(
            [
                c.seed,
                c.phase,
                c.n,
                _pct(c.realized),
                f"{_pct(c.estimate)} [{_pct(c.low)}, {_pct(c.high)}]",
                c.region,
                c.drift,
                f"{c.features_drifting}/{c.features_tested}",
                c.class_mix,
                c.confidence,
                c.pca_error,
                c.coactivation,
                f"{c.coact_mean:.2f}",
                _pct(c.coact_above_p99),
                _pct(c.t2_above_p99),
                "-" if not nm else f"{_pct(nm.get('estimate'))}{' alert' if nm.get('alert') else ''}",
                "yes" if c.healthy else "no",
            ]
        )
    return table(
        [
            "seed",
            "phase",
            "n",
            "realized",
            "estimated [95% PI]",
            "region",
            "drift",
            "features",
            "class mix",
            "confidence",
            "PCA err",
            "co-act",
            "co-act mean",
            "co-act >p99 %",
            "T2 >p99 %",
            "NannyML",
            "healthy",
        ],
        rows,
    )


def summary_rows(cells: list[Cell], phases: Sequence[str]) -> list[dict[str, Any]]:
    """Per phase: mean and range over seeds of every figure, and counts of verdicts."""
    out = []
    for phase in phases:
        cs = [c for c in cells if c.phase == phase]
        nm = [c.nannyml for c in cs if c.nannyml is not None]
        out.append(
            {
                "phase": phase,
                "n": cs[0].n,
                "seeds": len(cs),
                "realized": _stats([c.realized for c in cs]),
                "estimate": _stats([c.estimate for c in cs]),
                "low": _stats([c.low for c in cs if c.low is not None]),
                "high": _stats([c.high for c in cs if c.high is not None]),
                "error": _stats([c.error for c in cs]),
                "realized_fall": _stats([c.realized_fall for c in cs]),
                "reliable": sum(c.reliable for c in cs),
                "drift": sum(c.drift == "drift" for c in cs),
                "features_drifting": _stats([c.features_drifting for c in cs]),
                "class_mix_drift": sum(c.class_mix == "drift" for c in cs),
                "confidence_drift": sum(c.confidence == "drift" for c in cs),
                "pca_error_drift": sum(c.pca_error == "drift" for c in cs),
                "coactivation_drift": sum(c.coactivation == "drift" for c in cs),
                "coact_mean": _stats([c.coact_mean for c in cs]),
                "coact_above_p99": _stats([c.coact_above_p99 for c in cs]),
                "t2_above_p99": _stats([c.t2_above_p99 for c in cs if c.t2_above_p99 is not None]),
                "healthy": sum(c.healthy for c in cs),
                "nannyml_estimate": _stats([float(m["estimate"]) for m in nm if m.get("estimate") is not None]),
                "nannyml_low": _stats([float(m["low"]) for m in nm if m.get("low") is not None]),
                "nannyml_high": _stats([float(m["high"]) for m in nm if m.get("high") is not None]),
                "nannyml_alerts": sum(bool(m.get("alert")) for m in nm),
                "nannyml_error": _stats(
                    [float(m["estimate"]) - c.realized for c, m in zip(cs, nm, strict=False) if m.get("estimate")]
                ),
            }
        )
    return out


def _stats(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}


def summary_table(cells: list[Cell], phases: Sequence[str]) -> str:
    """Per batch: mean (range) over seeds, in accuracy points."""
    rows = []
    for phase in phases:
        cs = [c for c in cells if c.phase == phase]
        nm = [c.nannyml for c in cs if c.nannyml]
        rows.append(
            [
                phase,
                cs[0].n,
                _span([c.realized for c in cs]),
                _span([c.estimate for c in cs]),
                f"[{_span([c.low or 0.0 for c in cs])}, {_span([c.high or 0.0 for c in cs])}]",
                _count([c.reliable for c in cs]),
                _count([c.drift == "drift" for c in cs]),
                f"{np.mean([c.features_drifting for c in cs]):.0f}/{cs[0].features_tested}",
                _count([c.class_mix == "drift" for c in cs]),
                _count([c.confidence == "drift" for c in cs]),
                _count([c.pca_error == "drift" for c in cs]),
                _count([c.coactivation == "drift" for c in cs]),
                _span([c.coact_above_p99 for c in cs]),
                _span([c.t2_above_p99 for c in cs if c.t2_above_p99 is not None] or [math.nan]),
                "-" if not nm else _span([float(m["estimate"]) for m in nm]),
                "-" if not nm else _count([bool(m.get("alert")) for m in nm]),
                _count([c.healthy for c in cs]),
            ]
        )
    return table(
        [
            "batch",
            "n",
            "realized",
            "estimated",
            "95% interval",
            "reliable",
            "drift",
            "features drifting",
            "class mix",
            "confidence",
            "PCA err",
            "co-act",
            "co-act >p99 %",
            "T2 >p99 %",
            "NannyML CBPE",
            "NannyML alerts",
            "healthy",
        ],
        rows,
    )


# -------------------------------------------------------------------------------------- run


@contextlib.contextmanager
def _workdir(path: Path | None, keep: bool) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    folder = Path(tempfile.mkdtemp(prefix="gas-drift-"))
    try:
        yield folder
    finally:
        if keep:
            log.info("kept %s", folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Replayed:
    """What training and replaying left behind: enough to evaluate again later (``--reuse``)."""

    window_s: float
    phases: list[str]
    trained: dict[int, dict[str, Any]]
    devices: list[Device]
    timings: dict[str, float]

    def save(self, path: Path) -> None:
        """Write as JSON (paths as text)."""
        doc = asdict(self)
        path.write_text(json.dumps(doc, indent=1, default=str))

    @classmethod
    def load(cls, path: Path) -> Replayed:
        """Read what :meth:`save` wrote."""
        doc = json.loads(path.read_text())
        devices = []
        for d in doc["devices"]:
            phases = [Phase(**{**p, "csv": Path(p["csv"])}) for p in d.pop("phases")]
            devices.append(Device(**{**d, "bundle": Path(d["bundle"]), "config": Path(d["config"]), "phases": phases}))
        trained = {int(k): v for k, v in doc["trained"].items()}
        return cls(doc["window_s"], doc["phases"], trained, devices, doc["timings"])


def train_and_replay(args: argparse.Namespace, work: Path) -> Replayed:
    """Write the CSVs, train every seed, start broker and collector, replay every device's phases."""
    seeds = list(range(args.seeds))
    batches = QUICK_BATCHES if args.quick else REPLAY_BATCHES
    data = load_data(args.data)
    timings: dict[str, float] = {}
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    # Training data: batches 1-2 (in quick mode every fourth row, still every class).
    train_idx = data.of_batches(TRAIN_BATCHES)
    if args.quick:
        train_idx = train_idx[::QUICK_TRAIN_STRIDE]
    train_csv = work / "train_batches_1-2.csv"
    data.write(train_csv, train_idx)
    batch_csv: dict[str, tuple[Path, int]] = {}
    for b in batches:
        idx = data.of_batches([b])
        if args.quick:
            idx = idx[:QUICK_ROWS]
        path = work / f"batch_{b}.csv"
        batch_csv[str(b)] = (path, data.write(path, idx))

    t0 = time.perf_counter()
    trained: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        trained[seed] = train(seed, train_csv, work / f"gas-seed{seed}.tar", epochs=args.epochs)
        m = trained[seed]["metrics"]
        log.info(
            "seed %d: test accuracy %.3f, T %.3f, %d PCA components, %d rare pairs, %d epochs",
            seed,
            m["test_accuracy"],
            m["temperature"],
            m["pca_components"],
            m["rare_pairs"],
            m["epochs"],
        )
    timings["train_s"] = time.perf_counter() - t0

    devices = []
    for seed in seeds:
        # The reference phase: the rows this seed's trainer held out, so never trained on.
        held = train_idx[held_out_rows(train_csv, seed)]
        ref_csv = work / f"reference_seed{seed}.csv"
        device = Device(
            seed=seed,
            device_id=f"gas-array-s{seed}",
            bundle=work / f"gas-seed{seed}.tar",
            version=str(trained[seed]["version"]),
            config=work / f"agent-seed{seed}.yaml",
        )
        device.phases = [Phase(REFERENCE_PHASE, ref_csv, data.write(ref_csv, held))] + [
            Phase(str(b), *batch_csv[str(b)]) for b in batches
        ]
        devices.append(device)

    with private_broker(work) as broker:
        collector = Collector(
            database_url=f"sqlite:///{work / 'collector.db'}",
            mqtt_url=broker.url,
            data_dir=work / "collector",
            log_path=logs / "collector.log",
            extra_env={
                "FLEET_MONITORING_BUNDLES": json.dumps([str(d.bundle) for d in devices]),
                "FLEET_MONITORING_TRUSTED_KEYS": json.dumps([str(TRUSTED_KEY)]),
                "FLEET_MONITORING_WINDOW_S": str(args.window_s),
            },
        )
        collector.start()
        try:
            for d in devices:
                write_agent_config(
                    d.config, device_id=d.device_id, bundle=d.bundle, mqtt_url=broker.url, state_dir=work / d.device_id
                )
            t0 = time.perf_counter()
            # Devices replay side by side (--jobs at a time), each its phases strictly in order.
            with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
                futures = [pool.submit(replay_device, d, window_s=args.window_s, logs=logs) for d in devices]
                for future in futures:
                    future.result()
            timings["replay_s"] = time.perf_counter() - t0
        finally:
            collector.stop()
    replayed = Replayed(args.window_s, [REFERENCE_PHASE, *(str(b) for b in batches)], trained, devices, timings)
    replayed.save(work / "replayed.json")
    return replayed


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole experiment (or, with ``--reuse``, its evaluation only); returns the JSON result."""
    started = time.perf_counter()
    with _workdir(args.reuse or args.workdir, args.keep or args.reuse is not None) as work:
        replayed = Replayed.load(work / "replayed.json") if args.reuse else train_and_replay(args, work)
        devices, phases, trained = replayed.devices, replayed.phases, replayed.trained
        seeds = [d.seed for d in devices]
        timings = dict(replayed.timings)
        t0 = time.perf_counter()
        cells, records = collect(devices, work / "collector.db", replayed.window_s)
        timings["evaluate_s"] = time.perf_counter() - t0
        for (seed, phase), rate in subspace_t2(work, devices).items():
            next(c for c in cells if c.seed == seed and c.phase == phase).t2_above_p99 = rate
        nannyml: dict[str, Any] | None = None
        if not args.no_peers:
            t0 = time.perf_counter()
            npz = work / "records.npz"
            export_records(npz, records, seeds, phases, classes=list(trained[seeds[0]]["labels"]))
            try:
                nannyml = run_nannyml(npz)
            except ServiceUnavailable as exc:
                log.warning("NannyML peer skipped: %s", exc)
            timings["nannyml_s"] = time.perf_counter() - t0
            if nannyml is not None:
                for c in cells:
                    c.nannyml = nannyml["seeds"][str(c.seed)][c.phase]
    judge(cells)
    targets = check_targets(cells)
    timings["total_s"] = time.perf_counter() - started

    print(
        f"Gas sensor drift: {len(seeds)} seed(s), phases {', '.join(phases)} (real path: edge-agent replay -> "
        f"Mosquitto -> fleet-collector on SQLite, windows of {replayed.window_s:g} s)"
    )
    print()
    print("Per seed and phase (accuracy in points; 'ref' = held-out rows of batches 1-2):")
    print(per_seed_table(cells))
    print()
    print("Per batch, mean (range) over seeds:")
    print(summary_table(cells, phases))
    print()
    print(
        f"Target 1 (reliable estimate within {100 * TOLERANCE:.0f} points): "
        f"{targets.reliable_within}/{targets.reliable_cells} reliable cells within; worst "
        f"{_pct(targets.worst_reliable_error)} points -> {'met' if targets.within_8_points else 'NOT met'}"
    )
    print(
        f"Target 2 (no fall > {100 * FALL:.0f} points shown healthy): {targets.fallen_shown_healthy} of "
        f"{targets.fallen_cells} fallen cells shown healthy -> {'met' if targets.no_fall_healthy else 'NOT met'}"
    )
    if targets.nannyml_fallen_without_alert is not None:
        print(
            f"NannyML CBPE alone: {targets.nannyml_fallen_without_alert} of {targets.fallen_cells} fallen cells "
            "raised no alert"
        )
    print(f"Times (s): {', '.join(f'{k} {v:.1f}' for k, v in timings.items())}")
    return {
        "benchmark": "gas_drift",
        "quick": bool(args.quick),
        "seeds": len(seeds),
        "phases": phases,
        "path": "edge-agent replay -> mosquitto -> fleet-collector serve (sqlite) -> monitoring_window",
        "window_s": replayed.window_s,
        "training": {str(s): trained[s]["metrics"] for s in seeds},
        "target_within_8_points": targets.within_8_points,
        "target_no_fall_shown_healthy": targets.no_fall_healthy,
        "targets": asdict(targets),
        "summary": summary_rows(cells, phases),
        "cells": [asdict(c) for c in cells],
        "nannyml_version": None if nannyml is None else nannyml["nannyml_version"],
        "timings": timings,
        "machine": machine(),
    }


def collect(
    devices: list[Device], db_path: Path, window_s: float
) -> tuple[list[Cell], dict[tuple[int, str], dict[str, np.ndarray]]]:
    """Evaluate every phase from the stored windows; the stored records for the peer."""
    import sqlalchemy as sa

    from collector.monitoring.catalog import ReferenceCatalog

    engine = sa.create_engine(f"sqlite:///{db_path}")
    # The collector's own catalog of verified reference bundles, built as `serve` builds it.
    catalog = ReferenceCatalog.from_paths([d.bundle for d in devices], [TRUSTED_KEY])
    cells: list[Cell] = []
    records: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    try:
        for d in devices:
            entry = catalog.get(MODEL_NAME, d.version)
            if entry is None:
                raise RuntimeError(f"{d.bundle} did not load into the reference catalog")
            for phase in d.phases:
                sketches = phase_windows(engine, d, phase, window_s)
                cell = evaluate_phase(d.seed, phase.name, sketches, entry)
                # Exactly once: every replayed row is in the phase's windows, each once, with its label.
                if cell.n != phase.rows:
                    raise RuntimeError(
                        f"{d.device_id} phase {phase.name}: {cell.n} records in its windows, {phase.rows} replayed"
                    )
                cells.append(cell)
                rec = phase_records(engine, d, phase, len(entry.labels))
                if rec["pred"].size != phase.rows or (rec["label"] < 0).any():
                    raise RuntimeError(f"{d.device_id} phase {phase.name}: {rec['pred'].size} labelled records stored")
                records[(d.seed, phase.name)] = rec
    finally:
        engine.dispose()
    return cells, records


def export_records(
    path: Path,
    records: dict[tuple[int, str], dict[str, np.ndarray]],
    seeds: list[int],
    phases: list[str],
    *,
    classes: list[str],
) -> None:
    """The stored records in the layout ``gas_drift_nannyml.py`` reads."""
    arrays: dict[str, np.ndarray] = {
        "classes": np.asarray(classes),
        "index": np.asarray(json.dumps({"seeds": seeds, "phases": phases})),
    }
    for (seed, phase), rec in records.items():
        arrays[f"s{seed}_{phase}_probs"] = rec["probs"]
        arrays[f"s{seed}_{phase}_pred"] = rec["pred"]
        if phase == REFERENCE_PHASE:
            arrays[f"s{seed}_{phase}_label"] = rec["label"]
    np.savez(path, **arrays)


def main(argv: list[str] | None = None) -> int:
    """Parse options, run, print the account and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=None, help="training seeds 0..N-1 (default 5; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny subset, one seed, no peers (the test's mode)")
    parser.add_argument("--epochs", type=int, default=None, help="maximum training epochs (default: the trainer's)")
    parser.add_argument("--window-s", type=float, default=None, help="monitoring window in seconds (default 1)")
    parser.add_argument("--jobs", type=int, default=2, help="devices replaying at the same time (default 2)")
    parser.add_argument("--no-peers", action="store_true", help="skip NannyML")
    parser.add_argument("--data", type=Path, default=DATA, help="the gas-drift CSV (gzip)")
    parser.add_argument("--workdir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--reuse", type=Path, default=None, help="evaluate a kept work folder again (no replay)")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = 1 if args.quick else 5
    if args.quick:
        args.no_peers = True
        args.epochs = args.epochs or QUICK_EPOCHS
    if args.window_s is None:
        args.window_s = 1.0  # the shortest the collector allows: phases are separated by a window's wait
    if args.seeds < 1 or args.window_s < 1:
        parser.error("--seeds must be >= 1 and --window-s >= 1")
    setup_logging()
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its plugin set-up chatter on import
    try:
        result = run(args)
    except ServiceUnavailable as exc:
        log.error("cannot run: %s", exc)
        return 2
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
