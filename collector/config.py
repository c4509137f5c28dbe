"""Collector settings: defaults, then a YAML ``--config`` file, then ``FLEET_*`` environment variables.

Environment variables win over the file (a deployment overrides one value without editing the
file). Unknown keys in the file are an error, so a typo fails loudly instead of being ignored.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class ConfigError(ValueError):
    """A configuration file that cannot be read or does not validate."""


class _YamlSource(PydanticBaseSettingsSource):
    """Values from a YAML mapping, below the environment in priority."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Return the file's value for one field (unused: ``__call__`` hands over the whole mapping)."""
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        # Every key goes through, known or not, so that extra="forbid" reports typos.
        return dict(self._data)


class Settings(BaseSettings):
    """Everything the collector process needs to know. Every field can be set as ``FLEET_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="FLEET_", extra="forbid", validate_default=True)

    data_dir: Path = Field(
        Path("var"), description="Folder for the SQLite database, artefacts and other local state (created on use)."
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the store: sqlite:///PATH (default <data_dir>/fleet.db) or "
        "postgresql://user:pass@host/db (psycopg 3 driver; postgresql+psycopg:// also accepted).",
    )
    mqtt_url: str = Field(
        "mqtt://127.0.0.1:1883",
        description="Broker URL: mqtt://host:port or mqtts://host:port (TLS); user:password@ may be given here too.",
    )
    mqtt_protocol: Literal["5", "3.1.1"] = Field(
        "5",
        description="MQTT protocol version. 5 for Mosquitto and clusters (shared subscriptions possible); "
        "3.1.1 for the demo's embedded amqtt broker.",
    )
    mqtt_client_id: str = Field(
        "fleet-collector",
        min_length=1,
        max_length=64,
        description="MQTT client id. Keep it stable: the broker keeps the persistent session (queued "
        "messages while the collector is down) under this id. Give every replica its own.",
    )
    mqtt_shared_subscription: bool = Field(
        False,
        description="Subscribe with $share/collectors/... so several collector replicas share the load (MQTT 5 only).",
    )
    mqtt_username: str | None = Field(None, description="MQTT user name (overrides one in mqtt_url).")
    mqtt_password: str | None = Field(None, description="MQTT password (overrides one in mqtt_url).")
    mqtt_keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive interval in seconds.")
    mqtt_session_expiry_s: int = Field(
        7 * 24 * 3600,
        ge=1,
        description="MQTT 5 session expiry: how long the broker keeps queuing for a collector that is down.",
    )
    api_token: str | None = Field(
        None, description="Bearer token the HTTP API requires; None leaves the API open (loopback and demo only)."
    )
    ingest_max_batch_messages: int = Field(
        100,
        ge=1,
        le=10_000,
        description="Most MQTT messages written in one transaction. Keep it below the broker's "
        "max_inflight_messages (200 in collector/deploy/mosquitto.conf), or the broker stops sending "
        "until the commit and the pipeline stalls.",
    )
    ingest_max_batch_records: int = Field(
        50_000,
        ge=1,
        le=1_000_000,
        description="Most inference records written in one transaction (a group closes when it reaches this): "
        "bounds the delay before the first ack of a group and the memory it holds.",
    )
    ingest_max_delay_ms: int = Field(
        20,
        ge=0,
        le=10_000,
        description="Longest wait for more messages after the first of a group before it is committed.",
    )
    ingest_max_queued_bytes: int = Field(
        64 * 1024 * 1024,
        ge=8 * 1024 * 1024,
        le=4 * 1024 * 1024 * 1024,
        description="Most payload bytes received and waiting for the decoder. QoS 0 messages beyond it are "
        "dropped and counted (QoS 0 telemetry always is: it cannot be acknowledged). QoS 1 messages are "
        "bounded by the broker's max_inflight_messages instead, and only logged when over it.",
    )
    quarantine_max_payload_bytes: int = Field(
        65_536,
        ge=0,
        le=4 * 1024 * 1024,
        description="Bytes of an invalid payload kept in the quarantine table (its size and sha256 are always kept). "
        "A valid payload the database refused (store_failed) is kept whole.",
    )
    monitoring_enabled: bool = Field(
        True, description="Sketch newly ingested records into per-window monitoring histograms (monitoring_window)."
    )
    monitoring_bundles: list[Path] = Field(
        default_factory=list,
        description="Model bundles whose reference bins ingest sketches against (as a JSON array in "
        "FLEET_MONITORING_BUNDLES). Records of other model versions are counted, not sketched.",
    )
    monitoring_trusted_keys: list[Path] = Field(
        default_factory=list,
        description="Public key files the monitoring bundles' signatures are checked against; without any, "
        "no bundle is loaded.",
    )
    monitoring_window_s: float = Field(900.0, ge=1, description="Length of a monitoring window in seconds.")
    monitoring_fdr_q: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="False discovery rate of the drift tests (Benjamini-Hochberg over features, model signals and, "
        "per device, devices).",
    )
    monitoring_min_records: int = Field(
        100,
        ge=2,
        description="Fewest records a drift test or data-quality rate is computed on; below it the answer is "
        "not_enough_data.",
    )
    monitoring_min_effective: float = Field(
        20.0,
        ge=0,
        description="Fewest effective records (records discounted for their autocorrelation and time span) a drift "
        "test is computed on; below it the answer is not_enough_data.",
    )
    monitoring_accuracy_level: float = Field(
        0.95, gt=0, lt=1, description="Coverage of the expected-accuracy (Poisson-binomial) and realized intervals."
    )
    monitoring_region_alpha: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="Level of the in-reference-region test that marks the expected accuracy unreliable.",
    )
    monitoring_max_missing_rate: float = Field(
        0.05, ge=0, le=1, description="Share of missing (NaN) values of a feature above which data quality is bad."
    )
    monitoring_max_out_of_range_rate: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Share of a feature's values outside the hardware profile's range above which data quality is bad.",
    )
    monitoring_max_flagged_rate: float = Field(
        0.05, ge=0, le=1, description="Share of records with any sensor flag set above which data quality is bad."
    )
    monitoring_max_seq_gap_rate: float = Field(
        0.01, ge=0, le=1, description="Share of seqs missing between received records above which data quality is bad."
    )
    monitoring_max_clock_skew_s: float = Field(
        30.0,
        gt=0,
        description="Largest distance (s) between a device's wall clock and the collector's estimate before "
        "data quality is bad.",
    )
    monitoring_max_delivery_delay_s: float = Field(
        900.0,
        gt=0,
        description="Mean delay (s) from a record's time to its arrival above which data quality is bad (records "
        "later than a window reach its status after it was evaluated).",
    )
    alert_jobs_enabled: bool = Field(
        True,
        description="Run the background jobs in the collector process: alert evaluation after each monitoring "
        "window closes, webhook delivery and the daily roll-up of monitoring windows. Turn off on API-only replicas.",
    )
    alert_fire_windows: int = Field(
        2, ge=1, le=100, description="Consecutive bad windows after which a condition fires an alert."
    )
    alert_resolve_windows: int = Field(
        3, ge=1, le=100, description="Consecutive good windows after which an open alert resolves."
    )
    alert_grace_s: float = Field(
        30.0,
        ge=0,
        description="Seconds after a window's end before it is evaluated, so that late records land in it first "
        "(records arriving later still count for drift status, not for alerts).",
    )
    alert_max_catchup_windows: int = Field(
        96,
        ge=1,
        description="Most closed windows evaluated when the engine starts from scratch or after a long stop; "
        "older ones are skipped (default: one day of 15-minute windows).",
    )
    alert_min_expected_accuracy: float = Field(
        0.6,
        ge=0,
        le=1,
        description="Label-free expected accuracy below which estimated_accuracy is bad (critical when the whole "
        "interval lies below it).",
    )
    alert_accuracy_margin: float = Field(
        0.05,
        ge=0,
        le=1,
        description="estimated_accuracy is also bad when the upper bound of its interval lies below the model's "
        "reference (held-out test) accuracy minus this margin.",
    )
    alert_critical_drift_share: float = Field(
        0.5, ge=0, le=1, description="Input drift is critical when at least this share of the tested features drift."
    )
    alert_groups: list[str] = Field(
        default_factory=list,
        description="Device groups (fleetctl groups: members assigned or tagged group:<name>) also alerted on as a "
        "whole, per model version: drift and accuracy of the group's merged window (as a JSON array in "
        "FLEET_ALERT_GROUPS).",
    )
    alert_webhooks: list[str] = Field(
        default_factory=list,
        description="URLs that receive a JSON POST when an alert fires, escalates, is acknowledged or resolves "
        "(as a JSON array in FLEET_ALERT_WEBHOOKS).",
    )
    alert_webhook_max_attempts: int = Field(
        8, ge=1, le=100, description="Delivery attempts per webhook notification before it is given up."
    )
    alert_webhook_backoff_s: float = Field(
        5.0,
        gt=0,
        description="Wait before the second delivery attempt; doubles after every failure (exponential backoff).",
    )
    alert_webhook_max_backoff_s: float = Field(3600.0, gt=0, description="Longest wait between two delivery attempts.")
    alert_webhook_timeout_s: float = Field(10.0, gt=0, le=300, description="HTTP timeout of one delivery attempt.")
    alert_webhook_poll_s: float = Field(
        5.0, gt=0, description="How often the delivery job looks for notifications that are due."
    )

    @field_validator("alert_webhooks")
    @classmethod
    def _check_webhooks(cls, value: list[str]) -> list[str]:
        bad = [url for url in value if not url.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"webhook URLs must start with http:// or https://: {bad}")
        return value

    monitoring_profiles: list[Path] | None = Field(
        None,
        description="Hardware profile YAML files, or folders of them, that ingest checks feature values against "
        "(the profile a batch names; as a JSON array in FLEET_MONITORING_PROFILES). Default (unset): the "
        "repository's firmware_configs/ next to the package, when it exists. Records naming an unknown profile "
        "are counted and stored without range checks.",
    )
    monitoring_sequential_enabled: bool = Field(
        True,
        description="Run per-device sequential detectors (calibrated confidence drop, rare co-activation rise) "
        "over newly ingested records and store their alarms in sequential_alarm (with monitoring_enabled).",
    )
    monitoring_sequential_method: Literal["page_hinkley", "adwin"] = Field(
        "page_hinkley", description="Sequential detector: page_hinkley (vectorised, the default) or adwin (river)."
    )
    monitoring_sequential_calibrated_threshold: float = Field(
        10.0,
        gt=0,
        description="Page-Hinkley threshold (lambda) on calibrated confidence: higher means fewer, later alarms.",
    )
    monitoring_sequential_calibrated_delta: float = Field(
        0.02, ge=0, description="Page-Hinkley tolerated change (delta) of calibrated confidence."
    )
    monitoring_sequential_coact_threshold: float = Field(
        20.0, gt=0, description="Page-Hinkley threshold on the rare co-activation count divided by its reference p99."
    )
    monitoring_sequential_coact_delta: float = Field(
        0.05, ge=0, description="Page-Hinkley tolerated change of the rare co-activation count (over its p99)."
    )
    monitoring_sequential_min_instances: int = Field(
        30, ge=1, description="Records a Page-Hinkley stream sees (after a start or an alarm) before it may alarm."
    )
    monitoring_sequential_adwin_delta: float = Field(
        0.002, gt=0, lt=1, description="ADWIN confidence (with monitoring_sequential_method adwin)."
    )
    monitoring_sequential_idle_s: float = Field(
        6 * 3600.0, gt=0, description="Seconds without records after which a device's detector stream is forgotten."
    )
    monitoring_sequential_max_devices: int = Field(
        25_000, ge=1, description="Most devices whose detector streams are kept in memory (least recent dropped)."
    )
    release_key: Path | None = Field(
        None,
        description="Ed25519 private key (PEM) of the collector's release key: every stored bundle is re-signed with "
        "it and every desired state is signed with it. Without one (and without registry_dev_key) pushes are refused "
        "with no_release_key and no desired state is published.",
    )
    release_public_keys: list[Path] = Field(
        default_factory=list,
        description="Public key files of every release key devices may trust (the current one is added from "
        "release_key): published at GET /api/v1/models/keys, accepted on pushes. To rotate: list the new key here, "
        "pin it on the devices beside the old one, then make it release_key (as a JSON array in "
        "FLEET_RELEASE_PUBLIC_KEYS).",
    )
    registry_upload_keys: list[Path] = Field(
        default_factory=list,
        description="Public key files of the signers whose bundles a push accepts (trainers, CI), besides the release "
        "keys (as a JSON array in FLEET_REGISTRY_UPLOAD_KEYS).",
    )
    registry_dev_key: bool = Field(
        False,
        description="Development and demo only: also accept pushes signed by the repository's development key "
        "(collector/training/dev-release-key.pem) and, without release_key, use it as the release key.",
    )
    registry_max_upload_bytes: int = Field(
        96 * 1024 * 1024,
        ge=1024,
        le=1024 * 1024 * 1024,
        description="Largest bundle .tar a push may send (bytes); a larger body is refused with 413 (too_large) "
        "before it is stored.",
    )
    artefact_dir: Path | None = Field(
        None,
        description="Folder of the content-addressed artefact store (bundles by sha256); default <data_dir>/artefacts.",
    )
    public_url: str | None = Field(
        None,
        description="Base URL devices reach this collector's API at (http:// or https://), for the artefact URLs of "
        "desired states; default http://<http_host>:<http_port>.",
    )
    desired_enabled: bool = Field(
        True,
        description="Publish desired states (retained, on fleet/v1/<id>/desired) from this process, with ingest's "
        "MQTT connection. Keep it on in exactly one replica.",
    )
    desired_reconcile_s: float = Field(
        15.0,
        gt=0,
        description="How often every device's desired state is recomputed (group tags from status, new devices) and "
        "changes not yet published are published; API changes are published at once.",
    )
    auto_migrate: bool = Field(True, description="Upgrade the database schema to the newest migration at start.")
    http_host: str = Field("127.0.0.1", description="Address the HTTP API and dashboard listen on.")
    http_port: int = Field(8000, ge=1, le=65535, description="Port the HTTP API and dashboard listen on.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Logging level.")

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/") if value is not None else None

    @field_validator("mqtt_protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, value: Any) -> Any:
        # YAML reads `mqtt_protocol: 5` as an integer.
        return str(value) if isinstance(value, int | float) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("mqtt_url")
    @classmethod
    def _check_mqtt_url(cls, value: str) -> str:
        if not value.startswith(("mqtt://", "mqtts://", "tcp://", "ssl://")):
            raise ValueError("must start with mqtt:// or mqtts://")
        return value

    @model_validator(mode="after")
    def _default_database(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'fleet.db'}"
        return self

    @property
    def artefacts(self) -> Path:
        """The artefact store's folder."""
        return self.artefact_dir if self.artefact_dir is not None else self.data_dir / "artefacts"

    @property
    def base_url(self) -> str:
        """The collector's public base URL (no trailing slash)."""
        return self.public_url or f"http://{self.http_host}:{self.http_port}"

    @property
    def database(self) -> str:
        """The database URL (always set after validation)."""
        assert self.database_url is not None
        return self.database_url

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Explicit arguments, then environment, then the YAML file (when loading one)."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if _FILE_DATA:
            sources.append(_YamlSource(settings_cls, _FILE_DATA[-1]))
        sources.append(file_secret_settings)
        return tuple(sources)


# The YAML mapping being loaded, handed to settings_customise_sources (a classmethod without arguments).
_FILE_DATA: list[dict[str, Any]] = []


def load_settings(config_path: str | Path | None = None) -> Settings:
    """Settings from defaults, the optional YAML file and the environment; :class:`ConfigError` if invalid."""
    if config_path is None:
        try:
            return Settings()
        except ValidationError as exc:
            raise ConfigError(f"invalid FLEET_* settings: {exc}") from None
    path = Path(config_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"config file {path} must be a mapping of setting names to values")
    _FILE_DATA.append(data)
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(f"config file {path} (or FLEET_* environment) is invalid: {exc}") from None
    finally:
        _FILE_DATA.pop()


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings from the environment (cached; tests call ``get_settings.cache_clear()``)."""
    return load_settings(None)
