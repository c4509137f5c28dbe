"""The durable spool: group commit, seq persistence, crash gaps, drop-oldest, ack release, replay cursor."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.spool import (
    CHUNK_MAX_BYTES,
    EVENT_SPOOL_DROPPED,
    EVENT_SPOOL_LOSS,
    EVENT_SPOOL_OVERSIZED,
    GAP_CRASH,
    GAP_OVERSIZED,
    GAP_SPOOL_ERROR,
    GAP_SPOOL_FULL,
    PendingBatch,
    ReplayCursor,
    Spool,
    inspect,
    merge_ranges,
)
from shared.codec import DEFAULT_LIMITS, Batch, RecordBlock, decode_batch, encode_batch
from shared.messages import Ack

REPO = Path(__file__).resolve().parents[2]


def make_block(
    n: int,
    *,
    seed: int = 0,
    hidden: int = 12,
    classes: int = 3,
    features: int = 5,
    model: str = "m",
    version: str = "1",
    role: str = "active",
) -> RecordBlock:
    """A block of ``n`` synthetic records in the codec's layout (seq left for the spool)."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(classes), n).astype(np.float16)
    h = rng.normal(size=(n, hidden)).astype(np.float32)
    idx = np.flatnonzero(rng.random(n) < 0.3).astype(np.uint32)
    return RecordBlock(
        role=role,
        model_name=model,
        model_version=version,
        seq=np.zeros(n, np.uint64),
        ts=1.8e9 + np.arange(n) * 0.1,
        mono=100.0 + np.arange(n) * 0.1,
        pred=probs.argmax(axis=1).astype(np.int16),
        probs=probs,
        confidence=probs.max(axis=1),
        calibrated=probs.max(axis=1),
        features=rng.normal(size=(n, features)).astype(np.float32),
        act_bits=np.packbits(h > 0, axis=1),
        hidden_units=hidden,
        act_sample_idx=idx,
        act_sample=h[idx].astype(np.float16),
        coact=rng.integers(0, 5, n).astype(np.uint16),
        latency_us=rng.random(n).astype(np.float32) * 10,
        sensor_flags=np.zeros(n, np.uint16),
        label=np.full(n, -1, np.int16),
    )


def open_spool(path: Path, **kw: object) -> Spool:
    args: dict = {"max_bytes": 10 * 1024 * 1024, "commit_interval_s": 1.0, "commit_max_records": 1000}
    args.update(kw)
    return Spool(path, **args)


def all_seqs(spool: Spool) -> list[int]:
    """Every stored seq, read through the uplink side (then put back)."""
    spool.requeue_all()
    out: list[int] = []
    batches = []
    while (b := spool.next_batch(10_000)) is not None and b.blocks:
        batches.append(b)
        spool.mark_sent(b)
        out += [int(s) for blk in b.blocks for s in blk.seq]
    spool.requeue_all()
    return sorted(out)


def test_group_commit_by_interval_and_by_count(tmp_path: Path) -> None:
    spool = open_spool(tmp_path / "s.db", commit_interval_s=0.5, commit_max_records=100)
    t0 = time.monotonic()
    spool.append(make_block(10))
    assert spool.maybe_commit(now=t0 + 0.01) == 0
    assert spool.depth() == 0 and spool.pending_records() == 10
    assert spool.maybe_commit(now=time.monotonic() + 0.6) == 10
    assert spool.depth() == 10 and spool.pending_records() == 0
    spool.append(make_block(60, seed=1))
    spool.append(make_block(40, seed=2))
    assert spool.maybe_commit() == 100  # commit_max_records reached: no waiting for the interval
    assert spool.depth() == 110
    assert spool.stats.commits == 2
    spool.close()
    info = inspect(tmp_path / "s.db")
    assert info["depth"] == 110 and info["next_seq"] == 110 and info["gaps"] == []


