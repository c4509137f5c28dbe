"""The reference trainer: a labelled CSV in, a signed, self-tested model bundle out.

Steps: read and clean the CSV, split it (stratified, seeded), normalise with the training mean and
std, train a small Keras MLP whose hidden layer is a second output, fit a temperature on the
validation split, measure on the test split, compute the reference profile, convert to TFLite,
match its outputs to Keras, record golden cases from the TFLite model, sign, write, and finally
load the written bundle like a device would (pinned key, tflite-runtime) and run its self-test.
TensorFlow is imported only here, so the rest of the collector runs without the ``train`` extra.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib.metadata
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import TypeAdapter, ValidationError

from collector.training import evaluation
from collector.training.convert import VERIFY_BACKEND, identify_outputs, keras_to_tflite, run_tflite
from collector.training.errors import TrainingError
from collector.training.labelled import TIME_COLUMNS, LabelledTable, has_columns, load_labelled_csv, stratified_split
from collector.training.reference import ReferenceInputs, build_reference_profile
from shared.bundle import (
    BundleError,
    Calibration,
    GoldenCase,
    Manifest,
    Normalisation,
    TrainingInfo,
    calibrate,
    load_bundle,
    manifest_json,
    run_golden,
    write_bundle,
)
from shared.interpreter import load_interpreter
from shared.signing import PublicKey, SignatureError, load_private_key, raw_public, sign

log = logging.getLogger(__name__)

GOLDEN_CASES = 8
GOLDEN_TOLERANCE = 1e-4
CONVERSION_CHECK_ROWS = 256
DEFAULT_EPOCHS = 30
PATIENCE = 5
# About 32 optimiser steps per epoch whatever the data size: Keras' per-step overhead, not the
# arithmetic, dominates on a 40-64-6 MLP, and 512 rows per step keeps 20k rows at a few seconds.
STEPS_PER_EPOCH = 32
BATCH_RANGE = (32, 512)
LEARNING_RATE = 4e-3


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_bundle` made and measured."""

    bundle_path: Path
    bundle_sha256: str
    """of the tar, the registry's content address"""
    bundle_bytes: int
    manifest: Manifest
    key_id: str
    rows_dropped: dict[str, int]
    skipped_columns: dict[str, str]
    conversion_deviation: float
    """largest Keras/TFLite difference on the checked inputs"""
    golden_deviation: float
    """largest deviation of the written bundle's self-test"""
    backend: str
    """TFLite runtime module that verified the bundle"""
    golden_labels: list[str]
    """true class of each golden case (the manifest holds only inputs and outputs)"""
    seconds: float

    @property
    def metrics(self) -> dict[str, float]:
        """The manifest's training metrics."""
        return self.manifest.training.metrics


def _check_field(field: str, value: str) -> None:
    # Fail before training, not after, on a name or version the manifest would reject.
    info = Manifest.model_fields[field]
    try:
        TypeAdapter(Annotated[str, *info.metadata]).validate_python(value)
    except ValidationError as exc:
        raise TrainingError("bad_argument", f"{field} {value!r}: {exc.errors()[0]['msg']}") from None


def _normalisation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # float32 as the device computes (x - mean) / std; a constant feature keeps std 1 (it carries nothing).
    mean = x.mean(axis=0).astype(np.float32)
    std = x.std(axis=0).astype(np.float32)
    constant = ~(std > np.float32(1e-6) * np.maximum(np.float32(1.0), np.abs(mean)))
    if constant.any():
        log.warning("%d features are constant on the training split; they get std 1", int(constant.sum()))
    std[constant] = 1.0
    return mean, std


