"""Late labels at scale: ``fleetctl labels push`` of 100,000 labels into PostgreSQL, and realized accuracy.

Method
------
Services: a private Mosquitto (production configuration, free port) and ``fleet-collector serve`` as a
subprocess, on a fresh database of the machine's PostgreSQL, with the packaged reference bundle
configured (``FLEET_MONITORING_BUNDLES`` / ``FLEET_MONITORING_TRUSTED_KEYS``) so class names resolve.

Records: ``--devices`` devices x ``--records`` inference records of the cabin model (5 classes, 40
features, 64 hidden units; the test suite's seeded record generator), 10 % of them with an inline
label, written straight into ``inference`` by ingest's own bulk writer
(:func:`collector.ingest.bulk.write_inferences`, binary COPY) before any clock starts: this benchmark
measures labels, not ingest.

Labels: ``--labels`` labels written by the agent's late-label writer (:class:`edge_agent.labels.LateLabels`:
CSV, class NAMES), 60 % for stored records (spread at random over every device) and 40 % for records
that have not arrived (devices that never sent anything), so both the matched and the pending paths
are measured.

1. ``push_s``: wall time of ``fleetctl labels push FILE --json`` as a separate process (its start-up,
   reading and checking the file, chunks of 10,000 over HTTP, the collector's validation, class-name
   resolution against the stored records' models and the upsert), all labels new.
   ``labels_per_s`` = labels / ``push_s``.
2. ``push_again_s``: the same file again: every label replaces itself (``ON CONFLICT … DO UPDATE``).
3. ``accuracy_ms``: ``GET /api/v1/labels/accuracy`` (label ↔ inference join and aggregation in the
   database, plus the inline labels), median of 5.

CPU seconds of each push are read from /proc: the ``fleetctl`` process (``RUSAGE_CHILDREN``), the
collector and the PostgreSQL backends serving the benchmark's database. A push is a chain of
request/response steps (read, send, validate, store, answer), so on an otherwise idle machine its wall
time is close to ``push_cpu_s``; on a shared machine the wall time also holds the waits for a core.

Run: ``.venv/bin/python benchmarks/labels_push.py`` (about a minute). Target (issue 4): 100,000 labels
in a few seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    Collector,
    emit,
    machine,
    pg_admin_url,
    private_broker,
    proc_cpu_seconds,
    setup_logging,
    table,
    temporary_database,
    venv_bin,
)

log = logging.getLogger("benchmarks.labels_push")

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "edge_agent" / "bundles" / "cabin-v1.tar"
KEY = REPO / "edge_agent" / "keys" / "dev-release.pub"
CLASSES = ["impact", "normal", "smoking", "vaping", "window_open"]
EPOCH = "bench-epoch-0001"
T0 = 1_795_000_000.0


def store_records(database_url: str, devices: int, records: int, seed: int) -> None:
    """``devices`` x ``records`` records (10 % with an inline label) by ingest's bulk writer."""
    from collector.db import make_engine
    from collector.ingest.bulk import InferenceRows, write_inferences
    from tests.shared.test_codec import make_batch, make_block

    engine = make_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    rng = np.random.default_rng(seed)
    try:
        for d in range(devices):
            block = make_block(records, first_seq=0, seed=seed + d, classes=len(CLASSES))
            inline = np.where(rng.random(records) < 0.1, rng.integers(0, len(CLASSES), records), -1)
            block = dataclasses.replace(block, ts=T0 + np.arange(records) * 0.1, label=inline.astype(np.int16))
            batch = make_batch(block, device_id=f"veh-{d:04d}", spool_epoch=EPOCH, gaps=[])
            with engine.begin() as conn:
                write_inferences(conn, [InferenceRows.from_block(batch, block, T0 + records)])
    finally:
        engine.dispose()


