"""JSON messages on the ``status``, ``events``, ``reported``, ``ack`` and ``desired`` topics."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.update import UpdateReport

MAX_MESSAGE_BYTES = 64 * 1024


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRef(_Message):
    """A model by name and version."""

    name: str
    version: str


class SensorHealth(_Message):
    """Health of one sensor."""

    state: Literal["ok", "degraded", "failed"] = "ok"
    reason: str | None = None


class Status(_Message):
    """Retained on ``status``; the broker publishes ``{"state": "offline"}`` as the last will."""

    state: Literal["online", "offline", "stopped"]
    ts: float | None = None
    agent_version: str | None = None
    boot_id: str | None = None
    spool_epoch: str | None = None
    profile: str | None = None
    model: ModelRef | None = None
    spool_depth: int | None = None
    spool_bytes: int | None = None
    inference_rate: float | None = None
    sensors: dict[str, SensorHealth] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)


class DeviceEvent(_Message):
    """One entry on ``events``: a sensor fault, a spool loss, an update transition..."""

    kind: str = Field(min_length=1, max_length=64)
    ts: float
    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


class Reported(_Message):
    """Retained on ``reported``: what the device runs and where its update is."""

    model: ModelRef | None = None
    update: UpdateReport = Field(default_factory=UpdateReport)
    model_sha256: str | None = Field(None, description="SHA-256 of the running model's bundle .tar")
    shadow: ModelRef | None = Field(None, description="the model running in shadow, if any")
    shadow_sha256: str | None = None
    previous: ModelRef | None = Field(None, description="the model kept on disk until the update commits")
    desired_serial: int | None = Field(None, description="the highest desired serial the device accepted")


class Ack(_Message):
    """Published by the collector on ``ack`` after a commit: what is safe to delete from the spool."""

    spool_epoch: str
    ranges: list[tuple[int, int]] = Field(description="inclusive seq ranges committed (new or duplicate)")
    gaps: list[tuple[int, int]] = Field(default_factory=list, description="declared gaps recorded")
    quarantined: bool = Field(False, description="the payload was invalid; stored in quarantine, do not resend")
    reason: str | None = None


# ----------------------------------------------------------------------------------- desired state

SHA256_PATTERN = r"^[0-9a-f]{64}$"


class DesiredArtefact(_Message):
    """One model bundle a device should run: which, where to fetch it, its size and hash."""

    name: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=64)
    sha256: str = Field(pattern=SHA256_PATTERN, description="SHA-256 of the bundle .tar exactly as served")
    size: int = Field(gt=0, description="bytes of the bundle .tar")
    url: str = Field(min_length=1, max_length=2048, description="absolute http(s) URL; Range requests are honoured")


class Desired(_Message):
    """Retained on ``desired``: what the collector wants the device to run, signed by a release key.

    ``serial`` grows with every change of one device's desired state: a device never acts on a serial
    lower than the last one it accepted (a replayed old message cannot roll it back). ``model`` is the
    active model; ``None`` means "keep what you run". ``shadow`` is a candidate to run beside the active
    model on the same inputs (its records carry role ``shadow``), ``None`` stops any shadow. ``signature``
    is :func:`shared.signing.sign` over :meth:`signed_bytes` (every other field, canonical JSON).
    """

    serial: int = Field(ge=0)
    issued_at: float
    model: DesiredArtefact | None = None
    shadow: DesiredArtefact | None = None
    rollout_id: str | None = Field(None, max_length=64)
    settings: dict[str, Any] = Field(default_factory=dict, description="runtime settings (reserved)")
    signature: str | None = Field(None, description="signature file JSON (shared.signing) over signed_bytes()")

    def signed_bytes(self) -> bytes:
        """The bytes the signature covers: every field but ``signature``, as canonical JSON."""
        doc = self.model_dump(mode="json", exclude={"signature"})
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
