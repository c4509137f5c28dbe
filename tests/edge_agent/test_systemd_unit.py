"""The systemd units: `systemd-analyze verify`, the settings the service relies on, the measured security
exposure (recorded in docs/OPERATIONS.md), and W^X (MemoryDenyWriteExecute) measured, not guessed.

``systemd-analyze verify`` refuses a unit whose ``ExecStart`` binary is missing, so it checks a copy
pointing at the console script installed in this venv. It also only *warns* about unknown keys and
bad values (exit code 0), so any output fails the test.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import service_missing

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
BIN = Path(sys.executable).parent
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        service_missing("systemd-analyze (Debian package systemd) is not installed")
    assert found is not None
    return found


def installed_copy(unit: str, tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's console script (verify needs an executable)."""
    text = (UNITS / unit).read_text()
    script = "edge-agent" if unit == "edge-agent.service" else "fleet-collector"
    installed = BIN / script
    assert installed.exists(), f"{installed}: install the project into the venv (pip install -e .)"
    text = text.replace(f"/opt/{script}/bin/{script}", str(installed))
    assert str(installed) in text
    path = tmp_path / unit
    path.write_text(text)
    return path


def settings(unit: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit, repeated keys in order."""
    out: dict[str, list[str]] = {}
    for raw in (UNITS / unit).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.mark.parametrize("unit", ["edge-agent.service", "fleet-collector.service"])
def test_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    analyze = systemd_analyze()
    done = subprocess.run([analyze, "verify", str(installed_copy(unit, tmp_path))], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "" and done.stderr.strip() == "", done.stdout + done.stderr


def test_verify_catches_a_broken_copy(tmp_path: Path) -> None:
    """Guards the guard: a typo in a key is reported (as a warning) by this systemd-analyze."""
    analyze = systemd_analyze()
    path = installed_copy("edge-agent.service", tmp_path)
    path.write_text(path.read_text().replace("NotifyAccess=main", "NotifyAcess=main"))
    done = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True)
    assert "Unknown key" in done.stderr and "NotifyAcess" in done.stderr


def test_the_agent_unit_has_what_the_service_relies_on() -> None:
    s = settings("edge-agent.service")
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["WatchdogSec"] == "30" and one["Restart"] == "on-failure"
    assert int(one["StartLimitBurst"]) >= 1 and int(one["StartLimitIntervalSec"]) > 0
    assert one["ExecStart"] == "/opt/edge-agent/bin/edge-agent run --config /etc/edge-agent/agent.yaml"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["User"] == "edge-agent" and one["SupplementaryGroups"].split() == ["i2c", "dialout", "audio"]
    assert one["StateDirectory"] == "edge-agent" and one["UMask"] == "0077"
    assert one["DevicePolicy"] == "closed"
    assert s["DeviceAllow"] == ["/dev/i2c-1 rw", "/dev/pms5003 rw", "char-alsa rw"]
    assert one["CapabilityBoundingSet"] == "" and one["AmbientCapabilities"] == ""
    assert one["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert s["SystemCallFilter"][0] == "@system-service"
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "RestrictNamespaces",
        "LockPersonality",
        "ProtectClock",
        "ProtectHostname",
        "RestrictRealtime",
        "RestrictSUIDSGID",
    ):
        assert one[key] == "yes", key
    assert one["ProtectSystem"] == "strict"
    # Measured below: the microphone's cffi callback needs W+X memory.
    assert one["MemoryDenyWriteExecute"] == "no"
    # The state directory the unit creates is where the agent keeps its spool.
    assert "EDGE_AGENT_STATE_DIR=/var/lib/edge-agent" in one["Environment"]


def exposure(unit: Path) -> tuple[float, str, str]:
    analyze = systemd_analyze()
    done = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(unit)], capture_output=True, text=True
    )
    if "--offline" in done.stderr and done.returncode != 0:
        service_missing(f"this systemd-analyze cannot assess a unit file offline: {done.stderr.strip()}")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d) (\w+)", done.stdout)
    assert match, done.stdout + done.stderr
    return float(match.group(1)), match.group(2), done.stdout


@pytest.mark.parametrize("unit", ["edge-agent.service", "fleet-collector.service"])
def test_security_exposure_is_ok_and_recorded(unit: str, tmp_path: Path) -> None:
    value, level, _ = exposure(installed_copy(unit, tmp_path))
    assert level in ("OK", "SAFE", "PERFECT") and value < 2.0, (value, level)
    doc = (REPO / "docs" / "OPERATIONS.md").read_text()
    assert f"Overall exposure level for {unit}: {value} {level}" in doc, "update docs/OPERATIONS.md"


# ----------------------------------------------------------------------------- W^X, measured

MDWE_PRELUDE = textwrap.dedent(
    f"""
    import ctypes, mmap, sys
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
        print("NO-MDWE", ctypes.get_errno()); sys.exit(3)
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        print("W+X allowed: MDWE not in force"); sys.exit(4)
    except OSError:
        pass
    """
)


def run_under_mdwe(body: str) -> subprocess.CompletedProcess[str]:
    """Run ``body`` in a Python whose kernel refuses W+X memory, as MemoryDenyWriteExecute does."""
    done = subprocess.run(
        [sys.executable, "-c", MDWE_PRELUDE + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    if done.returncode == 3:
        pytest.skip(f"this kernel has no PR_SET_MDWE (Linux >= 6.3): {done.stdout.strip()}")
    return done


def test_tflite_with_xnnpack_and_numpy_run_under_w_xor_x() -> None:
    done = run_under_mdwe(
        """
        import numpy as np
        from edge_agent.config import DEFAULT_BUNDLE, DEFAULT_KEY
        from edge_agent.inference import Engine
        from shared.bundle import load_bundle
        from shared.signing import load_public_keys
        engine = Engine(load_bundle(DEFAULT_BUNDLE, load_public_keys([DEFAULT_KEY])))
        cols = engine.infer_many(np.zeros((8, engine.n_features), np.float32), np.zeros(8, np.uint16))
        print("inference ok", len(cols))
        """
    )
    assert done.returncode == 0 and "inference ok 8" in done.stdout, done.stdout + done.stderr


def test_the_microphone_callback_needs_w_and_x_memory() -> None:
    """Why the agent unit says MemoryDenyWriteExecute=no: sounddevice's callback is a cffi closure."""
    done = run_under_mdwe(
        """
        from sounddevice import _ffi
        try:
            _ffi.callback("PaStreamCallback", lambda *a: 0)
        except MemoryError as exc:
            print("refused:", exc)
        else:
            print("callback allocated")
        """
    )
    assert done.returncode == 0, done.stderr
    assert "refused: Cannot allocate write+execute memory for ffi.callback()" in done.stdout, (
        "cffi now allocates callbacks without W+X memory: set MemoryDenyWriteExecute=yes in systemd/edge-agent.service"
    )


def test_the_collector_runs_under_w_xor_x(tmp_path: Path) -> None:
    done = run_under_mdwe(
        f"""
        from fastapi.testclient import TestClient
        from collector.app import create_app
        from collector.config import Settings
        settings = Settings(database_url="sqlite:///{tmp_path / "c.db"}", data_dir="{tmp_path}", auto_migrate=True)
        with TestClient(create_app(settings, start_ingest=False)) as client:
            print(client.get("/api/v1/health").json()["status"])
        import tflite_runtime.interpreter
        print("tflite ok")
        """
    )
    assert done.returncode == 0 and done.stdout.split() == ["ok", "tflite", "ok"], done.stdout + done.stderr
