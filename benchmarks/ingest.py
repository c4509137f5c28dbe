"""End-to-end ingest rate into PostgreSQL with zero loss, beside the raw binary COPY ceiling.

Method
------
Records: the packaged reference bundle run by the agent's real engine
(:class:`edge_agent.inference.Engine`) over the cabin dataset's features, 5 % of records with
sampled float16 activations, as the agent sends them. They are cut into batches of 500 records
(the agent's default ``uplink.batch_max_records``) for ``--devices`` devices, each with its own
spool epoch and consecutive ``seq``, and encoded with :func:`shared.codec.encode_batch` *before*
any clock starts.

Services: a private Mosquitto from the production configuration (``max_inflight_messages 200``,
persistence on) on a free port; ``fleet-collector serve`` as a subprocess with its default ingest
settings, storing into a fresh database on the machine's PostgreSQL.

Load comes from a SEPARATE publisher process (this script re-run with ``--publisher``): one MQTT
3.1.1 connection publishing every device's ``telemetry`` at QoS 1 and subscribed to
``fleet/v1/+/ack``, where the collector says which seq ranges it committed. It timestamps each
batch when it publishes it and when the ack covering it arrives.

1. Throughput: the publisher keeps up to ``--window`` batches unacknowledged by the collector
   (as a fleet of devices with a few batches in flight each would) and publishes as fast as
   acks free the window. ``records_per_s`` = records / (last ack - first publish).
2. Lag at 10k records/s: fresh devices, batches published on a fixed schedule at 10,000
   records/s (open loop) for ``--lag-seconds``; ``lag_p99_s_at_10k`` is the 99th percentile of
   publish-to-ack latency.
3. Zero loss: afterwards the stored rows are counted per (device, epoch) against what was sent:
   ``lost`` = sent keys not stored, ``duplicates`` = stored rows beyond one per key (the primary
   key should make it 0) plus batches acknowledged more than once.
4. COPY ceiling: the same rows of phase 1 (as the collector prepares them,
   :class:`collector.ingest.bulk.InferenceRows`) written by plain binary ``COPY`` straight into the
   ``inference`` table of another freshly migrated database (same table, same indexes, empty), in
   transactions of 100 batches (the collector's ``ingest_max_batch_messages``).
   ``copy_ceiling_records_per_s`` counts only COPY and commit; streams are built beforehand.
   ``ratio_to_copy`` = records_per_s / copy_ceiling_records_per_s.

CPU seconds of the collector, the publisher, Mosquitto and the PostgreSQL backends serving the
benchmark's databases are read from /proc during phases 1 and 4, to show where the time goes.
``--profile`` also samples the collector with py-spy during phase 1 (``pip install py-spy``).

5. Sketch overhead: phases 1 to 4 run with monitoring OFF (``FLEET_MONITORING_ENABLED`` false).
   Then phase 1 is run again, on a fresh broker and database, by a collector with it ON and the
   reference bundle configured (``FLEET_MONITORING_BUNDLES`` / ``FLEET_MONITORING_TRUSTED_KEYS``,
   JSON arrays), so every record is also sketched into its ``monitoring_window``, range-checked
   against its batch's hardware profile (``sim-v1`` from the default ``firmware_configs/``) and fed
   to the per-device sequential detectors (``monitoring_sequential_enabled``, on by default), whose
   alarms are stored in ``sequential_alarm``. ``sketch_overhead`` = off records_per_s / on
   records_per_s - 1 (``--no-sketch`` skips it: null).
   Because PostgreSQL bounds this pipeline, the end-to-end figure is mostly run-to-run noise; the
   same work is therefore also timed in this process, without the database (``monitoring_cpu``:
   CPU microseconds per record of the sketches and of the detectors, over the phase-1 batches in
   groups of 100 as ingest commits them), and set against the collector's wall time per record.

Run: ``.venv/bin/python benchmarks/ingest.py`` (about a minute and a half). Targets (foundation):
``records_per_s`` >= 20,000 and ``ratio_to_copy`` >= 0.30, ``lost`` = ``duplicates`` = 0.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    Collector,
    ServiceUnavailable,
    busy_share,
    cpu_jiffies,
    emit,
    load_dataset,
    machine,
    pg_admin_url,
    private_broker,
    proc_cpu_seconds,
    setup_logging,
    table,
    temporary_database,
)

log = logging.getLogger("benchmarks.ingest")

BATCH_RECORDS = 500
GROUP_BATCHES = 100  # collector default ingest_max_batch_messages
LAG_RATE = 10_000.0
TARGET_RECORDS_PER_S = 20_000.0
TARGET_RATIO_TO_COPY = 0.30
TARGET_SKETCH_OVERHEAD = 0.15
ACT_SAMPLE_FRACTION = 0.05


# ----------------------------------------------------------------------------------- batches


@dataclass
class Planned:
    """One pre-encoded telemetry payload and the keys it carries."""

    device: str
    epoch: str
    first: int
    last: int
    payload: bytes


def engine_columns(seed: int) -> tuple[Any, str, str, int]:
    """The reference bundle's engine output over the whole cabin dataset (columns), name, version, hidden."""
    from edge_agent.config import DEFAULT_BUNDLE, DEFAULT_KEY
    from edge_agent.inference import Engine
    from shared.bundle import load_bundle
    from shared.signing import load_public_keys

    _names, features, _labels = load_dataset()
    engine = Engine(
        load_bundle(DEFAULT_BUNDLE, load_public_keys([DEFAULT_KEY])),
        num_threads=1,
        act_sample_fraction=ACT_SAMPLE_FRACTION,
        seed=seed,
    )
    return engine.infer_many(features), engine.model_name, engine.model_version, engine.n_hidden