def write_label_file(path: Path, devices: int, records: int, labels: int, seed: int) -> None:
    """``labels`` class names by the agent's writer: 60 % for stored records, 40 % for devices never heard from."""
    from edge_agent.labels import LateLabels

    rng = np.random.default_rng(seed)
    writer = LateLabels(path, 1.0, seed=seed)
    stored = int(labels * 0.6)
    keys = rng.choice(devices * records, size=stored, replace=False)
    for d in range(devices):
        seqs = np.sort(keys[keys // records == d] % records)
        writer.offer(f"veh-{d:04d}", EPOCH, seqs, [CLASSES[i] for i in rng.integers(0, len(CLASSES), seqs.size)])
    pending = labels - stored
    per_device = 1000
    for d in range(0, pending, per_device):
        seqs = np.arange(min(per_device, pending - d))
        writer.offer(f"late-{d // per_device:04d}", EPOCH, seqs, [CLASSES[i] for i in rng.integers(0, 5, seqs.size)])
    assert writer.written == labels, writer.written


def backend_cpu(database_url: str) -> dict[int, float]:
    """CPU seconds so far of every PostgreSQL backend connected to the benchmark's database."""
    from benchmarks.ingest import backend_pids

    return {pid: proc_cpu_seconds(pid) for pid in backend_pids(pg_admin_url(), [database_url.rsplit("/", 1)[1]])}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def push(api_url: str, path: Path, collector: Collector, database_url: str) -> dict[str, Any]:
    """Wall and CPU seconds of one ``fleetctl labels push`` process, and its totals."""
    assert collector.proc is not None
    cpu0 = (children_cpu(), proc_cpu_seconds(collector.proc.pid), backend_cpu(database_url))
    start = time.perf_counter()
    out = subprocess.run(
        [venv_bin("fleetctl"), "--api-url", api_url, "labels", "push", str(path), "--json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    wall = time.perf_counter() - start
    after = backend_cpu(database_url)
    cpu = {
        "fleetctl": children_cpu() - cpu0[0],
        "collector": proc_cpu_seconds(collector.proc.pid) - cpu0[1],
        "postgres": sum(v - cpu0[2].get(pid, 0.0) for pid, v in after.items()),
    }
    data = json.loads(out)
    totals = {k: (len(v) if isinstance(v, list) else v) for k, v in data.items()}
    return {"wall_s": wall, "cpu_s": sum(cpu.values()), "cpu": cpu, **totals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--records", type=int, default=10_000, help="records per device")
    parser.add_argument("--labels", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    setup_logging()
    info = machine()
    with tempfile.TemporaryDirectory(prefix="labels-bench-") as tmp:
        folder = Path(tmp)
        with temporary_database("fleet_bench_labels") as db_url, private_broker(folder) as broker:
            collector = Collector(
                database_url=db_url,
                mqtt_url=broker.url,
                data_dir=folder / "collector",
                log_path=folder / "collector.log",
                extra_env={
                    "FLEET_MONITORING_BUNDLES": json.dumps([str(BUNDLE)]),
                    "FLEET_MONITORING_TRUSTED_KEYS": json.dumps([str(KEY)]),
                },
            ).start()
            try:
                log.info("storing %d x %d records", args.devices, args.records)
                store_records(db_url, args.devices, args.records, args.seed)
                path = folder / "late_labels.csv"
                write_label_file(path, args.devices, args.records, args.labels, args.seed)
                api_url = f"http://127.0.0.1:{collector.port}"
                log.info("pushing %d labels (%.1f MB)", args.labels, path.stat().st_size / 1e6)
                first = push(api_url, path, collector, db_url)
                again = push(api_url, path, collector, db_url)
                timings = []
                for _ in range(5):
                    start = time.perf_counter()
                    with urllib.request.urlopen(f"{api_url}/api/v1/labels/accuracy", timeout=60) as resp:
                        accuracy = json.loads(resp.read())
                    timings.append(time.perf_counter() - start)
            finally:
                collector.stop()
    rows = [
        (
            name,
            round(p["wall_s"], 2),
            round(p["cpu"]["fleetctl"], 2),
            round(p["cpu"]["collector"], 2),
            round(p["cpu"]["postgres"], 2),
            p["inserted"],
            p["replaced"],
            p["matched"],
            p["rejected"],
        )
        for name, p in (("first push (all new)", first), ("same file again", again))
    ]
    header = ("push", "wall s", "cpu fleetctl", "cpu collector", "cpu postgres", "inserted", "replaced", "matched")
    print(table((*header, "rejected"), rows))
    for item in accuracy["items"]:
        print(
            f"{item['model_name']} {item['model_version']}: {item['n_labelled']} labelled records, realized "
            f"{item['realized']['estimate']:.3f}, expected {item['expected']['estimate']:.3f}"
        )
    emit(
        {
            "benchmark": "labels_push",
            "labels": args.labels,
            "records": args.devices * args.records,
            "push_s": round(first["wall_s"], 3),
            "labels_per_s": round(args.labels / first["wall_s"]),
            "push_cpu_s": round(first["cpu_s"], 3),
            "push_cpu": {k: round(v, 3) for k, v in first["cpu"].items()},
            "push_again_s": round(again["wall_s"], 3),
            "push_again_cpu_s": round(again["cpu_s"], 3),
            "accuracy_ms": round(1000 * statistics.median(timings), 1),
            "labelled_records": sum(item["n_labelled"] for item in accuracy["items"]),
            "first_push": {k: first[k] for k in ("accepted", "inserted", "replaced", "matched", "rejected")},
            "machine": info,
        }
    )


if __name__ == "__main__":
    main()
