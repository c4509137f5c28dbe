"""The edge agent's cost: CPU and memory at nominal load (simulated and on the hardware fakes), replay, audio.

Method
------
Services: a private Mosquitto from the production configuration on a free port, and a
``fleet-collector serve`` subprocess storing into a fresh database on the machine's PostgreSQL
(created and dropped by this run), so every record is acknowledged end to end as in production.

(a) Nominal load. ``edge-agent run`` as a subprocess with the ``simulated`` sensor backend
(the built-in ``training`` scenario): 10 inferences/s, 16 kHz simulated audio (one 1,600-sample
window per inference), environmental readings refreshed at 1 Hz, the packaged reference bundle,
the default spool and uplink settings (500-record batches or 5 s, group commit every second).
After a warm-up, the agent's CPU time (``/proc/<pid>/stat`` utime + stime) is read at the start
and end of a measurement window: ``cpu_share_of_core`` = CPU seconds / wall seconds (1.0 = one
core busy). ``peak_rss_mb`` is the process's ``VmHWM`` (peak resident set over its whole life,
start-up included) at the end of the window. Records acknowledged during the window are counted
at the collector to show the agent really ran at 10/s. The simulated sensors are part of the
agent process here (on a vehicle ALSA and the I2C/serial drivers do that work instead); their
cost per read is measured in (c) so it can be told apart.

(b) Durable replay rate. ``edge-agent replay --rate 0`` of a feature CSV (the cabin dataset
cycled to ``--replay-rows`` rows, with its label column) through the same inference, spool
(SQLite, synchronous=FULL, group commits) and uplink path into the broker and the collector on
PostgreSQL. The command exits 0 only once the collector has acknowledged every record, so
``replay_records_per_s`` = rows / wall seconds from process start (bundle verification and golden
self-test included) to exit. The stored row count is checked afterwards.

(c) ``audio_feature_us_per_s``: the audio part of :class:`shared.features.FeaturePipeline` on
simulated cabin audio in the agent's window size (1,600 samples at 16 kHz, ten per second of
audio), in microseconds of one core per second of audio (median of 15 passes over 20 s of audio; the
fastest pass is reported beside it). For context
the same on one-second windows, the whole pipeline (environmental part included) per inference,
and the simulated sensors' cost per read.

(c2) Hardware fakes. The agent with the ``hardware`` backend, as a separate process (this script
run with ``--hardware-agent``: ``edge-agent run``'s code path, :func:`edge_agent.cli.run_service`,
whose hardware factory builds a :class:`~edge_agent.sensors.hardware.HardwareCabin` with the REAL
BME680, PMS5003 and microphone drivers on the bus-level fakes of ``tests/edge_agent``): a BME680 on
a fake SMBus read at 1 Hz (its conversion time on a fake clock, so the driver's waits cost no wall
time), a PMS5003 on a pty streaming one frame per second in active mode, and a UMA-8 on a fake
PortAudio stream delivering the 8-channel cabin recording at 16 kHz in real time (the driver keeps
channel 0); 10 inferences/s, default health policies, spool and uplink settings, publishing to the
same broker and collector as (a). Same warm-up and window as (a): ``hw_cpu_share_of_core`` and
``hw_peak_rss_mb`` are the agent process's. The fakes' threads (the audio stream's capture
thread, the PMS5003's writer, a 1 Hz "weather" thread moving the readings so that no sensor looks
stuck) live in that process and the fake SMBus answers inside the driver's calls, so both figures
include the fakes. To tell them apart the fakes also run alone in their own process (this script
with ``--hardware-fakes``) for the same window length: the audio stream into a callback that does
nothing, the PMS5003 into its pty (drained once a second), the fake bus answering once a second
the transactions the real driver made for one reading (recorded through the driver at start).
``hw_fakes_cpu_share_of_core`` is that process's CPU share and ``hw_net_cpu_share_of_core`` the
difference, an estimate: threads sharing one interpreter do not cost exactly the sum of their
costs apart. On a vehicle PortAudio's own capture thread runs in the agent's process instead of
the fake's, at a cost not measured here. The window's sensor states, the agent's own inference
count and the stored records' missing-input flags show that the figure is for all three sensors
working.

This machine is an x86 server, not a Raspberry Pi: every figure here was measured here and says
nothing about a Pi's figures without a run on a Pi.

Run: ``.venv/bin/python benchmarks/agent_load.py`` (about four minutes; ``--no-hardware`` skips (c2)).
Targets: ``cpu_share_of_core`` and ``hw_cpu_share_of_core`` <= 0.03, ``peak_rss_mb`` and
``hw_peak_rss_mb`` <= 150, ``replay_records_per_s`` >= 5,000.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    CLOCK_TICKS,
    DATASET,
    REPO,
    Collector,
    ServiceUnavailable,
    busy_share,
    cpu_jiffies,
    emit,
    machine,
    private_broker,
    proc_cpu_seconds,
    proc_status_mb,
    setup_logging,
    table,
    temporary_database,
    venv_bin,
)

log = logging.getLogger("benchmarks.agent_load")

TARGET_CPU_SHARE = 0.03
TARGET_PEAK_RSS_MB = 150.0
TARGET_REPLAY_PER_S = 5_000.0
RATE_HZ = 10.0
SAMPLE_RATE = 16_000


# --------------------------------------------------------------------------------- (c) audio


def audio_cost(passes: int = 15, seconds: int = 20) -> dict[str, float]:
    """Cost of the audio features (and of the rest of the pipeline and the simulator) per second of audio."""
    from edge_agent.sensors.simulated import SimulatedCabin, load_scenario
    from shared.features import FeaturePipeline

    cabin = SimulatedCabin(load_scenario("training"), seed=0, rate_hz=RATE_HZ, sample_rate=SAMPLE_RATE)
    n_reads = int(seconds * RATE_HZ)
    t0 = time.perf_counter()
    observations = [cabin.read() for _ in range(n_reads)]
    read_us = (time.perf_counter() - t0) / n_reads * 1e6
    windows = [o.audio for o in observations if o.audio is not None]
    envs = [o.env for o in observations]
    pipeline = FeaturePipeline(sample_rate=SAMPLE_RATE)
    audio = pipeline.audio
    long_windows = [np.concatenate(windows[i : i + int(RATE_HZ)]) for i in range(0, len(windows), int(RATE_HZ))]

    fastest: dict[str, float] = {}

    def timed(fn: Any) -> float:
        fn()  # warm caches and numpy's FFT plan
        runs = []
        for _ in range(passes):
            t = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t)
        fastest[fn.__name__] = min(runs)
        return statistics.median(runs)

    def agent_windows() -> None:
        for w in windows:
            audio(w)

    def one_second_windows() -> None:
        for w in long_windows:
            audio(w)

    def whole_pipeline() -> None:
        for env, w in zip(envs, windows, strict=True):
            pipeline(env, w)

    # The same windows cut from the fake UMA-8's recording (channel 0, what the c2 agent hears).
    from tests.edge_agent.fake_audio import cabin_recording

    channel = np.ascontiguousarray(cabin_recording()[:, 0])
    step = SAMPLE_RATE // int(RATE_HZ)
    uma8 = [
        np.take(channel, np.arange(i * step, (i + 1) * step), mode="wrap").astype(np.float32) for i in range(n_reads)
    ]

    def uma8_windows() -> None:
        for w in uma8:
            audio(w)

    audio_s = len(windows) / RATE_HZ
    agent_s = timed(agent_windows)
    return {
        "audio_feature_us_per_s": agent_s / audio_s * 1e6,
        "audio_feature_us_per_s_fastest_pass": fastest["agent_windows"] / audio_s * 1e6,
        "audio_feature_us_per_window": agent_s / len(windows) * 1e6,
        "audio_feature_us_per_s_1s_windows": timed(one_second_windows) / len(long_windows) * 1e6,
        "audio_feature_us_per_s_uma8_recording": timed(uma8_windows) / (len(uma8) / RATE_HZ) * 1e6,
        "pipeline_us_per_inference": timed(whole_pipeline) / len(windows) * 1e6,
        "simulated_sensors_us_per_read": read_us,
    }


# ------------------------------------------------------------------------------ (a) nominal


def nominal(
    broker_url: str, collector: Collector, database_url: str, folder: Path, warmup: float, window: float, slices: int
) -> dict[str, Any]:
    """``edge-agent run`` with simulated sensors at 10/s: CPU share and peak RSS over ``window`` seconds."""
    config = folder / "agent-run.yaml"
    device = "bench-agent-run"
    config.write_text(
        f"device: {{id: {device}}}\n"
        f'mqtt: {{url: "{broker_url}"}}\n'
        f"sensors: {{backend: simulated, rate_hz: {RATE_HZ}, sample_rate: {SAMPLE_RATE}, seed: 0}}\n"
        f"state_dir: {folder / 'agent-run'}\n"
    )
    log_path = folder / "agent-run.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [venv_bin("edge-agent"), "run", "--config", str(config)], stdout=log_file, stderr=subprocess.STDOUT
        )
        try:
            time.sleep(warmup)
            if proc.poll() is not None:
                raise RuntimeError(f"edge-agent run exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            pid = proc.pid
            stored0 = _stored(database_url, device)
            cpu0, col0, wall0, busy0 = (
                proc_cpu_seconds(pid),
                proc_cpu_seconds(_pid(collector)),
                time.monotonic(),
                cpu_jiffies(),
            )
            shares = []
            last_cpu, last_wall = cpu0, wall0
            for k in range(1, slices + 1):
                time.sleep(max(0.0, wall0 + window * k / slices - time.monotonic()))
                cpu, wall = proc_cpu_seconds(pid), time.monotonic()
                shares.append((cpu - last_cpu) / (wall - last_wall))
                last_cpu, last_wall = cpu, wall
            cpu1, col1, wall1, busy1 = last_cpu, proc_cpu_seconds(_pid(collector)), last_wall, cpu_jiffies()
            hwm, rss = proc_status_mb(pid, "VmHWM"), proc_status_mb(pid, "VmRSS")
            stored1 = _stored(database_url, device)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
    elapsed = wall1 - wall0
    acked = stored1 - stored0
    return {
        "cpu_share_of_core": (cpu1 - cpu0) / elapsed,
        "cpu_share_slices": [round(s, 4) for s in shares],
        "peak_rss_mb": hwm,
        "rss_mb_end": rss,
        "window_s": elapsed,
        "warmup_s": warmup,
        "records_stored_in_window": acked,
        "records_per_s_in_window": acked / elapsed,
        "collector_cpu_share_of_core": (col1 - col0) / elapsed,
        "machine_busy_share": busy_share(busy0, busy1),
        "agent_exit_code": code,
    }


def _pid(collector: Collector) -> int:
    assert collector.proc is not None
    return collector.proc.pid


# ------------------------------------------------------------------------------- (b) replay


def replay_csv(path: Path, rows: int) -> None:
    """The cabin dataset (features and label) cycled to ``rows`` rows."""
    with gzip.open(DATASET, "rt") as fh:
        header = fh.readline()
        data = [line for line in fh if line.strip()]
    with path.open("w") as out:
        out.write(header)
        for i in range(rows):
            out.write(data[i % len(data)])


def replay(broker_url: str, collector: Collector, database_url: str, folder: Path, rows: int) -> dict[str, Any]:
    """``edge-agent replay --rate 0`` of ``rows`` rows until every record is acknowledged."""
    csv_path = folder / "replay.csv"
    replay_csv(csv_path, rows)
    device = "bench-agent-replay"
    config = folder / "agent-replay.yaml"
    config.write_text(
        f'device: {{id: {device}}}\nmqtt: {{url: "{broker_url}"}}\nstate_dir: {folder / "agent-replay"}\n'
    )
    log_path = folder / "agent-replay.log"
    col0, busy0 = proc_cpu_seconds(_pid(collector)), cpu_jiffies()
    with log_path.open("wb") as log_file:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [
                venv_bin("edge-agent"),
                "replay",
                "--config",
                str(config),
                "--csv",
                str(csv_path),
                "--label-column",
                "label",
                "--rate",
                "0",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        # wait4 gives this child's own CPU time and peak RSS, which /proc no longer has after exit.
        _pid_done, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    col1, busy1 = proc_cpu_seconds(_pid(collector)), cpu_jiffies()
    stored = _stored(database_url, device)
    if proc.returncode != 0:
        log.error("edge-agent replay exited %d: %s", proc.returncode, log_path.read_text()[-2000:])
    if stored != rows:
        log.error("the collector stored %d of the %d replayed rows: the rate is not a valid figure", stored, rows)
    valid = proc.returncode == 0 and stored == rows
    return {
        "replay_records_per_s": rows / elapsed if valid else None,
        "rows": rows,
        "seconds": elapsed,
        "exit_code": proc.returncode,
        "stored": stored,
        "agent_cpu_share_of_core": (usage.ru_utime + usage.ru_stime) / elapsed,
        "collector_cpu_share_of_core": (col1 - col0) / elapsed,
        "machine_busy_share": busy_share(busy0, busy1),
        "agent_peak_rss_mb": usage.ru_maxrss / 1024,
    }


def _stored(database_url: str, device: str) -> int:
    import psycopg

    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM inference WHERE device_id = %s", (device,)).fetchone()
    return int(row[0]) if row else 0


# ------------------------------------------------------------------------- (c2) hardware fakes

# A BME680's calibration registers as read off a device (blocks at 0x8A, 0xE1 and 0x00; the
# "device-dump-A" set of tests/edge_agent/test_bme680.py, copied so that pytest stays out of the
# measured process).
BME680_CALIBRATION_DUMP = (
    [178, 102, 3, 16, 67, 138, 91, 215, 88, 0, 228, 18, 138, 255, 26, 30, 0, 0, 3, 253, 217, 242, 30],
    [63, 221, 44, 0, 45, 20, 120, 156, 83, 102, 175, 232, 226, 18],
    [50, 170, 22, 74, 19],
)
HW_PROFILE = "bench-rig-v1"
ENV_PERIOD_S = 1.0  # BME680 and PMS5003 at 1 Hz
FAKES_WARMUP_S = 5.0  # the fakes alone have nothing to warm up beyond their start


class HardwareRig:
    """The fake wiring of one unit at nominal rates, from the drivers' bus-level fakes in ``tests.edge_agent``.

    A BME680 on a fake SMBus (:class:`FakeBme680Bus`, its conversion time on a fake clock, so the
    driver's waits cost no wall time, as a sleeping thread costs no CPU on a vehicle), a PMS5003
    streaming one frame per second on a pty behind a udev-like symlink, and a UMA-8 whose fake
    PortAudio stream delivers the 8-channel cabin recording in real time at 16 kHz. A 1 Hz
    "weather" thread moves the readings a little, so that no sensor is ever declared stuck.
    """

    def __init__(self, folder: Path) -> None:
        from tests.edge_agent.fake_audio import FakeUma8
        from tests.edge_agent.fake_bme680 import FakeBme680Bus, FakeClock, RawSample, raw_calibration_registers
        from tests.edge_agent.fake_pms5003 import FakePms5003

        self.clock = FakeClock()
        self.bus = FakeBme680Bus(raw_calibration_registers(*BME680_CALIBRATION_DUMP), clock=self.clock)
        self.base_sample = RawSample(temp_adc=489_330, press_adc=380_000, hum_adc=24_500, gas_adc=612, gas_range=6)
        self.bus.sample = self.base_sample
        self.pms = FakePms5003(self._pm_values(0), interval_s=ENV_PERIOD_S)
        folder.mkdir(parents=True, exist_ok=True)
        self.link = folder / "pms5003"
        self.link.symlink_to(self.pms.device)
        self.uma = FakeUma8()
        self._stop = threading.Event()
        self._weather = threading.Thread(target=self._run_weather, name="rig-weather", daemon=True)
        self._weather.start()

    @staticmethod
    def _pm_values(k: int) -> Any:
        from tests.edge_agent.fake_pms5003 import Values

        d = k % 5
        return Values(
            pm1_cf1=5 + d,
            pm25_cf1=8 + d,
            pm10_cf1=12 + d,
            pm1=4 + d,
            pm25=7 + d,
            pm10=11 + d,
            particles_per_dl=(3500 + 37 * d, 1200 + 11 * d, 150 + d, 12, 3, 1),
        )

    def _run_weather(self) -> None:
        k = 0
        while not self._stop.wait(ENV_PERIOD_S):
            k += 1
            self.bus.sample = dataclasses.replace(self.base_sample, temp_adc=self.base_sample.temp_adc + 40 * (k % 17))
            self.pms.values = self._pm_values(k)
            # The fakes keep a transaction log for the tests' assertions: keep it from growing here.
            self.bus.log.clear()
            self.clock.sleeps.clear()

    def factories(self) -> Any:
        """The real drivers on the rig's fake bus, pty and audio host, opened as on a vehicle."""
        from edge_agent.sensors.bme680 import Bme680
        from edge_agent.sensors.hardware import DriverFactories
        from edge_agent.sensors.microphone import Microphone
        from edge_agent.sensors.pms5003 import Pms5003

        return DriverFactories(
            bme680=lambda c: Bme680(self.bus, c.bme680_address, clock=self.clock.monotonic, sleep=self.clock.sleep),
            pms5003=lambda c: Pms5003.open(c.device, c.baud, mode="active", read_timeout_s=3.0),
            microphone=lambda c: Microphone(
                device_match=c.device_match,
                sample_rate=c.sample_rate,
                channels=c.channels,
                channel=c.channel,
                stream_factory=self.uma.input_stream,
                query_devices=self.uma.query_devices,
            ),
        )

    def close(self) -> None:
        """Stop the weather, the PMS5003's thread and every audio stream."""
        self._stop.set()
        self.pms.close()
        for stream in self.uma.streams:
            stream.close()


class _BusRecorder:
    """An SMBus stand-in that forwards to the fake bus and records the calls (and the driver's sleeps)."""

    def __init__(self, bus: Any, clock: Any) -> None:
        self.bus = bus
        self.clock = clock
        self.ops: list[tuple[str, tuple[Any, ...]]] = []
        self.recording = False

    def sleep(self, seconds: float) -> None:
        """The driver's sleep, on the rig's fake clock."""
        if self.recording:
            self.ops.append(("sleep", (seconds,)))
        self.clock.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.bus, name)
        if not callable(target):
            return target

        def call(*args: Any) -> Any:
            if self.recording:
                self.ops.append((name, args))
            return target(*args)

        return call


