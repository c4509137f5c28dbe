"""Per-window sketches written by ingest into ``monitoring_window``, exactly once with the records.

Ingest hands :meth:`WindowWriter.write` the blocks it just wrote and their
:class:`~collector.ingest.bulk.WriteOutcome`; only the NEWLY inserted rows are sketched (a
re-sent batch's duplicates and a conflicting batch's rejected records are not), inside the same
transaction, so a window counts every stored record once. The group's sketches are merged per
key in memory first, then each key's row is read, added to and written back.

Concurrency: the rows of the group's keys are first created empty (``INSERT … ON CONFLICT DO
NOTHING``, which on PostgreSQL waits for a replica inserting the same key to commit), then read
``FOR UPDATE`` in key order (replicas lock in the same order, so no deadlock), merged in Python
and updated. SQLite has a single writer (``BEGIN IMMEDIATE``), so the read-modify-write is safe there.

The reference bins come from the bundles named in the settings (there is no model registry yet),
keyed by (model name, version). Records of any other model version are counted, never an error.

Data quality against the hardware: every batch names the hardware profile of its device (the
envelope's ``profile``, also reported in ``status``). The profiles named by ``monitoring_profiles``
(YAML files or folders of them, validated by :mod:`shared.profile`; by default the repository's
``firmware_configs/``) are loaded once; each block is sketched with the
:class:`~collector.monitoring.sketches.RangeLimits` of its profile for its model's features, so
values outside the hardware's physical range are counted per feature in the window. A profile the
collector does not know is counted (``fleet_monitoring_unknown_profile_records_total``, logged once
per name) and its records are sketched without range checks, never refused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql.schema import Table

from collector.db.models import MonitoringWindow
from collector.monitoring.sketches import (
    DEFAULT_WINDOW_S,
    RangeLimits,
    ReferenceBins,
    SketchError,
    WindowSketch,
    split_by_window,
)
from shared.profile import HardwareProfile, ProfileError, load_profile

if TYPE_CHECKING:
    from collector.config import Settings

    # Types only: the ingest package imports its service, which imports this module.
    from collector.ingest.bulk import InferenceRows, WriteOutcome

log = logging.getLogger(__name__)

WINDOW_TABLE: Table = MonitoringWindow.__table__  # type: ignore[attr-defined]
# (device_id, model_name, model_version, role, window_start, window_s): the table's primary key.
WindowKey = tuple[str, str, str, str, float, float]
KEY_COLUMNS = ("device_id", "model_name", "model_version", "role", "window_start", "window_s")
# The repository's hardware profiles, next to the package: the default of ``monitoring_profiles``.
DEFAULT_PROFILE_DIR = Path(__file__).resolve().parents[2] / "firmware_configs"
# Unknown profile names logged once each, up to this many (a device could send any string).
_MAX_LOGGED_PROFILES = 256


def load_reference_bins(bundles: Sequence[Path], key_files: Sequence[Path]) -> dict[tuple[str, str], ReferenceBins]:
    """Reference bins of every bundle that loads with a valid signature, keyed by (model name, version).

    A bundle or key file that cannot be read or verified is logged and skipped; without any
    trusted key no bundle is loaded (an unsigned reference would decide what drift is). The
    loading is :class:`~collector.monitoring.catalog.ReferenceCatalog`'s, shared with the service.
    """
    # Imported here: the catalog imports sketches, which imports collector.ingest, which imports this module.
    from collector.monitoring.catalog import ReferenceCatalog

    return ReferenceCatalog.from_paths(bundles, key_files).bins()


def profile_paths(configured: Sequence[Path] | None) -> list[Path]:
    """``monitoring_profiles`` as given, or by default ``firmware_configs/`` next to the package when it exists."""
    if configured is not None:
        return [Path(p) for p in configured]
    return [DEFAULT_PROFILE_DIR] if DEFAULT_PROFILE_DIR.is_dir() else []


def load_profiles(paths: Sequence[Path]) -> dict[str, HardwareProfile]:
    """Every hardware profile in ``paths`` (YAML files, or folders whose ``*.yaml``/``*.yml`` are read), by name.

    Each is validated by :func:`shared.profile.load_profile`; one that does not validate, or a path
    that does not exist, is logged and skipped (ingest then counts its devices' records as of an
    unknown profile instead of refusing them). Two files declaring the same name: the first wins.
    """
    out: dict[str, HardwareProfile] = {}
    for path in paths:
        path = Path(path)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        elif path.is_file():
            files = [path]
        else:
            log.error("monitoring: hardware profile path %s does not exist", path)
            continue
        for file in files:
            try:
                profile = load_profile(file)
            except ProfileError as exc:
                log.error("monitoring: hardware profile not loaded: %s", exc)
                continue
            if profile.name in out:
                log.warning("monitoring: hardware profile %r given again in %s; keeping the first", profile.name, file)
                continue
            out[profile.name] = profile
            log.info("monitoring: hardware profile %s from %s (%d ranges)", profile.name, file, len(profile.ranges))
    return out


@dataclass
class NewRecords:
    """One batch as ingest wrote it: its blocks, what became of each, and the hardware profile it names."""

    blocks: Sequence[InferenceRows]
    outcomes: Sequence[WriteOutcome]
    profile: str | None = None

    def all_seqs(self) -> np.ndarray | None:
        """The seqs of every record of the batch, when a block's new records may skip some of them.

        A seq between two new records that another block carries (a shadow block interleaved with
        the active one) or that was already stored (a partly re-sent batch) is not missing.
        """
        partial = any(o.new is not None and not bool(o.new.all()) for o in self.outcomes)
        if len(self.blocks) > 1 or partial:
            return np.concatenate([b.seq for b in self.blocks])
        return None


@dataclass
class Sketched:
    """What could not be fully checked in one batch's new records."""

    unsketched: int = 0  # not sketched: no reference bins for the model version, or not sketchable
    unranged: int = 0  # sketched without range checks: the batch's hardware profile is unknown


