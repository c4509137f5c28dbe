"""SQLModel table models of the ingest side (devices, inference records, envelopes, gaps, quarantine, events).

These classes are storage, not API schemas (the API has its own models). Every timestamp is a
float in seconds since the Unix epoch (UTC): ``received_at``/``first_seen``/``status_at`` are the
collector's clock, ``ts`` of a record or event is the device's clock.

``inference`` is the high-volume table. Its primary key is the idempotency key
``(device_id, spool_epoch, seq)``; it has no foreign key to ``device`` because PostgreSQL checks
a foreign key with a trigger per row, which costs more than the bulk write itself (devices are
never deleted; retiring one is a status). It is not partitioned yet: partitioning by time on
PostgreSQL needs the partition key (``ts``) in the primary key, which a later migration adds
together with the retention job.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlmodel import Field, SQLModel

# JSONB on PostgreSQL (indexable, compact), JSON text elsewhere.
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

ID_LEN = 64  # device ids (shared.topics)
NAME_LEN = 128  # every string of the batch envelope (shared.codec.Limits.max_string)
STATUSES = ("online", "offline", "stopped", "unknown")


class Device(SQLModel, table=True):
    """A vehicle, registered the first time any of its topics is heard from."""

    __tablename__ = "device"

    id: str = Field(primary_key=True, sa_type=sa.String(ID_LEN))
    first_seen: float = Field(sa_type=sa.Double())
    last_seen: float = Field(sa_type=sa.Double())
    status: str = Field("unknown", sa_type=sa.String(16), description="online | offline | stopped | unknown")
    status_at: float | None = Field(None, sa_type=sa.Double())
    agent_version: str | None = Field(None, sa_type=sa.String(NAME_LEN))
    model_name: str | None = Field(None, sa_type=sa.String(NAME_LEN))
    model_version: str | None = Field(None, sa_type=sa.String(NAME_LEN))
    profile: str | None = Field(None, sa_type=sa.String(NAME_LEN))
    boot_id: str | None = Field(None, sa_type=sa.String(NAME_LEN))
    spool_epoch: str | None = Field(None, sa_type=sa.String(NAME_LEN))
    spool_depth: int | None = Field(None, sa_type=sa.BigInteger())
    spool_bytes: int | None = Field(None, sa_type=sa.BigInteger())
    inference_rate: float | None = Field(None, sa_type=sa.Double())
    sensors: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    tags: list[str] = Field(default_factory=list, sa_type=JSONType)
    reported: dict[str, Any] | None = Field(None, sa_type=JSONType, description="last `reported` message")
    reported_at: float | None = Field(None, sa_type=sa.Double())
    records: int = Field(0, sa_type=sa.BigInteger(), description="inference records stored")
    declared_lost: int = Field(0, sa_type=sa.BigInteger(), description="records the device declared lost")
    retired_at: float | None = Field(None, sa_type=sa.Double(), description="set when retired (never deleted)")
    retired_by: str | None = Field(None, sa_type=sa.String(NAME_LEN))


class Inference(SQLModel, table=True):
    """One inference record. Arrays are raw little-endian bytes, as they arrived on the wire.

    ``probs`` float16 ``[classes]``; ``features`` float16 or float32 (``features_dtype`` ``<f2``
    / ``<f4``) ``[features]``; ``act_bits`` ``np.packbits(hidden > 0)``; ``act_sample`` float16
    ``[hidden]`` for the sampled records, else NULL. ``label`` NULL when unknown at capture.
    ``ts_corrected``: ``ts`` when the device clock was NTP-synced, otherwise the receive time
    minus the monotonic age of the record (``sent_mono - mono``).
    """

    __tablename__ = "inference"
    __table_args__ = (
        sa.Index("ix_inference_device_ts", "device_id", "ts_corrected"),
        sa.Index("ix_inference_model_ts", "model_version", "ts_corrected"),
        sa.Index("ix_inference_ts", "ts_corrected"),
    )

    device_id: str = Field(primary_key=True, sa_type=sa.String(ID_LEN))
    spool_epoch: str = Field(primary_key=True, sa_type=sa.String(NAME_LEN))
    seq: int = Field(primary_key=True, sa_type=sa.BigInteger(), sa_column_kwargs={"autoincrement": False})
    role: str = Field(sa_type=sa.String(16))
    model_name: str = Field(sa_type=sa.String(NAME_LEN))
    model_version: str = Field(sa_type=sa.String(NAME_LEN))
    ts: float = Field(sa_type=sa.Double())
    ts_corrected: float = Field(sa_type=sa.Double())
    received_at: float = Field(sa_type=sa.Double())
    pred: int = Field(sa_type=sa.SmallInteger())
    label: int | None = Field(None, sa_type=sa.SmallInteger())
    confidence: float = Field(sa_type=sa.REAL())
    calibrated: float = Field(sa_type=sa.REAL())
    probs: bytes = Field(sa_type=sa.LargeBinary())
    features: bytes = Field(sa_type=sa.LargeBinary())
    features_dtype: str = Field(sa_type=sa.String(4))
    act_bits: bytes = Field(sa_type=sa.LargeBinary())
    act_sample: bytes | None = Field(None, sa_type=sa.LargeBinary())
    coact: int = Field(sa_type=sa.Integer())
    latency_us: float = Field(sa_type=sa.REAL())
    sensor_flags: int = Field(sa_type=sa.Integer())
    digest: int = Field(sa_type=sa.BigInteger(), description="shared.codec.record_digests")


class IngestBatch(SQLModel, table=True):
    """The envelope of one accepted telemetry payload."""

    __tablename__ = "ingest_batch"
    __table_args__ = (
        sa.Index("ix_ingest_batch_device_received", "device_id", "received_at"),
        sa.Index("ix_ingest_batch_received", "received_at"),
    )

    id: int | None = Field(None, primary_key=True, sa_type=BigId)
    device_id: str = Field(sa_type=sa.String(ID_LEN))
    spool_epoch: str = Field(sa_type=sa.String(NAME_LEN))
    boot_id: str = Field(sa_type=sa.String(NAME_LEN))
    seq_first: int = Field(sa_type=sa.BigInteger())
    seq_last: int = Field(sa_type=sa.BigInteger())
    n_records: int = Field(sa_type=sa.Integer())
    inserted: int = Field(sa_type=sa.Integer())
    duplicates: int = Field(sa_type=sa.Integer())
    conflicts: int = Field(sa_type=sa.Integer())
    sent_at: float = Field(sa_type=sa.Double())
    sent_mono: float = Field(sa_type=sa.Double())
    clock_synced: bool = Field(sa_type=sa.Boolean())
    profile: str = Field(sa_type=sa.String(NAME_LEN))
    agent_version: str = Field(sa_type=sa.String(NAME_LEN))
    received_at: float = Field(sa_type=sa.Double())
    payload_bytes: int = Field(sa_type=sa.Integer())


class DeclaredGap(SQLModel, table=True):
    """A seq range a device declared lost (``spool_full``, ``crash``), stored once."""

    __tablename__ = "declared_gap"
    __table_args__ = (
        sa.UniqueConstraint("device_id", "spool_epoch", "seq_first", "seq_last", name="uq_declared_gap_range"),
    )

    id: int | None = Field(None, primary_key=True, sa_type=BigId)
    device_id: str = Field(sa_type=sa.String(ID_LEN))
    spool_epoch: str = Field(sa_type=sa.String(NAME_LEN))
    seq_first: int = Field(sa_type=sa.BigInteger())
    seq_last: int = Field(sa_type=sa.BigInteger())
    reason: str = Field(sa_type=sa.String(NAME_LEN))
    received_at: float = Field(sa_type=sa.Double())


class Quarantine(SQLModel, table=True):
    """An invalid payload (or the conflicting records of one), kept for inspection."""

    __tablename__ = "quarantine"
    __table_args__ = (
        sa.Index("ix_quarantine_received", "received_at"),
        sa.Index("ix_quarantine_reason_received", "reason", "received_at"),
        sa.Index("ix_quarantine_device", "device_id"),
    )

    id: int | None = Field(None, primary_key=True, sa_type=BigId)
    received_at: float = Field(sa_type=sa.Double())
    topic: str = Field(sa_type=sa.Text())
    device_id: str | None = Field(None, sa_type=sa.String(ID_LEN))
    reason: str = Field(sa_type=sa.String(64))
    detail: str = Field("", sa_type=sa.Text())
    payload: bytes = Field(sa_type=sa.LargeBinary(), description="the payload, cut at quarantine_max_payload_bytes")
    payload_bytes: int = Field(sa_type=sa.Integer(), description="size of the whole payload")
    payload_sha256: str = Field(sa_type=sa.String(64))


class DeviceEvent(SQLModel, table=True):
    """One message of a device's ``events`` topic."""

    __tablename__ = "device_event"
    __table_args__ = (
        sa.Index("ix_device_event_device_ts", "device_id", "ts"),
        sa.Index("ix_device_event_received", "received_at"),
    )

    id: int | None = Field(None, primary_key=True, sa_type=BigId)
    device_id: str = Field(sa_type=sa.String(ID_LEN))
    ts: float = Field(sa_type=sa.Double(), description="device clock")
    kind: str = Field(sa_type=sa.String(64))
    message: str = Field("", sa_type=sa.Text())
    data: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    received_at: float = Field(sa_type=sa.Double())