def plan_batches(
    cols: Any, model: tuple[str, str, int], devices: int, batches: int, prefix: str, seed: int
) -> list[Planned]:
    """``batches`` payloads of 500 records, round-robin over ``devices`` devices with their own epochs."""
    from shared.codec import Batch, encode_batch

    rng = np.random.default_rng(seed)
    name, version, hidden = model
    n_rows = len(cols)
    epochs = [uuid.uuid4().hex for _ in range(devices)]
    boots = [uuid.uuid4().hex for _ in range(devices)]
    offsets = rng.integers(0, n_rows, devices)
    next_seq = [1] * devices
    t0 = time.time() - 3600.0
    out: list[Planned] = []
    for k in range(batches):
        d = k % devices
        start = int(offsets[d] + (next_seq[d] - 1)) % n_rows
        idx = (np.arange(start, start + BATCH_RECORDS)) % n_rows
        sub = _take(cols, idx)
        first = next_seq[d]
        ts = t0 + (first - 1 + np.arange(BATCH_RECORDS)) / 10.0
        block = sub.to_block(model_name=name, model_version=version, hidden_units=hidden, ts=ts, mono=ts - t0)
        block.seq = np.arange(first, first + BATCH_RECORDS, dtype=np.uint64)
        device = f"{prefix}{d:05d}"
        batch = Batch(
            device_id=device,
            boot_id=boots[d],
            spool_epoch=epochs[d],
            seq_first=first,
            seq_last=first + BATCH_RECORDS - 1,
            sent_at=float(ts[-1]) + 1.0,
            sent_mono=float(ts[-1] - t0) + 1.0,
            clock_synced=True,
            profile="sim-v1",
            agent_version="0.1.0",
            blocks=[block],
        )
        out.append(Planned(device, epochs[d], first, first + BATCH_RECORDS - 1, encode_batch(batch)))
        next_seq[d] += BATCH_RECORDS
    return out


def _take(cols: Any, idx: np.ndarray) -> Any:
    """Rows ``idx`` of engine columns, sampled activations re-indexed."""
    from edge_agent.inference import InferenceColumns

    pos = {int(v): i for i, v in enumerate(idx.tolist())}
    sampled = [(pos[int(s)], j) for j, s in enumerate(cols.act_sample_idx.tolist()) if int(s) in pos]
    sampled.sort()
    return InferenceColumns(
        pred=cols.pred[idx],
        probs=cols.probs[idx],
        confidence=cols.confidence[idx],
        calibrated=cols.calibrated[idx],
        features=cols.features[idx],
        act_bits=cols.act_bits[idx],
        act_sample_idx=np.array([p for p, _ in sampled], np.uint32),
        act_sample=cols.act_sample[[j for _, j in sampled]] if sampled else cols.act_sample[:0],
        coact=cols.coact[idx],
        latency_us=cols.latency_us[idx],
        sensor_flags=cols.sensor_flags[idx],
    )


def write_plan(path: Path, planned: list[Planned]) -> None:
    """The publisher's input: one msgpack map per batch."""
    with path.open("wb") as fh:
        for p in planned:
            fh.write(
                msgpack.packb(
                    {"device": p.device, "epoch": p.epoch, "first": p.first, "last": p.last, "payload": p.payload},
                    use_bin_type=True,
                )
            )


# --------------------------------------------------------------------------------- publisher


