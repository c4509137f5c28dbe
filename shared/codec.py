"""Batch codec of wire protocol v1: columnar numpy arrays in msgpack, zstd-compressed.

A telemetry payload is ``MAGIC (3 bytes) | schema version (1 byte) | zstd frame``. The frame holds
one msgpack map: the envelope (device, boot, spool epoch, seq range, clocks, hardware profile,
declared gaps) and one or more *blocks*. A block holds the records one model produced in one role
(``active`` or ``shadow``) as columns: each column is ``{"d": dtype, "s": shape, "b": raw
little-endian bytes}``, optionally delta-encoded (``"t": "delta"``) so monotonic columns such as
``seq`` and timestamps compress to almost nothing.

:func:`decode_batch` trusts nothing: payload and decompressed sizes, msgpack container sizes,
every envelope field's type, every column's dtype, shape and length, seq ordering and range, and
the NaN/Inf policy are checked, and any violation raises :class:`BatchError` with a machine
readable ``reason`` and a human ``detail``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack
import numpy as np
import zstandard

MAGIC: Final = b"FLB"
SCHEMA_VERSION: Final = 1
ROLES: Final = ("active", "shadow")
NO_LABEL: Final = -1


class BatchError(ValueError):
    """A payload that is not a valid v1 batch. ``reason`` is a stable code, ``detail`` says more."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    """Upper bounds the decoder enforces before and while it allocates."""

    max_payload_bytes: int = 4 * 1024 * 1024
    max_decompressed_bytes: int = 32 * 1024 * 1024
    max_records: int = 20_000
    max_blocks: int = 8
    max_features: int = 1024
    max_hidden: int = 4096
    max_classes: int = 256
    max_gaps: int = 1024
    max_string: int = 128


DEFAULT_LIMITS: Final = Limits()


@dataclass(frozen=True)
class Gap:
    """A seq range the device knows it will never send, and why (``spool_full``, ``crash``...)."""

    first: int
    last: int
    reason: str


@dataclass
class RecordBlock:
    """Records of one model in one role, as columns of equal length ``n``.

    ``features`` may hold NaN for inputs a failed sensor did not deliver (``sensor_flags`` says
    which); every other float column must be finite. ``act_sample`` holds float16 hidden
    activations for the records at positions ``act_sample_idx`` (the sampled subset).
    """

    role: str
    model_name: str
    model_version: str
    seq: np.ndarray  # uint64 [n], strictly increasing
    ts: np.ndarray  # float64 [n], device wall clock, seconds since the epoch
    mono: np.ndarray  # float64 [n], device monotonic clock, seconds
    pred: np.ndarray  # int16 [n]
    probs: np.ndarray  # float16|float32 [n, classes]
    confidence: np.ndarray  # float16|float32 [n], raw top-class probability
    calibrated: np.ndarray  # float16|float32 [n], calibrated top-class confidence
    features: np.ndarray  # float16|float32 [n, features]
    act_bits: np.ndarray  # uint8 [n, ceil(hidden / 8)], np.packbits of activation > 0
    hidden_units: int
    act_sample_idx: np.ndarray  # uint32 [k], positions into the block
    act_sample: np.ndarray  # float16 [k, hidden]
    coact: np.ndarray  # uint16 [n], rare co-activation count
    latency_us: np.ndarray  # float32 [n]
    sensor_flags: np.ndarray  # uint16 [n]
    label: np.ndarray  # int16 [n], NO_LABEL where unknown

    def __len__(self) -> int:
        return int(self.seq.shape[0])


@dataclass
class Batch:
    """One telemetry payload: the envelope plus its record blocks."""

    device_id: str
    boot_id: str
    spool_epoch: str
    seq_first: int
    seq_last: int
    sent_at: float  # device wall clock when sent
    sent_mono: float  # device monotonic clock when sent
    clock_synced: bool
    profile: str
    agent_version: str
    blocks: list[RecordBlock]
    gaps: list[Gap] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    @property
    def n_records(self) -> int:
        """Records across all blocks."""
        return sum(len(b) for b in self.blocks)


# Column name -> (allowed dtypes, trailing shape kind, delta-encoded on the wire, finite policy).
# Shape kinds: "" -> [n]; "c" classes; "f" features; "hb" packed hidden bytes; "k" sample count;
# "kh" [k, hidden]. Finite policy: "finite" (no NaN/Inf), "nan_ok" (NaN allowed, no Inf), None (ints).
_COLUMNS: Final[dict[str, tuple[tuple[str, ...], str, bool, str | None]]] = {
    "seq": (("<u8",), "", True, None),
    "ts": (("<f8",), "", False, "finite"),
    "mono": (("<f8",), "", False, "finite"),
    "pred": (("<i2",), "", False, None),
    "probs": (("<f2", "<f4"), "c", False, "finite"),
    "confidence": (("<f2", "<f4"), "", False, "finite"),
    "calibrated": (("<f2", "<f4"), "", False, "finite"),
    "features": (("<f2", "<f4"), "f", False, "nan_ok"),
    "act_bits": (("|u1",), "hb", False, None),
    "act_sample_idx": (("<u4",), "k", False, None),
    "act_sample": (("<f2",), "kh", False, "finite"),
    "coact": (("<u2",), "", False, None),
    "latency_us": (("<f4",), "", False, "finite"),
    "sensor_flags": (("<u2",), "", False, None),
    "label": (("<i2",), "", False, None),
}
_TS_COLUMNS: Final = ("ts", "mono")  # sent as int64 microsecond deltas, decoded back to float64 seconds
# Multi-byte columns sent as byte planes (see shuffle_bytes): they compress far better that way.
_SHUFFLED: Final = frozenset(
    {
        "pred",
        "probs",
        "confidence",
        "calibrated",
        "features",
        "act_sample",
        "coact",
        "latency_us",
        "sensor_flags",
        "label",
    }
)


def shuffle_bytes(arr: np.ndarray) -> bytes:
    """Column-major byte planes of ``arr``: all first bytes of column 0, then of column 1, ..., then all second bytes.

    Consecutive records are alike (environmental sensors update at 1 Hz, ten inferences a second),
    so one feature's values side by side compress to almost nothing, and the exponent bytes of
    floats, which barely change, are no longer interleaved with their noisy low mantissa bytes.
    """
    a = np.ascontiguousarray(arr)
    cols = a.reshape(a.shape[0], -1).T if a.ndim > 1 else a.reshape(1, -1)
    planes = np.ascontiguousarray(cols).view(np.uint8).reshape(cols.shape[0], cols.shape[1], a.dtype.itemsize)
    return np.ascontiguousarray(planes.transpose(2, 0, 1)).tobytes()


def unshuffle_bytes(raw: bytes, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`shuffle_bytes` (``len(raw)`` must already match ``dtype`` and ``shape``)."""
    n = shape[0] if shape else 1
    width = math.prod(shape[1:]) if len(shape) > 1 else 1
    rows, cols = (width, n) if len(shape) > 1 else (1, n)
    planes = np.frombuffer(raw, np.uint8).reshape(dtype.itemsize, rows, cols)
    values = np.ascontiguousarray(planes.transpose(1, 2, 0)).view(dtype).reshape(rows, cols)
    return np.ascontiguousarray(values.T if len(shape) > 1 else values.reshape(-1)).reshape(shape)


