"""How long the monitoring service takes to answer a status, per scope size.

Method: ``--devices`` devices x ``--windows`` windows of ``--records`` records of the packaged
cabin bundle are sketched (features drawn around the reference means, random model outputs:
timing does not depend on what the values are) and stored in ``monitoring_window`` of a fresh
SQLite database, as ingest stores them. Then, each timed ``--repeat`` times (best reported):

* ``status_s``: :meth:`MonitoringService.status` of the whole fleet (every window merged);
* ``evaluate_devices_s``: :meth:`MonitoringService.evaluate_devices` (one status per device, one
  Benjamini-Hochberg family across them);
* ``decode_ms_per_window``: :meth:`WindowSketch.from_bytes` of one stored window.

    .venv/bin/python benchmarks/monitoring_status.py [--devices 100 --windows 10 --records 100]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from collector.config import Settings
from collector.db import make_engine, upgrade
from collector.monitoring.catalog import ReferenceCatalog
from collector.monitoring.service import MonitoringService, Scope
from collector.monitoring.sketches import ReferenceBins, WindowSketch, sketch_block
from collector.monitoring.windows import WindowKey, merge_into_table
from shared.codec import RecordBlock

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "edge_agent" / "bundles" / "cabin-v1.tar"
KEY = REPO / "edge_agent" / "keys" / "dev-release.pub"
WINDOW_S = 900.0
T0 = 1_760_000_400.0  # a multiple of WINDOW_S


def block(rng: np.random.Generator, bins: ReferenceBins, n: int, t0: float) -> RecordBlock:
    """``n`` records of the reference model with features around the reference means."""
    nf, nc = bins.n_features, bins.n_classes
    mean, std = bins.norm_mean.astype(np.float64), bins.norm_std.astype(np.float64)
    probs = rng.dirichlet(np.ones(nc), n).astype(np.float32)
    return RecordBlock(
        role="active",
        model_name=bins.model_name,
        model_version=bins.model_version,
        seq=np.arange(n, dtype=np.uint64),
        ts=t0 + np.arange(n) * (WINDOW_S / n / 2),
        mono=np.arange(n, dtype=np.float64),
        pred=probs.argmax(1).astype(np.int16),
        probs=probs.astype(np.float16),
        confidence=probs.max(1).astype(np.float16),
        calibrated=probs.max(1).astype(np.float16),
        features=(mean + std * rng.normal(size=(n, nf))).astype(np.float16),
        act_bits=np.zeros((n, 8), np.uint8),
        hidden_units=64,
        act_sample_idx=np.zeros(0, np.uint32),
        act_sample=np.zeros((0, 64), np.float16),
        coact=rng.poisson(0.05, n).astype(np.uint16),
        latency_us=np.full(n, 40.0, np.float32),
        sensor_flags=np.zeros(n, np.uint16),
        label=np.full(n, -1, np.int16),
    )


def best(fn: Callable[[], object], repeat: int) -> float:
    """Shortest of ``repeat`` timed calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="monitoring-status-"))
    url = f"sqlite:///{folder / 'fleet.db'}"
    upgrade(url)
    engine = make_engine(url)
    settings = Settings(
        database_url=url, monitoring_bundles=[BUNDLE], monitoring_trusted_keys=[KEY], monitoring_window_s=WINDOW_S
    )
    catalog = ReferenceCatalog.from_settings(settings)
    entry = catalog.get("cabin-events", "1.0.0")
    assert entry is not None, "the cabin bundle did not load"
    rng = np.random.default_rng(0)
    for d in range(args.devices):
        merged: dict[WindowKey, WindowSketch] = {}
        for w in range(args.windows):
            start = T0 + w * WINDOW_S
            b = block(rng, entry.bins, args.records, start)
            s = sketch_block(entry.bins, b, received_at=start + WINDOW_S)
            merged[(f"dev-{d:04d}", entry.manifest.name, entry.manifest.version, "active", start, WINDOW_S)] = s
        with engine.begin() as conn:
            merge_into_table(conn, merged)
    service = MonitoringService(engine, catalog, settings)
    blob = next(iter(merged.values())).to_bytes()
    decode = best(lambda: [WindowSketch.from_bytes(blob) for _ in range(1000)], args.repeat) / 1000
    figures = {
        "devices": args.devices,
        "windows_per_device": args.windows,
        "records_per_window": args.records,
        "status_s": round(best(lambda: service.status(Scope()), args.repeat), 3),
        "evaluate_devices_s": round(best(lambda: service.evaluate_devices(Scope()), args.repeat), 3),
        "decode_ms_per_window": round(decode * 1e3, 3),
    }
    print(json.dumps(figures, indent=2))
    engine.dispose()


if __name__ == "__main__":
    main()
