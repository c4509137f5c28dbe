"""Hardware profiles in firmware_configs/: schema-valid, found by name, and consistent with the data.

The ranges are what the agent and the collector check values against, so they are tested against
what the sensors and the feature code can really produce: the simulated cabin over every built-in
scenario must stay inside ``sim-v1``, and audio features of full-scale signals inside the audio ranges.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from edge_agent.config import PROFILE_DIRS, ConfigError, config_from_dict, load_device_profile
from edge_agent.sensors.simulated import SimulatedCabin, load_scenario
from shared.features import FEATURE_NAMES, FeaturePipeline
from shared.profile import HardwareProfile, ProfileError, find_profile, load_profile

REPO = Path(__file__).resolve().parents[2]
FIRMWARE = REPO / "firmware_configs"
PROFILES = sorted(FIRMWARE.glob("*.yaml"))


def test_there_are_profiles_and_the_package_finds_their_folder() -> None:
    assert {p.stem for p in PROFILES} >= {"pi4-uma8-v1", "sim-v1"}
    assert FIRMWARE in PROFILE_DIRS and Path("/etc/edge-agent/profiles") in PROFILE_DIRS


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_every_profile_validates_and_is_named_after_its_file(path: Path) -> None:
    profile = load_profile(path)
    assert profile.name == path.stem
    assert find_profile(path.stem, [FIRMWARE]) == profile
    # Every feature has a range: the collector can check every value a device sends.
    assert set(profile.ranges) == set(FEATURE_NAMES)
    assert profile.audio.sample_rate == 16_000  # what the reference model's audio features expect
    assert profile.audio.channel < profile.audio.channels


def test_the_hardware_revision() -> None:
    p = find_profile("pi4-uma8-v1", [FIRMWARE])
    assert (p.i2c.bus, p.i2c.bme680_address) == (1, 0x76)
    assert (p.uart.device, p.uart.baud) == ("/dev/pms5003", 9600)
    assert p.audio.device_match == "UMA-8" and p.audio.channels == 8


def test_a_broken_profile_is_refused_with_the_field(tmp_path: Path) -> None:
    doc = yaml.safe_load((FIRMWARE / "pi4-uma8-v1.yaml").read_text())
    doc["ranges"]["temperature_c"] = {"min": 85, "max": -40}
    (tmp_path / "pi4-uma8-v1.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ProfileError, match=r"ranges\.temperature_c"):
        find_profile("pi4-uma8-v1", [tmp_path])
    doc = yaml.safe_load((FIRMWARE / "pi4-uma8-v1.yaml").read_text())
    doc["uart"]["baudrate"] = 9600
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({**doc, "name": "typo"}))
    with pytest.raises(ProfileError, match="baudrate"):
        find_profile("typo", [tmp_path])


def test_config_looks_in_profile_dirs_first(tmp_path: Path) -> None:
    doc = yaml.safe_load((FIRMWARE / "sim-v1.yaml").read_text())
    doc["description"] = "local override"
    (tmp_path / "sim-v1.yaml").write_text(yaml.safe_dump(doc))
    config = config_from_dict({"device": {"profile": "sim-v1", "profile_dirs": [str(tmp_path)]}})
    assert load_device_profile(config).description == "local override"
    assert load_device_profile(config_from_dict({})).name == "sim-v1"  # the default, from firmware_configs/


def test_profile_and_feature_sample_rates_must_agree() -> None:
    config = config_from_dict(
        {"device": {"profile": "pi4-uma8-v1"}, "sensors": {"backend": "hardware", "sample_rate": 48_000}}
    )
    with pytest.raises(ConfigError, match=r"audio\.sample_rate 16000 differs from sensors\.sample_rate 48000"):
        load_device_profile(config)


def test_an_unknown_profile_names_where_it_looked() -> None:
    with pytest.raises(ConfigError, match=r"device.profile: no hardware profile 'pi9' in .*firmware_configs"):
        load_device_profile(config_from_dict({"device": {"profile": "pi9"}}))


def in_range(profile: HardwareProfile, X: np.ndarray) -> dict[str, tuple[float, float]]:
    """Features whose observed min/max leave the profile's range: {name: (min, max)}."""
    out = {}
    for j, name in enumerate(FEATURE_NAMES):
        col = X[:, j][np.isfinite(X[:, j])]
        r = profile.ranges[name]
        if col.size and (col.min() < r.min or col.max() > r.max):
            out[name] = (float(col.min()), float(col.max()))
    return out


@pytest.mark.parametrize("scenario", ["training", "default", "drift"])
def test_the_simulated_cabin_stays_inside_sim_v1(scenario: str) -> None:
    profile = find_profile("sim-v1", [FIRMWARE])
    cabin = SimulatedCabin(load_scenario(scenario), seed=11, rate_hz=10)
    pipeline = FeaturePipeline()
    rows = []
    for _ in range(600):
        obs = cabin.read()
        features, _ = pipeline(obs.env, obs.audio)
        rows.append(features)
        cabin.advance(2.0)  # sample the whole scenario, not just its first minute
    assert in_range(profile, np.asarray(rows)) == {}


def test_audio_ranges_hold_for_extreme_signals() -> None:
    profile = find_profile("pi4-uma8-v1", [FIRMWARE])
    pipeline = FeaturePipeline()
    t = np.arange(1600) / 16_000
    rng = np.random.default_rng(0)
    signals = [
        np.sign(np.sin(2 * np.pi * f * t)) for f in (50, 440, 1000, 4000, 7900)
    ] + [  # full-scale square waves (the loudest a 16-bit ADC can report)
        np.zeros_like(t),  # digital silence
        np.clip(rng.normal(0, 1, t.size), -1, 1),  # clipped noise
        np.ones_like(t),  # DC at full scale
    ]
    rows = [pipeline(None, s.astype(np.float32))[0] for s in signals]
    X = np.asarray(rows)
    X[:, :13] = np.nan  # no environment here
    assert in_range(profile, X) == {}


def test_udev_rules_name_the_devices_the_profile_and_unit_use() -> None:
    rules = (FIRMWARE / "99-edge-agent.rules").read_text()
    active = [line for line in rules.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert any('SYMLINK+="pms5003"' in r and 'KERNEL=="ttyAMA0"' in r for r in active)
    uma8 = [r for r in active if 'ATTRS{idVendor}=="2752"' in r]
    assert uma8 and all('ATTRS{idProduct}=="001c"' in r for r in uma8)
    assert any('ATTR{id}="uma8"' in r for r in uma8)
    assert any('KERNEL=="i2c-1"' in r and 'GROUP="i2c"' in r for r in active)
    for r in active:
        assert re.fullmatch(r'([A-Za-z{}_]+(==|!=|\+=|=|:=)"[^"]*"(, )?)+', r), r


def test_config_txt_enables_i2c_and_the_uart() -> None:
    lines = [
        line.strip()
        for line in (FIRMWARE / "config.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {"dtparam=i2c_arm=on", "enable_uart=1", "dtoverlay=disable-bt"} <= set(lines)


def test_asound_conf_names_the_uma8_card() -> None:
    text = (FIRMWARE / "asound.conf").read_text()
    assert "pcm.uma8" in text and "card uma8" in text and "ctl.uma8" in text