def publisher(args: argparse.Namespace) -> int:
    """The separate load process: publish the plan (closed window or fixed rate), time every ack."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    from shared import topics

    with open(args.publisher, "rb") as fh:
        plan = list(msgpack.Unpacker(fh, raw=False, max_bin_len=8 * 1024 * 1024))
    n = len(plan)
    by_epoch: dict[str, tuple[list[int], list[int]]] = {}
    for i, p in enumerate(plan):
        firsts, ids = by_epoch.setdefault(p["epoch"], ([], []))
        firsts.append(p["first"])
        ids.append(i)
    for firsts, ids in by_epoch.values():
        order = sorted(range(len(firsts)), key=firsts.__getitem__)
        firsts[:] = [firsts[j] for j in order]
        ids[:] = [ids[j] for j in order]
    published = [0.0] * n
    acked = [0.0] * n
    ack_counts = [0] * n
    lock = threading.Lock()
    done = threading.Event()
    window = threading.Semaphore(args.window if args.window > 0 else n)
    outstanding = [n]
    connected = threading.Event()

    def on_connect(client: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        client.subscribe(topics.subscription(topics.Kind.ACK), qos=1)

    def on_subscribe(*_a: Any) -> None:
        connected.set()

    def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        now = time.monotonic()
        doc = json.loads(msg.payload)
        if doc.get("quarantined"):
            log.error("collector quarantined a batch: %s", doc)
        firsts, ids = by_epoch.get(doc["spool_epoch"], ([], []))
        with lock:
            for a, b in doc["ranges"]:
                j = bisect.bisect_left(firsts, a)
                while j < len(firsts) and firsts[j] <= b:
                    i = ids[j]
                    if plan[i]["last"] <= b:
                        ack_counts[i] += 1
                        if ack_counts[i] == 1:
                            acked[i] = now
                            outstanding[0] -= 1
                            window.release()
                    j += 1
            if outstanding[0] == 0:
                done.set()

    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bench-publisher-{uuid.uuid4().hex[:8]}",
        protocol=MQTTProtocolVersion.MQTTv311,
        clean_session=True,
    )
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", args.port, keepalive=60)
    client.loop_start()
    if not connected.wait(10):
        print(json.dumps({"error": "publisher could not connect/subscribe"}), flush=True)
        return 1
    topic_of = {p["device"]: topics.topic(p["device"], topics.Kind.TELEMETRY) for p in plan}
    t_start = time.monotonic()
    for i, p in enumerate(plan):
        if args.rate > 0:
            due = t_start + i * BATCH_RECORDS / args.rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        else:
            window.acquire()
        published[i] = time.monotonic()
        client.publish(topic_of[p["device"]], p["payload"], qos=1)
    done.wait(args.timeout)
    client.disconnect()
    client.loop_stop()
    with lock:
        result = {
            "batches": n,
            "acked_batches": sum(1 for a in acked if a > 0),
            "duplicate_acks": sum(max(0, c - 1) for c in ack_counts),
            "first_publish": min(published),
            "last_publish": max(published),
            "last_ack": max(acked) if any(acked) else None,
            "latency_s": [a - p if a > 0 else None for p, a in zip(published, acked, strict=True)],
        }
    print(json.dumps(result), flush=True)
    return 0


@dataclass
class PhaseResult:
    """What one publisher run saw, plus CPU seconds of the processes involved."""

    records: int
    acked_records: int
    duplicate_acks: int
    seconds: float
    latencies: list[float]
    cpu: dict[str, float]

    @property
    def records_per_s(self) -> float:
        """Records acknowledged per second, first publish to last ack."""
        return self.acked_records / self.seconds if self.seconds > 0 else 0.0


class CpuMeter:
    """CPU seconds of named processes between :meth:`start` and :meth:`stop` (PIDs resolved lazily)."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}
        self._jiffies = (0, 0)

    def _read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, pids in self.pids.items():
            total = 0.0
            for pid in pids:
                with contextlib.suppress(OSError, ValueError):
                    total += proc_cpu_seconds(pid)
            out[name] = total
        return out

    def start(self) -> None:
        """Read the counters at the start of a phase."""
        self._start = self._read()
        self._jiffies = cpu_jiffies()

    def stop(self) -> dict[str, float]:
        """CPU seconds used per name since :meth:`start`; ``machine_busy`` is the share of all CPUs busy."""
        end = self._read()
        out = {k: end[k] - self._start.get(k, 0.0) for k in end}
        out["machine_busy"] = busy_share(self._jiffies, cpu_jiffies())
        return out


def run_publisher(
    plan_path: Path, port: int, *, window: int, rate: float, timeout: float, meter: CpuMeter, extra: list[int]
) -> PhaseResult:
    """Start the publisher process on ``plan_path`` and collect what it measured."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--publisher",
        str(plan_path),
        "--port",
        str(port),
        "--window",
        str(window),
        "--rate",
        str(rate),
        "--timeout",
        str(timeout),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None)
    meter.pids["publisher"] = [proc.pid]
    meter.pids["postgres"] = extra
    meter.start()
    # Sample the publisher's CPU just before it exits: /proc/<pid> goes away with it.
    last_cpu = 0.0
    while proc.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            last_cpu = proc_cpu_seconds(proc.pid)
        time.sleep(0.2)
    cpu = meter.stop()
    cpu["publisher"] = last_cpu
    out = proc.stdout.read().decode() if proc.stdout else ""
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"publisher failed ({proc.returncode}): {out[-2000:]}")
    doc = json.loads(lines[-1])
    latencies = [x for x in doc["latency_s"] if x is not None]
    end = doc["last_ack"] if doc["last_ack"] is not None else doc["last_publish"]
    return PhaseResult(
        records=doc["batches"] * BATCH_RECORDS,
        acked_records=doc["acked_batches"] * BATCH_RECORDS,
        duplicate_acks=doc["duplicate_acks"],
        seconds=end - doc["first_publish"],
        latencies=latencies,
        cpu=cpu,
    )


# ------------------------------------------------------------------------------- verification


def verify(database_url: str, planned: list[Planned]) -> dict[str, int]:
    """Stored rows per (device, epoch) against the planned keys: lost and duplicate counts."""
    import psycopg

    expected: dict[tuple[str, str], set[tuple[int, int]]] = {}
    for p in planned:
        expected.setdefault((p.device, p.epoch), set()).add((p.first, p.last))
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT device_id, spool_epoch, count(*), count(DISTINCT seq), min(seq), max(seq) "
            "FROM inference GROUP BY device_id, spool_epoch"
        ).fetchall()
    stored = {(r[0], r[1]): r[2:] for r in rows}
    lost = duplicates = unexpected = 0
    for key, ranges in expected.items():
        want = sum(b - a + 1 for a, b in ranges)
        total, distinct, lo, hi = stored.get(key, (0, 0, None, None))
        lost += max(0, want - distinct)
        duplicates += total - distinct
        if distinct and (lo < min(a for a, _ in ranges) or hi > max(b for _, b in ranges)):
            unexpected += 1
    unexpected += sum(1 for key in stored if key not in expected)
    return {
        "sent": sum(p.last - p.first + 1 for p in planned),
        "stored": sum(v[0] for v in stored.values()),
        "lost": lost,
        "duplicates": duplicates,
        "unexpected_keys": unexpected,
    }


def checkpoint(admin_url: str) -> None:
    """Flush dirty buffers now, so that no phase pays for the previous phase's checkpoint."""
    import psycopg

    try:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
    except psycopg.Error as exc:
        log.warning("CHECKPOINT refused (%s): phases may pay for each other's checkpoints", exc)