class MonitoringWindow(SQLModel, table=True):
    """The merged :class:`~collector.monitoring.sketches.WindowSketch` of one device, model version, role and window.

    Written by ingest in the transaction that stores the records, from the newly inserted records
    only, so it holds each record exactly once. ``window_start`` is a multiple of ``window_s``
    (collector-corrected time, seconds since the epoch).
    """

    __tablename__ = "monitoring_window"
    __table_args__ = (
        sa.Index("ix_monitoring_window_model_start", "model_name", "model_version", "window_start"),
        sa.Index("ix_monitoring_window_start", "window_start"),
    )

    device_id: str = Field(primary_key=True, sa_type=sa.String(ID_LEN))
    model_name: str = Field(primary_key=True, sa_type=sa.String(NAME_LEN))
    model_version: str = Field(primary_key=True, sa_type=sa.String(NAME_LEN))
    role: str = Field(primary_key=True, sa_type=sa.String(16))
    window_start: float = Field(primary_key=True, sa_type=sa.Double())
    window_s: float = Field(primary_key=True, sa_type=sa.Double())
    n: int = Field(0, sa_type=sa.BigInteger(), description="records merged into the sketch")
    sketch: bytes = Field(sa_type=sa.LargeBinary(), description="WindowSketch.to_bytes()")
    updated_at: float = Field(sa_type=sa.Double(), description="collector clock of the last merge")