THREAD_MAP = "threads.json"


def _install_thread_map(folder: Path) -> None:
    """On SIGUSR1 write ``{native thread id: name}`` of this process's Python threads to ``folder/threads.json``.

    CPython does not name its OS threads, so the parent needs this to attribute ``/proc`` task CPU
    time to threads; it costs nothing until asked.
    """

    def write(_signum: int, _frame: Any) -> None:
        names = {str(t.native_id): t.name for t in threading.enumerate() if t.native_id is not None}
        tmp = folder / (THREAD_MAP + ".tmp")
        tmp.write_text(json.dumps(names))
        os.replace(tmp, folder / THREAD_MAP)

    signal.signal(signal.SIGUSR1, write)


def _thread_names(pid: int, folder: Path, timeout: float = 5.0) -> dict[int, str]:
    """Ask process ``pid`` (SIGUSR1) for its Python threads' names by native id."""
    path = folder / THREAD_MAP
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            return {int(k): v for k, v in json.loads(path.read_text()).items()}
        time.sleep(0.05)
    return {}


def _task_cpu(pid: int) -> dict[int, float]:
    """CPU seconds so far of each thread (``/proc/<pid>/task/<tid>/stat``) of ``pid``."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            raw = (task / "stat").read_text()
            fields = raw[raw.rindex(")") + 2 :].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return out


def _by_thread(
    names: dict[int, str], before: dict[int, float], after: dict[int, float], seconds: float
) -> dict[str, float]:
    """Share of one core per thread name over a window, busiest first (threads Python does not know: "native")."""
    shares: dict[str, float] = {}
    for tid, cpu in after.items():
        name = names.get(tid, "native (not a Python thread)")
        # A thread started during the window counts from zero.
        shares[name] = shares.get(name, 0.0) + (cpu - before.get(tid, 0.0)) / seconds
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


def hardware_agent(config: Path, rig_folder: Path) -> int:
    """The c2 agent process: ``edge-agent run``'s code path with the hardware backend on the rig's fakes."""
    from edge_agent.cli import run_service
    from edge_agent.config import AgentConfig
    from edge_agent.sensors.hardware import HardwareCabin
    from shared.profile import HardwareProfile

    # As `edge-agent run` logs by default, so that (a) and (c2) pay the same for logging.
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"
    )
    rig = HardwareRig(rig_folder)
    _install_thread_map(rig_folder)

    def make_hardware(cfg: AgentConfig, profile: HardwareProfile) -> HardwareCabin:
        return HardwareCabin(profile, rate_hz=cfg.sensors.rate_hz, factories=rig.factories(), env_period_s=ENV_PERIOD_S)

    try:
        return run_service(config, make_hardware=make_hardware)
    finally:
        rig.close()


def hardware_fakes(rig_folder: Path) -> int:
    """The c2 fakes alone, doing what they do for the agent, without the agent, until SIGTERM.

    The UMA-8 stream delivers to a callback that does nothing; the PMS5003 streams into its pty,
    drained once a second; the BME680 bus answers, once a second, the very transactions the real
    driver made for one reading (recorded through the driver at start).
    """
    from edge_agent.sensors.bme680 import Bme680

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _s, _f: stop.set())
    rig = HardwareRig(rig_folder)
    _install_thread_map(rig_folder)
    recorder = _BusRecorder(rig.bus, rig.clock)
    driver = Bme680(recorder, 0x76, clock=rig.clock.monotonic, sleep=recorder.sleep)
    driver.read()  # the first reading also sets the chip up: record a steady-state one
    recorder.recording = True
    driver.read()
    recorder.recording = False
    ops = list(recorder.ops)

    def bme680_loop() -> None:
        while not stop.wait(ENV_PERIOD_S):
            for name, args in ops:
                if name == "sleep":
                    rig.clock.sleep(*args)
                else:
                    getattr(rig.bus, name)(*args)

    def pms5003_drain() -> None:
        fd = os.open(rig.link, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            while not stop.wait(ENV_PERIOD_S):
                with contextlib.suppress(BlockingIOError):
                    os.read(fd, 4096)
        finally:
            os.close(fd)

    def nothing(*_args: Any) -> None:
        return None

    stream = rig.uma.input_stream(
        device=rig.uma.index, channels=8, samplerate=SAMPLE_RATE, dtype="float32", blocksize=0, callback=nothing
    )
    stream.start()
    threads = [threading.Thread(target=f, name=f.__name__, daemon=True) for f in (bme680_loop, pms5003_drain)]
    for thread in threads:
        thread.start()
    print(f"fakes running; one BME680 reading replays {len(ops)} driver calls (bus and fake-clock sleeps)", flush=True)
    try:
        stop.wait()
    finally:
        rig.close()
    return 0


def _write_hw_config(folder: Path, broker_url: str, device: str) -> Path:
    """The rig's profile (pi4-uma8-v1 with the rig's serial symlink) and the agent's configuration."""
    import yaml

    from shared.profile import find_profile

    profiles = folder / "profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    base = find_profile("pi4-uma8-v1", [REPO / "firmware_configs"])
    profile = base.model_copy(
        update={"name": HW_PROFILE, "uart": base.uart.model_copy(update={"device": str(folder / "rig" / "pms5003")})}
    )
    (profiles / f"{HW_PROFILE}.yaml").write_text(yaml.safe_dump(profile.model_dump()))
    config = folder / "agent-hw.yaml"
    config.write_text(
        f"device: {{id: {device}, profile: {HW_PROFILE}, profile_dirs: [{profiles}]}}\n"
        f'mqtt: {{url: "{broker_url}"}}\n'
        f"sensors: {{backend: hardware, rate_hz: {RATE_HZ}, sample_rate: {SAMPLE_RATE}}}\n"
        f"state_dir: {folder / 'agent-hw'}\n"
    )
    return config


