"""The playbooks in ansible/, run for real with ansible-playbook against local targets.

Each "device" is an inventory host alias with ``ansible_connection: local`` whose every path lives
under its own temporary prefix (``edge_agent_prefix``): its own agent.yaml, state directory, unit and
profiles. With a prefix the roles create no user, install no Debian package and run no systemctl.
The agent is this checkout's (``python -m edge_agent``, ``edge_agent_install_package: false``); mostly no
agent process runs, so ``edge-agent model install`` drives the real update state machine itself
(verification with real Ed25519 keys, staging, the golden self-test and the offline watch with
TFLite); one test rolls out through a running ``edge-agent run``. Not exercised here: SSH, become,
pip into a fresh venv, systemd (ansible/README.md).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge_agent.cli import status_document
from edge_agent.config import DEFAULT_KEY, load_config
from tests.conftest import service_missing
from tests.edge_agent.update_rig import ReleaseKey, make_bundle, reference_bundle, release_key, tar_sha, wait_for

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = REPO / "ansible"
DEVICES = ["dev-1", "dev-2", "dev-3", "dev-4"]
# dev-2 is another hardware revision: a bundle built for sim-v1 only is incompatible with it.
PROFILES = {"dev-2": "pi4-uma8-v1"}
PLAY_TIMEOUT_S = 240
RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def ansible_playbook() -> str:
    """The venv's ansible-playbook (ansible-core, in the dev extra)."""
    path = Path(sys.executable).parent / "ansible-playbook"
    if not path.exists():
        service_missing(f"{path} not found: pip install 'ansible-core>=2.17,<2.18' (the dev extra)")
    return str(path)