def _column(arr: np.ndarray, delta: bool = False, shuffle: bool = False) -> dict[str, Any]:
    arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if delta and arr.size:
        arr = np.diff(arr, prepend=arr.dtype.type(0)).astype(arr.dtype)
    shuffle = shuffle and arr.size > 0
    data = shuffle_bytes(arr) if shuffle else arr.tobytes()
    col: dict[str, Any] = {"d": arr.dtype.str, "s": list(arr.shape), "b": data}
    if delta:
        col["t"] = "delta"
    elif shuffle:
        col["t"] = "shuffle"
    return col


# float16 keeps 11 significant bits: a relative error of at most 2**-11 (0.05 %) for magnitudes
# in its normal range. Features are sent as float16 when every value of the block is in that range.
_F16_MAX: Final = 65504.0
_F16_MIN_NORMAL: Final = 2.0**-14


def features_fit_float16(features: np.ndarray) -> bool:
    """True when float16 holds every finite value of ``features`` within 0.05 % (NaN travels as NaN)."""
    mag = np.abs(features[np.isfinite(features)])
    return bool(((mag == 0) | ((mag >= _F16_MIN_NORMAL) & (mag <= _F16_MAX))).all())


def _encode_block(block: RecordBlock, feature_precision: str) -> dict[str, Any]:
    cols: dict[str, Any] = {}
    for name, (dtypes, _kind, delta, _policy) in _COLUMNS.items():
        arr = np.asarray(getattr(block, name))
        if name in _TS_COLUMNS:
            us = np.round(arr.astype(np.float64) * 1e6).astype(np.int64)
            cols[name] = _column(us, delta=True)
            continue
        if name == "features" and feature_precision == "auto" and arr.dtype != np.float16:
            arr = arr.astype("<f2") if features_fit_float16(arr) else arr.astype("<f4")
        elif arr.dtype.str not in dtypes:
            arr = arr.astype(dtypes[0])
        cols[name] = _column(arr, delta=delta, shuffle=not delta and name in _SHUFFLED)
    return {
        "role": block.role,
        "model": block.model_name,
        "version": block.model_version,
        "hidden": int(block.hidden_units),
        "n": len(block),
        "cols": cols,
    }