@dataclass
class WindowWriter:
    """Sketches newly stored records per (device, model version, role, window) and merges them into the table."""

    bins: Mapping[tuple[str, str], ReferenceBins]
    window_s: float = DEFAULT_WINDOW_S
    profiles: Mapping[str, HardwareProfile] = field(default_factory=dict)
    _limits: dict[tuple[str, str, str], RangeLimits] = field(default_factory=dict, init=False, repr=False)
    _logged: set[str] = field(default_factory=set, init=False, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings, bins: Mapping[tuple[str, str], ReferenceBins]) -> WindowWriter:
        """A writer for ``bins`` with the window length and hardware profiles of ``settings``."""
        profiles = load_profiles(profile_paths(settings.monitoring_profiles))
        if not profiles:
            log.warning("monitoring: no hardware profile loaded: feature values are not range-checked")
        return cls(bins, settings.monitoring_window_s, profiles)

    def limits(self, profile: str | None, bins: ReferenceBins) -> RangeLimits | None:
        """The ranges of ``profile`` for the features of ``bins``' model (cached), or None when it is unknown."""
        hardware = self.profiles.get(profile) if profile else None
        if hardware is None:
            if len(self._logged) < _MAX_LOGGED_PROFILES and (profile or "") not in self._logged:
                self._logged.add(profile or "")
                log.warning(
                    "monitoring: hardware profile %r is not among the %d loaded (monitoring_profiles): "
                    "its records are sketched without range checks",
                    profile,
                    len(self.profiles),
                )
            return None
        key = (hardware.name, bins.model_name, bins.model_version)
        limits = self._limits.get(key)
        if limits is None:
            limits = self._limits[key] = RangeLimits.from_profile(hardware, bins.feature_names)
        return limits

    def sketch(self, batch: NewRecords) -> tuple[dict[WindowKey, WindowSketch], Sketched]:
        """The merged sketches per key of the new rows of ``batch``, and what could not be checked."""
        merged: dict[WindowKey, WindowSketch] = {}
        missed = Sketched()
        seqs = batch.all_seqs()
        for rows, outcome in zip(batch.blocks, batch.outcomes, strict=True):
            if not outcome.inserted:
                continue
            bins = self.bins.get((rows.model_name, rows.model_version))
            if bins is None:
                missed.unsketched += outcome.inserted
                continue
            new = outcome.new
            fresh = rows if new is None or bool(new.all()) else rows.take(new)
            ranges = self.limits(batch.profile, bins)
            try:
                windows = split_by_window(bins, fresh, self.window_s, ranges=ranges, all_seqs=seqs)
            except (SketchError, ValueError) as exc:
                # Valid for storage but not for the reference (e.g. another feature count): count, go on.
                log.warning("monitoring: block of %s not sketched: %s", rows.device_id, exc)
                missed.unsketched += outcome.inserted
                continue
            if ranges is None:
                missed.unranged += outcome.inserted
            for start, s in windows.items():
                key = (rows.device_id, rows.model_name, rows.model_version, rows.role, start, float(self.window_s))
                old = merged.get(key)
                merged[key] = s if old is None else old + s
        return merged, missed

    def write(self, conn: Connection, batches: Sequence[NewRecords]) -> list[Sketched]:
        """Merge the new rows of every batch's blocks into ``monitoring_window`` on ``conn`` (caller's transaction).

        Returns, per batch, the newly inserted records that were not sketched or not range-checked.
        """
        merged: dict[WindowKey, WindowSketch] = {}
        out = []
        for batch in batches:
            part, missed = self.sketch(batch)
            out.append(missed)
            for key, s in part.items():
                old = merged.get(key)
                merged[key] = s if old is None else old + s
        if merged:
            merge_into_table(conn, merged)
        return out


