"""Bytes per inference record on the wire: batch codec v1 against per-record JSON of the same records.

Method
------
Two record sources, both fed with the real cabin dataset's features (``cabin_v1.csv.gz``, 40
physical-unit features per row, in recorded order, so consecutive records are as alike as they
are in a vehicle):

* ``spec_40x64x6``: the shape the specification names (40 features, 64 hidden units, 6 classes).
  A seeded 40→64→6 ReLU network (random hidden layer, softmax output layer fitted for a few
  hundred gradient steps on the dataset's labels, so its probabilities are as confident as a
  trained model's); rare co-activation pairs by the reference profile's definition
  (:mod:`collector.training.reference`); latencies as measured by the real engine on the same rows.
* ``reference_cabin_v1``: the packaged reference bundle (``edge_agent/bundles/cabin-v1.tar``,
  verified against ``edge_agent/keys/dev-release.pub``) run through the agent's real
  :class:`edge_agent.inference.Engine` (5 classes, 64 hidden units), columns as the engine hands
  them to the spool (:meth:`InferenceColumns.to_block`).

Both get 10 Hz timestamps with scheduling jitter, consecutive ``seq``, no ground-truth label
(live operation) and the agent's default activation sampling (5 % of records carry float16
hidden activations). Records are cut into batches of 50, 500 (the agent's default
``uplink.batch_max_records``) and 5,000 and encoded with :func:`shared.codec.encode_batch`
(msgpack, columnar, zstd level 3); every payload is decoded again to check it round-trips.

The peer is per-record JSON of the *same information*: the batch envelope once, then one JSON
object per record carrying seq, role, model name and version, both clocks, prediction,
probabilities, raw and calibrated confidence, features, the activation bits as a hex string, the
float16 activations only on sampled records, the co-activation count, latency, sensor flags and
label. Floats are written at the precision that is sent: the shortest decimal that round-trips the
float16 / float32 value, clocks to the microsecond (the codec sends integer microseconds). JSON is
compact (no spaces). The same JSON compressed with zstd level 3 is shown for context: it
separates what compression gives from what the columnar layout gives.

Each case is encoded at the agent's two zstd levels: 19 for live batches and 3 while a backlog
of more than ten full batches drains (``edge_agent.config.UplinkSection``). The codec sends
features as float16 when the block fits it (``shared.codec.features_fit_float16``), else float32;
the JSON is built from the *decoded* payload, so both sides carry exactly the same values at the
same precision. The headline figure is ``spec_40x64x6`` live at 500 records per batch (the agent's
default ``uplink.batch_max_records``; a live batch fills it every 50 s at 10 Hz, within the default
``uplink.batch_max_age_s`` of 60 s).

Run: ``.venv/bin/python benchmarks/wire_size.py`` (about forty seconds). Target: ``ratio_to_json`` <= 0.10.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit, load_dataset, machine, setup_logging, table
from shared.codec import NO_LABEL, Batch, RecordBlock, decode_batch, encode_batch

log = logging.getLogger("benchmarks.wire_size")

BATCH_SIZES = (50, 500, 5000)
HEADLINE_BATCH = 500
HEADLINE_CASE = "spec_40x64x6_live"
# The agent's zstd levels (edge_agent.config UplinkSection): live batches, and batches sent while a
# backlog of more than ten full batches drains (replay, a long outage).
LEVELS = (("live", 19), ("catch-up", 3))
TARGET_RATIO = 0.10
RATE_HZ = 10.0
ACT_SAMPLE_FRACTION = 0.05  # edge_agent config default (activations.sample_fraction)
DEVICE_ID = "van-0042"
PROFILE = "sim-v1"
AGENT_VERSION = "0.1.0"


@dataclass
class Records:
    """All records of one case as one long block, cut into batches later."""

    name: str
    block: RecordBlock
    classes: int
    hidden: int


# ---------------------------------------------------------------------------------- records


def _clocks(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """10 Hz device clocks with a few milliseconds of scheduling jitter (wall and monotonic)."""
    k = np.arange(n, dtype=np.float64)
    jitter = rng.normal(0.0, 0.002, n).clip(-0.01, 0.01)
    wall = 1_795_000_000.0 + k / RATE_HZ + jitter
    mono = 86_400.0 + k / RATE_HZ + jitter
    return np.round(wall, 6), np.round(mono, 6)


def _sample(n: int, rng: np.random.Generator) -> np.ndarray:
    return np.flatnonzero(rng.random(n) < ACT_SAMPLE_FRACTION).astype(np.uint32)


def reference_records(features: np.ndarray, seed: int) -> tuple[Records, np.ndarray]:
    """The packaged reference bundle through the agent's engine; also returns the measured latencies."""
    from edge_agent.config import DEFAULT_BUNDLE, DEFAULT_KEY
    from edge_agent.inference import Engine
    from shared.bundle import load_bundle
    from shared.signing import load_public_keys

    bundle = load_bundle(DEFAULT_BUNDLE, load_public_keys([DEFAULT_KEY]))
    engine = Engine(bundle, num_threads=1, act_sample_fraction=ACT_SAMPLE_FRACTION, seed=seed)
    cols = engine.infer_many(features)
    ts, mono = _clocks(len(cols), np.random.default_rng(seed))
    block = cols.to_block(
        model_name=engine.model_name,
        model_version=engine.model_version,
        hidden_units=engine.n_hidden,
        ts=ts,
        mono=mono,
    )
    block.seq = np.arange(1_000_000, 1_000_000 + len(cols), dtype=np.uint64)
    name = "reference_cabin_v1"
    return Records(name, block, engine.n_classes, engine.n_hidden), cols.latency_us


