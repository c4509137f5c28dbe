"""JSON messages on the ``status``, ``events``, ``reported`` and ``ack`` topics."""

from __future__ import annotations

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


class Ack(_Message):
    """Published by the collector on ``ack`` after a commit: what is safe to delete from the spool."""

    spool_epoch: str
    ranges: list[tuple[int, int]] = Field(description="inclusive seq ranges committed (new or duplicate)")
    gaps: list[tuple[int, int]] = Field(default_factory=list, description="declared gaps recorded")
    quarantined: bool = Field(False, description="the payload was invalid; stored in quarantine, do not resend")
    reason: str | None = None
