"""Replay of recorded feature rows from a CSV (optionally gzip-compressed).

The columns are named as the model's features (extra columns are ignored, order does not
matter); an optional label column carries ground truth. The file is streamed: rows are parsed a
chunk at a time into preallocated numpy arrays, so a 100k-row file never lives in memory as
Python objects, and a replay runs at tens of thousands of rows per second.

Rows are numbered from 0 after the header (blank lines count, so a cursor is the same on every
run of the same file). ``position`` is the next row to deliver, which is what a restarted replay
passes back as ``start_row``. An empty cell (or ``nan``) is NaN for the agent to impute and flag;
a cell that is not a finite number, or a row with the wrong number of cells, is a
:class:`ReplayError` naming row and column, or with ``on_bad_row="skip"`` is skipped and counted
in ``bad_rows``.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import logging
import math
import operator
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, Literal, cast

import numpy as np

from edge_agent.sensors.base import Observation, Source, SourceExhausted

logger = logging.getLogger(__name__)

NO_LABEL: Final = -1
_READ_BUFFER_ROWS: Final = 256
_INT16_MAX: Final = 32_767
_GZIP_MAGIC: Final = b"\x1f\x8b"


class ReplayError(ValueError):
    """A replay file that cannot be used, or a bad row in it; says where."""

    def __init__(self, message: str, *, path: Path | None = None, row: int | None = None, column: str | None = None):
        self.path = path
        self.row = row
        self.column = column
        where = [str(path)] if path is not None else []
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


@dataclass(slots=True)
class ReplayChunk:
    """Consecutive rows of a replay: features ``float32 [n, f]`` and label indices ``int16 [n]``.

    ``start_row`` is the file row of the first record and ``next_row`` the cursor after the
    chunk (rows skipped as bad make it larger than ``start_row + n``).
    """

    start_row: int
    features: np.ndarray
    labels: np.ndarray
    n: int
    next_row: int


class _BadRow(Exception):
    def __init__(self, message: str, column: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.column = column


@dataclass(slots=True)
class _Parsed:
    features: np.ndarray
    labels: np.ndarray
    rows: np.ndarray  # file row of each record
    end: int  # cursor after the parsed region
    taken: int = 0  # records already delivered


def _open_text(path: Path) -> IO[str]:
    """Open a CSV as text, transparently gunzipping (by content, not just by name)."""
    raw = open(path, "rb")  # noqa: SIM115 - owned by the returned wrapper
    try:
        magic = raw.read(2)
        raw.seek(0)
        stream = cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb")) if magic == _GZIP_MAGIC else raw
        return io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace", newline="")
    except Exception:
        raw.close()
        raise


class ReplaySource(Source):
    """Feature rows from a CSV, in chunks (:meth:`read_chunk`) or one at a time (:meth:`read`)."""

    name = "replay"

    def __init__(
        self,
        path: Path,
        feature_names: Sequence[str],
        *,
        label_column: str | None = None,
        labels: Sequence[str] | None = None,
        start_row: int = 0,
        on_bad_row: Literal["error", "skip"] = "error",
    ) -> None:
        if on_bad_row not in ("error", "skip"):
            raise ValueError("on_bad_row must be 'error' or 'skip'")
        if start_row < 0:
            raise ValueError("start_row must be >= 0")
        if not feature_names or len(set(feature_names)) != len(feature_names):
            raise ValueError("feature_names must be non-empty and unique")
        self.path = Path(path)
        self.feature_names = tuple(feature_names)
        self.label_column = label_column
        self.labels = tuple(labels) if labels is not None else None
        self.on_bad_row = on_bad_row
        self.position = 0
        self.rows_read = 0
        self.bad_rows = 0
        self.unknown_labels = 0
        self.missing_cells = 0
        self.last_error: str | None = None
        self._label_index = {name: i for i, name in enumerate(self.labels)} if self.labels is not None else None
        self._backlog: list[tuple[int, list[str] | _BadRow]] = []
        self._buffer: _Parsed | None = None
        try:
            self._text = _open_text(self.path)
        except OSError as exc:
            raise ReplayError(f"cannot open: {exc.strerror or exc}", path=self.path) from exc
        try:
            self._rows = self._iter_rows()
            self._open_header()
            self._skip(start_row)
        except BaseException:
            self._text.close()
            raise

    # ---- opening -----------------------------------------------------------------------------

    def _iter_rows(self) -> Iterator[tuple[int, list[str] | _BadRow]]:
        """(file row, cells or the reason the line is unreadable); row -1 is the header."""
        reader = csv.reader(self._text)
        row = -1
        while True:
            try:
                cells: list[str] | _BadRow = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                cells = _BadRow(f"unreadable CSV line: {exc}")
            except (OSError, EOFError) as exc:  # a truncated or corrupt gzip stream
                raise ReplayError(f"cannot read past row {row}: {exc}", path=self.path) from exc
            yield row, cells
            row += 1

    def _open_header(self) -> None:
        first = next(self._rows, None)
        if first is None or isinstance(first[1], _BadRow) or not first[1]:
            raise ReplayError("no header row", path=self.path)
        header = [name.strip() for name in first[1]]
        self._width = len(header)
        wanted = [*self.feature_names, *([self.label_column] if self.label_column is not None else [])]
        duplicated = sorted({name for name in wanted if header.count(name) > 1})
        if duplicated:
            raise ReplayError(f"duplicated columns: {', '.join(duplicated)}", path=self.path)
        missing = [name for name in self.feature_names if name not in header]
        if missing:
            raise ReplayError(f"missing feature columns: {', '.join(missing)}", path=self.path)
        if self.label_column is not None and self.label_column not in header:
            raise ReplayError(f"missing label column: {self.label_column}", path=self.path)
        self._columns = [header.index(name) for name in self.feature_names]
        getter = operator.itemgetter(*self._columns)
        self._pick: Callable[[list[str]], tuple[str, ...]] = (
            getter if len(self._columns) > 1 else (lambda cells: (getter(cells),))
        )
        self._label_col = header.index(self.label_column) if self.label_column is not None else None

    def _skip(self, start_row: int) -> None:
        for row, _ in itertools.islice(self._rows, start_row):
            self.position = row + 1

    # ---- parsing -----------------------------------------------------------------------------

    def _cell(self, text: str, column: str) -> float:
        value = text.strip()
        if not value:
            return math.nan
        try:
            number = float(value)
        except ValueError:
            raise _BadRow(f"not a number: {value[:40]!r}", column) from None
        if math.isinf(number) or (math.isfinite(number) and abs(number) > 3.4e38):
            raise _BadRow(f"not a finite float32: {value[:40]!r}", column)
        return number

    def _label(self, text: str) -> int:
        value = text.strip()
        if not value:
            return NO_LABEL
        if self._label_index is not None:
            index = self._label_index.get(value, NO_LABEL)
        else:
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            index = int(number) if number.is_integer() and 0 <= number <= _INT16_MAX else NO_LABEL
        if index == NO_LABEL:
            self.unknown_labels += 1
        return index

    def _fetch(self, max_rows: int) -> list[tuple[int, list[str] | _BadRow]]:
        take = self._backlog[:max_rows]
        del self._backlog[:max_rows]
        if len(take) < max_rows:
            take.extend(itertools.islice(self._rows, max_rows - len(take)))
        return take

    def _convert(self, picked: list[tuple[str, ...]]) -> tuple[np.ndarray, list[tuple[int, _BadRow]]]:
        """Cells to float32: one numpy call when all are clean, cell by cell to find the bad ones."""
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                values = np.array(picked, dtype=np.float64).astype(np.float32)
            if not np.isinf(values).any():
                return values, []
        except ValueError:
            pass  # an empty cell (NaN) or a bad one
        values = np.empty((len(picked), len(self._columns)), dtype=np.float32)
        bad: list[tuple[int, _BadRow]] = []
        for k, cells in enumerate(picked):
            try:
                values[k] = [self._cell(text, name) for text, name in zip(cells, self.feature_names, strict=True)]
            except _BadRow as exc:
                bad.append((k, exc))
                if self.on_bad_row == "error":
                    break
        return values, bad

    def _parse(self, max_rows: int) -> _Parsed:
        """Parse up to ``max_rows`` file rows; in error mode stop before a bad row, raising if it is first."""
        raw = self._fetch(max_rows)
        if not raw:
            raise SourceExhausted(f"{self.path}: no rows after row {self.position}")
        picked: list[tuple[str, ...]] = []
        label_texts: list[str] = []
        rows: list[int] = []
        raw_at: list[int] = []
        end = self.position
        stop: tuple[int, int, _BadRow] | None = None  # (raw index, file row, reason)
        for i, (row, cells) in enumerate(raw):
            if isinstance(cells, _BadRow):
                problem: _BadRow | None = cells
            elif not cells or (len(cells) == 1 and not cells[0].strip()):
                end = row + 1  # a blank line: no record, but it keeps its row number
                continue
            elif len(cells) != self._width:
                problem = _BadRow(f"{len(cells)} cells, the header has {self._width}")
            else:
                problem = None
            if problem is not None:
                if self.on_bad_row == "skip":
                    self._count_bad(problem, row)
                    end = row + 1
                    continue
                stop = (i, row, problem)
                break
            assert not isinstance(cells, _BadRow)
            picked.append(self._pick(cells))
            if self._label_col is not None:
                label_texts.append(cells[self._label_col])
            rows.append(row)
            raw_at.append(i)
            end = row + 1
        values, bad = self._convert(picked) if picked else (np.empty((0, len(self._columns)), np.float32), [])
        keep = np.ones(len(picked), dtype=bool)
        for k, problem in bad:
            if self.on_bad_row == "skip":
                self._count_bad(problem, rows[k])
                keep[k] = False
            else:
                stop = (raw_at[k], rows[k], problem)
                keep[k:] = False
                break
        if stop is not None:
            i, row, problem = stop
            self._backlog[:0] = raw[i:]  # the bad row stays first in line
            end = row
            if not keep.any():
                self.position = row
                raise ReplayError(problem.message, path=self.path, row=row, column=problem.column)
        features = values[keep]
        kept_rows = np.asarray(rows, dtype=np.int64)[keep]
        labels = np.full(kept_rows.size, NO_LABEL, dtype=np.int16)
        if self._label_col is not None:
            labels[:] = [self._label(text) for text, k in zip(label_texts, keep.tolist(), strict=True) if k]
        self.missing_cells += int(np.isnan(features).sum())
        return _Parsed(features, labels, kept_rows, end)

    def _count_bad(self, bad: _BadRow, row: int) -> None:
        self.bad_rows += 1
        self.last_error = str(ReplayError(bad.message, path=self.path, row=row, column=bad.column))
        if self.bad_rows <= 10 or self.bad_rows % 1000 == 0:
            logger.warning("skipping bad row (%d so far): %s", self.bad_rows, self.last_error)

    # ---- delivering --------------------------------------------------------------------------

    def _buffered(self) -> bool:
        return self._buffer is not None and self._buffer.taken < len(self._buffer.rows)

    def _take(self, max_rows: int, parse_rows: int) -> ReplayChunk:
        if not self._buffered():
            self._buffer = self._parse(parse_rows)
        parsed = self._buffer
        assert parsed is not None
        a = parsed.taken
        b = min(len(parsed.rows), a + max_rows)
        parsed.taken = b
        next_row = int(parsed.rows[b]) if b < len(parsed.rows) else parsed.end
        chunk = ReplayChunk(
            start_row=int(parsed.rows[a]) if b > a else self.position,
            features=parsed.features[a:b],
            labels=parsed.labels[a:b],
            n=b - a,
            next_row=next_row,
        )
        self.position = next_row
        self.rows_read += chunk.n
        return chunk

    def read_chunk(self, max_rows: int) -> ReplayChunk:
        """Up to ``max_rows`` records (fewer at the end or where bad rows were skipped; possibly 0).

        Raises :class:`SourceExhausted` at the end of the file and :class:`ReplayError` at a bad
        row in ``error`` mode (after delivering the rows before it).
        """
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        return self._take(max_rows, max_rows)

    def read(self) -> Observation:
        """One record as an :class:`Observation` with ``features`` and ``label``."""
        chunk = self._take(1, _READ_BUFFER_ROWS)
        while chunk.n == 0:  # every row of a parsed region was bad and skipped
            chunk = self._take(1, _READ_BUFFER_ROWS)
        index = int(chunk.labels[0])
        if index == NO_LABEL:
            label = None
        elif self.labels is not None:
            label = self.labels[index]
        else:
            label = str(index)
        return Observation(
            mono=time.monotonic(),
            ts=time.time(),
            features=chunk.features[0].copy(),
            label=label,
            meta={"row": float(chunk.start_row)},
        )

    def close(self) -> None:
        """Close the file."""
        self._text.close()

    def stop(self) -> None:
        """Close the file."""
        self.close()
