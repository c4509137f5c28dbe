"""The real cabin: BME680, PMS5003 and the microphone array of a hardware profile, with health and reopening.

:class:`HardwareCabin` owns the three drivers, built from the profile by injectable factories
(tests pass the real drivers on bus-level fakes). The two environmental sensors are read at
``env_period_s`` (1 Hz) by one named thread each, so a slow or hung sensor never stalls the
inference loop, which only takes their latest reading; a third thread opens and reopens the
microphone, whose window the main loop takes at every inference.

Each sensor has a :class:`~edge_agent.sensors.health.SensorMonitor`: every read attempt is a
window; readings outside the profile's ranges or stuck are rejected; a failing sensor's inputs
become NaN (the pipeline flags them ``FLAG_*_MISSING`` and the engine imputes the bundle's
reference mean), it is closed and reopened with exponential backoff, and its state changes are
``sensor_state`` events. Nothing a sensor does raises out of :meth:`HardwareCabin.read`.

:func:`check_sensors` reads each sensor once through the same drivers and range checks, for
`edge-agent sensors check` at bring-up.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from edge_agent.sensors.base import Observation, Source
from edge_agent.sensors.errors import SensorDisconnected, SensorError
from edge_agent.sensors.health import HealthPolicy, SensorMonitor, apply_ranges
from shared.features import (
    ENV_FEATURES,
    FLAG_AUDIO_MISSING,
    FLAG_GAS_MISSING,
    FLAG_PM_MISSING,
    PARTICLE_FEATURES,
    EnvReading,
)
from shared.messages import DeviceEvent, SensorHealth
from shared.profile import AudioConfig, HardwareProfile, I2cConfig, UartConfig

if TYPE_CHECKING:
    from edge_agent.sensors.bme680 import Bme680
    from edge_agent.sensors.microphone import Microphone
    from edge_agent.sensors.pms5003 import Pms5003

log = logging.getLogger(__name__)

BME680: Final = "bme680"
PMS5003: Final = "pms5003"
MICROPHONE: Final = "microphone"
SENSORS: Final = (BME680, PMS5003, MICROPHONE)
BME_FEATURES: Final = ENV_FEATURES[:4]
PM_FEATURES: Final = ENV_FEATURES[4:] + PARTICLE_FEATURES
MIN_AUDIO_WINDOW: Final = 512  # one FFT frame of shared.features.AudioFeatures (n_fft)
MIC_SUPERVISOR_PERIOD_S: Final = 0.1

# The microphone runs ten times more windows per second than the environmental sensors, so its
# thresholds are in proportion: about 1 s of bad windows degrades it, 3 s fail it.
MIC_POLICY: Final = HealthPolicy(
    degrade_after=10, fail_after=30, recover_after=20, no_data_after=10, stuck_after=50, reopen_after=30
)


@dataclass(frozen=True)
class DriverFactories:
    """How each device is opened from its part of the profile (defaults: the real drivers on real buses)."""

    bme680: Callable[[I2cConfig], Bme680]
    pms5003: Callable[[UartConfig], Pms5003]
    microphone: Callable[[AudioConfig], Microphone]


def default_factories() -> DriverFactories:
    """The real drivers: smbus2 on ``/dev/i2c-N``, pyserial on the UART, sounddevice (PortAudio)."""
    from edge_agent.sensors.bme680 import Bme680
    from edge_agent.sensors.microphone import Microphone
    from edge_agent.sensors.pms5003 import Pms5003

    return DriverFactories(
        bme680=lambda c: Bme680.open(c.bus, c.bme680_address),
        # Active mode: the sensor streams a frame every 0.2-2.3 s; 3 s covers the slowest.
        pms5003=lambda c: Pms5003.open(c.device, c.baud, mode="active", read_timeout_s=3.0),
        microphone=lambda c: Microphone(
            device_match=c.device_match, sample_rate=c.sample_rate, channels=c.channels, channel=c.channel
        ),
    )


def bme680_values(reading: Any) -> tuple[dict[str, float], dict[str, float], str | None, str]:
    """A BME680 reading as ``(features, raw, problem, detail)``: raw keeps ohms where the feature is log10."""
    gas = float(reading.gas_resistance_ohm)
    gas_ok = bool(reading.gas_valid) and bool(reading.heat_stable) and math.isfinite(gas) and gas > 0
    raw = {
        "temperature_c": float(reading.temperature_c),
        "humidity_pct": float(reading.humidity_pct),
        "pressure_hpa": float(reading.pressure_hpa),
        "gas_resistance_log10_ohm": gas if gas_ok else math.nan,
    }
    features = dict(raw, gas_resistance_log10_ohm=math.log10(gas) if gas_ok else math.nan)
    if gas_ok:
        return features, raw, None, ""
    why = "gas value not valid" if not reading.gas_valid else "heater not stable"
    return features, raw, "gas_invalid", f"{why} (heater profile or hot plate)"


def pms5003_values(reading: Any) -> tuple[dict[str, float], dict[str, float]]:
    """A PMS5003 frame as ``(features, raw)``: atmospheric mass concentrations and log10(1 + count)."""
    counts = [float(c) for c in reading.particles_per_dl]
    raw = {"pm1_ug_m3": float(reading.pm1), "pm25_ug_m3": float(reading.pm25), "pm10_ug_m3": float(reading.pm10)}
    raw.update(zip(PARTICLE_FEATURES, counts, strict=True))
    features = dict(raw)
    features.update({name: math.log10(1.0 + c) for name, c in zip(PARTICLE_FEATURES, counts, strict=True)})
    return features, raw


def _reject(raw: Mapping[str, float], checked: Mapping[str, float]) -> dict[str, float]:
    # The monitor decides on feature values; the reading keeps physical units where a value survives.
    return {name: (value if not math.isnan(checked[name]) else math.nan) for name, value in raw.items()}


def _error_text(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, SensorError):
        return exc.reason, exc.detail
    return "error", f"{type(exc).__name__}: {exc}"


@dataclass
class _Latest:
    """The newest accepted reading of an environmental sensor (raw units, rejected values NaN)."""

    mono: float
    values: dict[str, float]


@dataclass
class _Channel:
    """One sensor: its monitor, its driver (None while closed) and its reader."""

    name: str
    monitor: SensorMonitor
    device: str
    driver: Any = None
    latest: _Latest | None = None
    retired: list[Any] = field(default_factory=list)
    soft_mark: int = 0
    reads: int = 0


class HardwareCabin(Source):
    """The sensors of a hardware profile as a :class:`Source`: env at 1 Hz in threads, audio per inference."""

    name = "hardware"

    def __init__(
        self,
        profile: HardwareProfile,
        *,
        rate_hz: float,
        factories: DriverFactories | None = None,
        policies: Mapping[str, HealthPolicy] | None = None,
        env_period_s: float = 1.0,
        bme680_timeout_s: float = 1.0,
        stale_after_s: float = 5.0,
        stop_event: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not rate_hz > 0 or not env_period_s > 0 or not stale_after_s > 0:
            raise ValueError("rate_hz, env_period_s and stale_after_s must be positive")
        self.profile = profile
        self.factories = factories or default_factories()
        self.env_period_s = env_period_s
        self.bme680_timeout_s = bme680_timeout_s
        self.stale_after_s = stale_after_s
        self.stop_event = stop_event or threading.Event()
        self._clock = clock
        pol = {BME680: HealthPolicy(), PMS5003: HealthPolicy(), MICROPHONE: MIC_POLICY, **(policies or {})}
        ranges = profile.ranges
        self.channels = {
            BME680: _Channel(
                BME680,
                SensorMonitor(BME680, pol[BME680], ranges=ranges, clock=clock),
                f"/dev/i2c-{profile.i2c.bus} @ {profile.i2c.bme680_address:#04x}",
            ),
            PMS5003: _Channel(
                PMS5003,
                SensorMonitor(PMS5003, pol[PMS5003], ranges=ranges, clock=clock),
                f"{profile.uart.device} @ {profile.uart.baud} baud",
            ),
            MICROPHONE: _Channel(
                MICROPHONE,
                SensorMonitor(MICROPHONE, pol[MICROPHONE], clock=clock),
                f"{profile.audio.device_match!r} {profile.audio.channels} ch @ {profile.audio.sample_rate} Hz, "
                f"channel {profile.audio.channel}",
            ),
        }
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.window_samples = 0
        self.set_rate(rate_hz)

    # ------------------------------------------------------------------------------ lifecycle

    def set_rate(self, rate_hz: float) -> None:
        """Follow a new inference rate (the audio window is one inference period long)."""
        if not rate_hz > 0:
            raise ValueError("rate_hz must be positive")
        self.window_samples = max(MIN_AUDIO_WINDOW, round(self.profile.audio.sample_rate / rate_hz))

    def start(self) -> None:
        """Start the reader threads; devices are opened by them (a missing one is retried, never fatal)."""
        for name, target in ((BME680, self._env_loop), (PMS5003, self._env_loop), (MICROPHONE, self._mic_loop)):
            thread = threading.Thread(target=target, args=(self.channels[name],), name=f"hardware-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info(
            "hardware cabin %s: BME680 %s, PMS5003 %s, microphone %s",
            self.profile.name,
            self.channels[BME680].device,
            self.channels[PMS5003].device,
            self.channels[MICROPHONE].device,
        )

    def stop(self) -> None:
        """Stop the threads and close every driver."""
        self.stop_event.set()
        for thread in self._threads:
            thread.join(5.0)
        for ch in self.channels.values():
            self._close(ch, None, "")
            self._close_retired(ch)

    # ---------------------------------------------------------------------------- main loop

    def read(self) -> Observation:
        """The latest environmental readings (NaN where missing or stale) and the audio window."""
        now = self._clock()
        env = EnvReading()
        flags = 0
        bme = self._fresh(self.channels[BME680], now)
        if bme is not None:
            env.temperature_c = bme["temperature_c"]
            env.humidity_pct = bme["humidity_pct"]
            env.pressure_hpa = bme["pressure_hpa"]
            env.gas_resistance_ohm = bme["gas_resistance_log10_ohm"]
        if bme is None or any(math.isnan(v) for v in bme.values()):
            flags |= FLAG_GAS_MISSING
        pm = self._fresh(self.channels[PMS5003], now)
        if pm is not None:
            env.pm1_ug_m3 = pm["pm1_ug_m3"]
            env.pm25_ug_m3 = pm["pm25_ug_m3"]
            env.pm10_ug_m3 = pm["pm10_ug_m3"]
            c = [pm[name] for name in PARTICLE_FEATURES]
            env.particles_per_dl = (c[0], c[1], c[2], c[3], c[4], c[5])
        if pm is None or any(math.isnan(v) for v in pm.values()):
            flags |= FLAG_PM_MISSING
        audio, audio_flags = self._audio_window()
        flags |= audio_flags
        if audio is None:
            flags |= FLAG_AUDIO_MISSING
        return Observation(mono=time.monotonic(), ts=time.time(), env=env, audio=audio, flags=flags)

    def _fresh(self, ch: _Channel, now: float) -> dict[str, float] | None:
        latest = ch.latest
        if latest is None or now - latest.mono > self.stale_after_s:
            return None  # a read that hangs must not freeze old values into the records
        return latest.values

    def _audio_window(self) -> tuple[np.ndarray | None, int]:
        ch = self.channels[MICROPHONE]
        mon = ch.monitor
        mic = ch.driver
        if mic is None:
            mon.closed_window()
            return None, 0
        try:
            window = mic.window(self.window_samples)
        except Exception as exc:
            reason, detail = _error_text(exc)
            mon.error(reason, detail)
            if isinstance(exc, SensorDisconnected) or mon.should_reopen():
                self._retire(ch, reason, detail)
            return None, 0
        if window is None:
            mon.no_data()
            if mon.should_reopen():
                self._retire(ch, "no_data", "the stream delivers nothing; reopening it")
            return None, 0
        samples = window.samples
        # Stuck detection on two cheap statistics: digital silence or a frozen buffer repeat exactly.
        stats = {"peak": float(np.max(np.abs(samples))), "energy": float(np.dot(samples, samples))}
        checked = mon.reading(stats, soft_errors={"overrun": 1} if window.overrun else None)
        flags = int(window.flags)
        if any(math.isnan(v) for v in checked.values()):
            return None, flags
        return samples, flags

    def _retire(self, ch: _Channel, reason: str, detail: str) -> None:
        # Closing a PortAudio stream can block: the supervisor thread does it, not the main loop.
        with self._lock:
            driver, ch.driver = ch.driver, None
            if driver is not None:
                ch.retired.append(driver)
        ch.monitor.closed(reason, detail)

    # ------------------------------------------------------------------------------- threads

    def _env_loop(self, ch: _Channel) -> None:
        next_at = self._clock()
        while not self.stop_event.is_set():
            try:
                self._env_cycle(ch)
            except Exception:
                # The reader thread must outlive any surprise; the monitor has counted the window.
                log.exception("%s reader cycle failed", ch.name)
            next_at += self.env_period_s
            now = self._clock()
            if next_at < now:
                next_at = now  # a slow read: start the next cycle now instead of bursting
            self.stop_event.wait(next_at - now)

    def _open(self, ch: _Channel) -> bool:
        mon = ch.monitor
        if not mon.open_due():
            return False
        try:
            if ch.name == BME680:
                driver: Any = self.factories.bme680(self.profile.i2c)
            elif ch.name == PMS5003:
                driver = self.factories.pms5003(self.profile.uart)
            else:
                driver = self.factories.microphone(self.profile.audio)
                try:
                    driver.start()
                except BaseException:
                    driver.close()
                    raise
        except Exception as exc:
            reason, detail = _error_text(exc)
            delay = mon.open_failed(reason, detail)
            log.log(
                logging.WARNING if mon.open_failures <= 1 else logging.DEBUG,
                "%s: cannot open %s (%s: %s); next attempt in %.2g s",
                ch.name,
                ch.device,
                reason,
                detail,
                delay,
            )
            return False
        with self._lock:
            ch.driver = driver
            ch.soft_mark = self._soft_errors_total(ch)
        mon.opened()
        log.info("%s: opened %s", ch.name, ch.device)
        return True

    def _env_cycle(self, ch: _Channel) -> None:
        mon = ch.monitor
        if ch.driver is None and not self._open(ch):
            ch.latest = None
            mon.closed_window()
            return
        driver = ch.driver
        try:
            if ch.name == BME680:
                features, raw, problem, detail = bme680_values(driver.read(self.bme680_timeout_s))
                soft: dict[str, int] = {}
            else:
                features, raw = pms5003_values(driver.read())
                problem, detail = None, ""
                total = self._soft_errors_total(ch)
                soft = {"checksum": total - ch.soft_mark}
                ch.soft_mark = total
        except Exception as exc:
            ch.latest = None
            reason, detail = _error_text(exc)
            mon.error(reason, detail)
            if isinstance(exc, SensorDisconnected) or mon.should_reopen():
                self._close(ch, reason, detail)
            return
        checked = mon.reading(features, soft_errors=soft, problem=problem, detail=detail)
        ch.reads += 1
        ch.latest = _Latest(self._clock(), _reject(raw, checked))

    def _soft_errors_total(self, ch: _Channel) -> int:
        counters = getattr(ch.driver, "counters", None)
        if isinstance(counters, Mapping):
            return int(counters.get("checksum_errors", 0))
        return 0

    def _close(self, ch: _Channel, reason: str | None, detail: str) -> None:
        with self._lock:
            driver, ch.driver = ch.driver, None
        if driver is not None:
            try:
                driver.close()
            except Exception as exc:
                log.debug("%s: closing failed: %s", ch.name, exc)
        if reason is not None:
            delay = ch.monitor.closed(reason, detail)
            log.warning("%s: closed after %s (%s); reopening in %.2g s", ch.name, reason, detail, delay)

    def _close_retired(self, ch: _Channel) -> None:
        with self._lock:
            retired, ch.retired = ch.retired, []
        for driver in retired:
            try:
                driver.close()
            except Exception as exc:
                log.debug("%s: closing failed: %s", ch.name, exc)

    def _mic_loop(self, ch: _Channel) -> None:
        while not self.stop_event.is_set():
            try:
                self._close_retired(ch)
                if ch.driver is None:
                    self._open(ch)
            except Exception:
                log.exception("microphone supervisor cycle failed")
            self.stop_event.wait(MIC_SUPERVISOR_PERIOD_S)

    # ------------------------------------------------------------------------------- reports

    def health(self) -> dict[str, SensorHealth]:
        """Per-sensor health for ``status``."""
        return {name: ch.monitor.health() for name, ch in self.channels.items()}

    def take_events(self) -> list[DeviceEvent]:
        """``sensor_state`` events since the last call, oldest first (the agent queues them in the spool)."""
        events = [e for ch in self.channels.values() for e in ch.monitor.take_events()]
        return sorted(events, key=lambda e: e.ts)

    def snapshot(self) -> dict[str, Any]:
        """Per sensor: device, health detail and driver counters (for the status file)."""
        out: dict[str, Any] = {}
        for name, ch in self.channels.items():
            doc: dict[str, Any] = {"device": ch.device, **ch.monitor.snapshot(), "reads": ch.reads}
            counters = getattr(ch.driver, "counters", None)
            if isinstance(counters, Mapping):
                doc["counters"] = dict(counters)
            elif dataclasses.is_dataclass(counters) and not isinstance(counters, type):
                doc["counters"] = dataclasses.asdict(counters)
            out[name] = doc
        return out


# ---------------------------------------------------------------------------------- bring-up


@dataclass
class SensorReport:
    """What one sensor gave for `edge-agent sensors check`."""

    sensor: str
    device: str
    state: str  # ok | degraded | failed
    reason: str | None = None
    detail: str = ""
    values: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the sensor read cleanly."""
        return self.state == "ok"


