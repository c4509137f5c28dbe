"""A simulated vehicle cabin: BME680, PMS5003 and microphone driven by a scripted scenario.

The cabin is a small physical model, deterministic for a seed:

* air: temperature and humidity relax toward the HVAC set point, or toward the outside air while
  a window is open; pressure wanders slowly (altitude); a VOC level lowers the BME680 gas
  resistance; three aerosol populations (cabin background, cigarette smoke, vape aerosol) follow
  first-order rise and decay, and the PMS5003 mass concentrations and particle counts per 0.1 L
  are both derived from the same lognormal size distributions, so they stay consistent;
* sound: road noise (low-frequency weighted), tyre noise, engine hum following a wandering
  speed, wind noise through an open window, road bumps, knocks (impacts) and, for the drift
  scenario, sounds the reference model never heard (music, a dog barking);
* sensors: realistic noise and quantisation, a 1 Hz environmental refresh held between reads,
  and slow ageing (gas baseline drift, temperature offset, microphone sensitivity loss).

Every ``read`` advances simulated time by one inference period without sleeping: the agent
paces it. Audio is generated per window in the frequency domain (one ``irfft``) plus a few
precomputed transient templates, so a read costs tens of microseconds of numpy.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_agent.sensors.base import Observation, Source
from shared.features import PARTICLE_SIZES_UM, EnvReading
from shared.messages import SensorHealth

TRAINING_LABELS: Final = ("normal", "vaping", "smoking", "impact", "window_open")
UNKNOWN_LABEL: Final = "unknown"
SCENARIO_DIR: Final = Path(__file__).resolve().parent.parent / "scenarios"

_LABEL_PATTERN: Final = r"^[a-z][a-z0-9_]{0,31}$"


class ScenarioError(ValueError):
    """A scenario file that cannot be used; says which file and which field."""

    def __init__(self, path: Path | str | None, field: str | None, message: str) -> None:
        self.path = str(path) if path is not None else None
        self.field = field
        self.message = message
        where = ": ".join(part for part in (self.path, field) if part)
        super().__init__(f"{where}: {message}" if where else message)


# --------------------------------------------------------------------------------------------
# Scenario schema
# --------------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Baseline(_Model):
    """The cabin at rest with the HVAC settled and the windows closed."""

    temperature_c: float = Field(21.5, ge=-40.0, le=85.0, description="Cabin air temperature (°C).")
    humidity_pct: float = Field(40.0, ge=0.0, le=100.0, description="Cabin relative humidity (%).")
    pressure_hpa: float = Field(1013.25, ge=300.0, le=1100.0, description="Barometric pressure (hPa).")
    gas_resistance_ohm: float = Field(
        120_000.0, gt=1_000.0, le=5_000_000.0, description="BME680 gas resistance in clean cabin air (Ω)."
    )
    pm25_ug_m3: float = Field(8.0, ge=0.0, le=500.0, description="Background PM2.5 mass concentration (µg/m³).")
    road_noise_dbfs: float = Field(
        -38.0, ge=-90.0, le=-6.0, description="RMS level of road noise at cruising speed (dBFS)."
    )
    engine_hum_dbfs: float | None = Field(
        -50.0, ge=-90.0, le=-6.0, description="RMS level of the engine hum (dBFS); null for an electric vehicle."
    )
    road_bumps_per_s: float = Field(
        0.2, ge=0.0, le=10.0, description="Mean rate of small road bumps (low thumps) in normal driving (1/s)."
    )


class Outside(_Model):
    """The air outside the vehicle, which an open window lets in."""

    temperature_c: float = Field(10.0, ge=-40.0, le=60.0, description="Outside air temperature (°C).")
    humidity_pct: float = Field(75.0, ge=0.0, le=100.0, description="Outside relative humidity (%).")
    pm25_ug_m3: float = Field(14.0, ge=0.0, le=500.0, description="Outside PM2.5 mass concentration (µg/m³).")


class _Timed(_Model):
    at: float = Field(ge=0.0, description="Start of the segment, seconds from the start of the timeline.")
    duration: float = Field(gt=0.0, description="Length of the segment (s).")


class _Labelled(_Timed):
    label: str | None = Field(
        None,
        pattern=_LABEL_PATTERN,
        description="Ground-truth label of the records inside the segment; default: the event's own label.",
    )


class NormalSegment(_Labelled):
    """Normal driving."""

    event: Literal["normal"] = Field(description="Event kind.")
    road_noise_offset_db: float = Field(
        0.0, ge=-30.0, le=20.0, description="Road noise relative to the baseline (a rough road is louder) (dB)."
    )


class _AerosolSegment(_Labelled):
    peak_pm25_ug_m3: float = Field(
        gt=0.0, le=2_000.0, description="PM2.5 the source would reach above background if it went on (µg/m³)."
    )
    rise_s: float = Field(gt=0.0, le=3_600.0, description="Time constant of the first-order rise (s).")
    decay_s: float = Field(gt=0.0, le=3_600.0, description="Time constant of the decay once it stops (s).")
    gas_drop_factor: float = Field(
        ge=1.0, le=100.0, description="Clean-air gas resistance divided by the gas resistance at the peak."
    )
    humidity_rise_pct: float = Field(ge=0.0, le=40.0, description="Relative humidity added at the peak (%).")
    variation: float = Field(
        0.3, ge=0.0, le=1.0, description="Log-normal spread of the intensity between occurrences (repeats)."
    )


class VapingSegment(_AerosolSegment):
    """Someone vaping: fine droplets, a humidity rise, a moderate VOC rise."""

    event: Literal["vaping"] = Field(description="Event kind.")
    peak_pm25_ug_m3: float = Field(
        300.0, gt=0.0, le=2_000.0, description="PM2.5 the source would reach above background (µg/m³)."
    )
    rise_s: float = Field(3.0, gt=0.0, le=3_600.0, description="Time constant of the first-order rise (s).")
    decay_s: float = Field(4.0, gt=0.0, le=3_600.0, description="Time constant of the decay (droplets evaporate) (s).")
    gas_drop_factor: float = Field(2.2, ge=1.0, le=100.0, description="Clean-air / peak gas resistance.")
    humidity_rise_pct: float = Field(6.0, ge=0.0, le=40.0, description="Relative humidity added at the peak (%).")


class SmokingSegment(_AerosolSegment):
    """Someone smoking: combustion aerosol with a coarse ash mode and a strong VOC rise."""

    event: Literal["smoking"] = Field(description="Event kind.")
    peak_pm25_ug_m3: float = Field(
        250.0, gt=0.0, le=2_000.0, description="PM2.5 the source would reach above background (µg/m³)."
    )
    rise_s: float = Field(4.0, gt=0.0, le=3_600.0, description="Time constant of the first-order rise (s).")
    decay_s: float = Field(6.0, gt=0.0, le=3_600.0, description="Time constant of the decay (s).")
    gas_drop_factor: float = Field(5.0, ge=1.0, le=100.0, description="Clean-air / peak gas resistance.")
    humidity_rise_pct: float = Field(1.0, ge=0.0, le=40.0, description="Relative humidity added at the peak (%).")


class ImpactSegment(_Labelled):
    """Knocks: short broadband transients (a door, a fist on the dashboard, a loose object)."""

    event: Literal["impact"] = Field(description="Event kind.")
    interval_s: float | None = Field(
        None, gt=0.0, description="Time between knocks; null for a single knock at the start of the segment."
    )
    peak_dbfs: float = Field(-14.0, ge=-60.0, le=0.0, description="Median peak level of a knock (dBFS).")
    peak_spread_db: float = Field(4.0, ge=0.0, le=20.0, description="Standard deviation of the knock peak (dB).")
    decay_ms: float = Field(6.0, gt=0.5, le=50.0, description="Time constant of the knock's decay (ms).")
    jitter_ms: float = Field(
        30.0, ge=0.0, le=1_000.0, description="Uniform random delay of each knock after its nominal time (ms)."
    )


class WindowOpenSegment(_Labelled):
    """A window open: the cabin air relaxes toward outside; road and wind noise come in."""

    event: Literal["window_open"] = Field(description="Event kind.")
    opening: float = Field(1.0, gt=0.0, le=1.0, description="How far the window is open (0..1).")
    tau_s: float = Field(
        90.0, gt=0.0, le=7_200.0, description="Time constant of temperature/humidity exchange when fully open (s)."
    )
    wind_noise_dbfs: float = Field(-31.0, ge=-90.0, le=-3.0, description="RMS wind noise when fully open (dBFS).")
    road_noise_rise_db: float = Field(8.0, ge=0.0, le=30.0, description="Road noise rise when fully open (dB).")


class AgeingSegment(_Timed):
    """Slow sensor drift from ``at`` onward (in absolute time: it keeps growing across repeats)."""

    event: Literal["ageing"] = Field(description="Event kind.")
    duration: float | None = Field(  # type: ignore[assignment]
        None, gt=0.0, description="How long the drift keeps growing (s); null: for ever. It is then held."
    )
    gas_drift_pct_per_hour: float = Field(
        -1.0, ge=-50.0, le=50.0, description="Gas-resistance baseline change per hour, compounding (%)."
    )
    temperature_offset_c_per_hour: float = Field(
        0.05, ge=-10.0, le=10.0, description="Temperature reading offset growth per hour (°C)."
    )
    mic_sensitivity_db_per_hour: float = Field(
        -0.1, ge=-20.0, le=20.0, description="Microphone sensitivity change per hour (dB; negative is a loss)."
    )
    acceleration: float = Field(
        1.0, ge=1.0, le=1_000_000.0, description="Time-lapse factor for demos: 3600 ages one hour per second."
    )


class MusicSegment(_Labelled):
    """Music in the cabin: tonal chords on a beat; the reference model never heard it."""

    event: Literal["music"] = Field(description="Event kind.")
    level_dbfs: float = Field(-30.0, ge=-90.0, le=-3.0, description="RMS level of the music (dBFS).")
    tempo_bpm: float = Field(110.0, ge=30.0, le=240.0, description="Tempo (beats per minute).")


class DogBarkSegment(_Labelled):
    """A dog barking in the cabin; the reference model never heard it."""

    event: Literal["dog_bark"] = Field(description="Event kind.")
    peak_dbfs: float = Field(-16.0, ge=-60.0, le=0.0, description="Median peak level of a bark (dBFS).")
    barks_per_s: float = Field(1.5, gt=0.0, le=8.0, description="Mean bark rate (1/s).")


Segment = Annotated[
    NormalSegment
    | VapingSegment
    | SmokingSegment
    | ImpactSegment
    | WindowOpenSegment
    | AgeingSegment
    | MusicSegment
    | DogBarkSegment,
    Field(discriminator="event"),
]
LabelledSegment = (
    NormalSegment | VapingSegment | SmokingSegment | ImpactSegment | WindowOpenSegment | MusicSegment | DogBarkSegment
)
_DEFAULT_LABELS: Final[dict[str, str]] = {
    "normal": "normal",
    "vaping": "vaping",
    "smoking": "smoking",
    "impact": "impact",
    "window_open": "window_open",
    "music": UNKNOWN_LABEL,
    "dog_bark": UNKNOWN_LABEL,
}


def segment_label(segment: LabelledSegment) -> str:
    """Ground-truth label of the records inside a (non-ageing) segment."""
    return segment.label if segment.label is not None else _DEFAULT_LABELS[segment.event]


class Scenario(_Model):
    """A scripted drive: the cabin at rest, the outside air, and a timeline of events."""

    name: str = Field(min_length=1, max_length=64, description="Short name of the scenario.")
    description: str = Field("", max_length=2_000, description="What the scenario is for.")
    repeat: bool = Field(False, description="Loop the timeline; otherwise normal driving follows its end.")
    length_s: float | None = Field(
        None, gt=0.0, description="Length of one pass of the timeline (s); default: the end of the last segment."
    )
    baseline: Baseline = Field(default_factory=Baseline, description="The cabin at rest.")
    outside: Outside = Field(default_factory=Outside, description="The outside air.")
    timeline: list[Segment] = Field(default_factory=list, description="Events; gaps between them are normal driving.")

    @model_validator(mode="after")
    def _check_length(self) -> Scenario:
        end = self.timeline_end
        if self.length_s is not None and end > self.length_s + 1e-9:
            raise ValueError(f"a segment ends at {end:g} s, after length_s {self.length_s:g} s")
        if self.repeat and self.period <= 0.0:
            raise ValueError("repeat needs a timeline or length_s")
        return self

    @property
    def timeline_end(self) -> float:
        """End of the last segment whose end is defined (s)."""
        ends = [s.at + s.duration for s in self.timeline if s.duration is not None]
        return max(ends, default=0.0)

    @property
    def period(self) -> float:
        """Length of one pass of the timeline (s)."""
        return self.length_s if self.length_s is not None else self.timeline_end

    def labels(self) -> list[str]:
        """Every label the scenario's records can carry, in order of first appearance."""
        seen = ["normal"]
        for seg in self.timeline:
            if not isinstance(seg, AgeingSegment) and segment_label(seg) not in seen:
                seen.append(segment_label(seg))
        return seen


