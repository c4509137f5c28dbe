"""The registry service: push, list, show, stage transitions, cards and downloads of model versions.

A push is validated completely before anything is stored (:func:`shared.bundle.load_bundle`: archive
layout and sizes, manifest schema, model hash, signature against the accepted upload signers, tensor
shapes with the TFLite runtime; then the golden inputs, as the device's self-test will), re-signed with
the collector's release key (the manifest bytes are kept exactly; only ``signature`` changes), stored by
the SHA-256 of the resulting tar, and recorded with its lineage. A name and version is immutable: the
same manifest pushed again is answered with the stored version, a different one is refused
(``version_conflict``).

Stages: ``candidate`` (pushed; may be pinned or rolled out), ``production`` (the default of its model
line: one per name; promoting a version moves the previous one back to candidate) and ``archived``
(kept and downloadable, never deployed: refused while pinned or in a rollout). :data:`TRANSITIONS`
lists what is allowed. A stage change calls ``on_change`` inside its transaction, so the desired state of
every device follows in the same commit.

No HTTP here: plain methods with keyword-only arguments, for the API and the rollout controller.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from collector import metrics
from collector.config import Settings
from collector.db.engine import write_transaction
from collector.db.models import ModelPin, ModelStageChange, ModelVersion
from collector.registry import repository as repo
from collector.registry.card import render
from collector.registry.errors import Kind, RegistryError
from collector.registry.keys import ReleaseKeys
from collector.registry.store import Artefact, ArtefactStore, FolderStore
from shared.bundle import BundleError, Manifest, load_bundle, run_golden, write_bundle
from shared.signing import PublicKey, sign

log = logging.getLogger(__name__)

STAGES = ("candidate", "production", "archived")
TRANSITIONS: dict[str, frozenset[str]] = {
    "candidate": frozenset({"production", "archived"}),
    "production": frozenset({"candidate", "archived"}),
    "archived": frozenset({"candidate"}),
}
DEPLOYABLE = frozenset({"candidate", "production"})

OnChange = Callable[[Connection], None]


def bundle_path(name: str, version: str) -> str:
    """The API path a version's bundle is downloaded from (devices get it in their desired state)."""
    return f"/api/v1/models/{name}/{version}/bundle"


@dataclass(frozen=True)
class PushResult:
    """A pushed version and whether this push created it (False: the same content was already stored)."""

    version: ModelVersion
    created: bool


def _signature_key_id(path: Path) -> str | None:
    """The ``key_id`` a bundle's signature file names, or None when there is none to read."""
    import json

    try:
        with tarfile.open(path, mode="r:") as tar:
            member = tar.extractfile("signature")
            if member is None:
                return None
            return str(json.loads(member.read(4096))["key_id"])
    except (tarfile.TarError, KeyError, ValueError, TypeError, OSError):
        return None


def _has_signature(path: Path) -> bool:
    try:
        with tarfile.open(path, mode="r:") as tar:
            return any(n.removeprefix("./") == "signature" for n in tar.getnames())
    except (tarfile.TarError, OSError):
        return True


def refine_rejection(path: Path, exc: BundleError, trusted: list[PublicKey]) -> RegistryError:
    """The bundle error as a registry rejection, telling an unsigned bundle and an unknown signer apart."""
    if exc.reason == "missing_member" and not _has_signature(path):
        return RegistryError("unsigned", f"the bundle has no signature: {exc.detail}")
    if exc.reason == "bad_signature":
        key_id = _signature_key_id(path)
        if key_id is not None and key_id not in {k.key_id for k in trusted}:
            accepted = ", ".join(k.key_id for k in trusted) or "none"
            return RegistryError("unknown_key", f"signed by key {key_id}; the registry accepts {accepted}")
    return RegistryError(exc.reason, exc.detail)