def encode_batch(batch: Batch, *, level: int = 3, feature_precision: str = "auto") -> bytes:
    """Serialise ``batch`` to a v1 payload (msgpack, zstd ``level``).

    ``feature_precision`` ``"auto"`` sends features as float16 when every value fits it within
    0.05 % (see :func:`features_fit_float16`), else float32; ``"keep"`` sends them as they are.
    """
    if feature_precision not in ("auto", "keep"):
        raise ValueError(f"feature_precision must be 'auto' or 'keep', not {feature_precision!r}")
    doc = {
        "v": batch.schema_version,
        "device": batch.device_id,
        "boot": batch.boot_id,
        "epoch": batch.spool_epoch,
        "seq": [int(batch.seq_first), int(batch.seq_last)],
        "sent_at": float(batch.sent_at),
        "sent_mono": float(batch.sent_mono),
        "synced": bool(batch.clock_synced),
        "profile": batch.profile,
        "agent": batch.agent_version,
        "gaps": [[int(g.first), int(g.last), g.reason] for g in batch.gaps],
        "blocks": [_encode_block(b, feature_precision) for b in batch.blocks],
    }
    body = msgpack.packb(doc, use_bin_type=True)
    frame = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(body)
    return MAGIC + bytes([batch.schema_version]) + frame


# --------------------------------------------------------------------------------------- decode


def _decompress(payload: bytes, limits: Limits) -> bytes:
    if len(payload) > limits.max_payload_bytes:
        raise BatchError("payload_too_large", f"{len(payload)} bytes > limit {limits.max_payload_bytes}")
    if len(payload) < len(MAGIC) + 1 or payload[: len(MAGIC)] != MAGIC:
        raise BatchError("bad_magic", "payload does not start with the v1 batch magic")
    version = payload[len(MAGIC)]
    if version != SCHEMA_VERSION:
        raise BatchError("unsupported_version", f"schema version {version}, this decoder reads {SCHEMA_VERSION}")
    frame = payload[len(MAGIC) + 1 :]
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise BatchError("bad_compression", f"not a zstd frame: {exc}") from None
    if declared > limits.max_decompressed_bytes:
        raise BatchError(
            "decompressed_too_large", f"frame declares {declared} bytes > limit {limits.max_decompressed_bytes}"
        )
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(frame, read_across_frames=False)
        body = reader.read(limits.max_decompressed_bytes + 1)
    except zstandard.ZstdError as exc:
        raise BatchError("bad_compression", f"zstd frame is corrupt: {exc}") from None
    if len(body) > limits.max_decompressed_bytes:
        raise BatchError("decompressed_too_large", f"frame inflates past {limits.max_decompressed_bytes} bytes")
    if declared >= 0 and len(body) != declared:
        raise BatchError("bad_compression", f"frame declares {declared} bytes but holds {len(body)}")
    return body


