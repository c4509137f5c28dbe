"""The durable spool: group commit, seq persistence, crash gaps, drop-oldest, ack release, replay cursor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.spool import (
    EVENT_SPOOL_DROPPED,
    EVENT_SPOOL_LOSS,
    GAP_CRASH,
    GAP_SPOOL_FULL,
    ReplayCursor,
    Spool,
    inspect,
    merge_ranges,
)
from shared.codec import Batch, RecordBlock, decode_batch, encode_batch
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
    np.testing.assert_array_equal(active.features[:30], blocks[0].features)
    np.testing.assert_array_equal(active.features[30:], blocks[1].features)
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
