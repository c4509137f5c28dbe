"""Agent configuration: strict pydantic sections loaded from YAML, then environment overrides.

Every section forbids unknown keys, so a typo in the YAML fails loudly with the file, the field
and the problem. After the file, environment variables override single fields:

* ``EDGE_AGENT_<SECTION>__<FIELD>`` sets ``<section>.<field>`` (for example
  ``EDGE_AGENT_MQTT__URL=mqtt://broker:1883`` or ``EDGE_AGENT_SENSORS__RATE_HZ=5``);
* ``EDGE_AGENT_<FIELD>`` sets a top-level field (``EDGE_AGENT_STATE_DIR=/var/lib/edge-agent``).

Values are parsed as YAML scalars, so ``5`` is a number and ``[a, b]`` a list. An
``EDGE_AGENT_`` variable that names no field is an error, like an unknown key in the file.
The MQTT password may also come from ``EDGE_AGENT_MQTT__PASSWORD`` or from a systemd
credential (``LoadCredential=mqtt-password:...``, read from ``$CREDENTIALS_DIRECTORY``).
Relative paths in a file are relative to the folder of that file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from edge_agent.updater.conditions import parse_window
from shared.codec import DEFAULT_LIMITS
from shared.profile import HardwareProfile, ProfileError, find_profile
from shared.topics import valid_device_id

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_BUNDLE = PACKAGE_DIR / "bundles" / "cabin-v1.tar"
DEFAULT_KEY = PACKAGE_DIR / "keys" / "dev-release.pub"
ENV_PREFIX = "EDGE_AGENT_"
PASSWORD_CREDENTIAL = "mqtt-password"
PROFILE_DIRS = (Path("/etc/edge-agent/profiles"), PACKAGE_DIR.parent / "firmware_configs")


class ConfigError(ValueError):
    """A configuration that cannot be used: names the file, the field and the problem."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _default_device_id() -> str:
    # A sanitised host name is a sensible id for a vehicle unit with one agent.
    host = re.sub(r"[^A-Za-z0-9_.\-]", "-", socket.gethostname())[:64].lstrip("-_.")
    return host if valid_device_id(host) else "edge-device"


class DeviceSection(_Section):
    """Who this device is."""

    id: str = Field(default_factory=_default_device_id, description="device id, one MQTT topic level")
    profile: str = Field("sim-v1", description="hardware profile name (firmware_configs/<name>.yaml)")
    profile_dirs: list[Path] = Field(
        default_factory=list,
        description="folders searched for <profile>.yaml before /etc/edge-agent/profiles and firmware_configs/",
    )
    tags: list[str] = Field(default_factory=list, description="free-form tags reported in status")

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        if not valid_device_id(value):
            raise ValueError("must be 1-64 letters, digits, '_', '.', '-' starting with a letter or digit")
        return value


class MqttSection(_Section):
    """Connection to the broker."""

    url: str = Field("mqtt://127.0.0.1:1883", description="mqtt://host:port (mqtts:// for TLS)")
    protocol: Literal["3.1.1", "5"] = Field("3.1.1", description="MQTT protocol version")
    keepalive: int = Field(30, ge=5, le=3600, description="keepalive interval in seconds")
    username: str | None = Field(None, description="user name, if the broker requires one")
    password: SecretStr | None = Field(
        None, description="password; better from EDGE_AGENT_MQTT__PASSWORD or a systemd credential"
    )
    client_id: str | None = Field(None, description="MQTT client id; default 'edge-<device id>'")
    reconnect_min_delay_s: float = Field(1.0, gt=0, le=60, description="first reconnect delay")
    reconnect_max_delay_s: float = Field(60.0, gt=0, le=3600, description="reconnect backoff cap")

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError("must look like mqtt://host:port")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError("port must be a number 1-65535") from None
        return value

    @model_validator(mode="after")
    def _delays(self) -> MqttSection:
        if self.reconnect_max_delay_s < self.reconnect_min_delay_s:
            raise ValueError("reconnect_max_delay_s must be >= reconnect_min_delay_s")
        return self

    @property
    def host(self) -> str:
        """Broker host name."""
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        """Broker port (1883, or 8883 for mqtts, when the URL has none)."""
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        """Whether the URL asks for TLS."""
        return urlsplit(self.url).scheme == "mqtts"