def backend_pids(admin_url: str, databases: list[str]) -> list[int]:
    """PIDs of the PostgreSQL backends connected to ``databases`` (this machine's server)."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = ANY(%s)", (databases,)).fetchall()
    return [int(r[0]) for r in rows]


# ---------------------------------------------------------------------------------- COPY ceiling


def copy_stream(rows: Any) -> bytes:
    """Binary COPY tuples of one block of :class:`InferenceRows` for the ``inference`` columns."""
    from collector.ingest.bulk import INFERENCE_COLUMNS, copy_bytea, copy_text, copy_tuples

    assert INFERENCE_COLUMNS[10] == "label" and INFERENCE_COLUMNS[17] == "act_sample"
    text, blob = copy_text, copy_bytea

    parts = []
    labelled = rows.label >= 0
    for has_label in (False, True):
        for sampled in (False, True):
            mask = (labelled == has_label) & (rows.sampled == sampled)
            if not mask.any():
                continue
            r = rows.take(mask)
            fields: list[tuple[np.dtype | None, Any]] = [
                text(r.device_id),
                text(r.spool_epoch),
                (np.dtype(">i8"), r.seq),
                text(r.role),
                text(r.model_name),
                text(r.model_version),
                (np.dtype(">f8"), r.ts),
                (np.dtype(">f8"), r.ts_corrected),
                (np.dtype(">f8"), r.received_at),
                (np.dtype(">i2"), r.pred),
                (np.dtype(">i2"), r.label) if has_label else (None, None),
                (np.dtype(">f4"), r.confidence),
                (np.dtype(">f4"), r.calibrated),
                blob(r.probs),
                blob(r.features),
                text(r.features_dtype),
                blob(r.act_bits),
                blob(r.act_sample) if sampled else (None, None),
                (np.dtype(">i4"), r.coact),
                (np.dtype(">f4"), r.latency_us),
                (np.dtype(">i4"), r.sensor_flags),
                (np.dtype(">i8"), r.digest),
            ]
            parts.append(copy_tuples(fields, len(r)))
    return b"".join(parts)


def copy_ceiling(database_url: str, planned: list[Planned], meter: CpuMeter, admin_url: str) -> dict[str, float]:
    """Plain binary COPY of the same rows into a freshly migrated ``inference`` table."""
    import psycopg

    from collector.db.engine import upgrade
    from collector.ingest.bulk import INFERENCE_COLUMNS, InferenceRows
    from shared.codec import decode_batch

    upgrade(database_url)
    header = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
    trailer = (-1).to_bytes(2, "big", signed=True)
    t0 = time.perf_counter()
    streams = []
    received = time.time()
    for k in range(0, len(planned), GROUP_BATCHES):
        chunk = [header]
        for p in planned[k : k + GROUP_BATCHES]:
            batch = decode_batch(p.payload)
            for block in batch.blocks:
                chunk.append(copy_stream(InferenceRows.from_block(batch, block, received)))
        chunk.append(trailer)
        streams.append(b"".join(chunk))
    prepare_s = time.perf_counter() - t0
    sql = f"COPY inference ({', '.join(INFERENCE_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
    records = sum(p.last - p.first + 1 for p in planned)
    with psycopg.connect(database_url) as conn:
        pid = conn.info.backend_pid
        meter.pids = {"postgres": [pid]}
        meter.start()
        t0 = time.perf_counter()
        with conn.cursor() as cur:
            for stream in streams:
                with cur.copy(sql) as copy:
                    copy.write(stream)
                conn.commit()
        seconds = time.perf_counter() - t0
        cpu = meter.stop()
        row = conn.execute("SELECT count(*) FROM inference").fetchone()
        stored = int(row[0]) if row else 0
    return {
        "copy_ceiling_records_per_s": records / seconds,
        "seconds": seconds,
        "records": records,
        "stored": stored,
        "prepare_s": prepare_s,
        "postgres_cpu_share": cpu["postgres"] / seconds,
        "machine_busy_share": cpu["machine_busy"],
        "client_cpu_share": 1.0 - cpu["postgres"] / seconds if seconds else 0.0,
    }


# ---------------------------------------------------------------------------------- profiling


@contextlib.contextmanager
def py_spy(pid: int, out: Path, enabled: bool) -> Iterator[Path | None]:
    """Sample ``pid`` with py-spy (raw collapsed stacks) while the body runs, if asked and installed."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not enabled or not Path(exe).exists():
        if enabled:
            print("py-spy is not installed (.venv/bin/pip install py-spy): no profile")
        yield None
        return
    proc = subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--output",
            str(out),
            "--rate",
            "200",
            "--nonblocking",
            "--idle",
            "--threads",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    try:
        yield out
    finally:
        proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)


