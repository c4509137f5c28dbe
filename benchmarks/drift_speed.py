"""Drift evaluation of 1,000 device windows by the collector's code, beside Evidently and alibi-detect.

Method
------
Data (realistic, seeded): the committed cabin dataset (24,000 records x 40 features: BME680,
PMS5003 and microphone features of real recordings). A reference of ``--reference-rows`` (5,000)
records is drawn at random; each of ``--windows`` (1,000) device windows draws ``--rows`` (1,000)
other records at random. In a share ``--drift-share`` (0.3) of the windows, 1 to 8 random features
get sensor-style drift: an offset of ``delta`` reference standard deviations, ``delta``
log-uniform in [0.03, 1] (so small shifts that no test can see and large ones every test sees both
occur), or a gain of ``g`` in [1.05, 1.6] about the reference mean. Untouched features of every
window are samples of the reference's own distribution, so they measure false alarms.

The records carry what an agent sends: the packaged reference bundle (``cabin-v1``) runs over every
record (:class:`collector.monitoring.offline.ModelRunner`, the agent's arithmetic), giving the
predicted class, calibrated confidence and rare co-activation count; this is done before any
clock starts.

Collector (this process, timed per window):

* ``sketch``: :func:`collector.monitoring.sketches.sketch_block` of the window's record block
  (float32 features) on the bundle's reference edges, as ingest does for every stored block.
* ``evaluate``: :func:`collector.monitoring.drift.evaluate_windows` of that sketch against the
  reference's sketch: PSI, Hellinger, KL, JS and binned KS per feature, class mix, confidence,
  PCA error and co-activation tests, Benjamini-Hochberg over the window's 44 p-values.
  ``collector_report_ms`` = sketch + evaluate per window.
* ``family``: :func:`~collector.monitoring.drift.evaluate_family` of all windows at once
  (BH across features *and* devices, as the monitoring service does for a cohort).
* ``ks_columns``: :func:`~collector.monitoring.drift.ks_columns`, the collector's exact-D KS of all
  40 raw columns (asymptotic p-value), for when raw samples are at hand.

Exact KS decisions, the yardstick: ``scipy.stats.ks_2samp`` (default ``method="auto"``: the exact
distribution at these sizes) per feature and window. Multiple-testing convention, the same as the
collector's: Benjamini-Hochberg at q = 0.05 over the window's family, i.e. the 40 feature
p-values *plus the same four model-signal p-values* the collector's window family holds; a feature
drifts when its q-value is <= 0.05. For the fleet-family comparison, BH over all windows' p-values.

Peers, in their own environment (``benchmarks/peers/setup.sh``; run as subprocesses by
``benchmarks/peers/drift_peer.py``) on the first ``--peer-windows`` (20) windows (Evidently takes
seconds per report) and ``--alibi-windows`` (100) for alibi-detect, with the same reference:
Evidently's ``DataDriftPreset`` (its defaults) and alibi-detect's ``KSDrift`` (feature-level,
its defaults). Their time is per report, after an untimed warm-up report.

Agreement = share of (window, feature) decisions equal to the exact KS decisions. Reported for the
collector's binned KS (the target: >= 95 %), the collector's feature verdict (binned KS significant
*and* PSI >= 0.1, which by design ignores significant but negligible shifts), ``ks_columns``, each
peer as it decides, and alibi-detect's p-values under the same BH convention. Each also gets its
detection rate on injected (window, feature) pairs and its false-alarm rate on untouched ones.

Run: ``.venv/bin/python benchmarks/drift_speed.py`` (about 6 minutes on the 2-core machine, most of
it scipy's exact KS and Evidently). ``--no-peers`` skips the peers. Target (monitoring issue):
``speedup_vs_evidently`` >= 50 and ``agreement_binned_ks`` >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, busy_share, cpu_jiffies, emit, load_dataset, machine, setup_logging
from collector.monitoring.dependence import EffectiveSizes
from collector.monitoring.drift import (
    DriftReport,
    DriftThresholds,
    WindowCounts,
    benjamini_hochberg,
    evaluate_family,
    evaluate_windows,
    ks_columns,
)
from collector.monitoring.offline import (
    ModelOutputs,
    ModelRunner,
    record_block,
    reference_counts,
    window_counts,
)
from collector.monitoring.sketches import ReferenceBins, sketch_block
from shared.bundle import load_bundle
from shared.codec import RecordBlock
from shared.signing import load_public_keys

log = logging.getLogger("benchmarks.drift_speed")

BUNDLE = REPO / "edge_agent" / "bundles" / "cabin-v1.tar"
DEV_KEY = REPO / "edge_agent" / "keys" / "dev-release.pub"
PEER_PYTHON = REPO / ".venv-peers" / "bin" / "python"
PEER_SCRIPT = REPO / "benchmarks" / "peers" / "drift_peer.py"
SIGNALS = ("class_mix", "confidence", "pca_error", "coactivation")


@dataclass
class Data:
    """The reference, the windows and where drift was injected."""

    names: list[str]
    reference: np.ndarray  # float32 [n, F]
    reference_rows: np.ndarray  # row indexes into the dataset
    windows: np.ndarray  # float32 [W, m, F]
    window_rows: np.ndarray  # int [W, m]
    injected: np.ndarray  # bool [W, F]
    drifted_window: np.ndarray  # bool [W]


def make_data(args: argparse.Namespace) -> Data:
    """Seeded reference and windows from the cabin dataset, drift injected into a share of the windows."""
    names, x, _ = load_dataset()
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(x.shape[0])
    ref_rows, pool = order[: args.reference_rows], order[args.reference_rows :]
    reference = x[ref_rows]
    mean, std = reference.mean(axis=0), reference.std(axis=0)
    n_features = x.shape[1]
    window_rows = np.stack([rng.choice(pool, args.rows, replace=False) for _ in range(args.windows)])
    windows = x[window_rows]  # [W, m, F] copy
    injected = np.zeros((args.windows, n_features), dtype=bool)
    drifted = rng.random(args.windows) < args.drift_share
    for w in np.flatnonzero(drifted):
        for f in rng.choice(n_features, int(rng.integers(1, 9)), replace=False):
            col = windows[w, :, f]
            if rng.random() < 0.5:
                delta = float(np.exp(rng.uniform(np.log(0.03), np.log(1.0))))
                windows[w, :, f] = col + np.float32(delta * std[f])
            else:
                gain = float(rng.uniform(1.05, 1.6))
                windows[w, :, f] = mean[f] + (col - mean[f]) * np.float32(gain)
            injected[w, f] = True
    return Data(names, reference, ref_rows, windows, window_rows, injected, drifted)


def take(out: ModelOutputs, rows: np.ndarray) -> ModelOutputs:
    """The model outputs of some rows."""
    return ModelOutputs(
        pred=out.pred[rows],
        probs=out.probs[rows],
        confidence=out.confidence[rows],
        calibrated=out.calibrated[rows],
        act_bits=out.act_bits[rows],
        coact=out.coact[rows],
        hidden_units=out.hidden_units,
    )


def record_blocks(bins: ReferenceBins, runner: ModelRunner, data: Data) -> tuple[RecordBlock, list[RecordBlock]]:
    """The reference's and every window's record block, with the model's outputs (untimed preparation)."""
    _, x, _ = load_dataset()
    base = runner.run(x)  # every dataset record once; only drifted windows need the model again
    ref_block = record_block(bins, data.reference, take(base, data.reference_rows))
    blocks = []
    for w in range(data.windows.shape[0]):
        out = runner.run(data.windows[w]) if data.drifted_window[w] else take(base, data.window_rows[w])
        blocks.append(record_block(bins, data.windows[w], out))
    return ref_block, blocks