class Label(SQLModel, table=True):
    """A late ground-truth label for one inference record, joined on the record's idempotency key.

    Labels may arrive before the record they label (a device still offline): they are kept and join
    once the record is stored. A label pushed again for the same record replaces the earlier one.
    """

    __tablename__ = "label"
    __table_args__ = (sa.Index("ix_label_received", "received_at"),)

    device_id: str = Field(primary_key=True, sa_type=sa.String(ID_LEN))
    spool_epoch: str = Field(primary_key=True, sa_type=sa.String(NAME_LEN))
    seq: int = Field(primary_key=True, sa_type=sa.BigInteger(), sa_column_kwargs={"autoincrement": False})
    label: int = Field(sa_type=sa.SmallInteger(), description="class index in the model's label list")
    received_at: float = Field(sa_type=sa.Double())
    source: str = Field("api", sa_type=sa.String(NAME_LEN), description="api, or the pushed file's name")


class Alert(SQLModel, table=True):
    """One alert: a condition that held for enough consecutive windows, until it resolves.

    ``key`` identifies the condition (kind, scope, subject, model); at most one alert per key is
    open (firing or acknowledged) at a time, which is the de-duplication.
    """

    __tablename__ = "alert"
    __table_args__ = (
        sa.Index("ix_alert_key_state", "key", "state"),
        sa.Index("ix_alert_state_fired", "state", "fired_at"),
    )

    id: int | None = Field(None, primary_key=True, sa_type=BigId)
    key: str = Field(sa_type=sa.String(512))
    kind: str = Field(sa_type=sa.String(64), description="e.g. feature_drift, confidence_drop, sequential_coact")
    scope: str = Field(sa_type=sa.String(16), description="device | group | model | fleet")
    subject: str = Field(sa_type=sa.String(NAME_LEN), description="device id, group name, model version or 'fleet'")
    model_name: str | None = Field(None, sa_type=sa.String(NAME_LEN))
    model_version: str | None = Field(None, sa_type=sa.String(NAME_LEN))
    state: str = Field(sa_type=sa.String(16), description="firing | acknowledged | resolved")
    severity: str = Field("warning", sa_type=sa.String(16), description="warning | critical")
    message: str = Field("", sa_type=sa.Text())
    details: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType, description="statistics and thresholds")
    fired_at: float = Field(sa_type=sa.Double())
    last_bad_at: float = Field(sa_type=sa.Double(), description="end of the last window the condition held in")
    resolved_at: float | None = Field(None, sa_type=sa.Double())
    acked_at: float | None = Field(None, sa_type=sa.Double())
    acked_by: str | None = Field(None, sa_type=sa.String(NAME_LEN))
    ack_note: str | None = Field(None, sa_type=sa.Text())