def spec_records(features: np.ndarray, labels: list[str], latency_us: np.ndarray, seed: int) -> Records:
    """A seeded 40→64→6 ReLU network on the dataset's features (see the module docstring)."""
    from collector.training.reference import rare_coactivation_counts, rare_pair_mask
    from shared.bundle import calibrate

    rng = np.random.default_rng(seed)
    n, n_features = features.shape
    n_hidden, n_classes = 64, 6
    x = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-6)
    w1 = rng.normal(0.0, np.sqrt(2.0 / n_features), (n_features, n_hidden)).astype(np.float32)
    b1 = rng.normal(0.0, 0.1, n_hidden).astype(np.float32)
    hidden = np.maximum(x @ w1 + b1, 0.0).astype(np.float32)
    # Fit only the output layer (softmax regression on the hidden units) so the probabilities
    # are as peaked as a trained model's; the sixth class is one the data never shows.
    classes = sorted(set(labels))
    y = np.array([classes.index(v) for v in labels])
    onehot = np.eye(n_classes, dtype=np.float32)[y]
    w2 = np.zeros((n_hidden, n_classes), np.float32)
    b2 = np.zeros(n_classes, np.float32)
    for _ in range(300):
        logits = hidden @ w2 + b2
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        grad = (p - onehot) / n
        w2 -= 0.5 * (hidden.T @ grad)
        b2 -= 0.5 * grad.sum(axis=0)
    logits = hidden @ w2 + b2
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    pred = probs.argmax(axis=1)
    rows = np.arange(n)
    active = hidden > 0
    mask = rare_pair_mask(active)
    coact = rare_coactivation_counts(active, mask)
    idx = _sample(n, rng)
    ts, mono = _clocks(n, rng)
    block = RecordBlock(
        role="active",
        model_name="cabin-events-spec",
        model_version="1.0.0",
        seq=np.arange(1_000_000, 1_000_000 + n, dtype=np.uint64),
        ts=ts,
        mono=mono,
        pred=pred.astype(np.int16),
        probs=probs.astype(np.float16),
        confidence=probs[rows, pred].astype(np.float16),
        calibrated=calibrate(probs, 1.3)[rows, pred].astype(np.float16),
        features=features.astype(np.float32),
        act_bits=np.packbits(active, axis=1),
        hidden_units=n_hidden,
        act_sample_idx=idx,
        act_sample=hidden[idx].astype(np.float16),
        coact=np.minimum(coact, 65535).astype(np.uint16),
        latency_us=np.asarray(latency_us, np.float32)[:n],
        sensor_flags=np.zeros(n, np.uint16),
        label=np.full(n, NO_LABEL, np.int16),
    )
    log.info("spec model: %d rare pairs, mean top probability %.3f", int(mask.sum()), float(probs.max(axis=1).mean()))
    return Records("spec_40x64x6", block, n_classes, n_hidden)


