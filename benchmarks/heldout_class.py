"""Held-out-class experiment (after Myllyaho et al. 2022): do unseen-class inputs fire more rare co-activations?

Method
------
Data: scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``: 1,797 images of
8x8 pixels, 64 integer features 0..16, 10 classes of about 180 images each). For every held-out
digit ``c`` and every seed ``s``:

1. The images of the other nine digits are split, stratified and seeded with ``s``, into a
   training pool (70 %) and a test set (30 %). No image of ``c`` is in the pool.
2. The pool is written to a CSV and handed to the project's reference trainer
   (:func:`collector.training.trainer.train_bundle`, seed ``s``, 64 hidden units, signed with the
   development key). The trainer splits the pool again (70 / 15 / 15 train / validation / test)
   and fixes the rare-pair mask on its training split alone.
3. The bundle is loaded as a device loads it (signature checked against the pinned development
   key) and run by the agent's own :class:`edge_agent.inference.Engine` on the test set of seen
   digits and on every image of ``c``. The rare co-activation count of an input is the engine's
   ``coact`` column, the number the device puts into every record: the experiment measures the
   product, not a re-implementation of it.

Rarity rules (every one fixed on the trainer's training split only)
-------------------------------------------------------------------
* ``shipped``: the bundle exactly as the trainer wrote it. A pair of hidden units is rare when it
  fires together in fewer than 1 % of the training records although each unit fires in at least
  10 % of them (``collector.training.reference``).
* ``rarest q`` (q = 0.5 %, 1 %, 5 %): the same rule (:func:`collector.training.reference.coactivation_reference`)
  with the threshold set to the q-quantile of the joint firing frequencies of all pairs on the
  training split, so that about a share q of the pairs counts as rare whatever the data. The
  trainer's training split is rebuilt with its own :func:`stratified_split` on the same CSV and
  seed (checked: the engine's activation frequencies on it equal the bundle's reference), the
  engine's activation bits on it give the joint frequencies, and the bundle is re-signed with the
  new co-activation reference (mask, held-out count histogram, mean, p99) and loaded and run
  through the engine like the shipped one. Nothing is fitted on test or unseen inputs.

Reported per rule and held-out digit: test accuracy of seen digits; number of rare pairs; mean
count of correctly and incorrectly classified test inputs and of unseen-digit inputs; the AUROC
of unseen against correct (``sklearn.metrics.roc_auc_score``, score = count, ties count half);
for comparison the AUROC of the usual baseline, one minus the calibrated top-class confidence,
from the same engine run; and the share of correct and of unseen inputs whose count exceeds the
bundle's reference 99th percentile (what the collector's "in reference region" test counts).
The table shows the mean over the seeds and, in brackets, the range.

Run: ``.venv/bin/python benchmarks/heldout_class.py`` (10 digits x 3 seeds, about four minutes on
the 2-core machine); ``--quick`` runs digits 0 and 1 with seed 0. Needs the ``train`` extra
(TensorFlow) and scikit-learn (``dev`` extra).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.common import REPO, emit, machine, setup_logging, table

log = logging.getLogger("benchmarks.heldout_class")

SIGNING_KEY = REPO / "collector" / "training" / "dev-release-key.pem"
TRUSTED_KEY = REPO / "edge_agent" / "keys" / "dev-release.pub"
LABEL_COLUMN = "digit"
TEST_FRACTION = 0.3
HIDDEN_UNITS = 64
DEFAULT_SEEDS = (0, 1, 2)
QUICK_CLASSES = (0, 1)
SHIPPED = "shipped"
PAIR_QUANTILES = (0.005, 0.01, 0.05)
# The engine's activation bits on the rebuilt training split must reproduce the bundle's reference
# frequencies; a unit whose activation sits at 0 can flip between Keras and TFLite, hence not exact.
FREQUENCY_TOLERANCE = 2e-3


@dataclass(frozen=True)
class Trial:
    """One rarity rule on one model trained without ``held_out`` (seed ``seed``), as the engine measured it."""

    held_out: int
    seed: int
    rule: str
    threshold: float
    """joint firing frequency below which a pair is rare"""
    train_labels: list[str]
    """the classes the bundle knows (its manifest's labels)"""
    rows_pool: int
    rows_test: int
    rare_pairs: int
    reference_mean: float
    """mean count on the trainer's held-out split (the bundle's reference)"""
    reference_p99: float
    test_accuracy: float
    """engine accuracy on the test set of seen digits"""
    n_correct: int
    n_incorrect: int
    n_unseen: int
    mean_correct: float
    mean_incorrect: float | None
    """``None`` when every test input was classified correctly"""
    mean_unseen: float
    auroc_coact: float
    """unseen (positive) against correct, scored by the rare co-activation count"""
    auroc_confidence: float
    """the same, scored by one minus the calibrated top-class confidence"""
    above_p99_correct: float
    above_p99_unseen: float
    unit_frequency_min: float
    """least share of training-split records in which a hidden unit fires (same for every rule of a model)"""
    unit_frequency_max: float
    joint_frequency_min: float
    """share of training-split records in which the most rarely co-firing pair of units fires together"""


def rule_name(quantile: float) -> str:
    """``rarest 1%`` for 0.01."""
    return f"rarest {quantile * 100:g}%"


def load_digits_data() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images as ``[1797, 64]`` float32 pixels, labels 0..9, and the pixel names."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data.astype(np.float32), digits.target.astype(np.int64), list(digits.feature_names)


def split_seen(
    y: np.ndarray, held_out: int, seed: int, test_fraction: float = TEST_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """Indexes of the training pool and the test set, both of seen digits only (stratified, seeded)."""
    from sklearn.model_selection import train_test_split

    seen = np.flatnonzero(y != held_out)
    pool, test = train_test_split(seen, test_size=test_fraction, random_state=seed, stratify=y[seen])
    return np.sort(pool), np.sort(test)


def write_csv(path: Path, x: np.ndarray, y: np.ndarray, names: list[str]) -> None:
    """The trainer's input: one column per pixel (integers, as the data set stores them) and the label."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*names, LABEL_COLUMN])
        for row, label in zip(x, y, strict=True):
            writer.writerow([*(int(v) for v in row), int(label)])


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """AUROC of ``positive`` scores against ``negative`` ones (higher score = more likely positive)."""
    from sklearn.metrics import roc_auc_score

    scores = np.concatenate([positive, negative]).astype(np.float64)
    truth = np.concatenate([np.ones(positive.size), np.zeros(negative.size)])
    return float(roc_auc_score(truth, scores))


# ----------------------------------------------------------------------------------- trials


@dataclass(frozen=True)
class Case:
    """One trained model: its bundle, the data around it, and the trainer's own splits of the pool."""

    held_out: int
    seed: int
    bundle_path: Path
    csv_path: Path
    pool: np.ndarray
    test: np.ndarray
    unseen: np.ndarray


def train_case(
    x: np.ndarray, y: np.ndarray, names: list[str], *, held_out: int, seed: int, workdir: Path, epochs: int
) -> Case:
    """Train the reference model on the seen digits' pool (the held-out digit never reaches the trainer)."""
    from collector.training.trainer import train_bundle

    pool, test = split_seen(y, held_out, seed)
    stem = f"digits-without-{held_out}-seed{seed}"
    csv_path = workdir / f"{stem}.csv"
    write_csv(csv_path, x[pool], y[pool], names)
    result = train_bundle(
        csv_path,
        label_column=LABEL_COLUMN,
        out=workdir / f"{stem}.tar",
        signing_key=SIGNING_KEY,
        name=f"digits-without-{held_out}",
        version=f"0.{seed}.0",
        hidden_units=HIDDEN_UNITS,
        epochs=epochs,
        seed=seed,
    )
    return Case(held_out, seed, result.bundle_path, csv_path, pool, test, np.flatnonzero(y == held_out))


def _active(cols: Any, n_hidden: int) -> np.ndarray:
    """The engine's packed activation bits back to booleans (exactly ``hidden > 0``)."""
    return np.unpackbits(cols.act_bits, axis=1)[:, :n_hidden].astype(bool)


@dataclass(frozen=True)
class TrainingActivity:
    """How the hidden units of one model fire on the trainer's training split: what decides which pairs are rare."""

    unit_frequency_min: float
    unit_frequency_max: float
    joint_frequency_min: float


def quantile_bundles(
    case: Case, workdir: Path, quantiles: tuple[float, ...]
) -> tuple[list[tuple[str, Path]], TrainingActivity]:
    """Re-signed copies of the case's bundle whose rare pairs are the rarest ``q`` of pairs on the training split.

    Also returns how the units fire on that split, which explains the shipped rule's mask.
    """
    from collector.training.labelled import load_labelled_csv, stratified_split
    from collector.training.reference import coactivation_reference, joint_frequency
    from edge_agent.inference import Engine
    from shared.bundle import load_bundle, manifest_json, write_bundle
    from shared.signing import load_private_key, load_public_keys, sign

    bundle = load_bundle(case.bundle_path, load_public_keys([TRUSTED_KEY]))
    manifest = bundle.manifest
    engine = Engine(bundle, num_threads=1, act_sample_fraction=0.0, seed=case.seed)
    table_ = load_labelled_csv(case.csv_path, label_column=LABEL_COLUMN)
    train, val, test = stratified_split(table_.y, seed=case.seed)
    train_active = _active(engine.infer_many(table_.x[train]), engine.n_hidden)
    held_active = _active(engine.infer_many(table_.x[np.concatenate([val, test])]), engine.n_hidden)
    drift = float(np.abs(train_active.mean(axis=0) - np.asarray(manifest.reference.activation_frequency)).max())
    if train_active.shape[0] != manifest.reference.n_samples or drift > FREQUENCY_TOLERANCE:
        raise RuntimeError(
            f"rebuilt training split ({train_active.shape[0]} rows, frequency deviation {drift:.3g}) "
            f"is not the trainer's ({manifest.reference.n_samples} rows)"
        )
    joint = joint_frequency(train_active)
    pairs = joint[np.triu_indices(engine.n_hidden, k=1)]
    key = load_private_key(SIGNING_KEY)
    unit = train_active.mean(axis=0)
    activity = TrainingActivity(float(unit.min()), float(unit.max()), float(pairs.min()))
    out = []
    for q in quantiles:
        threshold = float(np.quantile(pairs, q))
        coact, _ = coactivation_reference(train_active, held_active, threshold)
        reference = manifest.reference.model_copy(update={"coactivation": coact})
        variant = manifest.model_copy(update={"reference": reference})
        data = manifest_json(variant)
        path = workdir / f"{case.bundle_path.stem}-q{q:g}.tar"
        write_bundle(path, bundle.model, data, sign(data, key))
        out.append((rule_name(q), path))
    return out, activity


def score(
    case: Case, x: np.ndarray, y: np.ndarray, *, rule: str, bundle_path: Path, activity: TrainingActivity
) -> Trial:
    """Load ``bundle_path`` like a device, run seen test and unseen inputs through the engine and score the counts."""
    from edge_agent.inference import Engine
    from shared.bundle import load_bundle
    from shared.signing import load_public_keys

    bundle = load_bundle(bundle_path, load_public_keys([TRUSTED_KEY]))
    labels = bundle.manifest.labels
    if str(case.held_out) in labels:
        raise RuntimeError(f"digit {case.held_out} leaked into the training labels {labels}")
    engine = Engine(bundle, num_threads=1, act_sample_fraction=0.0, seed=case.seed)
    seen_cols = engine.infer_many(x[case.test])
    unseen_cols = engine.infer_many(x[case.unseen])

    correct = np.asarray([int(labels[p]) for p in seen_cols.pred]) == y[case.test]
    coact_seen = seen_cols.coact.astype(np.int64)
    coact_unseen = unseen_cols.coact.astype(np.int64)
    ref = bundle.manifest.reference.coactivation
    doubt_seen = 1.0 - seen_cols.calibrated.astype(np.float64)
    doubt_unseen = 1.0 - unseen_cols.calibrated.astype(np.float64)
    return Trial(
        held_out=case.held_out,
        seed=case.seed,
        rule=rule,
        threshold=ref.threshold,
        train_labels=list(labels),
        rows_pool=int(case.pool.size),
        rows_test=int(case.test.size),
        rare_pairs=int(engine.pair_i.size),
        reference_mean=ref.mean,
        reference_p99=ref.p99,
        test_accuracy=float(correct.mean()),
        n_correct=int(correct.sum()),
        n_incorrect=int((~correct).sum()),
        n_unseen=int(case.unseen.size),
        mean_correct=float(coact_seen[correct].mean()),
        mean_incorrect=float(coact_seen[~correct].mean()) if (~correct).any() else None,
        mean_unseen=float(coact_unseen.mean()),
        auroc_coact=auroc(coact_unseen, coact_seen[correct]),
        auroc_confidence=auroc(doubt_unseen, doubt_seen[correct]),
        above_p99_correct=float((coact_seen[correct] > ref.p99).mean()),
        above_p99_unseen=float((coact_unseen > ref.p99).mean()),
        **asdict(activity),
    )


def run_case(
    x: np.ndarray,
    y: np.ndarray,
    names: list[str],
    *,
    held_out: int,
    seed: int,
    workdir: Path,
    epochs: int,
    quantiles: tuple[float, ...] = PAIR_QUANTILES,
) -> list[Trial]:
    """Train one model without ``held_out`` and score it under every rarity rule."""
    started = time.perf_counter()
    case = train_case(x, y, names, held_out=held_out, seed=seed, workdir=workdir, epochs=epochs)
    variants, activity = quantile_bundles(case, workdir, quantiles)
    rules = [(SHIPPED, case.bundle_path), *variants]
    trials = [score(case, x, y, rule=rule, bundle_path=path, activity=activity) for rule, path in rules]
    log.info(
        "held out %d, seed %d: accuracy %.3f, %d incorrect; %s (%.1f s)",
        held_out,
        seed,
        trials[0].test_accuracy,
        trials[0].n_incorrect,
        "; ".join(
            f"{t.rule}: {t.rare_pairs} pairs, counts {t.mean_correct:.2f}/{t.mean_unseen:.2f}, "
            f"AUROC {t.auroc_coact:.3f}"
            for t in trials
        ),
        time.perf_counter() - started,
    )
    return trials


# --------------------------------------------------------------------------------- summary

SUMMARISED = (
    "test_accuracy",
    "rare_pairs",
    "n_incorrect",
    "mean_correct",
    "mean_incorrect",
    "mean_unseen",
    "auroc_coact",
    "auroc_confidence",
    "above_p99_correct",
    "above_p99_unseen",
)
Spread = dict[str, float | int | None]


def spread(values: list[float | None]) -> Spread:
    """Mean, minimum and maximum over the seeds that have a value (``n`` of them)."""
    have = [float(v) for v in values if v is not None]
    if not have:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {"mean": float(np.mean(have)), "min": min(have), "max": max(have), "n": len(have)}


def summarise(trials: list[Trial]) -> dict[str, dict[str, Spread]]:
    """Per held-out digit, each summarised quantity as mean and range over the seeds (one rule's trials)."""
    out: dict[str, dict[str, Spread]] = {}
    for digit in sorted({t.held_out for t in trials}):
        mine = [t for t in trials if t.held_out == digit]
        out[str(digit)] = {key: spread([getattr(t, key) for t in mine]) for key in SUMMARISED}
    return out


def _fmt(s: Spread, digits: int = 2) -> str:
    if s["mean"] is None:
        return "-"
    mean, lo, hi = float(s["mean"]), float(s["min"] or 0.0), float(s["max"] or 0.0)
    if s["n"] == 1 or math.isclose(lo, hi):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def format_table(summary: dict[str, dict[str, Spread]]) -> str:
    """One rule's per-digit table: mean over the seeds, range in brackets."""
    headers = [
        "held out",
        "accuracy",
        "rare pairs",
        "incorrect",
        "count correct",
        "count incorrect",
        "count unseen",
        "AUROC count",
        "AUROC 1-conf",
        ">p99 correct",
        ">p99 unseen",
    ]
    rows = [
        [
            digit,
            _fmt(s["test_accuracy"], 3),
            _fmt(s["rare_pairs"], 1),
            _fmt(s["n_incorrect"], 1),
            _fmt(s["mean_correct"]),
            _fmt(s["mean_incorrect"]),
            _fmt(s["mean_unseen"]),
            _fmt(s["auroc_coact"], 3),
            _fmt(s["auroc_confidence"], 3),
            _fmt(s["above_p99_correct"], 3),
            _fmt(s["above_p99_unseen"], 3),
        ]
        for digit, s in summary.items()
    ]
    return table(headers, rows)


def rule_result(trials: list[Trial]) -> dict[str, Any]:
    """One rule's per-class summary and the spread of its per-class mean AUROCs."""
    summary = summarise(trials)
    per_class = [float(s["auroc_coact"]["mean"] or 0.0) for s in summary.values()]
    baseline = [float(s["auroc_confidence"]["mean"] or 0.0) for s in summary.values()]
    return {
        "per_class": summary,
        "auroc_coact_mean": float(np.mean(per_class)),
        "auroc_coact_min": min(per_class),
        "auroc_coact_max": max(per_class),
        "auroc_confidence_mean": float(np.mean(baseline)),
        "classes_auroc_below_0_6": [d for d, s in summary.items() if float(s["auroc_coact"]["mean"] or 0.0) < 0.6],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the experiment, print the tables and the JSON line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"digits {list(QUICK_CLASSES)} with seed 0 only")
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="held-out digits (default: all ten)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help=f"seeds (default: {list(DEFAULT_SEEDS)})")
    parser.add_argument("--epochs", type=int, default=None, help="maximum training epochs (trainer default)")
    args = parser.parse_args(argv)
    setup_logging()
    # Digit images have blank border pixels: the trainer's "constant feature" warning fires on every model.
    logging.getLogger("collector.training.trainer").setLevel(logging.ERROR)
    logging.getLogger("collector.training.convert").setLevel(logging.WARNING)
    logging.getLogger("edge_agent").setLevel(logging.WARNING)

    try:
        import sklearn  # noqa: F401
        import tensorflow  # noqa: F401
    except ImportError as exc:
        print(f"needs scikit-learn and TensorFlow ('dev' and 'train' extras): {exc}", file=sys.stderr)
        return 2
    from collector.training.trainer import DEFAULT_EPOCHS

    classes = args.classes if args.classes is not None else list(QUICK_CLASSES if args.quick else range(10))
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else list(DEFAULT_SEEDS))
    bad = [c for c in classes if not 0 <= c <= 9]
    if bad:
        parser.error(f"digits are 0..9, got {bad}")
    epochs = args.epochs or DEFAULT_EPOCHS
    host = machine()
    x, y, names = load_digits_data()
    started = time.perf_counter()
    trials: list[Trial] = []
    with tempfile.TemporaryDirectory(prefix="heldout-digits-") as tmp:
        for seed in seeds:
            for digit in classes:
                trials += run_case(x, y, names, held_out=digit, seed=seed, workdir=Path(tmp), epochs=epochs)
    seconds = time.perf_counter() - started

    rules = [SHIPPED] + [rule_name(q) for q in PAIR_QUANTILES]
    results = {rule: rule_result([t for t in trials if t.rule == rule]) for rule in rules}
    for rule in rules:
        res = results[rule]
        print(f"\nRule {rule!r}: mean over seeds {seeds} (range in brackets)")
        print(format_table(res["per_class"]))
        print(
            f"AUROC of the count over held-out digits: mean {res['auroc_coact_mean']:.3f}, "
            f"min {res['auroc_coact_min']:.3f}, max {res['auroc_coact_max']:.3f} "
            f"(1 - confidence: mean {res['auroc_confidence_mean']:.3f}); "
            f"below 0.6: {res['classes_auroc_below_0_6'] or 'none'}"
        )
    shipped = [t for t in trials if t.rule == SHIPPED]
    print(
        f"\nOn the training splits of the {len(shipped)} models every hidden unit fires in "
        f"{min(t.unit_frequency_min for t in shipped):.1%} to {max(t.unit_frequency_max for t in shipped):.1%} of the "
        f"records; the most rarely co-firing pair of each model fires together in "
        f"{min(t.joint_frequency_min for t in shipped):.1%} to {max(t.joint_frequency_min for t in shipped):.1%} "
        f"(the shipped rule needs < {shipped[0].threshold:.0%})"
    )
    print(f"{len(shipped)} models trained and scored in {seconds:.0f} s")
    emit(
        {
            "benchmark": "heldout_class",
            "dataset": "sklearn.datasets.load_digits",
            "classes": classes,
            "seeds": seeds,
            "epochs": epochs,
            "hidden_units": HIDDEN_UNITS,
            "test_fraction": TEST_FRACTION,
            "rules": results,
            "auroc_coact_mean": results[SHIPPED]["auroc_coact_mean"],
            "trials": [asdict(t) for t in trials],
            "seconds": round(seconds, 1),
            "machine": host,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
