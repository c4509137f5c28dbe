"""PMS5003 driver: the frame parser on exact byte streams, then the driver over a real pty."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import serial

from edge_agent.sensors.errors import SensorDataError, SensorDisconnected, SensorError
from edge_agent.sensors.pms5003 import (
    MODE_ACTIVE,
    MODE_PASSIVE,
    READ_PASSIVE,
    SLEEP,
    WAKE,
    FrameParser,
    Pms5003,
    PmsReading,
)
from tests.edge_agent.fake_pms5003 import (
    VANISH,
    FakePms5003,
    Values,
    ack_frame,
    bad_checksum,
    data_frame,
    frame_of_length,
)

# The datasheet's command table (appendix II), byte for byte.
DATASHEET_PASSIVE = bytes.fromhex("42 4D E1 00 00 01 70")
DATASHEET_ACTIVE = bytes.fromhex("42 4D E1 00 01 01 71")
DATASHEET_READ = bytes.fromhex("42 4D E2 00 00 01 71")
DATASHEET_SLEEP = bytes.fromhex("42 4D E4 00 00 01 73")
DATASHEET_WAKE = bytes.fromhex("42 4D E4 00 01 01 74")

A = Values(5, 8, 9, 4, 7, 9, (1203, 356, 54, 4, 2, 1))
# 0x424D is the start sequence: a valid frame carrying it must not be cut at it.
B = Values(0x424D, 65535, 0, 1, 500, 1000, (0x4D42, 0x4242, 3, 2, 1, 0))
C = Values(12, 15, 17, 11, 14, 16, (2200, 640, 101, 9, 3, 1))


def reading(values: Values) -> PmsReading:
    """What the driver must return for a frame carrying ``values``."""
    return PmsReading(
        pm1_cf1=values.pm1_cf1,
        pm25_cf1=values.pm25_cf1,
        pm10_cf1=values.pm10_cf1,
        pm1=values.pm1,
        pm25=values.pm25,
        pm10=values.pm10,
        particles_per_dl=values.particles_per_dl,
    )


# --- the parser, byte-exact -------------------------------------------------------------------

GARBAGE = b"\x00\xffjunk\x42"  # ends with half a start sequence that does not continue
FALSE_START = b"\x42\x4d\x00\x1c" + b"\x01\x02\x03\x04\x05"  # claims a data frame, is 9 bytes
CORRUPT = bad_checksum(data_frame(C))
ACK = ack_frame(0xE1, 0x01)
WRONG_LENGTH = frame_of_length(20, [7] * 9)  # a valid checksum over a 24-byte frame of another model
STREAM = GARBAGE + FALSE_START + data_frame(A) + CORRUPT + ACK + WRONG_LENGTH + data_frame(B) + b"\x42"
STREAM_COUNTERS = {
    "bytes": len(STREAM),
    "frames": 2,
    "acks": 1,
    # Every byte outside the two frames, the answer and the held-back trailing 0x42.
    "garbage_bytes": len(GARBAGE) + len(FALSE_START) + len(CORRUPT) + len(WRONG_LENGTH),
    "checksum_errors": 2,  # the false start (it spans into frame A) and the corrupted frame
    "length_errors": 1,
}


def test_parser_decodes_values_exactly() -> None:
    parser = FrameParser()
    assert parser.feed(data_frame(A) + data_frame(B)) == [reading(A), reading(B)]
    assert parser.counters == {
        "bytes": 64,
        "frames": 2,
        "acks": 0,
        "garbage_bytes": 0,
        "checksum_errors": 0,
        "length_errors": 0,
    }
    assert parser.pending() == 0


def test_parser_stream_with_every_fault() -> None:
    parser = FrameParser()
    assert parser.feed(STREAM) == [reading(A), reading(B)]
    assert parser.counters == STREAM_COUNTERS
    assert parser.pending() == 1
    assert parser.last_ack == (0xE1, 0x01)
    # The accounting is complete: each byte is in a frame, an answer, garbage or pending.
    c = parser.counters
    assert c["bytes"] == 32 * c["frames"] + 8 * c["acks"] + c["garbage_bytes"] + parser.pending()


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_parser_same_result_split_anywhere(cut: int) -> None:
    parser = FrameParser()
    got = parser.feed(STREAM[:cut]) + parser.feed(STREAM[cut:])
    assert got == [reading(A), reading(B)]
    assert parser.counters == STREAM_COUNTERS


def test_parser_byte_by_byte() -> None:
    parser = FrameParser()
    got = [r for i in range(len(STREAM)) for r in parser.feed(STREAM[i : i + 1])]
    assert got == [reading(A), reading(B)]
    assert parser.counters == STREAM_COUNTERS


def test_false_start_resynchronises_inside_the_bad_candidate() -> None:
    # The false candidate's 32 bytes swallow 28 bytes of frame A; skipping the whole candidate
    # would lose A, resynchronising from the byte after the false start finds it.
    parser = FrameParser()
    assert parser.feed(b"\x42\x4d\x00\x1c" + data_frame(A)) == [reading(A)]
    assert parser.counters["checksum_errors"] == 1
    assert parser.counters["garbage_bytes"] == 4


def test_parser_missing_counts_down_a_partial_frame() -> None:
    parser = FrameParser()
    frame = data_frame(A)
    assert parser.missing() == 32
    assert parser.feed(frame[:3]) == []
    assert parser.missing() == 29
    assert parser.feed(frame[3:10]) == []
    assert parser.missing() == 22
    assert parser.feed(frame[10:]) == [reading(A)]
    assert parser.missing() == 32
    assert parser.feed(ACK[:5]) == []
    assert parser.missing() == 3


def test_command_bytes_match_the_datasheet() -> None:
    assert MODE_PASSIVE == DATASHEET_PASSIVE
    assert MODE_ACTIVE == DATASHEET_ACTIVE
    assert READ_PASSIVE == DATASHEET_READ
    assert SLEEP == DATASHEET_SLEEP
    assert WAKE == DATASHEET_WAKE


# --- the driver on a pseudo-terminal ----------------------------------------------------------


@pytest.fixture
def fakes() -> Iterator[list[FakePms5003]]:
    """Fake sensors to close at the end, whatever the test did to them."""
    made: list[FakePms5003] = []
    yield made
    for fake in made:
        fake.close()


@pytest.fixture
def drivers() -> Iterator[list[Pms5003]]:
    """Drivers to close at the end."""
    made: list[Pms5003] = []
    yield made
    for driver in made:
        driver.close()


def start(
    fakes: list[FakePms5003],
    drivers: list[Pms5003],
    values: Values = A,
    *,
    interval_s: float | None = 0.05,
    device: str | None = None,
    **kw: Any,
) -> tuple[FakePms5003, Pms5003]:
    """A fake sensor and a driver on its pty, once the driver's mode command has been answered."""
    fake = FakePms5003(values, interval_s=interval_s)
    fakes.append(fake)
    driver = Pms5003.open(device or fake.device, **kw)
    drivers.append(driver)
    fake.wait_received(1)
    return fake, driver


