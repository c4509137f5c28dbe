"""Mergeable per-window sketches of inference records on the reference bin edges of a bundle.

Ingest turns every decoded record block into one :class:`WindowSketch` per time window (per
device and model version: the caller keys them), fully vectorised: a handful of numpy calls per
block, none per record. Sketches hold only counts, sums, minima and maxima, so device windows
merge into group, model-version, cohort, fleet and daily windows by :func:`merge` (addition;
minima and maxima combine by ``min``/``max``), and ``sketch(A ∪ B) == sketch(A) + sketch(B)``
whenever A and B are disjoint sets of records in the same window (exactly for counts, up to float
rounding for sums; see "Stream-order counters" for the two counters that look at neighbours).

What a sketch holds
-------------------
* Histograms on the manifest's edges, binned by the convention of
  :mod:`collector.training.reference` (bin ``k`` holds ``e_k <= x < e_{k+1}``, the outer bins are
  open-ended, non-finite values are not binned): every input feature (``[features, bins]``, padded
  to the widest feature; pad bins stay 0), calibrated top-class confidence, rare co-activation
  count (as the device computed it with the bundle's rare-pair mask) and PCA reconstruction error.
* Predicted-class counts; for labelled records a confusion matrix (rows: label, columns: prediction).
* Sums: per feature Σx and Σx² over finite values, calibrated confidence Σp and Σp(1-p) (the mean
  and variance of a Poisson-binomial: label-free expected accuracy), co-activation and PCA error sums.
* Exceedances: records whose PCA error or co-activation count is above the reference 99th percentile.
* Dependence: successive differences, ``Σ (x_t - x_{t-1})²`` over consecutive records of a block, per
  feature and for calibrated confidence, PCA error and co-activation count (with sums of squares for
  the last two), and how many consecutive pairs predicted the same class. With the sums and sums of
  squares they give each window's lag-1 autocorrelation (:mod:`collector.monitoring.dependence`): one
  device's records seconds apart are far from independent, and the drift tests need to know by how much.
* Data quality: NaN (missing) per feature and records with any missing input; values outside the
  device's hardware profile ranges (:class:`RangeLimits`); counts of every ``sensor_flags`` bit;
  repeated and stuck values; seq gaps; clock skew and delivery delay.

PCA reconstruction error is computed as the trainer computes it: inputs normalised in float32 as
``(x - mean) / std`` with the manifest's normalisation, a missing (NaN or Inf) input first imputed
with its reference mean as the agent does before inference (normalised value 0 for a bundle from
the reference trainer, whose normalisation mean is that mean), then
:func:`collector.training.reference.reconstruction_error` with the manifest's components.

Stream-order counters
---------------------
Records of a block are in seq order, so two counters look at a record's predecessor *within the
block* (a record's predecessor in an earlier block is not seen: across blocks both are lower bounds):

* ``feature_repeat[f]``: records whose value of feature ``f`` equals the previous record's.
  Environmental sensors update at about 1 Hz while the model runs at about 10 Hz, so repeats are
  normal for them; the counter is a rate to compare, not an alarm.
* ``feature_stuck[f]``: records that end a run of at least ``stuck_run`` identical consecutive
  values (default 200: 20 s at 10 Hz, twenty fresh readings of a 1 Hz sensor, bit for bit the
  same), counted only for features that *should vary*. By default those are the features whose
  reference histogram kept its full number of quantile bins (no single value held 1/bins or more
  of the training records: quantised readings such as particle counts that sit at 0 in clean air
  are exempt) and whose spread float16, the usual wire form, resolves (its spacing at
  ``|mean| + std`` is at most a tenth of the reference std: cabin pressure, ~1013 hPa with a std of
  0.2 hPa against a float16 step of 0.5 hPa, is exempt). A run of length ``L`` adds
  ``L - stuck_run + 1``. Runs are cut at block boundaries (the agent sends at most
  ``batch_max_records``, 500 by default, per batch), so ``stuck_run`` must stay well below that.
* ``feature_diff_sq``/``feature_pairs`` and the other successive-difference sums: the pairs are
  consecutive records of the block, both values finite (a record's predecessor in an earlier block is
  not seen, so a block of one record adds no pair).
* ``seq_missing``/``seq_gaps``: seqs absent between consecutive records of the block (and from
  ``all_seqs``, the seqs of every block of the batch, when given: an active block interleaved with
  a shadow block skips the shadow's seqs without losing anything), and the number of such holes.

Clock skew: ``delay = received_at - ts_corrected`` (delivery delay; with a device whose wall clock
is synced it also holds the clock's offset, negative when the device clock runs ahead) and
``offset = ts - ts_corrected`` (how far the device wall clock is from the collector's estimate; 0
when the device reports its clock as synced), as sums, minima and maxima.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final

import msgpack
import numpy as np
import zstandard

from collector.monitoring.dependence import LAGS, EffectiveSizes
from collector.monitoring.drift import WindowCounts
from collector.training.reference import bin_index, reconstruction_error
from shared.bundle import Manifest
from shared.codec import RecordBlock
from shared.profile import HardwareProfile

if TYPE_CHECKING:
    # Only a type here: importing the ingest package would import ingest's service, which imports this module.
    from collector.ingest.bulk import InferenceRows

DEFAULT_WINDOW_S: Final = 900.0
DAY_S: Final = 86_400.0
DEFAULT_STUCK_RUN: Final = 200
FLOAT16_QUANTUM_SHARE: Final = 0.1
FLAG_BITS: Final = 16
SKETCH_FORMAT: Final = 2
READABLE_FORMATS: Final = frozenset({1, 2})
"""Format 1 lacks the successive-difference sums (read as zero: no pairs, dependence unknown)."""
MAX_SKETCH_BYTES: Final = 16 * 1024 * 1024


class SketchError(ValueError):
    """Records or stored bytes that cannot be sketched or read. ``reason`` is a stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _ceil32(edges: np.ndarray) -> np.ndarray:
    """Smallest float32 at or above each float64 edge: for float32 ``x``, ``x >= e`` iff ``x >= _ceil32(e)``."""
    e = np.asarray(edges, dtype=np.float64)
    with np.errstate(over="ignore"):
        f = e.astype(np.float32)
    low = f.astype(np.float64) < e
    f[low] = np.nextafter(f[low], np.float32(np.inf))
    return f


