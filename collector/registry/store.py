"""Artefact storage addressed by content: a bundle is stored and found by the SHA-256 of its bytes.

:class:`ArtefactStore` is the interface the registry uses; :class:`FolderStore` keeps the files in a
local folder as ``sha256/<first two hex digits>/<sha256>.tar``, written to a temporary file on the same
file system first and moved into place atomically, so a reader never sees half a file. An
S3-compatible store can implement the same interface (``local_path`` then returns None and the API
would redirect to a presigned URL instead of serving the file itself).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Artefact:
    """A stored artefact: its content address and size."""

    sha256: str
    size: int


def sha256_file(path: Path) -> Artefact:
    """SHA-256 and size of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return Artefact(digest.hexdigest(), size)


class ArtefactStore(Protocol):
    """Where bundles live, by the SHA-256 of their bytes."""

    def scratch(self) -> Path:
        """A new temporary file path in the store's own file system (for uploads and re-signing)."""
        ...

    def put(self, source: Path) -> Artefact:
        """Store the file at ``source`` (it is moved or removed) and return its address."""
        ...

    def has(self, sha256: str) -> bool:
        """Whether an artefact with this hash is stored."""
        ...

    def open(self, sha256: str) -> BinaryIO:
        """The stored bytes (``FileNotFoundError`` if absent)."""
        ...

    def local_path(self, sha256: str) -> Path | None:
        """A local file holding the artefact, for efficient serving; None when the store is remote."""
        ...


class FolderStore:
    """A content-addressed folder (:class:`ArtefactStore`)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
        return self.root / "sha256" / sha256[:2] / f"{sha256}.tar"

    def scratch(self) -> Path:
        """A fresh path under ``<root>/tmp`` (not created)."""
        return self._tmp / f"{uuid.uuid4().hex}.part"

    def put(self, source: Path) -> Artefact:
        """Hash ``source`` and move it into place (an identical stored file is kept and ``source`` removed)."""
        artefact = sha256_file(source)
        target = self._path(artefact.sha256)
        if target.exists():
            source.unlink(missing_ok=True)
            return artefact
        target.parent.mkdir(parents=True, exist_ok=True)
        with source.open("rb") as fh:
            os.fsync(fh.fileno())
        source.chmod(0o644)
        os.replace(source, target)
        return artefact

    def has(self, sha256: str) -> bool:
        """Whether the file is there."""
        return self._path(sha256).is_file()

    def open(self, sha256: str) -> BinaryIO:
        """Open the stored file for reading."""
        return self._path(sha256).open("rb")

    def local_path(self, sha256: str) -> Path | None:
        """The stored file, or None when it is missing."""
        path = self._path(sha256)
        return path if path.is_file() else None
