"""Batch codec: round trip, compactness and every rejection reason."""

from __future__ import annotations

import contextlib
import dataclasses

import msgpack
import numpy as np
import pytest
import zstandard

from shared.codec import (
    MAGIC,
    Batch,
    BatchError,
    Gap,
    Limits,
    RecordBlock,
    decode_batch,
    encode_batch,
    record_digests,
)


def make_block(n: int = 50, *, seed: int = 0, first_seq: int = 10, classes: int = 5, features: int = 40) -> RecordBlock:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(classes), n).astype(np.float32)
    hidden = np.maximum(rng.normal(size=(n, 64)), 0).astype(np.float32)
    return RecordBlock(
        role="active",
        model_name="cabin-events",
        model_version="1.0.0",
        seq=np.arange(first_seq, first_seq + n, dtype=np.uint64),
        ts=1.76e9 + np.arange(n) * 0.1,
        mono=500.0 + np.arange(n) * 0.1,
        pred=probs.argmax(1).astype(np.int16),
        probs=probs.astype(np.float16),
        confidence=probs.max(1).astype(np.float16),
        calibrated=(probs.max(1) * 0.95).astype(np.float16),
        features=rng.normal(20, 3, (n, features)).astype(np.float16),
        act_bits=np.packbits(hidden > 0, axis=1),
        hidden_units=64,
        act_sample_idx=np.arange(0, n, 10, dtype=np.uint32),
        act_sample=hidden[::10].astype(np.float16),
        coact=rng.poisson(2, n).astype(np.uint16),
        latency_us=rng.gamma(2, 2, n).astype(np.float32),
        sensor_flags=np.zeros(n, np.uint16),
        label=np.full(n, -1, np.int16),
    )


def make_batch(block: RecordBlock | None = None, **changes: object) -> Batch:
    block = block or make_block()
    batch = Batch(
        device_id="veh-001",
        boot_id="boot-1",
        spool_epoch="e" * 16,
        seq_first=int(block.seq[0]),
        seq_last=int(block.seq[-1]),
        sent_at=1.76e9 + 10,
        sent_mono=510.0,
        clock_synced=True,
        profile="simulated",
        agent_version="0.1.0",
        blocks=[block],
        gaps=[Gap(1, 9, "spool_full")],
    )
    return dataclasses.replace(batch, **changes)  # type: ignore[arg-type]


def raw_doc(payload: bytes) -> dict:
    return msgpack.unpackb(zstandard.ZstdDecompressor().decompress(payload[4:]), raw=False)


def repack(doc: dict) -> bytes:
    body = msgpack.packb(doc, use_bin_type=True)
    return MAGIC + b"\x01" + zstandard.ZstdCompressor().compress(body)


def test_round_trip_preserves_every_column() -> None:
    block = make_block()
    out = decode_batch(encode_batch(make_batch(block)))
    got = out.blocks[0]
    for name in ("seq", "pred", "probs", "confidence", "calibrated", "features", "act_bits", "coact", "label"):
        assert np.array_equal(getattr(got, name), getattr(block, name)), name
    assert np.allclose(got.ts, block.ts, atol=1e-6) and np.allclose(got.mono, block.mono, atol=1e-6)
    assert np.array_equal(got.act_sample, block.act_sample)
    assert out.gaps == [Gap(1, 9, "spool_full")]
    assert (out.device_id, out.spool_epoch, out.seq_first, out.seq_last) == ("veh-001", "e" * 16, 10, 59)
    assert np.array_equal(record_digests(got), record_digests(block))


def test_digest_changes_with_content() -> None:
    a = make_block()
    b = make_block()
    b.pred = b.pred.copy()
    b.pred[3] = (b.pred[3] + 1) % 5
    da, db = record_digests(a), record_digests(b)
    assert (da != db).sum() == 1 and da[3] != db[3]


def test_compact_against_json() -> None:
    block = make_block(500)
    payload = encode_batch(make_batch(block))
    assert len(payload) / 500 < 0.1 * 1714  # ARCHITECTURE §9: realistic JSON record ~1,714 bytes