def slice_block(block: RecordBlock, start: int, stop: int) -> RecordBlock:
    """Records ``start:stop`` of ``block`` (the sampled activations re-indexed)."""
    idx = block.act_sample_idx.astype(np.int64)
    keep = (idx >= start) & (idx < stop)
    values = dict(block.__dict__)
    for name in ("seq", "ts", "mono", "pred", "probs", "confidence", "calibrated", "features", "act_bits"):
        values[name] = values[name][start:stop]
    for name in ("coact", "latency_us", "sensor_flags", "label"):
        values[name] = values[name][start:stop]
    values["act_sample_idx"] = (idx[keep] - start).astype(np.uint32)
    values["act_sample"] = block.act_sample[keep]
    return RecordBlock(**values)


def make_batch(block: RecordBlock, boot_id: str, epoch: str, sent_at: float, sent_mono: float) -> Batch:
    """The envelope the uplink puts around one spool batch."""
    return Batch(
        device_id=DEVICE_ID,
        boot_id=boot_id,
        spool_epoch=epoch,
        seq_first=int(block.seq[0]),
        seq_last=int(block.seq[-1]),
        sent_at=sent_at,
        sent_mono=sent_mono,
        clock_synced=True,
        profile=PROFILE,
        agent_version=AGENT_VERSION,
        blocks=[block],
    )


# -------------------------------------------------------------------------------------- JSON


def _floats(arr: np.ndarray) -> list[Any]:
    """Shortest decimals that round-trip ``arr``'s own dtype (numpy's repr), as JSON numbers."""
    return np.asarray(arr).astype(str).astype(np.float64).tolist()


def _widened(arr: np.ndarray) -> list[Any]:
    """``arr.tolist()``: float16/float32 widened to float64, whose repr carries up to 17 digits."""
    return np.asarray(arr).tolist()


def json_batch(batch: Batch, *, naive: bool = False) -> bytes:
    """Per-record JSON of ``batch``: the envelope once, one self-contained object per record.

    ``naive`` writes floats the way ``json.dumps(array.tolist())`` does (float64 reprs of the
    narrower values), for comparison with figures measured that way.
    """
    (b,) = batch.blocks
    n = len(b)
    floats = _widened if naive else _floats
    probs = floats(b.probs)
    features = floats(b.features)
    conf = floats(b.confidence)
    cal = floats(b.calibrated)
    lat = floats(b.latency_us)
    ts = np.round(b.ts, 6).tolist()
    mono = np.round(b.mono, 6).tolist()
    bits = [row.tobytes().hex() for row in b.act_bits]
    samples = dict(zip(b.act_sample_idx.tolist(), floats(b.act_sample), strict=True))
    seq, pred, coact = b.seq.tolist(), b.pred.tolist(), b.coact.tolist()
    flags, label = b.sensor_flags.tolist(), b.label.tolist()
    records = []
    for i in range(n):
        rec: dict[str, Any] = {
            "seq": seq[i],
            "role": b.role,
            "model": b.model_name,
            "version": b.model_version,
            "ts": ts[i],
            "mono": mono[i],
            "pred": pred[i],
            "probs": probs[i],
            "confidence": conf[i],
            "calibrated": cal[i],
            "features": features[i],
            "act_bits": bits[i],
            "coact": coact[i],
            "latency_us": lat[i],
            "sensor_flags": flags[i],
            "label": None if label[i] == NO_LABEL else label[i],
        }
        if i in samples:
            rec["act_sample"] = samples[i]
        records.append(rec)
    doc = {
        "v": batch.schema_version,
        "device": batch.device_id,
        "boot": batch.boot_id,
        "epoch": batch.spool_epoch,
        "seq": [batch.seq_first, batch.seq_last],
        "sent_at": round(batch.sent_at, 6),
        "sent_mono": round(batch.sent_mono, 6),
        "synced": batch.clock_synced,
        "profile": batch.profile,
        "agent": batch.agent_version,
        "gaps": [],
        "records": records,
    }
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