def wait_waiting(driver: Pms5003, size: int, timeout: float = 5.0) -> None:
    """Wait until ``size`` bytes are readable on the driver's port (the pty delivers asynchronously)."""
    assert driver.port is not None
    deadline = time.monotonic() + timeout
    while driver.port.in_waiting < size:
        assert time.monotonic() < deadline, f"only {driver.port.in_waiting} of {size} bytes arrived"
        time.sleep(0.005)


def test_open_sets_9600_8n1_and_active_mode(fakes, drivers) -> None:
    fake, driver = start(fakes, drivers)
    port = driver.port
    assert isinstance(port, serial.Serial)
    assert (port.baudrate, port.bytesize, port.parity, port.stopbits) == (9600, 8, "N", 1)
    assert fake.received == [DATASHEET_ACTIVE]
    assert driver.read() == reading(A)


def test_active_values_decode_exactly(fakes, drivers) -> None:
    fake, driver = start(fakes, drivers, B)
    assert driver.read() == reading(B)
    fake.values = C
    deadline = time.monotonic() + 5
    while (got := driver.read()) != reading(C):
        assert got == reading(B)
        assert time.monotonic() < deadline
    assert driver.counters["checksum_errors"] == 0
    assert driver.counters["garbage_bytes"] == 0


SPLIT = data_frame(C)
# Each script ends with the next valid frame; the deltas are on top of that frame and the answer
# to the driver's mode command.
CASES: dict[str, tuple[tuple[bytes | float, ...], Values, dict[str, int]]] = {
    "bad checksum": ((CORRUPT, data_frame(A)), A, {"checksum_errors": 1, "garbage_bytes": 32}),
    "garbage prefix": ((b"\x13\x37" * 20, data_frame(A)), A, {"garbage_bytes": 40}),
    "false start": ((b"\xaa\xbb\x42\x4d\x00\x1c\xcc", data_frame(A)), A, {"checksum_errors": 1, "garbage_bytes": 7}),
    # A pause longer than the port timeout, so a read returns half a frame.
    "split": ((SPLIT[:11], 0.5, SPLIT[11:]), C, {}),
    "command answer": ((ack_frame(0xE4, 0x00), data_frame(A)), A, {"acks": 1}),
    "wrong length": ((WRONG_LENGTH, data_frame(A)), A, {"length_errors": 1, "garbage_bytes": 24}),
}


