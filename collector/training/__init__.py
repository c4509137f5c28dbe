"""Reference trainer: ``fleet-collector train`` (needs the ``train`` extra, TensorFlow, only when it runs).

:func:`register` adds the ``train`` subcommand to the collector's CLI; the trainer itself lives in
:mod:`collector.training.trainer` and the reference profile in :mod:`collector.training.reference`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from collector.training.errors import TrainingError

__all__ = ["SIGNING_KEY_ENV", "TrainingError", "add_arguments", "register", "run"]

log = logging.getLogger(__name__)

SIGNING_KEY_ENV = "FLEET_SIGNING_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the trainer's options to ``parser`` and set ``func``."""
    parser.add_argument("--csv", required=True, type=Path, help="labelled CSV (.csv or .csv.gz)")
    parser.add_argument("--label-column", required=True, help="column holding the class label")
    parser.add_argument(
        "--feature-columns", nargs="+", default=None, metavar="COL", help="features (default: every numeric column)"
    )
    parser.add_argument(
        "--signing-key", type=Path, default=None, help=f"Ed25519 private key (PEM); default ${SIGNING_KEY_ENV}"
    )
    parser.add_argument("--out", required=True, type=Path, help="bundle .tar to write")
    parser.add_argument("--name", default="model", help="bundle name (default: %(default)s)")
    parser.add_argument("--version", default="0.1.0", help="bundle version (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help="maximum training epochs (early stopping)")
    parser.add_argument("--hidden-units", type=int, default=64, help="units of the monitored hidden layer")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation and shuffling")
    parser.add_argument("--dataset-version", default=None, help="recorded in the manifest (default: file name@hash)")
    parser.add_argument("--parent-version", default=None, help="version this model replaces, for lineage")
    parser.add_argument(
        "--reference-csv",
        type=Path,
        default=None,
        help="records of drives/vehicles independent of the training data: the monitoring reference is built on them",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)
    return parser


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` to the ``fleet-collector`` subcommands."""
    parser = subparsers.add_parser(
        "train",
        help="train a reference model on a labelled CSV and write a signed bundle",
        description="Train a reference model on a labelled CSV and write a signed, self-tested bundle.",
    )
    add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run the trainer from parsed arguments; 0 on success, 1 on bad input, 2 without the train extra."""
    key_path = args.signing_key or (Path(os.environ[SIGNING_KEY_ENV]) if os.environ.get(SIGNING_KEY_ENV) else None)
    if key_path is None:
        log.error("no signing key: pass --signing-key PATH or set %s to an Ed25519 PEM key file", SIGNING_KEY_ENV)
        return 1
    try:
        import tensorflow  # noqa: F401  (checked up front: a clear message instead of a traceback mid-run)
    except ImportError:
        log.error("training needs TensorFlow: pip install 'fleet-model-health[train]'")
        return 2
    from collector.training.trainer import DEFAULT_EPOCHS, train_bundle

    try:
        result = train_bundle(
            args.csv,
            label_column=args.label_column,
            feature_columns=args.feature_columns,
            out=args.out,
            signing_key=key_path,
            name=args.name,
            version=args.version,
            hidden_units=args.hidden_units,
            epochs=args.epochs or DEFAULT_EPOCHS,
            seed=args.seed,
            dataset_version=args.dataset_version,
            parent_version=args.parent_version,
            reference_csv=args.reference_csv,
        )
    except TrainingError as exc:
        log.error("training failed: %s", exc)
        return 1
    summary = {
        "bundle": str(result.bundle_path),
        "sha256": result.bundle_sha256,
        "bytes": result.bundle_bytes,
        "name": result.manifest.name,
        "version": result.manifest.version,
        "key_id": result.key_id,
        "labels": result.manifest.labels,
        "rows_dropped": result.rows_dropped,
        "skipped_columns": result.skipped_columns,
        "metrics": result.metrics,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for k, v in sorted(result.metrics.items()):
            print(f"{k:32s} {v:.6g}")
        print(f"bundle {result.bundle_path} ({result.bundle_bytes} bytes) sha256 {result.bundle_sha256}")
    return 0