def check_sensors(
    profile: HardwareProfile,
    factories: DriverFactories | None = None,
    *,
    audio_timeout_s: float = 3.0,
    bme680_timeout_s: float = 2.0,
) -> list[SensorReport]:
    """Open and read each sensor of ``profile`` once, through the agent's drivers and range checks."""
    factories = factories or default_factories()
    return [
        _check_bme680(profile, factories, bme680_timeout_s),
        _check_pms5003(profile, factories),
        _check_microphone(profile, factories, audio_timeout_s),
    ]


def _display_name(feature: str) -> str:
    # A person at bring-up reads ohms and counts, not the model's log10 inputs.
    if feature == "gas_resistance_log10_ohm":
        return "gas_resistance_ohm"
    if feature in PARTICLE_FEATURES:
        return feature.replace("_log10", "_per_dl")
    return feature


def _checked(report: SensorReport, features: dict[str, float], raw: dict[str, float], ranges: Any) -> None:
    checked, rejected = apply_ranges(features, ranges)
    report.values = {_display_name(k): round(v, 4) for k, v in _reject(raw, checked).items()}
    if rejected:
        report.state, report.reason, report.detail = "degraded", "out_of_range", "; ".join(rejected)


def _failed(report: SensorReport, exc: BaseException) -> SensorReport:
    report.state = "failed"
    report.reason, report.detail = _error_text(exc)
    return report