@pytest.mark.parametrize("case", CASES)
def test_fault_is_counted_and_next_frame_delivered(fakes, drivers, case: str) -> None:
    script, values, deltas = CASES[case]
    fake, driver = start(fakes, drivers, interval_s=None)
    before = driver.counters
    fake.play(*script)
    assert driver.read() == reading(values)
    sent = sum(len(item) for item in script if isinstance(item, bytes))
    expected = {**before, "bytes": before["bytes"] + 8 + sent, "frames": before["frames"] + 1}
    expected["acks"] += 1
    for key, delta in deltas.items():
        expected[key] += delta
    assert driver.counters == expected


def test_active_read_returns_the_freshest_frame(fakes, drivers) -> None:
    fake, driver = start(fakes, drivers, interval_s=None)
    fake.play(data_frame(A), data_frame(B), data_frame(C))
    fake.wait_played()
    wait_waiting(driver, 8 + 3 * 32)
    assert driver.read() == reading(C)
    assert driver.counters["stale_frames"] == 2
    assert driver.counters["frames"] == 3


def test_passive_request_response(fakes, drivers) -> None:
    fake, driver = start(fakes, drivers, A, mode="passive")
    assert fake.received == [DATASHEET_PASSIVE]
    assert driver.read() == reading(A)
    assert fake.received == [DATASHEET_PASSIVE, DATASHEET_READ]
    fake.values = B
    assert driver.read() == reading(B)
    assert fake.received == [DATASHEET_PASSIVE, DATASHEET_READ, DATASHEET_READ]
    assert driver.counters["requests"] == 2
    # The fake streams like a sensor just powered up until the mode command arrives: frames of
    # that time are dropped as stale, never returned.
    assert driver.counters["frames"] - driver.counters["stale_frames"] == 2
    assert driver.last_ack == (0xE1, 0x00)


def test_passive_lost_request_is_repeated(fakes, drivers) -> None:
    fake, driver = start(fakes, drivers, A, mode="passive", read_timeout_s=0.9)
    fake.drop_reads = 1
    assert driver.read() == reading(A)
    assert fake.received == [DATASHEET_PASSIVE, DATASHEET_READ, DATASHEET_READ]
    assert driver.counters["requests"] == 2


def test_passive_late_answer_is_stale_not_returned(fakes, drivers) -> None:
    fake, driver = start(fakes, drivers, A, mode="passive", interval_s=None)
    # An answer to an earlier request that came after its read gave up.
    fake.play(data_frame(C))
    fake.wait_played()
    wait_waiting(driver, 8 + 32)
    assert driver.read() == reading(A)
    assert driver.counters["stale_frames"] == 1


def test_poll_never_waits(fakes, drivers) -> None:
    fake, driver = start(fakes, drivers, interval_s=None)
    wait_waiting(driver, 8)
    assert driver.poll() is None
    assert driver.counters["acks"] == 1
    fake.play(data_frame(A), data_frame(B))
    fake.wait_played()
    wait_waiting(driver, 64)
    assert driver.poll() == reading(B)
    assert driver.poll() is None
    assert driver.counters["stale_frames"] == 1


def test_passive_poll_picks_up_the_previous_request(fakes, drivers) -> None:
    fake, driver = start(fakes, drivers, A, mode="passive", interval_s=None)
    wait_waiting(driver, 8)
    assert driver.poll() is None
    assert fake.wait_received(2)[-1] == DATASHEET_READ
    wait_waiting(driver, 32)
    fake.values = B
    assert driver.poll() == reading(A)
    assert fake.wait_received(3)[-1] == DATASHEET_READ
    wait_waiting(driver, 32)
    assert driver.poll() == reading(B)
    assert driver.counters["requests"] == 3


def test_mode_switch_sleep_and_wake(fakes, drivers) -> None:
    fake, driver = start(fakes, drivers, A)
    assert driver.read() == reading(A)
    # Changed first: a frame streamed just before the switch may still be on its way.
    fake.values = B
    driver.set_mode("passive")
    assert fake.wait_received(2)[-1] == DATASHEET_PASSIVE
    assert fake.mode == "passive"
    assert driver.read() == reading(B)
    assert fake.received[-1] == DATASHEET_READ
    driver.sleep()
    assert fake.wait_received(4)[-1] == DATASHEET_SLEEP
    driver.wake()
    assert fake.wait_received(5)[-1] == DATASHEET_WAKE
    driver.set_mode("active")
    assert fake.wait_received(6)[-1] == DATASHEET_ACTIVE
    assert driver.read() == reading(B)