def ms(seconds: list[float]) -> dict[str, float]:
    """Mean, median and p95 of per-window times, in milliseconds."""
    a = np.asarray(seconds) * 1000
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p95": float(np.percentile(a, 95))}


def agreement(decisions: np.ndarray, exact: np.ndarray, injected: np.ndarray) -> dict[str, Any]:
    """How ``decisions`` compare with the exact KS decisions, and with where drift was injected."""
    d, e = decisions.astype(bool), exact.astype(bool)
    return {
        "agreement": float((d == e).mean()),
        "both_drift": int((d & e).sum()),
        "only_this": int((d & ~e).sum()),
        "only_exact": int((~d & e).sum()),
        "neither": int((~d & ~e).sum()),
        "detected_injected": float(d[injected].mean()) if injected.any() else None,
        "false_alarms_untouched": float(d[~injected].mean()),
    }


def bh_decisions(feature_p: np.ndarray, signal_p: np.ndarray, q: float, *, per_window: bool) -> np.ndarray:
    """Feature decisions under BH over each window's family (features + signals), or over all windows at once."""
    family = np.concatenate([feature_p, signal_p], axis=1)
    nf = feature_p.shape[1]
    if per_window:
        return np.stack([benjamini_hochberg(row, q)[0][:nf] for row in family])
    return benjamini_hochberg(family, q)[0][:, :nf]


