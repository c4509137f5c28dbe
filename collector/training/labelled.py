"""Labelled CSV (plain or gzip) to a feature matrix, with every rejected row and column accounted for."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from collector.training.errors import TrainingError

log = logging.getLogger(__name__)

# Cells read as a missing value rather than as text.
MISSING_TOKENS = frozenset({"", "na", "nan", "n/a", "null", "none"})
MIN_ROWS_PER_CLASS = 3  # one each for training, validation and test
TIME_COLUMNS = ("drive", "ts_s")
"""Optional columns of a monitoring reference file: the drive (vehicle) a record belongs to, a number, and its
time in seconds. With them the trainer measures how long each monitored quantity takes to decorrelate."""


@dataclass(frozen=True)
class LabelledTable:
    """Numeric features and string labels of the usable rows of a CSV."""

    x: np.ndarray
    """``[rows, features]`` float64, all finite"""
    y: np.ndarray
    """``[rows]`` class index into ``labels``"""
    labels: list[str]
    """sorted class names"""
    feature_names: list[str]
    sha256: str
    """of the file's bytes as stored (compressed if gzip)"""
    rows_read: int
    rows_dropped: dict[str, int] = field(default_factory=dict)
    """reason -> rows: ``malformed`` (wrong field count), ``missing_label``, ``non_finite_feature``"""
    skipped_columns: dict[str, str] = field(default_factory=dict)
    """column -> why it is not a feature (only when features are chosen automatically)"""

    @property
    def n_dropped(self) -> int:
        """Rows read but not used."""
        return sum(self.rows_dropped.values())