def _floor32(edges: np.ndarray) -> np.ndarray:
    """Largest float32 at or below each float64 edge: for float32 ``x``, ``x > e`` iff ``x > _floor32(e)``."""
    return -_ceil32(-np.asarray(edges, dtype=np.float64))


@dataclass(frozen=True, eq=False)
class ReferenceBins:
    """Everything needed to sketch records of one model version, prepared once from its manifest."""

    model_name: str
    model_version: str
    feature_names: tuple[str, ...]
    feature_edges: tuple[np.ndarray, ...]  # float64 edges per feature, as in the manifest
    feature_nbins: np.ndarray  # int64 [F]
    n_bins: int  # widest feature histogram: the sketch's padded width
    inner32: np.ndarray  # float32 [n_bins - 1, F]: inner edges as float32 ceilings, padded with +inf
    n_classes: int
    confidence_edges: np.ndarray
    coact_edges: np.ndarray
    pca_edges: np.ndarray
    norm_mean: np.ndarray  # float32 [F]
    norm_std: np.ndarray  # float32 [F]
    impute_mean: np.ndarray  # float32 [F]: what the agent feeds the model for a missing input
    components: np.ndarray  # float64 [k, F]
    pca_p99: float
    coact_p99: float
    vary: np.ndarray  # bool [F]: features that should not hold one value for long
    stuck_run: int
    decorrelation_s: np.ndarray | None = None
    """``[F + 4]``: seconds per independent record of each feature, then of the predicted class, calibrated
    confidence, PCA error and co-activation count, from the reference drives (None: not measured)."""

    @property
    def n_features(self) -> int:
        """Input features of the model."""
        return len(self.feature_names)

    @functools.cached_property
    def float16_slots(self) -> np.ndarray:
        """Sketch slot of every float16 bit pattern per feature, flattened ``[F * 65536]`` (built on first use).

        Slot ``f * (B + 1) + k`` is bin ``k`` of feature ``f`` by :func:`bin_index` itself, and
        ``f * (B + 1) + B`` holds non-finite values; about 5 MB for 40 features.
        """
        values = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)
        width = self.n_bins + 1
        dtype = np.int16 if self.n_features * width < (1 << 15) else np.int32
        table = np.empty((self.n_features, 1 << 16), dtype=dtype)
        for f, edges in enumerate(self.feature_edges):
            k = bin_index(values, edges)
            table[f] = np.where(k >= 0, k, self.n_bins) + f * width
        return table.ravel()

    @functools.cached_property
    def float16_offsets(self) -> np.ndarray:
        """Start of each feature's row in :attr:`float16_slots`."""
        return np.arange(self.n_features, dtype=np.intp) << 16

    @classmethod
    def from_manifest(
        cls, manifest: Manifest, *, vary: np.ndarray | None = None, stuck_run: int = DEFAULT_STUCK_RUN
    ) -> ReferenceBins:
        """Bins, normalisation and PCA basis of ``manifest``; ``vary`` overrides the should-vary features."""
        ref = manifest.reference
        edges = tuple(np.asarray(f.histogram.edges, dtype=np.float64) for f in ref.features)
        nbins = np.array([e.size - 1 for e in edges], dtype=np.int64)
        width = int(nbins.max())
        inner = np.full((len(edges), max(width - 1, 0)), np.inf)
        for f, e in enumerate(edges):
            inner[f, : e.size - 2] = e[1:-1]
        if vary is None:
            # Should vary: no value held 1/bins of the training records (the quantile edges kept the full
            # count), and float16, the usual wire form, resolves a tenth of the feature's spread.
            # Beyond float16's range the scale is inf and the quantum nan: such a feature is not "should vary".
            with np.errstate(over="ignore", invalid="ignore"):
                scale = np.array([abs(f.mean) + f.std for f in ref.features], dtype=np.float16)
                quantum = np.spacing(np.abs(scale)).astype(np.float64)
            spread = np.array([f.std for f in ref.features], dtype=np.float64)
            vary_mask = (nbins == width) & (quantum <= FLOAT16_QUANTUM_SHARE * spread)
        else:
            vary_mask = np.asarray(vary, dtype=bool)
            if vary_mask.shape != (len(edges),):
                raise ValueError(f"vary needs one flag per feature ({len(edges)}), got shape {vary_mask.shape}")
        if stuck_run < 2:
            raise ValueError("stuck_run must be >= 2 records")
        return cls(
            model_name=manifest.name,
            model_version=manifest.version,
            feature_names=tuple(manifest.features),
            feature_edges=edges,
            feature_nbins=nbins,
            n_bins=width,
            inner32=np.ascontiguousarray(_ceil32(inner).T),
            n_classes=len(manifest.labels),
            confidence_edges=np.asarray(ref.confidence_histogram.edges, dtype=np.float64),
            coact_edges=np.asarray(ref.coactivation.count_histogram.edges, dtype=np.float64),
            pca_edges=np.asarray(ref.pca.error_histogram.edges, dtype=np.float64),
            norm_mean=np.asarray(manifest.normalisation.mean, dtype=np.float32),
            norm_std=np.asarray(manifest.normalisation.std, dtype=np.float32),
            impute_mean=np.asarray([f.mean for f in ref.features], dtype=np.float32),
            components=np.asarray(ref.pca.components, dtype=np.float64).reshape(-1, len(edges)),
            pca_p99=float(ref.pca.error_p99),
            coact_p99=float(ref.coactivation.p99),
            vary=vary_mask,
            stuck_run=int(stuck_run),
            decorrelation_s=None
            if ref.decorrelation is None
            else np.array(
                [
                    *ref.decorrelation.features,
                    ref.decorrelation.classes,
                    ref.decorrelation.confidence,
                    ref.decorrelation.pca_error,
                    ref.decorrelation.coactivation,
                ],
                dtype=np.float64,
            ),
        )


