"""Bosch BME680 (temperature, humidity, pressure, gas resistance) over I2C with smbus2.

Written from the BME680 datasheet (BST-BME680-DS001) and the floating-point compensation of
Bosch's BME68x Sensor API (``bme68x.c`` built with ``BME68X_USE_FPU``), BME680 ("low gas")
variant. Each :meth:`Bme680.read` triggers one forced-mode TPHG cycle: temperature, pressure and
humidity conversions, then the hot plate is heated to ``heater_temp_c`` for ``heater_duration_ms``
and its resistance measured. In the common case a read costs two bus transactions (the
``ctrl_meas`` write and one 15-byte block read of the data registers) plus the wait.

Why not a library: pimoroni's ``bme680`` (the one maintained pure-Python smbus2 driver) uses the
integer compensation, polls with unbounded ``while`` loops and fixed sleeps that cannot be injected,
and raises ``RuntimeError`` for every failure; ``bme68x`` (pi3g) is a C extension that opens
``/dev/i2c-N`` itself, so it cannot be exercised at the smbus level. Adafruit's needs Blinka.

Failures map onto :mod:`edge_agent.sensors.errors`: a bus ``OSError`` (NACK ``EREMOTEIO``,
``EIO``, a vanished adapter) is :class:`SensorDisconnected`; a device that answers with something
impossible is :class:`SensorDataError` (``bad_chip_id``, ``unsupported_variant``,
``bad_calibration``, ``bad_data``); a measurement that does not finish within the timeout is
:class:`SensorError` ``timeout``. After any failure the next read re-identifies, soft-resets and
reconfigures the device first, so a sensor that was unplugged, browned out or wedged in forced
mode recovers without a new instance.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

from smbus2 import SMBus

from edge_agent.sensors.errors import SensorDataError, SensorDisconnected, SensorError

log = logging.getLogger(__name__)

_T = TypeVar("_T")

SENSOR: Final = "bme680"
ADDRESSES: Final = (0x76, 0x77)  # SDO to GND / SDO to VDDIO

# Register map (datasheet section 5.2, memory map for I2C).
REG_RES_HEAT_VAL: Final = 0x00  # calibration block 3 starts here: res_heat_val, -, res_heat_range, -, range_sw_err
REG_STATUS: Final = 0x1D  # meas_status_0; the data registers follow it
REG_RES_HEAT_0: Final = 0x5A
REG_GAS_WAIT_0: Final = 0x64
REG_CTRL_GAS_0: Final = 0x70
REG_CTRL_GAS_1: Final = 0x71
REG_CTRL_HUM: Final = 0x72
REG_CTRL_MEAS: Final = 0x74
REG_CONFIG: Final = 0x75
REG_COEFF_1: Final = 0x8A  # 0x8A..0xA0: par_t2..par_p10
REG_CHIP_ID: Final = 0xD0
REG_RESET: Final = 0xE0
REG_COEFF_2: Final = 0xE1  # 0xE1..0xEE: humidity, par_t1, heater; 0xF0 is the variant id

LEN_COEFF_1: Final = 23
LEN_COEFF_2: Final = 16
LEN_COEFF_3: Final = 5
LEN_FIELD: Final = 15  # 0x1D..0x2B: status, -, press[3], temp[3], hum[2], -[3], gas_r[2]

CHIP_ID: Final = 0x61
VARIANT_BME680: Final = 0x00
RESET_COMMAND: Final = 0xB6
RESET_SETTLE_S: Final = 0.010  # Bosch API BME68X_PERIOD_RESET

STATUS_NEW_DATA: Final = 0x80
STATUS_GAS_MEASURING: Final = 0x40
STATUS_MEASURING: Final = 0x20
GAS_VALID: Final = 0x20
HEAT_STAB: Final = 0x10
GAS_RANGE_MASK: Final = 0x0F
RUN_GAS: Final = 0x10  # ctrl_gas_1 run_gas (BME680), nb_conv = 0 selects heater profile 0
MODE_SLEEP: Final = 0b00
MODE_FORCED: Final = 0b01

# A temperature/pressure ADC reads 0x80000 and humidity 0x8000 when the channel was skipped
# (oversampling 0): what a BME680 that reset itself behind our back reports.
SKIPPED_TP: Final = 0x80000
SKIPPED_H: Final = 0x8000

OVERSAMPLING_CODES: Final = {1: 0b001, 2: 0b010, 4: 0b011, 8: 0b100, 16: 0b101}
IIR_CODES: Final = {0: 0, 1: 1, 3: 2, 7: 3, 15: 4, 31: 5, 63: 6, 127: 7}
HEATER_TEMP_RANGE_C: Final = (200.0, 400.0)
HEATER_DURATION_RANGE_MS: Final = (1, 4032)  # 4032 ms = 63 * 4**3, the largest gas_wait encoding

POLL_INTERVAL_S: Final = 0.005

# Gas range correction tables of the BME680 (Bosch API, float variant); the BME688 has none.
_GAS_K1: Final = (0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, -0.8, 0.0, 0.0, -0.2, -0.5, 0.0, -1.0, 0.0, 0.0)
_GAS_K2: Final = (0.0, 0.0, 0.0, 0.0, 0.1, 0.7, 0.0, -0.8, -0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


class SMBusLike(Protocol):
    """The part of :class:`smbus2.SMBus` the driver uses (a fake bus implements the same)."""

    def read_byte_data(self, i2c_addr: int, register: int, /) -> int:
        """Read one register."""
        ...

    def write_byte_data(self, i2c_addr: int, register: int, value: int, /) -> None:
        """Write one register."""
        ...

    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int, /) -> list[int]:
        """Read ``length`` consecutive registers (at most 32) in one transaction."""
        ...


@dataclass(frozen=True, slots=True)
class Bme680Reading:
    """One compensated TPHG measurement; ``gas_resistance_ohm`` is NaN unless the gas value is valid and stable."""

    temperature_c: float
    humidity_pct: float
    pressure_hpa: float
    gas_resistance_ohm: float
    gas_valid: bool
    heat_stable: bool


def _u16(lsb: int, msb: int) -> int:
    return (msb << 8) | lsb


def _s16(lsb: int, msb: int) -> int:
    value = (msb << 8) | lsb
    return value - 0x10000 if value & 0x8000 else value


def _s8(value: int) -> int:
    return value - 0x100 if value & 0x80 else value


@dataclass(frozen=True, slots=True)
class Bme680Calibration:
    """The factory trimming coefficients, as the datasheet names them (Table 11 and 13)."""

    par_t1: int
    par_t2: int
    par_t3: int
    par_p1: int
    par_p2: int
    par_p3: int
    par_p4: int
    par_p5: int
    par_p6: int
    par_p7: int
    par_p8: int
    par_p9: int
    par_p10: int
    par_h1: int
    par_h2: int
    par_h3: int
    par_h4: int
    par_h5: int
    par_h6: int
    par_h7: int
    par_gh1: int
    par_gh2: int
    par_gh3: int
    res_heat_range: int
    res_heat_val: int
    range_sw_err: int

    @classmethod
    def from_registers(cls, registers: dict[int, int]) -> Bme680Calibration:
        """Decode the coefficients from a register address -> byte mapping of the three calibration blocks."""
        r = registers
        return cls(
            par_t1=_u16(r[0xE9], r[0xEA]),
            par_t2=_s16(r[0x8A], r[0x8B]),
            par_t3=_s8(r[0x8C]),
            par_p1=_u16(r[0x8E], r[0x8F]),
            par_p2=_s16(r[0x90], r[0x91]),
            par_p3=_s8(r[0x92]),
            par_p4=_s16(r[0x94], r[0x95]),
            par_p5=_s16(r[0x96], r[0x97]),
            par_p6=_s8(r[0x99]),
            par_p7=_s8(r[0x98]),
            par_p8=_s16(r[0x9C], r[0x9D]),
            par_p9=_s16(r[0x9E], r[0x9F]),
            par_p10=r[0xA0],
            # par_h1 and par_h2 are 12-bit values sharing register 0xE2 (h1 low nibble, h2 high nibble)
            par_h1=(r[0xE3] << 4) | (r[0xE2] & 0x0F),
            par_h2=(r[0xE1] << 4) | (r[0xE2] >> 4),
            par_h3=_s8(r[0xE4]),
            par_h4=_s8(r[0xE5]),
            par_h5=_s8(r[0xE6]),
            par_h6=r[0xE7],
            par_h7=_s8(r[0xE8]),
            par_gh1=_s8(r[0xED]),
            par_gh2=_s16(r[0xEB], r[0xEC]),
            par_gh3=_s8(r[0xEE]),
            res_heat_range=(r[0x02] >> 4) & 0x03,
            res_heat_val=_s8(r[0x00]),
            # a signed 4-bit value in the high nibble
            range_sw_err=_s8(r[0x04] & 0xF0) >> 4,
        )

    def temperature(self, adc: int) -> tuple[float, float]:
        """Compensated temperature in °C and ``t_fine`` (which pressure and humidity need)."""
        x = adc / 131072.0 - self.par_t1 / 8192.0
        t_fine = 8.0 * x * self.par_t2 + 16.0 * self.par_t3 * x * x
        return t_fine / 5120.0, t_fine

    def pressure(self, adc: int, t_fine: float) -> float:
        """Compensated pressure in Pa; NaN when the calibration makes the divisor vanish."""
        v = t_fine / 2.0 - 64000.0
        offset = (v * v * self.par_p6 / 131072.0 + 2.0 * v * self.par_p5) / 4.0 + 65536.0 * self.par_p4
        scale = (self.par_p3 * v * v / 16384.0 + self.par_p2 * v) / 524288.0
        divisor = (1.0 + scale / 32768.0) * self.par_p1
        if int(divisor) == 0:  # Bosch's guard, same truncation
            return math.nan
        p = (1048576.0 - adc - offset / 4096.0) * 6250.0 / divisor
        q = p / 256.0
        correction = (
            self.par_p9 * p * p / 2147483648.0
            + p * self.par_p8 / 32768.0
            + q * q * q * self.par_p10 / 131072.0
            + 128.0 * self.par_p7
        )
        return p + correction / 16.0

    def humidity(self, adc: int, temperature_c: float) -> float:
        """Compensated relative humidity in %, clamped to 0..100 as Bosch does."""
        t = temperature_c
        h = (adc - (16.0 * self.par_h1 + self.par_h3 / 2.0 * t)) * (
            self.par_h2 / 262144.0 * (1.0 + self.par_h4 / 16384.0 * t + self.par_h5 / 1048576.0 * t * t)
        )
        h += (self.par_h6 / 16384.0 + self.par_h7 / 2097152.0 * t) * h * h
        return min(100.0, max(0.0, h))

    def gas_resistance(self, adc: int, gas_range: int) -> float:
        """Gas resistance in Ω from the 10-bit ADC value and the range (BME680 lookup tables)."""
        base = (1340.0 + 5.0 * self.range_sw_err) * (1.0 + _GAS_K1[gas_range] / 100.0)
        conductance = (
            (1.0 + _GAS_K2[gas_range] / 100.0) * 0.000000125 * float(1 << gas_range) * ((adc - 512.0) / base + 1.0)
        )
        return 1.0 / conductance if conductance > 0.0 else math.nan

    def heater_resistance_code(self, target_c: float, ambient_c: float) -> int:
        """``res_heat_x`` register value that heats the plate to ``target_c`` at ``ambient_c`` (datasheet 3.3.5)."""
        target = min(target_c, 400.0)
        r_base = self.par_gh1 / 16.0 + 49.0
        slope = self.par_gh2 / 32768.0 * 0.0005 + 0.00235
        r_heat = r_base * (1.0 + slope * target) + self.par_gh3 / 1024.0 * ambient_c
        scaled = r_heat * (4.0 / (4.0 + self.res_heat_range)) / (1.0 + self.res_heat_val * 0.002)
        # Bosch truncates toward zero into a uint8; clamp instead of wrapping on a nonsense calibration
        return max(0, min(255, int(3.4 * (scaled - 25.0))))

    def plausible(self) -> str | None:
        """Why these coefficients cannot come from a working BME680, or None when they look sane."""
        if self.par_t1 == 0 or self.par_t2 == 0:
            return f"temperature coefficients par_t1={self.par_t1} par_t2={self.par_t2}"
        if self.par_p1 == 0:
            return "pressure coefficient par_p1=0"
        if self.par_h2 == 0:
            return "humidity coefficient par_h2=0"
        return None


def gas_wait_code(duration_ms: int) -> int:
    """``gas_wait_x`` register value for a heater duration: 6-bit mantissa times 4**(2-bit multiplier) ms."""
    if duration_ms >= 0xFC0:
        return 0xFF
    factor = 0
    while duration_ms > 0x3F:
        duration_ms //= 4
        factor += 1
    return duration_ms + factor * 64


def _measurement_duration_s(os_t: int, os_p: int, os_h: int, heater_duration_ms: int) -> float:
    """How long a forced TPHG cycle takes (Bosch API ``bme68x_get_meas_dur`` plus the heater time)."""
    cycles = os_t + os_p + os_h
    micros = cycles * 1963 + 477 * 4 + 477 * 5 + 1000  # conversions, TPH switching, gas, wake-up
    return micros / 1e6 + heater_duration_ms / 1000.0


class Bme680:
    """A BME680 on an smbus2-like bus, read in forced mode at the caller's pace (one reader thread)."""

    def __init__(
        self,
        bus: SMBusLike,
        address: int = 0x76,
        *,
        heater_temp_c: float = 320.0,
        heater_duration_ms: int = 150,
        ambient_temp_c: float = 25.0,
        temperature_oversampling: int = 8,
        pressure_oversampling: int = 4,
        humidity_oversampling: int = 2,
        iir_filter: int = 3,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Validate the settings, then identify, reset, calibrate and configure the device (raises SensorError)."""
        if address not in ADDRESSES:
            raise ValueError(f"BME680 address must be 0x76 or 0x77, not {address:#04x}")
        lo, hi = HEATER_TEMP_RANGE_C
        if not lo <= heater_temp_c <= hi:
            raise ValueError(f"heater_temp_c must be within {lo:g}..{hi:g} °C, not {heater_temp_c!r}")
        dlo, dhi = HEATER_DURATION_RANGE_MS
        if not (isinstance(heater_duration_ms, int) and dlo <= heater_duration_ms <= dhi):
            raise ValueError(f"heater_duration_ms must be an integer within {dlo}..{dhi}, not {heater_duration_ms!r}")
        if not -40.0 <= ambient_temp_c <= 85.0:
            raise ValueError(f"ambient_temp_c must be within the operating range -40..85 °C, not {ambient_temp_c!r}")
        for name, value in (
            ("temperature_oversampling", temperature_oversampling),
            ("pressure_oversampling", pressure_oversampling),
            ("humidity_oversampling", humidity_oversampling),
        ):
            if value not in OVERSAMPLING_CODES:
                raise ValueError(f"{name} must be one of {sorted(OVERSAMPLING_CODES)}, not {value!r}")
        if iir_filter not in IIR_CODES:
            raise ValueError(f"iir_filter must be one of {sorted(IIR_CODES)}, not {iir_filter!r}")

        self._bus = bus
        self.address = address
        self.heater_temp_c = float(heater_temp_c)
        self.heater_duration_ms = heater_duration_ms
        self.ambient_temp_c = float(ambient_temp_c)
        self._clock = clock
        self._sleep = sleep
        self._ctrl_hum = OVERSAMPLING_CODES[humidity_oversampling]
        self._ctrl_meas = (OVERSAMPLING_CODES[temperature_oversampling] << 5) | (
            OVERSAMPLING_CODES[pressure_oversampling] << 2
        )
        self._config = IIR_CODES[iir_filter] << 2
        self._measure_s = _measurement_duration_s(
            temperature_oversampling, pressure_oversampling, humidity_oversampling, heater_duration_ms
        )
        self._owned_bus: SMBus | None = None
        self._closed = False
        self._ready = False
        self.calibration: Bme680Calibration | None = None
        self._guarded(self._setup)

    @classmethod
    def open(cls, bus_number: int, address: int = 0x76, **settings: Any) -> Bme680:
        """Open ``/dev/i2c-<bus_number>`` with smbus2 and set the sensor up; the bus is closed by :meth:`close`."""
        try:
            bus = SMBus(bus_number)
        except FileNotFoundError as exc:
            raise SensorDisconnected(
                SENSOR, "not_found", f"/dev/i2c-{bus_number}: {exc.strerror} (I2C enabled?)"
            ) from exc
        except OSError as exc:
            raise SensorDisconnected(SENSOR, "disconnected", f"cannot open /dev/i2c-{bus_number}: {exc}") from exc
        try:
            sensor = cls(bus, address, **settings)
        except BaseException:
            bus.close()
            raise
        sensor._owned_bus = bus
        return sensor

    def close(self) -> None:
        """Release the bus if this driver opened it; further reads raise :class:`SensorDisconnected`."""
        self._closed = True
        if self._owned_bus is not None:
            bus, self._owned_bus = self._owned_bus, None
            bus.close()

    def read(self, timeout_s: float = 1.0) -> Bme680Reading:
        """Trigger one forced-mode measurement and return it; never waits longer than about ``timeout_s``."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s!r}")
        if self._closed:
            raise SensorDisconnected(SENSOR, "disconnected", "the driver was closed")
        deadline = self._clock() + timeout_s
        return self._guarded(lambda: self._measure(deadline, timeout_s))

    @property
    def heater_registers(self) -> tuple[int, int]:
        """The ``(res_heat_0, gas_wait_0)`` values written for the configured heater profile."""
        if self.calibration is None:
            raise RuntimeError("the BME680 has not been calibrated yet")
        return (
            self.calibration.heater_resistance_code(self.heater_temp_c, self.ambient_temp_c),
            gas_wait_code(self.heater_duration_ms),
        )

    # -- internals ---------------------------------------------------------------------------

    def _guarded(self, step: Callable[[], _T]) -> _T:
        """Run a bus step; any failure leaves the device to be set up again before the next read."""
        try:
            return step()
        except OSError as exc:
            self._ready = False
            raise SensorDisconnected(SENSOR, "disconnected", f"I2C address {self.address:#04x}: {exc}") from exc
        except SensorError:
            self._ready = False
            raise

    def _read_block(self, register: int, length: int) -> list[int]:
        data = self._bus.read_i2c_block_data(self.address, register, length)
        if len(data) != length:
            raise SensorDataError(
                SENSOR, "bad_data", f"read of {length} bytes at {register:#04x} returned {len(data)} bytes"
            )
        return list(data)

    def _setup(self) -> None:
        """Identify the chip, soft-reset it, read its calibration and write our configuration."""
        self._ready = False
        chip_id = self._bus.read_byte_data(self.address, REG_CHIP_ID)
        if chip_id != CHIP_ID:
            # checked before the reset so that a foreign device at this address is never written to
            raise SensorDataError(
                SENSOR,
                "bad_chip_id",
                f"chip id {chip_id:#04x} at I2C address {self.address:#04x}, expected {CHIP_ID:#04x}",
            )
        self._bus.write_byte_data(self.address, REG_RESET, RESET_COMMAND)
        self._sleep(RESET_SETTLE_S)

        registers: dict[int, int] = {}
        for start, length in ((REG_COEFF_1, LEN_COEFF_1), (REG_COEFF_2, LEN_COEFF_2), (REG_RES_HEAT_VAL, LEN_COEFF_3)):
            registers.update(zip(range(start, start + length), self._read_block(start, length), strict=True))
        variant = registers[REG_COEFF_2 + LEN_COEFF_2 - 1]
        if variant != VARIANT_BME680:
            raise SensorDataError(
                SENSOR, "unsupported_variant", f"variant id {variant:#04x} (a BME688?); this driver reads the BME680"
            )
        calibration = Bme680Calibration.from_registers(registers)
        problem = calibration.plausible()
        if problem is not None:
            raise SensorDataError(SENSOR, "bad_calibration", f"implausible calibration: {problem}")
        self.calibration = calibration

        res_heat, gas_wait = self.heater_registers
        for register, value in (
            (REG_CTRL_HUM, self._ctrl_hum),
            (REG_CONFIG, self._config),
            (REG_RES_HEAT_0, res_heat),
            (REG_GAS_WAIT_0, gas_wait),
            (REG_CTRL_GAS_0, 0x00),  # heat_off = 0: the heater runs during the gas conversion
            (REG_CTRL_GAS_1, RUN_GAS),
            (REG_CTRL_MEAS, self._ctrl_meas | MODE_SLEEP),
        ):
            self._bus.write_byte_data(self.address, register, value)
        self._ready = True
        log.info(
            "BME680 at %#04x ready: heater %g °C for %d ms (res_heat %d, gas_wait %#04x)",
            self.address,
            self.heater_temp_c,
            self.heater_duration_ms,
            res_heat,
            gas_wait,
        )

    def _measure(self, deadline: float, timeout_s: float) -> Bme680Reading:
        """Start a forced-mode cycle, wait for ``new_data`` and compensate the raw values."""
        if not self._ready:
            self._setup()
        self._bus.write_byte_data(self.address, REG_CTRL_MEAS, self._ctrl_meas | MODE_FORCED)
        self._sleep(max(0.0, min(self._measure_s, deadline - self._clock())))
        # bounded even if the clock misbehaves: never more polls than the timeout allows
        polls_left = math.ceil(timeout_s / POLL_INTERVAL_S) + 1
        while True:
            field = self._read_block(REG_STATUS, LEN_FIELD)
            status = field[0]
            if status & STATUS_NEW_DATA:
                return self._compensate(field)
            now = self._clock()
            polls_left -= 1
            if now >= deadline or polls_left <= 0:
                busy = [
                    name
                    for bit, name in ((STATUS_MEASURING, "measuring"), (STATUS_GAS_MEASURING, "gas_measuring"))
                    if status & bit
                ]
                raise SensorError(
                    SENSOR,
                    "timeout",
                    f"no new data {timeout_s:g} s after triggering a measurement "
                    f"(status {status:#04x}: {', '.join(busy) or 'idle'})",
                )
            self._sleep(min(POLL_INTERVAL_S, max(0.0, deadline - now)))

    def _compensate(self, field: Sequence[int]) -> Bme680Reading:
        """Turn the 0x1D.. register block into physical units."""
        cal = self.calibration
        assert cal is not None  # set by _setup, which always runs before a measurement
        adc_p = (field[2] << 12) | (field[3] << 4) | (field[4] >> 4)
        adc_t = (field[5] << 12) | (field[6] << 4) | (field[7] >> 4)
        adc_h = (field[8] << 8) | field[9]
        gas_lsb = field[14]
        adc_g = (field[13] << 2) | (gas_lsb >> 6)
        gas_range = gas_lsb & GAS_RANGE_MASK
        gas_valid = bool(gas_lsb & GAS_VALID)
        heat_stable = bool(gas_lsb & HEAT_STAB)
        if adc_t == SKIPPED_TP or adc_p == SKIPPED_TP or adc_h == SKIPPED_H:
            # the device lost its oversampling settings (reset or brown-out): set it up again next time
            self._ready = False
            raise SensorDataError(
                SENSOR,
                "bad_data",
                f"skipped-channel values (temp {adc_t:#x}, press {adc_p:#x}, hum {adc_h:#x}): the device reset itself",
            )
        temperature_c, t_fine = cal.temperature(adc_t)
        pressure_pa = cal.pressure(adc_p, t_fine)
        if math.isnan(pressure_pa):
            raise SensorDataError(SENSOR, "bad_data", "pressure compensation divisor is zero (calibration)")
        gas = cal.gas_resistance(adc_g, gas_range) if gas_valid and heat_stable else math.nan
        return Bme680Reading(
            temperature_c=temperature_c,
            humidity_pct=cal.humidity(adc_h, temperature_c),
            pressure_hpa=pressure_pa / 100.0,
            gas_resistance_ohm=gas,
            gas_valid=gas_valid,
            heat_stable=heat_stable,
        )
