"""API shapes. Table models (``collector.db.models``) are storage; these are what clients see."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """Every list endpoint: ``{"items": [...], "total": N, "next": cursor-or-null}``."""

    items: list[T]
    total: int = Field(description="items matching the filters, over all pages")
    next: str | None = Field(None, description="pass as ?cursor= for the next page; null on the last")


class Count(BaseModel):
    """``{"count": N}``."""

    count: int


class Health(BaseModel):
    """Liveness and the state of the collector's parts."""

    status: str = Field(description="ok when the database answers; degraded when MQTT is down")
    version: str
    database: str
    mqtt: str = Field(description="connected | disconnected | disabled")
    ingest: dict[str, Any] = Field(default_factory=dict, description="ingest counters since start")


class DevicePublic(BaseModel):
    """A vehicle as the collector knows it."""

    model_config = ConfigDict(from_attributes=True, protected_namespaces=())

    id: str
    status: str
    status_at: float | None
    first_seen: float
    last_seen: float
    agent_version: str | None
    model_name: str | None
    model_version: str | None
    profile: str | None
    boot_id: str | None
    spool_epoch: str | None
    spool_depth: int | None
    spool_bytes: int | None
    inference_rate: float | None
    sensors: dict[str, Any]
    tags: list[str]
    records: int
    declared_lost: int
    retired_at: float | None = Field(None, description="when the device was retired (null: in service)")
    retired_by: str | None = None


class InferencePublic(BaseModel):
    """One stored inference record with its arrays decoded."""

    model_config = ConfigDict(protected_namespaces=())

    device_id: str
    spool_epoch: str
    seq: int
    role: str
    model_name: str
    model_version: str
    ts: float = Field(description="device wall clock (s since the epoch)")
    ts_corrected: float = Field(description="ts, or the collector's estimate when the device clock was not synced")
    received_at: float
    pred: int
    label: int | None
    confidence: float
    calibrated: float
    probs: list[float]
    features: list[float | None] = Field(description="physical units; null where a sensor delivered nothing")
    act_bits: str = Field(description="hex of np.packbits(hidden > 0)")
    act_sample: list[float] | None = Field(description="float hidden activations when this record was sampled")
    coact: int
    latency_us: float
    sensor_flags: int


class QuarantinePublic(BaseModel):
    """A refused payload, without its bytes."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    received_at: float
    topic: str
    device_id: str | None
    reason: str
    detail: str
    payload_bytes: int
    payload_sha256: str


class QuarantineDetail(QuarantinePublic):
    """A refused payload with the stored bytes (base64; cut at the collector's size cap)."""

    payload_b64: str
    payload_stored_bytes: int