@dataclass(frozen=True, eq=False)
class RangeLimits:
    """Inclusive valid range per feature (±inf where the hardware profile names none), as float32 bounds."""

    low: np.ndarray  # float32 [F]: x < low is out of range
    high: np.ndarray  # float32 [F]: x > high is out of range

    @classmethod
    def from_profile(cls, profile: HardwareProfile, feature_names: Iterable[str]) -> RangeLimits:
        """The ranges ``profile`` gives for ``feature_names`` (unnamed features are never out of range)."""
        names = list(feature_names)
        lo = np.array([profile.ranges[n].min if n in profile.ranges else -np.inf for n in names])
        hi = np.array([profile.ranges[n].max if n in profile.ranges else np.inf for n in names])
        # float32 values compared with float32 bounds: x < lo iff x < ceil32(lo), x > hi iff x > floor32(hi).
        return cls(low=_ceil32(lo), high=_floor32(hi))


_I8: Final = np.int64
_F8: Final = np.float64


@dataclass(eq=False)
class WindowSketch:
    """Counts, sums, minima and maxima of the records of one window; merge by ``+``.

    Array fields are ``int64`` counts or ``float64`` sums; shapes are fixed by the
    :class:`ReferenceBins` they were made with (F features, B bins, C classes).
    """

    n: int
    feature_hist: np.ndarray  # [F, B]
    feature_nan: np.ndarray  # [F] missing (non-finite) values
    feature_sum: np.ndarray  # [F] float, over finite values
    feature_sumsq: np.ndarray  # [F] float
    feature_out_of_range: np.ndarray  # [F] outside the hardware profile's range
    feature_repeat: np.ndarray  # [F] equal to the previous record's value
    feature_stuck: np.ndarray  # [F] ending a run of >= stuck_run equal values (should-vary features)
    records_missing: int  # records with at least one missing input
    class_counts: np.ndarray  # [C] predicted class
    pred_invalid: int  # predicted class outside 0..C-1
    confusion: np.ndarray  # [C, C] labelled records: label x prediction
    labelled: int  # records with a label (label >= 0), valid or not
    correct: int  # labelled records whose label equals the prediction
    confidence_hist: np.ndarray  # [Bc] calibrated top-class confidence
    conf_n: int  # records with a finite calibrated confidence
    conf_sum: float  # Σ p
    conf_var_sum: float  # Σ p (1 - p)
    coact_hist: np.ndarray  # [Bk] rare co-activation count
    coact_sum: float
    coact_exceed: int  # count > reference p99
    pca_hist: np.ndarray  # [Bp] PCA reconstruction error
    pca_sum: float
    pca_exceed: int  # error > reference p99
    # Successive differences at the lags of LAGS (first axis): Σ (x_t - x_{t-lag})² and pair counts.
    feature_diff_sq: np.ndarray  # [L, F] float, over pairs with both values finite
    feature_pairs: np.ndarray  # [L, F]
    class_pairs: np.ndarray  # [L] pairs with both predictions valid
    class_same: np.ndarray  # [L] of them, pairs predicting the same class
    conf_pairs: np.ndarray  # [L] pairs with both calibrated confidences finite
    conf_diff_sq: np.ndarray  # [L] float
    score_pairs: np.ndarray  # [L] pairs (PCA error and co-activation count are always finite)
    pca_diff_sq: np.ndarray  # [L] float
    coact_diff_sq: np.ndarray  # [L] float
    pca_sumsq: float
    coact_sumsq: float
    flag_bits: np.ndarray  # [16] records with each sensor_flags bit set
    flagged_records: int  # records with any sensor flag
    seq_missing: int  # seqs absent between consecutive records
    seq_gaps: int  # holes (runs of absent seqs)
    delay_sum: float  # Σ (received_at - ts_corrected)
    delay_sumsq: float
    delay_min: float
    delay_max: float
    offset_sum: float  # Σ (ts - ts_corrected)
    offset_min: float
    offset_max: float
    ts_min: float  # earliest ts_corrected
    ts_max: float  # latest ts_corrected
    latency_sum: float  # Σ inference latency, µs
    latency_max: float

    _MIN: ClassVar[frozenset[str]] = frozenset({"delay_min", "offset_min", "ts_min"})
    _MAX: ClassVar[frozenset[str]] = frozenset({"delay_max", "offset_max", "ts_max", "latency_max"})

    # ------------------------------------------------------------------------------- construction

    @classmethod
    def empty(cls, bins: ReferenceBins) -> WindowSketch:
        """The sketch of no records (the identity of :func:`merge`)."""
        nf, nc = bins.n_features, bins.n_classes
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in cls._MIN:
                values[f.name] = math.inf
            elif f.name in cls._MAX:
                values[f.name] = -math.inf
            elif f.type in ("int",):
                values[f.name] = 0
            elif f.type in ("float",):
                values[f.name] = 0.0
        shapes = _shapes(nf, bins.n_bins, nc, bins)
        for name, shape in shapes.items():
            values[name] = np.zeros(shape, dtype=_F8 if name in _FLOAT_ARRAYS else _I8)
        return cls(**values)

    # ------------------------------------------------------------------------------------ merging

    def __add__(self, other: WindowSketch) -> WindowSketch:
        return merge(self, other)

    def __radd__(self, other: int) -> WindowSketch:
        # ``sum(sketches)`` starts from 0.
        if other == 0:
            return self
        return NotImplemented

    @property
    def n_features(self) -> int:
        """Features the sketch was made for."""
        return int(self.feature_hist.shape[0])

    @property
    def confidence_stats(self) -> tuple[int, float, float]:
        """``(n, Σp, Σp(1-p))`` of calibrated confidence: mean and variance of a Poisson-binomial."""
        return self.conf_n, self.conf_sum, self.conf_var_sum

    def same_as(self, other: WindowSketch, *, rtol: float = 1e-9, atol: float = 1e-9) -> bool:
        """True when every count is equal and every sum agrees within ``rtol``/``atol`` (float rounding)."""
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray):
                if a.shape != b.shape:
                    return False
                if a.dtype.kind == "f":
                    if not np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
                        return False
                elif not np.array_equal(a, b):
                    return False
            elif isinstance(a, float):
                if not (a == b or math.isclose(a, b, rel_tol=rtol, abs_tol=atol)):
                    return False
            elif a != b:
                return False
        return True

    # ----------------------------------------------------------------------------- serialisation

    def to_bytes(self) -> bytes:
        """Compact storage form: zstd-compressed msgpack of the raw little-endian arrays."""
        doc: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                a = np.ascontiguousarray(v, dtype=v.dtype.newbyteorder("<"))
                doc[f.name] = {"d": a.dtype.str, "s": list(a.shape), "b": a.tobytes()}
            else:
                doc[f.name] = v
        body = msgpack.packb({"v": SKETCH_FORMAT, "f": doc}, use_bin_type=True)
        return zstandard.ZstdCompressor(level=3).compress(body)

    @classmethod
    def from_bytes(cls, data: bytes) -> WindowSketch:
        """Inverse of :meth:`to_bytes`; raises :class:`SketchError` on anything malformed."""
        try:
            body = zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_SKETCH_BYTES)
            doc = msgpack.unpackb(body, raw=False)
        except (zstandard.ZstdError, ValueError, msgpack.UnpackException) as exc:
            raise SketchError("bad_sketch", f"not a stored sketch: {exc}") from None
        if not isinstance(doc, dict) or doc.get("v") not in READABLE_FORMATS or not isinstance(doc.get("f"), dict):
            raise SketchError("bad_sketch", f"unknown sketch format (expected one of {sorted(READABLE_FORMATS)})")
        stored = doc["f"]
        names = {f.name: f.type for f in dataclasses.fields(cls)}
        if doc["v"] == 1:
            stored = _upgrade_v1(stored)
        if set(stored) != set(names):
            raise SketchError("bad_sketch", f"fields differ: {sorted(set(stored) ^ set(names))}")
        values: dict[str, Any] = {}
        for name, kind in names.items():
            v = stored[name]
            if kind == "np.ndarray":
                values[name] = _array(name, v)
            elif kind == "int" and isinstance(v, int) and not isinstance(v, bool):
                values[name] = v
            elif kind == "float" and isinstance(v, int | float) and not isinstance(v, bool):
                values[name] = float(v)
            else:
                raise SketchError("bad_sketch", f"{name}: expected {kind}, got {type(v).__name__}")
        sketch = cls(**values)
        nf, nb = sketch.feature_hist.shape if sketch.feature_hist.ndim == 2 else (-1, -1)
        nc = sketch.class_counts.shape[0] if sketch.class_counts.ndim == 1 else -1
        expected = _shapes(nf, nb, nc, None)
        for name, shape in expected.items():
            got = getattr(sketch, name).shape
            if got != shape:
                raise SketchError("bad_sketch", f"{name} has shape {got}, expected {shape}")
        for name in ("confidence_hist", "coact_hist", "pca_hist"):
            if getattr(sketch, name).ndim != 1:
                raise SketchError("bad_sketch", f"{name} must be one-dimensional")
        return sketch


