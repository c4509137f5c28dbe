"""Feature pipeline: physical meaning of each audio feature on synthetic signals with known answers."""

from __future__ import annotations

import math

import numpy as np

from shared.features import (
    FEATURE_NAMES,
    FLAG_AUDIO_MISSING,
    FLAG_PM_MISSING,
    AudioFeatures,
    EnvReading,
    FeaturePipeline,
    impute,
    mel_filterbank,
)

SR = 16_000


def tone(freq: float, amp: float, n: int = 1600) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(n) / SR)).astype(np.float32)


def test_forty_unique_features() -> None:
    assert len(FEATURE_NAMES) == 40 == len(set(FEATURE_NAMES))


def test_tone_levels_centroid_and_zcr() -> None:
    f = AudioFeatures(SR)(tone(1000.0, 0.5))
    rms, peak, centroid, flatness, zcr = f[:5]
    assert math.isclose(rms, 20 * math.log10(0.5 / math.sqrt(2)), abs_tol=0.05)
    assert math.isclose(peak, 20 * math.log10(0.5), abs_tol=0.1)
    assert abs(centroid - 1000.0) < 60.0
    assert flatness < 0.05  # a pure tone is as un-flat as it gets
    assert math.isclose(zcr, 2 * 1000 / SR, rel_tol=0.02)
    mel = f[5:]
    assert int(np.argmax(mel)) == int(np.argmax(mel_filterbank(SR, 512, 22) @ (np.fft.rfftfreq(512, 1 / SR) == 1000)))


def test_white_noise_is_flat_and_broadband() -> None:
    rng = np.random.default_rng(3)
    f = AudioFeatures(SR)(rng.normal(0, 0.1, 1600).astype(np.float32))
    assert f[3] > 0.5
    assert 3000 < f[2] < 5000  # centroid of white noise sits near a quarter of the sample rate


def test_short_or_missing_audio_is_nan_and_flagged() -> None:
    pipeline = FeaturePipeline(SR)
    env = EnvReading(22.0, 40.0, 1013.0, 80_000.0)
    x, flags = pipeline(env, None)
    assert flags & FLAG_AUDIO_MISSING and flags & FLAG_PM_MISSING
    assert np.isnan(x[13:]).all() and math.isclose(x[3], math.log10(80_000.0), rel_tol=1e-6)
    assert np.isnan(AudioFeatures(SR)(np.zeros(100, np.float32))).all()


def test_impute_replaces_only_missing() -> None:
    x = np.array([1.0, np.nan, 3.0], np.float32)
    out, changed = impute(x, np.array([9.0, 8.0, 7.0], np.float32))
    assert changed and out.tolist() == [1.0, 8.0, 3.0]
    same, changed = impute(out, np.zeros(3, np.float32))
    assert not changed and same is out