class AlertCondition(SQLModel, table=True):
    """Hysteresis state of one condition key, kept whether or not an alert is open."""

    __tablename__ = "alert_condition"

    key: str = Field(primary_key=True, sa_type=sa.String(512))
    bad_streak: int = Field(0, sa_type=sa.Integer(), description="consecutive windows the condition held")
    good_streak: int = Field(0, sa_type=sa.Integer(), description="consecutive windows it did not")
    last_window: float = Field(sa_type=sa.Double(), description="start of the last window evaluated")
    updated_at: float = Field(sa_type=sa.Double())


class WebhookDelivery(SQLModel, table=True):
    """One alert notification to one webhook URL, retried with backoff until delivered or given up."""

    __tablename__ = "webhook_delivery"
    __table_args__ = (sa.Index("ix_webhook_delivery_state_next", "state", "next_attempt_at"),)

    id: int | None = Field(None, primary_key=True, sa_type=BigId)
    alert_id: int = Field(sa_type=sa.BigInteger())
    event: str = Field(sa_type=sa.String(16), description="fired | acknowledged | resolved")
    url: str = Field(sa_type=sa.Text())
    payload: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    state: str = Field("pending", sa_type=sa.String(16), description="pending | delivered | failed")
    attempts: int = Field(0, sa_type=sa.Integer())
    next_attempt_at: float = Field(sa_type=sa.Double())
    last_error: str | None = Field(None, sa_type=sa.Text())
    created_at: float = Field(sa_type=sa.Double())
    delivered_at: float | None = Field(None, sa_type=sa.Double())


class SequentialAlarm(SQLModel, table=True):
    """An alarm of a per-device sequential detector (Page-Hinkley or ADWIN) raised during ingest."""

    __tablename__ = "sequential_alarm"
    __table_args__ = (
        sa.Index("ix_sequential_alarm_received", "received_at"),
        sa.Index("ix_sequential_alarm_device_ts", "device_id", "ts"),
    )

    id: int | None = Field(None, primary_key=True, sa_type=BigId)
    device_id: str = Field(sa_type=sa.String(ID_LEN))
    model_name: str = Field(sa_type=sa.String(NAME_LEN))
    model_version: str = Field(sa_type=sa.String(NAME_LEN))
    signal: str = Field(sa_type=sa.String(32), description="calibrated | coact")
    detector: str = Field(sa_type=sa.String(32), description="page_hinkley | adwin")
    spool_epoch: str = Field(sa_type=sa.String(NAME_LEN))
    seq: int = Field(sa_type=sa.BigInteger(), description="the record at which the detector alarmed")
    ts: float = Field(sa_type=sa.Double(), description="collector-corrected time of that record")
    detail: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    received_at: float = Field(sa_type=sa.Double())


# ------------------------------------------------------------------------------------ registry


class ModelVersion(SQLModel, table=True):
    """One pushed bundle version: where its re-signed tar is stored, its stage and its lineage.

    ``sha256``/``size`` are of the tar as stored and served (re-signed with the release key);
    ``manifest_sha256`` identifies the content (the manifest carries the model's hash), so a push of
    the same manifest again is recognised whoever signed it.
    """

    __tablename__ = "model_version"
    __table_args__ = (
        sa.UniqueConstraint("name", "version", name="uq_model_version_name_version"),
        sa.Index("ix_model_version_name_stage", "name", "stage"),
    )

    id: int | None = Field(None, primary_key=True, sa_type=BigId)
    name: str = Field(sa_type=sa.String(NAME_LEN))
    version: str = Field(sa_type=sa.String(NAME_LEN))
    stage: str = Field(sa_type=sa.String(16), description="candidate | production | archived")
    sha256: str = Field(sa_type=sa.String(64), description="of the stored (re-signed) tar: the content address")
    size: int = Field(sa_type=sa.BigInteger(), description="bytes of the stored tar")
    manifest_sha256: str = Field(sa_type=sa.String(64))
    model_sha256: str = Field(sa_type=sa.String(64))
    manifest: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    uploader_key_id: str = Field(sa_type=sa.String(64), description="key that signed the pushed bundle")
    release_key_id: str = Field(sa_type=sa.String(64), description="release key the stored bundle is signed with")
    dataset_version: str | None = Field(None, sa_type=sa.String(NAME_LEN))
    dataset_sha256: str | None = Field(None, sa_type=sa.String(64))
    code_version: str | None = Field(None, sa_type=sa.Text())
    parent_version: str | None = Field(None, sa_type=sa.String(NAME_LEN))
    metrics: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    created_at: float = Field(sa_type=sa.Double(), description="the manifest's created_at")
    pushed_at: float = Field(sa_type=sa.Double())
    pushed_by: str = Field(sa_type=sa.String(NAME_LEN))
    stage_changed_at: float = Field(sa_type=sa.Double())