def test_silence_times_out(fakes, drivers) -> None:
    _, driver = start(fakes, drivers, interval_s=None, read_timeout_s=0.4)
    with pytest.raises(SensorError) as err:
        driver.read()
    assert type(err.value) is SensorError
    assert err.value.reason == "timeout"
    assert err.value.sensor == "pms5003"
    assert driver.counters["timeouts"] == 1


def test_asleep_sensor_times_out(fakes, drivers) -> None:
    fake, driver = start(fakes, drivers, read_timeout_s=0.4)
    driver.sleep()
    fake.wait_received(2)
    with pytest.raises(SensorError) as err:
        # Frames streamed before the sleep command may still be waiting.
        for _ in range(5):
            driver.read()
    assert err.value.reason == "timeout"


@pytest.mark.parametrize(
    ("noise", "reason"),
    [(b"\x55" * 64, "bad_data"), (CORRUPT * 2, "checksum"), (WRONG_LENGTH, "bad_data")],
    ids=["garbage", "corrupted", "wrong length"],
)
def test_bytes_without_a_frame_are_a_data_error(fakes, drivers, noise: bytes, reason: str) -> None:
    fake, driver = start(fakes, drivers, interval_s=None, read_timeout_s=0.5)
    fake.play(noise)
    with pytest.raises(SensorDataError) as err:
        driver.read()
    assert err.value.reason == reason
    assert driver.counters["timeouts"] == 1


def test_vanished_port_then_reopen_on_a_new_pty(fakes, drivers, tmp_path: Path) -> None:
    # A udev-style stable name pointing at whichever pty is the sensor now.
    link = tmp_path / "ttyPMS"
    first = FakePms5003(A)
    fakes.append(first)
    link.symlink_to(first.device)
    driver = Pms5003.open(str(link), read_timeout_s=2.0)
    drivers.append(driver)
    assert driver.read() == reading(A)

    first.vanish()
    with pytest.raises(SensorDisconnected) as err:
        driver.read()
    assert err.value.reason == "disconnected"
    with pytest.raises(SensorDisconnected):
        driver.read()
    assert driver.port is None
    assert driver.counters["disconnects"] == 1

    # The device is gone for a while: reopening fails the same way, and can be retried.
    link.unlink()
    with pytest.raises(SensorDisconnected):
        driver.reopen()

    second = FakePms5003(B)
    fakes.append(second)
    link.symlink_to(second.device)
    frames_before = driver.counters["frames"]
    driver.reopen()
    assert second.wait_received(1) == [DATASHEET_ACTIVE]
    assert driver.read() == reading(B)
    assert driver.counters["reopens"] == 1
    assert driver.counters["frames"] > frames_before


def test_reopen_restores_passive_mode(fakes, drivers) -> None:
    fake, driver = start(fakes, drivers, A, mode="passive")
    driver.reopen()
    assert fake.wait_received(2) == [DATASHEET_PASSIVE, DATASHEET_PASSIVE]
    assert driver.read() == reading(A)
    assert fake.received[-1] == DATASHEET_READ


def test_port_vanishing_during_a_read(fakes, drivers) -> None:
    fake, driver = start(fakes, drivers, interval_s=None, read_timeout_s=3.0)
    fake.play(data_frame(A)[:10], 0.1, VANISH)
    with pytest.raises(SensorDisconnected):
        driver.read()


def test_open_missing_device(tmp_path: Path) -> None:
    with pytest.raises(SensorDisconnected) as err:
        Pms5003.open(str(tmp_path / "ttyNothing"), sensor="cabin-pm")
    assert err.value.sensor == "cabin-pm"
    assert err.value.reason == "disconnected"


def test_driver_on_a_given_port(fakes) -> None:
    fake = FakePms5003(A)
    fakes.append(fake)
    with Pms5003(serial.Serial(fake.device, 9600), mode="active") as driver:
        assert fake.wait_received(1) == [DATASHEET_ACTIVE]
        assert driver.read() == reading(A)
        with pytest.raises(SensorError) as err:
            driver.reopen()
        assert err.value.reason == "not_reopenable"
    with pytest.raises(SensorDisconnected):
        driver.read()


def test_constructor_rejects_bad_arguments(fakes) -> None:
    fake = FakePms5003(A)
    fakes.append(fake)
    port = serial.Serial(fake.device, 9600)
    try:
        with pytest.raises(ValueError, match="mode"):
            Pms5003(port, mode="polling")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="read_timeout_s"):
            Pms5003(port, read_timeout_s=0)
    finally:
        port.close()
