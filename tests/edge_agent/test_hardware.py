"""The hardware source on bus-level fakes: the REAL drivers read a fake SMBus BME680, a PMS5003 behind a
pty and a fake UMA-8 stream; sensors are unplugged, corrupted and frozen, and must degrade and recover.

Run as a program (``python -m tests.edge_agent.test_hardware --config agent.yaml --rig DIR``) this
module is the agent of ``edge-agent run`` with the same fakes: it builds the :class:`Rig` and calls
:func:`edge_agent.cli.run_service`, whose hardware factory puts a :class:`HardwareCabin` with the
rig's drivers in the agent. The test drives the fakes through the program's stdin (``unplug pms5003``,
``plug microphone``, ``hang``...), as a harness driving a vehicle's wiring.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from edge_agent.config import AgentConfig, config_from_dict
from edge_agent.sensors.base import Observation
from edge_agent.sensors.bme680 import Bme680
from edge_agent.sensors.hardware import DriverFactories, HardwareCabin, check_sensors
from edge_agent.sensors.health import HealthPolicy
from edge_agent.sensors.microphone import Microphone
from edge_agent.sensors.pms5003 import Pms5003
from shared.features import FLAG_AUDIO_MISSING, FLAG_GAS_MISSING, FLAG_PM_MISSING, FeaturePipeline
from shared.profile import HardwareProfile, find_profile
from tests.edge_agent.fake_audio import FakeUma8
from tests.edge_agent.fake_bme680 import FakeBme680Bus, FakeClock, RawSample, encode_calibration
from tests.edge_agent.fake_pms5003 import FakePms5003, Values, bad_checksum, data_frame
from tests.edge_agent.test_bme680 import COEFFS_B, expected

REPO = Path(__file__).resolve().parents[2]
PM_VALUES = Values(
    pm1_cf1=5, pm25_cf1=8, pm10_cf1=12, pm1=4, pm25=7, pm10=11, particles_per_dl=(3500, 1200, 150, 12, 3, 1)
)
BASE_SAMPLE = RawSample(temp_adc=512_000, press_adc=318_000, hum_adc=25_800, gas_adc=290, gas_range=9)
FAST = HealthPolicy(
    degrade_after=2, fail_after=4, recover_after=2, stuck_after=10_000, backoff_initial_s=0.05, backoff_max_s=0.2
)
FAST_MIC = HealthPolicy(
    degrade_after=3,
    fail_after=6,
    recover_after=3,
    no_data_after=5,
    stuck_after=10_000,
    reopen_after=6,
    backoff_initial_s=0.05,
    backoff_max_s=0.2,
)
FAST_POLICIES = {"bme680": FAST, "pms5003": FAST, "microphone": FAST_MIC}


def base_profile() -> HardwareProfile:
    return find_profile("pi4-uma8-v1", [REPO / "firmware_configs"])


class Rig:
    """The fake wiring of one unit: a BME680 on a fake bus, a PMS5003 on a pty behind a udev-like
    symlink, and a UMA-8 on a fake PortAudio host; each can be unplugged and plugged back."""

    def __init__(self, folder: Path, *, pm_values: Values = PM_VALUES, pm_interval_s: float | None = 0.05) -> None:
        self.folder = folder
        self.clock = FakeClock()
        self.bus = FakeBme680Bus(encode_calibration(COEFFS_B), clock=self.clock)
        self.bus.sample = BASE_SAMPLE
        self.bus_lock = threading.Lock()
        self.pm_values = pm_values
        self.pm_interval_s = pm_interval_s
        self.pms = FakePms5003(pm_values, interval_s=pm_interval_s)
        self.old_pms: list[FakePms5003] = []
        self.link = folder / "pms5003"
        self.link.symlink_to(self.pms.device)
        self.uma = FakeUma8()
        self._weather_stop = threading.Event()
        self._weather: threading.Thread | None = None

    def profile(self, name: str = "pi4-uma8-v1") -> HardwareProfile:
        """The revision's profile with the serial device pointing at the rig's symlink."""
        p = base_profile()
        return p.model_copy(update={"name": name, "uart": p.uart.model_copy(update={"device": str(self.link)})})

    def factories(self) -> DriverFactories:
        """The real drivers, on the rig's fake bus, pty and audio host."""
        return DriverFactories(
            bme680=lambda c: Bme680(self.bus, c.bme680_address, clock=self.clock.monotonic, sleep=self.clock.sleep),
            pms5003=lambda c: Pms5003.open(c.device, c.baud, mode="active", read_timeout_s=0.5),
            microphone=lambda c: Microphone(
                device_match=c.device_match,
                sample_rate=c.sample_rate,
                channels=c.channels,
                channel=c.channel,
                stream_factory=self.uma.input_stream,
                query_devices=self.uma.query_devices,
            ),
        )

    def start_weather(self, period_s: float = 0.05) -> None:
        """Let the cabin air move a little, as it does, so the BME680 readings are never stuck."""

        def run() -> None:
            k = 0
            while not self._weather_stop.wait(period_s):
                k += 1
                self.bus.sample = replace(BASE_SAMPLE, temp_adc=BASE_SAMPLE.temp_adc + 40 * (k % 17))

        self._weather = threading.Thread(target=run, name="rig-weather", daemon=True)
        self._weather.start()

    def unplug(self, sensor: str) -> None:
        """Pull a sensor's cable."""
        if sensor == "bme680":
            self.bus.unplug()
        elif sensor == "pms5003":
            self.pms.vanish()
            self.link.unlink()  # udev removes the alias with the device
        elif sensor == "microphone":
            self.uma.unplug()
        else:
            raise ValueError(sensor)

    def plug(self, sensor: str) -> None:
        """Plug it back in (a new pty for the serial sensor, as a USB adapter gets a new node)."""
        if sensor == "bme680":
            self.bus.plug_in()
        elif sensor == "pms5003":
            self.old_pms.append(self.pms)
            self.pms = FakePms5003(self.pm_values, interval_s=self.pm_interval_s)
            self.link.symlink_to(self.pms.device)
        elif sensor == "microphone":
            self.uma.plug()
        else:
            raise ValueError(sensor)

    def close(self) -> None:
        self._weather_stop.set()
        for fake in [self.pms, *self.old_pms]:
            fake.close()
        for stream in self.uma.streams:
            stream.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