class ModelStageChange(SQLModel, table=True):
    """One stage transition of a model version (the first row is the push: from NULL to candidate)."""

    __tablename__ = "model_stage_change"
    __table_args__ = (sa.Index("ix_model_stage_change_version", "name", "version", "at"),)

    id: int | None = Field(None, primary_key=True, sa_type=BigId)
    name: str = Field(sa_type=sa.String(NAME_LEN))
    version: str = Field(sa_type=sa.String(NAME_LEN))
    from_stage: str | None = Field(None, sa_type=sa.String(16))
    to_stage: str = Field(sa_type=sa.String(16))
    at: float = Field(sa_type=sa.Double())
    by: str = Field(sa_type=sa.String(NAME_LEN))
    note: str | None = Field(None, sa_type=sa.Text())


class ModelPin(SQLModel, table=True):
    """A version pinned for one device or one group (``scope``), whatever the stages and rollouts say."""

    __tablename__ = "model_pin"

    scope: str = Field(primary_key=True, sa_type=sa.String(16), description="device | group")
    subject: str = Field(primary_key=True, sa_type=sa.String(NAME_LEN), description="device id or group name")
    model_name: str = Field(sa_type=sa.String(NAME_LEN))
    model_version: str = Field(sa_type=sa.String(NAME_LEN))
    pinned_at: float = Field(sa_type=sa.Double())
    pinned_by: str = Field(sa_type=sa.String(NAME_LEN))
    note: str | None = Field(None, sa_type=sa.Text())


# ------------------------------------------------------------------------- groups and desired state


class DeviceGroup(SQLModel, table=True):
    """A group created explicitly (groups named only by devices' ``group:<name>`` tags have no row)."""

    __tablename__ = "device_group"

    name: str = Field(primary_key=True, sa_type=sa.String(ID_LEN))
    description: str = Field("", sa_type=sa.Text())
    priority: int = Field(0, sa_type=sa.Integer(), description="higher wins when two group pins disagree")
    created_at: float = Field(sa_type=sa.Double())
    created_by: str = Field(sa_type=sa.String(NAME_LEN))


class GroupMember(SQLModel, table=True):
    """A device assigned to a group explicitly (API or fleetctl); tags add members without rows."""

    __tablename__ = "group_member"
    __table_args__ = (sa.Index("ix_group_member_device", "device_id"),)

    group_name: str = Field(primary_key=True, sa_type=sa.String(ID_LEN))
    device_id: str = Field(primary_key=True, sa_type=sa.String(ID_LEN))
    added_at: float = Field(sa_type=sa.Double())
    added_by: str = Field(sa_type=sa.String(NAME_LEN))


class RolloutAssignment(SQLModel, table=True):
    """What a rollout wants one device to run: an active version, a shadow version, or both."""

    __tablename__ = "rollout_assignment"
    __table_args__ = (sa.Index("ix_rollout_assignment_rollout", "rollout_id"),)

    device_id: str = Field(primary_key=True, sa_type=sa.String(ID_LEN))
    rollout_id: str = Field(sa_type=sa.String(ID_LEN))
    model_name: str | None = Field(None, sa_type=sa.String(NAME_LEN))
    model_version: str | None = Field(None, sa_type=sa.String(NAME_LEN))
    shadow_name: str | None = Field(None, sa_type=sa.String(NAME_LEN))
    shadow_version: str | None = Field(None, sa_type=sa.String(NAME_LEN))
    assigned_at: float = Field(sa_type=sa.Double())


class DeviceDesired(SQLModel, table=True):
    """The desired state last resolved for a device and how far its publication got.

    ``document`` is the :class:`shared.messages.Desired` without its signature (signed when published,
    with the current release key); ``serial`` grows with every change of it. ``clear`` marks a retired
    device whose retained topics are to be emptied. Published when ``published_serial < serial``.
    """

    __tablename__ = "device_desired"

    device_id: str = Field(primary_key=True, sa_type=sa.String(ID_LEN))
    serial: int = Field(sa_type=sa.BigInteger(), sa_column_kwargs={"autoincrement": False})
    document: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    source: str = Field(sa_type=sa.String(16), description="device_pin | rollout | group_pin | production | none")
    explanation: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSONType)
    clear: bool = Field(False, sa_type=sa.Boolean())
    updated_at: float = Field(sa_type=sa.Double())
    published_serial: int | None = Field(None, sa_type=sa.BigInteger())
    published_at: float | None = Field(None, sa_type=sa.Double())
