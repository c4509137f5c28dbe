"""Offline evaluation: the collector's drift and performance tests on two CSV files and a model bundle.

``fleetctl drift evaluate --bundle B --reference REF.csv --current CUR.csv`` answers, without a
collector, the question the collector answers for a fleet window: has the current data moved away
from the reference, and how accurate is the model probably on it? The tests are the collector's own,
run the way the collector runs them:

1. The bundle is verified (:func:`shared.bundle.load_bundle` against pinned public keys, golden
   self-test included): its reference bin edges, normalisation and rare-pair mask decide what drift
   is, so an unsigned bundle is refused like on the collector and the agent.
2. The model runs on both files as the agent runs it (missing inputs imputed with the reference
   means, temperature calibration, rare co-activation count on the bundle's pair mask), through
   :mod:`shared.interpreter`. The collector never imports ``edge_agent``; the few lines of
   arithmetic after the interpreter are repeated here (see :class:`ModelRunner`).
3. Both files are sketched on the bundle's reference edges with
   :func:`collector.monitoring.sketches.sketch_block`, exactly as ingest sketches a record block.
   The *reference file's* sketch plays the part of the reference (feature histograms, predicted-
   class shares, confidence, PCA-error and co-activation histograms) and
   :func:`collector.monitoring.drift.evaluate_windows` compares the current file's sketch with it:
   PSI, Hellinger, KL, Jensen-Shannon and binned KS per feature, class mix, confidence shift, PCA
   error and rare co-activations, Benjamini-Hochberg over all of them, the overall verdict.
4. Because the raw samples are at hand, the exact two-sample KS of every feature
   (:func:`collector.monitoring.drift.ks_exact`, i.e. ``scipy.stats.ks_2samp``) is added, with its
   own Benjamini-Hochberg over the features at the same level. It is reported beside the binned
   test, not mixed into the collector's verdict, so the verdict means what it means on the fleet.
5. Label-free accuracy (:mod:`collector.monitoring.performance`): expected accuracy with its
   Poisson-binomial interval for each file, and whether each file lies in the region the
   calibration was fitted on (PCA error and rare co-activations against the *bundle's* reference:
   calibration is a property of the training data, not of the reference file). With a label
   column, realized accuracy (Wilson) and the estimate-vs-realized gap.

Class mix is a chi-square goodness of fit of the current predicted classes against the reference
file's predicted-class shares, taken as known, as the collector takes the training priors. That is
right when the reference is several times larger than the current file (as the training set is);
with files of equal size the test is somewhat anti-conservative.

Everything a report holds is JSON-ready (:func:`evaluate_files` returns a dict);
:func:`render_text` turns it into the operator's text report. Bad input raises
:class:`OfflineInputError` with a stable ``reason`` and a message naming the file, line and column.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from collector.fleetctl import table
from collector.monitoring.dependence import EffectiveSizes, design_effect_of
from collector.monitoring.drift import (
    DriftThresholds,
    ReferenceCounts,
    ScoreHistogram,
    benjamini_hochberg,
    evaluate_windows,
    ks_exact,
)
from collector.monitoring.performance import (
    AccuracyEstimate,
    GapTracker,
    RealizedStats,
    expected_accuracy,
    realized_accuracy,
    region_reliability_from_histograms,
)
from collector.monitoring.sketches import ReferenceBins, SketchError, WindowSketch, sketch_block, window_counts
from shared.bundle import (
    Bundle,
    BundleError,
    calibrate,
    check_tensor_shapes,
    load_bundle,
    rare_pair_indices,
    run_golden,
)
from shared.codec import NO_LABEL, RecordBlock
from shared.interpreter import InterpreterUnavailable, load_interpreter
from shared.signing import SignatureError, load_public_keys

log = logging.getLogger(__name__)

MISSING_TOKENS = frozenset({"", "nan", "na", "n/a", "null", "none"})
"""Cells read as a missing input (case-insensitive), as a failed sensor's NaN on the wire."""

