"""The feature pipeline: environmental readings and an audio window to one feature vector.

The agent calls this on every inference and the trainer and benchmarks call it on recorded or
simulated sessions, so a model never sees features computed by different code than it was trained
on. Everything here is numpy, allocation-light and free of I/O.

Feature vector (40 values, float32, physical units so monitoring can bin them on the reference
edges and check them against a hardware profile's ranges):

* 7 environmental: temperature (°C), relative humidity (%), pressure (hPa), gas resistance
  (log10 Ω, VOCs lower it), PM1.0 / PM2.5 / PM10 mass concentration (µg/m³);
* 6 particle counts per 0.1 L above 0.3, 0.5, 1.0, 2.5, 5 and 10 µm, as log10(1 + count);
* 27 audio: RMS and peak level (dBFS), spectral centroid (Hz), spectral flatness (0..1),
  zero-crossing rate (crossings per sample) and 22 log-mel band energies (dB).

A missing input (sensor failed, no data) is NaN and flagged in the record's ``sensor_flags``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np

ENV_FEATURES: Final = (
    "temperature_c",
    "humidity_pct",
    "pressure_hpa",
    "gas_resistance_log10_ohm",
    "pm1_ug_m3",
    "pm25_ug_m3",
    "pm10_ug_m3",
)
PARTICLE_SIZES_UM: Final = (0.3, 0.5, 1.0, 2.5, 5.0, 10.0)
PARTICLE_FEATURES: Final = tuple(f"particles_gt_{str(s).replace('.', '_')}um_log10" for s in PARTICLE_SIZES_UM)
N_MELS: Final = 22
AUDIO_SCALAR_FEATURES: Final = ("audio_rms_dbfs", "audio_peak_dbfs", "audio_centroid_hz", "audio_flatness", "audio_zcr")
MEL_FEATURES: Final = tuple(f"audio_mel_{i:02d}_db" for i in range(N_MELS))
AUDIO_FEATURES: Final = AUDIO_SCALAR_FEATURES + MEL_FEATURES
FEATURE_NAMES: Final = ENV_FEATURES + PARTICLE_FEATURES + AUDIO_FEATURES
N_FEATURES: Final = len(FEATURE_NAMES)

# sensor_flags bits: which inputs were missing (NaN, imputed before inference) in a record.
FLAG_GAS_MISSING: Final = 1 << 0  # BME680 (temperature, humidity, pressure, gas)
FLAG_PM_MISSING: Final = 1 << 1  # PMS5003 (mass concentrations and counts)
FLAG_AUDIO_MISSING: Final = 1 << 2  # microphone
FLAG_IMPUTED: Final = 1 << 3  # at least one input was replaced by its reference mean
FLAG_AUDIO_OVERRUN: Final = 1 << 4  # the audio window lost samples
FLAG_OUTPUT_INVALID: Final = 1 << 5  # the model's outputs were NaN/Inf: probabilities and activations zeroed

_DB_FLOOR: Final = -120.0
_EPS: Final = 1e-12


@dataclass(slots=True)
class EnvReading:
    """One environmental sample; NaN for a value the sensor did not deliver."""

    temperature_c: float = math.nan
    humidity_pct: float = math.nan
    pressure_hpa: float = math.nan
    gas_resistance_ohm: float = math.nan
    pm1_ug_m3: float = math.nan
    pm25_ug_m3: float = math.nan
    pm10_ug_m3: float = math.nan
    particles_per_dl: tuple[float, float, float, float, float, float] = (math.nan,) * 6


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float = 50.0, fmax: float | None = None
) -> np.ndarray:
    """Triangular HTK mel filters, shape ``[n_mels, n_fft // 2 + 1]``, each normalised to unit area."""
    fmax = sample_rate / 2 if fmax is None else fmax
    bins = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (bins[None, :] - lower) / (centre - lower)
    down = (upper - bins[None, :]) / (upper - centre)
    fb = np.maximum(0.0, np.minimum(up, down))
    area = fb.sum(axis=1, keepdims=True)
    return (fb / np.maximum(area, _EPS)).astype(np.float32)


class AudioFeatures:
    """Per-window audio features: level, peak, centroid, flatness, zero-crossing rate, log-mel bands.

    The window is split into Hann-windowed frames of ``n_fft`` samples (hop ``n_fft // 2``); the
    power spectra are averaged over frames before the mel bands and spectral shape are taken.
    Samples are floats in [-1, 1] (dBFS refers to full scale 1.0).
    """

    def __init__(self, sample_rate: int = 16_000, n_fft: int = 512, n_mels: int = N_MELS) -> None:
        if sample_rate <= 0 or n_fft < 16 or n_fft & (n_fft - 1):
            raise ValueError("sample_rate must be positive and n_fft a power of two >= 16")
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.hop = n_fft // 2
        self.window = np.hanning(n_fft).astype(np.float32)
        self.filters = mel_filterbank(sample_rate, n_fft, n_mels)
        self.freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate).astype(np.float32)
        self.n_features = len(AUDIO_SCALAR_FEATURES) + n_mels
        self._window_power = float((self.window**2).sum())

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        """Features of one mono window (float32 vector of ``n_features``); NaN if it is too short."""
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        out = np.full(self.n_features, np.nan, dtype=np.float32)
        if x.size < self.n_fft or not np.isfinite(x).all():
            return out
        rms = float(np.sqrt(np.mean(x * x)))
        peak = float(np.max(np.abs(x)))
        signs = np.signbit(x)
        zcr = float(np.count_nonzero(signs[1:] != signs[:-1])) / (x.size - 1)
        n_frames = 1 + (x.size - self.n_fft) // self.hop
        frames = np.lib.stride_tricks.sliding_window_view(x, self.n_fft)[:: self.hop][:n_frames]
        spectrum = np.fft.rfft(frames * self.window, axis=1)
        power = (spectrum.real**2 + spectrum.imag**2).mean(axis=0) / self._window_power
        total = float(power.sum())
        centroid = float((power * self.freqs).sum() / total) if total > _EPS else 0.0
        flatness = float(np.exp(np.mean(np.log(power + _EPS))) / (np.mean(power) + _EPS)) if total > _EPS else 1.0
        mel = self.filters @ power
        out[0] = max(_DB_FLOOR, 20.0 * math.log10(rms + _EPS))
        out[1] = max(_DB_FLOOR, 20.0 * math.log10(peak + _EPS))
        out[2] = centroid
        out[3] = min(1.0, flatness)
        out[4] = zcr
        out[5:] = np.maximum(_DB_FLOOR, 10.0 * np.log10(mel + _EPS))
        return out