def _frame_name(frame: str, with_line: bool = False) -> str:
    """``func (path:line)`` of a py-spy raw frame as ``func (file)`` or ``func (file:line)``."""
    func, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, line = where.rpartition(":") if ":" in where else (where, "", "")
    short = "/".join(path.split("/")[-2:])
    return f"{func} ({short}:{line})" if with_line and line else f"{func} ({short})"


def summarise_profile(path: Path, threads: tuple[str, ...] = ("ingest",), top: int = 8) -> list[tuple[str, str, float]]:
    """Where each ingest thread's wall time goes, from py-spy raw stacks sampled with ``--idle --threads``.

    Per thread whose name starts with one of ``threads``: the share of its samples by innermost
    frame, where time spent waiting for PostgreSQL (psycopg's ``Connection.wait``) is attributed to
    the collector line that issued the statement.
    """
    per_thread: dict[str, dict[str, int]] = {}
    for raw in path.read_text().splitlines():
        stack, _, count = raw.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1]
        if not thread.startswith(threads) or len(frames) < 2:
            continue
        leaf = frames[-1]
        if leaf.startswith("Connection.wait (") and "psycopg" in leaf:
            ours = [f for f in frames if "collector/" in f]
            what = "PostgreSQL, issued at " + (_frame_name(ours[-1], with_line=True) if ours else "?")
        else:
            what = _frame_name(leaf)
        bucket = per_thread.setdefault(thread, {})
        bucket[what] = bucket.get(what, 0) + int(count)
    out: list[tuple[str, str, float]] = []
    for thread, bucket in sorted(per_thread.items()):
        total = sum(bucket.values())
        for what, n in sorted(bucket.items(), key=lambda kv: -kv[1])[:top]:
            out.append((thread, what, n / total))
    return out


# ---------------------------------------------------------------------------------------- main


def sketch_run(
    folder: Path, plan_path: Path, window: int, *, monitoring: bool = True, tag: str = "sketch"
) -> dict[str, Any]:
    """Phase 1 again on a fresh broker and database, monitoring on (sketches for the reference bundle) or off."""
    import psycopg

    from edge_agent.config import DEFAULT_BUNDLE, DEFAULT_KEY

    own = folder / tag
    own.mkdir()
    env = (
        {
            "FLEET_MONITORING_ENABLED": "true",
            # pydantic-settings reads a list setting from the environment as a JSON array.
            "FLEET_MONITORING_BUNDLES": json.dumps([str(DEFAULT_BUNDLE)]),
            "FLEET_MONITORING_TRUSTED_KEYS": json.dumps([str(DEFAULT_KEY)]),
        }
        if monitoring
        else {"FLEET_MONITORING_ENABLED": "false"}
    )
    with private_broker(own) as broker, temporary_database("bench_sketch") as database_url:
        collector = Collector(database_url, broker.url, own / "collector", own / "collector.log", extra_env=env)
        collector.start()
        assert collector.proc is not None and broker.proc is not None
        try:
            pids = {"collector": [collector.proc.pid], "mosquitto": [broker.proc.pid]}
            admin = pg_admin_url()
            checkpoint(admin)
            run = run_publisher(
                plan_path,
                broker.port,
                window=window,
                rate=0.0,
                timeout=300.0,
                meter=CpuMeter(dict(pids)),
                extra=backend_pids(admin, [database_url.rsplit("/", 1)[1]]),
            )
        finally:
            collector.stop()
        with psycopg.connect(database_url) as conn:
            found = conn.execute("SELECT count(*), coalesce(sum(n), 0) FROM monitoring_window").fetchone()
            alarm_row = conn.execute("SELECT count(*) FROM sequential_alarm").fetchone()
        windows, window_records = found if found is not None else (0, 0)
    return {
        "monitoring": monitoring,
        "records": run.acked_records,
        "seconds": round(run.seconds, 3),
        "records_per_s": round(run.records_per_s, 0),
        # The collector's own CPU: PostgreSQL usually bounds the rate, so the sketches' cost shows here first.
        "cpu_share": {k: round(v / run.seconds, 3) for k, v in run.cpu.items() if k != "machine_busy"},
        "windows": int(windows),
        "window_records": int(window_records),
        "sequential_alarms": int(alarm_row[0]) if alarm_row is not None else 0,
    }