_FLOAT_ARRAYS: Final = frozenset(
    {"feature_sum", "feature_sumsq", "feature_diff_sq", "conf_diff_sq", "pca_diff_sq", "coact_diff_sq"}
)


def _shapes(nf: int, nb: int, nc: int, bins: ReferenceBins | None) -> dict[str, tuple[int, ...]]:
    """Shape of every array field (the 1-D score histograms only when ``bins`` is given)."""
    shapes: dict[str, tuple[int, ...]] = {
        "feature_hist": (nf, nb),
        "feature_nan": (nf,),
        "feature_sum": (nf,),
        "feature_sumsq": (nf,),
        "feature_out_of_range": (nf,),
        "feature_repeat": (nf,),
        "feature_stuck": (nf,),
        "feature_diff_sq": (len(LAGS), nf),
        "feature_pairs": (len(LAGS), nf),
        "class_pairs": (len(LAGS),),
        "class_same": (len(LAGS),),
        "conf_pairs": (len(LAGS),),
        "conf_diff_sq": (len(LAGS),),
        "score_pairs": (len(LAGS),),
        "pca_diff_sq": (len(LAGS),),
        "coact_diff_sq": (len(LAGS),),
        "class_counts": (nc,),
        "confusion": (nc, nc),
        "flag_bits": (FLAG_BITS,),
    }
    if bins is not None:
        shapes["confidence_hist"] = (bins.confidence_edges.size - 1,)
        shapes["coact_hist"] = (bins.coact_edges.size - 1,)
        shapes["pca_hist"] = (bins.pca_edges.size - 1,)
    return shapes


_LAG_SCALARS: Final = (
    "class_pairs",
    "class_same",
    "conf_pairs",
    "conf_diff_sq",
    "score_pairs",
    "pca_diff_sq",
    "coact_diff_sq",
)
"""Successive-difference fields holding one value per lag."""
_V2_FIELDS: Final = ("feature_diff_sq", "feature_pairs", *_LAG_SCALARS, "pca_sumsq", "coact_sumsq")


def _upgrade_v1(stored: dict[str, Any]) -> dict[str, Any]:
    """A format-1 sketch's fields plus the successive-difference sums it lacks, as zeros (no pairs seen)."""
    if any(name in stored for name in _V2_FIELDS):
        raise SketchError("bad_sketch", "a format-1 sketch with format-2 fields")
    hist = stored.get("feature_hist")
    shape = hist.get("s") if isinstance(hist, dict) else None
    if not (isinstance(shape, list) and len(shape) == 2 and isinstance(shape[0], int) and shape[0] >= 0):
        raise SketchError("bad_sketch", "feature_hist: bad shape")
    nf, nl = shape[0], len(LAGS)
    out = dict(stored)
    for name in ("feature_diff_sq", "feature_pairs"):
        out[name] = {"d": "<f8" if name in _FLOAT_ARRAYS else "<i8", "s": [nl, nf], "b": bytes(8 * nl * nf)}
    for name in (
        "class_pairs",
        "class_same",
        "conf_pairs",
        "conf_diff_sq",
        "score_pairs",
        "pca_diff_sq",
        "coact_diff_sq",
    ):
        out[name] = {"d": "<f8" if name in _FLOAT_ARRAYS else "<i8", "s": [nl], "b": bytes(8 * nl)}
    out["pca_sumsq"] = out["coact_sumsq"] = 0.0
    return out