def _unpack(body: bytes, limits: Limits) -> dict[str, Any]:
    try:
        doc = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_str_len=limits.max_string * 16,
            max_bin_len=limits.max_decompressed_bytes,
            max_array_len=max(limits.max_gaps, 64),
            max_map_len=64,
            max_ext_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise BatchError("bad_msgpack", f"body is not one valid msgpack document: {exc}") from None
    if not isinstance(doc, dict):
        raise BatchError("bad_envelope", f"body is a {type(doc).__name__}, expected a map")
    return doc


def _field(doc: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str = "envelope") -> Any:
    if key not in doc:
        raise BatchError("bad_envelope", f"{where} lacks field {key!r}")
    value = doc[key]
    # bool is an int subclass: refuse it where a number is expected, and vice versa.
    if isinstance(value, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,)):
        raise BatchError("bad_envelope", f"{where} field {key!r} is a bool")
    if not isinstance(value, typ):
        raise BatchError("bad_envelope", f"{where} field {key!r} has type {type(value).__name__}")
    return value


def _string(doc: dict[str, Any], key: str, limits: Limits, where: str = "envelope", empty: bool = False) -> str:
    value: str = _field(doc, key, str, where)
    if len(value) > limits.max_string or (not value and not empty):
        raise BatchError("bad_envelope", f"{where} field {key!r} must be 1-{limits.max_string} characters")
    return value


def _array(cols: dict[str, Any], name: str, shape: tuple[int, ...], block_no: int) -> np.ndarray:
    dtypes, _kind, delta, policy = _COLUMNS[name]
    where = f"block {block_no} column {name!r}"
    col = cols.get(name)
    if not isinstance(col, dict):
        raise BatchError("bad_column", f"{where} is missing")
    dstr, sh, raw = col.get("d"), col.get("s"), col.get("b")
    allowed = ("<i8",) if name in _TS_COLUMNS else dtypes
    if dstr not in allowed:
        raise BatchError("bad_dtype", f"{where} has dtype {dstr!r}, expected one of {allowed}")
    if not isinstance(sh, list) or [int(x) if isinstance(x, int) else -1 for x in sh] != list(shape):
        raise BatchError("bad_shape", f"{where} has shape {sh!r}, expected {list(shape)}")
    if not isinstance(raw, bytes):
        raise BatchError("bad_column", f"{where} data is not bytes")
    dtype = np.dtype(dstr)
    expected = dtype.itemsize * math.prod(shape)
    if len(raw) != expected:
        raise BatchError("bad_length", f"{where} holds {len(raw)} bytes, shape and dtype need {expected}")
    transform = col.get("t")
    is_delta = delta or name in _TS_COLUMNS
    allowed_transforms = ("delta",) if is_delta else ((None, "shuffle") if name in _SHUFFLED else (None,))
    if transform not in allowed_transforms:
        raise BatchError("bad_column", f"{where} has transform {transform!r}")
    if transform == "shuffle":
        arr = unshuffle_bytes(raw, dtype, shape)
    else:
        arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if is_delta:
        arr = np.cumsum(arr, dtype=dtype)
    if name in _TS_COLUMNS:
        arr = arr.astype(np.float64) / 1e6
    elif policy == "finite" and not np.isfinite(arr).all():
        raise BatchError("non_finite", f"{where} holds NaN or Inf")
    elif policy == "nan_ok" and np.isinf(arr).any():
        raise BatchError("non_finite", f"{where} holds Inf")
    return arr