def test_gap_only_batch_is_valid() -> None:
    out = decode_batch(
        encode_batch(make_batch(blocks=[], gaps=[Gap(5, 7, "crash")], seq_first=5, seq_last=7))  # type: ignore[arg-type]
    )
    assert out.n_records == 0 and out.gaps == [Gap(5, 7, "crash")]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda p: b"nonsense" + p, "bad_magic"),
        (lambda p: p[:3] + b"\x07" + p[4:], "unsupported_version"),
        (lambda p: p[:4] + b"\x00\x01\x02\x03garbage", "bad_compression"),
        (lambda p: p[: len(p) // 2], "bad_compression"),
    ],
)
def test_framing_errors(mutate, reason) -> None:
    with pytest.raises(BatchError) as err:
        decode_batch(mutate(encode_batch(make_batch())))
    assert err.value.reason == reason


def test_payload_and_bomb_limits() -> None:
    with pytest.raises(BatchError) as err:
        decode_batch(b"FLB\x01" + b"\0" * 100, limits=Limits(max_payload_bytes=50))
    assert err.value.reason == "payload_too_large"
    bomb = MAGIC + b"\x01" + zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 * 1024 * 1024))
    assert len(bomb) < 64 * 1024
    with pytest.raises(BatchError) as err:
        decode_batch(bomb)
    assert err.value.reason == "decompressed_too_large"
    # Same bomb without a declared content size: the streaming limit catches it.
    streamed = zstandard.ZstdCompressor(level=19, write_content_size=False).compressobj()
    frame = streamed.compress(b"\0" * (64 * 1024 * 1024)) + streamed.flush()
    with pytest.raises(BatchError) as err:
        decode_batch(MAGIC + b"\x01" + frame)
    assert err.value.reason == "decompressed_too_large"


def test_non_finite_policy() -> None:
    block = make_block()
    block.features = block.features.copy()
    block.features[0, 0] = np.nan  # a missing input is allowed
    decode_batch(encode_batch(make_batch(block)))
    block.features[0, 1] = np.inf
    with pytest.raises(BatchError) as err:
        decode_batch(encode_batch(make_batch(block)))
    assert err.value.reason == "non_finite"
    block = make_block()
    block.calibrated = block.calibrated.copy()
    block.calibrated[2] = np.nan
    with pytest.raises(BatchError) as err:
        decode_batch(encode_batch(make_batch(block)))
    assert err.value.reason == "non_finite"


def _mutated(path: list, value: object) -> bytes:
    doc = raw_doc(encode_batch(make_batch()))
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return repack(doc)


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        (["v"], 2, "unsupported_version"),
        (["device"], 12, "bad_envelope"),
        (["device"], "", "bad_envelope"),
        (["epoch"], KeyError, "bad_envelope"),
        (["seq"], [9, 3], "bad_seq"),
        (["seq"], [20, 30], "bad_seq"),
        (["synced"], 1, "bad_envelope"),
        (["gaps"], [[1, "x", "r"]], "bad_envelope"),
        (["blocks", 0, "role"], "boss", "bad_block"),
        (["blocks", 0, "n"], 10**9, "too_many_records"),
        (["blocks", 0, "cols", "probs", "d"], "<f8", "bad_dtype"),
        (["blocks", 0, "cols", "features", "s"], [49, 40], "bad_shape"),
        (["blocks", 0, "cols", "features", "s"], [50, 41], "bad_length"),
        (["blocks", 0, "cols", "features", "b"], b"\0" * 7, "bad_length"),
        (["blocks", 0, "cols", "pred", "b"], np.full(50, 99, "<i2").tobytes(), "bad_value"),
        (["blocks", 0, "cols", "seq", "b"], np.zeros(50, "<u8").tobytes(), "bad_seq"),
        (["blocks", 0, "cols", "evil"], {"d": "<f4", "s": [1], "b": b"1234"}, "bad_column"),
        (["blocks", 0, "cols", "coact"], KeyError, "bad_column"),
    ],
)
def test_envelope_and_column_validation(path, value, reason) -> None:
    with pytest.raises(BatchError) as err:
        decode_batch(_mutated(path, value))
    assert err.value.reason == reason, err.value