class ModelSection(_Section):
    """The model bundle and how to run it."""

    bundle: Path = Field(DEFAULT_BUNDLE, description="bundle .tar or folder (default: the packaged reference)")
    trusted_keys: list[Path] = Field(
        default_factory=lambda: [DEFAULT_KEY], description="pinned Ed25519 release public keys"
    )
    backend: str | None = Field(
        None, description="preferred TFLite module prefix: tflite_runtime, ai_edge_litert or tensorflow"
    )
    threads: int = Field(1, ge=1, le=16, description="interpreter threads (1 leaves the other cores alone)")


class SensorsSection(_Section):
    """Where observations come from."""

    backend: Literal["simulated", "replay", "hardware"] = Field(
        "simulated", description="sensor backend (hardware: the profile's BME680, PMS5003 and microphone)"
    )
    scenario: Path | None = Field(None, description="simulated: scenario YAML (default: the built-in scenario)")
    seed: int = Field(0, description="simulated: random seed")
    rate_hz: float = Field(10.0, gt=0, le=1000, description="inferences per second")
    sample_rate: int = Field(16_000, ge=8000, le=96_000, description="audio sample rate in Hz")
    replay_csv: Path | None = Field(None, description="replay: feature CSV (columns named as the model's features)")
    label_column: str | None = Field(None, description="replay: column with the ground-truth label")

    @model_validator(mode="after")
    def _replay_needs_csv(self) -> SensorsSection:
        if self.backend == "replay" and self.replay_csv is None:
            raise ValueError("backend 'replay' needs replay_csv")
        return self


class SpoolSection(_Section):
    """The durable outbox."""

    path: Path | None = Field(None, description="SQLite file; default <state_dir>/spool.db")
    max_bytes: int = Field(256 * 1024 * 1024, ge=64 * 1024, description="bound on stored records; oldest dropped")
    commit_interval_s: float = Field(1.0, gt=0, le=1.0, description="group commit at least this often")
    commit_max_records: int = Field(1000, ge=1, le=100_000, description="commit early when this many wait")


class UplinkSection(_Section):
    """Batching and acknowledgement of telemetry."""

    batch_max_records: int = Field(
        500, ge=1, le=DEFAULT_LIMITS.max_records, description="send when this many records wait"
    )
    batch_max_age_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="send when the oldest waiting record is older (bigger batches cost fewer bytes per record)",
    )
    ack_timeout_s: float = Field(30.0, gt=0, le=3600, description="re-send a batch not acknowledged by then")
    max_inflight_batches: int = Field(8, ge=1, le=1000, description="unacknowledged batches at most")
    status_interval_s: float = Field(30.0, gt=0, le=3600, description="re-publish the retained status this often")
    compression_level: int = Field(
        19, ge=1, le=22, description="zstd level of live batches (a few µs per record buys ~10% fewer bytes)"
    )
    catchup_compression_level: int = Field(
        3, ge=1, le=22, description="zstd level while a backlog of more than ten full batches drains (throughput)"
    )


class ActivationsSection(_Section):
    """Hidden-activation capture."""

    sample_fraction: float = Field(0.05, ge=0.0, le=1.0, description="fraction of records with float16 activations")


class LabelsSection(_Section):
    """Late labels: ground truth written later, for `fleetctl labels push`."""

    late_label_fraction: float = Field(0.0, ge=0.0, le=1.0, description="fraction of records with truth to write")
    late_labels_path: Path | None = Field(None, description="CSV to append to; default <state_dir>/late_labels.csv")