def _array(name: str, v: Any) -> np.ndarray:
    expected = "<f8" if name in _FLOAT_ARRAYS else "<i8"
    if not isinstance(v, dict) or v.get("d") != expected or not isinstance(v.get("b"), bytes):
        raise SketchError("bad_sketch", f"{name}: expected a {expected} array")
    shape = v.get("s")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape) or len(shape) > 2:
        raise SketchError("bad_sketch", f"{name}: bad shape {shape!r}")
    if math.prod(shape) * 8 != len(v["b"]):
        raise SketchError("bad_sketch", f"{name}: {len(v['b'])} bytes do not fill shape {shape}")
    return np.frombuffer(v["b"], dtype=expected).reshape(shape).astype(_F8 if expected == "<f8" else _I8)


def merge(a: WindowSketch, b: WindowSketch) -> WindowSketch:
    """The sketch of the records of ``a`` and ``b`` together (sums add, minima and maxima combine).

    Only sketches made with the same :class:`ReferenceBins` (one model version) mean anything
    together; differing shapes raise :class:`SketchError`, equal shapes cannot be told apart.
    """
    values: dict[str, Any] = {}
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name in WindowSketch._MIN:
            values[f.name] = min(x, y)
        elif f.name in WindowSketch._MAX:
            values[f.name] = max(x, y)
        elif isinstance(x, np.ndarray):
            if x.shape != y.shape:
                raise SketchError("shape_mismatch", f"{f.name}: {x.shape} vs {y.shape} (different model versions?)")
            values[f.name] = x + y
        else:
            values[f.name] = x + y
    return WindowSketch(**values)


def merge_all(sketches: Iterable[WindowSketch], bins: ReferenceBins | None = None) -> WindowSketch:
    """Sum of ``sketches``; with none, the empty sketch of ``bins`` (required then)."""
    total: WindowSketch | None = None
    for s in sketches:
        total = s if total is None else merge(total, s)
    if total is None:
        if bins is None:
            raise ValueError("merging no sketches needs the reference bins for an empty sketch")
        return WindowSketch.empty(bins)
    return total


# ------------------------------------------------------------------------------------- windows


def window_start(ts: np.ndarray | float, window_s: float = DEFAULT_WINDOW_S) -> np.ndarray:
    """Start of the window holding each timestamp: windows are ``[k * window_s, (k + 1) * window_s)``."""
    if not window_s > 0:
        raise ValueError("window_s must be positive")
    return np.floor(np.asarray(ts, dtype=np.float64) / window_s) * window_s


def window_counts(bins: ReferenceBins, sketch: WindowSketch, effective: EffectiveSizes | None = None) -> WindowCounts:
    """The current side of the drift tests: every histogram of ``sketch`` (features cut back to their own bins).

    ``effective`` are the effective sample sizes of its records; by default those of ``sketch`` as one
    vehicle's window, capped by its time span and the reference's decorrelation times. A sketch merged
    from several vehicles' windows needs the sum of theirs
    (:func:`~collector.monitoring.dependence.total_effective`).
    """
    return WindowCounts(
        feature_counts=[sketch.feature_hist[f, : int(nb)] for f, nb in enumerate(bins.feature_nbins)],
        class_counts=sketch.class_counts,
        confidence_counts=sketch.confidence_hist,
        pca_error_counts=sketch.pca_hist,
        coactivation_counts=sketch.coact_hist,
        effective=EffectiveSizes.of(sketch, bins.decorrelation_s) if effective is None else effective,
    )


def rollup(windows: Mapping[float, WindowSketch], period_s: float = DAY_S) -> dict[float, WindowSketch]:
    """Merge window sketches keyed by window start into periods (default: UTC days) keyed by period start."""
    out: dict[float, WindowSketch] = {}
    for start in sorted(windows):
        key = float(window_start(start, period_s))
        out[key] = merge(out[key], windows[start]) if key in out else windows[start]
    return out


# ------------------------------------------------------------------------------------ sketching


@dataclass
class _Columns:
    """The columns a sketch needs, whatever the records came from."""

    features: np.ndarray  # float16|float32 [n, F]
    seq: np.ndarray  # int64
    ts: np.ndarray  # float64
    ts_corrected: np.ndarray  # float64
    received_at: float
    pred: np.ndarray
    label: np.ndarray
    calibrated: np.ndarray
    coact: np.ndarray
    latency_us: np.ndarray
    sensor_flags: np.ndarray

    def __len__(self) -> int:
        return int(self.seq.shape[0])


