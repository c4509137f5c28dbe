"""Agent configuration: strict keys, types, environment overrides, credentials, the example file."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import DEFAULT_BUNDLE, AgentConfig, ConfigError, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "edge_agent" / "agent.example.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_example_config_loads(tmp_path: Path) -> None:
    config = load_config(EXAMPLE, environ={})
    assert config.device.id == "van-0042"
    assert config.mqtt.host == "127.0.0.1" and config.mqtt.port == 1883
    assert config.spool.commit_interval_s == 1.0
    assert config.model.bundle == DEFAULT_BUNDLE
    assert config.spool_path == Path("/var/lib/edge-agent/spool.db")


def test_unknown_key_is_rejected_with_its_name(tmp_path: Path) -> None:
    path = write(tmp_path, "device:\n  id: v1\nspool:\n  max_byts: 1000\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    message = str(err.value)
    assert str(path) in message and "spool.max_byts" in message and "unknown key" in message


def test_unknown_section_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mqqt: unknown key"):
        load_config(write(tmp_path, "mqqt:\n  url: mqtt://x:1\n"), environ={})


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("sensors:\n  rate_hz: fast\n", "sensors.rate_hz"),
        ("mqtt:\n  keepalive: [1, 2]\n", "mqtt.keepalive"),
        ("mqtt:\n  url: http://broker\n", "mqtt.url"),
        ("mqtt:\n  protocol: '4'\n", "mqtt.protocol"),
        ("spool:\n  commit_interval_s: 5\n", "spool.commit_interval_s"),
        ("device:\n  id: 'bad/id'\n", "device.id"),
        ("activations:\n  sample_fraction: 1.5\n", "activations.sample_fraction"),
        ("sensors:\n  backend: replay\n", "sensors"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert str(path) in str(err.value) and field in str(err.value)


def test_not_a_mapping_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"), environ={})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "device: [\n"), environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "mqtt:\n  url: mqtt://file-broker:1883\nsensors:\n  rate_hz: 10\n")
    env = {
        "EDGE_AGENT_MQTT__URL": "mqtt://env-broker:2883",
        "EDGE_AGENT_SENSORS__RATE_HZ": "2.5",
        "EDGE_AGENT_DEVICE__TAGS": "[a, b]",
        "EDGE_AGENT_STATE_DIR": "/tmp/agent-state",
        "UNRELATED": "x",
    }
    config = load_config(path, environ=env)
    assert config.mqtt.host == "env-broker" and config.mqtt.port == 2883
    assert config.sensors.rate_hz == 2.5
    assert config.device.tags == ["a", "b"]
    assert config.state_dir == Path("/tmp/agent-state")


def test_unknown_environment_override_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="EDGE_AGENT_MQTT__URLL"):
        load_config(None, environ={"EDGE_AGENT_MQTT__URLL": "mqtt://x:1"})
    with pytest.raises(ConfigError, match="EDGE_AGENT_NOPE__X"):
        load_config(None, environ={"EDGE_AGENT_NOPE__X": "1"})
    with pytest.raises(ConfigError, match=r"sensors\.rate_hz"):
        load_config(None, environ={"EDGE_AGENT_SENSORS__RATE_HZ": "abc"})


def test_password_from_environment_or_credentials(tmp_path: Path) -> None:
    config = load_config(None, environ={"EDGE_AGENT_MQTT__PASSWORD": "s3cret"})
    assert config.mqtt.password is not None and config.mqtt.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(config)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-systemd\n")
    config = load_config(None, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert config.mqtt.password is not None and config.mqtt.password.get_secret_value() == "from-systemd"


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "state_dir: state\nsensors:\n  replay_csv: data/x.csv\n  backend: replay\n")
    config = load_config(path, environ={})
    assert config.state_dir == tmp_path / "state"
    assert config.sensors.replay_csv == tmp_path / "data" / "x.csv"
    assert config.status_path == tmp_path / "state" / "status.json"


def test_defaults_are_complete() -> None:
    config = AgentConfig()
    assert config.sensors.rate_hz == 10 and config.sensors.backend == "simulated"
    assert config.client_id == f"edge-{config.device.id}"
    for section in AgentConfig.model_fields.values():
        assert section.description, "every field carries a description"