class UpdatesSection(_Section):
    """Model updates: when the device may start one, how it downloads, watches and rolls back."""

    enabled: bool = Field(True, description="act on the collector's desired state (`model install` works regardless)")
    parked: bool = Field(
        True, description="whether the vehicle counts as parked when no parked_flag_file is set (simulated, replay)"
    )
    parked_flag_file: Path | None = Field(
        None, description="the vehicle is parked while this file exists (written by the ignition/CAN integration)"
    )
    depot_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs of depot networks: the address the broker is reached from must be in one (empty: any)",
    )
    depot_flag_file: Path | None = Field(
        None, description="on a depot network while this file exists (e.g. a NetworkManager hook on the depot SSID)"
    )
    windows: list[str] = Field(
        default_factory=list,
        description="local-time windows HH:MM-HH:MM (may cross midnight) when an update may start (empty: any time)",
    )
    retry_interval_s: float = Field(60.0, gt=0, le=86_400, description="re-check the conditions of a deferred update")
    download_timeout_s: float = Field(30.0, gt=0, le=600, description="connect and read timeout of a download")
    download_retries: int = Field(5, ge=0, le=100, description="download attempts in a row without progress")
    download_backoff_s: float = Field(1.0, gt=0, le=60, description="first retry delay, doubling up to 60 s")
    bandwidth_bytes_per_s: int | None = Field(None, gt=0, description="download bandwidth cap (none: unlimited)")
    max_bundle_bytes: int = Field(
        96 * 1024 * 1024, gt=0, description="refuse a desired bundle larger than this before downloading"
    )
    shadow_s: float = Field(
        0.0, ge=0, le=7 * 86_400, description="shadow phase before activation: the candidate runs beside the active"
    )
    shadow_min_records: int = Field(0, ge=0, description="... and for at least this many records (0 with 0 s: none)")
    watch_s: float = Field(300.0, ge=0, le=7 * 86_400, description="watch period after activation, before commit")
    watch_min_records: int = Field(10, ge=0, description="inferences the watch period needs at least")
    max_latency_ms: float = Field(50.0, gt=0, description="p95 inference latency bound during shadow and watch")
    max_latency_ratio: float | None = Field(
        None, gt=1, description="also roll back above this multiple of the previous model's p95 latency"
    )
    max_nonfinite: int = Field(0, ge=0, description="NaN/Inf outputs tolerated during shadow and watch")
    max_restarts: int = Field(
        2, ge=0, le=100, description="unclean restarts tolerated in one update state; one more fails it (crash_loop)"
    )
    offline_watch_records: int = Field(
        500, ge=1, le=100_000, description="`model install` with no agent running: reference-profile inputs checked"
    )
    install_timeout_s: float = Field(900.0, gt=0, description="`model install`: wait this long for a running agent")

    @field_validator("depot_networks")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"{cidr!r} is not a CIDR: {exc}") from None
        return value

    @field_validator("windows")
    @classmethod
    def _windows(cls, value: list[str]) -> list[str]:
        for window in value:
            parse_window(window)
        return value


class AgentConfig(_Section):
    """The whole agent configuration."""

    device: DeviceSection = Field(default_factory=DeviceSection, description="device identity")
    mqtt: MqttSection = Field(default_factory=MqttSection, description="broker connection")
    model: ModelSection = Field(default_factory=ModelSection, description="model bundle")
    sensors: SensorsSection = Field(default_factory=SensorsSection, description="sensor backend")
    spool: SpoolSection = Field(default_factory=SpoolSection, description="durable outbox")
    uplink: UplinkSection = Field(default_factory=UplinkSection, description="telemetry batching")
    activations: ActivationsSection = Field(default_factory=ActivationsSection, description="activation capture")
    labels: LabelsSection = Field(default_factory=LabelsSection, description="late labels")
    updates: UpdatesSection = Field(default_factory=UpdatesSection, description="model updates")
    state_dir: Path = Field(
        Path("/var/lib/edge-agent"), description="folder for the spool, the status file, update state and models"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] | None = Field(
        None, description="log level; overrides --log-level and follows a reload (SIGHUP)"
    )

    @property
    def spool_path(self) -> Path:
        """The spool file."""
        return self.spool.path or self.state_dir / "spool.db"

    @property
    def status_path(self) -> Path:
        """The status file `edge-agent status` reads."""
        return self.state_dir / "status.json"

    @property
    def late_labels_path(self) -> Path:
        """The late-label CSV."""
        return self.labels.late_labels_path or self.state_dir / "late_labels.csv"

    @property
    def client_id(self) -> str:
        """The MQTT client id."""
        return self.mqtt.client_id or f"edge-{self.device.id}"


# ----------------------------------------------------------------------------------- loading

_PATH_FIELDS = {
    ("device", "profile_dirs"),
    ("model", "bundle"),
    ("model", "trusted_keys"),
    ("sensors", "scenario"),
    ("sensors", "replay_csv"),
    ("spool", "path"),
    ("labels", "late_labels_path"),
    ("updates", "parked_flag_file"),
    ("updates", "depot_flag_file"),
    ("state_dir",),
}