def has_columns(path: Path, names: tuple[str, ...]) -> bool:
    """Whether the CSV's header (plain or gzip) names every one of ``names``."""
    try:
        with Path(path).open("rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
        opener = gzip.open if gz else open
        with opener(path, "rt", encoding="utf-8-sig", newline="") as text:
            header = next(csv.reader(text), [])
    except (OSError, UnicodeDecodeError, csv.Error, EOFError):
        return False
    return set(names) <= {h.strip() for h in header}


def _read_text(path: Path) -> tuple[str, str]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TrainingError("unreadable", f"cannot read {path}: {exc.strerror or exc}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise TrainingError("bad_csv", f"{path} looks gzip-compressed but does not decompress: {exc}") from None
    try:
        return raw.decode("utf-8-sig"), digest
    except UnicodeDecodeError as exc:
        raise TrainingError("bad_csv", f"{path} is not UTF-8 text: {exc}") from None


def parse_numeric(cells: list[str]) -> tuple[np.ndarray, list[int]]:
    """Floats of ``cells`` (missing tokens and non-finite values become NaN) and the positions that are text."""
    try:
        values = np.asarray(cells, dtype=np.float64)
    except ValueError:
        values = np.empty(len(cells), dtype=np.float64)
        text: list[int] = []
        for k, cell in enumerate(cells):
            try:
                values[k] = float(cell)
            except ValueError:
                values[k] = np.nan
                if cell.strip().lower() not in MISSING_TOKENS:
                    text.append(k)
    else:
        text = []
    values[~np.isfinite(values)] = np.nan
    return values, text


def load_labelled_csv(path: Path, *, label_column: str, feature_columns: list[str] | None = None) -> LabelledTable:
    """Read a labelled CSV; features default to every numeric column except the label.

    A column is numeric when every non-missing cell parses as a number; others are skipped (and
    reported) when features are chosen automatically, and rejected when named explicitly. Rows
    with the wrong number of fields, no label, or a missing or non-finite feature are dropped and
    counted by reason. Raises :class:`TrainingError` for anything that leaves nothing to train on.
    """
    path = Path(path)
    text, digest = _read_text(path)
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise TrainingError("bad_csv", f"{path} is empty") from None
    except csv.Error as exc:
        raise TrainingError("bad_csv", f"{path}: {exc}") from None
    duplicated = sorted(name for name, n in Counter(header).items() if n > 1)
    if duplicated:
        raise TrainingError("bad_csv", f"{path} repeats column names {duplicated}")
    if label_column not in header:
        raise TrainingError("missing_column", f"label column {label_column!r} is not in {path} (columns {header[:12]})")
    if feature_columns is not None:
        missing = [c for c in feature_columns if c not in header]
        if missing:
            raise TrainingError("missing_column", f"feature columns {missing} are not in {path}")
        if label_column in feature_columns:
            raise TrainingError("bad_columns", f"the label column {label_column!r} cannot also be a feature")
        if len(set(feature_columns)) != len(feature_columns):
            raise TrainingError("bad_columns", "feature columns are listed more than once")
        if not feature_columns:
            raise TrainingError("no_features", "an empty list of feature columns was given")

    rows: list[list[str]] = []
    malformed = 0
    try:
        for row in reader:
            if len(row) == len(header):
                rows.append(row)
            elif any(cell.strip() for cell in row):  # a blank line is not a malformed record
                malformed += 1
    except csv.Error as exc:
        raise TrainingError("bad_csv", f"{path} line {reader.line_num}: {exc}") from None
    rows_read = len(rows) + malformed
    if not rows:
        raise TrainingError("no_rows", f"{path} has a header but no usable rows ({malformed} malformed)")
    columns = list(zip(*rows, strict=True))
    del rows

    label_cells = [c.strip() for c in columns[header.index(label_column)]]
    has_label = np.array([c.lower() not in MISSING_TOKENS for c in label_cells])

    skipped: dict[str, str] = {}
    names: list[str] = []
    matrix: list[np.ndarray] = []
    candidates = feature_columns if feature_columns is not None else [h for h in header if h != label_column]
    for name in candidates:
        cells = list(columns[header.index(name)])
        values, text_at = parse_numeric(cells)
        if text_at:
            example = cells[text_at[0]].strip()
            if feature_columns is not None:
                raise TrainingError(
                    "non_numeric_feature",
                    f"feature column {name!r} holds text in {len(text_at)} rows, e.g. {example!r}",
                )
            skipped[name] = f"not numeric: {len(text_at)} cells of text, e.g. {example!r}"
            continue
        if feature_columns is None and np.isnan(values).all():
            skipped[name] = "no values"
            continue
        names.append(name)
        matrix.append(values)
    if not names:
        raise TrainingError(
            "no_features",
            f"{path} has no numeric feature column besides {label_column!r} (skipped: {sorted(skipped)})",
        )
    x = np.column_stack(matrix)
    finite = np.isfinite(x).all(axis=1)
    keep = has_label & finite
    dropped = {
        "malformed": malformed,
        "missing_label": int((~has_label).sum()),
        "non_finite_feature": int((has_label & ~finite).sum()),
    }
    dropped = {reason: n for reason, n in dropped.items() if n}
    if not keep.any():
        raise TrainingError("no_rows", f"no row of {path} has a label and finite features (dropped: {dropped})")
    kept_labels = np.asarray(label_cells, dtype=object)[keep]
    labels = sorted(set(kept_labels.tolist()))
    if len(labels) < 2:
        raise TrainingError("single_class", f"column {label_column!r} holds only the class {labels} after cleaning")
    index = {label: k for k, label in enumerate(labels)}
    y = np.fromiter((index[v] for v in kept_labels), dtype=np.int64, count=kept_labels.size)
    counts = np.bincount(y, minlength=len(labels))
    small = [f"{labels[k]}={int(n)}" for k, n in enumerate(counts) if n < MIN_ROWS_PER_CLASS]
    if small:
        raise TrainingError(
            "class_too_small",
            f"every class needs at least {MIN_ROWS_PER_CLASS} rows (training, validation, test); too few: {small}",
        )
    if dropped:
        log.warning("dropped %d of %d rows of %s: %s", sum(dropped.values()), rows_read, path, dropped)
    if skipped:
        log.info("not used as features: %s", skipped)
    return LabelledTable(
        x=x[keep],
        y=y,
        labels=labels,
        feature_names=names,
        sha256=digest,
        rows_read=rows_read,
        rows_dropped=dropped,
        skipped_columns=skipped,
    )


def stratified_split(
    y: np.ndarray, *, seed: int, validation: float = 0.15, test: float = 0.15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded per-class shuffle into training, validation and test row indexes (each class in each split)."""
    if not (0 < validation < 1 and 0 < test < 1 and validation + test < 1):
        raise ValueError("validation and test fractions must be in (0, 1) and sum below 1")
    rng = np.random.default_rng(seed)
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for cls in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == cls))
        n = rows.size
        n_val = max(1, round(n * validation))
        n_test = max(1, round(n * test))
        if n - n_val - n_test < 1:
            raise TrainingError("class_too_small", f"class index {int(cls)} has {n} rows; it needs at least 3")
        parts[0].append(rows[n_val + n_test :])
        parts[1].append(rows[:n_val])
        parts[2].append(rows[n_val : n_val + n_test])
    train, val, tst = (np.sort(np.concatenate(p)) for p in parts)
    return train, val, tst
