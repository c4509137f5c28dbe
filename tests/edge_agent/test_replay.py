"""Replay source: chunked and row reading, resume, bad input (errors and skip mode), gzip, NaN, labels."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest

from edge_agent.sensors.base import SourceExhausted
from edge_agent.sensors.replay import ReplayChunk, ReplayError, ReplaySource

FEATURES = ["a", "b", "c"]
LABELS = ["normal", "vaping", "smoking"]


def write(path: Path, lines: list[str]) -> Path:
    text = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def table(n: int) -> list[str]:
    """A header with an extra column in between and the features out of order, then n rows."""
    lines = ["c,label,extra,b,a"]
    for i in range(n):
        lines.append(f"{i + 0.5},{LABELS[i % 3]},x{i},{-i},{i * 10}")
    return lines


def expected(i: int) -> list[float]:
    return [i * 10.0, -float(i), i + 0.5]


def drain(src: ReplaySource, max_rows: int) -> list[ReplayChunk]:
    chunks = []
    while True:
        try:
            chunks.append(src.read_chunk(max_rows))
        except SourceExhausted:
            return chunks


def test_chunked_reading_equals_row_reading(tmp_path: Path) -> None:
    path = write(tmp_path / "f.csv", table(1000))
    chunks = drain(ReplaySource(path, FEATURES, label_column="label", labels=LABELS), 333)
    assert [c.n for c in chunks] == [333, 333, 333, 1]
    assert [c.start_row for c in chunks] == [0, 333, 666, 999]
    assert [c.next_row for c in chunks] == [333, 666, 999, 1000]
    features = np.concatenate([c.features for c in chunks])
    labels = np.concatenate([c.labels for c in chunks])
    assert features.dtype == np.float32 and features.shape == (1000, 3)
    assert labels.dtype == np.int16
    assert np.array_equal(features, np.array([expected(i) for i in range(1000)], dtype=np.float32))
    assert labels.tolist() == [i % 3 for i in range(1000)]

    src = ReplaySource(path, FEATURES, label_column="label", labels=LABELS)
    rows = []
    while True:
        try:
            rows.append(src.read())
        except SourceExhausted:
            break
    assert len(rows) == 1000 and src.rows_read == 1000 and src.position == 1000
    assert np.array_equal(np.stack([o.features for o in rows]), features)  # type: ignore[misc]
    assert [o.label for o in rows[:4]] == ["normal", "vaping", "smoking", "normal"]
    assert rows[7].meta["row"] == 7.0
    with pytest.raises(SourceExhausted):
        src.read_chunk(10)


def test_mixed_read_and_chunks_keep_order_and_position(tmp_path: Path) -> None:
    path = write(tmp_path / "f.csv", table(600))
    src = ReplaySource(path, FEATURES)
    first = src.read()
    assert src.position == 1
    chunk = src.read_chunk(100)
    assert chunk.start_row == 1 and chunk.n == 100 and src.position == 101
    assert np.array_equal(first.features, np.array(expected(0), np.float32))  # type: ignore[arg-type]
    assert np.array_equal(chunk.features[0], np.array(expected(1), np.float32))
    rest = drain(src, 1000)
    assert sum(c.n for c in rest) == 499 and src.rows_read == 600


def test_start_row_resumes_from_a_cursor(tmp_path: Path) -> None:
    path = write(tmp_path / "f.csv", table(500))
    src = ReplaySource(path, FEATURES, label_column="label", labels=LABELS)
    head = src.read_chunk(123)
    cursor = head.next_row
    src.close()
    resumed = ReplaySource(path, FEATURES, label_column="label", labels=LABELS, start_row=cursor)
    assert resumed.position == 123
    tail = drain(resumed, 1000)
    assert tail[0].start_row == 123
    together = np.concatenate([head.features, *[c.features for c in tail]])
    assert np.array_equal(together, np.array([expected(i) for i in range(500)], dtype=np.float32))
    past_end = ReplaySource(path, FEATURES, start_row=10_000)
    with pytest.raises(SourceExhausted):
        past_end.read()
    assert past_end.position == 500


def test_missing_columns_are_named(tmp_path: Path) -> None:
    path = write(tmp_path / "f.csv", ["a,label,zz", "1,normal,2"])
    with pytest.raises(ReplayError, match="missing feature columns: b, c") as err:
        ReplaySource(path, FEATURES)
    assert err.value.path == path
    with pytest.raises(ReplayError, match="missing label column: kind"):
        ReplaySource(write(tmp_path / "g.csv", table(2)), FEATURES, label_column="kind")
    with pytest.raises(ReplayError, match="no header row"):
        ReplaySource(write(tmp_path / "empty.csv", []), FEATURES)
    with pytest.raises(ReplayError, match="duplicated columns: a"):
        ReplaySource(write(tmp_path / "dup.csv", ["a,b,c,a", "1,2,3,4"]), FEATURES)
    with pytest.raises(ReplayError, match="cannot open"):
        ReplaySource(tmp_path / "absent.csv", FEATURES)


def test_bad_cell_is_a_specific_error_after_the_good_rows(tmp_path: Path) -> None:
    lines = table(10)
    lines[5] = "4.5,vaping,x4,-4,forty"  # row 4, column a
    path = write(tmp_path / "f.csv", lines)
    src = ReplaySource(path, FEATURES)
    chunk = src.read_chunk(100)
    assert chunk.n == 4 and chunk.next_row == 4  # the rows before the bad one are delivered
    with pytest.raises(ReplayError) as err:
        src.read_chunk(100)
    assert (err.value.row, err.value.column) == (4, "a")
    assert "not a number: 'forty'" in str(err.value) and "row 4" in str(err.value)
    assert src.position == 4
    with pytest.raises(ReplayError):  # it stays stuck at the bad row: nothing is silently lost
        src.read()


def test_bad_row_shapes_and_values(tmp_path: Path) -> None:
    lines = table(6)
    lines[2] = "1.5,vaping,x1,-1"  # row 1: a cell short
    lines[4] = "3.5,normal,x3,inf,30"  # row 3: not finite
    path = write(tmp_path / "f.csv", lines)
    src = ReplaySource(path, FEATURES)
    assert src.read_chunk(10).n == 1
    with pytest.raises(ReplayError, match="row 1: 4 cells, the header has 5"):
        src.read_chunk(10)
    skipping = ReplaySource(path, FEATURES, on_bad_row="skip")
    chunks = drain(skipping, 10)
    assert sum(c.n for c in chunks) == 4 and skipping.bad_rows == 2
    got = np.concatenate([c.features for c in chunks])
    assert np.array_equal(got, np.array([expected(i) for i in (0, 2, 4, 5)], dtype=np.float32))
    assert chunks[0].start_row == 0 and chunks[-1].next_row == 6
    assert skipping.last_error is not None and "row 3" in skipping.last_error and "'b'" in skipping.last_error


def test_skip_mode_counts_bad_rows_and_keeps_the_cursor_exact(tmp_path: Path) -> None:
    lines = table(300)
    for row in (10, 11, 150, 299):
        lines[row + 1] = lines[row + 1].replace(f",{row * 10}", ",n/a")
    path = write(tmp_path / "f.csv", lines)
    src = ReplaySource(path, FEATURES, label_column="label", labels=LABELS, on_bad_row="skip")
    chunks = drain(src, 100)
    assert src.bad_rows == 4 and src.rows_read == 296
    assert [c.next_row for c in chunks] == [100, 200, 300]
    assert [c.n for c in chunks] == [98, 99, 99]
    kept = [i for i in range(300) if i not in (10, 11, 150, 299)]
    assert np.array_equal(
        np.concatenate([c.features for c in chunks]), np.array([expected(i) for i in kept], np.float32)
    )
    assert np.concatenate([c.labels for c in chunks]).tolist() == [i % 3 for i in kept]


def test_gzip_file_is_read_transparently(tmp_path: Path) -> None:
    plain = drain(ReplaySource(write(tmp_path / "f.csv", table(200)), FEATURES), 64)
    packed = drain(ReplaySource(write(tmp_path / "f.csv.gz", table(200)), FEATURES), 64)
    assert np.array_equal(np.concatenate([c.features for c in plain]), np.concatenate([c.features for c in packed]))
    corrupt = tmp_path / "bad.csv.gz"
    corrupt.write_bytes(gzip.compress("\n".join(table(5000)).encode())[:4000])
    src = ReplaySource(corrupt, FEATURES)
    with pytest.raises(ReplayError, match="cannot read past row"):
        drain(src, 1000)


def test_empty_cells_are_nan_and_counted(tmp_path: Path) -> None:
    path = write(tmp_path / "f.csv", ["a,b,c", "1,,3", "4,5,6", ",nan,", "", "7,8,9"])
    src = ReplaySource(path, FEATURES)
    chunk = src.read_chunk(10)
    assert chunk.n == 4 and chunk.next_row == 5  # the blank line keeps its row number
    assert np.isnan(chunk.features[0, 1]) and chunk.features[0, 0] == 1.0
    assert np.isnan(chunk.features[2]).all()
    assert chunk.features[3].tolist() == [7.0, 8.0, 9.0]
    assert src.missing_cells == 4
    assert chunk.labels.tolist() == [-1, -1, -1, -1]  # no label column


def test_label_mapping(tmp_path: Path) -> None:
    named = write(tmp_path / "named.csv", ["a,b,c,label", "1,2,3,smoking", "1,2,3,dog", "1,2,3,", "1,2,3, vaping "])
    src = ReplaySource(named, FEATURES, label_column="label", labels=LABELS)
    assert src.read_chunk(10).labels.tolist() == [2, -1, -1, 1]
    assert src.unknown_labels == 1  # an empty cell is no label, not an unknown one
    numeric = write(tmp_path / "numeric.csv", ["a,b,c,y", "1,2,3,4", "1,2,3,0", "1,2,3,1.5", "1,2,3,-2", "1,2,3,x"])
    src = ReplaySource(numeric, FEATURES, label_column="y")
    rows = [src.read() for _ in range(5)]
    assert [o.label for o in rows] == ["4", "0", None, None, None]
    assert src.unknown_labels == 3
    with pytest.raises(ValueError, match="unique"):
        ReplaySource(named, ["a", "a"])
    with pytest.raises(ValueError, match="on_bad_row"):
        ReplaySource(named, FEATURES, on_bad_row="ignore")  # type: ignore[arg-type]


def test_large_and_odd_values(tmp_path: Path) -> None:
    path = write(tmp_path / "f.csv", ["a,b,c", "1e39,0,0", " 2.5 ,-0,1e-30"])
    src = ReplaySource(path, FEATURES, on_bad_row="skip")
    chunk = src.read_chunk(10)
    assert chunk.n == 1 and src.bad_rows == 1  # 1e39 overflows float32
    assert chunk.features[0, 0] == 2.5 and not math.isnan(chunk.features[0, 2])