def run_playbook(
    playbook: str, inventory: str, home: Path, extra_vars: dict[str, Any] | None = None, *args: str
) -> subprocess.CompletedProcess[str]:
    """``ansible-playbook`` from ansible/ (its ansible.cfg), output as an operator sees it."""
    home.mkdir(parents=True, exist_ok=True)
    command = [ansible_playbook(), "-i", inventory, *args, playbook]
    if extra_vars:
        vars_file = home / f"extra-{len(list(home.glob('extra-*')))}.json"
        vars_file.write_text(json.dumps(extra_vars))
        command += ["-e", f"@{vars_file}"]
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
        "ANSIBLE_HOME": str(home),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        "ANSIBLE_REMOTE_TEMP": str(home / "remote-tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        # `python -m edge_agent` on the targets: this checkout's code.
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run(
        command, cwd=ANSIBLE, env=env, capture_output=True, text=True, timeout=PLAY_TIMEOUT_S, check=False
    )


def recap(done: subprocess.CompletedProcess[str]) -> dict[str, dict[str, int]]:
    """PLAY RECAP per host: ok, changed, unreachable, failed."""
    return {
        m[1]: {"ok": int(m[2]), "changed": int(m[3]), "unreachable": int(m[4]), "failed": int(m[5])}
        for m in RECAP.finditer(done.stdout)
    }


def shown(done: subprocess.CompletedProcess[str]) -> str:
    return f"rc={done.returncode}\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"


@dataclass
class Fleet:
    """Four devices installed by install_agent.yml, each in its own prefix."""

    root: Path
    inventory: Path
    key: ReleaseKey
    first_install: subprocess.CompletedProcess[str]

    def prefix(self, device: str) -> Path:
        return self.root / device

    def config(self, device: str) -> Path:
        return self.prefix(device) / "etc" / "edge-agent" / "agent.yaml"

    def status(self, device: str) -> dict[str, Any]:
        """The update part of ``edge-agent status --json`` (the same function, in this process)."""
        return dict(json.loads(json.dumps(status_document(load_config(self.config(device))), default=str))["update"])

    def rollout(self, bundle: Path, batch: int, max_fail: int, *args: str) -> subprocess.CompletedProcess[str]:
        extra = {"rollout_bundle": str(bundle), "rollout_batch": batch, "rollout_max_fail_percentage": max_fail}
        return run_playbook("rollout_model.yml", str(self.inventory), self.root / "ansible-home", extra, *args)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    root = tmp_path_factory.mktemp("ansible-fleet")
    key = release_key(root / "keys", "release-test")
    hosts = {
        device: {"edge_agent_prefix": str(root / device), "edge_agent_profile": PROFILES.get(device, "sim-v1")}
        for device in DEVICES
    }
    inventory = {
        "all": {
            "children": {
                "edge_agents": {
                    "hosts": hosts,
                    "vars": {
                        "ansible_connection": "local",
                        "ansible_python_interpreter": sys.executable,
                        "edge_agent_install_package": False,
                        "edge_agent_command": [sys.executable, "-m", "edge_agent"],
                        "edge_agent_python_bin": sys.executable,
                        "edge_agent_sensors_backend": "simulated",
                        "edge_agent_mqtt_url": "mqtt://127.0.0.1:1",
                        "edge_agent_tags": ["depot-test"],
                        # The packaged reference (the configured bundle) is signed with the dev key.
                        "edge_agent_trusted_keys": [str(DEFAULT_KEY), str(key.public_file)],
                        "edge_agent_config": {"updates": {"offline_watch_records": 100, "watch_s": 1}},
                    },
                }
            }
        }
    }
    path = root / "inventory.yml"
    path.write_text(yaml.safe_dump(inventory))
    done = run_playbook("install_agent.yml", str(path), root / "ansible-home")
    assert done.returncode == 0, shown(done)
    return Fleet(root, path, key, done)


def expected_unit(unit: str, replacements: dict[str, Path]) -> str:
    text = (REPO / "systemd" / unit).read_text()
    for old, new in replacements.items():
        text = text.replace(old, str(new))
    return text


def test_install_agent_lays_out_each_device_and_a_second_run_changes_nothing(fleet: Fleet) -> None:
    first = recap(fleet.first_install)
    assert set(first) == set(DEVICES), shown(fleet.first_install)
    assert all(r["changed"] > 0 and r["failed"] == 0 for r in first.values()), first
    profiles = sorted((REPO / "firmware_configs").glob("*.yaml"))
    assert profiles
    for device in DEVICES:
        prefix = fleet.prefix(device)
        etc = prefix / "etc" / "edge-agent"
        state = prefix / "var" / "lib" / "edge-agent"
        # The configuration, read by the agent's own loader (unknown keys would be an error).
        config = load_config(fleet.config(device))
        assert config.device.id == device
        assert config.device.profile == PROFILES.get(device, "sim-v1")
        assert config.device.tags == ["depot-test"]
        assert config.device.profile_dirs == [etc / "profiles"]
        assert config.state_dir == state
        assert config.model.trusted_keys == [etc / "keys" / "dev-release.pub", etc / "keys" / "release-test.pem.pub"]
        assert config.updates.offline_watch_records == 100 and config.updates.watch_s == 1
        assert config.mqtt.url == "mqtt://127.0.0.1:1"
        assert (etc / "keys" / "release-test.pem.pub").read_bytes() == fleet.key.public_file.read_bytes()
        assert sorted(p.name for p in (etc / "profiles").iterdir()) == [p.name for p in profiles]
        assert all((etc / "profiles" / p.name).read_bytes() == p.read_bytes() for p in profiles)
        # Modes as docs/OPERATIONS.md section 1 installs them by hand.
        assert (fleet.config(device).stat().st_mode & 0o777) == 0o640
        assert (etc / "mqtt-password").read_bytes() == b"" and (etc / "mqtt-password").stat().st_mode & 0o777 == 0o600
        assert state.is_dir() and (state.stat().st_mode & 0o777) == 0o700
        # The repository's unit, its paths moved into the prefix and nothing else changed.
        unit = (prefix / "etc" / "systemd" / "system" / "edge-agent.service").read_text()
        assert unit == expected_unit(
            "edge-agent.service",
            {"/opt/edge-agent": prefix / "opt" / "edge-agent", "/etc/edge-agent": etc, "/var/lib/edge-agent": state},
        )
    # The agent's own command reads the installed configuration.
    shown_status = subprocess.run(
        [sys.executable, "-m", "edge_agent", "status", "--config", str(fleet.config("dev-1"))],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert shown_status.returncode == 0 and "device:       dev-1" in shown_status.stdout, shown_status.stderr[-2000:]
    again = run_playbook("install_agent.yml", str(fleet.inventory), fleet.root / "ansible-home")
    assert again.returncode == 0, shown(again)
    assert recap(again) == {d: {"ok": first[d]["ok"], "changed": 0, "unreachable": 0, "failed": 0} for d in DEVICES}, (
        shown(again)
    )


def test_a_configuration_the_agent_refuses_is_named_and_the_installed_one_stays(fleet: Fleet) -> None:
    installed = fleet.config("dev-1").read_bytes()
    done = run_playbook(
        "install_agent.yml",
        str(fleet.inventory),
        fleet.root / "ansible-home",
        {"edge_agent_config": {"updates": {"watch_s": -1}, "sensors": {"rate": 5}}},
        "--limit",
        "dev-1",
    )
    assert done.returncode == 2, shown(done)
    assert "failed to validate" in done.stdout and "updates.watch_s" in done.stdout, shown(done)
    assert "sensors.rate" in done.stdout, shown(done)
    assert fleet.config("dev-1").read_bytes() == installed


def test_a_rollout_of_a_missing_bundle_touches_no_device(fleet: Fleet, tmp_path: Path) -> None:
    before = {device: fleet.status(device) for device in DEVICES}
    done = fleet.rollout(tmp_path / "nowhere.tar", batch=2, max_fail=0)
    assert done.returncode == 2, shown(done)
    assert "no such file on the controller" in done.stdout, shown(done)
    assert {device: fleet.status(device) for device in DEVICES} == before


def batches(done: subprocess.CompletedProcess[str]) -> list[list[str]]:
    """The hosts of each serial batch, from the play's first task of each batch."""
    found = re.findall(r"^included: \S+ for (.+)$", done.stdout, re.M)
    return [sorted(h.strip() for h in line.split(",")) for line in found]


def test_rollout_commits_a_good_bundle_on_every_device_batch_by_batch(fleet: Fleet, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "cabin-2.0.0.tar", fleet.key, version="2.0.0")
    done = fleet.rollout(bundle, batch=2, max_fail=0)
    assert done.returncode == 0, shown(done)
    assert batches(done) == [["dev-1", "dev-2"], ["dev-3", "dev-4"]], shown(done)
    assert all(r["failed"] == 0 and r["changed"] > 0 for r in recap(done).values()), shown(done)
    for device in DEVICES:
        update = fleet.status(device)
        assert update["state"] == "committed" and update["result"] == "success", update
        assert update["origin"] == "local"
        assert update["current"]["version"] == "2.0.0" and update["current"]["sha256"] == tar_sha(bundle)
        assert f"{device}: cabin-events 2.0.0 committed" in done.stdout
        # The uploaded copy is gone; the installed one lives in the state directory's models/.
        assert not list((fleet.prefix(device) / "var" / "lib" / "edge-agent" / "incoming").iterdir())
    # Devices that run the bundle already are left alone (one batch shows it).
    again = fleet.rollout(bundle, 2, 0, "--limit", "dev-3,dev-4")
    assert again.returncode == 0, shown(again)
    assert {d: (r["changed"], r["failed"]) for d, r in recap(again).items()} == {"dev-3": (0, 0), "dev-4": (0, 0)}, (
        shown(again)
    )


def self_test_failing_bundle(out: Path, key: ReleaseKey, version: str) -> Path:
    """A validly signed bundle whose golden expectations the model does not reproduce."""
    golden = [case.model_dump(mode="json") for case in reference_bundle().manifest.golden]
    golden[0]["probabilities"] = [p + 0.25 for p in golden[0]["probabilities"]]
    return make_bundle(out, key, version=version, golden=golden)


def test_rollout_through_a_running_agent_waits_out_its_watch_period_on_status(fleet: Fleet, tmp_path: Path) -> None:
    device = "dev-4"
    status_file = fleet.prefix(device) / "var" / "lib" / "edge-agent" / "status.json"
    status_file.unlink(missing_ok=True)

    def running_model() -> str | None:
        try:
            doc = json.loads(status_file.read_text())
        except (OSError, ValueError):
            return None
        return str(doc["model"]["version"]) if doc.get("state") == "running" else None

    log = tmp_path / "agent.log"
    # The running agent watches a new model for 4 s on live inputs, longer than `model install`
    # waits (1.5 s): the play then has to find the outcome by polling `edge-agent status`.
    env = {**os.environ, "PYTHONPATH": str(REPO), "EDGE_AGENT_UPDATES__WATCH_S": "4"}
    with log.open("wb") as out:
        agent = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "--config", str(fleet.config(device))],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
    try:
        wait_for(lambda: running_model() is not None or agent.poll() is not None, 60, "the agent to run")
        assert agent.poll() is None, log.read_text()[-3000:]
        bundle = make_bundle(tmp_path / "cabin-4.0.0.tar", fleet.key, version="4.0.0")
        extra = {
            "rollout_bundle": str(bundle),
            "rollout_install_timeout": 1.5,
            "rollout_poll_interval": 0.5,
            "rollout_commit_timeout": 60,
        }
        done = run_playbook("rollout_model.yml", str(fleet.inventory), fleet.root / "ansible-home", extra, "-l", device)
        assert done.returncode == 0, shown(done) + log.read_text()[-3000:]
        assert "RETRYING: [dev-4]: Wait until edge-agent status reports the outcome" in done.stdout, shown(done)
        assert f"{device}: cabin-events 4.0.0 committed" in done.stdout
        update = fleet.status(device)
        assert update["state"] == "committed" and update["current"]["version"] == "4.0.0", update
        # The running agent took the request and swapped the model in, without a restart.
        wait_for(lambda: running_model() == "4.0.0", 30, "the running agent to report 4.0.0")
        assert agent.poll() is None
        assert "activated cabin-events 4.0.0" in log.read_text()  # in the agent's process, not the command's
        assert not list((fleet.prefix(device) / "var" / "lib" / "edge-agent" / "incoming").iterdir())
    finally:
        agent.terminate()
        agent.wait(30)


def test_rollout_of_a_bundle_failing_its_self_test_stops_after_the_first_batch(fleet: Fleet, tmp_path: Path) -> None:
    before = {device: fleet.status(device) for device in DEVICES}
    bundle = self_test_failing_bundle(tmp_path / "cabin-9.0.0.tar", fleet.key, "9.0.0")
    done = fleet.rollout(bundle, batch=2, max_fail=0)
    assert done.returncode == 2, shown(done)
    assert batches(done) == [["dev-1", "dev-2"]], shown(done)
    results = recap(done)
    assert set(results) == {"dev-1", "dev-2"} and all(r["failed"] == 1 for r in results.values()), shown(done)
    for device in ["dev-1", "dev-2"]:
        assert f"{device}: cabin-events 9.0.0 did not commit: rolled_back (self_test_failed:" in done.stdout
        update = fleet.status(device)
        assert update["state"] == "rolled_back" and update["reason"] == "self_test_failed", update
        assert update["current"] == before[device]["current"]  # still on the model it ran
    for device in ["dev-3", "dev-4"]:
        assert fleet.status(device) == before[device]  # untouched: the play never reached them
        assert not (fleet.prefix(device) / "var" / "lib" / "edge-agent" / "incoming" / bundle.name).exists()


def test_max_fail_percentage_decides_whether_a_partly_failing_batch_stops_the_rollout(
    fleet: Fleet, tmp_path: Path
) -> None:
    # Built for sim-v1 only: dev-2 (pi4-uma8-v1) refuses it, so the first batch fails by half.
    sim_only: dict[str, Any] = {"hardware_profiles": ["sim-v1"], "min_agent_version": "0.1.0"}
    tolerated = make_bundle(tmp_path / "cabin-3.0.0.tar", fleet.key, version="3.0.0", compatibility=sim_only)
    done = fleet.rollout(tolerated, batch=2, max_fail=50)  # 1 of 2 is not more than 50 %
    assert done.returncode == 2, shown(done)
    assert batches(done) == [["dev-1", "dev-2"], ["dev-3", "dev-4"]], shown(done)
    assert "dev-2: cabin-events 3.0.0 did not commit: incompatible (incompatible_profile:" in done.stdout
    assert {d: r["failed"] for d, r in recap(done).items()} == {"dev-1": 0, "dev-2": 1, "dev-3": 0, "dev-4": 0}
    assert [fleet.status(d)["current"]["version"] for d in ["dev-1", "dev-3", "dev-4"]] == ["3.0.0"] * 3
    assert fleet.status("dev-2")["state"] == "incompatible"

    before = {device: fleet.status(device) for device in DEVICES}
    stopped = make_bundle(tmp_path / "cabin-3.1.0.tar", fleet.key, version="3.1.0", compatibility=sim_only)
    done = fleet.rollout(stopped, batch=2, max_fail=25)  # 1 of 2 is more than 25 %
    assert done.returncode == 2, shown(done)
    assert batches(done) == [["dev-1", "dev-2"]], shown(done)
    assert fleet.status("dev-1")["current"]["version"] == "3.1.0"
    assert [fleet.status(d) for d in ["dev-3", "dev-4"]] == [before["dev-3"], before["dev-4"]]


def test_a_prefix_refuses_to_manage_the_system(tmp_path: Path) -> None:
    prefix = tmp_path / "dev"
    done = run_playbook(
        "install_agent.yml",
        "localhost,",
        tmp_path / "ansible-home",
        {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "edge_agent_hosts": "localhost",
            "edge_agent_prefix": str(prefix),
            "edge_agent_manage_service": True,
        },
    )
    assert done.returncode == 2, shown(done)
    assert "relocates the install into a tree of its own" in done.stdout
    assert not prefix.exists()


def test_install_collector_writes_settings_the_collector_reads_and_a_second_run_changes_nothing(
    tmp_path: Path,
) -> None:
    prefix = tmp_path / "collector"
    key = release_key(tmp_path / "keys", "release-2026")
    upload = release_key(tmp_path / "keys", "ci")
    token = "s3cr\"et$HOME`x' \\"  # every character the settings file must escape
    hooks = ["https://hooks.example.net/fleet", 'https://h.example/a b"$c']
    extra = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "fleet_collector_hosts": "localhost",
        "fleet_collector_prefix": str(prefix),
        "fleet_collector_install_package": False,
        "fleet_collector_python_bin": sys.executable,
        "fleet_collector_release_key": str(key.public_file.with_suffix("")),
        "fleet_collector_upload_keys": [str(upload.public_file)],
        "fleet_collector_settings": {
            "public_url": "https://fleet.example.net",
            "alert_webhooks": hooks,
            "registry_dev_key": False,
        },
        "fleet_collector_secret_settings": {"api_token": token},
    }
    home = tmp_path / "ansible-home"
    done = run_playbook("install_collector.yml", "localhost,", home, extra)
    assert done.returncode == 0, shown(done)
    assert token not in done.stdout
    etc = prefix / "etc" / "fleet-collector"
    env_file = etc / "env"
    assert env_file.stat().st_mode & 0o777 == 0o600 and (etc / "release.pem").stat().st_mode & 0o777 == 0o600
    # The collector's own loader on the environment the unit's EnvironmentFile= gives it.
    read = subprocess.run(
        [
            "bash",
            "-c",
            'set -a && . "$1" && exec "$2" -c "$3"',
            "read",
            str(env_file),
            sys.executable,
            "import json; from collector.config import load_settings; print(load_settings().model_dump_json())",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert read.returncode == 0, read.stderr[-3000:]
    settings = json.loads(read.stdout)
    assert settings["api_token"] == token and settings["alert_webhooks"] == hooks
    assert settings["data_dir"] == str(prefix / "var" / "lib" / "fleet-collector")
    assert settings["release_key"] == str(etc / "release.pem")
    assert settings["registry_upload_keys"] == [str(etc / "keys" / "ci.pem.pub")]
    assert settings["monitoring_profiles"] == [str(etc / "profiles")]
    assert settings["public_url"] == "https://fleet.example.net" and settings["registry_dev_key"] is False
    unit = (prefix / "etc" / "systemd" / "system" / "fleet-collector.service").read_text()
    moved = {"/opt/fleet-collector": prefix / "opt" / "fleet-collector", "/etc/fleet-collector": etc}
    assert unit == expected_unit("fleet-collector.service", moved)
    again = run_playbook("install_collector.yml", "localhost,", home, extra)
    assert again.returncode == 0, shown(again)
    assert recap(again)["localhost"]["changed"] == 0, shown(again)


def test_a_setting_the_collector_refuses_keeps_the_settings_file_out(tmp_path: Path) -> None:
    prefix = tmp_path / "collector"
    done = run_playbook(
        "install_collector.yml",
        "localhost,",
        tmp_path / "ansible-home",
        {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "fleet_collector_hosts": "localhost",
            "fleet_collector_prefix": str(prefix),
            "fleet_collector_install_package": False,
            "fleet_collector_python_bin": sys.executable,
            "fleet_collector_settings": {"mqtt_url": "http://broker:1883", "http_port": "eighty"},
        },
    )
    assert done.returncode == 2, shown(done)
    assert "FLEET_MQTT_URL" in done.stdout and "FLEET_HTTP_PORT" in done.stdout, shown(done)
    assert not (prefix / "etc" / "fleet-collector" / "env").exists()


def test_the_playbooks_and_the_example_inventory_parse(tmp_path: Path) -> None:
    for playbook in ["install_agent.yml", "install_collector.yml"]:
        done = run_playbook(playbook, "inventory.example.yml", tmp_path, None, "--syntax-check")
        assert done.returncode == 0, shown(done)
    done = run_playbook("rollout_model.yml", "inventory.example.yml", tmp_path, None, "--list-hosts")
    assert done.returncode == 0, shown(done)
    assert "van-0042" in done.stdout and "van-0043" in done.stdout, shown(done)