def _resolve_paths(doc: dict[str, Any], base: Path) -> None:
    # Relative paths in a file mean "next to this file", not "wherever the agent was started".
    def fix(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).is_absolute():
            return str(base / value)
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value

    for key in _PATH_FIELDS:
        if len(key) == 1:
            if key[0] in doc:
                doc[key[0]] = fix(doc[key[0]])
        elif isinstance(doc.get(key[0]), dict) and key[1] in doc[key[0]]:
            doc[key[0]][key[1]] = fix(doc[key[0]][key[1]])


def _env_overrides(doc: dict[str, Any], environ: dict[str, str]) -> list[str]:
    sections = {
        name
        for name, f in AgentConfig.model_fields.items()
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
    }
    applied: list[str] = []
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX):
            continue
        key = var[len(ENV_PREFIX) :].lower()
        try:
            value = yaml.safe_load(environ[var]) if environ[var] != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"environment {var}: not a YAML value: {exc}") from None
        if "__" in key:
            section, field = key.split("__", 1)
            if section not in sections:
                raise ConfigError(f"environment {var}: unknown section {section!r} (known: {sorted(sections)})")
            model = AgentConfig.model_fields[section].annotation
            assert isinstance(model, type) and issubclass(model, BaseModel)
            if field not in model.model_fields:
                raise ConfigError(f"environment {var}: unknown field {section}.{field}")
            target = doc.setdefault(section, {})
            if not isinstance(target, dict):
                raise ConfigError(f"environment {var}: section {section!r} in the file is not a mapping")
            target[field] = value
        else:
            if key not in AgentConfig.model_fields or key in sections:
                raise ConfigError(f"environment {var}: unknown top-level field {key!r}")
            doc[key] = value
        applied.append(var)
    return applied


def _credential_password(environ: dict[str, str]) -> str | None:
    folder = environ.get("CREDENTIALS_DIRECTORY")
    if not folder:
        return None
    path = Path(folder) / PASSWORD_CREDENTIAL
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the MQTT password credential: {exc}") from None


def config_from_dict(doc: dict[str, Any], *, source: str = "<config>") -> AgentConfig:
    """Validate a configuration mapping; raise :class:`ConfigError` naming the field and problem."""
    try:
        return AgentConfig.model_validate(doc)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            if err["type"] == "extra_forbidden":
                problems.append(f"{where}: unknown key")
            else:
                problems.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


def load_config(path: Path | str | None = None, *, environ: dict[str, str] | None = None) -> AgentConfig:
    """Read the YAML file (if any), apply ``EDGE_AGENT_*`` overrides and validate."""
    env = dict(os.environ if environ is None else environ)
    doc: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, found {type(loaded).__name__}")
        doc = loaded
        _resolve_paths(doc, path.resolve().parent)
    applied = _env_overrides(doc, env)
    if applied:
        source += " + environment " + ", ".join(applied)
    mqtt = doc.setdefault("mqtt", {})
    if isinstance(mqtt, dict) and not mqtt.get("password"):
        password = _credential_password(env)
        if password is not None:
            mqtt["password"] = password
    return config_from_dict(doc, source=source)


def profile_search_path(config: AgentConfig) -> list[Path]:
    """Folders searched for the device profile: ``device.profile_dirs``, /etc/edge-agent/profiles, firmware_configs/."""
    return [*config.device.profile_dirs, *PROFILE_DIRS]


def load_device_profile(config: AgentConfig) -> HardwareProfile:
    """The hardware profile ``device.profile`` names, checked against the configuration (raises ConfigError)."""
    try:
        profile = find_profile(config.device.profile, profile_search_path(config))
    except ProfileError as exc:
        raise ConfigError(f"device.profile: {exc}") from None
    if config.sensors.backend == "hardware" and profile.audio.sample_rate != config.sensors.sample_rate:
        # The model's audio features depend on the rate; the microphone must deliver what they expect.
        raise ConfigError(
            f"device.profile {profile.name!r}: audio.sample_rate {profile.audio.sample_rate} differs from "
            f"sensors.sample_rate {config.sensors.sample_rate}"
        )
    return profile
