"""The reference catalog: every model version the collector can judge, with what judging it needs.

Drift, label-free accuracy and data quality all compare live windows with a bundle's reference
profile. Until the model registry exists, the bundles come from the settings
(``monitoring_bundles``, checked against ``monitoring_trusted_keys``); each is read, verified and
prepared **once** here, and ingest (:class:`~collector.monitoring.windows.WindowWriter`) and the
monitoring service read the same entries, so the sketches and the tests always use the same edges.

An unsigned or unverifiable bundle is never loaded: the reference decides what "drift" means, so a
tampered one could hide it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from collector.monitoring.drift import ReferenceCounts
from collector.monitoring.sketches import ReferenceBins
from shared.bundle import BundleError, Manifest, load_bundle
from shared.signing import PublicKey, SignatureError, load_public_keys

if TYPE_CHECKING:
    from collector.config import Settings

log = logging.getLogger(__name__)

ModelKey = tuple[str, str]  # (model name, model version)


@dataclass(frozen=True, eq=False)
class CatalogEntry:
    """One verified model version: its manifest and the reference prepared for sketching and testing."""

    manifest: Manifest
    bins: ReferenceBins
    reference: ReferenceCounts
    path: Path
    key_id: str

    @property
    def key(self) -> ModelKey:
        """``(model name, version)``."""
        return self.manifest.name, self.manifest.version

    @property
    def labels(self) -> list[str]:
        """Class names, indexed like the records' ``pred`` and ``label``."""
        return list(self.manifest.labels)

    @classmethod
    def from_manifest(cls, manifest: Manifest, path: Path, key_id: str = "") -> CatalogEntry:
        """Prepare the bins and reference counts of a verified manifest."""
        return cls(
            manifest=manifest,
            bins=ReferenceBins.from_manifest(manifest),
            reference=ReferenceCounts.from_profile(manifest.reference),
            path=path,
            key_id=key_id,
        )


class ReferenceCatalog:
    """Verified reference bundles keyed by ``(model name, version)``; read-only after construction."""

    def __init__(self, entries: Mapping[ModelKey, CatalogEntry] | None = None) -> None:
        self._entries: dict[ModelKey, CatalogEntry] = dict(entries or {})

    def get(self, model_name: str, version: str) -> CatalogEntry | None:
        """The entry of one model version, or None when no verified bundle describes it."""
        return self._entries.get((model_name, version))

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[ModelKey]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[ModelKey]:
        """``(model name, version)`` of every entry, sorted."""
        return sorted(self._entries)

    def bins(self) -> dict[ModelKey, ReferenceBins]:
        """Reference bins per model version, as :class:`~collector.monitoring.windows.WindowWriter` takes them."""
        return {k: e.bins for k, e in self._entries.items()}

    @classmethod
    def from_paths(cls, bundles: Sequence[Path], key_files: Sequence[Path]) -> ReferenceCatalog:
        """Load every bundle that verifies against ``key_files``; log and skip the others.

        Without any usable trusted key nothing is loaded. Two bundles of the same model version:
        the later one wins, with a warning (the settings list them in order).
        """
        entries: dict[ModelKey, CatalogEntry] = {}
        if not bundles:
            return cls(entries)
        keys: list[PublicKey] = []
        for path in key_files:
            try:
                keys.extend(load_public_keys([Path(path)]))
            except (OSError, ValueError, SignatureError) as exc:
                log.error("monitoring: cannot read trusted key file %s: %s", path, exc)
        if not keys:
            log.error("monitoring: %d bundle(s) configured but no usable trusted key: none loaded", len(bundles))
            return cls(entries)
        for path in bundles:
            try:
                bundle = load_bundle(Path(path), keys, check_tensors=False)
                entry = CatalogEntry.from_manifest(bundle.manifest, Path(path), bundle.key_id)
            except (OSError, BundleError, SignatureError, ValueError) as exc:
                log.error("monitoring: bundle %s not loaded: %s", path, exc)
                continue
            if entry.key in entries:
                log.warning("monitoring: %s %s given twice; using %s", *entry.key, path)
            entries[entry.key] = entry
            log.info("monitoring: reference of %s %s from %s", *entry.key, path)
        return cls(entries)

    @classmethod
    def from_settings(cls, settings: Settings) -> ReferenceCatalog:
        """The catalog of ``monitoring_bundles`` verified with ``monitoring_trusted_keys``."""
        return cls.from_paths(settings.monitoring_bundles, settings.monitoring_trusted_keys)
