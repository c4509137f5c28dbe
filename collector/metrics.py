"""Prometheus metrics of the collector (default registry, served at ``/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

INGEST_MESSAGES = Counter(
    "fleet_ingest_messages_total", "MQTT messages taken from the broker, by topic kind.", ["kind"]
)
INGEST_RECORDS = Counter(
    "fleet_ingest_records_total",
    "Inference records received, by outcome (inserted, duplicate, conflict).",
    ["outcome"],
)
INGEST_QUARANTINED = Counter(
    "fleet_ingest_quarantined_total", "Payloads or records put in quarantine, by reason.", ["reason"]
)
INGEST_DECLARED_LOST = Counter(
    "fleet_ingest_declared_lost_records_total", "Records devices declared lost (spool_full, crash), first report only."
)
MONITORING_UNSKETCHED = Counter(
    "fleet_monitoring_unsketched_records_total",
    "Inserted records not sketched into monitoring windows: their model version has no known bundle.",
)
INGEST_COMMITS = Counter("fleet_ingest_commits_total", "Ingest transactions committed.")
INGEST_COMMIT_FAILURES = Counter(
    "fleet_ingest_commit_failures_total", "Ingest transactions that failed (retried, messages not acknowledged)."
)
INGEST_COMMIT_SECONDS = Histogram(
    "fleet_ingest_commit_seconds",
    "Time to write and commit one group of messages.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
INGEST_GROUP_MESSAGES = Histogram(
    "fleet_ingest_group_messages",
    "MQTT messages per ingest transaction.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
INGEST_DROPPED = Counter(
    "fleet_ingest_dropped_total",
    "MQTT messages dropped before ingest, by reason (qos0: QoS 0 telemetry, which cannot be acknowledged; "
    "queue_full: a QoS 0 message while the ingest queue was full).",
    ["reason"],
)
INGEST_FORCED_RECONNECTS = Counter(
    "fleet_ingest_forced_reconnects_total",
    "Broker sessions restarted after an unexpected ingest failure, so the broker redelivers what was not acknowledged.",
)
INGEST_QUEUE_DEPTH = Gauge("fleet_ingest_queue_depth", "Messages received and not yet committed.")
MQTT_CONNECTED = Gauge("fleet_mqtt_connected", "1 while the collector's MQTT client is connected.")

# Late labels (collector/labels.py, POST /api/v1/labels).
LABELS_RECEIVED = Counter("fleet_labels_received_total", "Late labels received in pushes within the size limits.")
LABELS_STORED = Counter(
    "fleet_labels_stored_total", "Late labels stored, by outcome (inserted, replaced an earlier label).", ["outcome"]
)
LABELS_REJECTED = Counter(
    "fleet_labels_rejected_total",
    "Late labels rejected one by one, by reason (bad_seq, unknown_class, ambiguous_class_name, ...).",
    ["reason"],
)
LABELS_PUSHES_REJECTED = Counter(
    "fleet_labels_pushes_rejected_total",
    "Whole label pushes refused, by reason (body_too_large, too_many_items, bad_body).",
    ["reason"],
)

# Alerts (collector.alerts): label values are alert kinds, severities, outcomes and model versions, never devices.
ALERTS_OPEN = Gauge(
    "fleet_alerts_open", "Open alerts (firing or acknowledged), by kind and severity.", ["kind", "severity"]
)
ALERTS_FIRED = Counter("fleet_alerts_fired_total", "Alerts opened, by kind and severity.", ["kind", "severity"])
ALERT_WINDOWS_EVALUATED = Counter(
    "fleet_alert_windows_evaluated_total", "Closed monitoring windows the alert engine evaluated."
)
ALERT_EVALUATION_FAILURES = Counter(
    "fleet_alert_evaluation_failures_total", "Alert evaluations that failed (retried at the next run)."
)
ALERT_WEBHOOK_DELIVERIES = Counter(
    "fleet_alert_webhook_deliveries_total",
    "Webhook delivery attempts, by outcome (delivered; retry: failed, tried again later; failed: given up).",
    ["outcome"],
)
MODEL_DRIFT_SCORE = Gauge(
    "fleet_model_drift_score",
    "Fleet-wide drift score of the last evaluated window: the largest PSI over tested input features.",
    ["model_name", "model_version"],
)
MODEL_EXPECTED_ACCURACY = Gauge(
    "fleet_model_expected_accuracy",
    "Fleet-wide label-free expected accuracy of the last evaluated window (mean calibrated confidence).",
    ["model_name", "model_version"],
)

# Data quality and sequential detectors at ingest (collector.monitoring.windows / .streams).
MONITORING_UNKNOWN_PROFILE = Counter(
    "fleet_monitoring_unknown_profile_records_total",
    "Inserted records sketched without range checks: their batch names a hardware profile the collector has "
    "not loaded (monitoring_profiles).",
)
SEQUENTIAL_ALARMS = Counter(
    "fleet_monitoring_sequential_alarms_total",
    "Sequential detector alarms stored in sequential_alarm, by signal (calibrated: confidence drop; coact: rare "
    "co-activation rise).",
    ["signal"],
)
SEQUENTIAL_STALE = Counter(
    "fleet_monitoring_sequential_stale_records_total",
    "Inserted records not fed to a sequential detector: older than their device's stream after it moved to another "
    "spool epoch or model (a late re-send).",
)
SEQUENTIAL_STREAMS = Gauge("fleet_monitoring_sequential_devices", "Devices whose sequential detector streams are live.")

# Model registry (collector.registry) and desired states (collector.fleet).
REGISTRY_PUSHES = Counter(
    "fleet_registry_pushes_total",
    "Bundle pushes, by outcome (stored: a new version; identical: the same content again; rejected).",
    ["outcome"],
)
REGISTRY_REJECTIONS = Counter(
    "fleet_registry_push_rejections_total",
    "Bundle pushes refused, by reason (too_large, empty, bad_archive, unsigned, unknown_key, bad_signature, "
    "hash_mismatch, bad_manifest, bad_model, bad_tensors, golden_mismatch, version_conflict, incomplete, ...).",
    ["reason"],
)
REGISTRY_DOWNLOADS = Counter(
    "fleet_registry_downloads_total", "Bundle download requests, by kind (full, range).", ["kind"]
)
DESIRED_PUBLISHED = Counter(
    "fleet_desired_published_total",
    "Desired-state publications confirmed by the broker, by kind (desired: a signed state; cleared: the retained "
    "topics of a retired device emptied).",
    ["kind"],
)
DESIRED_PUBLISH_FAILURES = Counter(
    "fleet_desired_publish_failures_total",
    "Desired-state publications not confirmed (retried at the next pass), by reason (not_connected, no_release_key, "
    "timeout, error).",
    ["reason"],
)
DESIRED_PENDING = Gauge("fleet_desired_pending", "Devices whose current desired state is not yet published.")
DEVICES_RETIRED = Counter("fleet_devices_retired_total", "Devices retired.")