def _error_field(loc: Sequence[int | str]) -> str:
    # A discriminated union puts the tag in the location (timeline.2.vaping.rise_s): drop it.
    parts = [str(p) for p in loc]
    if len(parts) >= 3 and parts[0] == "timeline" and parts[2] in _DEFAULT_LABELS | {"ageing": ""}:
        parts.pop(2)
    return ".".join(parts)


def parse_scenario(data: Any, *, source: Path | str | None = None) -> Scenario:
    """Validate a scenario document (already parsed YAML/JSON); raises :class:`ScenarioError`."""
    if not isinstance(data, dict):
        raise ScenarioError(source, None, "a scenario must be a mapping")
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ScenarioError(source, _error_field(first["loc"]), first["msg"] + more) from exc


def load_scenario(path: Path | str) -> Scenario:
    """Load and validate a scenario YAML file; a bare name (``drift``) means a built-in scenario."""
    p = Path(path)
    if not p.exists() and p.suffix == "" and (SCENARIO_DIR / f"{p.name}.yaml").exists():
        p = SCENARIO_DIR / f"{p.name}.yaml"
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(p, None, f"cannot read: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScenarioError(p, None, f"invalid YAML: {exc}") from exc
    return parse_scenario(data, source=p)


# --------------------------------------------------------------------------------------------
# Aerosol optics: mass concentrations and PMS5003 counts from lognormal size distributions
# --------------------------------------------------------------------------------------------

_DENSITY_G_CM3: Final = 1.5  # a typical cabin aerosol density
_DIAMETERS_UM: Final = np.exp(np.linspace(math.log(0.01), math.log(100.0), 3000))


def _population(modes: Sequence[tuple[float, float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Per µg/m³ of total mass: (PM1, PM2.5, PM10 mass in µg/m³, counts per 0.1 L above each PMS size)."""
    diameters = _DIAMETERS_UM
    ln_d = np.log(diameters)
    step = ln_d[1] - ln_d[0]
    mass = np.zeros_like(diameters)
    for fraction, mmd, sigma_g in modes:
        s = math.log(sigma_g)
        mass += fraction * np.exp(-0.5 * ((ln_d - math.log(mmd)) / s) ** 2) / (s * math.sqrt(2 * math.pi))
    mass *= step  # µg/m³ per bin for 1 µg/m³ total
    particle_ug = _DENSITY_G_CM3 * 1e6 * math.pi / 6.0 * (diameters * 1e-4) ** 3  # µg per particle
    number_per_dl = mass / particle_ug * 1e-4  # per m³ -> per 0.1 L
    pm = np.array([mass[diameters <= cut].sum() for cut in (1.0, 2.5, 10.0)])
    counts = np.array([number_per_dl[diameters > size].sum() for size in PARTICLE_SIZES_UM])
    return pm, counts


# (mass fraction, mass median diameter µm, geometric standard deviation) per mode.
_BACKGROUND: Final = _population([(0.45, 0.7, 1.8), (0.55, 4.5, 2.2)])
_SMOKE: Final = _population([(0.85, 0.45, 1.6), (0.15, 3.0, 2.0)])
_VAPE: Final = _population([(0.98, 0.4, 1.45), (0.02, 2.0, 1.8)])
_PMS_MAX_UG: Final = 1_000.0
_PMS_MAX_COUNT: Final = 65_535.0


# --------------------------------------------------------------------------------------------
# The cabin
# --------------------------------------------------------------------------------------------

_ENV_DT: Final = 1.0  # the BME680 and PMS5003 refresh at 1 Hz
_HVAC_TAU_S: Final = 240.0
_WINDOW_MOVE_TAU_S: Final = 2.0
_SELF_NOISE_DBFS: Final = -74.0
_SPEED_MEAN: Final = 0.65


def _db(level_db: float) -> float:
    return float(10.0 ** (level_db / 20.0))


_TABLE_SIZE: Final = 4096


def _harmonic_table(amplitudes: Sequence[float]) -> np.ndarray:
    """One period of a harmonic waveform, normalised to unit RMS, for :func:`_wavetable`."""
    phase = np.arange(_TABLE_SIZE) / _TABLE_SIZE
    wave = sum(a * np.sin(2 * np.pi * (h + 1) * phase) for h, a in enumerate(amplitudes))
    wave = np.asarray(wave, dtype=np.float64)
    return wave / math.sqrt(float(np.mean(wave**2)))


def _wavetable(table: np.ndarray, phase: float, cycles_per_sample: float, ramp: np.ndarray) -> np.ndarray:
    """A periodic waveform by table lookup (``np.sin`` on every sample costs several times more)."""
    index = ((phase + cycles_per_sample * ramp) * _TABLE_SIZE).astype(np.int64) & (_TABLE_SIZE - 1)
    return table[index]


_HUM: Final = _harmonic_table((1.0, 0.5, 0.25))
_NOTE: Final = _harmonic_table((1.0, 0.4, 0.2))
_CHORDS_HZ: Final = (
    (220.0, 261.63, 329.63),
    (174.61, 220.0, 261.63),
    (196.0, 246.94, 293.66),
    (164.81, 207.65, 246.94),
)


def _relax(value: float, target: float, tau: float, dt: float) -> float:
    """Exact first-order step toward ``target`` with time constant ``tau``."""
    return target + (value - target) * math.exp(-dt / tau)


class _Transients:
    """Scheduled transients (knocks, barks) of one timeline pass, sorted by onset time."""

    def __init__(self) -> None:
        self.onsets: list[float] = []
        self.templates: list[np.ndarray] = []
        self.gains: list[float] = []

    def add(self, onset: float, template: np.ndarray, gain: float) -> None:
        self.onsets.append(onset)
        self.templates.append(template)
        self.gains.append(gain)

    def sort(self) -> None:
        order = sorted(range(len(self.onsets)), key=self.onsets.__getitem__)
        self.onsets = [self.onsets[i] for i in order]
        self.templates = [self.templates[i] for i in order]
        self.gains = [self.gains[i] for i in order]

    def between(self, start: float, stop: float) -> range:
        """Indices of the transients with onset in ``[start, stop)``."""
        return range(bisect.bisect_left(self.onsets, start), bisect.bisect_left(self.onsets, stop))


class SimulatedCabin(Source):
    """A vehicle cabin driven by a :class:`Scenario`; deterministic for a seed."""

    name = "simulated"

    def __init__(
        self,
        scenario: Scenario,
        *,
        seed: int = 0,
        rate_hz: float = 10.0,
        sample_rate: int = 16_000,
        start_ts: float | None = None,
    ) -> None:
        if not rate_hz > 0 or not math.isfinite(rate_hz):
            raise ValueError("rate_hz must be positive")
        if sample_rate < 1_000:
            raise ValueError("sample_rate must be at least 1000 Hz")
        self.scenario = scenario
        self.seed = seed
        self.rate_hz = float(rate_hz)
        self.sample_rate = sample_rate
        self.window_samples = max(1, round(sample_rate / rate_hz))
        self.start_ts = time.time() if start_ts is None else float(start_ts)
        self.reads = 0
        self._rng = np.random.default_rng([seed, 0x5EED])
        self._repeat = scenario.repeat and scenario.period > 0
        self._period = scenario.period if self._repeat else math.inf
        base = scenario.baseline
        self._base = base
        self._outside = scenario.outside
        self._labelled: list[LabelledSegment] = [s for s in scenario.timeline if not isinstance(s, AgeingSegment)]
        self._ageing: list[AgeingSegment] = [s for s in scenario.timeline if isinstance(s, AgeingSegment)]
        self._music_segments = [s for s in self._labelled if isinstance(s, MusicSegment)]
        self._build_label_timeline()
        self._build_spectra()
        self._build_transients()
        self._variations: dict[tuple[int, int], tuple[float, float, float]] = {}
        # Physical state, advanced in 1 s steps.
        self._env_tick = -1
        self._temp = base.temperature_c
        self._rh = base.humidity_pct
        self._pressure_dev = 0.0
        self._gas_wander = 0.0
        self._bg_pm25 = base.pm25_ug_m3
        self._smoke = 0.0  # smoke aerosol mass (µg/m³ of all sizes)
        self._vape = 0.0
        self._smoke_voc = 0.0  # added VOC as (R_clean / R - 1)
        self._vape_voc = 0.0
        self._smoke_rh = 0.0
        self._vape_rh = 0.0
        self._smoke_decay = 30.0
        self._vape_decay = 15.0
        self._window = 0.0
        self._wind_db = -31.0
        self._road_rise_db = 8.0
        self._road_offset_db = 0.0
        self._speed = _SPEED_MEAN
        self._env: EnvReading = EnvReading()
        self._mic_gain = 1.0
        self._temp_offset = 0.0
        self._gas_age = 1.0
        self._hum_phase = 0.0  # in cycles of the firing frequency
        self._ramp = np.arange(self.window_samples, dtype=np.float64)
        self._carry = np.zeros(0, dtype=np.float64)

    # ---- construction helpers --------------------------------------------------------------

    def _build_label_timeline(self) -> None:
        """Flatten overlapping segments into intervals; the segment that started last wins."""
        bounds = sorted({0.0, *(s.at for s in self._labelled), *(s.at + s.duration for s in self._labelled)})
        ranked = sorted(enumerate(self._labelled), key=lambda p: (p[1].at, p[0]))
        self._label_edges: list[float] = []
        self._label_values: list[str] = []
        for start in bounds:
            covering = [i for i, s in ranked if s.at <= start < s.at + s.duration]
            idx = covering[-1] if covering else -1
            label = segment_label(self._labelled[idx]) if idx >= 0 else "normal"
            self._label_edges.append(start)
            self._label_values.append(label)

    def _build_spectra(self) -> None:
        n = self.window_samples
        freqs = np.fft.rfftfreq(n, 1.0 / self.sample_rate)
        highpass = freqs**2 / (freqs**2 + 25.0**2)
        road = (1.0 / (1.0 + (freqs / 110.0) ** 2) + 0.06 * np.exp(-(((freqs - 900.0) / 450.0) ** 2))) * highpass
        wind = (1.0 / (1.0 + (freqs / 700.0) ** 2)) * freqs**2 / (freqs**2 + 90.0**2)
        flat = np.ones_like(freqs)
        self._spectra = []
        for shape in (road, wind, flat):
            power = shape.copy()
            power[0] = 0.0
            if n % 2 == 0:
                power[-1] = 0.0
            # irfft of X_k = A_k (a + ib), a, b ~ N(0, 1): E[mean x²] = 4 Σ A_k² / n² (no DC / Nyquist).
            power *= n * n / (4.0 * max(float(power.sum()), 1e-30))
            self._spectra.append(power)
        self._n_bins = freqs.size

    def _templates(self, kind: str, count: int, key: float) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, 0x7E3, int(key * 1000), len(kind)])
        sr = self.sample_rate
        out: list[np.ndarray] = []
        for _ in range(count):
            if kind == "knock":
                decay = key / 1000.0
                t = np.arange(int(sr * decay * 8)) / sr
                burst = rng.standard_normal(t.size) * np.exp(-t / decay)
                thump = np.sin(2 * np.pi * rng.uniform(120.0, 320.0) * t) * np.exp(-t / (decay * 2.5))
                tpl = burst + 0.8 * thump
            elif kind == "bump":
                t = np.arange(int(sr * 0.15)) / sr
                tpl = np.sin(2 * np.pi * rng.uniform(35.0, 75.0) * t) * np.exp(-t / 0.03) * (1 - np.exp(-t / 0.004))
            else:  # bark
                length = rng.uniform(0.14, 0.22)
                t = np.arange(int(sr * length)) / sr
                f0 = rng.uniform(420.0, 650.0) * (1.0 - 0.25 * t / length)
                phase = 2 * np.pi * np.cumsum(f0) / sr
                voiced = sum((0.7**h) * np.sin((h + 1) * phase) for h in range(6))
                envelope = (1 - np.exp(-t / 0.008)) * np.exp(-t / (length / 3))
                tpl = envelope * (voiced + 0.3 * rng.standard_normal(t.size))
            out.append(tpl / np.max(np.abs(tpl)))
        return out

    def _build_transients(self) -> None:
        """Schedule knocks and barks for one pass of the timeline (the same on every repeat)."""
        sched = _Transients()
        for idx, seg in enumerate(self._labelled):
            rng = np.random.default_rng([self.seed, 0xA11, idx])
            if isinstance(seg, ImpactSegment):
                templates = self._templates("knock", 6, seg.decay_ms)
                step = seg.interval_s or seg.duration
                nominal = seg.at + step * np.arange(max(1, math.ceil(seg.duration / step - 1e-9)))
                for t in nominal:
                    onset = float(t) + rng.uniform(0.0, seg.jitter_ms / 1000.0)
                    gain = _db(seg.peak_dbfs + seg.peak_spread_db * float(rng.standard_normal()))
                    sched.add(onset, templates[int(rng.integers(len(templates)))], min(gain, 1.0))
            elif isinstance(seg, DogBarkSegment):
                templates = self._templates("bark", 4, 1.0)
                t = seg.at + float(rng.uniform(0.0, 0.3))
                while t < seg.at + seg.duration:
                    gain = _db(seg.peak_dbfs + 3.0 * float(rng.standard_normal()))
                    sched.add(t, templates[int(rng.integers(len(templates)))], min(gain, 1.0))
                    t += max(0.25, float(rng.exponential(1.0 / seg.barks_per_s)))
        sched.sort()
        self._sched = sched
        self._bumps = self._templates("bump", 4, 0.0)
        lengths = [tpl.size for tpl in sched.templates + self._bumps]
        self._max_transient = max(lengths, default=0)

    # ---- timeline lookups ------------------------------------------------------------------

    def _local(self, t: float) -> tuple[int, float]:
        """(pass index, time within the pass) of an absolute simulated time."""
        if not self._repeat:
            return 0, t
        cycle = math.floor(t / self._period)
        return cycle, t - cycle * self._period

    def label_at(self, t: float) -> str:
        """Ground-truth label at simulated time ``t`` (s)."""
        _, local = self._local(t)
        if not self._repeat and local >= self._label_edges[-1]:
            return "normal"
        return self._label_values[bisect.bisect_right(self._label_edges, local) - 1]

    def _active(self, t: float) -> list[tuple[int, LabelledSegment]]:
        _, local = self._local(t)
        return [(i, s) for i, s in enumerate(self._labelled) if s.at <= local < s.at + s.duration]

    def _variation(self, idx: int, cycle: int, seg: _AerosolSegment) -> tuple[float, float, float]:
        """Per-occurrence (intensity, rise, decay) factors, stable for (seed, segment, pass)."""
        key = (idx, cycle)
        found = self._variations.get(key)
        if found is None:
            rng = np.random.default_rng([self.seed, 0xAE0, idx, cycle])
            z = rng.standard_normal(3)
            found = (math.exp(seg.variation * z[0]), math.exp(0.15 * z[1]), math.exp(0.15 * z[2]))
            if len(self._variations) > 4096:
                self._variations.clear()
            self._variations[key] = found
        return found

    # ---- physics ----------------------------------------------------------------------------

    def _ageing_at(self, t: float) -> None:
        gas, temp, mic_db = 1.0, 0.0, 0.0
        for seg in self._ageing:
            span = t - seg.at
            if span <= 0:
                continue
            if seg.duration is not None:
                span = min(span, seg.duration)
            hours = span * seg.acceleration / 3600.0
            gas *= (1.0 + seg.gas_drift_pct_per_hour / 100.0) ** hours
            temp += seg.temperature_offset_c_per_hour * hours
            mic_db += seg.mic_sensitivity_db_per_hour * hours
        self._gas_age = max(gas, 1e-3)
        self._temp_offset = temp
        self._mic_gain = _db(max(mic_db, -80.0))

    def _step(self, t_mid: float, dt: float) -> None:
        """Advance the cabin air by ``dt`` seconds; segments active at ``t_mid`` drive it."""
        rng = self._rng
        base, outside = self._base, self._outside
        cycle, _ = self._local(t_mid)
        window_target = 0.0
        window_tau = 90.0
        self._road_offset_db = 0.0
        smoke_on: tuple[float, float, float, float, float] | None = None
        vape_on: tuple[float, float, float, float, float] | None = None
        for idx, seg in self._active(t_mid):
            if isinstance(seg, WindowOpenSegment):
                if seg.opening >= window_target:
                    window_target, window_tau = seg.opening, seg.tau_s
                    self._wind_db, self._road_rise_db = seg.wind_noise_dbfs, seg.road_noise_rise_db
            elif isinstance(seg, NormalSegment):
                self._road_offset_db = seg.road_noise_offset_db
            elif isinstance(seg, VapingSegment | SmokingSegment):
                scale, rise_k, decay_k = self._variation(idx, cycle, seg)
                pm = _VAPE if isinstance(seg, VapingSegment) else _SMOKE
                peak_mass = seg.peak_pm25_ug_m3 * scale / pm[0][1]
                params = (
                    peak_mass,
                    seg.rise_s * rise_k,
                    seg.decay_s * decay_k,
                    seg.gas_drop_factor,
                    seg.humidity_rise_pct,
                )
                if isinstance(seg, VapingSegment):
                    vape_on = params
                else:
                    smoke_on = params
        self._window = _relax(self._window, window_target, _WINDOW_MOVE_TAU_S, dt)
        w = self._window
        ventilation = 1.0 + 6.0 * w  # an open window flushes the cabin air much faster

        # Aerosols, VOCs and the vape's water follow the same first-order dynamics.
        def aerosol(
            mass: float, voc: float, rh: float, on: tuple[float, ...] | None, decay: float
        ) -> tuple[float, ...]:
            if on is not None:
                peak, rise, decay, drop, rh_rise = on
                # a source ramps toward a level that an open window dilutes
                target, tau = peak / ventilation, rise
                k = mass / peak if peak > 0 else 0.0
                k_next = _relax(k, target / peak, tau, dt)
                fluct = math.exp(0.08 * float(rng.standard_normal()))  # puffs
                return peak * k_next * fluct, (drop - 1.0) * k_next, rh_rise * k_next, decay
            factor = math.exp(-dt * ventilation / decay)
            return mass * factor, voc * factor, rh * factor, decay

        self._smoke, self._smoke_voc, self._smoke_rh, self._smoke_decay = aerosol(
            self._smoke, self._smoke_voc, self._smoke_rh, smoke_on, self._smoke_decay
        )
        self._vape, self._vape_voc, self._vape_rh, self._vape_decay = aerosol(
            self._vape, self._vape_voc, self._vape_rh, vape_on, self._vape_decay
        )

        if w > 0.02:
            temp_target = base.temperature_c + w * (outside.temperature_c - base.temperature_c)
            rh_target = base.humidity_pct + w * (outside.humidity_pct - base.humidity_pct)
            tau = window_tau / max(w, 0.1)
        else:
            temp_target, rh_target, tau = base.temperature_c, base.humidity_pct, _HVAC_TAU_S
        self._temp = _relax(self._temp, temp_target, tau, dt) + 0.01 * float(rng.standard_normal())
        self._rh = _relax(self._rh, rh_target, tau, dt) + 0.05 * float(rng.standard_normal())
        bg_target = base.pm25_ug_m3 + w * (outside.pm25_ug_m3 - base.pm25_ug_m3)
        self._bg_pm25 = _relax(self._bg_pm25, bg_target, 40.0 / ventilation, dt)
        # Slow wanderings: altitude, the gas sensor's baseline, the vehicle's speed.
        self._pressure_dev = _relax(self._pressure_dev, 0.0, 120.0, dt) + 0.03 * float(rng.standard_normal())
        self._gas_wander = _relax(self._gas_wander, 0.0, 180.0, dt) + 0.004 * float(rng.standard_normal())
        self._speed = _relax(self._speed, _SPEED_MEAN, 60.0, dt) + 0.03 * float(rng.standard_normal())
        self._speed = min(1.0, max(0.15, self._speed))

    def _read_env(self) -> EnvReading:
        """What the BME680 and PMS5003 report for the current state (noise, quantisation, limits)."""
        rng = self._rng
        base = self._base
        rh_true = min(100.0, max(0.0, self._rh + self._smoke_rh + self._vape_rh))
        gas_true = (
            base.gas_resistance_ohm
            * self._gas_age
            * math.exp(self._gas_wander - 0.012 * (rh_true - base.humidity_pct))
            / (1.0 + self._smoke_voc + self._vape_voc)
        )
        bg_mass = self._bg_pm25 / _BACKGROUND[0][1]
        pm = bg_mass * _BACKGROUND[0] + self._smoke * _SMOKE[0] + self._vape * _VAPE[0]
        counts = bg_mass * _BACKGROUND[1] + self._smoke * _SMOKE[1] + self._vape * _VAPE[1]
        noise = rng.standard_normal(5)
        # The PMS5003 derives masses from its counts: one gain error for both, Poisson counting.
        gain = math.exp(0.04 * float(noise[0]))
        pm_read = np.minimum(np.round(pm * gain), _PMS_MAX_UG)
        bins = np.maximum(np.append(counts[:-1] - counts[1:], counts[-1]) * gain, 0.0)
        counts_read = np.minimum(np.cumsum(rng.poisson(bins)[::-1])[::-1], _PMS_MAX_COUNT).astype(np.float64)
        return EnvReading(
            temperature_c=round(self._temp + self._temp_offset + 0.03 * float(noise[1]), 2),
            humidity_pct=round(min(100.0, max(0.0, rh_true + 0.2 * float(noise[2]))), 2),
            pressure_hpa=round(base.pressure_hpa + self._pressure_dev + 0.03 * float(noise[3]), 2),
            gas_resistance_ohm=float(round(gas_true * math.exp(0.02 * float(noise[4])))),
            pm1_ug_m3=float(pm_read[0]),
            pm25_ug_m3=float(pm_read[1]),
            pm10_ug_m3=float(pm_read[2]),
            particles_per_dl=(
                float(counts_read[0]),
                float(counts_read[1]),
                float(counts_read[2]),
                float(counts_read[3]),
                float(counts_read[4]),
                float(counts_read[5]),
            ),
        )

    def _advance_env(self, t: float) -> None:
        tick = math.floor(t / _ENV_DT + 1e-9)
        if tick == self._env_tick:
            return
        start = self._env_tick
        for k in range(max(start, 0), tick):
            self._step((k + 0.5) * _ENV_DT, _ENV_DT)
        self._env_tick = tick
        self._ageing_at(tick * _ENV_DT)
        self._env = self._read_env()

    # ---- audio ------------------------------------------------------------------------------

    def _audio(self, t0: float) -> np.ndarray:
        n = self.window_samples
        sr = self.sample_rate
        rng = self._rng
        base = self._base
        w = self._window
        speed_db = (self._speed - _SPEED_MEAN) * 10.0
        road = _db(base.road_noise_dbfs + speed_db + self._road_offset_db + w * self._road_rise_db)
        wind = _db(self._wind_db + 2.0 * float(rng.standard_normal())) * w
        acoustic = self._mic_gain
        power = (acoustic * road) ** 2 * self._spectra[0]
        if wind > 0.0:
            power = power + (acoustic * wind) ** 2 * self._spectra[1]
        power = power + _db(_SELF_NOISE_DBFS) ** 2 * self._spectra[2]
        coeffs = rng.standard_normal((2, self._n_bins))
        x = np.fft.irfft(np.sqrt(power) * (coeffs[0] + 1j * coeffs[1]), n)

        if base.engine_hum_dbfs is not None:
            rpm = 900.0 + 2600.0 * self._speed
            cycles = rpm / 30.0 / sr  # four-cylinder four-stroke firing frequency, cycles per sample
            x += (_db(base.engine_hum_dbfs) * acoustic) * _wavetable(_HUM, self._hum_phase, cycles, self._ramp)
            self._hum_phase = (self._hum_phase + cycles * n) % 1.0

        if self._music_segments:
            _, local = self._local(t0 + 0.5 / self.rate_hz)
            for seg in self._music_segments:
                if seg.at <= local < seg.at + seg.duration:
                    x += acoustic * self._music(seg, t0, n)

        x = self._add_transients(x, t0, acoustic)
        np.clip(x, -1.0, 1.0, out=x)
        return x.astype(np.float32)

    def _music(self, seg: MusicSegment, t0: float, n: int) -> np.ndarray:
        sr = self.sample_rate
        beat = 60.0 / seg.tempo_bpm
        chord = _CHORDS_HZ[int(t0 / (2 * beat)) % len(_CHORDS_HZ)]
        tone = np.zeros(n)
        for freq in chord:
            # the phase follows absolute time, so a held chord is continuous across windows
            tone += _wavetable(_NOTE, (freq * t0) % 1.0, freq / sr, self._ramp)
        pulse = 0.55 + 0.45 * np.exp(-np.mod(t0 + self._ramp / sr, beat) / 0.12)
        return (_db(seg.level_dbfs) / (0.7 * math.sqrt(len(chord)))) * tone * pulse

    def _add_transients(self, x: np.ndarray, t0: float, acoustic: float) -> np.ndarray:
        n = x.size
        sr = self.sample_rate
        dt = n / sr
        events: list[tuple[float, np.ndarray, float]] = []
        _, local = self._local(t0)
        end = local + dt
        for i in self._sched.between(local, min(end, self._period)):
            events.append((self._sched.onsets[i] - local, self._sched.templates[i], self._sched.gains[i]))
        if end > self._period:
            for i in self._sched.between(0.0, end - self._period):
                events.append(
                    (self._sched.onsets[i] + self._period - local, self._sched.templates[i], self._sched.gains[i])
                )
        if self._base.road_bumps_per_s > 0 and self._window < 0.5:
            for _ in range(int(self._rng.poisson(self._base.road_bumps_per_s * dt))):
                gain = _db(-32.0 + 4.0 * float(self._rng.standard_normal()))
                events.append((float(self._rng.uniform(0.0, dt)), self._bumps[int(self._rng.integers(4))], gain))
        if not events and self._carry.size == 0:
            return x
        buf = np.zeros(n + self._max_transient)
        buf[: self._carry.size] += self._carry
        for offset, tpl, gain in events:
            start = min(int(offset * sr), n - 1)
            buf[start : start + tpl.size] += (acoustic * gain) * tpl
        x = x + buf[:n]
        rest = buf[n:]
        self._carry = rest if np.any(rest) else np.zeros(0)
        return x

    # ---- Source -----------------------------------------------------------------------------

    def read(self) -> Observation:
        """The next window of simulated time: environment, audio and the ground truth."""
        k = self.reads
        t0 = k / self.rate_hz
        t1 = (k + 1) / self.rate_hz
        self._advance_env(t0)
        audio = self._audio(t0)
        self.reads = k + 1
        # The reading is held between 1 Hz refreshes; it is a fresh object at every refresh.
        return Observation(
            mono=t1,
            ts=self.start_ts + t1,
            env=self._env,
            audio=audio,
            truth=self.label_at(t0),
        )

    def advance(self, seconds: float) -> None:
        """Skip ahead in simulated time without producing audio (the cabin air is still simulated).

        A fleet started at once uses this to put each vehicle at a different point of its scenario.
        """
        if not seconds >= 0 or not math.isfinite(seconds):
            raise ValueError("seconds must be a non-negative number")
        self.reads += round(seconds * self.rate_hz)

    def health(self) -> dict[str, SensorHealth]:
        """The simulator's sensors never fail."""
        return {"bme680": SensorHealth(), "pms5003": SensorHealth(), "microphone": SensorHealth()}