def _check_bme680(profile: HardwareProfile, factories: DriverFactories, timeout_s: float) -> SensorReport:
    i2c = profile.i2c
    report = SensorReport(BME680, f"/dev/i2c-{i2c.bus} @ {i2c.bme680_address:#04x}", "ok")
    try:
        driver = factories.bme680(i2c)
    except Exception as exc:
        return _failed(report, exc)
    try:
        features, raw, problem, detail = bme680_values(driver.read(timeout_s))
    except Exception as exc:
        return _failed(report, exc)
    finally:
        driver.close()
    _checked(report, features, raw, profile.ranges)
    if problem is not None and report.ok:
        report.state, report.reason, report.detail = "degraded", problem, detail
    return report


def _check_pms5003(profile: HardwareProfile, factories: DriverFactories) -> SensorReport:
    uart = profile.uart
    report = SensorReport(PMS5003, f"{uart.device} @ {uart.baud} baud", "ok")
    try:
        driver = factories.pms5003(uart)
    except Exception as exc:
        return _failed(report, exc)
    try:
        features, raw = pms5003_values(driver.read())
        report.info = {"counters": dict(driver.counters)}
    except Exception as exc:
        return _failed(report, exc)
    finally:
        driver.close()
    _checked(report, features, raw, profile.ranges)
    return report


