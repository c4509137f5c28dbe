"""The inference engine: a verified bundle's TFLite model plus everything a record carries.

Per record the engine produces the predicted class, the probabilities, the raw and the calibrated
top-class confidence, the bit-packed hidden activations (``np.packbits(h > 0)``), float16
activations for a seeded random sample of records, the rare co-activation count and the latency.
Outputs are read at the indexes the manifest names (a converter may reorder them), missing inputs
(NaN, or Inf from a broken reading) are imputed with the reference means and flagged, and the
bundle's golden self-test runs before the engine accepts a single input.

The per-record path touches only preallocated buffers; :meth:`Engine.infer_many` loops the
interpreter and vectorises everything after it, for replay at thousands of records a second.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.bundle import Bundle, BundleError, calibrate, check_tensor_shapes, rare_pair_indices, run_golden
from shared.codec import NO_LABEL, RecordBlock
from shared.features import FLAG_IMPUTED, FLAG_OUTPUT_INVALID
from shared.interpreter import InterpreterUnavailable, load_interpreter

log = logging.getLogger(__name__)

LATENCY_RING = 1024  # recent per-record latencies kept for the updater's watch period


@dataclass
class InferenceColumns:
    """Engine output for ``n`` records, as columns (the codec's layout without seq and clocks)."""

    pred: np.ndarray  # int16 [n]
    probs: np.ndarray  # float32 [n, classes]
    confidence: np.ndarray  # float32 [n]
    calibrated: np.ndarray  # float32 [n]
    features: np.ndarray  # float32 [n, features], physical units, NaN where missing
    act_bits: np.ndarray  # uint8 [n, ceil(hidden / 8)]
    act_sample_idx: np.ndarray  # uint32 [k]
    act_sample: np.ndarray  # float16 [k, hidden]
    coact: np.ndarray  # uint16 [n]
    latency_us: np.ndarray  # float32 [n]
    sensor_flags: np.ndarray  # uint16 [n]

    def __len__(self) -> int:
        return int(self.pred.shape[0])

    def to_block(
        self,
        *,
        model_name: str,
        model_version: str,
        hidden_units: int,
        ts: np.ndarray,
        mono: np.ndarray,
        label: np.ndarray | None = None,
        role: str = "active",
    ) -> RecordBlock:
        """A codec block of these records; ``seq`` is left empty for the spool to assign."""
        n = len(self)
        return RecordBlock(
            role=role,
            model_name=model_name,
            model_version=model_version,
            seq=np.zeros(n, np.uint64),
            ts=np.asarray(ts, np.float64).reshape(n),
            mono=np.asarray(mono, np.float64).reshape(n),
            pred=self.pred,
            probs=self.probs.astype(np.float16),
            confidence=self.confidence.astype(np.float16),
            calibrated=self.calibrated.astype(np.float16),
            features=self.features,
            act_bits=self.act_bits,
            hidden_units=hidden_units,
            act_sample_idx=self.act_sample_idx,
            act_sample=self.act_sample,
            coact=self.coact,
            latency_us=self.latency_us,
            sensor_flags=self.sensor_flags,
            label=np.full(n, NO_LABEL, np.int16) if label is None else np.asarray(label, np.int16).reshape(n),
        )


@dataclass
class InferenceRecord:
    """Engine output for one record."""

    pred: int
    probs: np.ndarray  # float32 [classes]
    confidence: float
    calibrated: float
    features: np.ndarray  # float32 [features], physical units, NaN where missing
    act_bits: np.ndarray  # uint8 [ceil(hidden / 8)]
    act_sample: np.ndarray | None  # float16 [hidden] when this record is sampled
    coact: int
    latency_us: float
    sensor_flags: int

    def to_columns(self) -> InferenceColumns:
        """The same record as one-row columns."""
        sampled = self.act_sample is not None
        hidden = self.act_sample.shape[0] if self.act_sample is not None else self.act_bits.shape[0] * 8
        return InferenceColumns(
            pred=np.array([self.pred], np.int16),
            probs=self.probs.reshape(1, -1),
            confidence=np.array([self.confidence], np.float32),
            calibrated=np.array([self.calibrated], np.float32),
            features=self.features.reshape(1, -1),
            act_bits=self.act_bits.reshape(1, -1),
            act_sample_idx=np.zeros(1 if sampled else 0, np.uint32),
            act_sample=(
                self.act_sample.reshape(1, -1) if self.act_sample is not None else np.zeros((0, hidden), np.float16)
            ),
            coact=np.array([self.coact], np.uint16),
            latency_us=np.array([self.latency_us], np.float32),
            sensor_flags=np.array([self.sensor_flags], np.uint16),
        )


class Engine:
    """A loaded, self-tested model that turns feature vectors into monitored records."""

    def __init__(
        self,
        bundle: Bundle,
        *,
        num_threads: int = 1,
        backend: str | None = None,
        act_sample_fraction: float = 0.05,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= act_sample_fraction <= 1.0:
            raise ValueError("act_sample_fraction must be in [0, 1]")
        m = bundle.manifest
        self.bundle = bundle
        self.manifest = m
        try:
            self.interpreter: Any = load_interpreter(bundle.model, num_threads=num_threads, preferred=backend)
        except InterpreterUnavailable:
            raise
        except (ValueError, RuntimeError) as exc:
            raise BundleError("bad_model", f"the TFLite runtime rejects model.tflite: {exc}") from None
        check_tensor_shapes(bundle, self.interpreter)
        self.golden_deviation = run_golden(bundle, self.interpreter)
        outputs = self.interpreter.get_output_details()
        self._in = int(self.interpreter.get_input_details()[0]["index"])
        self._out_p = int(outputs[m.probabilities.index]["index"])
        self._out_h = int(outputs[m.hidden.index]["index"])
        self.n_features = len(m.features)
        self.n_classes = len(m.labels)
        self.n_hidden = m.n_hidden
        self.n_bytes = (self.n_hidden + 7) // 8
        self.temperature = m.calibration.temperature
        self.act_sample_fraction = act_sample_fraction
        self.mean = np.asarray(m.normalisation.mean, np.float32)
        self.std = np.asarray(m.normalisation.std, np.float32)
        self.ref_means = np.asarray([f.mean for f in m.reference.features], np.float32)
        self.pair_i, self.pair_j = rare_pair_indices(m.reference.coactivation, self.n_hidden)
        self._rng = np.random.default_rng(seed)
        self._x = np.zeros((1, self.n_features), np.float32)
        self._p = np.zeros(self.n_classes, np.float32)
        self._h = np.zeros(self.n_hidden, np.float32)
        self.count = 0
        self.nonfinite = 0  # records whose outputs were NaN/Inf (zeroed and flagged, never sent as such)
        self._latency_ring = np.zeros(LATENCY_RING, np.float32)
        log.info(
            "engine ready: %s %s (%d features, %d classes, %d hidden, %d rare pairs), golden deviation %.2g",
            m.name,
            m.version,
            self.n_features,
            self.n_classes,
            self.n_hidden,
            self.pair_i.size,
            self.golden_deviation,
        )

    @property
    def model_name(self) -> str:
        """The bundle's model name."""
        return self.manifest.name

    @property
    def model_version(self) -> str:
        """The bundle's model version."""
        return self.manifest.version

    def _prepare(self, X: np.ndarray, flags: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Physical features (NaN for missing), normalised model inputs and updated flags."""
        X = np.asarray(X, np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"features must be [n, {self.n_features}], got {list(X.shape)}")
        flags = np.asarray(flags, np.uint16).reshape(-1).copy()
        if flags.shape[0] != X.shape[0]:
            raise ValueError("one sensor_flags value per record is needed")
        finite = np.isfinite(X)
        if not finite.all():
            # Inf is as unusable as NaN (and forbidden on the wire): both become missing, imputed and flagged.
            X = np.where(finite, X, np.float32(np.nan))
            imputed_rows = ~finite.all(axis=1)
            flags[imputed_rows] |= FLAG_IMPUTED
            filled = np.where(finite, X, self.ref_means)
        else:
            filled = X
        # Same arithmetic as the golden self-test and the trainer: (x - mean) / std in float32.
        return X, (filled - self.mean) / self.std, flags

    def infer_many(self, X: np.ndarray, flags: np.ndarray | None = None) -> InferenceColumns:
        """Run ``n`` feature vectors (``[n, features]``) and return the record columns."""
        n = int(np.shape(X)[0])
        physical, inputs, sensor_flags = self._prepare(X, np.zeros(n, np.uint16) if flags is None else flags)
        probs = np.empty((n, self.n_classes), np.float32)
        hidden = np.empty((n, self.n_hidden), np.float32)
        latency = np.empty(n, np.float32)
        interp, x, inp, out_p, out_h = self.interpreter, self._x, self._in, self._out_p, self._out_h
        clock = time.perf_counter_ns
        for i in range(n):
            x[0] = inputs[i]
            t0 = clock()
            interp.set_tensor(inp, x)
            interp.invoke()
            probs[i] = interp.get_tensor(out_p)[0]
            hidden[i] = interp.get_tensor(out_h)[0]
            latency[i] = (clock() - t0) / 1000.0
        ring = self._latency_ring
        if n >= LATENCY_RING:
            ring[:] = latency[-LATENCY_RING:]
        else:
            ring[np.arange(self.count, self.count + n) % LATENCY_RING] = latency
        self.count += n
        return self._columns(physical, probs, hidden, latency, sensor_flags)

    def recent_latency_us(self, n: int) -> np.ndarray:
        """The latencies of the last ``n`` records (at most :data:`LATENCY_RING`), oldest first."""
        n = max(0, min(n, self.count, LATENCY_RING))
        return self._latency_ring[np.arange(self.count - n, self.count) % LATENCY_RING].copy()

    def infer(self, features: np.ndarray, flags: int = 0) -> InferenceRecord:
        """Run one feature vector and return its record."""
        cols = self.infer_many(np.asarray(features, np.float32).reshape(1, -1), np.array([flags], np.uint16))
        return InferenceRecord(
            pred=int(cols.pred[0]),
            probs=cols.probs[0],
            confidence=float(cols.confidence[0]),
            calibrated=float(cols.calibrated[0]),
            features=cols.features[0],
            act_bits=cols.act_bits[0],
            act_sample=cols.act_sample[0] if cols.act_sample.shape[0] else None,
            coact=int(cols.coact[0]),
            latency_us=float(cols.latency_us[0]),
            sensor_flags=int(cols.sensor_flags[0]),
        )

    def _columns(
        self, physical: np.ndarray, probs: np.ndarray, hidden: np.ndarray, latency: np.ndarray, flags: np.ndarray
    ) -> InferenceColumns:
        n = probs.shape[0]
        invalid = ~(np.isfinite(probs).all(axis=1) & np.isfinite(hidden).all(axis=1))
        if invalid.any():
            # A broken model must not poison a batch (the collector quarantines NaN outputs whole):
            # zero the outputs, flag the record, count it; the updater's watch period acts on the count.
            probs[invalid] = 0.0
            hidden[invalid] = 0.0
            flags = flags | np.where(invalid, np.uint16(FLAG_OUTPUT_INVALID), np.uint16(0)).astype(np.uint16)
            self.nonfinite += int(invalid.sum())
        # Softmax output may exceed 1 by a rounding hair; the wire contract is [0, 1].
        np.clip(probs, 0.0, 1.0, out=probs)
        pred = probs.argmax(axis=1)
        rows = np.arange(n)
        confidence = probs[rows, pred]
        calibrated = calibrate(probs, self.temperature)[rows, pred].astype(np.float32)
        active = hidden > 0
        act_bits = np.packbits(active, axis=1)
        coact = (
            (active[:, self.pair_i] & active[:, self.pair_j]).sum(axis=1, dtype=np.int64)
            if self.pair_i.size
            else np.zeros(n, np.int64)
        )
        if self.act_sample_fraction > 0:
            idx = np.flatnonzero(self._rng.random(n) < self.act_sample_fraction).astype(np.uint32)
        else:
            idx = np.zeros(0, np.uint32)
        return InferenceColumns(
            pred=pred.astype(np.int16),
            probs=probs,
            confidence=confidence.astype(np.float32),
            calibrated=calibrated,
            features=physical,
            act_bits=act_bits,
            act_sample_idx=idx,
            act_sample=np.clip(hidden[idx], -65504.0, 65504.0).astype(np.float16),
            coact=np.minimum(coact, np.iinfo(np.uint16).max).astype(np.uint16),
            latency_us=latency,
            sensor_flags=flags,
        )