@pytest.fixture
def cabins() -> Iterator[list[HardwareCabin]]:
    made: list[HardwareCabin] = []
    yield made
    for cabin in made:
        cabin.stop()


def start_cabin(rig: Rig, cabins: list[HardwareCabin], **kw: Any) -> HardwareCabin:
    options: dict[str, Any] = {"rate_hz": 10.0, "env_period_s": 0.05, "policies": FAST_POLICIES}
    options.update(kw)
    cabin = HardwareCabin(rig.profile(), factories=rig.factories(), **options)
    cabins.append(cabin)
    cabin.start()
    return cabin


def states(cabin: HardwareCabin) -> dict[str, str]:
    return {name: h.state for name, h in cabin.health().items()}


def pump(cabin: HardwareCabin, until: Callable[[Observation], bool], what: str, timeout: float = 15.0) -> Observation:
    """Call read() at the inference rate, as the agent's loop does, until ``until(observation)``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        obs = cabin.read()
        if until(obs):
            return obs
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: health {cabin.health()}")


def complete(obs: Observation) -> bool:
    return obs.flags & (FLAG_GAS_MISSING | FLAG_PM_MISSING | FLAG_AUDIO_MISSING) == 0


# ------------------------------------------------------------------------------------------ tests


def test_reads_the_three_sensors_through_the_real_drivers(rig: Rig, cabins: list[HardwareCabin]) -> None:
    rig.start_weather()
    cabin = start_cabin(rig, cabins)
    obs = pump(cabin, complete, "a complete observation")
    env = obs.env
    assert env is not None
    # PMS5003: the atmospheric concentrations and counts exactly as the fake framed them.
    assert (env.pm1_ug_m3, env.pm25_ug_m3, env.pm10_ug_m3) == (4.0, 7.0, 11.0)
    assert env.particles_per_dl == tuple(float(c) for c in PM_VALUES.particles_per_dl)
    # BME680: Bosch's float compensation of one of the raw samples the rig served.
    temp_adcs = {BASE_SAMPLE.temp_adc + 40 * k for k in range(17)}
    candidates = [expected(COEFFS_B, replace(BASE_SAMPLE, temp_adc=t)) for t in temp_adcs]
    assert any(
        math.isclose(env.temperature_c, t, rel_tol=1e-9)
        and math.isclose(env.humidity_pct, h, rel_tol=1e-9)
        and math.isclose(env.pressure_hpa, p, rel_tol=1e-9)
        and math.isclose(env.gas_resistance_ohm, g, rel_tol=1e-9)
        for t, h, p, g in candidates
    ), (env, candidates[:2])
    assert obs.audio is not None and obs.audio.dtype == np.float32 and obs.audio.shape == (1600,)
    features, flags = FeaturePipeline()(obs.env, obs.audio)
    assert np.isfinite(features).all() and flags == 0
    assert states(cabin) == {"bme680": "ok", "pms5003": "ok", "microphone": "ok"}
    assert cabin.take_events() == []
    details = cabin.snapshot()
    assert details["pms5003"]["counters"]["frames"] > 0 and details["microphone"]["counters"]["samples"] > 0


def test_unplugged_sensors_go_missing_fail_and_recover_without_a_restart(rig: Rig, cabins: list[HardwareCabin]) -> None:
    rig.start_weather()
    cabin = start_cabin(rig, cabins)
    pump(cabin, complete, "a complete observation")
    for sensor in ("bme680", "pms5003", "microphone"):
        rig.unplug(sensor)
    everything_missing = FLAG_GAS_MISSING | FLAG_PM_MISSING | FLAG_AUDIO_MISSING
    obs = pump(
        cabin,
        lambda o: (o.flags & everything_missing) == everything_missing and set(states(cabin).values()) == {"failed"},
        "every sensor failed",
    )
    assert obs.env is not None and math.isnan(obs.env.temperature_c) and math.isnan(obs.env.pm25_ug_m3)
    assert obs.audio is None
    reasons = {name: h.reason for name, h in cabin.health().items()}
    assert reasons["bme680"] == "disconnected"
    assert reasons["pms5003"] == "disconnected"
    assert reasons["microphone"] in ("disconnected", "not_found")  # reopening finds no UMA-8 on the host
    for sensor in ("bme680", "pms5003", "microphone"):
        rig.plug(sensor)
    pump(cabin, lambda o: complete(o) and set(states(cabin).values()) == {"ok"}, "every sensor back")
    events = cabin.take_events()
    path = {s: [(e.data["previous"], e.data["state"]) for e in events if e.data["sensor"] == s] for s in states(cabin)}
    for sensor, steps in path.items():
        assert steps == [("ok", "degraded"), ("degraded", "failed"), ("failed", "ok")], (sensor, steps)
    assert all(e.kind == "sensor_state" for e in events)
    assert cabin.channels["pms5003"].monitor.opens >= 2 and cabin.channels["microphone"].monitor.opens >= 2
    assert len(rig.uma.streams) >= 2  # a new stream after the replug


def test_out_of_range_values_are_rejected_one_by_one(tmp_path: Path, cabins: list[HardwareCabin]) -> None:
    rig = Rig(tmp_path, pm_values=replace(PM_VALUES, pm10=5000))  # above the profile's 1000 µg/m³
    try:
        rig.start_weather()
        cabin = start_cabin(rig, cabins)
        obs = pump(cabin, lambda o: cabin.health()["pms5003"].state == "degraded", "pms5003 degraded")
        assert cabin.health()["pms5003"].reason == "out_of_range"
        obs = pump(cabin, lambda o: o.env is not None and not math.isnan(o.env.pm25_ug_m3), "a PM reading")
        assert obs.env is not None and math.isnan(obs.env.pm10_ug_m3) and obs.env.pm25_ug_m3 == 7.0
        _, flags = FeaturePipeline()(obs.env, obs.audio)
        assert flags & FLAG_PM_MISSING
        assert cabin.health()["pms5003"].state == "degraded"  # partial data degrades, never fails
    finally:
        rig.close()


def test_checksum_errors_over_the_rate_degrade_the_particle_sensor(tmp_path: Path, cabins: list[HardwareCabin]) -> None:
    rig = Rig(tmp_path, pm_interval_s=None)  # the script below is all the sensor sends
    try:
        rig.start_weather()
        good = data_frame(PM_VALUES)
        rig.pms.play(*[item for _ in range(200) for item in (bad_checksum(good), good, 0.03)])
        cabin = start_cabin(rig, cabins)
        pump(cabin, lambda o: cabin.health()["pms5003"].state == "degraded", "pms5003 degraded")
        assert cabin.health()["pms5003"].reason == "checksum"
        obs = pump(cabin, lambda o: o.env is not None and o.env.pm25_ug_m3 == 7.0, "valid frames still used")
        assert obs.flags & FLAG_PM_MISSING == 0
        assert cabin.snapshot()["pms5003"]["counters"]["checksum_errors"] > 0
    finally:
        rig.close()


def test_a_frozen_sensor_is_stuck_and_its_values_rejected(rig: Rig, cabins: list[HardwareCabin]) -> None:
    # No weather: the fake BME680 reports the same raw sample every time.
    cabin = start_cabin(rig, cabins, policies={**FAST_POLICIES, "bme680": replace(FAST, stuck_after=8)})
    obs = pump(cabin, lambda o: cabin.health()["bme680"].reason == "stuck", "bme680 stuck")
    obs = pump(cabin, lambda o: bool(o.flags & FLAG_GAS_MISSING), "stuck values missing")
    assert obs.env is not None and math.isnan(obs.env.temperature_c)
    assert cabin.health()["bme680"].state in ("degraded", "failed")
    rig.start_weather()
    pump(cabin, lambda o: cabin.health()["bme680"].state == "ok", "bme680 recovered")


def test_a_silent_sensor_never_stalls_the_reads(tmp_path: Path, cabins: list[HardwareCabin]) -> None:
    rig = Rig(tmp_path, pm_interval_s=None)  # the PMS5003 never sends: every read waits its full timeout
    try:
        rig.start_weather()
        cabin = start_cabin(rig, cabins)
        reads = 0
        while cabin.health()["pms5003"].state != "failed":
            obs = cabin.read()
            reads += 1
            assert obs.flags & FLAG_PM_MISSING
            time.sleep(0.02)
        # While the PMS5003 reader sat in its 0.5 s timeouts, the loop went on with the other sensors.
        assert reads > cabin.channels["pms5003"].monitor.windows
        assert cabin.health()["pms5003"].reason == "timeout"
        assert cabin.health()["bme680"].state == "ok"
    finally:
        rig.close()


def test_check_sensors_on_the_fakes(rig: Rig) -> None:
    reports = {r.sensor: r for r in check_sensors(rig.profile(), rig.factories())}
    assert all(r.ok for r in reports.values()), reports
    assert reports["pms5003"].values["pm25_ug_m3"] == 7.0
    assert reports["pms5003"].values["particles_gt_0_3um_per_dl"] == 3500  # counts, as the sensor sends them
    assert reports["bme680"].values["gas_resistance_ohm"] == pytest.approx(expected(COEFFS_B, BASE_SAMPLE)[3], rel=1e-4)
    assert reports["bme680"].values["temperature_c"] == pytest.approx(expected(COEFFS_B, BASE_SAMPLE)[0], abs=1e-3)
    assert "UMA-8" in reports["microphone"].device and reports["microphone"].values["rms_dbfs"] < 0


def test_check_sensors_reports_each_failure_with_its_reason(rig: Rig) -> None:
    rig.unplug("bme680")
    rig.unplug("pms5003")
    rig.unplug("microphone")
    reports = {r.sensor: r for r in check_sensors(rig.profile(), rig.factories())}
    assert {s: (r.state, r.reason) for s, r in reports.items()} == {
        "bme680": ("failed", "disconnected"),
        "pms5003": ("failed", "disconnected"),
        "microphone": ("failed", "not_found"),
    }
    assert "no input device matching 'UMA-8'" in reports["microphone"].detail


def test_sensors_check_cli_in_process(rig: Rig, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from edge_agent.cli import sensors_check

    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / "rig-v1.yaml").write_text(yaml.safe_dump(rig.profile("rig-v1").model_dump()))
    config = config_from_dict({"device": {"profile": "rig-v1", "profile_dirs": [str(folder)]}})
    assert sensors_check(config, as_json=True, factories=rig.factories()) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["profile"] == "rig-v1" and [s["state"] for s in doc["sensors"]] == ["ok"] * 3
    rig.unplug("pms5003")
    assert sensors_check(config, factories=rig.factories()) == 1
    out = capsys.readouterr().out
    assert "pms5003     FAILED" in out and "disconnected" in out and "some sensors are not ok" in out


def test_sensors_check_cli_without_hardware(tmp_path: Path) -> None:
    """On this machine there is no I2C bus, no UART and no UMA-8: the real drivers say so, exit 1."""
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({"device": {"profile": "pi4-uma8-v1"}, "state_dir": str(tmp_path)}))
    done = subprocess.run(
        [sys.executable, "-m", "edge_agent", "sensors", "check", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    by_sensor = {s["sensor"]: s for s in doc["sensors"]}
    assert not doc["ok"] and set(by_sensor) == {"bme680", "pms5003", "microphone"}
    assert by_sensor["bme680"]["state"] == "failed" and by_sensor["bme680"]["reason"] in ("not_found", "disconnected")
    assert by_sensor["pms5003"]["reason"] == "disconnected" and "/dev/pms5003" in by_sensor["pms5003"]["detail"]
    assert by_sensor["microphone"]["state"] == "failed"


def test_an_unknown_profile_is_a_configuration_error(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({"device": {"profile": "pi9-nothing"}, "sensors": {"backend": "hardware"}}))
    done = subprocess.run(
        [sys.executable, "-m", "edge_agent", "sensors", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 2 and "no hardware profile 'pi9-nothing'" in done.stderr


# ------------------------------------------------------------------------- the agent program


def _control(rig: Rig, hang: threading.Event) -> None:
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "hang":
            hang.set()
        elif words[0] == "unhang":
            hang.clear()
        elif words[0] in ("unplug", "plug"):
            getattr(rig, words[0])(words[1])
        print(f"done {line.strip()}", flush=True)


class HangableCabin(HardwareCabin):
    """The hardware source, plus a way for the harness to hang the main loop inside a read."""

    hang = threading.Event()

    def read(self) -> Observation:
        """Block while the harness says ``hang`` (a stuck bus call, a wedged interpreter)."""
        while self.hang.is_set():
            time.sleep(0.05)
        return super().read()


def main(argv: list[str] | None = None) -> int:
    """The agent of `edge-agent run` on the rig's fakes, controlled through stdin."""
    from edge_agent.cli import run_service

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--rig", type=Path, required=True, help="folder for the rig's pty symlink")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    rig = Rig(args.rig)
    rig.start_weather()

    def make_hardware(config: AgentConfig, profile: HardwareProfile) -> HardwareCabin:
        return HangableCabin(
            profile, rate_hz=config.sensors.rate_hz, factories=rig.factories(), policies=FAST_POLICIES, env_period_s=0.1
        )

    threading.Thread(target=_control, args=(rig, HangableCabin.hang), name="rig-control", daemon=True).start()
    try:
        return run_service(args.config, make_hardware=make_hardware)
    finally:
        rig.close()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
