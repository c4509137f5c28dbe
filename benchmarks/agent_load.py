"""The edge agent's cost: CPU and memory at nominal load, durable replay rate, audio feature cost.

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

This machine is an x86 server, not a Raspberry Pi: every figure here was measured here and says
nothing about a Pi's figures without a run on a Pi.

Run: ``.venv/bin/python benchmarks/agent_load.py`` (about a minute and a half).
Targets: ``cpu_share_of_core`` <= 0.03, ``peak_rss_mb`` <= 150, ``replay_records_per_s`` >= 5,000.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    DATASET,
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

    audio_s = len(windows) / RATE_HZ
    agent_s = timed(agent_windows)
    return {
        "audio_feature_us_per_s": agent_s / audio_s * 1e6,
        "audio_feature_us_per_s_fastest_pass": fastest["agent_windows"] / audio_s * 1e6,
        "audio_feature_us_per_window": agent_s / len(windows) * 1e6,
        "audio_feature_us_per_s_1s_windows": timed(one_second_windows) / len(long_windows) * 1e6,
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


# ---------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run (c), (a) and (b), print the account and the JSON line."""
    parser = argparse.ArgumentParser(description="Edge agent CPU, memory, replay rate and audio feature cost.")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds before the nominal-load window")
    parser.add_argument("--window", type=float, default=60.0, help="nominal-load measurement window (s)")
    parser.add_argument("--slices", type=int, default=6, help="CPU share also reported per slice of the window")
    parser.add_argument("--replay-rows", type=int, default=100_000, help="rows replayed in (b)")
    args = parser.parse_args(argv)
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
                    "machine": host,
                }
            )
            return 1

    print()
    for name, value, target, better in (
        ("cpu_share_of_core", a["cpu_share_of_core"], TARGET_CPU_SHARE, "<="),
        ("peak_rss_mb", a["peak_rss_mb"], TARGET_PEAK_RSS_MB, "<="),
        ("replay_records_per_s", b["replay_records_per_s"], TARGET_REPLAY_PER_S, ">="),
    ):
        met = value is not None and (value <= target if better == "<=" else value >= target)
        shown = None if value is None else round(value, 4)
        print(f"{name}: {shown} (target {better} {target}: {'met' if met else 'MISSED'})")
    emit(
        {
            "benchmark": "agent_load",
            "cpu_share_of_core": round(a["cpu_share_of_core"], 4),
            "peak_rss_mb": round(a["peak_rss_mb"], 1),
            "replay_records_per_s": round(b["replay_records_per_s"], 0) if b["replay_records_per_s"] else None,
            "audio_feature_us_per_s": round(audio["audio_feature_us_per_s"], 1),
            "targets": {
                "cpu_share_of_core": TARGET_CPU_SHARE,
                "peak_rss_mb": TARGET_PEAK_RSS_MB,
                "replay_records_per_s": TARGET_REPLAY_PER_S,
            },
            "nominal": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in a.items()},
            "replay": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in b.items()},
            "audio": {k: round(v, 2) for k, v in audio.items()},
            "machine": host,
        }
    )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