def env_vector(reading: EnvReading) -> np.ndarray:
    """The 13 environmental and particle features of one reading (float32, NaN where missing)."""
    gas = reading.gas_resistance_ohm
    gas_log = math.log10(gas) if gas > 0 else math.nan
    counts = np.asarray(reading.particles_per_dl, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        counts_log = np.where(counts >= 0, np.log10(1.0 + np.maximum(counts, 0.0)), np.nan)
    head = (
        reading.temperature_c,
        reading.humidity_pct,
        reading.pressure_hpa,
        gas_log,
        reading.pm1_ug_m3,
        reading.pm25_ug_m3,
        reading.pm10_ug_m3,
    )
    return np.concatenate([np.asarray(head, dtype=np.float64), counts_log]).astype(np.float32)


class FeaturePipeline:
    """Environmental reading + audio window -> the model's feature vector and sensor flags."""

    names: Final = FEATURE_NAMES

    def __init__(self, sample_rate: int = 16_000, n_fft: int = 512) -> None:
        self.audio = AudioFeatures(sample_rate=sample_rate, n_fft=n_fft)

    def __call__(self, env: EnvReading | None, audio: np.ndarray | None) -> tuple[np.ndarray, int]:
        """Return ``(features[40] float32, sensor_flags)``; missing parts are NaN and flagged."""
        flags = 0
        env_part = env_vector(env if env is not None else EnvReading())
        if np.isnan(env_part[:4]).any():
            flags |= FLAG_GAS_MISSING
        if np.isnan(env_part[4:]).any():
            flags |= FLAG_PM_MISSING
        audio_part = self.audio(audio) if audio is not None else np.full(self.audio.n_features, np.nan, np.float32)
        if np.isnan(audio_part).any():
            flags |= FLAG_AUDIO_MISSING
        return np.concatenate([env_part, audio_part]), flags


def impute(features: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, bool]:
    """Replace NaN inputs by the bundle's reference means; says whether anything was replaced."""
    missing = np.isnan(features)
    if not missing.any():
        return features, False
    out = np.where(missing, means, features).astype(np.float32)
    return out, True