def _decode_block(raw: Any, no: int, limits: Limits) -> RecordBlock:
    where = f"block {no}"
    if not isinstance(raw, dict):
        raise BatchError("bad_block", f"{where} is not a map")
    role = _string(raw, "role", limits, where)
    if role not in ROLES:
        raise BatchError("bad_block", f"{where} role {role!r} is not one of {ROLES}")
    n = _field(raw, "n", int, where)
    hidden = _field(raw, "hidden", int, where)
    if not 0 < n <= limits.max_records:
        raise BatchError("too_many_records", f"{where} has n={n}, allowed 1-{limits.max_records}")
    if not 0 < hidden <= limits.max_hidden:
        raise BatchError("bad_shape", f"{where} has hidden={hidden}, allowed 1-{limits.max_hidden}")
    cols = _field(raw, "cols", dict, where)
    unknown = set(cols) - set(_COLUMNS)
    if unknown:
        raise BatchError("bad_column", f"{where} has unknown columns {sorted(unknown)}")

    def dim(name: str, axis: int, limit: int, what: str) -> int:
        col = cols.get(name)
        sh = col.get("s") if isinstance(col, dict) else None
        if not isinstance(sh, list) or len(sh) <= axis or not isinstance(sh[axis], int):
            raise BatchError("bad_shape", f"{where} column {name!r} has no usable shape")
        value: int = sh[axis]
        if not 0 < value <= limit:
            raise BatchError("bad_shape", f"{where} has {value} {what}, allowed 1-{limit}")
        return value

    n_classes = dim("probs", 1, limits.max_classes, "classes")
    n_features = dim("features", 1, limits.max_features, "features")
    k_col = cols.get("act_sample_idx")
    k_shape = k_col.get("s") if isinstance(k_col, dict) else None
    k = k_shape[0] if isinstance(k_shape, list) and k_shape and isinstance(k_shape[0], int) else -1
    if not 0 <= k <= n:
        raise BatchError("bad_shape", f"{where} samples {k} activation rows of {n} records")
    shapes = {
        "": (n,),
        "c": (n, n_classes),
        "f": (n, n_features),
        "hb": (n, (hidden + 7) // 8),
        "k": (k,),
        "kh": (k, hidden),
    }
    arrays = {name: _array(cols, name, shapes[kind], no) for name, (_d, kind, _x, _p) in _COLUMNS.items()}
    seq = arrays["seq"]
    if n > 1 and not (np.diff(seq.astype(np.int64)) > 0).all():
        raise BatchError("bad_seq", f"{where} seq is not strictly increasing")
    idx = arrays["act_sample_idx"]
    if k and (int(idx.max()) >= n or (k > 1 and not (np.diff(idx.astype(np.int64)) > 0).all())):
        raise BatchError("bad_shape", f"{where} act_sample_idx is not increasing positions below {n}")
    pred = arrays["pred"]
    if (pred < 0).any() or (pred >= n_classes).any():
        raise BatchError("bad_value", f"{where} pred outside 0..{n_classes - 1}")
    label = arrays["label"]
    if ((label < NO_LABEL) | (label >= n_classes)).any():
        raise BatchError("bad_value", f"{where} label outside -1..{n_classes - 1}")
    for name in ("probs", "confidence", "calibrated"):
        a = arrays[name]
        if ((a < 0) | (a > 1.001)).any():
            raise BatchError("bad_value", f"{where} {name} outside [0, 1]")
    if (arrays["latency_us"] < 0).any():
        raise BatchError("bad_value", f"{where} latency_us is negative")
    return RecordBlock(
        role=role,
        model_name=_string(raw, "model", limits, where),
        model_version=_string(raw, "version", limits, where),
        hidden_units=hidden,
        **arrays,
    )


def decode_batch(payload: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Batch:
    """Parse and validate a v1 payload; raise :class:`BatchError` on anything out of contract."""
    doc = _unpack(_decompress(payload, limits), limits)
    version = _field(doc, "v", int)
    if version != SCHEMA_VERSION:
        raise BatchError("unsupported_version", f"envelope says schema version {version}")
    seq_range = _field(doc, "seq", list)
    if len(seq_range) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in seq_range):
        raise BatchError("bad_envelope", "seq must be [first, last] integers")
    first, last = seq_range
    if not 0 <= first <= last < 2**63:
        raise BatchError("bad_seq", f"seq range [{first}, {last}] is not ordered non-negative")
    sent_at = float(_field(doc, "sent_at", (float, int)))
    sent_mono = float(_field(doc, "sent_mono", (float, int)))
    if not (math.isfinite(sent_at) and math.isfinite(sent_mono)):
        raise BatchError("non_finite", "sent_at or sent_mono is not finite")
    raw_gaps = _field(doc, "gaps", list)
    if len(raw_gaps) > limits.max_gaps:
        raise BatchError("bad_envelope", f"{len(raw_gaps)} gaps > limit {limits.max_gaps}")
    gaps: list[Gap] = []
    for g in raw_gaps:
        ok = (
            isinstance(g, list)
            and len(g) == 3
            and all(isinstance(x, int) and not isinstance(x, bool) for x in g[:2])
            and isinstance(g[2], str)
            and 0 < len(g[2]) <= limits.max_string
        )
        if not ok or not 0 <= g[0] <= g[1] < 2**63:
            raise BatchError("bad_envelope", f"gap {g!r} is not [first, last, reason]")
        gaps.append(Gap(g[0], g[1], g[2]))
    raw_blocks = _field(doc, "blocks", list)
    if len(raw_blocks) > limits.max_blocks:
        raise BatchError("bad_envelope", f"{len(raw_blocks)} blocks > limit {limits.max_blocks}")
    if not raw_blocks and not gaps:
        raise BatchError("bad_envelope", "batch holds neither records nor gaps")
    blocks = [_decode_block(b, i, limits) for i, b in enumerate(raw_blocks)]
    total = sum(len(b) for b in blocks)
    if total > limits.max_records:
        raise BatchError("too_many_records", f"{total} records > limit {limits.max_records}")
    if blocks:
        all_seq = np.concatenate([b.seq for b in blocks])
        if int(all_seq.min()) < first or int(all_seq.max()) > last:
            raise BatchError("bad_seq", f"record seq outside the envelope range [{first}, {last}]")
        if np.unique(all_seq).size != all_seq.size:
            raise BatchError("bad_seq", "a seq appears twice in one batch")
    device_id = _string(doc, "device", limits)
    return Batch(
        device_id=device_id,
        boot_id=_string(doc, "boot", limits),
        spool_epoch=_string(doc, "epoch", limits),
        seq_first=first,
        seq_last=last,
        sent_at=sent_at,
        sent_mono=sent_mono,
        clock_synced=_field(doc, "synced", bool),
        profile=_string(doc, "profile", limits),
        agent_version=_string(doc, "agent", limits),
        blocks=blocks,
        gaps=gaps,
        schema_version=version,
    )


# ------------------------------------------------------------------------------------ digests

_MIX: Final = np.uint64(0x9E3779B97F4A7C15)


def record_digests(block: RecordBlock) -> np.ndarray:
    """A 63-bit content digest per record, to tell a re-sent record from a reused ``seq``.

    Vectorised over the block: each record's bytes (timestamps, prediction, confidences,
    features, activation bits, counts) are folded 8 bytes at a time with a multiply-xorshift mix.
    Not cryptographic; it only has to differ when content differs by accident or by a bug.
    """
    n = len(block)
    parts = [
        np.round(block.ts * 1e6).astype("<i8").reshape(n, 1).view(np.uint8),
        block.pred.astype("<i2").reshape(n, 1).view(np.uint8),
        block.probs.astype("<f2").reshape(n, -1).view(np.uint8),
        block.calibrated.astype("<f2").reshape(n, 1).view(np.uint8),
        block.features.astype("<f2").reshape(n, -1).view(np.uint8),
        np.ascontiguousarray(block.act_bits).reshape(n, -1),
        block.coact.astype("<u2").reshape(n, 1).view(np.uint8),
    ]
    raw = np.concatenate(parts, axis=1)
    pad = (-raw.shape[1]) % 8
    if pad:
        raw = np.concatenate([raw, np.zeros((n, pad), np.uint8)], axis=1)
    words = np.ascontiguousarray(raw).view("<u8")
    h = np.full(n, 0xCBF29CE484222325, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(words.shape[1]):
            h ^= words[:, j]
            h *= _MIX
            h ^= h >> np.uint64(29)
    return (h >> np.uint64(1)).astype(np.int64)