def monitoring_cpu(plan: list[Planned], folder: Path) -> dict[str, Any]:
    """CPU per record of what monitoring adds to ingest, in this process and without the database.

    The phase-1 batches are decoded as the collector decodes them, then, in groups of
    ``GROUP_BATCHES`` (one ingest transaction), sketched per window with the profile's range checks
    (:meth:`WindowWriter.sketch`) and fed to the sequential detectors (:meth:`SequentialWatch.feed`,
    staged and committed as ingest does). Merging into ``monitoring_window`` and inserting alarm rows
    are database work and show in the end-to-end run only.
    """
    from collector.config import Settings
    from collector.ingest.bulk import InferenceRows, WriteOutcome
    from collector.monitoring.streams import SequentialWatch
    from collector.monitoring.windows import NewRecords, WindowWriter, load_reference_bins
    from edge_agent.config import DEFAULT_BUNDLE, DEFAULT_KEY
    from shared.codec import decode_batch

    settings = Settings(data_dir=folder, monitoring_bundles=[DEFAULT_BUNDLE], monitoring_trusted_keys=[DEFAULT_KEY])
    bins = load_reference_bins(settings.monitoring_bundles, settings.monitoring_trusted_keys)
    writer = WindowWriter.from_settings(settings, bins)
    received = time.time()
    batches = []
    for p in plan:
        batch = decode_batch(p.payload)
        rows = [InferenceRows.from_block(batch, block, received) for block in batch.blocks]
        batches.append(NewRecords(rows, [WriteOutcome(inserted=len(r)) for r in rows], batch.profile))
    writer.sketch(batches[0])  # builds the float16 lookup tables, as the collector's first batch does
    watch = SequentialWatch.from_settings(settings, bins)
    sketch_s = detect_s = 0.0
    unranged = alarms = 0
    for lo in range(0, len(batches), GROUP_BATCHES):
        group = batches[lo : lo + GROUP_BATCHES]
        t0 = time.process_time()
        for b in group:
            unranged += writer.sketch(b)[1].unranged
        t1 = time.process_time()
        watch.begin()
        _seen, rows = watch.feed(group)
        watch.commit()
        t2 = time.process_time()
        sketch_s += t1 - t0
        detect_s += t2 - t1
        alarms += len(rows)
    n = sum(len(r) for b in batches for r in b.blocks)
    return {
        "records": n,
        "sketch_us_per_record": round(sketch_s / n * 1e6, 3),
        "detectors_us_per_record": round(detect_s / n * 1e6, 3),
        "unranged_records": unranged,
        "alarms": alarms,
        "devices": len(watch),
    }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values), q))