class Registry:
    """Model versions in the database and their bundles in an :class:`ArtefactStore`."""

    def __init__(
        self,
        engine: Engine,
        store: ArtefactStore,
        keys: ReleaseKeys,
        *,
        max_upload_bytes: int,
        on_change: OnChange | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.keys = keys
        self.max_upload_bytes = max_upload_bytes
        self.on_change = on_change

    @classmethod
    def from_settings(cls, engine: Engine, settings: Settings, *, on_change: OnChange | None = None) -> Registry:
        """The registry the settings describe (folder store, release and upload keys)."""
        return cls(
            engine,
            FolderStore(settings.artefacts),
            ReleaseKeys.from_settings(settings),
            max_upload_bytes=settings.registry_max_upload_bytes,
            on_change=on_change,
        )

    # ------------------------------------------------------------------------------------ push

    def scratch(self) -> Path:
        """A temporary path for an upload being received."""
        return self.store.scratch()

    def reject(self, reason: str, message: str, kind: Kind = "invalid") -> RegistryError:
        """Count a refused push and return the error to raise."""
        metrics.REGISTRY_PUSHES.labels("rejected").inc()
        metrics.REGISTRY_REJECTIONS.labels(reason).inc()
        log.info("push refused: %s: %s", reason, message)
        return RegistryError(reason, message, kind)

    def push(self, *, path: Path, by: str, now: float | None = None) -> PushResult:
        """Validate, re-sign and store the bundle at ``path`` (consumed), recording who pushed it."""
        try:
            return self._push(path, by, time.time() if now is None else now)
        except RegistryError as exc:
            raise self.reject(exc.reason, exc.message, exc.kind) from None
        finally:
            path.unlink(missing_ok=True)

    def _push(self, path: Path, by: str, now: float) -> PushResult:
        if self.keys.signing is None:
            raise RegistryError(
                "no_release_key", "the collector has no release key (release_key) to sign bundles with", "unavailable"
            )
        size = path.stat().st_size
        if size == 0:
            raise RegistryError("empty", "the body is empty: send the bundle .tar")
        if size > self.max_upload_bytes:
            raise RegistryError("too_large", f"{size} bytes > limit {self.max_upload_bytes}", "too_large")
        try:
            bundle = load_bundle(path, self.keys.upload, check_tensors=True)
            run_golden(bundle)
        except BundleError as exc:
            raise refine_rejection(path, exc, self.keys.upload) from None
        m = bundle.manifest
        manifest_sha = hashlib.sha256(bundle.manifest_bytes).hexdigest()
        with self.engine.connect() as conn:
            existing = repo.get_version(conn, name=m.name, version=m.version)
        if existing is not None:
            return self._same_or_conflict(existing, manifest_sha)

        signed = self.store.scratch()
        try:
            write_bundle(signed, bundle.model, bundle.manifest_bytes, sign(bundle.manifest_bytes, self.keys.signing))
            stored = load_bundle(signed, self.keys.published, check_tensors=False)
            artefact = self.store.put(signed)
        finally:
            signed.unlink(missing_ok=True)
        values = self._row(bundle.manifest, artefact, manifest_sha, bundle.key_id, stored.key_id, by, now)
        try:
            with write_transaction(self.engine) as conn:
                version = repo.insert_version(conn, values=values)
                repo.add_stage_change(
                    conn,
                    name=m.name,
                    version=m.version,
                    from_stage=None,
                    to_stage="candidate",
                    at=now,
                    by=by,
                    note="pushed",
                )
        except sa_exc.IntegrityError:
            # Another push of the same name and version committed first.
            with self.engine.connect() as conn:
                existing = repo.get_version(conn, name=m.name, version=m.version)
            if existing is None:
                raise
            return self._same_or_conflict(existing, manifest_sha)
        metrics.REGISTRY_PUSHES.labels("stored").inc()
        log.info(
            "stored %s %s (%d bytes, sha256 %s) pushed by %s", m.name, m.version, artefact.size, artefact.sha256, by
        )
        return PushResult(version, True)

    @staticmethod
    def _same_or_conflict(existing: ModelVersion, manifest_sha: str) -> PushResult:
        if existing.manifest_sha256 == manifest_sha:
            metrics.REGISTRY_PUSHES.labels("identical").inc()
            return PushResult(existing, False)
        raise RegistryError(
            "version_conflict",
            f"{existing.name} {existing.version} is already stored with other content (sha256 {existing.sha256}, "
            f"pushed {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(existing.pushed_at))} UTC by "
            f"{existing.pushed_by}); a version never changes: give the new bundle a new version",
            "conflict",
        )

    @staticmethod
    def _row(
        m: Manifest, artefact: Artefact, manifest_sha: str, uploader: str, release: str, by: str, now: float
    ) -> dict[str, Any]:
        return {
            "name": m.name,
            "version": m.version,
            "stage": "candidate",
            "sha256": artefact.sha256,
            "size": artefact.size,
            "manifest_sha256": manifest_sha,
            "model_sha256": m.model_sha256,
            "manifest": m.model_dump(mode="json"),
            "uploader_key_id": uploader,
            "release_key_id": release,
            "dataset_version": m.training.dataset_version,
            "dataset_sha256": m.training.dataset_sha256,
            "code_version": m.training.code_version,
            "parent_version": m.parent_version,
            "metrics": dict(m.training.metrics),
            "created_at": m.created_at.timestamp(),
            "pushed_at": now,
            "pushed_by": by,
            "stage_changed_at": now,
        }

    # ------------------------------------------------------------------------------------ read

    def get(self, *, name: str, version: str) -> ModelVersion:
        """One version (``not_found`` otherwise)."""
        with self.engine.connect() as conn:
            found = repo.get_version(conn, name=name, version=version)
        if found is None:
            raise RegistryError("not_found", f"no model {name} version {version}", "not_found")
        return found

    def list_versions(
        self, *, limit: int, cursor: str | None = None, name: str | None = None, stage: str | None = None
    ) -> tuple[list[ModelVersion], int, str | None]:
        """Versions by name then push order: ``(page, total, next cursor)``."""
        with self.engine.connect() as conn:
            return repo.list_versions(conn, limit=limit, cursor=cursor, name=name, stage=stage)

    def history(self, *, name: str, version: str) -> list[ModelStageChange]:
        """The stage transitions of one version, oldest first."""
        with self.engine.connect() as conn:
            return repo.stage_history(conn, name=name, version=version)

    def references(self, *, name: str, version: str) -> tuple[list[ModelPin], dict[str, int]]:
        """The pins and the rollouts (with their device counts) naming one version."""
        with self.engine.connect() as conn:
            return repo.pins_of(conn, name=name, version=version), repo.rollouts_of(conn, name=name, version=version)

    def bundle_file(self, *, name: str, version: str) -> tuple[ModelVersion, Path]:
        """The version and the local file of its stored bundle."""
        found = self.get(name=name, version=version)
        path = self.store.local_path(found.sha256)
        if path is None:
            log.error("bundle of %s %s (sha256 %s) is missing from the artefact store", name, version, found.sha256)
            raise RegistryError(
                "artefact_missing", f"the stored bundle of {name} {version} is missing from the store", "unavailable"
            )
        return found, path

    def card(self, *, name: str, version: str, fmt: str) -> str:
        """The model card of one version as ``markdown`` or ``html``."""
        found = self.get(name=name, version=version)
        manifest = Manifest.model_validate(found.manifest)
        history = self.history(name=name, version=version)
        return render(found, manifest, history, download_path=bundle_path(name, version), fmt=fmt)

    # ---------------------------------------------------------------------------------- stages

    def set_stage(
        self, *, name: str, version: str, stage: str, by: str, note: str | None = None, now: float | None = None
    ) -> ModelVersion:
        """Move a version to ``stage`` (allowed by :data:`TRANSITIONS`; the same stage again changes nothing)."""
        if stage not in STAGES:
            raise RegistryError("bad_stage", f"stage must be one of {', '.join(STAGES)}, not {stage!r}")
        at = time.time() if now is None else now
        with write_transaction(self.engine, desired_lock=True) as conn:
            found = repo.get_version(conn, name=name, version=version)
            if found is None:
                raise RegistryError("not_found", f"no model {name} version {version}", "not_found")
            assert found.id is not None
            if found.stage == stage:
                return found
            if stage not in TRANSITIONS[found.stage]:
                allowed = ", ".join(sorted(TRANSITIONS[found.stage]))
                raise RegistryError(
                    "bad_transition",
                    f"{name} {version} is {found.stage}: it may move to {allowed}, not {stage}",
                    "conflict",
                )
            if stage == "archived":
                self._check_unused(conn, name, version)
            if stage == "production":
                current = repo.production_versions(conn).get(name)
                if current is not None and current.id is not None:
                    repo.set_stage(conn, version_id=current.id, stage="candidate", at=at)
                    repo.add_stage_change(
                        conn,
                        name=name,
                        version=current.version,
                        from_stage="production",
                        to_stage="candidate",
                        at=at,
                        by=by,
                        note=f"superseded by {version}",
                    )
            repo.set_stage(conn, version_id=found.id, stage=stage, at=at)
            repo.add_stage_change(
                conn, name=name, version=version, from_stage=found.stage, to_stage=stage, at=at, by=by, note=note
            )
            if self.on_change is not None:
                self.on_change(conn)
            updated = repo.get_version(conn, name=name, version=version)
        assert updated is not None
        log.info("%s %s: %s -> %s by %s", name, version, found.stage, stage, by)
        return updated

    @staticmethod
    def _check_unused(conn: Connection, name: str, version: str) -> None:
        pins = repo.pins_of(conn, name=name, version=version)
        rollouts = repo.rollouts_of(conn, name=name, version=version)
        if pins or rollouts:
            users = [f"{p.scope} {p.subject}" for p in pins] + [
                f"rollout {r} ({n} devices)" for r, n in rollouts.items()
            ]
            raise RegistryError(
                "in_use",
                f"{name} {version} cannot be archived while pinned or rolled out: {', '.join(users)}",
                "conflict",
            )
