"""Bulk inference writers: idempotence, conflicts, exact values, and SQLite == PostgreSQL."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from sqlalchemy.engine import Engine

from collector.db import make_engine, upgrade
from collector.ingest.bulk import InferenceRows, WriteOutcome, write_inferences
from shared.codec import Batch, RecordBlock, decode_batch, encode_batch, record_digests
from tests.shared.test_codec import make_batch, make_block

RECEIVED = 1.76e9 + 20.0


def block(n: int = 50, *, first: int = 10, seed: int = 0, **changes: Any) -> RecordBlock:
    b = make_block(n, first_seq=first, seed=seed)
    b.label[::3] = b.pred[::3]  # some records carry a ground-truth label, the rest NULL
    return dataclasses.replace(b, **changes)


def shadow(n: int = 50, *, first: int = 1000, seed: int = 7) -> RecordBlock:
    """A shadow model with float32 features and another hidden width."""
    b = make_block(n, first_seq=first, seed=seed)
    rng = np.random.default_rng(seed)
    hidden = np.maximum(rng.normal(size=(n, 20)), 0).astype(np.float32)
    return dataclasses.replace(
        b,
        role="shadow",
        model_version="2.0.0-rc1",
        features=b.features.astype(np.float32),
        act_bits=np.packbits(hidden > 0, axis=1),
        hidden_units=20,
        act_sample_idx=np.array([0, 5], np.uint32),
        act_sample=hidden[[0, 5]].astype(np.float16),
    )


def wire(*blocks: RecordBlock, device: str = "veh-001", epoch: str = "e" * 16, **changes: Any) -> Batch:
    """A batch as the collector sees it: encoded and decoded again."""
    seqs = np.concatenate([b.seq for b in blocks])
    batch = make_batch(
        blocks[0],
        blocks=list(blocks),
        device_id=device,
        spool_epoch=epoch,
        seq_first=int(seqs.min()),
        seq_last=int(seqs.max()),
        **changes,
    )
    return decode_batch(encode_batch(batch, feature_precision="keep"))  # keep: these tests choose the dtypes


def rows(batch: Batch, received_at: float = RECEIVED) -> list[InferenceRows]:
    return [InferenceRows.from_block(batch, b, received_at) for b in batch.blocks]


def write(engine: Engine, blocks: list[InferenceRows]) -> list[WriteOutcome]:
    with engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
        return write_inferences(conn, blocks)


REAL_COLUMNS = ("confidence", "calibrated", "latency_us")


def dump(engine: Engine) -> list[tuple[Any, ...]]:
    """Every inference row; REAL columns as float32 (psycopg prints them shortest, SQLite keeps a double)."""
    with engine.connect() as conn:
        result = conn.exec_driver_sql("SELECT * FROM inference ORDER BY device_id, spool_epoch, seq")
        columns = tuple(result.keys())
        real = [name in REAL_COLUMNS for name in columns]
        return [
            tuple(
                np.float32(v) if is_real else bytes(v) if isinstance(v, memoryview) else v
                for v, is_real in zip(row, real, strict=True)
            )
            for row in result.all()
        ]


def summary(outcomes: list[WriteOutcome]) -> list[tuple[int, int, list[int]]]:
    return [(o.inserted, o.duplicates, o.conflicts.tolist()) for o in outcomes]


def _engine(url: str) -> Iterator[Engine]:
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    yield from _engine(url)


def test_same_batch_twice_is_all_duplicates(engine: Engine) -> None:
    batch = wire(block(50), shadow(30))
    assert summary(write(engine, rows(batch))) == [(50, 0, []), (30, 0, [])]
    before = dump(engine)
    assert len(before) == 80
    assert summary(write(engine, rows(batch, RECEIVED + 60))) == [(0, 50, []), (0, 30, [])]
    assert dump(engine) == before  # nothing rewritten, not even received_at


def test_reused_seq_with_other_content_is_a_conflict_and_the_first_version_stays(engine: Engine) -> None:
    first = wire(block(50, first=10, seed=0))
    write(engine, rows(first))
    kept = {row[2]: row[-1] for row in dump(engine)}
    # seq 40..99 from another content: 40..59 collide with stored records, 60..99 are new.
    second = wire(block(60, first=40, seed=1))
    assert summary(write(engine, rows(second))) == [(40, 0, list(range(40, 60)))]
    stored = {row[2]: row[-1] for row in dump(engine)}
    assert len(stored) == 90
    assert all(stored[s] == kept[s] for s in range(40, 60))
    # The same seqs in another spool epoch (a re-flashed device) are different records.
    assert summary(write(engine, rows(wire(block(60, first=40, seed=1), epoch="f" * 16)))) == [(60, 0, [])]


def test_repeats_inside_one_write(engine: Engine) -> None:
    a = wire(block(50, first=10, seed=0))
    b = wire(block(60, first=40, seed=1))
    # The same batch twice in one transaction, then a reused seq range: one row per key.
    outcomes = write(engine, [*rows(a), *rows(a), *rows(b)])
    assert summary(outcomes) == [(50, 0, []), (0, 50, []), (40, 0, list(range(40, 60)))]
    assert len(dump(engine)) == 90
    # An identical repeat of a block that conflicts is a conflict too (it differs from the stored version).
    assert summary(write(engine, [*rows(b), *rows(b)])) == [(0, 40, list(range(40, 60)))] * 2


def test_stored_values_are_exact(engine: Engine) -> None:
    active, shade = block(20, first=10), shadow(12, first=100)
    batch = wire(active, shade, clock_synced=False, sent_mono=600.0)
    write(engine, rows(batch))
    with engine.connect() as conn:
        got = {
            r.seq: r
            for r in conn.exec_driver_sql(
                "SELECT seq, role, model_name, model_version, ts, ts_corrected, received_at, pred, label, confidence, "
                "calibrated, probs, features, features_dtype, act_bits, act_sample, coact, latency_us, sensor_flags, "
                "digest FROM inference"
            ).all()
        }
    for blk, hidden in ((active, 64), (shade, 20)):
        digests = record_digests(blk)
        sampled = set(blk.act_sample_idx.tolist())
        for i, seq in enumerate(blk.seq.tolist()):
            r = got[seq]
            assert (r.role, r.model_name, r.model_version) == (blk.role, blk.model_name, blk.model_version)
            assert r.ts == pytest.approx(float(blk.ts[i]), abs=1e-6)
            # Unsynced clock: receive time minus the record's age by the monotonic clock.
            assert r.ts_corrected == pytest.approx(RECEIVED - (600.0 - float(blk.mono[i])), abs=1e-6)
            assert r.received_at == RECEIVED
            assert r.pred == int(blk.pred[i])
            assert r.label == (None if blk.label[i] == -1 else int(blk.label[i]))
            assert r.confidence == pytest.approx(float(blk.confidence[i]), rel=1e-6)
            assert r.calibrated == pytest.approx(float(blk.calibrated[i]), rel=1e-6)
            assert bytes(r.probs) == blk.probs[i].astype("<f2").tobytes()
            assert bytes(r.features) == blk.features[i].tobytes()
            assert r.features_dtype == blk.features.dtype.str
            assert bytes(r.act_bits) == blk.act_bits[i].tobytes()
            if i in sampled:
                k = blk.act_sample_idx.tolist().index(i)
                assert bytes(r.act_sample) == blk.act_sample[k].astype("<f2").tobytes()
                assert len(r.act_sample) == 2 * hidden
            else:
                assert r.act_sample is None
            assert (r.coact, r.sensor_flags) == (int(blk.coact[i]), int(blk.sensor_flags[i]))
            assert r.latency_us == pytest.approx(float(blk.latency_us[i]), rel=1e-6)
            assert r.digest == int(digests[i])


def test_synced_clock_keeps_device_time() -> None:
    batch = wire(block(5), clock_synced=True)
    r = rows(batch)[0]
    assert np.array_equal(r.ts_corrected, r.ts)
    # A record older than the current boot (its monotonic clock is ahead of sent_mono) keeps its device time.
    unsynced = wire(block(5), clock_synced=False, sent_mono=1.0)
    r = rows(unsynced)[0]
    assert np.array_equal(r.ts_corrected, r.ts)


@pytest.mark.services
def test_sqlite_and_postgresql_give_identical_results(sqlite_url: str, pg_url: str) -> None:
    scenario = [
        rows(wire(block(50, first=10, seed=0), shadow(20, first=500))),
        rows(wire(block(50, first=10, seed=0), shadow(20, first=500))),  # re-sent
        rows(wire(block(60, first=40, seed=1))) + rows(wire(block(30, first=5, seed=2), device="veh-002")),
        rows(wire(block(10, first=200, seed=3), epoch="a" * 16)) * 2,
    ]
    results = []
    for url in (sqlite_url, pg_url):
        for eng in _engine(url):
            results.append(([summary(write(eng, step)) for step in scenario], dump(eng)))
    (sqlite_outcomes, sqlite_rows), (pg_outcomes, pg_rows) = results
    assert sqlite_outcomes == pg_outcomes
    assert len(sqlite_rows) == 50 + 20 + 40 + 30 + 10
    assert sqlite_rows == pg_rows


def test_take_keeps_sampled_activations_aligned() -> None:
    (r,) = rows(wire(block(50, first=10)))  # activations sampled at positions 0, 10, 20, 30, 40
    mask = np.zeros(50, dtype=bool)
    mask[15:45] = True
    part = r.take(mask)
    assert len(part) == 30 and part.seq.tolist() == list(range(25, 55))
    assert part.sample_idx.tolist() == [5, 15, 25]  # positions 20, 30, 40 of the original
    assert np.array_equal(part.act_sample, r.act_sample[[2, 3, 4]])
    assert np.array_equal(part.sampled, r.sampled[mask])
    none = r.take(np.zeros(50, dtype=bool))
    assert len(none) == 0 and none.act_sample.shape == (0, 128)