def test_commit_interval_is_bounded_to_one_second(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        open_spool(tmp_path / "s.db", commit_interval_s=2.0)


def test_reopen_keeps_epoch_and_seq_without_gap(tmp_path: Path) -> None:
    spool = open_spool(tmp_path / "s.db")
    epoch = spool.epoch
    assert list(spool.append(make_block(5))) == [0, 1, 2, 3, 4]
    spool.close()
    spool = open_spool(tmp_path / "s.db")
    assert spool.epoch == epoch
    assert list(spool.append(make_block(3))) == [5, 6, 7]
    assert spool.gaps() == [] and spool.pending_events() == []
    spool.flush()
    assert all_seqs(spool) == list(range(8))
    spool.close()
    other = open_spool(tmp_path / "other.db")
    assert other.epoch != epoch
    other.close()


def test_crash_declares_the_reserved_uncommitted_range(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    spool = open_spool(path, reserve_step=1)
    spool.append(make_block(10))
    spool.commit()
    spool.append(make_block(4, seed=1))  # handed out (seq 10-13), never committed: lost in the "crash"
    # No close(): a fresh object on the same file sees what a restarted process would.
    reopened = open_spool(path, reserve_step=1)
    assert reopened.epoch == spool.epoch
    gaps = reopened.gaps()
    assert [(g.first, g.last, g.reason) for g in gaps] == [(10, 13, GAP_CRASH)]
    events = [e for _i, e in reopened.pending_events()]
    assert [e.kind for e in events] == [EVENT_SPOOL_LOSS]
    assert events[0].data["first"] == 10 and events[0].data["last"] == 13 and events[0].data["reason"] == "crash"
    assert reopened.counters()["crash_gaps"] == 1 and reopened.counters()["crash_seqs"] == 4
    assert list(reopened.append(make_block(2))) == [14, 15]
    reopened.close()
    # Declared once: the next clean open finds nothing new.
    again = open_spool(path)
    assert [(g.first, g.last) for g in again.gaps()] == [(10, 13)]
    assert again.counters()["crash_gaps"] == 1
    again.close()


def test_crash_gap_covers_the_whole_reservation(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    spool = open_spool(path, reserve_step=50)
    spool.append(make_block(3))
    spool.commit()
    spool.append(make_block(2))  # seq 3, 4 within the reservation 0-49 committed at the first append
    reopened = open_spool(path, reserve_step=50)
    # What may have been handed out is everything up to the watermark; numbering resumes after it.
    assert [(g.first, g.last) for g in reopened.gaps()] == [(3, 49)]
    assert reopened.next_seq == 50
    reopened.close()


def test_sigkill_loses_only_the_uncommitted_group(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from tests.edge_agent.test_spool import make_block, open_spool
        from pathlib import Path
        spool = open_spool(Path({str(path)!r}), reserve_step=1)
        spool.append(make_block(20))
        spool.commit()
        spool.append(make_block(7, seed=3))
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    spool = open_spool(path)
    assert spool.depth() == 20
    assert [(g.first, g.last, g.reason) for g in spool.gaps()] == [(20, 26, GAP_CRASH)]
    assert all_seqs(spool) == list(range(20))
    assert spool.next_seq == 27
    spool.close()


def test_drop_oldest_declares_the_dropped_range(tmp_path: Path) -> None:
    probe = open_spool(tmp_path / "probe.db")
    probe.append(make_block(100))
    probe.commit()
    chunk_bytes = probe.bytes()
    probe.close()
    spool = open_spool(tmp_path / "s.db", max_bytes=int(chunk_bytes * 3.5), chunk_max_records=100)
    for i in range(6):
        spool.append(make_block(100, seed=i))
        spool.commit()
    assert spool.bytes() <= spool.max_bytes
    kept = all_seqs(spool)
    assert kept == list(range(300, 600))
    gaps = spool.gaps()
    assert [(g.reason) for g in gaps] == [GAP_SPOOL_FULL] * len(gaps)
    assert merge_ranges([(g.first, g.last) for g in gaps]) == [(0, 299)]
    events = [e for _i, e in spool.pending_events()]
    assert {e.kind for e in events} == {EVENT_SPOOL_DROPPED}
    assert sum(e.data["records"] for e in events) == 300
    assert spool.counters()["dropped_records"] == 300
    spool.close()


def test_batches_round_trip_through_the_codec(tmp_path: Path) -> None:
    spool = open_spool(tmp_path / "s.db", chunk_max_records=50)
    blocks = [make_block(30, seed=1), make_block(45, seed=2), make_block(10, seed=3, model="shadow-m", role="shadow")]
    for b in blocks:
        spool.append(b)
    spool.commit()
    batch = spool.next_batch(200)
    assert batch is not None and batch.n_records == 85
    payload = encode_batch(
        Batch(
            "dev-1",
            "boot",
            spool.epoch,
            batch.seq_first,
            batch.seq_last,
            1.8e9,
            5.0,
            False,
            "p",
            "0.1",
            batch.blocks,
            batch.gaps,
        )
    )
    decoded = decode_batch(payload)
    by_role = {b.role: b for b in decoded.blocks}
    active = by_role["active"]
    assert list(active.seq) == list(range(75))
    # The codec may send features as float16 when that keeps them within 0.05 %.
    np.testing.assert_allclose(active.features[:30], blocks[0].features, rtol=2**-11)
    np.testing.assert_allclose(active.features[30:], blocks[1].features, rtol=2**-11)
    np.testing.assert_array_equal(active.act_bits[30:], blocks[1].act_bits)
    # Sampled activations follow their records when blocks are merged.
    expected_idx = np.concatenate([blocks[0].act_sample_idx, blocks[1].act_sample_idx + 30])
    np.testing.assert_array_equal(active.act_sample_idx, expected_idx)
    np.testing.assert_array_equal(active.act_sample, np.concatenate([blocks[0].act_sample, blocks[1].act_sample]))
    assert list(by_role["shadow"].seq) == list(range(75, 85))
    spool.close()


def test_release_only_what_the_ack_covers(tmp_path: Path) -> None:
    spool = open_spool(tmp_path / "s.db", chunk_max_records=10)
    spool.append(make_block(30))
    spool.commit()
    first = spool.next_batch(10)
    second = spool.next_batch(10)
    assert first is not None and second is not None
    assert (first.seq_first, first.seq_last, second.seq_first, second.seq_last) == (0, 9, 10, 19)
    spool.mark_sent(first)
    spool.mark_sent(second)
    assert spool.inflight() == 2
    assert spool.release(Ack(spool_epoch="not-this-spool", ranges=[(0, 29)])) == 0
    assert spool.depth() == 30 and spool.stats.foreign_acks == 1
    # A range covering half a chunk releases nothing of it.
    assert spool.release(Ack(spool_epoch=spool.epoch, ranges=[(0, 9), (10, 14)])) == 10
    assert spool.depth() == 20 and spool.inflight() == 1
    assert spool.release(Ack(spool_epoch=spool.epoch, ranges=[(10, 19)])) == 10
    assert spool.inflight() == 0
    assert all_seqs(spool) == list(range(20, 30))
    spool.close()


def test_interleaved_blocks_released_by_exact_ranges(tmp_path: Path) -> None:
    spool = open_spool(tmp_path / "s.db")
    spool.append(make_block(3, role="active"))  # 0-2
    spool.append(make_block(3, role="shadow", model="s"))  # 3-5
    spool.append(make_block(3, role="active", seed=1))  # 6-8: active chunk spans 0-8 with a hole
    spool.commit()
    assert spool.release(Ack(spool_epoch=spool.epoch, ranges=[(0, 2), (6, 8)])) == 6
    assert all_seqs(spool) == [3, 4, 5]
    spool.close()


def test_unacked_batches_are_sent_again_after_the_timeout(tmp_path: Path) -> None:
    spool = open_spool(tmp_path / "s.db", chunk_max_records=10)
    spool.append(make_block(20))
    spool.commit()
    t = time.monotonic()
    b1 = spool.next_batch(10)
    assert b1 is not None
    spool.mark_sent(b1, now=t)
    assert spool.requeue_unacked(30.0, now=t + 5) == 0
    b2 = spool.next_batch(10)
    assert b2 is not None and b2.seq_first == 10
    spool.mark_sent(b2, now=t + 5)
    assert spool.next_batch(10) is None
    assert spool.requeue_unacked(30.0, now=t + 31) == 1
    again = spool.next_batch(10)
    assert again is not None and (again.seq_first, again.seq_last) == (0, 9)
    spool.close()


def test_gaps_travel_until_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    spool = open_spool(path, reserve_step=1)
    spool.append(make_block(2))  # lost in the crash below
    spool = open_spool(path, reserve_step=1)
    assert spool.ready(100, 60.0)  # a gap alone is worth a batch
    gap_only = spool.next_batch(100)
    assert gap_only is not None and gap_only.blocks == [] and [(g.first, g.last) for g in gap_only.gaps] == [(0, 1)]
    spool.mark_sent(gap_only)
    assert spool.next_batch(100) is None  # that gap is in flight
    spool.append(make_block(5))
    spool.commit()
    with_records = spool.next_batch(100)
    assert with_records is not None and [(g.first, g.last) for g in with_records.gaps] == [(0, 1)]
    assert (with_records.seq_first, with_records.seq_last) == (0, 6)
    spool.mark_sent(with_records)
    spool.release(Ack(spool_epoch=spool.epoch, ranges=[(0, 6)], gaps=[(0, 1)]))
    assert spool.gaps() == [] and spool.depth() == 0 and spool.inflight() == 0
    for event_id, _event in spool.pending_events():
        spool.event_published(event_id)
    assert spool.empty()
    spool.close()


def test_replay_cursor_is_committed_with_its_group(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    spool = open_spool(path)
    assert spool.cursor() is None
    spool.append(make_block(10), cursor=ReplayCursor("file-a", 10))
    spool.commit()
    spool.append(make_block(10, seed=1), cursor=ReplayCursor("file-a", 20))  # never committed
    crashed = open_spool(path)
    assert crashed.cursor() == ReplayCursor("file-a", 10)
    assert crashed.depth() == 10
    crashed.append(make_block(10, seed=1), cursor=ReplayCursor("file-a", 20))
    crashed.commit()
    assert crashed.cursor() == ReplayCursor("file-a", 20)
    crashed.close()
    info = inspect(path)
    assert info["cursor"] == {"file": "file-a", "row": 20}
    assert json.loads(json.dumps(info))["depth"] == 20


def test_foreign_file_is_refused(tmp_path: Path) -> None:
    from edge_agent.spool import SpoolError

    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(SpoolError):
        open_spool(bad)


def send_all(spool: Spool, max_records: int) -> list[PendingBatch]:
    """Take and mark sent every batch the spool hands out now."""
    out = []
    while (b := spool.next_batch(max_records)) is not None:
        spool.mark_sent(b)
        out.append(b)
    return out


def crashed_spool(path: Path, committed: int, lost: int, **kw: object) -> Spool:
    """A spool whose process died with ``lost`` records uncommitted after ``committed`` ones."""
    first = open_spool(path, reserve_step=1, **kw)
    if committed:
        first.append(make_block(committed))
        first.commit()
    first.append(make_block(lost, seed=99))  # handed out, never committed
    return open_spool(path, reserve_step=1, **kw)


def test_quarantined_ack_releases_only_the_batch_it_names(tmp_path: Path) -> None:
    spool = crashed_spool(tmp_path / "s.db", 50, 50, chunk_max_records=100)  # crash gap 50-99
    spool.append(make_block(100, seed=1))  # 100-199
    spool.commit()
    spool.append(make_block(100, seed=2))  # 200-299
    spool.commit()
    b1, b2, b3 = send_all(spool, 100)
    # Every envelope is stretched over the open gap: batch 3's covers batch 2's records too.
    assert [(b.seq_first, b.seq_last) for b in (b1, b2, b3)] == [(0, 99), (50, 199), (50, 299)]
    spool.append(make_block(100, seed=3))  # 300-399: committed, not sent yet
    spool.commit()
    spool.requeue_unacked(0.0)  # the broker lost b1-b3: they wait for a re-send
    b1, b2, b3 = send_all(spool, 100)[:3]
    assert spool.release(Ack(spool_epoch=spool.epoch, ranges=[(50, 299)], quarantined=True, reason="bad_value")) == 100
    assert all_seqs(spool) == list(range(50)) + list(range(100, 200)) + list(range(300, 400))
    assert [(g.first, g.last) for g in spool.gaps()] == [(50, 99)], "the gap travels on with the next batch"
    assert spool.stats.quarantine_released == 100
    # A quarantined ack that names no batch in flight (stale, or an envelope nobody sent) releases nothing.
    assert spool.release_quarantined(Ack(spool_epoch=spool.epoch, ranges=[(0, 399)], quarantined=True)) is None
    assert (
        spool.release_quarantined(Ack(spool_epoch=spool.epoch, ranges=[(0, 99), (100, 199)], quarantined=True)) is None
    )
    assert spool.depth() == 250 and spool.stats.quarantine_unmatched == 2
    spool.close()


def test_quarantined_gap_only_batch_releases_its_gaps(tmp_path: Path) -> None:
    spool = crashed_spool(tmp_path / "s.db", 0, 5)
    (batch,) = send_all(spool, 100)
    assert batch.blocks == [] and (batch.seq_first, batch.seq_last) == (0, 4)
    assert spool.release(Ack(spool_epoch=spool.epoch, ranges=[(0, 4)], quarantined=True, reason="bad_envelope")) == 0
    assert spool.gaps() == [] and spool.inflight() == 0
    spool.close()


def test_batches_in_flight_never_share_an_envelope(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    probe = open_spool(tmp_path / "probe.db")
    probe.append(make_block(100))
    probe.commit()
    chunk_bytes = probe.bytes()
    probe.close()
    kw = {"chunk_max_records": 100, "max_bytes": int(chunk_bytes * 2.5)}
    spool = open_spool(path, reserve_step=1, **kw)
    for i in range(4):
        spool.append(make_block(100, seed=i))
        spool.commit()  # the first two chunks are dropped: spool_full gap 0-199
    spool.append(make_block(10, seed=9))  # lost in the crash: gap 400-409
    spool = open_spool(path, reserve_step=1, **kw)
    assert merge_ranges([(g.first, g.last) for g in spool.gaps()]) == [(0, 199), (400, 409)]
    b1, b2 = send_all(spool, 100)
    # Both would span the two gaps, [0, 409]: the second leaves the gaps to the first.
    assert (b1.seq_first, b1.seq_last, len(b1.gaps)) == (0, 409, 3)
    assert (b2.seq_first, b2.seq_last, b2.gaps) == (300, 399, [])
    assert spool.release(Ack(spool_epoch=spool.epoch, ranges=[(0, 409)], quarantined=True)) == 100
    assert all_seqs(spool) == list(range(300, 400))
    spool.close()


def test_chunk_released_once_acks_together_cover_it(tmp_path: Path) -> None:
    spool = open_spool(tmp_path / "s.db", chunk_max_records=200)
    spool.append(make_block(100))
    spool.append(make_block(3, role="shadow", model="s"))  # 100-102
    spool.append(make_block(3, seed=1))  # 103-105: the active chunk spans 0-105 with a hole
    spool.commit()
    assert len(send_all(spool, 1000)) == 1
    assert spool.release(Ack(spool_epoch=spool.epoch, ranges=[(50, 99)])) == 0
    assert spool.release(Ack(spool_epoch=spool.epoch, ranges=[(100, 102)])) == 3
    assert spool.release(Ack(spool_epoch=spool.epoch, ranges=[(0, 49)], reason="seq_conflict")) == 0
    # The batch is re-sent after a timeout; what was acknowledged before still counts.
    assert spool.requeue_unacked(0.0) == 1
    send_all(spool, 1000)
    assert spool.release(Ack(spool_epoch=spool.epoch, ranges=[(103, 105)])) == 103
    assert spool.depth() == 0 and spool.inflight() == 0
    spool.close()


def test_resend_backoff_doubles_per_timeout_and_resets_on_progress(tmp_path: Path) -> None:
    spool = open_spool(tmp_path / "s.db", chunk_max_records=10)
    spool.append(make_block(20))
    spool.commit()
    t = 1000.0
    b = spool.next_batch(10)
    assert b is not None
    spool.mark_sent(b, now=t)
    waits = []
    for _ in range(7):
        sent = t
        assert spool.requeue_unacked(30.0, now=sent + 29.9) == 0
        t = sent + 30.0
        while spool.requeue_unacked(30.0, now=t, max_backoff_s=600.0) == 0:
            t += 30.0
        waits.append(t - sent)
        b = spool.next_batch(10)
        assert b is not None and b.seq_first == 0
        spool.mark_sent(b, now=t)
    assert waits == [30, 60, 120, 240, 480, 600, 600]
    # A reconnect re-sends at once and does not count as a timeout.
    assert spool.requeue_all() == 1
    b = spool.next_batch(10)
    assert b is not None
    spool.mark_sent(b, now=t)
    assert spool.requeue_unacked(30.0, now=t + 599) == 0
    # Any ack that settles something means the collector is back: normal timeouts again.
    other = spool.next_batch(10)
    assert other is not None and other.seq_first == 10
    spool.mark_sent(other, now=t)
    assert spool.release(Ack(spool_epoch=spool.epoch, ranges=[(10, 19)])) == 10
    assert spool.requeue_unacked(30.0, now=t + 30) == 1
    spool.close()


def test_chunks_stay_under_the_byte_limit_and_batches_under_the_codec_limits(tmp_path: Path) -> None:
    spool = open_spool(tmp_path / "s.db", chunk_max_records=20_000, commit_max_records=20_000)
    big = make_block(6000, features=200, hidden=256)  # ~1 KB per record: 6 MB in one group
    spool.append(big)
    spool.commit()
    with sqlite3.connect(tmp_path / "s.db") as db:
        sizes = [int(r[0]) for r in db.execute("SELECT nbytes FROM chunks")]
    assert len(sizes) > 5 and max(sizes) <= CHUNK_MAX_BYTES
    seqs: list[int] = []
    while (batch := spool.next_batch(20_000)) is not None:
        spool.mark_sent(batch)
        payload = encode_batch(
            Batch("d", "b", spool.epoch, batch.seq_first, batch.seq_last, 0.0, 0.0, True, "p", "a", batch.blocks)
        )
        assert len(payload) <= DEFAULT_LIMITS.max_payload_bytes
        decoded = decode_batch(payload)
        seqs += [int(s) for blk in decoded.blocks for s in blk.seq]
    assert seqs == list(range(6000))
    spool.close()


def test_split_chunk_halves_and_declares_a_lone_record(tmp_path: Path) -> None:
    spool = open_spool(tmp_path / "s.db", chunk_max_records=100)
    spool.append(make_block(5))
    spool.commit()
    (batch,) = send_all(spool, 100)
    spool.unsend(batch)  # as the uplink does with a payload over the limit
    assert spool.split_chunk(batch.chunk_ids[0]) == 5
    assert spool.stats.chunks_split == 1 and spool.depth() == 5
    assert all_seqs(spool) == [0, 1, 2, 3, 4]
    halves = send_all(spool, 1)
    assert [(b.seq_first, b.seq_last) for b in halves] == [(0, 1), (2, 4)]
    spool.requeue_all()
    assert spool.split_chunk(halves[0].chunk_ids[0]) == 2
    lone = send_all(spool, 1)[0]
    assert (lone.seq_first, lone.seq_last) == (0, 0)
    spool.unsend(lone)
    assert spool.split_chunk(lone.chunk_ids[0]) == 0
    assert [(g.first, g.last, g.reason) for g in spool.gaps()] == [(0, 0, GAP_OVERSIZED)]
    assert [e.kind for _i, e in spool.pending_events()] == [EVENT_SPOOL_OVERSIZED]
    assert spool.counters()["oversized_records"] == 1 and spool.depth() == 4
    assert all_seqs(spool) == [1, 2, 3, 4]
    spool.close()


def test_failing_commits_keep_a_bounded_buffer_and_declare_what_they_drop(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    # A real disk-full stand-in: the process may not grow any file beyond its current size.
    script = textwrap.dedent(
        f"""
        import json, os, resource, sqlite3, sys
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from tests.edge_agent.test_spool import make_block, open_spool
        path = Path({str(path)!r})
        spool = open_spool(path, commit_max_records=10, max_pending_records=50, reserve_step=1000)
        spool.append(make_block(10))
        spool.commit()
        size = max(os.path.getsize(p) for p in (path, Path(str(path) + "-wal")))
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
        failures, peak = 0, 0
        for i in range(12):
            spool.append(make_block(10, seed=i + 1))
            try:
                spool.commit()
            except sqlite3.Error:
                failures += 1
            peak = max(peak, spool.pending_records())
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        committed = spool.commit()
        print(json.dumps({{"failures": failures, "peak": peak, "committed": committed,
                          "dropped": spool.stats.pending_dropped, "next_seq": spool.next_seq}}))
        spool.close()
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    assert doc["failures"] == 12 and doc["peak"] <= 50
    assert doc["dropped"] == 70 and doc["committed"] == 50 and doc["next_seq"] == 130
    spool = open_spool(path)
    assert [(g.first, g.last, g.reason) for g in spool.gaps()] == [(10, 79, GAP_SPOOL_ERROR)]
    assert all_seqs(spool) == list(range(10)) + list(range(80, 130))
    loss = [e for _i, e in spool.pending_events() if e.data.get("reason") == GAP_SPOOL_ERROR]
    assert len(loss) == 1 and loss[0].data["records"] == 70
    assert spool.counters()["error_records"] == 70
    spool.close()


def test_a_failed_init_closes_its_connection(tmp_path: Path) -> None:
    from edge_agent.spool import SpoolError

    bad = tmp_path / "old.db"
    spool = open_spool(bad)
    spool.close()
    with sqlite3.connect(bad) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.close()
    fds = set(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(SpoolError, match="schema 99"):
            open_spool(bad)
    leaked = [os.readlink(f"/proc/self/fd/{fd}") for fd in set(os.listdir("/proc/self/fd")) - fds]
    assert not [f for f in leaked if f.startswith(str(bad))]


def test_a_failed_commit_leaves_in_flight_batches_intact(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    probe = open_spool(tmp_path / "probe.db")
    probe.append(make_block(100))
    probe.commit()
    chunk_bytes = probe.bytes()
    probe.close()
    # The third commit drops the oldest chunk (in flight) to stay under max_bytes, then fails to write.
    script = textwrap.dedent(
        f"""
        import json, os, resource, sqlite3, sys
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from tests.edge_agent.test_spool import make_block, open_spool
        path = Path({str(path)!r})
        spool = open_spool(path, chunk_max_records=100, max_bytes={int(chunk_bytes * 2.5)}, reserve_step=1000)
        for i in range(2):
            spool.append(make_block(100, seed=i))
            spool.commit()
        batch = spool.next_batch(100)
        spool.mark_sent(batch)
        size = max(os.path.getsize(p) for p in (path, Path(str(path) + "-wal")))
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
        spool.append(make_block(100, seed=2))
        try:
            spool.commit()
            failed = False
        except sqlite3.Error:
            failed = True
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        depth, inflight = spool.depth(), spool.inflight()
        spool.requeue_unacked(0.0)
        again = spool.next_batch(100)
        print(json.dumps({{"failed": failed, "depth": depth, "inflight": inflight, "gaps": len(spool.gaps()),
                          "sent": [batch.seq_first, batch.seq_last], "again": [again.seq_first, again.seq_last]}}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    assert doc["failed"] and doc["depth"] == 200 and doc["gaps"] == 0
    # The drop was rolled back with the commit: the in-flight batch still holds its chunk and is re-sent.
    assert doc["inflight"] == 1 and doc["sent"] == doc["again"] == [0, 99]
