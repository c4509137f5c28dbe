"""Hardware profile schema: what a hardware revision has, where, and the value ranges it can report.

Profiles live as YAML in ``firmware_configs/``; the agent loads one by name and reports the name
in ``status``, and the collector checks incoming feature values against the profile's ranges.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.features import FEATURE_NAMES


class ProfileError(ValueError):
    """A hardware profile that cannot be used, with the field at fault."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class I2cConfig(_Strict):
    """BME680 on an I2C bus."""

    bus: int = Field(1, ge=0, description="I2C bus number (/dev/i2c-N)")
    bme680_address: int = Field(0x76, description="0x76 (SDO low) or 0x77 (SDO high)")

    @model_validator(mode="after")
    def _address(self) -> I2cConfig:
        if self.bme680_address not in (0x76, 0x77):
            raise ValueError("bme680_address must be 0x76 or 0x77")
        return self


class UartConfig(_Strict):
    """PMS5003-class particle sensor on a UART."""

    device: str = Field("/dev/ttyAMA0", description="serial device (a udev alias is best)")
    baud: int = Field(9600, description="PMS5003 speaks 9600 8N1")


class AudioConfig(_Strict):
    """Microphone array."""

    device_match: str = Field("UMA-8", description="substring of the PortAudio device name")
    sample_rate: int = Field(16_000, ge=8000, le=96_000)
    channels: int = Field(1, ge=1, le=16, description="channels opened on the device")
    channel: int = Field(0, ge=0, description="channel used for features")


class ValueRange(_Strict):
    """Inclusive physical range a sensor can report."""

    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> ValueRange:
        if not self.min < self.max:
            raise ValueError("min must be below max")
        return self


class HardwareProfile(_Strict):
    """One hardware revision of the in-vehicle unit."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
    description: str = ""
    i2c: I2cConfig = Field(default_factory=I2cConfig)
    uart: UartConfig = Field(default_factory=UartConfig)
    audio: AudioConfig = Field(default_factory=AudioConfig)
    ranges: dict[str, ValueRange] = Field(default_factory=dict, description="feature name -> valid range")

    @model_validator(mode="after")
    def _known_features(self) -> HardwareProfile:
        unknown = set(self.ranges) - set(FEATURE_NAMES)
        if unknown:
            raise ValueError(f"ranges name unknown features: {sorted(unknown)}")
        if self.audio.channel >= self.audio.channels:
            raise ValueError("audio.channel must be below audio.channels")
        return self


def load_profile(path: Path) -> HardwareProfile:
    """Load and validate one profile YAML file."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
        return HardwareProfile.model_validate(doc)
    except (OSError, yaml.YAMLError) as exc:
        raise ProfileError(f"{path}: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ProfileError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def find_profile(name: str, search: list[Path]) -> HardwareProfile:
    """Load the profile called ``name`` from the first folder that has ``<name>.yaml``."""
    for folder in search:
        path = Path(folder) / f"{name}.yaml"
        if path.is_file():
            profile = load_profile(path)
            if profile.name != name:
                raise ProfileError(f"{path} declares name {profile.name!r}, expected {name!r}")
            return profile
    raise ProfileError(f"no hardware profile {name!r} in {[str(p) for p in search]}")