def main(argv: list[str] | None = None) -> int:
    """Run the phases, print the account and the JSON line (or act as the publisher process)."""
    parser = argparse.ArgumentParser(description="End-to-end ingest rate into PostgreSQL and the COPY ceiling.")
    parser.add_argument("--devices", type=int, default=200, help="devices the batches come from")
    parser.add_argument("--batches", type=int, default=1200, help="batches of 500 records in the throughput phase")
    parser.add_argument("--window", type=int, default=200, help="batches unacknowledged at most (throughput phase)")
    parser.add_argument("--lag-seconds", type=float, default=20.0, help="length of the 10k records/s phase")
    parser.add_argument("--profile", action="store_true", help="sample the collector with py-spy in phase 1")
    parser.add_argument("--profile-raw", type=Path, help="with --profile: keep py-spy's raw stacks here")
    parser.add_argument("--no-sketch", action="store_true", help="skip the sketch-overhead runs (phase 5)")
    parser.add_argument(
        "--sketch-pairs", type=int, default=2, help="back-to-back off/on throughput pairs for sketch_overhead (median)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--publisher", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=300.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING)
    if args.publisher:
        return publisher(args)

    host = machine()
    print("ingest: end to end (separate publisher -> Mosquitto -> fleet-collector serve -> PostgreSQL)")
    print(f"machine: {host['nproc']} x {host['cpu_model']}, {host['ram_gib']} GiB, {host['date']}")
    cols, name, version, hidden = engine_columns(args.seed)
    lag_batches = max(1, int(args.lag_seconds * LAG_RATE / BATCH_RECORDS))
    t0 = time.perf_counter()
    main_plan = plan_batches(cols, (name, version, hidden), args.devices, args.batches, "bench-", args.seed)
    lag_plan = plan_batches(cols, (name, version, hidden), args.devices, lag_batches, "lag-", args.seed + 1)
    payload_bytes = sum(len(p.payload) for p in main_plan)
    print(
        f"pre-encoded {len(main_plan) + len(lag_plan):,} batches of {BATCH_RECORDS} records for {args.devices} "
        f"devices in {time.perf_counter() - t0:.1f} s ({payload_bytes / len(main_plan) / 1024:.1f} KiB per batch)"
    )

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        folder = Path(tmp)
        main_path, lag_path = folder / "main.plan", folder / "lag.plan"
        write_plan(main_path, main_plan)
        write_plan(lag_path, lag_plan)
        try:
            with (
                private_broker(folder) as broker,
                temporary_database("bench_ingest") as database_url,
                temporary_database("bench_copy") as copy_url,
            ):
                admin = pg_admin_url()
                collector = Collector(
                    database_url,
                    broker.url,
                    folder / "collector",
                    folder / "collector.log",
                    extra_env={"FLEET_MONITORING_ENABLED": "false"},
                )
                collector.start()
                assert collector.proc is not None and broker.proc is not None
                try:
                    pids = {"collector": [collector.proc.pid], "mosquitto": [broker.proc.pid]}
                    pg = backend_pids(admin, [database_url.rsplit("/", 1)[1]])
                    checkpoint(admin)
                    print(f"\nphase 1: throughput, {len(main_plan):,} batches, window {args.window} batches ...")
                    with py_spy(collector.proc.pid, folder / "collector.pyspy", args.profile) as profile_path:
                        phase1 = run_publisher(
                            main_path,
                            broker.port,
                            window=args.window,
                            rate=0.0,
                            timeout=300.0,
                            meter=CpuMeter(dict(pids)),
                            extra=pg,
                        )
                    profile = []
                    if profile_path is not None and profile_path.exists():
                        profile = summarise_profile(profile_path)
                        if args.profile_raw:
                            shutil.copy(profile_path, args.profile_raw)
                    print(f"phase 2: lag at {LAG_RATE:,.0f} records/s for {args.lag_seconds:.0f} s ...")
                    phase2 = run_publisher(
                        lag_path,
                        broker.port,
                        window=0,
                        rate=LAG_RATE,
                        timeout=120.0,
                        meter=CpuMeter(dict(pids)),
                        extra=backend_pids(admin, [database_url.rsplit("/", 1)[1]]),
                    )
                    health = collector.health() or {}
                finally:
                    collector.stop()
                check = verify(database_url, main_plan + lag_plan)
                print("phase 4: COPY ceiling into a fresh inference table ...")
                checkpoint(admin)
                ceiling = copy_ceiling(copy_url, main_plan, CpuMeter({}), admin)
            pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
            for k in range(0 if args.no_sketch else args.sketch_pairs):
                # Off and on back to back, fresh broker and database each: the machine's state (other
                # work, PostgreSQL's) changes between pairs more than within one.
                print(f"phase 5.{k + 1}: throughput with the monitoring sketches off, then on ...")
                off = sketch_run(folder, main_path, args.window, monitoring=False, tag=f"pair{k}-off")
                on = sketch_run(folder, main_path, args.window, monitoring=True, tag=f"pair{k}-on")
                pairs.append((off, on))
            sketched = pairs[-1][1] if pairs else None
            cpu = None if args.no_sketch else monitoring_cpu(main_plan, folder)
        except ServiceUnavailable as exc:
            print(f"cannot run: {exc}")
            emit({"benchmark": "ingest", "error": str(exc), "records_per_s": None, "machine": host})
            return 1

    records_per_s = phase1.records_per_s
    ratio = records_per_s / ceiling["copy_ceiling_records_per_s"]
    sketch_overhead = None
    pair_overheads = [off["records_per_s"] / on["records_per_s"] - 1 for off, on in pairs if on["records_per_s"] > 0]
    if pairs and sketched is not None:
        sketch_overhead = float(np.median(pair_overheads)) if pair_overheads else None
        shown = "n/a" if sketch_overhead is None else f"{sketch_overhead:+.1%}"
        each = ", ".join(
            f"{off['records_per_s']:,.0f} off / {on['records_per_s']:,.0f} on ({ov:+.1%})"
            for (off, on), ov in zip(pairs, pair_overheads, strict=True)
        )
        print(
            f"\nsketch overhead: median over {len(pairs)} back-to-back pairs {shown} (target <= "
            f"{TARGET_SKETCH_OVERHEAD:.0%}): {each}; {sketched['window_records']:,} records in "
            f"{sketched['windows']:,} monitoring windows, {sketched['sequential_alarms']} sequential alarms"
        )
    collector_us: dict[str, float] | None = None
    if pairs:

        def us_per_record(run: dict[str, Any]) -> float:
            return run["cpu_share"]["collector"] * run["seconds"] / max(run["records"], 1) * 1e6

        # The collector's own CPU per record, off and on: where the added work shows when PostgreSQL bounds the rate.
        collector_us = {
            "off": round(float(np.median([us_per_record(off) for off, _ in pairs])), 2),
            "on": round(float(np.median([us_per_record(on) for _, on in pairs])), 2),
        }
        print(
            f"collector CPU per record: {collector_us['off']:.2f} us with monitoring off, "
            f"{collector_us['on']:.2f} us with it on"
        )
    if cpu is not None:
        # Against the collector's wall time per record with monitoring off (its writer thread is the bottleneck).
        per_record_us = 1e6 / records_per_s
        added = cpu["sketch_us_per_record"] + cpu["detectors_us_per_record"]
        cpu["share_of_ingest_per_record"] = round(added / per_record_us, 4)
        print(
            f"monitoring CPU in-process (no database): sketches {cpu['sketch_us_per_record']:.2f} us/record, "
            f"sequential detectors {cpu['detectors_us_per_record']:.2f} us/record; together "
            f"{cpu['share_of_ingest_per_record']:.1%} of ingest's {per_record_us:.1f} us/record "
            f"({cpu['alarms']} alarms over {cpu['devices']} devices, {cpu['unranged_records']} records unranged)"
        )
    lost = check["lost"]
    duplicates = check["duplicates"] + phase1.duplicate_acks + phase2.duplicate_acks
    p99 = _pct(phase2.latencies, 99)
    ingest_stats = health.get("ingest", {})
    print()
    print(
        table(
            ["phase", "records", "seconds", "records/s", "collector CPU", "postgres CPU", "mosquitto CPU", "publisher"],
            [
                [
                    "1 throughput",
                    phase1.acked_records,
                    phase1.seconds,
                    records_per_s,
                    phase1.cpu["collector"] / phase1.seconds,
                    phase1.cpu["postgres"] / phase1.seconds,
                    phase1.cpu["mosquitto"] / phase1.seconds,
                    phase1.cpu["publisher"] / phase1.seconds,
                ],
                [
                    "2 at 10k/s",
                    phase2.acked_records,
                    phase2.seconds,
                    phase2.records_per_s,
                    phase2.cpu["collector"] / phase2.seconds,
                    phase2.cpu["postgres"] / phase2.seconds,
                    phase2.cpu["mosquitto"] / phase2.seconds,
                    phase2.cpu["publisher"] / phase2.seconds,
                ],
                [
                    "4 COPY ceiling",
                    ceiling["records"],
                    ceiling["seconds"],
                    ceiling["copy_ceiling_records_per_s"],
                    "-",
                    ceiling["postgres_cpu_share"],
                    "-",
                    "-",
                ],
            ],
        )
    )
    print("(CPU columns: share of one core during the phase)")
    print(
        f"whole machine busy (all {host['nproc']} CPUs, every process): phase 1 {phase1.cpu['machine_busy']:.2f}, "
        f"phase 2 {phase2.cpu['machine_busy']:.2f}, COPY ceiling {ceiling['machine_busy_share']:.2f}"
    )
    print(
        f"\nphase 1 ack latency p50 {_pct(phase1.latencies, 50):.2f} s, p99 {_pct(phase1.latencies, 99):.2f} s "
        f"(closed window of {args.window} batches: this is queueing, not the lag figure)"
    )
    if p99 is not None:
        print(
            f"phase 2 publish->ack latency at {LAG_RATE:,.0f} records/s: p50 {_pct(phase2.latencies, 50):.3f} s, "
            f"p99 {p99:.3f} s, max {max(phase2.latencies):.3f} s"
        )
    print(
        f"zero loss check: sent {check['sent']:,}, stored {check['stored']:,}, lost {lost}, duplicates {duplicates}, "
        f"unexpected keys {check['unexpected_keys']}"
    )
    print(f"COPY streams built in {ceiling['prepare_s']:.1f} s (not timed); ceiling stored {ceiling['stored']:,} rows")
    print(
        f"\nrecords_per_s {records_per_s:,.0f} (target >= {TARGET_RECORDS_PER_S:,.0f}: "
        f"{'met' if records_per_s >= TARGET_RECORDS_PER_S else 'MISSED'}), ratio_to_copy {ratio:.3f} "
        f"(target >= {TARGET_RATIO_TO_COPY}: {'met' if ratio >= TARGET_RATIO_TO_COPY else 'MISSED'})"
    )
    if profile:
        print("\ncollector profile during phase 1 (py-spy, wall time of each ingest thread, idle included):")
        print(table(["thread", "where", "share"], [[t, w, s] for t, w, s in profile]))
    emit(
        {
            "benchmark": "ingest",
            "records_per_s": round(records_per_s, 0),
            "copy_ceiling_records_per_s": round(ceiling["copy_ceiling_records_per_s"], 0),
            "ratio_to_copy": round(ratio, 4),
            "lost": lost,
            "duplicates": duplicates,
            "lag_p99_s_at_10k": round(p99, 4) if p99 is not None else None,
            "sketch_overhead": round(sketch_overhead, 4) if sketch_overhead is not None else None,
            "targets": {
                "records_per_s": TARGET_RECORDS_PER_S,
                "ratio_to_copy": TARGET_RATIO_TO_COPY,
                "sketch_overhead": TARGET_SKETCH_OVERHEAD,
            },
            "sketch_run": sketched,
            "sketch_pairs": [
                {"off_records_per_s": off["records_per_s"], "on_records_per_s": on["records_per_s"]}
                for off, on in pairs
            ],
            "monitoring_cpu": cpu,
            "collector_cpu_us_per_record": collector_us,
            "phase1": {
                "records": phase1.acked_records,
                "seconds": round(phase1.seconds, 3),
                "latency_p50_s": _pct(phase1.latencies, 50),
                "cpu_share": {k: round(v / phase1.seconds, 3) for k, v in phase1.cpu.items() if k != "machine_busy"},
                "machine_busy_share": round(phase1.cpu["machine_busy"], 3),
            },
            "phase2": {
                "records": phase2.acked_records,
                "offered_records_per_s": LAG_RATE,
                "achieved_records_per_s": round(phase2.records_per_s, 0),
                "latency_p50_s": _pct(phase2.latencies, 50),
                "latency_max_s": max(phase2.latencies) if phase2.latencies else None,
                "cpu_share": {k: round(v / phase2.seconds, 3) for k, v in phase2.cpu.items() if k != "machine_busy"},
                "machine_busy_share": round(phase2.cpu["machine_busy"], 3),
            },
            "verify": check,
            "ceiling": {k: round(v, 3) for k, v in ceiling.items()},
            "collector_ingest": {
                k: ingest_stats.get(k) for k in ("records_inserted", "records_duplicate", "commits", "groups")
            },
            "profile": [[t, w, round(s, 4)] for t, w, s in profile],
            "devices": args.devices,
            "batch_records": BATCH_RECORDS,
            "payload_bytes_per_record": round(payload_bytes / (len(main_plan) * BATCH_RECORDS), 1),
            "machine": host,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
