"""NannyML's CBPE on the gas-drift batches: the peer half of ``benchmarks/gas_drift.py``.

Runs ONLY in the peer environment (``.venv-peers``, made by ``benchmarks/peers/setup.sh``); the
project's environment never imports NannyML. ``gas_drift.py`` exports, per training seed, the very
records the agents sent and the collector stored (the model's per-class probabilities as carried on
the wire, float16, the predicted class and the label) for the reference phase (the held-out rows of
batches 1-2) and for each replayed batch, into one ``.npz``; this script fits CBPE on each seed's
reference and estimates the accuracy of each batch as a single chunk, and prints one JSON line.

CBPE is given the model's raw probabilities and calibrates them itself (its default, isotonic, fitted
on the reference), as NannyML is meant to be used. Thresholds (its alert rule) come from the
reference split into NannyML's default ten chunks; each batch is then estimated as one chunk, so
its sampling error is that of the whole batch.

Input layout (``np.load``): ``classes`` (str), ``index`` (JSON ``{"seeds": [...], "phases": [...]}``),
and per seed ``s`` and phase ``p`` (``ref`` or a batch number): ``s{s}_{p}_probs`` float ``[n, C]``,
``s{s}_{p}_pred`` int ``[n]``, and ``s{s}_ref_label`` int ``[n]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from typing import Any

import numpy as np


def _frame(classes: list[str], probs: np.ndarray, pred: np.ndarray, label: np.ndarray | None) -> Any:
    import pandas as pd

    df = pd.DataFrame({f"p_{c}": probs[:, i].astype(np.float64) for i, c in enumerate(classes)})
    df["y_pred"] = np.asarray(classes)[pred]
    if label is not None:
        df["y_true"] = np.asarray(classes)[label]
    return df


def estimate(npz_path: str) -> dict[str, Any]:
    """CBPE accuracy per seed and phase: value, sampling error, confidence band, thresholds, alert."""
    import nannyml as nml
    from nannyml.chunk import CountBasedChunker

    data = np.load(npz_path, allow_pickle=False)
    classes = [str(c) for c in data["classes"]]
    index = json.loads(str(data["index"]))
    out: dict[str, Any] = {"nannyml_version": nml.__version__, "seeds": {}}
    started = time.perf_counter()
    for seed in index["seeds"]:
        reference = _frame(classes, data[f"s{seed}_ref_probs"], data[f"s{seed}_ref_pred"], data[f"s{seed}_ref_label"])
        cbpe = nml.CBPE(
            metrics=["accuracy"],
            y_pred_proba={c: f"p_{c}" for c in classes},
            y_pred="y_pred",
            y_true="y_true",
            problem_type="classification_multiclass",
        )
        cbpe.fit(reference)
        # Fitted (calibrators, thresholds) on the reference's default chunks; estimate each batch whole.
        cbpe.chunker = CountBasedChunker(chunk_number=1)
        per_phase: dict[str, Any] = {}
        for phase in index["phases"]:
            key = f"s{seed}_{phase}"
            frame = _frame(classes, data[f"{key}_probs"], data[f"{key}_pred"], None)
            row = cbpe.estimate(frame).filter(period="analysis").to_df().iloc[0]
            per_phase[str(phase)] = {
                "n": len(frame),
                "estimate": _num(row[("accuracy", "value")]),
                "sampling_error": _num(row[("accuracy", "sampling_error")]),
                "low": _num(row[("accuracy", "lower_confidence_boundary")]),
                "high": _num(row[("accuracy", "upper_confidence_boundary")]),
                "lower_threshold": _num(row[("accuracy", "lower_threshold")]),
                "alert": bool(row[("accuracy", "alert")]),
            }
        out["seeds"][str(seed)] = per_phase
    out["seconds"] = time.perf_counter() - started
    return out


def _num(value: Any) -> float | None:
    x = float(value)
    return x if np.isfinite(x) else None


def main(argv: list[str] | None = None) -> int:
    """Estimate and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("npz", help="records exported by benchmarks/gas_drift.py")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    warnings.simplefilter("ignore")  # NannyML and pandas deprecation chatter; the figures are what we need
    print(json.dumps(estimate(args.npz)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