def _status_file(path: Path) -> dict[str, Any]:
    """The agent's status file (written every 2 s), or {} while there is none."""
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
        return doc
    except (OSError, ValueError):
        return {}


def _sensor_states(status: dict[str, Any]) -> dict[str, str]:
    return {
        name: f"{h.get('state')}" + (f" ({h.get('reason')})" if h.get("reason") else "")
        for name, h in status.get("sensors", {}).items()
    }


def _measure(pid: int, window: float, slices: int) -> tuple[float, float, float, list[float]]:
    """CPU seconds of ``pid`` over ``window`` seconds from now: (cpu used, wall start, wall end, per-slice shares)."""
    cpu0, wall0 = proc_cpu_seconds(pid), time.monotonic()
    shares = []
    last_cpu, last_wall = cpu0, wall0
    for k in range(1, slices + 1):
        time.sleep(max(0.0, wall0 + window * k / slices - time.monotonic()))
        cpu, wall = proc_cpu_seconds(pid), time.monotonic()
        shares.append((cpu - last_cpu) / (wall - last_wall))
        last_cpu, last_wall = cpu, wall
    return last_cpu - cpu0, wall0, last_wall, shares


def _stop_process(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def hardware_nominal(
    broker_url: str, collector: Collector, database_url: str, folder: Path, warmup: float, window: float, slices: int
) -> dict[str, Any]:
    """The agent on the three hardware fakes at 10/s: CPU share and peak RSS over ``window`` seconds."""
    device = "bench-agent-hw"
    hw_folder = folder / "hw"
    config = _write_hw_config(hw_folder, broker_url, device)
    (hw_folder / "rig").mkdir()
    status_path = hw_folder / "agent-hw" / "status.json"
    log_path = folder / "agent-hw.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--hardware-agent",
                str(config),
                "--rig",
                str(hw_folder / "rig"),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        try:
            time.sleep(warmup)
            if proc.poll() is not None:
                raise RuntimeError(f"the hardware agent exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            pid = proc.pid
            status0 = _status_file(status_path)
            stored0, ts0 = _stored(database_url, device), time.time()
            names = _thread_names(pid, hw_folder / "rig")
            col0, busy0, tasks0 = proc_cpu_seconds(_pid(collector)), cpu_jiffies(), _task_cpu(pid)
            cpu, wall0, wall1, shares = _measure(pid, window, slices)
            col1, busy1, tasks1 = proc_cpu_seconds(_pid(collector)), cpu_jiffies(), _task_cpu(pid)
            hwm, rss = proc_status_mb(pid, "VmHWM"), proc_status_mb(pid, "VmRSS")
            stored1, ts1 = _stored(database_url, device), time.time()
            status1 = _status_file(status_path)
        finally:
            code = _stop_process(proc)
    elapsed = wall1 - wall0
    loop0, loop1 = status0.get("loop", {}), status1.get("loop", {})
    dt_status = float(status1.get("updated_at", 0.0)) - float(status0.get("updated_at", 0.0))
    inferred = int(loop1.get("records", 0)) - int(loop0.get("records", 0))
    details = status1.get("sensor_details", {})
    flagged = _flagged(database_url, device, ts0, ts1)
    return {
        "cpu_share_of_core": cpu / elapsed,
        "cpu_share_slices": [round(s, 4) for s in shares],
        "peak_rss_mb": hwm,
        "rss_mb_end": rss,
        "window_s": elapsed,
        "warmup_s": warmup,
        "inferences_per_s_in_window": inferred / dt_status if dt_status > 0 else None,
        "records_stored_in_window": stored1 - stored0,
        "records_stored_with_ts_in_window": flagged["records"],
        "records_with_missing_inputs": flagged["missing"],
        "records_with_audio_overrun": flagged["overrun"],
        "sensors_at_window_start": _sensor_states(status0),
        "sensors_at_window_end": _sensor_states(status1),
        "sensor_reads_at_window_end": {name: d.get("reads") for name, d in details.items()},
        "microphone_counters_at_window_end": details.get("microphone", {}).get("counters", {}),
        "cpu_share_by_thread": _by_thread(names, tasks0, tasks1, elapsed),
        "collector_cpu_share_of_core": (col1 - col0) / elapsed,
        "machine_busy_share": busy_share(busy0, busy1),
        "agent_exit_code": code,
    }


def _flagged(database_url: str, device: str, ts0: float, ts1: float) -> dict[str, int]:
    """Stored records inferred in [ts0, ts1]: how many, how many lacked an input, how many had an audio overrun."""
    import psycopg

    from shared.features import FLAG_AUDIO_MISSING, FLAG_AUDIO_OVERRUN, FLAG_GAS_MISSING, FLAG_PM_MISSING

    missing = FLAG_GAS_MISSING | FLAG_PM_MISSING | FLAG_AUDIO_MISSING
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE sensor_flags & %s <> 0), "
            "count(*) FILTER (WHERE sensor_flags & %s <> 0) "
            "FROM inference WHERE device_id = %s AND ts BETWEEN %s AND %s",
            (missing, FLAG_AUDIO_OVERRUN, device, ts0, ts1),
        ).fetchone()
    n, m, o = row if row else (0, 0, 0)
    return {"records": int(n), "missing": int(m), "overrun": int(o)}