# ------------------------------------------------------------------------------- measurement


def measure(records: Records, batch_size: int, max_records: int, level: int) -> dict[str, Any]:
    """Encode every full batch of ``batch_size`` among the first ``max_records`` records, both ways.

    The JSON is built from the *decoded* payload, so it carries exactly what the wire carried, at
    the precision it was sent (features go as float16 when the block fits it, see shared.codec).
    """
    total = min(len(records.block), max(batch_size, max_records)) // batch_size * batch_size
    boot_id, epoch = uuid.uuid4().hex, uuid.uuid4().hex
    zstd = zstandard.ZstdCompressor(level=3)
    wire = json_bytes = json_zstd = json_naive = 0
    encode_s = decode_s = 0.0
    batches = 0
    for start in range(0, total, batch_size):
        block = slice_block(records.block, start, start + batch_size)
        batch = make_batch(block, boot_id, epoch, float(block.ts[-1]) + 0.5, float(block.mono[-1]) + 0.5)
        t0 = time.perf_counter()
        payload = encode_batch(batch, level=level)
        t1 = time.perf_counter()
        decoded = decode_batch(payload)
        t2 = time.perf_counter()
        encode_s += t1 - t0
        decode_s += t2 - t1
        if decoded.n_records != batch_size or not np.array_equal(decoded.blocks[0].seq, block.seq):
            raise RuntimeError(f"{records.name}: batch at {start} does not round-trip")
        doc = json_batch(decoded)
        wire += len(payload)
        json_bytes += len(doc)
        json_zstd += len(zstd.compress(doc))
        json_naive += len(json_batch(decoded, naive=True))
        batches += 1
    return {
        "batches": batches,
        "records": total,
        "bytes_per_record": round(wire / total, 2),
        "json_bytes_per_record": round(json_bytes / total, 1),
        "ratio_to_json": round(wire / json_bytes, 4),
        "json_zstd_bytes_per_record": round(json_zstd / total, 2),
        "ratio_to_json_zstd": round(wire / json_zstd, 4),
        "json_naive_bytes_per_record": round(json_naive / total, 1),
        "encode_us_per_record": round(encode_s / total * 1e6, 3),
        "decode_us_per_record": round(decode_s / total * 1e6, 3),
        "zstd_level": level,
        "features_dtype": decoded.blocks[0].features.dtype.str,
    }


