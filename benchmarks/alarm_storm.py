"""No alarm storm, and ageing drift caught: a simulated fleet through the real monitoring, in simulated time.

Issue 4 asks that stationary simulated traffic across 100 devices for 24 simulated hours gives at
most one alert per 10 device-days, and that a scripted sensor-ageing drift on one group is alerted
within two windows of its onset. Real time is out of the question (24 hours), so the whole day runs
in simulated time, in one process, through the same code a deployed fleet goes through:

1. **Traffic.** Every vehicle is the agent's :class:`~edge_agent.sensors.simulated.SimulatedCabin`
   (its own seed and a random phase in the scenario's loop) and the agent's
   :class:`~shared.features.FeaturePipeline`. The cabin produces 100 ms windows, the window the
   reference model was trained on (``collector/training/regenerate.py``: 10 windows/s), and the
   vehicle infers on one such window every ``1 / rate`` seconds, skipping the audio in between
   (:meth:`SimulatedCabin.advance`: the cabin air is still simulated). A lower rate would otherwise
   mean longer audio windows, i.e. features the model never saw. This is the expensive part (about
   0.8 ms of numpy per record), so it runs in ``--workers`` processes, one vehicle per task.
2. **Inference.** The agent's real :class:`~edge_agent.inference.Engine` on the committed, verified
   bundle ``edge_agent/bundles/cabin-v1.tar``: calibrated confidence, activations, rare co-activations.
3. **Wire and ingest.** Every ``--batch-s`` simulated seconds each vehicle sends a batch encoded by
   :func:`shared.codec.encode_batch`; the collector decodes it (:func:`collector.ingest.service.prepare`)
   and writes it with the ingest's own transaction (records, per-window sketches, data quality,
   sequential detectors), groups of up to ``ingest_max_batch_messages`` messages per transaction as
   the live service does. Vehicle clocks are synced; a batch arrives 50 ms after it was sent.
4. **Alerts.** At every window close plus ``alert_grace_s`` (simulated ``now``) the alert engine
   evaluates, as its scheduled job does, with ``alert_groups`` naming every group: the ageing one and
   stationary groups of the same size (so group-scope false alerts count too). Every alert it opens is
   counted (:func:`summarise` says how).
5. **Diagnosis** (``--no-diagnosis`` skips it): the drift tests again on every stored window against the
   committed reference and a representative one, and with effective sample sizes (:func:`diagnose`).

The committed bundle's monitoring reference is itself a set of independent simulated drives
(``collector/training/regenerate.py``), never the vehicles of this run.

What "stationary" means here: every vehicle runs the scenario the reference was built from
(``training``: normal driving with vaping, smoking, knocks and open windows in the reference's
proportions, varied intensities), looped, with no ageing: the process generating the data never
changes and is the process the model's reference describes. Events are real classes, not drift. The
``default`` (everyday) scenario is a different class mix from the reference (85 % normal driving
against 50 %): a monitor that flags it flags a genuine difference from the reference, not a false
alarm, so it is not the null case (``--scenario default`` runs it anyway).

The drifting group: ``--group-size`` vehicles tagged ``group:ageing`` whose sensors start ageing at
``--onset-h`` (a window boundary by default): the simulator's :class:`AgeingSegment` (gas sensor
baseline falling, temperature reading creeping up, microphone losing sensitivity), time-lapsed by
``--acceleration``. The delay is counted from the onset to the end of the window whose evaluation
first opened an alert on an ageing vehicle or on the group, in windows.

Results and what they mean: docs/MONITORING.md, "Experiment: no alarm storm, and ageing drift caught".
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import math
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine as DbEngine
from sqlalchemy.sql.schema import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository importable

from benchmarks.common import emit, machine, setup_logging, table, temporary_database
from collector.alerts import AlertEngine
from collector.config import Settings
from collector.db.engine import make_engine, upgrade
from collector.db.models import Alert, SequentialAlarm
from collector.ingest.service import Ingest, prepare
from collector.monitoring.catalog import CatalogEntry, ReferenceCatalog
from collector.monitoring.dependence import total_effective
from collector.monitoring.drift import DriftThresholds, WindowCounts, evaluate_family
from collector.monitoring.offline import reference_counts
from collector.monitoring.service import MonitoringService
from collector.monitoring.sketches import WindowSketch, window_counts
from collector.monitoring.windows import WINDOW_TABLE
from collector.mqtt import InboundMessage
from edge_agent.dataset import DRIVE_SEED_STRIDE, drive, drive_phase
from edge_agent.inference import Engine, InferenceColumns
from edge_agent.sensors.simulated import (
    SCENARIO_DIR,
    AgeingSegment,
    Scenario,
    load_scenario,
    parse_scenario,
)
from shared import messages, topics
from shared.bundle import load_bundle
from shared.codec import Batch, encode_batch
from shared.signing import load_public_keys

log = logging.getLogger("benchmarks.alarm_storm")

START_TS = 1_767_225_600.0  # 2026-01-01T00:00:00Z: simulated time starts here, on a window boundary
AUDIO_WINDOW_S = 0.1  # the reference model's window (10 windows per second in the training data)
GROUP = "ageing"
PROFILE = "sim-v1"  # firmware_configs/sim-v1.yaml: the simulated cabin's hardware profile
AGENT_VERSION = "0.0.0-sim"
LINK_DELAY_S = 0.05  # a batch reaches the collector this long after it was sent
REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "edge_agent" / "bundles" / "cabin-v1.tar"
TRUSTED_KEY = REPO / "edge_agent" / "keys" / "dev-release.pub"
SIMULATOR_SOURCE = REPO / "edge_agent" / "sensors" / "simulated.py"
FEATURES_SOURCE = REPO / "shared" / "features.py"
ALERT_TABLE: Table = Alert.__table__  # type: ignore[attr-defined]
SEQ_ALARM_TABLE: Table = SequentialAlarm.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Ageing:
    """The scripted sensor ageing of the drifting group (rates per hour of sensor life)."""

    onset_s: float
    """Seconds after the start of the run at which the sensors start to age."""
    gas_drift_pct_per_hour: float = -1.5
    temperature_offset_c_per_hour: float = 0.04
    mic_sensitivity_db_per_hour: float = -0.15
    acceleration: float = 30.0
    """Hours of sensor life per simulated hour (a time lapse: real ageing takes months)."""

    def at(self, seconds: float) -> dict[str, float]:
        """How far the sensors have aged ``seconds`` after the onset."""
        hours = max(seconds, 0.0) * self.acceleration / 3600.0
        return {
            "gas_resistance_factor": (1.0 + self.gas_drift_pct_per_hour / 100.0) ** hours,
            "temperature_offset_c": self.temperature_offset_c_per_hour * hours,
            "mic_sensitivity_db": self.mic_sensitivity_db_per_hour * hours,
        }


@dataclass(frozen=True)
class Plan:
    """What to simulate."""

    devices: int = 100
    """Stationary vehicles (the drifting group comes on top of them)."""
    hours: float = 24.0
    rate_hz: float = 0.125
    window_s: float = 900.0
    group_size: int = 10
    """Vehicles of the drifting group ``group:ageing`` (in addition to ``devices``)."""
    ageing: Ageing | None = field(default_factory=lambda: Ageing(onset_s=12 * 3600.0))
    scenario: str = "training"
    seed: int = 0
    batch_s: float = 300.0
    """A vehicle sends a batch this often (the agent's ``uplink.batch_max_age_s``, which allows up to an hour)."""
    start_ts: float = START_TS

    def __post_init__(self) -> None:
        if self.devices < 0 or self.group_size < 0 or self.devices + self.group_size < 1:
            raise ValueError("need at least one vehicle (devices and group size are >= 0)")
        if not (self.hours > 0 and self.rate_hz > 0 and self.window_s > 0 and self.batch_s > 0):
            raise ValueError("hours, rate, window and batch length must be positive")
        if self.rate_hz > 1.0 / AUDIO_WINDOW_S:
            raise ValueError(f"rate must be at most {1.0 / AUDIO_WINDOW_S:g} Hz (one {AUDIO_WINDOW_S} s window each)")

    @property
    def step_windows(self) -> int:
        """Audio windows from one inference to the next (the rate is rounded to a whole number of them)."""
        return max(1, round(1.0 / (self.rate_hz * AUDIO_WINDOW_S)))

    @property
    def period_s(self) -> float:
        """Seconds between two inferences of a vehicle."""
        return self.step_windows * AUDIO_WINDOW_S

    @property
    def records_per_device(self) -> int:
        """Inference records each vehicle produces."""
        return int(self.hours * 3600.0 / self.period_s)

    @property
    def vehicles(self) -> int:
        """Every simulated vehicle: the stationary ones and the drifting group."""
        return self.devices + (self.group_size if self.ageing is not None else 0)

    @property
    def onset_ts(self) -> float | None:
        """When the drifting group's sensors start to age (simulated epoch seconds)."""
        return None if self.ageing is None else self.start_ts + self.ageing.onset_s

    @property
    def duration_s(self) -> float:
        """Simulated seconds of the run."""
        return self.hours * 3600.0

    def device_id(self, number: int) -> str:
        """Vehicle ``number``'s id; the drifting group comes first."""
        return f"{'age' if self.ageing_device(number) else 'sim'}-{number:03d}"

    def group(self, number: int) -> str:
        """Vehicle ``number``'s group: the ageing one, or one of the stationary groups of the same size."""
        if self.ageing_device(number):
            return GROUP
        size = self.group_size or 10
        return f"stationary-{(number - (self.group_size if self.ageing else 0)) // size}"

    def ageing_device(self, number: int) -> bool:
        """Whether vehicle ``number`` belongs to the drifting group."""
        return self.ageing is not None and number < self.group_size


@dataclass
class Traffic:
    """One vehicle's feature vectors in simulated time, before inference."""

    number: int
    features: np.ndarray  # float32 [n, 40]
    flags: np.ndarray  # uint16 [n]
    ts: np.ndarray  # float64 [n], the end of each record's audio window
    truth: list[str]
    seconds: float  # CPU seconds the simulation took


def vehicle_scenario(plan: Plan, number: int, phase_s: float) -> Scenario:
    """The scenario of vehicle ``number``: the plan's, plus the ageing segment for the drifting group.

    The cabin's clock starts ``phase_s`` before the run, so the ageing onset is shifted by the same.
    """
    scenario = load_scenario(plan.scenario)
    if not plan.ageing_device(number):
        return scenario
    assert plan.ageing is not None
    a = plan.ageing
    doc = scenario.model_dump(mode="python")
    doc["timeline"].append(
        AgeingSegment(
            event="ageing",
            at=phase_s + a.onset_s,
            duration=None,
            gas_drift_pct_per_hour=a.gas_drift_pct_per_hour,
            temperature_offset_c_per_hour=a.temperature_offset_c_per_hour,
            mic_sensitivity_db_per_hour=a.mic_sensitivity_db_per_hour,
            acceleration=a.acceleration,
        ).model_dump(mode="python")
    )
    return parse_scenario(doc, source=f"{plan.scenario}+ageing")


def simulate_vehicle(plan: Plan, number: int) -> Traffic:
    """Vehicle ``number``'s records over the whole run (deterministic for the plan's seed)."""
    started = time.process_time()
    phase = drive_phase(load_scenario(plan.scenario), plan.seed, number, AUDIO_WINDOW_S)
    records = list(
        drive(
            vehicle_scenario(plan, number, phase),
            records=plan.records_per_device,
            window_s=AUDIO_WINDOW_S,
            every_s=plan.period_s,
            seed=plan.seed * DRIVE_SEED_STRIDE + number,
            phase_s=phase,
            start_ts=plan.start_ts,
        )
    )
    return Traffic(
        number,
        np.stack([r.features for r in records]).astype(np.float32),
        np.array([r.flags for r in records], np.uint16),
        np.array([r.ts for r in records], np.float64),
        [r.truth for r in records],
        time.process_time() - started,
    )


def _simulate(args: tuple[Plan, int]) -> Traffic:
    return simulate_vehicle(*args)


def simulate_fleet(plan: Plan, workers: int, cache_dir: Path | None = None) -> list[Traffic]:
    """Every vehicle's traffic, ``workers`` processes at a time (1: in this process).

    With ``cache_dir`` a vehicle's traffic is read from there when an earlier run simulated it with the
    same plan and the same simulator, scenario and feature code (the file name holds a digest of all of
    them), and written there otherwise: the simulation is deterministic, and most of the run's cost.
    """
    jobs = [(plan, k) for k in range(plan.vehicles)]
    cached: dict[int, Traffic] = {}
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for _, k in jobs:
            found = _read_traffic(_traffic_path(cache_dir, plan, k), k)
            if found is not None:
                cached[k] = found
        jobs = [job for job in jobs if job[1] not in cached]
        log.info("traffic cache %s: %d vehicle(s) cached, %d to simulate", cache_dir, len(cached), len(jobs))
    if workers <= 1 or len(jobs) <= 1:
        fresh = [_simulate(job) for job in jobs]
    else:
        # spawn: the children import only the simulator (no TFLite, no database connections to inherit).
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            fresh = list(pool.map(_simulate, jobs, chunksize=1))
    if cache_dir is not None:
        for tr in fresh:
            _write_traffic(_traffic_path(cache_dir, plan, tr.number), tr)
    return sorted([*cached.values(), *fresh], key=lambda t: t.number)


def _traffic_path(cache_dir: Path, plan: Plan, number: int) -> Path:
    """Cache file of vehicle ``number``: named by a digest of the plan and of the code that makes the traffic."""
    h = hashlib.sha256(repr(plan).encode())
    for src in (SIMULATOR_SOURCE, FEATURES_SOURCE, SCENARIO_DIR / f"{plan.scenario}.yaml"):
        if src.exists():
            h.update(src.read_bytes())
    return cache_dir / f"traffic-{h.hexdigest()[:16]}-{number:04d}.npz"


def _write_traffic(path: Path, tr: Traffic) -> None:
    labels = sorted(set(tr.truth))
    code = {lab: i for i, lab in enumerate(labels)}
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as out:
        np.savez(
            out,
            features=tr.features,
            flags=tr.flags,
            ts=tr.ts,
            truth=np.array([code[t] for t in tr.truth], np.int16),
            labels=np.array(labels),
            seconds=np.float64(tr.seconds),
        )
    tmp.replace(path)


def _read_traffic(path: Path, number: int) -> Traffic | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            labels = [str(x) for x in z["labels"]]
            return Traffic(
                number,
                z["features"],
                z["flags"],
                z["ts"],
                [labels[i] for i in z["truth"]],
                float(z["seconds"]),
            )
    except (OSError, ValueError, KeyError) as exc:
        log.warning("traffic cache %s unreadable (%s): simulating again", path, exc)
        return None


# ------------------------------------------------------------------------------------ the collector side


@dataclass
class Vehicle:
    """A simulated vehicle as the collector sees it: its records, inferred, and where its uplink stands."""

    device_id: str
    ageing: bool
    group: str
    boot_id: str
    spool_epoch: str
    cols: InferenceColumns
    ts: np.ndarray
    sent: int = 0  # records sent so far

    def batch(self, until: float, plan: Plan, engine: Engine) -> Batch | None:
        """The batch of the records taken before ``until`` and not yet sent (None if there are none)."""
        hi = int(np.searchsorted(self.ts, until, side="right"))
        lo, self.sent = self.sent, hi
        if hi <= lo:
            return None
        block = _slice(self.cols, lo, hi).to_block(
            model_name=engine.model_name,
            model_version=engine.model_version,
            hidden_units=engine.n_hidden,
            ts=self.ts[lo:hi],
            mono=self.ts[lo:hi] - plan.start_ts + 100.0,
        )
        block.seq = np.arange(lo + 1, hi + 1, dtype=np.uint64)
        return Batch(
            device_id=self.device_id,
            boot_id=self.boot_id,
            spool_epoch=self.spool_epoch,
            seq_first=lo + 1,
            seq_last=hi,
            sent_at=until,
            sent_mono=until - plan.start_ts + 100.0,
            clock_synced=True,
            profile=PROFILE,
            agent_version=AGENT_VERSION,
            blocks=[block],
        )

    def status(self, now: float, engine: Engine) -> messages.Status:
        """The retained status the agent publishes when it comes online (its tags name its group)."""
        return messages.Status(
            state="online",
            ts=now,
            agent_version=AGENT_VERSION,
            boot_id=self.boot_id,
            spool_epoch=self.spool_epoch,
            profile=PROFILE,
            model=messages.ModelRef(name=engine.model_name, version=engine.model_version),
            tags=["simulated", f"group:{self.group}"],
        )


def _slice(cols: InferenceColumns, lo: int, hi: int) -> InferenceColumns:
    """Records ``lo:hi`` of ``cols`` (the sampled activations re-indexed into the slice)."""
    keep = (cols.act_sample_idx >= lo) & (cols.act_sample_idx < hi)
    return InferenceColumns(
        pred=cols.pred[lo:hi],
        probs=cols.probs[lo:hi],
        confidence=cols.confidence[lo:hi],
        calibrated=cols.calibrated[lo:hi],
        features=cols.features[lo:hi],
        act_bits=cols.act_bits[lo:hi],
        act_sample_idx=(cols.act_sample_idx[keep] - lo).astype(np.uint32),
        act_sample=cols.act_sample[keep],
        coact=cols.coact[lo:hi],
        latency_us=cols.latency_us[lo:hi],
        sensor_flags=cols.sensor_flags[lo:hi],
    )


class Uplink:
    """Batches from every vehicle, through the codec, into the collector's own ingest transaction."""

    def __init__(self, plan: Plan, ingest: Ingest, vehicles: Sequence[Vehicle], engine: Engine) -> None:
        self.plan = plan
        self.ingest = ingest
        self.vehicles = list(vehicles)
        self.engine = engine
        self.mid = 0
        self.messages = 0
        self.records = 0
        self.payload_bytes = 0
        self.seconds = 0.0

    def _message(self, topic: str, payload: bytes, received_at: float) -> InboundMessage:
        self.mid += 1
        return InboundMessage(mid=self.mid, qos=1, topic=topic, payload=payload, received_at=received_at, session=1)

    def _write(self, msgs: list[InboundMessage]) -> None:
        """Decode and commit as the live service does: groups of ``ingest_max_batch_messages`` per transaction."""
        started = time.perf_counter()
        size = self.ingest.settings.ingest_max_batch_messages
        for lo in range(0, len(msgs), size):
            items = [prepare(m) for m in msgs[lo : lo + size]]
            bad = next((it for it in items if it.reason is not None), None)
            if bad is not None:
                raise RuntimeError(f"the collector quarantined a simulated message: {bad.reason}: {bad.detail}")
            # The ingest's own transaction: records, window sketches, data quality and sequential detectors.
            self.ingest._transaction(items)
        self.seconds += time.perf_counter() - started
        self.messages += len(msgs)

    def online(self, now: float) -> None:
        """Every vehicle publishes its retained status (with its tags) on connecting."""
        self._write(
            [
                self._message(
                    topics.topic(v.device_id, topics.Kind.STATUS),
                    v.status(now, self.engine).model_dump_json(exclude_none=True).encode(),
                    now + LINK_DELAY_S,
                )
                for v in self.vehicles
            ]
        )

    def send(self, until: float) -> None:
        """Each vehicle sends what it recorded up to ``until``; the collector ingests it."""
        msgs = []
        for v in self.vehicles:
            batch = v.batch(until, self.plan, self.engine)
            if batch is None:
                continue
            payload = encode_batch(batch)
            self.records += batch.n_records
            self.payload_bytes += len(payload)
            msgs.append(self._message(topics.topic(v.device_id, topics.Kind.TELEMETRY), payload, until + LINK_DELAY_S))
        if msgs:
            self._write(msgs)


# ------------------------------------------------------------------------------------ why: the diagnosis


def _reason_kind(reason: str) -> str:
    """A drift report's reason as a short kind: ``feature_share``, ``major_psi`` or the model signal's name."""
    if "features drift" in reason:
        return "feature_share"
    if reason.startswith("major PSI"):
        return "major_psi"
    return reason.split()[0]


def _first_delay(post: list[tuple[float, str]], onset: float | None, window_s: float) -> float | None:
    """Windows from the onset to the end of the first window after it whose verdict is drift."""
    hit = [start for start, verdict in post if verdict == "drift"]
    return None if not hit or onset is None else round((hit[0] + window_s - onset) / window_s, 3)


def diagnose(db: DbEngine, entry: CatalogEntry, plan: Plan, vehicles: Sequence[Vehicle]) -> dict[str, Any]:
    """How the run's stored windows are judged, and what the effective sample sizes change.

    The drift tests (:func:`~collector.monitoring.drift.evaluate_family`, BH across the devices of a
    window) on every whole window, per device, fleet (the tested stationary vehicles merged) and group
    scope (the ageing vehicles merged), against the committed reference and against a *representative*
    one (the pooled windows of every other stationary vehicle over the whole run), each twice: with the
    effective sample sizes the collector uses (each vehicle window's own, added over the vehicles a scope
    merges) and with every record counted as independent (the tests before effective sizes).
    """
    bins = entry.bins
    c = WINDOW_TABLE.c
    stored: dict[str, dict[float, WindowSketch]] = {}
    with db.connect() as conn:
        rows = conn.execute(
            sa.select(c.device_id, c.window_start, c.sketch).where(
                c.window_s == plan.window_s, c.n > 0, c.role == "active"
            )
        )
        for device, start, blob in rows:
            stored.setdefault(device, {})[float(start)] = WindowSketch.from_bytes(bytes(blob))
    full = 0.95 * plan.window_s / plan.period_s  # whole windows only (the first and last may be cut)
    stationary = [v.device_id for v in vehicles if not v.ageing]
    ageing = [v.device_id for v in vehicles if v.ageing]
    donors, tested = stationary[0::2], stationary[1::2]
    pooled = WindowSketch.empty(bins)
    for dev in donors:
        for sk in stored.get(dev, {}).values():
            pooled = pooled + sk
    refs = {"committed": entry.reference, "representative": reference_counts(bins, pooled)}
    starts = sorted({s for dev in stored.values() for s in dev})
    onset = plan.onset_ts
    thr = DriftThresholds()

    def counts(merged: WindowSketch, parts: Sequence[WindowSketch], independent: bool) -> WindowCounts:
        if independent:  # every record its own independent sample
            return dataclasses.replace(window_counts(bins, merged), effective=None)
        return window_counts(bins, merged, total_effective(parts, bins.n_features, bins.decorrelation_s))

    out: dict[str, Any] = {
        "reference_records": {"committed": int(entry.reference.feature_counts[0].sum()), "representative": pooled.n},
        "donor_devices": len(donors),
        "tested_devices": len(tested),
    }
    for name, ref in refs.items():
        for mode in ("effective", "independent"):
            independent = mode == "independent"
            dev_windows = dev_drift = fleet_windows = fleet_drift = 0
            dev_reasons: Counter[str] = Counter()
            fleet_reasons: Counter[str] = Counter()
            group: list[tuple[float, str]] = []
            for start in starts:
                mine = {
                    d: stored[d][start] for d in tested if start in stored.get(d, {}) and stored[d][start].n >= full
                }
                if mine:
                    family = {d: counts(sk, [sk], independent) for d, sk in mine.items()}
                    for rep in evaluate_family(ref, family, thr).values():
                        dev_windows += 1
                        dev_drift += rep.verdict == "drift"
                        dev_reasons.update({_reason_kind(r) for r in rep.reasons})
                    merged = sum(mine.values(), WindowSketch.empty(bins))
                    fleet = counts(merged, list(mine.values()), independent)
                    rep = evaluate_family(ref, {"fleet": fleet}, thr)["fleet"]
                    fleet_windows += 1
                    fleet_drift += rep.verdict == "drift"
                    fleet_reasons.update({_reason_kind(r) for r in rep.reasons})
                members = [
                    stored[d][start] for d in ageing if start in stored.get(d, {}) and stored[d][start].n >= full
                ]
                if members:
                    merged = sum(members, WindowSketch.empty(bins))
                    rep = evaluate_family(ref, {"group": counts(merged, members, independent)}, thr)["group"]
                    group.append((start, rep.verdict))
            pre = [g for g in group if onset is None or g[0] + plan.window_s <= onset]
            post = [g for g in group if onset is not None and g[0] >= onset]
            out[f"{name}/{mode}"] = {
                "device_windows": dev_windows,
                "device_windows_drift": dev_drift,
                "device_reasons": dict(dev_reasons.most_common()),
                "fleet_windows": fleet_windows,
                "fleet_windows_drift": fleet_drift,
                "fleet_reasons": dict(fleet_reasons.most_common()),
                "group_windows_before_onset": len(pre),
                "group_drift_before_onset": sum(g[1] == "drift" for g in pre),
                "group_first_drift_delay_windows": _first_delay(post, onset, plan.window_s),
            }
    # What differs between the committed reference and the stationary traffic, pooled over the tested vehicles.
    parts = [sk for dev in tested for sk in stored.get(dev, {}).values()]
    merged = sum(parts, WindowSketch.empty(bins))
    rep = evaluate_family(entry.reference, {"all": counts(merged, parts, False)}, thr)["all"]
    ref_priors = entry.reference.class_priors
    never = {}
    for f, fname in enumerate(bins.feature_names):
        rc = np.asarray(entry.reference.feature_counts[f], dtype=np.float64)
        cur = merged.feature_hist[f, : rc.size]
        missing = float(rc[cur == 0].sum() / rc.sum()) if rc.sum() else 0.0
        if missing >= 0.02:
            never[fname] = round(missing, 4)
    out["pooled_vs_committed"] = {
        "records": merged.n,
        "top_psi": {
            f.name: {"psi": round(f.psi, 3), "ks_d": round(f.ks.statistic, 3)}
            for f in sorted(rep.features, key=lambda f: -f.psi)[:6]
        },
        "reference_mass_never_visited": never,
        "predicted_mix": {
            lab: round(float(x), 4) for lab, x in zip(entry.labels, merged.class_counts / max(merged.n, 1), strict=True)
        },
        "reference_priors": {lab: round(float(x), 4) for lab, x in zip(entry.labels, ref_priors, strict=True)},
        "confidence_shift": round(rep.confidence.statistic, 4),
        "pca_error_auc": round(rep.pca_error.statistic, 4),
        "coactivation_auc": round(rep.coactivation.statistic, 4),
    }
    return out


# ------------------------------------------------------------------------------------ the run


@dataclass
class Outcome:
    """What a run measured."""

    plan: Plan
    alerts: list[dict[str, Any]]
    windows_evaluated: int
    records: int
    messages: int
    payload_bytes: int
    sequential_alarms: int
    seconds: dict[str, float]
    simulate_cpu_s: float
    truth_mix: dict[str, float]
    diagnosis: dict[str, Any] | None = None


def run(
    plan: Plan,
    database_url: str,
    *,
    workers: int = 2,
    diagnosis: bool = False,
    bundle_path: Path = BUNDLE,
    trusted_key: Path = TRUSTED_KEY,
    cache_dir: Path | None = None,
) -> Outcome:
    """Simulate the fleet, replay it through ingest and the alert engine in simulated time; return what happened.

    ``bundle_path`` is the model every vehicle runs and the collector's monitoring reference (the
    committed cabin bundle by default; see :func:`independent_reference_bundle`).
    """
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    traffic = simulate_fleet(plan, workers, cache_dir)
    seconds["simulate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    bundle = load_bundle(bundle_path, load_public_keys([trusted_key]))
    engine = Engine(bundle, seed=plan.seed)  # the agent's engine: golden self-test, calibration, co-activations
    vehicles = []
    truth: Counter[str] = Counter()
    for tr in traffic:
        cols = engine.infer_many(tr.features, tr.flags)
        tag = f"{plan.seed:08x}{tr.number:08x}"
        vehicles.append(
            Vehicle(
                plan.device_id(tr.number),
                plan.ageing_device(tr.number),
                plan.group(tr.number),
                f"b{tag}",
                f"e{tag}",
                cols,
                tr.ts,
            )
        )
        truth.update(tr.truth)
    seconds["infer"] = time.perf_counter() - t0
    simulate_cpu = sum(tr.seconds for tr in traffic)
    del traffic

    upgrade(database_url)
    settings = Settings(
        database_url=database_url,
        monitoring_bundles=[bundle_path],
        monitoring_trusted_keys=[trusted_key],
        monitoring_window_s=plan.window_s,
        alert_jobs_enabled=False,
        # Every group is alerted on as a whole: the ageing one and the stationary ones (false alerts count too).
        alert_groups=sorted({v.group for v in vehicles}),
    )
    db = make_engine(settings.database)
    try:
        ingest = Ingest(settings, db)
        uplink = Uplink(plan, ingest, vehicles, engine)
        catalog = ReferenceCatalog.from_settings(settings)
        service = MonitoringService(db, catalog, settings)
        alerts = AlertEngine(db, service, settings)
        evaluate_s = 0.0
        windows = 0
        uplink.online(plan.start_ts)
        end = plan.start_ts + plan.duration_s
        sends = [plan.start_ts + k * plan.batch_s for k in range(1, math.ceil(plan.duration_s / plan.batch_s) + 1)]
        # The scheduler's job runs right after each window's close plus the grace (and the last window closes too).
        grace = settings.alert_grace_s + LINK_DELAY_S
        closes = [
            plan.start_ts + j * plan.window_s + grace for j in range(1, math.ceil(plan.duration_s / plan.window_s) + 1)
        ]
        for now in sorted({*sends, *closes}):
            if now in sends:
                uplink.send(min(now, end))
            t1 = time.perf_counter()
            summary = alerts.evaluate(now)
            windows += len(summary.windows)
            evaluate_s += time.perf_counter() - t1
            if summary.windows:
                log.info(
                    "simulated %.2f h: %d window(s) evaluated, %d alert(s) fired, %d resolved",
                    (now - plan.start_ts) / 3600.0,
                    len(summary.windows),
                    len(summary.fired),
                    len(summary.resolved),
                )
        seconds["ingest"] = uplink.seconds
        seconds["evaluate"] = evaluate_s
        with db.connect() as conn:
            rows = conn.execute(sa.select(ALERT_TABLE).order_by(ALERT_TABLE.c.id)).mappings().all()
            n_alarms = int(conn.execute(sa.select(sa.func.count()).select_from(SEQ_ALARM_TABLE)).scalar_one())
        alert_rows = [dict(r) for r in rows]
        found = None
        entry = catalog.get(engine.model_name, engine.model_version)
        if diagnosis and entry is not None:
            t1 = time.perf_counter()
            found = diagnose(db, entry, plan, vehicles)
            seconds["diagnose"] = time.perf_counter() - t1
    finally:
        db.dispose()
    total = sum(truth.values())
    return Outcome(
        plan=plan,
        alerts=alert_rows,
        windows_evaluated=windows,
        records=uplink.records,
        messages=uplink.messages,
        payload_bytes=uplink.payload_bytes,
        sequential_alarms=n_alarms,
        seconds=seconds,
        simulate_cpu_s=simulate_cpu,
        truth_mix={k: v / total for k, v in sorted(truth.items())},
        diagnosis=found,
    )


# ------------------------------------------------------------------------------------ the figures


def summarise(out: Outcome) -> dict[str, Any]:
    """The run's figures: false alerts per 10 stationary device-days, drift delays in windows, costs.

    A *false alert* is any alert fired on a stationary vehicle or group, on the ageing group or one
    of its vehicles before the onset, or fleet-wide (model scope) before the onset (all day when
    nothing drifts). Stationary device-days count the stationary vehicles for the whole run and the
    ageing group until its onset. The drift delay is from the onset to the end of the window whose
    evaluation first fired an alert on the group (scope group) or one of its vehicles after the
    onset, in windows. Fleet-wide alerts after the onset are reported apart: the fleet holds the group.
    """
    plan = out.plan
    w = plan.window_s
    onset = plan.onset_ts
    ageing_ids = {plan.device_id(k) for k in range(plan.vehicles) if plan.ageing_device(k)}

    def on_group(a: dict[str, Any]) -> bool:
        return (a["scope"] == "device" and a["subject"] in ageing_ids) or (
            a["scope"] == "group" and a["subject"] == GROUP
        )

    false: list[dict[str, Any]] = []
    after: list[dict[str, Any]] = []
    for a in out.alerts:
        before_onset = onset is None or a["fired_at"] <= onset
        if before_onset or (a["scope"] != "model" and not on_group(a)):
            false.append(a)
        else:
            after.append(a)
    group_days = len(ageing_ids) * min(plan.ageing.onset_s if plan.ageing else 0.0, plan.duration_s) / 86400.0
    device_days = plan.devices * plan.duration_s / 86400.0 + group_days
    by_kind = Counter(f"{a['scope']}:{a['kind']}" for a in false)
    rate = 10.0 * len(false) / device_days if device_days else None

    def still_open(a: dict[str, Any]) -> bool:
        return a["resolved_at"] is None or (onset is not None and a["resolved_at"] > onset)

    def delay(a: dict[str, Any] | None) -> float | None:
        return None if a is None or onset is None else round((a["fired_at"] - onset) / w, 3)

    per_device: dict[str, dict[str, Any]] = {}
    for dev in sorted(ageing_ids):
        mine = [a for a in after if a["scope"] == "device" and a["subject"] == dev]
        first = min(mine, key=lambda a: a["fired_at"]) if mine else None
        per_device[dev] = {
            "first_alert_delay_windows": delay(first),
            "first_alert_kind": None if first is None else first["kind"],
            "kinds_after_onset": sorted({a["kind"] for a in mine}),
            "kinds_open_at_onset": sorted(
                {a["kind"] for a in false if a["scope"] == "device" and a["subject"] == dev and still_open(a)}
            ),
        }
    delays = [d["first_alert_delay_windows"] for d in per_device.values() if d["first_alert_delay_windows"] is not None]
    group_alerts = [a for a in after if a["scope"] == "group"]
    group_first = min(group_alerts, key=lambda a: a["fired_at"]) if group_alerts else None
    group_open = sorted({a["kind"] for a in false if a["scope"] == "group" and a["subject"] == GROUP and still_open(a)})
    drift: dict[str, Any] | None = None
    if plan.ageing is not None and onset is not None:
        firsts = [x for x in (min(delays, default=None), delay(group_first)) if x is not None]
        drift = {
            "onset_h": plan.ageing.onset_s / 3600.0,
            "aged_after_one_window": {k: round(v, 4) for k, v in plan.ageing.at(w).items()},
            "group_first_alert_delay_windows": min(firsts) if firsts else None,
            "group_scope_delay_windows": delay(group_first),
            "group_scope_kind": None if group_first is None else group_first["kind"],
            "group_scope_kinds_after_onset": sorted({a["kind"] for a in group_alerts}),
            "group_scope_kinds_open_at_onset": group_open,
            "devices_alerted": len(delays),
            "devices": len(per_device),
            "device_delay_windows": {
                "min": min(delays) if delays else None,
                "median": float(np.median(delays)) if delays else None,
                "max": max(delays) if delays else None,
            },
            "per_device": per_device,
            "fleet_scope_alerts_after_onset": sorted({a["kind"] for a in after if a["scope"] == "model"}),
            # The same span for the stationary vehicles: the chance of a new alert without any drift.
            "stationary_devices_alerted_in_two_windows_after_onset": len(
                {
                    a["subject"]
                    for a in false
                    if a["scope"] == "device"
                    and a["subject"] not in ageing_ids
                    and onset < a["fired_at"] <= onset + 2 * w
                }
            ),
        }
    return {
        "benchmark": "alarm_storm",
        "devices": plan.devices,
        "group_size": plan.group_size if plan.ageing else 0,
        "hours": plan.hours,
        "rate_hz": 1.0 / plan.period_s,
        "window_s": plan.window_s,
        "records_per_device_window": plan.window_s / plan.period_s,
        "batch_s": plan.batch_s,
        "scenario": plan.scenario,
        "records": out.records,
        "windows_evaluated": out.windows_evaluated,
        "device_days": round(device_days, 3),
        "false_alerts": len(false),
        "false_alerts_by_kind": dict(sorted(by_kind.items())),
        "false_alerts_per_10_device_days": None if rate is None else round(rate, 3),
        "false_alert_target_met": rate is not None and rate <= 1.0,
        "drift": drift,
        # An alert that stationary vehicles get as well catches nothing: the drift target needs the false-alert one.
        "drift_target_met": bool(
            drift is not None
            and drift["group_first_alert_delay_windows"] is not None
            and drift["group_first_alert_delay_windows"] <= 2.0
            and rate is not None
            and rate <= 1.0
        ),
        "sequential_alarms": out.sequential_alarms,
        "diagnosis": out.diagnosis,
        "truth_mix": {k: round(v, 4) for k, v in out.truth_mix.items()},
        "seconds": {k: round(v, 1) for k, v in out.seconds.items()},
        "simulate_cpu_s": round(out.simulate_cpu_s, 1),
        "us_per_record": {
            "simulate_cpu": round(1e6 * out.simulate_cpu_s / max(out.records, 1), 1),
            "ingest": round(1e6 * out.seconds.get("ingest", 0.0) / max(out.records, 1), 1),
        },
    }


def report(result: dict[str, Any]) -> str:
    """A human-readable account of :func:`summarise`'s figures."""
    lines = [
        f"{result['devices']} stationary vehicles + {result['group_size']} ageing, {result['hours']:g} simulated h, "
        f"{result['rate_hz']:.3g} inferences/s ({result['records_per_device_window']:.0f} records per device window "
        f"of {result['window_s']:g} s), scenario {result['scenario']}: {result['records']:,} records, "
        f"{result['windows_evaluated']} windows evaluated",
        f"false alerts: {result['false_alerts']} over {result['device_days']:g} stationary device-days = "
        f"{result['false_alerts_per_10_device_days']} per 10 device-days (target <= 1: "
        f"{'met' if result['false_alert_target_met'] else 'MISSED'})",
    ]
    if result["false_alerts_by_kind"]:
        lines.append(table(["scope:kind", "false alerts"], [[k, v] for k, v in result["false_alerts_by_kind"].items()]))
    d = result["drift"]
    if d is not None:
        lines.append(
            f"ageing drift from {d['onset_h']:g} h (after one window: {d['aged_after_one_window']}): "
            f"first alert on the group after {d['group_first_alert_delay_windows']} windows (target <= 2: "
            f"{'met' if result['drift_target_met'] else 'MISSED'}); group scope {d['group_scope_delay_windows']} "
            f"({d['group_scope_kind']}); devices alerted {d['devices_alerted']}/{d['devices']}, delay "
            f"{d['device_delay_windows']}; stationary vehicles alerted in the same two windows: "
            f"{d['stationary_devices_alerted_in_two_windows_after_onset']}/{result['devices']} (the met/MISSED "
            "verdict requires the false-alert target too: an alert every vehicle gets catches nothing)"
        )
        lines.append(
            table(
                ["device", "delay (windows)", "first kind", "kinds after onset", "open at onset"],
                [
                    [
                        dev,
                        v["first_alert_delay_windows"],
                        v["first_alert_kind"],
                        ",".join(v["kinds_after_onset"]),
                        ",".join(v["kinds_open_at_onset"]),
                    ]
                    for dev, v in d["per_device"].items()
                ],
            )
        )
    g = result.get("diagnosis")
    if g:
        rows = []
        for name in ("committed", "representative"):
            for mode in ("effective", "independent"):
                x = g[f"{name}/{mode}"]
                rows.append(
                    [
                        f"{name} ({g['reference_records'][name]:,} records)",
                        mode,
                        f"{x['device_windows_drift']}/{x['device_windows']}",
                        f"{x['fleet_windows_drift']}/{x['fleet_windows']}",
                        f"{x['group_drift_before_onset']}/{x['group_windows_before_onset']}",
                        x["group_first_drift_delay_windows"],
                    ]
                )
        lines.append(
            f"diagnosis: stationary windows judged drift, on {g['tested_devices']} stationary vehicles (the other "
            f"{g['donor_devices']} make the representative reference)"
        )
        lines.append(
            table(
                ["reference", "sample sizes", "device: drift", "fleet: drift", "group pre-onset", "group delay"],
                rows,
            )
        )
        lines.append(f"pooled stationary traffic vs the committed reference: {g['pooled_vs_committed']}")
    lines.append(
        f"time (s): {result['seconds']}, simulation CPU {result['simulate_cpu_s']} s; "
        f"per record (µs): {result['us_per_record']}"
    )
    return "\n".join(lines)


def _commit() -> str:
    """The checkout's commit (with ``+dirty`` when tracked files differ from it), for the record."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "-uno"], cwd=REPO, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (full scale by default) and print its figures and the JSON line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--devices", type=int, default=100, help="stationary vehicles (default 100)")
    p.add_argument("--group-size", type=int, default=10, help="vehicles of the ageing group, on top (default 10)")
    p.add_argument("--hours", type=float, default=24.0, help="simulated hours (default 24)")
    p.add_argument("--rate", type=float, default=0.125, help="inferences per second per vehicle (default 0.125)")
    p.add_argument("--window-s", type=float, default=900.0, help="monitoring window (default 900 s)")
    p.add_argument("--batch-s", type=float, default=300.0, help="a vehicle sends a batch this often (default 300 s)")
    p.add_argument("--onset-h", type=float, default=12.0, help="ageing onset, hours after the start (default 12)")
    p.add_argument("--acceleration", type=float, default=30.0, help="ageing time lapse (default 30)")
    p.add_argument("--no-drift", action="store_true", help="no ageing group: stationary traffic only")
    p.add_argument("--scenario", default="training", help="scenario of every vehicle (default training)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="processes simulating vehicles (default 2)")
    p.add_argument("--bundle", type=Path, default=BUNDLE, help="model bundle (default: the committed cabin-v1)")
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="keep each simulated vehicle's traffic here and reuse it when plan and simulator are unchanged",
    )
    p.add_argument("--no-diagnosis", action="store_true", help="skip the diagnosis (why windows are flagged)")
    p.add_argument("--postgres", action="store_true", help="a fresh PostgreSQL database instead of SQLite")
    args = p.parse_args(argv)
    setup_logging()
    plan = Plan(
        devices=args.devices,
        hours=args.hours,
        rate_hz=args.rate,
        window_s=args.window_s,
        group_size=args.group_size,
        ageing=None if args.no_drift else Ageing(onset_s=args.onset_h * 3600.0, acceleration=args.acceleration),
        scenario=args.scenario,
        seed=args.seed,
        batch_s=args.batch_s,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="alarm-storm-") as tmp:
        options: dict[str, Any] = {
            "workers": args.workers,
            "diagnosis": not args.no_diagnosis,
            "bundle_path": args.bundle,
            "cache_dir": args.cache_dir,
        }
        if args.postgres:
            with temporary_database("alarm_storm") as url:
                outcome = run(plan, url, **options)
        else:
            outcome = run(plan, f"sqlite:///{tmp}/fleet.db", **options)
    result = summarise(outcome)
    result["database"] = "postgresql" if args.postgres else "sqlite"
    result["bundle"] = str(args.bundle.relative_to(REPO) if args.bundle.is_relative_to(REPO) else args.bundle)
    result["commit"] = _commit()
    result["seconds"]["total"] = round(time.perf_counter() - started, 1)
    result["machine"] = machine()
    print(report(result))
    emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