def _columns(rows: InferenceRows | RecordBlock, received_at: float | None, ts_corrected: np.ndarray | None) -> _Columns:
    if not isinstance(rows, RecordBlock):  # InferenceRows: columns as ingest stores them
        n = len(rows)
        itemsize = np.dtype(rows.features_dtype).itemsize
        feats = rows.features.view(rows.features_dtype).reshape(n, rows.features.shape[1] // itemsize)
        return _Columns(
            features=feats,
            seq=rows.seq,
            ts=rows.ts,
            ts_corrected=rows.ts_corrected if ts_corrected is None else np.asarray(ts_corrected, np.float64),
            received_at=rows.received_at if received_at is None else float(received_at),
            pred=rows.pred,
            label=rows.label,
            calibrated=rows.calibrated,
            coact=rows.coact,
            latency_us=rows.latency_us,
            sensor_flags=rows.sensor_flags,
        )
    if received_at is None:
        raise ValueError("sketching a RecordBlock needs received_at")
    ts = np.asarray(rows.ts, dtype=np.float64)
    return _Columns(
        features=np.asarray(rows.features),
        seq=np.asarray(rows.seq).astype(np.int64),
        ts=ts,
        ts_corrected=ts if ts_corrected is None else np.asarray(ts_corrected, np.float64),
        received_at=float(received_at),
        pred=np.asarray(rows.pred),
        label=np.asarray(rows.label),
        calibrated=np.asarray(rows.calibrated),
        coact=np.asarray(rows.coact),
        latency_us=np.asarray(rows.latency_us),
        sensor_flags=np.asarray(rows.sensor_flags),
    )


@dataclass
class _Lagged:
    """Per-record successive-difference terms at one lag: each pair counted at the record that ends it."""

    diff_sq: np.ndarray  # float64 [n, F]: (x_t - x_{t-lag})², 0 where no finite pair ends
    has_prev: np.ndarray  # bool [n]: the record has a predecessor ``lag`` records back in the block
    pair_ok: np.ndarray | None  # bool [n, F]: a finite pair ends here; None: wherever has_prev
    class_pair: np.ndarray  # bool [n]: both predictions valid
    class_same: np.ndarray  # bool [n]: ... and equal
    conf_diff_sq: np.ndarray  # float64 [n]
    conf_pair: np.ndarray  # bool [n]
    pca_diff_sq: np.ndarray  # float64 [n]
    coact_diff_sq: np.ndarray  # float64 [n]


def _lag_terms(
    lag: int,
    x0: np.ndarray,
    finite: np.ndarray | None,
    pred: np.ndarray,
    conf: np.ndarray,
    conf_finite: np.ndarray,
    pca: np.ndarray,
    coact: np.ndarray,
) -> _Lagged:
    """Successive differences at ``lag`` of one block (``finite`` None: every input value finite)."""
    n, nf = x0.shape
    diff_sq = np.zeros((n, nf), dtype=np.float64)
    has_prev = np.zeros(n, dtype=bool)
    has_prev[lag:] = True
    pair_ok: np.ndarray | None = None
    class_pair = np.zeros(n, dtype=bool)
    class_same = np.zeros(n, dtype=bool)
    conf_pair = np.zeros(n, dtype=bool)
    conf_diff_sq = np.zeros(n, dtype=np.float64)
    pca_diff_sq = np.zeros(n, dtype=np.float64)
    coact_diff_sq = np.zeros(n, dtype=np.float64)
    if finite is not None:
        pair_ok = np.zeros((n, nf), dtype=bool)
    if n > lag:
        diff_sq[lag:] = np.square(x0[lag:] - x0[:-lag])
        if pair_ok is not None and finite is not None:
            pair_ok[lag:] = finite[lag:] & finite[:-lag]
            diff_sq[~pair_ok] = 0.0
        class_pair[lag:] = (pred[lag:] >= 0) & (pred[:-lag] >= 0)
        class_same[lag:] = class_pair[lag:] & (pred[lag:] == pred[:-lag])
        conf_pair[lag:] = conf_finite[lag:] & conf_finite[:-lag]
        conf_diff_sq[lag:] = np.where(conf_pair[lag:], np.square(conf[lag:] - conf[:-lag]), 0.0)
        pca_diff_sq[lag:] = np.square(pca[lag:] - pca[:-lag])
        coact_diff_sq[lag:] = np.square(coact[lag:] - coact[:-lag])
    return _Lagged(
        diff_sq, has_prev, pair_ok, class_pair, class_same, conf_diff_sq, conf_pair, pca_diff_sq, coact_diff_sq
    )


@dataclass
class _PerRecord:
    """Per-record values computed once for a whole block; windows aggregate slices of them."""

    slot: np.ndarray  # intp [n, F]: f * (B + 1) + bin, or f * (B + 1) + B when missing
    x0: np.ndarray  # float64 [n, F], missing -> 0
    any_missing: np.ndarray  # bool [n]
    out_of_range: np.ndarray | None  # bool [n, F]
    repeat: np.ndarray  # bool [n, F]
    stuck: np.ndarray | None  # bool [n, F]
    pred: np.ndarray  # int64, -1 when invalid
    label: np.ndarray  # int64
    conf: np.ndarray  # float64, finite
    conf_ok: np.ndarray | None  # bool, None when all finite
    conf_bin: np.ndarray
    coact: np.ndarray  # float64
    coact_bin: np.ndarray
    pca: np.ndarray  # float64
    pca_bin: np.ndarray
    flags: np.ndarray  # int64
    bits: np.ndarray | None  # uint8 [n, 16], None when no flag is set
    lagged: tuple[_Lagged, ...]  # one per lag of LAGS
    gap_before: np.ndarray  # int64: seqs missing right before each record
    delay: np.ndarray
    offset: np.ndarray
    ts_corrected: np.ndarray
    latency: np.ndarray


def _per_record(
    bins: ReferenceBins, cols: _Columns, ranges: RangeLimits | None, all_seqs: np.ndarray | None
) -> _PerRecord:
    n, nf = len(cols), bins.n_features
    raw = cols.features
    if raw.ndim != 2 or raw.shape[0] != n or raw.shape[1] != nf:
        raise SketchError("feature_count", f"records have features of shape {raw.shape}; the model expects [{n}, {nf}]")
    x = raw.astype(np.float32, copy=False)
    finite = np.isfinite(x)
    all_finite = bool(finite.all())
    if not all_finite:
        # Inf is no valid reading either: treat it as missing so it is neither binned nor summed.
        x = np.where(finite, x, np.float32(np.nan))

    if raw.dtype == np.float16:
        # Every float16 value's slot is looked up: one gather instead of a comparison per edge.
        slot = bins.float16_slots[raw.view(np.uint16) + bins.float16_offsets].astype(np.intp)
    else:
        # Bin index = number of inner edges at or below x (bin_index's convention), one comparison per edge.
        idx: np.ndarray = np.zeros((n, nf), dtype=np.uint8 if bins.n_bins < 256 else np.intp)
        for edge_row in bins.inner32:
            idx += x >= edge_row
        width = bins.n_bins + 1
        slot = idx.astype(np.intp) + np.arange(nf, dtype=np.intp) * width
        if not all_finite:
            slot[~finite] = (np.arange(nf, dtype=np.intp) * width + bins.n_bins)[np.nonzero(~finite)[1]]
    x64 = x.astype(np.float64)
    x0 = x64 if all_finite else np.where(finite, x64, 0.0)
    any_missing = np.zeros(n, dtype=bool) if all_finite else ~finite.all(axis=1)

    out_of_range = None
    if ranges is not None:
        if ranges.low.shape != (nf,):
            raise SketchError("range_count", f"ranges cover {ranges.low.shape[0]} features, the model has {nf}")
        out_of_range = (x < ranges.low) | (x > ranges.high)  # NaN compares false: missing is not out of range

    repeat = np.zeros((n, nf), dtype=bool)
    if n > 1:
        repeat[1:] = x[1:] == x[:-1]
    stuck = _stuck(bins, repeat)

    # PCA error on what the model saw: missing inputs imputed with the reference means as the agent
    # does, then normalised in float32 like the trainer and the agent.
    filled = x if all_finite else np.where(finite, x, bins.impute_mean)
    z = (filled - bins.norm_mean) / bins.norm_std
    pca = reconstruction_error(z, bins.components)

    pred = np.asarray(cols.pred).astype(np.int64)
    pred = np.where((pred >= 0) & (pred < bins.n_classes), pred, -1)
    conf = np.asarray(cols.calibrated, dtype=np.float64)
    conf_bin = bin_index(conf, bins.confidence_edges)  # -1 where not finite: not binned
    conf_finite = np.isfinite(conf)
    conf_ok = None if conf_finite.all() else conf_finite
    if conf_ok is not None:
        conf = np.where(conf_ok, conf, 0.0)
    coact = np.asarray(cols.coact, dtype=np.float64)
    flags = np.asarray(cols.sensor_flags).astype(np.int64)
    bits = None
    if flags.any():
        bits = ((flags[:, None] >> np.arange(FLAG_BITS)) & 1).astype(np.uint8)

    lagged = tuple(
        _lag_terms(lag, x0, None if all_finite else finite, pred, conf, conf_finite, pca, coact) for lag in LAGS
    )

    seq = cols.seq
    gap_before = np.zeros(n, dtype=np.int64)
    if n > 1:
        gap_before[1:] = np.maximum(np.diff(seq) - 1, 0)
        if all_seqs is not None and gap_before.any():
            others = np.sort(np.asarray(all_seqs).astype(np.int64))
            # Seqs strictly between neighbours that another block of the batch carries are not missing.
            between = np.searchsorted(others, seq[1:], "left") - np.searchsorted(others, seq[:-1], "right")
            gap_before[1:] = np.maximum(gap_before[1:] - between, 0)

    tsc = cols.ts_corrected
    if tsc.shape != (n,) or cols.ts.shape != (n,):
        raise SketchError("column_length", "ts and ts_corrected must have one value per record")
    if not (np.isfinite(tsc).all() and np.isfinite(cols.ts).all() and math.isfinite(cols.received_at)):
        raise SketchError("bad_timestamp", "ts, ts_corrected and received_at must be finite")
    return _PerRecord(
        slot=slot,
        x0=x0,
        any_missing=any_missing,
        out_of_range=out_of_range,
        repeat=repeat,
        stuck=stuck,
        pred=pred,
        label=np.asarray(cols.label).astype(np.int64),
        conf=conf,
        conf_ok=conf_ok,
        conf_bin=conf_bin,
        coact=coact,
        coact_bin=bin_index(coact, bins.coact_edges),
        pca=pca,
        pca_bin=bin_index(pca, bins.pca_edges),
        flags=flags,
        bits=bits,
        lagged=lagged,
        gap_before=gap_before,
        delay=cols.received_at - tsc,
        offset=cols.ts - tsc,
        ts_corrected=tsc,
        latency=np.asarray(cols.latency_us, dtype=np.float64),
    )


def _stuck(bins: ReferenceBins, repeat: np.ndarray) -> np.ndarray | None:
    """Records ending a run of >= ``stuck_run`` equal values, for should-vary features; None if there are none."""
    n = repeat.shape[0]
    need = bins.stuck_run - 1  # repeats in a row that make a run of stuck_run equal values
    if n < bins.stuck_run:
        return None
    # A feature with fewer repeats in the block than a run needs cannot be stuck: skip the scan.
    cand = np.flatnonzero(bins.vary & (repeat.sum(axis=0) >= need))
    if cand.size == 0:
        return None
    r = repeat[:, cand]
    pos = np.arange(n)[:, None]
    run_start = np.maximum.accumulate(np.where(r, 0, pos), axis=0)
    stuck = np.zeros_like(repeat)
    stuck[:, cand] = pos - run_start >= need
    return stuck


def _aggregate_lag(lg: _Lagged, sel: slice | np.ndarray, nf: int) -> dict[str, np.ndarray]:
    """The sketch's successive-difference fields at one lag, for the records ``sel``."""
    score_pairs = lg.has_prev[sel].sum(dtype=_I8)
    # With every value finite, every record that has a predecessor ends a finite pair.
    feature_pairs = (
        np.full(nf, score_pairs, dtype=_I8) if lg.pair_ok is None else lg.pair_ok[sel].sum(axis=0, dtype=_I8)
    )
    return {
        "feature_diff_sq": np.einsum("ij->j", lg.diff_sq[sel]),
        "feature_pairs": feature_pairs,
        "class_pairs": lg.class_pair[sel].sum(dtype=_I8),
        "class_same": lg.class_same[sel].sum(dtype=_I8),
        "conf_pairs": lg.conf_pair[sel].sum(dtype=_I8),
        "conf_diff_sq": np.float64(lg.conf_diff_sq[sel].sum()),
        "score_pairs": score_pairs,
        "pca_diff_sq": np.float64(lg.pca_diff_sq[sel].sum()),
        "coact_diff_sq": np.float64(lg.coact_diff_sq[sel].sum()),
    }


def _aggregate(bins: ReferenceBins, p: _PerRecord, sel: slice | np.ndarray) -> WindowSketch:
    nf, nb, nc = bins.n_features, bins.n_bins, bins.n_classes
    slots = np.bincount(p.slot[sel].ravel(), minlength=nf * (nb + 1)).reshape(nf, nb + 1).astype(_I8)
    x0 = p.x0[sel]
    n = int(x0.shape[0])
    pred = p.pred[sel]
    label = p.label[sel]
    valid_pred = pred >= 0
    has_label = label >= 0
    labelled_ok = has_label & (label < nc) & valid_pred
    conf = p.conf[sel]
    conf_bin = p.conf_bin[sel]
    conf_n = n if p.conf_ok is None else int(p.conf_ok[sel].sum())
    coact = p.coact[sel]
    pca = p.pca[sel]
    flags = p.flags[sel]
    gap = p.gap_before[sel]
    delay, offset, tsc = p.delay[sel], p.offset[sel], p.ts_corrected[sel]
    latency = p.latency[sel]
    zeros_f = np.zeros(nf, dtype=_I8)
    empty = n == 0
    lags = [_aggregate_lag(lg, sel, nf) for lg in p.lagged]
    return WindowSketch(
        n=n,
        feature_hist=slots[:, :nb],
        feature_nan=slots[:, nb],
        feature_sum=np.einsum("ij->j", x0),
        feature_sumsq=np.einsum("ij,ij->j", x0, x0),
        feature_out_of_range=zeros_f if p.out_of_range is None else p.out_of_range[sel].sum(axis=0).astype(_I8),
        feature_repeat=p.repeat[sel].sum(axis=0).astype(_I8),
        feature_stuck=zeros_f if p.stuck is None else p.stuck[sel].sum(axis=0).astype(_I8),
        records_missing=int(p.any_missing[sel].sum()),
        class_counts=np.bincount(pred[valid_pred], minlength=nc).astype(_I8),
        pred_invalid=int(n - valid_pred.sum()),
        confusion=np.bincount(label[labelled_ok] * nc + pred[labelled_ok], minlength=nc * nc)
        .reshape(nc, nc)
        .astype(_I8),
        labelled=int(has_label.sum()),
        correct=int((has_label & (label == pred)).sum()),
        confidence_hist=np.bincount(conf_bin[conf_bin >= 0], minlength=bins.confidence_edges.size - 1).astype(_I8),
        conf_n=conf_n,
        conf_sum=float(conf.sum()),
        conf_var_sum=float((conf * (1.0 - conf)).sum()),
        coact_hist=np.bincount(p.coact_bin[sel], minlength=bins.coact_edges.size - 1).astype(_I8),
        coact_sum=float(coact.sum()),
        coact_exceed=int((coact > bins.coact_p99).sum()),
        pca_hist=np.bincount(p.pca_bin[sel], minlength=bins.pca_edges.size - 1).astype(_I8),
        pca_sum=float(pca.sum()),
        pca_exceed=int((pca > bins.pca_p99).sum()),
        **{name: np.stack([lag[name] for lag in lags]) for name in lags[0]},
        pca_sumsq=float(pca @ pca),
        coact_sumsq=float(coact @ coact),
        flag_bits=np.zeros(FLAG_BITS, _I8) if p.bits is None else p.bits[sel].sum(axis=0, dtype=_I8),
        flagged_records=int(np.count_nonzero(flags)),
        seq_missing=int(gap.sum()),
        seq_gaps=int(np.count_nonzero(gap)),
        delay_sum=float(delay.sum()),
        delay_sumsq=float(delay @ delay),
        delay_min=math.inf if empty else float(delay.min()),
        delay_max=-math.inf if empty else float(delay.max()),
        offset_sum=float(offset.sum()),
        offset_min=math.inf if empty else float(offset.min()),
        offset_max=-math.inf if empty else float(offset.max()),
        ts_min=math.inf if empty else float(tsc.min()),
        ts_max=-math.inf if empty else float(tsc.max()),
        latency_sum=float(latency.sum()),
        latency_max=-math.inf if empty else float(latency.max()),
    )


def sketch_block(
    bins: ReferenceBins,
    rows: InferenceRows | RecordBlock,
    *,
    received_at: float | None = None,
    ts_corrected: np.ndarray | None = None,
    ranges: RangeLimits | None = None,
    all_seqs: np.ndarray | None = None,
) -> WindowSketch:
    """One sketch of every record of ``rows`` (an :class:`InferenceRows`, or a ``RecordBlock`` plus ``received_at``).

    ``ts_corrected`` defaults to the rows' own (a ``RecordBlock``'s device ``ts``); ``ranges``
    enables out-of-range counts; ``all_seqs`` are the seqs of every block of the batch.
    """
    cols = _columns(rows, received_at, ts_corrected)
    return _aggregate(bins, _per_record(bins, cols, ranges, all_seqs), slice(None))


def split_by_window(
    bins: ReferenceBins,
    rows: InferenceRows | RecordBlock,
    window_s: float = DEFAULT_WINDOW_S,
    *,
    received_at: float | None = None,
    ts_corrected: np.ndarray | None = None,
    ranges: RangeLimits | None = None,
    all_seqs: np.ndarray | None = None,
) -> dict[float, WindowSketch]:
    """One sketch per window (keyed by window start, by ``ts_corrected``) of the records of ``rows``.

    Per-record values (bins, repeats, stuck runs, seq gaps) are computed on the whole block, so a
    run or a gap that crosses a window boundary counts in the window of the record that ends it.
    """
    cols = _columns(rows, received_at, ts_corrected)
    if len(cols) == 0:
        return {}
    per = _per_record(bins, cols, ranges, all_seqs)
    starts = window_start(cols.ts_corrected, window_s)
    if starts[0] == starts[-1] and (starts.size < 3 or bool((starts == starts[0]).all())):
        return {float(starts[0]): _aggregate(bins, per, slice(None))}
    out: dict[float, WindowSketch] = {}
    if bool((np.diff(starts) >= 0).all()):
        # Records in time order (the usual case): each window is a contiguous slice, no copies.
        cuts = np.flatnonzero(np.diff(starts)) + 1
        bounds = np.concatenate([[0], cuts, [starts.size]])
        for lo, hi in itertools.pairwise(bounds):
            out[float(starts[lo])] = _aggregate(bins, per, slice(int(lo), int(hi)))
        return out
    order = np.argsort(starts, kind="stable")
    keys, first = np.unique(starts[order], return_index=True)
    bounds = np.concatenate([first, [starts.size]])
    for key, lo, hi in zip(keys, bounds[:-1], bounds[1:], strict=True):
        out[float(key)] = _aggregate(bins, per, order[lo:hi])
    return out