def normalise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` in float32, exactly as :func:`shared.bundle.run_golden` and the device do."""
    return (np.asarray(x, np.float32) - mean) / std


def _code_version() -> str:
    parts = []
    for dist in ("fleet-model-health", "tensorflow-cpu"):
        try:
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return "; ".join(parts) or "unknown"


def _created_at() -> datetime:
    # SOURCE_DATE_EPOCH (reproducible-builds convention) pins the timestamp for byte-identical rebuilds.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            return datetime.fromtimestamp(int(epoch), UTC)
        except ValueError:
            raise TrainingError("bad_argument", f"SOURCE_DATE_EPOCH={epoch!r} is not an integer") from None
    return datetime.now(UTC).replace(microsecond=0)


def _golden_rows(y_test: np.ndarray, n_classes: int, seed: int) -> np.ndarray:
    # One test row of every class first, then random others, up to GOLDEN_CASES.
    rng = np.random.default_rng(seed + 1)
    order = rng.permutation(y_test.size)
    chosen = [int(order[np.flatnonzero(y_test[order] == c)[0]]) for c in range(n_classes)]
    taken = set(chosen)
    rest = [int(i) for i in order if int(i) not in taken]
    chosen += rest[: max(0, GOLDEN_CASES - len(chosen))]
    return np.asarray(chosen, dtype=np.int64)


def _fit_keras(
    z_train: np.ndarray,
    y_train: np.ndarray,
    z_val: np.ndarray,
    y_val: np.ndarray,
    *,
    n_classes: int,
    hidden_units: int,
    epochs: int,
    seed: int,
) -> tuple[Any, int]:
    """Train the MLP; return the two-output export model ``[probabilities, hidden]`` and epochs run."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    inputs = tf.keras.Input(shape=(z_train.shape[1],), name="features")
    hidden = tf.keras.layers.Dense(hidden_units, activation="relu", name="hidden")(inputs)
    probs = tf.keras.layers.Dense(n_classes, activation="softmax", name="probabilities")(hidden)
    # Trained with one output (no loss on the hidden layer); the export model shares its layers.
    model = tf.keras.Model(inputs, probs)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(LEARNING_RATE),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    stop = tf.keras.callbacks.EarlyStopping(monitor="val_loss", patience=PATIENCE, restore_best_weights=True)
    history = model.fit(
        z_train,
        y_train,
        validation_data=(z_val, y_val),
        epochs=epochs,
        batch_size=int(np.clip(z_train.shape[0] // STEPS_PER_EPOCH, *BATCH_RANGE)),
        shuffle=True,
        callbacks=[stop],
        verbose=0,
    )
    return tf.keras.Model(inputs, [probs, hidden], name="export"), len(history.history["loss"])


def _predict(model: Any, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs, hidden = model(np.asarray(z, np.float32), training=False)
    return np.asarray(probs, np.float64), np.asarray(hidden, np.float64)


def train_bundle(
    csv_path: Path,
    *,
    label_column: str,
    feature_columns: list[str] | None = None,
    out: Path,
    signing_key: Path,
    name: str,
    version: str,
    hidden_units: int = 64,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    dataset_version: str | None = None,
    parent_version: str | None = None,
    description: str | None = None,
    reference_csv: Path | None = None,
) -> TrainResult:
    """Train, convert, sign and verify a bundle from a labelled CSV (see the module docstring).

    ``reference_csv`` (the same feature columns; its label column, if any, is not used) holds records
    of drives or vehicles independent of the training data: the monitoring reference (input
    histograms, score distributions, predicted-class priors) is then computed on them
    (:func:`collector.training.reference.build_reference_profile`).
    """
    started = time.perf_counter()
    _check_field("name", name)
    _check_field("version", version)
    if hidden_units < 2 or epochs < 1:
        raise TrainingError("bad_argument", "hidden_units must be >= 2 and epochs >= 1")
    try:
        key = load_private_key(Path(signing_key))
    except (OSError, ValueError, TypeError, SignatureError) as exc:
        raise TrainingError("signing_key", f"cannot load an Ed25519 private key from {signing_key}: {exc}") from None
    public = PublicKey.from_raw(raw_public(key.public_key()))

    table = load_labelled_csv(Path(csv_path), label_column=label_column, feature_columns=feature_columns)
    nc = len(table.labels)
    train, val, test = stratified_split(table.y, seed=seed)
    mean, std = _normalisation(table.x[train])
    z = normalise(table.x, mean, std)
    log.info(
        "training on %s: %d features, %d classes, %d/%d/%d rows (train/validation/test)",
        csv_path,
        len(table.feature_names),
        nc,
        train.size,
        val.size,
        test.size,
    )

    model, epochs_run = _fit_keras(
        z[train],
        table.y[train],
        z[val],
        table.y[val],
        n_classes=nc,
        hidden_units=hidden_units,
        epochs=epochs,
        seed=seed,
    )
    probs, hidden = _predict(model, z)
    temperature = evaluation.fit_temperature(probs[val], table.y[val])
    calibrated = calibrate(probs, temperature)
    metrics = _metrics(table, probs, calibrated, train, val, test, temperature, epochs_run)

    held_out = np.concatenate([val, test])
    ref_inputs: dict[str, np.ndarray] = {}
    if reference_csv is not None:
        timed = has_columns(Path(reference_csv), TIME_COLUMNS)
        ref_table = load_labelled_csv(
            Path(reference_csv),
            label_column=label_column,
            feature_columns=[*table.feature_names, *(TIME_COLUMNS if timed else ())],
        )
        if timed:
            # The drive and time columns say where each record sits in its stream, for the decorrelation times.
            nf = len(table.feature_names)
            ref_inputs["drive_reference"] = ref_table.x[:, nf].copy()
            ref_inputs["ts_reference"] = ref_table.x[:, nf + 1].copy()
            ref_table = dataclasses.replace(
                ref_table, x=ref_table.x[:, :nf], feature_names=ref_table.feature_names[:nf]
            )
        z_ref = normalise(ref_table.x, mean, std)
        ref_probs, ref_hidden = _predict(model, z_ref)
        ref_calibrated = calibrate(ref_probs, temperature)
        ref_inputs |= {
            "x_reference": ref_table.x,
            "z_reference": z_ref,
            "hidden_reference": ref_hidden,
            "confidence_reference": ref_calibrated.max(axis=1),
            "pred_reference": ref_calibrated.argmax(axis=1),
        }
        log.info("monitoring reference from %s: %d rows", reference_csv, ref_table.x.shape[0])
    reference = build_reference_profile(
        ReferenceInputs(
            x_train=table.x[train],
            z_train=z[train],
            y_train=table.y[train],
            hidden_train=hidden[train],
            z_held_out=z[held_out],
            hidden_held_out=hidden[held_out],
            confidence_held_out=calibrated[held_out].max(axis=1),
            pred_held_out=calibrated[held_out].argmax(axis=1),
            **ref_inputs,
        ),
        table.feature_names,
        nc,
    )
    metrics["pca_components"] = float(len(reference.pca.components))
    metrics["rare_pairs"] = float(_count_rare_pairs(reference.coactivation.pair_mask_b64))

    tflite = keras_to_tflite(model)
    golden = test[_golden_rows(table.y[test], nc, seed)]
    check = np.concatenate([golden, test[:CONVERSION_CHECK_ROWS]])
    golden_x = table.x[golden].astype(np.float32)  # the inputs exactly as stored in the manifest
    check_z = np.concatenate([normalise(golden_x, mean, std), z[check[len(golden) :]]])
    k_probs, k_hidden = _predict(model, check_z)
    outputs = identify_outputs(tflite, check_z, k_probs, k_hidden, tolerance=GOLDEN_TOLERANCE)
    metrics["keras_tflite_max_deviation"] = outputs.max_deviation
    t_outs, _ = run_tflite(tflite, check_z[: len(golden)])
    cases = [
        GoldenCase(
            input=golden_x[k].astype(np.float64).tolist(),
            probabilities=t_outs[outputs.probabilities.index][k].astype(np.float64).tolist(),
            hidden=t_outs[outputs.hidden.index][k].astype(np.float64).tolist(),
        )
        for k in range(len(golden))
    ]

    manifest = Manifest(
        name=name,
        version=version,
        created_at=_created_at(),
        description=description
        or f"MLP {len(table.feature_names)}-{hidden_units}-{nc} on {Path(csv_path).name} (reference trainer)",
        model_sha256=hashlib.sha256(tflite).hexdigest(),
        model_bytes=len(tflite),
        features=table.feature_names,
        normalisation=Normalisation(mean=mean.astype(np.float64).tolist(), std=std.astype(np.float64).tolist()),
        labels=table.labels,
        input=outputs.input,
        probabilities=outputs.probabilities,
        hidden=outputs.hidden,
        calibration=Calibration(temperature=temperature),
        reference=reference,
        golden=cases,
        golden_tolerance=GOLDEN_TOLERANCE,
        training=TrainingInfo(
            dataset_version=dataset_version or f"{_stem(Path(csv_path))}@{table.sha256[:12]}",
            dataset_sha256=table.sha256,
            rows=int(table.y.size),
            code_version=_code_version(),
            metrics=metrics,
        ),
        parent_version=parent_version,
    )
    manifest_bytes = manifest_json(manifest)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename only once verified: a failed run never leaves a bad bundle at `out`.
    partial = out.with_name(out.name + ".partial")
    write_bundle(partial, tflite, manifest_bytes, sign(manifest_bytes, key))
    try:
        bundle = load_bundle(partial, trusted=[public], check_tensors=False)
        golden_dev = run_golden(bundle, load_interpreter(bundle.model, preferred=VERIFY_BACKEND))
    except BundleError as exc:
        partial.unlink(missing_ok=True)
        raise TrainingError("self_test_failed", f"the written bundle fails verification: {exc}") from None
    os.replace(partial, out)
    data = out.read_bytes()
    result = TrainResult(
        bundle_path=out,
        bundle_sha256=hashlib.sha256(data).hexdigest(),
        bundle_bytes=len(data),
        manifest=manifest,
        key_id=bundle.key_id,
        rows_dropped=table.rows_dropped,
        skipped_columns=table.skipped_columns,
        conversion_deviation=outputs.max_deviation,
        golden_deviation=golden_dev,
        backend=outputs.backend,
        golden_labels=[table.labels[int(c)] for c in table.y[golden]],
        seconds=time.perf_counter() - started,
    )
    log.info("wrote %s (%d bytes, sha256 %s) in %.1f s", out, result.bundle_bytes, result.bundle_sha256, result.seconds)
    return result


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".csv"):
        name = name.removesuffix(suffix)
    return name


def _count_rare_pairs(mask_b64: str) -> int:
    return int(np.unpackbits(np.frombuffer(base64.b64decode(mask_b64), np.uint8)).sum())


def _metrics(
    table: LabelledTable,
    probs: np.ndarray,
    calibrated: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    test: np.ndarray,
    temperature: float,
    epochs_run: int,
) -> dict[str, float]:
    y, nc = table.y, len(table.labels)
    return {
        "test_accuracy": evaluation.accuracy(probs[test], y[test]),
        "test_macro_f1": evaluation.macro_f1(probs[test], y[test], nc),
        "test_nll_uncalibrated": evaluation.nll(probs[test], y[test]),
        "test_nll_calibrated": evaluation.nll(calibrated[test], y[test]),
        "test_ece_uncalibrated": evaluation.expected_calibration_error(probs[test], y[test]),
        "test_ece_calibrated": evaluation.expected_calibration_error(calibrated[test], y[test]),
        "validation_nll_uncalibrated": evaluation.nll(probs[val], y[val]),
        "validation_nll_calibrated": evaluation.nll(calibrated[val], y[val]),
        "train_accuracy": evaluation.accuracy(probs[train], y[train]),
        "temperature": temperature,
        "epochs": float(epochs_run),
        "rows_train": float(train.size),
        "rows_validation": float(val.size),
        "rows_test": float(test.size),
        "rows_dropped": float(table.n_dropped),
    }