def test_oversized_arrays_rejected_before_allocation() -> None:
    doc = raw_doc(encode_batch(make_batch()))
    doc["blocks"][0]["cols"]["features"]["s"] = [50, 100_000]
    with pytest.raises(BatchError) as err:
        decode_batch(repack(doc))
    assert err.value.reason == "bad_shape"


def test_random_bytes_never_escape_as_other_errors() -> None:
    rng = np.random.default_rng(7)
    good = encode_batch(make_batch())
    for i in range(300):
        if i % 3 == 0:
            payload = rng.bytes(int(rng.integers(0, 400)))
        elif i % 3 == 1:
            payload = good[: int(rng.integers(0, len(good)))]
        else:
            flip = bytearray(good)
            for _ in range(4):
                flip[int(rng.integers(4, len(flip)))] ^= 1 << int(rng.integers(0, 8))
            payload = bytes(flip)
        with contextlib.suppress(BatchError):
            decode_batch(payload)


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [("<f2", (7, 40)), ("<f4", (5, 3)), ("<u2", (9,)), ("<f4", (1,)), ("<f2", (3, 1)), ("<i2", (0,)), ("<f2", (0, 64))],
)
def test_byte_planes_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    from shared.codec import shuffle_bytes, unshuffle_bytes

    rng = np.random.default_rng(3)
    arr = rng.normal(size=shape).astype(dtype) if dtype[1] == "f" else rng.integers(0, 999, shape).astype(dtype)
    raw = shuffle_bytes(arr) if arr.size else arr.tobytes()
    assert len(raw) == arr.nbytes
    assert np.array_equal(unshuffle_bytes(raw, np.dtype(dtype), shape), arr)
    if arr.ndim == 2 and arr.size:
        # Column-major planes: the first plane starts with column 0's low bytes, record after record.
        low = np.ascontiguousarray(arr[:, 0]).view(np.uint8)[:: arr.dtype.itemsize]
        assert raw[: shape[0]] == low.tobytes()


def test_features_travel_as_float16_only_when_it_holds_them() -> None:
    from shared.codec import features_fit_float16

    cabin = np.array([[21.5, 45.2, 1013.25, 4.7, 12.0, np.nan, -63.1, 0.0]], np.float32)
    assert features_fit_float16(cabin)
    assert not features_fit_float16(np.array([[1.0, 70_000.0]], np.float32))  # would overflow to Inf
    assert not features_fit_float16(np.array([[1.0, 1e-6]], np.float32))  # subnormal: precision lost

    block = make_block(20)
    block.features = block.features.astype(np.float32)
    block.features[0, 0] = np.nan
    small = decode_batch(encode_batch(make_batch(block))).blocks[0].features
    assert small.dtype == np.float16
    np.testing.assert_allclose(small[1:], block.features[1:], rtol=2**-11)
    assert np.isnan(small[0, 0])

    block.features[3, 5] = 123_456.0
    wide = decode_batch(encode_batch(make_batch(block))).blocks[0].features
    assert wide.dtype == np.float32 and wide[3, 5] == 123_456.0
    kept = decode_batch(encode_batch(make_batch(block), feature_precision="keep")).blocks[0].features
    assert kept.dtype == np.float32
    with pytest.raises(ValueError, match="feature_precision"):
        encode_batch(make_batch(block), feature_precision="half")


def test_transform_not_allowed_on_a_column_is_rejected() -> None:
    doc = raw_doc(encode_batch(make_batch()))
    doc["blocks"][0]["cols"]["seq"]["t"] = "shuffle"
    with pytest.raises(BatchError) as err:
        decode_batch(repack(doc))
    assert err.value.reason == "bad_column"
    doc = raw_doc(encode_batch(make_batch()))
    doc["blocks"][0]["cols"]["act_bits"]["t"] = "shuffle"  # single-byte column: never shuffled
    with pytest.raises(BatchError) as err:
        decode_batch(repack(doc))
    assert err.value.reason == "bad_column"