REPORT_FORMAT = 1


class OfflineInputError(ValueError):
    """Input the offline evaluation cannot use. ``reason`` is a stable code, the message says where."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class Table:
    """The model inputs of one CSV file, in the bundle's feature order."""

    path: str
    features: np.ndarray  # float32 [n, F], NaN where missing
    labels: np.ndarray | None  # int64 [n] class index, -1 where unlabelled; None without a label column
    ignored_columns: list[str]

    def __len__(self) -> int:
        return int(self.features.shape[0])


def _open_text(path: Path) -> io.TextIOBase:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise OfflineInputError("unreadable", f"{path}: broken gzip data: {exc}") from None
    try:
        return io.StringIO(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise OfflineInputError("unreadable", f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _parse_column(cells: Sequence[str], lines: Sequence[int], path: Path, column: str) -> np.ndarray:
    """Floats of one column (missing tokens and Inf become NaN); the first non-numeric cell is an error."""
    text = np.char.lower(np.char.strip(np.asarray(cells, dtype=str)))
    missing = np.isin(text, list(MISSING_TOKENS))
    try:
        values = np.where(missing, "nan", text).astype(np.float64)
    except ValueError:
        # Slow path, only to name the first bad cell (or to accept what Python's float reads and numpy's does not).
        parsed = []
        for line, cell, gone in zip(lines, cells, missing, strict=True):
            try:
                parsed.append(math.nan if gone else float(cell))
            except ValueError:
                raise OfflineInputError(
                    "non_numeric", f"{path}: line {line}, column {column!r}: {cell!r} is not a number"
                ) from None
        values = np.asarray(parsed, dtype=np.float64)
    # An infinite reading is no reading: the agent and the sketches treat it as missing too.
    values[~np.isfinite(values)] = np.nan
    return values


def _parse_labels(
    cells: Sequence[str], lines: Sequence[int], labels: Sequence[str], path: Path, column: str
) -> np.ndarray:
    """Class indexes of a label column given as class names or as indexes; blank cells are unlabelled."""
    index = {name: i for i, name in enumerate(labels)}
    out = np.full(len(cells), -1, dtype=np.int64)
    for i, (line, cell) in enumerate(zip(lines, cells, strict=True)):
        value = cell.strip()
        if value.lower() in MISSING_TOKENS:
            continue
        if value in index:
            out[i] = index[value]
            continue
        try:
            k = int(value)
        except ValueError:
            k = -1
        if not 0 <= k < len(labels):
            raise OfflineInputError(
                "bad_label",
                f"{path}: line {line}, column {column!r}: {value!r} is neither a class of the model "
                f"({', '.join(labels)}) nor a class index 0..{len(labels) - 1}",
            )
        out[i] = k
    return out


def read_table(
    path: str | Path, features: Sequence[str], *, labels: Sequence[str] = (), label_column: str | None = None
) -> Table:
    """Read ``path`` (CSV, optionally gzip-compressed) into the model's inputs; other columns are ignored.

    Every name of ``features`` must be a column. Cells may be empty or ``nan``/``NA`` (a missing
    input); anything else that is not a number is an error naming its line and column.
    """
    p = Path(path)
    try:
        stream = _open_text(p)
    except OSError as exc:
        raise OfflineInputError("unreadable", f"{p}: {exc.strerror or exc}") from None
    reader = csv.reader(stream)
    rows: list[list[str]] = []
    lines: list[int] = []  # line number of each row, for error messages
    try:
        header = next(reader)
        for row in reader:
            if any(c.strip() for c in row):  # blank lines carry nothing
                rows.append(row)
                lines.append(reader.line_num)
    except StopIteration:
        raise OfflineInputError("empty", f"{p}: the file is empty (no header line)") from None
    except csv.Error as exc:
        raise OfflineInputError("unreadable", f"{p}: not CSV (line {reader.line_num}): {exc}") from None
    names = [h.strip() for h in header]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise OfflineInputError("duplicate_columns", f"{p}: column(s) {', '.join(map(repr, dupes))} appear twice")
    missing = [f for f in features if f not in names]
    if missing:
        shown = ", ".join(map(repr, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise OfflineInputError(
            "missing_columns", f"{p}: lacks {len(missing)} of the model's {len(features)} feature columns: {shown}"
        )
    if label_column is not None and label_column not in names:
        raise OfflineInputError("missing_columns", f"{p}: has no label column {label_column!r}")
    if not rows:
        raise OfflineInputError("empty", f"{p}: a header but no data rows")
    for line, row in zip(lines, rows, strict=True):
        if len(row) != len(names):
            raise OfflineInputError("ragged_row", f"{p}: line {line} has {len(row)} cells, the header {len(names)}")
    columns = list(zip(*rows, strict=True))
    where = {n: i for i, n in enumerate(names)}
    x = np.empty((len(rows), len(features)), dtype=np.float32)
    for f, name in enumerate(features):
        x[:, f] = _parse_column(columns[where[name]], lines, p, name)
    y = None
    if label_column is not None:
        y = _parse_labels(columns[where[label_column]], lines, labels, p, label_column)
    used = {*features, *([label_column] if label_column else [])}
    return Table(str(p), x, y, [n for n in names if n not in used])


# ---------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelOutputs:
    """What the agent would have sent for each row: prediction, confidences, activations."""

    pred: np.ndarray  # int16 [n]
    probs: np.ndarray  # float32 [n, C]
    confidence: np.ndarray  # float32 [n], raw top-class probability
    calibrated: np.ndarray  # float32 [n], calibrated top-class confidence
    act_bits: np.ndarray  # uint8 [n, ceil(H / 8)]
    coact: np.ndarray  # uint16 [n], rare co-activation count
    hidden_units: int


class ModelRunner:
    """A verified bundle's model run on feature rows with the agent's arithmetic (``edge_agent.inference``).

    The golden self-test runs first, as on a device. Inputs: missing values imputed with the
    reference means, then ``(x - mean) / std`` in float32; outputs clipped to [0, 1], calibrated by
    the bundle's temperature, hidden units active when > 0, rare pairs from the bundle's mask.
    """

    def __init__(self, bundle: Bundle) -> None:
        m = bundle.manifest
        try:
            self.interpreter: Any = load_interpreter(bundle.model)
        except InterpreterUnavailable as exc:
            raise OfflineInputError("no_runtime", str(exc)) from None
        except (ValueError, RuntimeError) as exc:
            raise OfflineInputError("bad_bundle", f"the TFLite runtime rejects model.tflite: {exc}") from None
        try:
            check_tensor_shapes(bundle, self.interpreter)
            run_golden(bundle, self.interpreter)
        except BundleError as exc:
            raise OfflineInputError("bad_bundle", str(exc)) from None
        outputs = self.interpreter.get_output_details()
        self._in = int(self.interpreter.get_input_details()[0]["index"])
        self._out_p = int(outputs[m.probabilities.index]["index"])
        self._out_h = int(outputs[m.hidden.index]["index"])
        self.mean = np.asarray(m.normalisation.mean, np.float32)
        self.std = np.asarray(m.normalisation.std, np.float32)
        self.impute = np.asarray([f.mean for f in m.reference.features], np.float32)
        self.temperature = m.calibration.temperature
        self.n_classes = len(m.labels)
        self.n_hidden = m.n_hidden
        self.pair_i, self.pair_j = rare_pair_indices(m.reference.coactivation, self.n_hidden)

    def run(self, features: np.ndarray) -> ModelOutputs:
        """Model outputs for ``[n, F]`` physical feature rows (NaN where missing)."""
        x = np.asarray(features, np.float32)
        filled = np.where(np.isfinite(x), x, self.impute)
        inputs = (filled - self.mean) / self.std
        n = x.shape[0]
        probs = np.empty((n, self.n_classes), np.float32)
        hidden = np.empty((n, self.n_hidden), np.float32)
        interp, one = self.interpreter, np.zeros((1, x.shape[1]), np.float32)
        for i in range(n):
            one[0] = inputs[i]
            interp.set_tensor(self._in, one)
            interp.invoke()
            probs[i] = interp.get_tensor(self._out_p)[0]
            hidden[i] = interp.get_tensor(self._out_h)[0]
        np.clip(probs, 0.0, 1.0, out=probs)
        pred = probs.argmax(axis=1)
        rows = np.arange(n)
        calibrated = calibrate(probs, self.temperature)[rows, pred].astype(np.float32)
        active = hidden > 0
        coact = (
            (active[:, self.pair_i] & active[:, self.pair_j]).sum(axis=1) if self.pair_i.size else np.zeros(n, np.int64)
        )
        return ModelOutputs(
            pred=pred.astype(np.int16),
            probs=probs,
            confidence=probs[rows, pred],
            calibrated=calibrated,
            act_bits=np.packbits(active, axis=1),
            coact=np.minimum(coact, np.iinfo(np.uint16).max).astype(np.uint16),
            hidden_units=self.n_hidden,
        )


# ---------------------------------------------------------------------------------- sketching


def record_block(
    bins: ReferenceBins, features: np.ndarray, out: ModelOutputs, labels: np.ndarray | None = None
) -> RecordBlock:
    """Rows and their model outputs as the record block a device would send (in row order, 1 s apart)."""
    n = int(features.shape[0])
    ts = np.arange(n, dtype=np.float64)
    return RecordBlock(
        role="active",
        model_name=bins.model_name,
        model_version=bins.model_version,
        seq=np.arange(1, n + 1, dtype=np.uint64),
        ts=ts,
        mono=ts,
        pred=out.pred,
        probs=out.probs,
        confidence=out.confidence,
        calibrated=out.calibrated,
        features=features,
        act_bits=out.act_bits,
        hidden_units=out.hidden_units,
        act_sample_idx=np.zeros(0, np.uint32),
        act_sample=np.zeros((0, out.hidden_units), np.float16),
        coact=out.coact,
        latency_us=np.zeros(n, np.float32),
        sensor_flags=np.zeros(n, np.uint16),
        label=np.full(n, NO_LABEL, np.int16) if labels is None else labels.astype(np.int16),
    )


def sketch_table(bins: ReferenceBins, table: Table, out: ModelOutputs) -> WindowSketch:
    """The sketch ingest would make of the file's rows as one record block."""
    try:
        return sketch_block(bins, record_block(bins, table.features, out, table.labels), received_at=float(len(table)))
    except SketchError as exc:
        raise OfflineInputError("unsketchable", f"{table.path}: {exc}") from None


def reference_counts(bins: ReferenceBins, sketch: WindowSketch) -> ReferenceCounts:
    """The reference side of the drift tests from the reference file's sketch (on the bundle's edges)."""
    n_pred = int(sketch.class_counts.sum())
    priors = sketch.class_counts / n_pred if n_pred else np.full(bins.n_classes, 1.0 / bins.n_classes)
    return ReferenceCounts(
        feature_names=list(bins.feature_names),
        feature_edges=list(bins.feature_edges),
        feature_counts=[sketch.feature_hist[f, :nb].copy() for f, nb in enumerate(bins.feature_nbins)],
        class_priors=np.asarray(priors, dtype=np.float64),
        confidence=ScoreHistogram(bins.confidence_edges, sketch.confidence_hist),
        pca_error=ScoreHistogram(bins.pca_edges, sketch.pca_hist),
        coactivation=ScoreHistogram(bins.coact_edges, sketch.coact_hist),
    )


# ---------------------------------------------------------------------------------- evaluation


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        return _finite(value.item())
    return value


def _estimate(est: AccuracyEstimate) -> dict[str, Any]:
    return asdict(est)


def exact_ks(
    reference: np.ndarray, current: np.ndarray, names: Sequence[str], thresholds: DriftThresholds
) -> list[dict[str, Any]]:
    """Exact two-sample KS (``scipy.stats.ks_2samp``) per feature, Benjamini-Hochberg over the features."""
    results = [
        ks_exact(
            reference[:, f],
            current[:, f],
            alpha=thresholds.fdr_q,
            min_current=thresholds.min_current,
            min_reference=thresholds.min_reference,
        )
        for f in range(len(names))
    ]
    p = np.array([np.nan if r.p_value is None else r.p_value for r in results])
    _, q = benjamini_hochberg(p, thresholds.fdr_q)
    out = []
    for r, qv in zip(results, q, strict=True):
        d = r.to_dict()
        if r.verdict != "not_enough_data":
            d["q_value"] = float(qv)
            d["verdict"] = "drift" if qv <= thresholds.fdr_q else "ok"
        out.append(d)
    return out


def _model_summary(
    bundle: Bundle, sketch: WindowSketch, out: ModelOutputs, table: Table, level: float
) -> dict[str, Any]:
    m = bundle.manifest
    n = len(table)
    eff = EffectiveSizes.of(sketch)  # the file's rows in their order, as one stream
    deffs = (design_effect_of(sketch.n, eff.pca), design_effect_of(sketch.n, eff.coact))
    region = region_reliability_from_histograms(m.reference, sketch.pca_hist, sketch.coact_hist, design_effects=deffs)
    summary: dict[str, Any] = {
        "rows": n,
        "class_counts": dict(zip(m.labels, sketch.class_counts.tolist(), strict=True)),
        "mean_calibrated_confidence": float(out.calibrated.mean()),
        "expected_accuracy": _estimate(expected_accuracy(out.calibrated.astype(np.float64), level)),
        "region": asdict(region),
        "coactivation": {
            "mean": sketch.coact_sum / n,
            "above_reference_p99": sketch.coact_exceed,
            "rate_above_reference_p99": sketch.coact_exceed / n,
            "reference_p99": m.reference.coactivation.p99,
        },
        "pca_error": {
            "mean": sketch.pca_sum / n,
            "above_reference_p99": sketch.pca_exceed,
            "rate_above_reference_p99": sketch.pca_exceed / n,
            "reference_p99": m.reference.pca.error_p99,
        },
        "realized_accuracy": None,
        "gap": None,
    }
    if table.labels is not None:
        labelled = table.labels >= 0
        correct = table.labels[labelled] == out.pred[labelled]
        summary["realized_accuracy"] = _estimate(
            realized_accuracy(RealizedStats(int(labelled.sum()), int(correct.sum())), level)
        )
        tracker = GapTracker(level)
        tracker.add(m.version, out.calibrated[labelled].astype(np.float64), correct)
        summary["gap"] = asdict(tracker.gap(m.version))
    return summary


def _file_summary(table: Table, sketch: WindowSketch, names: Sequence[str]) -> dict[str, Any]:
    return {
        "path": table.path,
        "rows": len(table),
        "labelled": None if table.labels is None else int((table.labels >= 0).sum()),
        "ignored_columns": table.ignored_columns,
        "missing": {name: int(k) for name, k in zip(names, sketch.feature_nan.tolist(), strict=True) if k},
        "rows_with_missing": sketch.records_missing,
        "stuck": {name: int(k) for name, k in zip(names, sketch.feature_stuck.tolist(), strict=True) if k},
    }


def evaluate(
    bundle: Bundle,
    reference: Table,
    current: Table,
    *,
    thresholds: DriftThresholds | None = None,
    level: float = 0.95,
) -> dict[str, Any]:
    """The offline report of ``current`` against ``reference`` under ``bundle``'s model (JSON-ready dict)."""
    started = time.perf_counter()
    thr = thresholds or DriftThresholds()
    m = bundle.manifest
    bins = ReferenceBins.from_manifest(m)
    runner = ModelRunner(bundle)
    out_ref, out_cur = runner.run(reference.features), runner.run(current.features)
    s_ref, s_cur = sketch_table(bins, reference, out_ref), sketch_table(bins, current, out_cur)
    # The file's rows carry no times: their dependence is what their order shows, with no time cap.
    counts = window_counts(bins, s_cur, EffectiveSizes.of(s_cur))
    report = evaluate_windows(reference_counts(bins, s_ref), counts, thr).to_dict()
    exact = exact_ks(reference.features, current.features, m.features, thr)
    for feature, ks in zip(report["features"], exact, strict=True):
        feature["ks_exact"] = ks
    exact_drift = [f["name"] for f in report["features"] if f["ks_exact"]["verdict"] == "drift"]
    out = {
        "format": REPORT_FORMAT,
        "bundle": {"model_name": m.name, "model_version": m.version, "key_id": bundle.key_id, "verified": True},
        "reference": _file_summary(reference, s_ref, m.features),
        "current": _file_summary(current, s_cur, m.features),
        "thresholds": asdict(thr),
        "verdict": report.pop("verdict"),
        "reasons": report.pop("reasons"),
        "drift": report,
        "ks_exact": {
            "test": "scipy.stats.ks_2samp per feature, Benjamini-Hochberg over the features",
            "fdr_q": thr.fdr_q,
            "n_drifting": len(exact_drift),
            "drifting": exact_drift,
        },
        "model": {
            "reference": _model_summary(bundle, s_ref, out_ref, reference, level),
            "current": _model_summary(bundle, s_cur, out_cur, current, level),
        },
        "elapsed_s": time.perf_counter() - started,
    }
    out["drift"].pop("thresholds", None)
    return _finite(out)


def load_verified_bundle(path: str | Path, key_files: Sequence[str | Path]) -> Bundle:
    """The bundle at ``path``, verified against the public keys in ``key_files`` (at least one)."""
    if not key_files:
        raise OfflineInputError("no_trusted_key", "a bundle is only used with a trusted public key to verify it")
    try:
        keys = load_public_keys([Path(k) for k in key_files])
    except OSError as exc:
        raise OfflineInputError("bad_key", f"cannot read key file {exc.filename}: {exc.strerror}") from None
    except (ValueError, SignatureError) as exc:
        raise OfflineInputError("bad_key", f"not a public key file: {exc}") from None
    if not keys:
        raise OfflineInputError("bad_key", "the key files hold no public key")
    if not Path(path).exists():
        raise OfflineInputError("bad_bundle", f"{path}: no such file")
    try:
        return load_bundle(Path(path), keys, check_tensors=False)
    except (OSError, BundleError, SignatureError) as exc:
        raise OfflineInputError("bad_bundle", f"{path}: {exc}") from None


def evaluate_files(
    bundle_path: str | Path,
    reference_path: str | Path,
    current_path: str | Path,
    *,
    trusted_keys: Sequence[str | Path],
    label_column: str | None = None,
    thresholds: DriftThresholds | None = None,
    level: float = 0.95,
) -> dict[str, Any]:
    """Verify the bundle, read both CSV files and return :func:`evaluate`'s report, with the paths."""
    bundle = load_verified_bundle(bundle_path, trusted_keys)
    m = bundle.manifest
    ref = read_table(reference_path, m.features, labels=m.labels, label_column=label_column)
    cur = read_table(current_path, m.features, labels=m.labels, label_column=label_column)
    report = evaluate(bundle, ref, cur, thresholds=thresholds, level=level)
    report["bundle"]["path"] = str(bundle_path)
    log.info(
        "offline evaluation of %s against %s: %s in %.2f s",
        current_path,
        reference_path,
        report["verdict"],
        report["elapsed_s"],
    )
    return report


# -------------------------------------------------------------------------------- text report


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def _test_line(t: dict[str, Any]) -> str:
    q = "" if t.get("q_value") is None else f", q {_num(t['q_value'])}"
    p = "" if t.get("p_value") is None else f", p {_num(t['p_value'])}"
    return f"{t['name']:18} {t['verdict']:16} statistic {_num(t['statistic'])}{p}{q}"


def _accuracy(est: dict[str, Any] | None) -> str:
    if est is None:
        return "-"
    if est["low"] is None:
        return f"not enough data (n = {est['n']})"
    return f"{est['estimate']:.3f} [{est['low']:.3f}, {est['high']:.3f}] ({est['method']}, n = {est['n']})"


def render_text(report: dict[str, Any]) -> str:
    """The operator's text report of :func:`evaluate`'s dict."""
    thr = report["thresholds"]
    b, ref, cur = report["bundle"], report["reference"], report["current"]
    lines = [
        f"Offline drift evaluation: {b['model_name']} {b['model_version']} (signed by {b['key_id']})",
        f"reference {ref['path']}: {ref['rows']} rows; current {cur['path']}: {cur['rows']} rows",
        "",
        f"VERDICT: {report['verdict'].upper()}",
        *[f"  - {r}" for r in report["reasons"]],
        "",
        f"Features (drift: binned KS q <= {thr['fdr_q']} and PSI >= {thr['psi_minor']}; "
        f"major PSI >= {thr['psi_major']}; overall drift from a share of {thr['drift_share']}):",
    ]
    rows = [
        (
            f["name"],
            _num(f["psi"]),
            _num(f["hellinger"]),
            _num(f["jensen_shannon"]),
            _num(f["ks"]["statistic"]),
            _num(f["ks"].get("q_value")),
            _num(f["ks_exact"]["statistic"]),
            _num(f["ks_exact"].get("q_value")),
            f["severity"],
            f["verdict"],
        )
        for f in report["drift"]["features"]
    ]
    header = ("FEATURE", "PSI", "HELLINGER", "JS", "KS_BIN", "Q_BIN", "KS_EXACT", "Q_EXACT", "SEVERITY", "VERDICT")
    lines.append(table(rows, header))
    d = report["drift"]
    lines += [
        f"{d['n_drifting']} of {d['n_tested']} tested features drift (share {d['drift_share']:.2f}), "
        f"max PSI {_num(d['max_psi'])}; exact KS significant on {report['ks_exact']['n_drifting']}",
        "",
        "Model signals (current against reference):",
        *[f"  {_test_line(d[k])}" for k in ("class_mix", "confidence", "pca_error", "coactivation")],
        "",
        "Model on each file:",
    ]
    for side in ("reference", "current"):
        s = report["model"][side]
        region = s["region"]
        why = f" ({region['reason']})" if region["reason"] else ""
        lines += [
            f"  {side}:",
            f"    predicted classes  {', '.join(f'{k} {v}' for k, v in s['class_counts'].items())}",
            f"    expected accuracy  {_accuracy(s['expected_accuracy'])}",
            f"    calibration region {region['verdict']}{why}",
            f"    rare co-activation mean {_num(s['coactivation']['mean'])}, "
            f"{s['coactivation']['rate_above_reference_p99']:.1%} above the reference p99; "
            f"PCA error mean {_num(s['pca_error']['mean'])}, "
            f"{s['pca_error']['rate_above_reference_p99']:.1%} above the reference p99",
        ]
        if s["realized_accuracy"] is not None:
            gap = s["gap"]
            gap_text = "-" if gap is None or gap["gap"] is None else f"{gap['gap']:+.3f}"
            lines.append(f"    realized accuracy  {_accuracy(s['realized_accuracy'])}; realized - expected {gap_text}")
    for side, s in (("reference", ref), ("current", cur)):
        if s["missing"] or s["stuck"]:
            lines.append(f"  {side} data quality: missing {s['missing'] or 'none'}; stuck {s['stuck'] or 'none'}")
    lines.append(f"\n(evaluated in {report['elapsed_s']:.2f} s)")
    return "\n".join(lines)