def hardware_fakes_alone(folder: Path, warmup: float, window: float, slices: int) -> dict[str, Any]:
    """The fakes without the agent, in their own process: their CPU share over the same window."""
    rig_folder = folder / "fakes-rig"
    log_path = folder / "fakes.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--hardware-fakes", "--rig", str(rig_folder)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        try:
            time.sleep(warmup)
            if proc.poll() is not None:
                raise RuntimeError(f"the fakes process exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            names = _thread_names(proc.pid, rig_folder)
            tasks0 = _task_cpu(proc.pid)
            cpu, wall0, wall1, shares = _measure(proc.pid, window, slices)
            tasks1 = _task_cpu(proc.pid)
            hwm = proc_status_mb(proc.pid, "VmHWM")
        finally:
            code = _stop_process(proc)
    return {
        "cpu_share_of_core": cpu / (wall1 - wall0),
        "cpu_share_slices": [round(s, 4) for s in shares],
        "cpu_share_by_thread": _by_thread(names, tasks0, tasks1, wall1 - wall0),
        "peak_rss_mb": hwm,
        "window_s": wall1 - wall0,
        "warmup_s": warmup,
        "exit_code": code,
        "log": log_path.read_text(errors="replace").strip()[-300:],
    }


def hardware(
    broker_url: str, collector: Collector, database_url: str, folder: Path, warmup: float, window: float, slices: int
) -> dict[str, Any]:
    """(c2): the agent on the three hardware fakes, then the fakes alone; prints its account."""
    print()
    print(
        f"(c2) the agent on the hardware fakes (BME680 on a fake SMBus, PMS5003 on a pty, UMA-8 on a fake "
        f"PortAudio stream), {RATE_HZ:.0f} inferences/s: warm-up {warmup:.0f} s, window {window:.0f} s ..."
    )
    out: dict[str, Any] = {}
    try:
        agent = hardware_nominal(broker_url, collector, database_url, folder, warmup, window, slices)
    except (RuntimeError, OSError, ImportError) as exc:
        log.error("(c2) the agent on the hardware fakes failed: %s", exc)
        print(f"(c2) failed: {exc}")
        return {"error": str(exc)}
    out["agent"] = agent
    fakes_warmup = min(warmup, FAKES_WARMUP_S)
    print(f"(c2) the fakes alone, in their own process: warm-up {fakes_warmup:.0f} s, window {window:.0f} s ...")
    try:
        out["fakes"] = hardware_fakes_alone(folder, fakes_warmup, window, slices)
    except (RuntimeError, OSError, ImportError) as exc:
        log.error("(c2) the fakes alone failed: %s", exc)
        out["fakes"] = {"error": str(exc)}
    fakes = out["fakes"]
    net = agent["cpu_share_of_core"] - fakes["cpu_share_of_core"] if "cpu_share_of_core" in fakes else None
    out["net_cpu_share_of_core"] = net
    rows: list[list[Any]] = [
        ["agent process CPU share of one core (fakes' threads included)", agent["cpu_share_of_core"]],
        ["  per slice", " ".join(f"{s:.4f}" for s in agent["cpu_share_slices"])],
        ["fakes alone, CPU share of one core (same window length)", fakes.get("cpu_share_of_core", "n/a")],
        ["  per slice", " ".join(f"{s:.4f}" for s in fakes.get("cpu_share_slices", []))],
        ["agent net of the fakes' own cost", "n/a" if net is None else net],
        ["agent peak RSS (VmHWM), MiB (fakes included)", agent["peak_rss_mb"]],
        ["agent RSS at the end, MiB", agent["rss_mb_end"]],
        ["fakes-alone process peak RSS, MiB (interpreter + numpy + fakes)", fakes.get("peak_rss_mb", "n/a")],
        ["inferences per s in the window (agent's own counter)", agent["inferences_per_s_in_window"] or "n/a"],
        ["records stored by the collector in the window", agent["records_stored_in_window"]],
        ["stored records inferred in the window (uploaded when it stopped)", agent["records_stored_with_ts_in_window"]],
        ["  of which with a missing sensor input", agent["records_with_missing_inputs"]],
        ["  of which with an audio overrun", agent["records_with_audio_overrun"]],
        ["sensors at the window's start", _states_text(agent["sensors_at_window_start"])],
        ["sensors at the window's end", _states_text(agent["sensors_at_window_end"])],
        [
            "environmental sensor reads so far",
            " ".join(f"{k} {v}" for k, v in agent["sensor_reads_at_window_end"].items() if v),
        ],
        [
            "microphone so far",
            " ".join(f"{k} {v}" for k, v in agent["microphone_counters_at_window_end"].items()) or "n/a",
        ],
        ["collector CPU share of one core (same window)", agent["collector_cpu_share_of_core"]],
        ["whole machine busy (all CPUs)", agent["machine_busy_share"]],
    ]
    print(table(["measure", "value"], rows))
    if fakes.get("log"):
        print(f"fakes process said: {fakes['log']}")
    print("CPU share of one core by thread, agent process (fakes' threads: fake-*, rig-*):")
    print(_threads_text(agent["cpu_share_by_thread"]))
    if "cpu_share_by_thread" in fakes:
        print("CPU share of one core by thread, fakes alone:")
        print(_threads_text(fakes["cpu_share_by_thread"]))
    return out


def _threads_text(shares: dict[str, float]) -> str:
    return "\n".join(f"  {share:.4f}  {name}" for name, share in shares.items() if share > 0) or "  n/a"


def _states_text(states: dict[str, str]) -> str:
    return " ".join(f"{k} {v}" for k, v in states.items()) or "n/a (no status file)"


def _hw_keys(hw: dict[str, Any] | None) -> dict[str, float | None]:
    """The (c2) figures of the JSON line (None where not measured)."""
    agent = (hw or {}).get("agent") or {}
    fakes = (hw or {}).get("fakes") or {}
    net = (hw or {}).get("net_cpu_share_of_core")

    def r(v: Any, digits: int) -> float | None:
        return None if v is None else round(float(v), digits)

    return {
        "hw_cpu_share_of_core": r(agent.get("cpu_share_of_core"), 4),
        "hw_peak_rss_mb": r(agent.get("peak_rss_mb"), 1),
        "hw_fakes_cpu_share_of_core": r(fakes.get("cpu_share_of_core"), 4),
        "hw_net_cpu_share_of_core": r(net, 4),
    }


def _rounded(value: Any) -> Any:
    """``value`` with every float rounded to 4 digits, through dicts and lists."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run (c), (a), (c2) and (b), print the account and the JSON line."""
    parser = argparse.ArgumentParser(description="Edge agent CPU, memory, replay rate and audio feature cost.")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds before the nominal-load window")
    parser.add_argument("--window", type=float, default=60.0, help="nominal-load measurement window (s)")
    parser.add_argument("--slices", type=int, default=6, help="CPU share also reported per slice of the window")
    parser.add_argument("--replay-rows", type=int, default=100_000, help="rows replayed in (b)")
    parser.add_argument("--no-hardware", action="store_true", help="skip (c2), the agent on the hardware fakes")
    # The (c2) subprocesses are this script in another mode.
    parser.add_argument("--hardware-agent", type=Path, metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--hardware-fakes", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rig", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hardware_agent is not None:
        return hardware_agent(args.hardware_agent, args.rig)
    if args.hardware_fakes:
        return hardware_fakes(args.rig)
    setup_logging(logging.WARNING)
    host = machine()
    print("agent_load: edge agent at nominal load, durable replay rate, audio feature cost")
    print(f"machine: {host['nproc']} x {host['cpu_model']} ({host['arch']}), {host['ram_gib']} GiB, {host['date']}")
    print("note: an x86 server, not a Raspberry Pi; figures below were measured here and hold for here only")

    audio = audio_cost()
    print()
    print("(c) audio features (shared.features.FeaturePipeline), one core:")
    print(
        table(
            ["measure", "value"],
            [
                [
                    "audio features, us per second of 16 kHz audio (1,600-sample windows)",
                    audio["audio_feature_us_per_s"],
                ],
                ["  the same, fastest pass", audio["audio_feature_us_per_s_fastest_pass"]],
                ["audio features, us per 1,600-sample window", audio["audio_feature_us_per_window"]],
                [
                    "audio features, us per second of audio (16,000-sample windows)",
                    audio["audio_feature_us_per_s_1s_windows"],
                ],
                ["whole pipeline (environment + audio), us per inference", audio["pipeline_us_per_inference"]],
                [
                    "audio features, us per second of the fake UMA-8's recording (1,600-sample windows)",
                    audio["audio_feature_us_per_s_uma8_recording"],
                ],
                ["simulated sensors, us per read (not on a vehicle)", audio["simulated_sensors_us_per_read"]],
            ],
        )
    )

    with tempfile.TemporaryDirectory(prefix="bench-agent-load-") as tmp:
        folder = Path(tmp)
        try:
            with private_broker(folder) as broker, temporary_database("bench_agent_load") as database_url:
                collector = Collector(database_url, broker.url, folder / "collector", folder / "collector.log")
                collector.start()
                try:
                    print()
                    print(
                        f"(a) edge-agent run, simulated sensors at {RATE_HZ:.0f}/s: warm-up {args.warmup:.0f} s, "
                        f"window {args.window:.0f} s ..."
                    )
                    a = nominal(broker.url, collector, database_url, folder, args.warmup, args.window, args.slices)
                    print(
                        table(
                            ["measure", "value"],
                            [
                                ["agent CPU share of one core", a["cpu_share_of_core"]],
                                ["agent CPU share per slice", " ".join(f"{s:.4f}" for s in a["cpu_share_slices"])],
                                ["agent peak RSS (VmHWM), MiB", a["peak_rss_mb"]],
                                ["agent RSS at the end, MiB", a["rss_mb_end"]],
                                ["records stored by the collector per s in the window", a["records_per_s_in_window"]],
                                ["collector CPU share of one core (same window)", a["collector_cpu_share_of_core"]],
                                ["whole machine busy (all CPUs)", a["machine_busy_share"]],
                            ],
                        )
                    )
                    hw = None
                    if not args.no_hardware:
                        hw = hardware(
                            broker.url, collector, database_url, folder, args.warmup, args.window, args.slices
                        )
                    print()
                    print(f"(b) edge-agent replay --rate 0 of {args.replay_rows:,} rows, collector on PostgreSQL ...")
                    b = replay(broker.url, collector, database_url, folder, args.replay_rows)
                    print(
                        table(
                            ["measure", "value"],
                            [
                                ["exit code", b["exit_code"]],
                                ["seconds, start to exit (all acknowledged)", b["seconds"]],
                                ["records per s", b["replay_records_per_s"] or "n/a (failed or not all stored)"],
                                ["rows stored by the collector", b["stored"]],
                                ["agent CPU share of one core", b["agent_cpu_share_of_core"]],
                                ["collector CPU share of one core", b["collector_cpu_share_of_core"]],
                                ["whole machine busy (all CPUs)", b["machine_busy_share"]],
                                ["agent peak RSS, MiB", b["agent_peak_rss_mb"]],
                            ],
                        )
                    )
                finally:
                    collector.stop()
        except ServiceUnavailable as exc:
            print(f"cannot run (a) and (b): {exc}")
            emit(
                {
                    "benchmark": "agent_load",
                    "error": str(exc),
                    "cpu_share_of_core": None,
                    "peak_rss_mb": None,
                    "replay_records_per_s": None,
                    "audio_feature_us_per_s": round(audio["audio_feature_us_per_s"], 1),
                    "hw_cpu_share_of_core": None,
                    "hw_peak_rss_mb": None,
                    "hw_fakes_cpu_share_of_core": None,
                    "hw_net_cpu_share_of_core": None,
                    "machine": host,
                }
            )
            return 1

    print()
    hw_keys = _hw_keys(hw)
    for name, value, target, better in (
        ("cpu_share_of_core", a["cpu_share_of_core"], TARGET_CPU_SHARE, "<="),
        ("peak_rss_mb", a["peak_rss_mb"], TARGET_PEAK_RSS_MB, "<="),
        ("replay_records_per_s", b["replay_records_per_s"], TARGET_REPLAY_PER_S, ">="),
        ("hw_cpu_share_of_core (fakes included)", hw_keys["hw_cpu_share_of_core"], TARGET_CPU_SHARE, "<="),
        (
            "hw_net_cpu_share_of_core (fakes' own cost taken off)",
            hw_keys["hw_net_cpu_share_of_core"],
            TARGET_CPU_SHARE,
            "<=",
        ),
        ("hw_peak_rss_mb (fakes included)", hw_keys["hw_peak_rss_mb"], TARGET_PEAK_RSS_MB, "<="),
    ):
        met = value is not None and (value <= target if better == "<=" else value >= target)
        shown = None if value is None else round(value, 4)
        verdict = "not measured" if value is None and name.startswith("hw_") else ("met" if met else "MISSED")
        print(f"{name}: {shown} (target {better} {target}: {verdict})")
    emit(
        {
            "benchmark": "agent_load",
            "cpu_share_of_core": round(a["cpu_share_of_core"], 4),
            "peak_rss_mb": round(a["peak_rss_mb"], 1),
            "replay_records_per_s": round(b["replay_records_per_s"], 0) if b["replay_records_per_s"] else None,
            "audio_feature_us_per_s": round(audio["audio_feature_us_per_s"], 1),
            **hw_keys,
            "targets": {
                "cpu_share_of_core": TARGET_CPU_SHARE,
                "peak_rss_mb": TARGET_PEAK_RSS_MB,
                "replay_records_per_s": TARGET_REPLAY_PER_S,
            },
            "nominal": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in a.items()},
            "replay": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in b.items()},
            "hardware": _rounded(hw),
            "audio": {k: round(v, 2) for k, v in audio.items()},
            "machine": host,
        }
    )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