def column_bytes(block: RecordBlock, level: int) -> dict[str, float]:
    """Each column of ``block`` as the codec lays it out on the wire, compressed on its own, in bytes per record.

    The columns are taken from a real payload (after the codec's dtype choice, deltas and byte
    planes). They compress together on the wire, so these add up to roughly, not exactly, the
    payload; they show where the bytes go.
    """
    zstd = zstandard.ZstdCompressor(level=level)
    batch = make_batch(block, "boot", "epoch", float(block.ts[-1]), float(block.mono[-1]))
    payload = encode_batch(batch, level=level)
    doc = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(payload[4:]), raw=False)
    n = len(block)
    return {
        name: round(len(zstd.compress(col["b"])) / n, 2) for name, col in doc["blocks"][0]["cols"].items()
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the account and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=20_000, help="records per case and batch size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING)
    host = machine()
    names, features, labels = load_dataset()
    if len(names) != 40:
        raise RuntimeError(f"expected 40 features in the dataset, found {len(names)}")
    n = min(len(features), max(args.records, max(BATCH_SIZES)))
    features, labels = features[:n], labels[:n]
    reference, latency = reference_records(features, args.seed)
    spec = spec_records(features, labels, latency, args.seed)
    cases = [spec, reference]

    print(f"wire_size: batch codec v1 vs per-record JSON, {n:,} cabin_v1 rows per case")
    print(f"machine: {host['nproc']} x {host['cpu_model']}, {host['ram_gib']} GiB, {host['date']}")
    detail: dict[str, dict[str, Any]] = {}
    rows = []
    for case in cases:
        for mode, level in LEVELS:
            key = f"{case.name}_{mode}"
            detail[key] = {}
            for size in BATCH_SIZES:
                m = measure(case, size, args.records, level)
                m["classes"] = case.classes
                m["hidden"] = case.hidden
                detail[key][str(size)] = m
                rows.append(
                    [
                        f"{case.name} {mode} (zstd {level})",
                        size,
                        m["bytes_per_record"],
                        m["json_bytes_per_record"],
                        m["ratio_to_json"],
                        m["json_zstd_bytes_per_record"],
                        m["json_naive_bytes_per_record"],
                        m["encode_us_per_record"],
                        m["decode_us_per_record"],
                    ]
                )
    print()
    print(
        table(
            [
                "case",
                "batch",
                "wire B/rec",
                "JSON B/rec",
                "ratio",
                "JSON+zstd B/rec",
                "naive JSON B/rec",
                "enc us/rec",
                "dec us/rec",
            ],
            rows,
        )
    )
    head = detail[HEADLINE_CASE][str(HEADLINE_BATCH)]
    columns = column_bytes(slice_block(spec.block, 0, HEADLINE_BATCH), head["zstd_level"])
    print()
    print(f"where the bytes go ({HEADLINE_CASE}, one batch of {HEADLINE_BATCH}, each column compressed alone):")
    print(table(["column", "B/record"], sorted(columns.items(), key=lambda kv: -kv[1])))
    print(
        "JSON written naively (json.dumps of array.tolist(), float64 reprs): "
        f"{head['json_naive_bytes_per_record']} B/record"
    )
    verdict = "meets" if head["ratio_to_json"] <= TARGET_RATIO else "MISSES"
    print()
    print(
        f"headline ({HEADLINE_CASE}, {HEADLINE_BATCH} records per batch, zstd 19, features {head['features_dtype']}): "
        f"{head['bytes_per_record']} B/record on the wire vs {head['json_bytes_per_record']} B/record as JSON, "
        f"ratio {head['ratio_to_json']} ({verdict} the target <= {TARGET_RATIO})"
    )
    ref = detail["reference_cabin_v1_live"][str(HEADLINE_BATCH)]
    print(
        f"reference model (5 classes, real engine), same batch size: {ref['bytes_per_record']} B/record, "
        f"ratio {ref['ratio_to_json']}"
    )
    emit(
        {
            "benchmark": "wire_size",
            "bytes_per_record": head["bytes_per_record"],
            "json_bytes_per_record": head["json_bytes_per_record"],
            "ratio_to_json": head["ratio_to_json"],
            "target_ratio_to_json": TARGET_RATIO,
            "headline": {
                "case": HEADLINE_CASE,
                "batch_records": HEADLINE_BATCH,
                "features_dtype": head["features_dtype"],
                "zstd_level": head["zstd_level"],
            },
            "reference_bytes_per_record": ref["bytes_per_record"],
            "reference_ratio_to_json": ref["ratio_to_json"],
            "column_bytes_per_record": columns,
            "detail": detail,
            "machine": host,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