def run_peer(tool: str, folder: Path) -> dict[str, Any]:
    """Run one peer tool in ``.venv-peers`` on the windows written to ``folder``."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(PEER_PYTHON), str(PEER_SCRIPT), "--tool", tool, "--data", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    log.info("%s done in %.0f s (process, imports and warm-up included)", tool, time.perf_counter() - t0)
    return result


def main() -> int:
    """Run the benchmark and print its account and JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=1000, help="records per window")
    parser.add_argument("--reference-rows", type=int, default=5000)
    parser.add_argument("--drift-share", type=float, default=0.3, help="share of windows with injected drift")
    parser.add_argument("--peer-windows", type=int, default=10, help="windows Evidently reports on")
    parser.add_argument("--alibi-windows", type=int, default=50, help="windows alibi-detect reports on")
    parser.add_argument("--no-peers", action="store_true", help="skip Evidently and alibi-detect")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    setup_logging()
    thr = DriftThresholds()
    q = thr.fdr_q

    t0 = time.perf_counter()
    data = make_data(args)
    bundle = load_bundle(BUNDLE, load_public_keys([DEV_KEY]))
    bins = ReferenceBins.from_manifest(bundle.manifest)
    runner = ModelRunner(bundle)
    ref_block, blocks = record_blocks(bins, runner, data)
    ref_counts = reference_counts(bins, sketch_block(bins, ref_block, received_at=0.0))
    n_windows, n_features = data.injected.shape
    log.info(
        "data ready in %.1f s: %d windows x %d records x %d features, %d drifted windows, %d injected pairs",
        time.perf_counter() - t0,
        n_windows,
        args.rows,
        n_features,
        int(data.drifted_window.sum()),
        int(data.injected.sum()),
    )
    jiffies = cpu_jiffies()

    # ------------------------------------------------------------------ the collector, per window
    sketch_s, evaluate_s = [], []
    counts: dict[str, WindowCounts] = {}
    reports: list[DriftReport] = []
    for w, block in enumerate(blocks):
        a = time.perf_counter()
        sketch = sketch_block(bins, block, received_at=float(args.rows))
        b = time.perf_counter()
        # Independent synthetic rows with no time axis: evaluated as the offline evaluation evaluates a file
        # (dependence from the rows' order only). A deployed window is also capped by its time span.
        wc = window_counts(bins, sketch, EffectiveSizes.of(sketch))
        report = evaluate_windows(ref_counts, wc, thr)
        c = time.perf_counter()
        sketch_s.append(b - a)
        evaluate_s.append(c - b)
        counts[f"w{w}"] = wc
        reports.append(report)
    report_s = [s + e for s, e in zip(sketch_s, evaluate_s, strict=True)]
    a = time.perf_counter()
    family = evaluate_family(ref_counts, counts, thr)
    family_s = time.perf_counter() - a
    log.info("collector: %d windows sketched and evaluated in %.1f s", n_windows, sum(report_s) + family_s)

    columns_s, columns_p = [], []
    for w in range(n_windows):
        a = time.perf_counter()
        _, p = ks_columns(data.reference, data.windows[w])
        columns_s.append(time.perf_counter() - a)
        columns_p.append(p)
    log.info("ks_columns: %.1f s; scipy ks_2samp next (the slowest part)", sum(columns_s))

    scipy_s, exact_p = [], []
    for w in range(n_windows):
        a = time.perf_counter()
        exact_p.append(
            [float(stats.ks_2samp(data.reference[:, f], data.windows[w, :, f]).pvalue) for f in range(n_features)]
        )
        scipy_s.append(time.perf_counter() - a)
    busy = busy_share(jiffies, cpu_jiffies())
    log.info("scipy ks_2samp: %.1f s", sum(scipy_s))

    # ------------------------------------------------------------------ decisions
    signal_p = np.array(
        [[np.nan if getattr(r, s).p_value is None else getattr(r, s).p_value for s in SIGNALS] for r in reports]
    )
    family_signal_p = np.array(
        [
            [
                np.nan if getattr(family[f"w{w}"], s).p_value is None else getattr(family[f"w{w}"], s).p_value
                for s in SIGNALS
            ]
            for w in range(n_windows)
        ]
    )
    exact_p_arr = np.asarray(exact_p)
    exact = bh_decisions(exact_p_arr, signal_p, q, per_window=True)
    exact_family = bh_decisions(exact_p_arr, family_signal_p, q, per_window=False)
    binned = np.array([[f.ks.verdict == "drift" for f in r.features] for r in reports])
    verdict = np.array([[f.verdict == "drift" for f in r.features] for r in reports])
    binned_family = np.array([[f.ks.verdict == "drift" for f in family[f"w{w}"].features] for w in range(n_windows)])
    columns = bh_decisions(np.asarray(columns_p), signal_p, q, per_window=True)
    inj = data.injected
    results: dict[str, Any] = {
        "binned_ks": agreement(binned, exact, inj),
        "collector_verdict": agreement(verdict, exact, inj),
        "ks_columns": agreement(columns, exact, inj),
        "binned_ks_fleet_family": agreement(binned_family, exact_family, inj),
        "exact_ks": agreement(exact, exact, inj),
    }

    # ------------------------------------------------------------------ peers
    peers: dict[str, Any] = {}
    if not args.no_peers:
        if not PEER_PYTHON.exists():
            log.error("%s not found: run benchmarks/peers/setup.sh (or pass --no-peers)", PEER_PYTHON)
            return 2
        for tool, n_peer in (("evidently", args.peer_windows), ("alibi", args.alibi_windows)):
            n_peer = min(n_peer, n_windows)
            with tempfile.TemporaryDirectory(prefix="drift_speed_") as tmp:
                folder = Path(tmp)
                np.save(folder / "reference.npy", data.reference)
                np.save(folder / "windows.npy", data.windows[:n_peer])
                (folder / "names.json").write_text(json.dumps(data.names))
                out = run_peer(tool, folder)
            dec = np.asarray(out["decisions"], dtype=bool)
            entry = {
                "version": out["version"],
                "windows": n_peer,
                "methods": out["methods"],
                "report_ms": ms(out["seconds"]),
                **agreement(dec, exact[:n_peer], inj[:n_peer]),
                "collector_binned_ks_same_windows": agreement(binned[:n_peer], exact[:n_peer], inj[:n_peer])[
                    "agreement"
                ],
            }
            if "p_values" in out:
                bh = bh_decisions(np.asarray(out["p_values"]), signal_p[:n_peer], q, per_window=True)
                entry["p_values_with_bh"] = agreement(bh, exact[:n_peer], inj[:n_peer])
            peers[tool] = entry

    # ------------------------------------------------------------------ account
    collector_ms = ms(report_s)
    print(
        f"drift_speed: {n_windows} windows x {args.rows} records x {n_features} features "
        f"against {args.reference_rows} reference records (seed {args.seed})"
    )
    print(f"  drifted windows {int(data.drifted_window.sum())}, injected (window, feature) pairs {int(inj.sum())}")
    print(f"  machine busy share during the collector's timings: {busy:.2f}")
    print("collector, per window (ms): mean / median / p95")
    for label, values in (
        ("sketch", sketch_s),
        ("evaluate", evaluate_s),
        ("sketch + evaluate", report_s),
        ("ks_columns (raw)", columns_s),
        ("scipy ks_2samp x40", scipy_s),
    ):
        t = ms(values)
        print(f"  {label:20} {t['mean']:8.2f} {t['median']:8.2f} {t['p95']:8.2f}")
    print(f"  evaluate_family of all {n_windows} windows: {family_s:.2f} s")
    print("decisions vs exact KS (ks_2samp, BH q=0.05 over each window's 40 features + 4 model signals)")
    print("  method                      agreement  both  only-this  only-exact  detected-injected  false-alarms")

    def line(label: str, r: dict[str, Any]) -> None:
        det = "-" if r["detected_injected"] is None else f"{r['detected_injected']:.3f}"
        print(
            f"  {label:27} {r['agreement']:9.4f} {r['both_drift']:5d} {r['only_this']:10d} {r['only_exact']:11d}"
            f" {det:>18} {r['false_alarms_untouched']:13.4f}"
        )

    for key, label in (
        ("binned_ks", "collector binned KS"),
        ("collector_verdict", "collector verdict (+PSI)"),
        ("ks_columns", "collector ks_columns"),
        ("binned_ks_fleet_family", "binned KS, fleet BH"),
        ("exact_ks", "exact KS itself"),
    ):
        line(label, results[key])
    speedup = None
    for tool, entry in peers.items():
        t = entry["report_ms"]
        print(
            f"{tool} {entry['version']} on {entry['windows']} windows: {t['mean']:.1f} ms per report "
            f"(median {t['median']:.1f}); methods: {'; '.join(entry['methods'])}"
        )
        line(f"{tool} (its defaults)", entry)
        if "p_values_with_bh" in entry:
            line(f"{tool} p-values + BH", entry["p_values_with_bh"])
        print(f"  collector binned KS on the same windows: agreement {entry['collector_binned_ks_same_windows']:.4f}")
    if "evidently" in peers:
        speedup = peers["evidently"]["report_ms"]["mean"] / collector_ms["mean"]
        print(f"speedup vs Evidently per report (mean): {speedup:.0f}x (target >= 50)")
    if "alibi" in peers:
        print(
            f"speedup vs alibi-detect per report (mean): "
            f"{peers['alibi']['report_ms']['mean'] / collector_ms['mean']:.1f}x"
        )
    print(
        f"agreement of the collector's binned KS with exact KS: {results['binned_ks']['agreement']:.4f} "
        "(target >= 0.95)"
    )

    emit(
        {
            "benchmark": "drift_speed",
            "windows": n_windows,
            "rows": args.rows,
            "reference_rows": args.reference_rows,
            "features": n_features,
            "seed": args.seed,
            "collector_report_ms": collector_ms,
            "collector_sketch_ms": ms(sketch_s),
            "collector_evaluate_ms": ms(evaluate_s),
            "collector_family_s": family_s,
            "ks_columns_ms": ms(columns_s),
            "scipy_ks_2samp_ms": ms(scipy_s),
            "agreement_binned_ks": results["binned_ks"]["agreement"],
            # The keys of ../shared/BENCHMARKS.md.
            "seconds_ours": sum(report_s),
            "seconds_ours_per_report": collector_ms["mean"] / 1e3,
            "seconds_evidently_per_report": (
                peers["evidently"]["report_ms"]["mean"] / 1e3 if "evidently" in peers else None
            ),
            "seconds_alibi_per_report": peers["alibi"]["report_ms"]["mean"] / 1e3 if "alibi" in peers else None,
            "agreement_with_exact_ks": results["binned_ks"]["agreement"],
            "decisions": results,
            "peers": peers,
            "speedup_vs_evidently": speedup,
            "speedup_vs_alibi": (peers["alibi"]["report_ms"]["mean"] / collector_ms["mean"])
            if "alibi" in peers
            else None,
            "machine_busy_share": busy,
            "machine": machine(),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
