"""One peer drift tool on windows the benchmark wrote, timed per report; run in ``.venv-peers`` only.

``benchmarks/drift_speed.py`` writes ``reference.npy`` ([n, F] float32), ``windows.npy`` ([S, m, F]
float32) and ``names.json`` (the F feature names) into a folder, then runs::

    .venv-peers/bin/python benchmarks/peers/drift_peer.py --tool evidently --data FOLDER

This script imports nothing of the project (the peers' numpy and pandas differ from it). It runs
one untimed warm-up report (imports, numba and plotting caches), then one report per window, and
prints one JSON document: the tool's version, the seconds of each report, and per window and
feature the tool's own statistic and drift decision under its defaults.

* ``evidently``: ``Report([DataDriftPreset()]).run(current, reference)`` on pandas frames. With a
  reference over 1,000 rows its default per-column test is the normed Wasserstein distance >= 0.1
  (Jensen-Shannon >= 0.1 for columns with at most 5 distinct values); no multiple-testing
  correction (distances, not tests).
* ``alibi``: ``KSDrift(reference, p_val=0.05)`` built once (untimed, it is the reference's
  preparation), then ``predict(window, drift_type="feature", return_p_val=True)`` per window.
  Per feature alibi-detect decides ``p < 0.05`` with no correction (its Bonferroni applies to the
  batch-level decision only); the p-values are returned too so the benchmark can apply BH to them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def run_evidently(reference: np.ndarray, windows: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Evidently's data drift preset, one report per window."""
    import evidently
    import pandas as pd
    from evidently import Report
    from evidently.presets import DataDriftPreset

    ref = pd.DataFrame(reference.astype(np.float64), columns=names)
    frames = [pd.DataFrame(w.astype(np.float64), columns=names) for w in windows]
    Report([DataDriftPreset()]).run(frames[0], ref)  # warm-up
    seconds, values, decisions, methods = [], [], [], []
    for cur in frames:
        t0 = time.perf_counter()
        snapshot = Report([DataDriftPreset()]).run(cur, ref)
        seconds.append(time.perf_counter() - t0)
        by_column: dict[str, tuple[float, str, float]] = {}
        for metric in snapshot.dict()["metrics"]:
            config = metric.get("config", {})
            if config.get("type", "").endswith("ValueDrift"):
                by_column[config["column"]] = (float(metric["value"]), config["method"], float(config["threshold"]))
        row_v, row_d, row_m = [], [], []
        for name in names:
            value, method, threshold = by_column[name]
            # Evidently's rule: a p-value test drifts below its threshold, a distance at or above it.
            drifted = value <= threshold if "p_value" in method else value >= threshold
            row_v.append(value)
            row_d.append(bool(drifted))
            row_m.append(f"{method} (threshold {threshold})")
        values.append(row_v)
        decisions.append(row_d)
        methods.append(row_m)
    return {
        "tool": "evidently",
        "version": evidently.__version__,
        "seconds": seconds,
        "values": values,
        "decisions": decisions,
        "methods": sorted({m for row in methods for m in row}),
    }


def run_alibi(reference: np.ndarray, windows: np.ndarray, names: list[str]) -> dict[str, Any]:
    """alibi-detect's KSDrift, one feature-level prediction per window."""
    import alibi_detect
    from alibi_detect.cd import KSDrift

    detector = KSDrift(reference.astype(np.float32), p_val=0.05)
    detector.predict(windows[0], drift_type="feature", return_p_val=True)  # warm-up
    seconds, p_values, decisions = [], [], []
    for w in windows:
        t0 = time.perf_counter()
        out = detector.predict(w, drift_type="feature", return_p_val=True)
        seconds.append(time.perf_counter() - t0)
        p_values.append([float(p) for p in out["data"]["p_val"]])
        decisions.append([bool(d) for d in out["data"]["is_drift"]])
    return {
        "tool": "alibi-detect",
        "version": alibi_detect.__version__,
        "seconds": seconds,
        "p_values": p_values,
        "decisions": decisions,
        "methods": ["KS, p < 0.05 per feature (uncorrected)"],
    }


def main() -> int:
    """Run one tool on the benchmark's folder and print its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tool", choices=("evidently", "alibi"), required=True)
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()
    reference = np.load(args.data / "reference.npy")
    windows = np.load(args.data / "windows.npy")
    names = json.loads((args.data / "names.json").read_text())
    run = run_evidently if args.tool == "evidently" else run_alibi
    sys.stdout.write(json.dumps(run(reference, windows, names)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