def merge_into_table(conn: Connection, merged: dict[WindowKey, WindowSketch]) -> None:
    """Add ``merged`` to the stored windows of its keys (rows created when missing), on ``conn``."""
    keys = sorted(merged)
    now = time.time()
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    c = WINDOW_TABLE.c
    # Placeholders first, so every key has a row to lock; n = 0 marks one never merged into.
    conn.execute(
        dialect.insert(WINDOW_TABLE).on_conflict_do_nothing(index_elements=list(KEY_COLUMNS)),
        [dict(zip(KEY_COLUMNS, k, strict=True), n=0, sketch=b"", updated_at=now) for k in keys],
    )
    stored: dict[WindowKey, tuple[int, bytes]] = {}
    cols = [c[name] for name in KEY_COLUMNS]
    for lo in range(0, len(keys), 500):  # bounded IN lists
        chunk = keys[lo : lo + 500]
        stmt = sa.select(*cols, c.n, c.sketch).where(sa.tuple_(*cols).in_(chunk)).order_by(*cols)
        if conn.dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        for row in conn.execute(stmt):
            key: WindowKey = (row[0], row[1], row[2], row[3], float(row[4]), float(row[5]))
            stored[key] = (int(row.n), bytes(row.sketch))
    updates = []
    for key in keys:
        total = merged[key]
        n_old, blob = stored.get(key, (0, b""))
        if n_old or blob:
            total = WindowSketch.from_bytes(blob) + total
        row_values = {f"k_{name}": v for name, v in zip(KEY_COLUMNS, key, strict=True)}
        updates.append({**row_values, "v_n": total.n, "v_sketch": total.to_bytes(), "v_at": now})
    stmt_u = (
        sa.update(WINDOW_TABLE)
        .where(*[c[name] == sa.bindparam(f"k_{name}") for name in KEY_COLUMNS])
        .values(n=sa.bindparam("v_n"), sketch=sa.bindparam("v_sketch"), updated_at=sa.bindparam("v_at"))
    )
    conn.execute(stmt_u, updates)
