"""A fake SMBus with a BME680 on it: the register map, forced-mode timing and failure injection.

It stands in for ``smbus2.SMBus`` + the chip, at the level of I2C transactions: the driver under
test reads the chip id, the calibration blocks and the data registers exactly as it would on a
Raspberry Pi. The calibration comes either from raw register bytes (as dumped from a device) or
from named coefficients that the fake encodes into the datasheet's register layout; the raw ADC
values a measurement reports are set by the test. Time is a :class:`FakeClock` shared with the
driver, so a 150 ms heater phase costs no real time.

Failure injection: :meth:`FakeBme680Bus.unplug` (every transaction raises ``OSError`` with errno
121 ``EREMOTEIO`` or 5 ``EIO``, what Linux i2c-dev returns for a NACK or a dead bus), a wrong chip
id, a measurement that never finishes, a measurement that takes longer than the datasheet says,
gas-invalid / heater-unstable results, and a silent power cycle that forgets the configuration.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

CHIP_ID = 0x61
I2C_SMBUS_BLOCK_MAX = 32  # smbus2 refuses longer block transfers

# Writable registers (datasheet memory map); everything else ignores writes like the chip does.
_IDAC_HEAT = range(0x50, 0x5A)
_RES_HEAT = range(0x5A, 0x64)
_GAS_WAIT = range(0x64, 0x6E)
_CTRL = (0x70, 0x71, 0x72, 0x73, 0x74, 0x75)
_RESET = 0xE0
_WRITABLE = frozenset([*_IDAC_HEAT, *_RES_HEAT, *_GAS_WAIT, *_CTRL, _RESET])
_OVERSAMPLING = {0: 0, 1: 1, 2: 2, 3: 4, 4: 8, 5: 16, 6: 16, 7: 16}


@dataclass
class FakeClock:
    """Monotonic time that only moves when someone sleeps (or a test advances it)."""

    now: float = 1000.0
    sleeps: list[float] = field(default_factory=list)

    def monotonic(self) -> float:
        """The current fake time."""
        return self.now

    def sleep(self, seconds: float) -> None:
        """Advance fake time instead of blocking."""
        assert seconds >= 0, seconds
        self.sleeps.append(seconds)
        self.now += seconds


@dataclass
class RawSample:
    """The ADC values one measurement reports (20-bit T and P, 16-bit H, 10-bit gas + 4-bit range)."""

    temp_adc: int = 500_000
    press_adc: int = 350_000
    hum_adc: int = 25_000
    gas_adc: int = 400
    gas_range: int = 7


def encode_calibration(c: Mapping[str, int]) -> dict[int, int]:
    """Lay named coefficients out in the calibration registers (datasheet Tables 11 and 13)."""

    def lsb_msb(lsb_reg: int, msb_reg: int, value: int) -> dict[int, int]:
        raw = value & 0xFFFF
        return {lsb_reg: raw & 0xFF, msb_reg: raw >> 8}

    regs: dict[int, int] = {}
    regs |= lsb_msb(0xE9, 0xEA, c["par_t1"])
    regs |= lsb_msb(0x8A, 0x8B, c["par_t2"])
    regs[0x8C] = c["par_t3"] & 0xFF
    regs |= lsb_msb(0x8E, 0x8F, c["par_p1"])
    regs |= lsb_msb(0x90, 0x91, c["par_p2"])
    regs[0x92] = c["par_p3"] & 0xFF
    regs |= lsb_msb(0x94, 0x95, c["par_p4"])
    regs |= lsb_msb(0x96, 0x97, c["par_p5"])
    regs[0x98] = c["par_p7"] & 0xFF
    regs[0x99] = c["par_p6"] & 0xFF
    regs |= lsb_msb(0x9C, 0x9D, c["par_p8"])
    regs |= lsb_msb(0x9E, 0x9F, c["par_p9"])
    regs[0xA0] = c["par_p10"] & 0xFF
    h1, h2 = c["par_h1"], c["par_h2"]
    regs[0xE1] = (h2 >> 4) & 0xFF
    regs[0xE2] = ((h2 & 0x0F) << 4) | (h1 & 0x0F)
    regs[0xE3] = (h1 >> 4) & 0xFF
    for name, reg in (("par_h3", 0xE4), ("par_h4", 0xE5), ("par_h5", 0xE6), ("par_h6", 0xE7), ("par_h7", 0xE8)):
        regs[reg] = c[name] & 0xFF
    regs |= lsb_msb(0xEB, 0xEC, c["par_gh2"])
    regs[0xED] = c["par_gh1"] & 0xFF
    regs[0xEE] = c["par_gh3"] & 0xFF
    regs[0x00] = c["res_heat_val"] & 0xFF
    # the neighbouring bits of 0x02 and 0x04 hold other things on a real chip; keep them non-zero
    regs[0x02] = ((c["res_heat_range"] & 0x03) << 4) | 0x06
    regs[0x04] = ((c["range_sw_err"] & 0x0F) << 4) | 0x03
    return regs


def raw_calibration_registers(
    block_8a: Sequence[int], block_e1: Sequence[int], block_00: Sequence[int]
) -> dict[int, int]:
    """Register contents from the three calibration blocks as read off a device (0x8A.., 0xE1.., 0x00..)."""
    regs: dict[int, int] = {}
    for start, block in ((0x8A, block_8a), (0xE1, block_e1), (0x00, block_00)):
        regs.update({start + i: b for i, b in enumerate(block)})
    return regs


class FakeBme680Bus:
    """An smbus2-compatible bus with one BME680 answering at ``address``."""

    def __init__(
        self,
        calibration: Mapping[int, int],
        *,
        clock: FakeClock,
        address: int = 0x76,
        chip_id: int = CHIP_ID,
        variant_id: int = 0x00,
    ) -> None:
        """``calibration`` maps register address -> byte (see :func:`encode_calibration`)."""
        self.clock = clock
        self.address = address
        self.regs = bytearray(256)
        for reg, value in calibration.items():
            self.regs[reg] = value
        self.regs[0xD0] = chip_id
        self.regs[0xF0] = variant_id
        self._calibration = bytes(self.regs)
        self.sample = RawSample()
        self.gas_valid_override: bool | None = None
        self.heat_stable_override: bool | None = None
        self.never_finish = False
        self.extra_delay_s = 0.0
        self.unplugged_errno: int | None = None
        self.closed = False
        self.log: list[tuple[str, int, int]] = []  # (op, register, value or length)
        self.resets = 0
        self.forced_starts = 0
        self._started_at: float | None = None
        self._done_at = 0.0
        self._gas_phase_at = 0.0

    # -- failure injection -------------------------------------------------------------------

    def unplug(self, err: int = errno.EREMOTEIO) -> None:
        """From now on every transaction fails like i2c-dev does for a missing device."""
        self.unplugged_errno = err

    def plug_in(self, *, power_cycled: bool = True) -> None:
        """The device answers again; after a power cycle its configuration is gone."""
        self.unplugged_errno = None
        if power_cycled:
            self.power_cycle()

    def power_cycle(self) -> None:
        """Forget every setting and measurement, as after a brown-out (calibration is in NVM)."""
        self.regs[:] = self._calibration
        self._started_at = None

    # -- the smbus2 surface ------------------------------------------------------------------

    def read_byte_data(self, i2c_addr: int, register: int, force: bool | None = None) -> int:
        """One register read."""
        self._transaction(i2c_addr)
        self.log.append(("read", register, 1))
        self._advance()
        return self.regs[register]

    def write_byte_data(self, i2c_addr: int, register: int, value: int, force: bool | None = None) -> None:
        """One register write."""
        self._transaction(i2c_addr)
        if not 0 <= value <= 0xFF:
            raise ValueError(f"byte value out of range: {value}")
        self.log.append(("write", register, value))
        self._advance()
        if register not in _WRITABLE:
            return
        if register == _RESET:
            if value == 0xB6:
                self.resets += 1
                self.power_cycle()
            return
        self.regs[register] = value
        if register == 0x74 and value & 0x03 == 0x01:
            self._start_forced()

    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int, force: bool | None = None) -> list[int]:
        """Consecutive registers in one transaction (auto-increment), as smbus2 does it."""
        if length > I2C_SMBUS_BLOCK_MAX:
            raise ValueError(f"Desired block length over {I2C_SMBUS_BLOCK_MAX} bytes")
        self._transaction(i2c_addr)
        if register + length > 0x100:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self.log.append(("block", register, length))
        self._advance()
        return list(self.regs[register : register + length])

    def close(self) -> None:
        """What smbus2 does on close: drop the file descriptor."""
        self.closed = True

    # -- the chip ----------------------------------------------------------------------------

    def writes_to(self, register: int) -> list[int]:
        """Values written to ``register``, in order."""
        return [v for op, reg, v in self.log if op == "write" and reg == register]

    def _transaction(self, i2c_addr: int) -> None:
        if self.closed:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        if self.unplugged_errno is not None:
            raise OSError(self.unplugged_errno, os.strerror(self.unplugged_errno))
        if i2c_addr != self.address:
            raise OSError(errno.EREMOTEIO, os.strerror(errno.EREMOTEIO))  # nobody acknowledges

    def _heater_ms(self) -> float:
        wait = self.regs[0x64]
        return (wait & 0x3F) * 4 ** (wait >> 6)

    def _run_gas(self) -> bool:
        return bool(self.regs[0x71] & 0x10)

    def _start_forced(self) -> None:
        self.forced_starts += 1
        now = self.clock.monotonic()
        osr_t = _OVERSAMPLING[self.regs[0x74] >> 5]
        osr_p = _OVERSAMPLING[(self.regs[0x74] >> 2) & 0x07]
        osr_h = _OVERSAMPLING[self.regs[0x72] & 0x07]
        # typical conversion times of the BME280 family: 1 ms + 2 ms per sample (+0.5 ms per P/H channel)
        tph_s = (1.0 + 2.0 * osr_t + (2.0 * osr_p + 0.5) * bool(osr_p) + (2.0 * osr_h + 0.5) * bool(osr_h)) / 1000
        gas_s = (self._heater_ms() + 2.0) / 1000 if self._run_gas() else 0.0
        self._started_at = now
        self._gas_phase_at = now + tph_s
        self._done_at = now + tph_s + gas_s + self.extra_delay_s
        self.regs[0x1D] = 0x20  # measuring; new_data cleared by the new conversion

    def _advance(self) -> None:
        """Bring the status and data registers up to the current fake time."""
        if self._started_at is None:
            return
        now = self.clock.monotonic()
        if self.never_finish or now < self._done_at:
            self.regs[0x1D] = 0x40 if now >= self._gas_phase_at and self._run_gas() else 0x20
            return
        self._started_at = None
        self._fill_data()
        self.regs[0x74] &= ~0x03  # back to sleep mode after a forced cycle

    def _fill_data(self) -> None:
        s = self.sample
        osr_t = self.regs[0x74] >> 5
        osr_p = (self.regs[0x74] >> 2) & 0x07
        osr_h = self.regs[0x72] & 0x07
        # a skipped channel reads 0x80000 / 0x8000
        temp = s.temp_adc if osr_t else 0x80000
        press = s.press_adc if osr_p else 0x80000
        hum = s.hum_adc if osr_h else 0x8000
        for reg, value in ((0x1F, press), (0x22, temp)):
            self.regs[reg] = (value >> 12) & 0xFF
            self.regs[reg + 1] = (value >> 4) & 0xFF
            self.regs[reg + 2] = (value & 0x0F) << 4
        self.regs[0x25] = hum >> 8
        self.regs[0x26] = hum & 0xFF
        heater_on = not self.regs[0x70] & 0x08 and self.regs[0x5A] != 0
        gas_valid = self._run_gas() if self.gas_valid_override is None else self.gas_valid_override
        heat_stable = (
            (heater_on and self._heater_ms() >= 20) if self.heat_stable_override is None else self.heat_stable_override
        )
        self.regs[0x2A] = (s.gas_adc >> 2) & 0xFF
        self.regs[0x2B] = ((s.gas_adc & 0x03) << 6) | (0x20 * gas_valid) | (0x10 * heat_stable) | s.gas_range
        self.regs[0x1D] = 0x80  # new_data, gas measurement index 0