def _check_microphone(profile: HardwareProfile, factories: DriverFactories, timeout_s: float) -> SensorReport:
    audio = profile.audio
    report = SensorReport(MICROPHONE, f"match {audio.device_match!r}", "ok")
    try:
        mic = factories.microphone(audio)
    except Exception as exc:
        return _failed(report, exc)
    try:
        report.device = f"{mic.device_name} ({audio.channels} ch @ {audio.sample_rate} Hz, channel {audio.channel})"
        mic.start()
        n = max(MIN_AUDIO_WINDOW, audio.sample_rate // 10)
        deadline = time.monotonic() + timeout_s
        window = mic.window(n)
        while window is None and time.monotonic() < deadline:
            time.sleep(0.02)
            window = mic.window(n)
        if window is None:
            report.state, report.reason = "failed", "no_data"
            report.detail = f"no {n} samples within {timeout_s:g} s"
            return report
        x = window.samples
        rms = float(np.sqrt(np.mean(x * x)))
        peak = float(np.max(np.abs(x)))
        report.values = {
            "rms_dbfs": round(20 * math.log10(rms + 1e-12), 2),
            "peak_dbfs": round(20 * math.log10(peak + 1e-12), 2),
            "samples": float(n),
        }
        report.info = {"overrun": window.overrun}
        if peak == 0.0:
            report.state, report.reason, report.detail = "degraded", "stuck", "digital silence (muted, wrong channel?)"
    except Exception as exc:
        return _failed(report, exc)
    finally:
        mic.close()
    return report
