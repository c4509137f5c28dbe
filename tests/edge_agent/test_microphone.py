"""UMA-8 microphone: ring buffer contents, channel selection, overruns, staleness, device matching, unplug.

The stream is :mod:`tests.edge_agent.fake_audio` (only the hardware is fake): it calls the real
callback from its own thread with an 8-channel cabin recording. Stream sample ``i`` is
``recording[i % len(recording)]``, so every window is checked sample for sample against the source.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sounddevice as sd

from edge_agent.sensors import microphone as microphone_module
from edge_agent.sensors.errors import SensorDisconnected, SensorError
from edge_agent.sensors.microphone import AudioWindow, Microphone, find_input_device
from shared.features import AUDIO_FEATURES, FLAG_AUDIO_OVERRUN, AudioFeatures
from tests.edge_agent.fake_audio import (
    CHIME_CHANNEL,
    CHIME_HZ,
    KNOCK_CHANNEL,
    SAMPLE_RATE,
    UMA8_CHANNELS,
    FakeTimeInfo,
    FakeUma8,
    cabin_recording,
)

RECORDING = cabin_recording()
SPEED = 20.0  # twenty times real time: a second of audio in 50 ms


def source(end: int, n: int, channel: int) -> np.ndarray:
    """What the stream delivered for ``channel`` in samples ``[end - n, end)``."""
    return RECORDING[np.arange(end - n, end) % RECORDING.shape[0], channel]


def open_mic(hw: FakeUma8, **kwargs: Any) -> Microphone:
    """A microphone on the fake array with all 8 raw channels open."""
    options: dict[str, Any] = {"channels": UMA8_CHANNELS, "channel": 0}
    options.update(kwargs)
    return Microphone(stream_factory=hw.input_stream, query_devices=hw.query_devices, **options)


@pytest.fixture
def hw() -> Iterator[FakeUma8]:
    """The fake array at twenty times real time; every stream it opened is stopped afterwards."""
    array = FakeUma8(recording=RECORDING, speed=SPEED)
    yield array
    for stream in array.streams:
        stream.close()


def fresh(mic: Microphone, n: int) -> AudioWindow:
    """A window that must be there."""
    window = mic.window(n)
    assert window is not None
    return window


# ---- samples in the ring --------------------------------------------------------------------


@pytest.mark.parametrize("channel", [0, KNOCK_CHANNEL, CHIME_CHANNEL, 7])
def test_selected_channel_arrives_exactly(hw: FakeUma8, channel: int) -> None:
    mic = open_mic(hw, channel=channel)
    mic.start()
    hw.stream.wait_samples(SAMPLE_RATE + 5_000)
    window = fresh(mic, SAMPLE_RATE)  # read while the capture thread keeps writing
    assert window.samples.dtype == np.float32 and window.samples.shape == (SAMPLE_RATE,)
    np.testing.assert_array_equal(window.samples, source(window.end_sample, SAMPLE_RATE, channel))
    for other in range(UMA8_CHANNELS):
        if other != channel:
            assert not np.array_equal(window.samples, source(window.end_sample, SAMPLE_RATE, other))
    assert window.end_sample == window.new_samples >= SAMPLE_RATE + 5_000
    mic.close()


def test_window_is_the_most_recent_samples_and_a_copy(hw: FakeUma8) -> None:
    mic = open_mic(hw, channel=3)
    mic.start()
    hw.stream.wait_samples(10_000)
    hw.stream.pause()
    delivered = hw.stream.samples_delivered
    window = fresh(mic, 4_000)
    assert window.end_sample == delivered
    np.testing.assert_array_equal(window.samples, source(delivered, 4_000, 3))
    window.samples[:] = 0.0  # the caller owns the copy; the ring is untouched
    hw.stream.resume()
    hw.stream.wait_samples(delivered + 1_000)
    again = fresh(mic, 8_000)
    assert again.new_samples == again.end_sample - delivered
    np.testing.assert_array_equal(again.samples, source(again.end_sample, 8_000, 3))
    counters = mic.counters
    assert counters.samples >= again.end_sample and counters.callbacks >= 1 and counters.overruns == 0
    mic.close()


def test_wrap_around_with_variable_blocks_through_the_stream(hw: FakeUma8) -> None:
    mic = open_mic(hw, channel=5, buffer_s=0.05)  # 800 samples: the variable blocks lap it many times
    assert mic.capacity == 800
    mic.start()
    for target in (3_000, 7_777, 20_000):
        hw.stream.wait_samples(target)
        for n in (800, 513, 1):
            window = mic.window(n)
            if window is None:  # nothing new since the previous n: the next target brings more
                continue
            np.testing.assert_array_equal(window.samples, source(window.end_sample, n, 5))
    mic.close()


def test_wrap_around_block_by_block() -> None:
    """Drive the callback by hand, as PortAudio's thread would, across every wrap position."""
    hw = FakeUma8(recording=RECORDING)
    status = sd.CallbackFlags()
    times = FakeTimeInfo(0.0, 0.0, 0.0)
    sizes = (1, 159, 1, 17, 160, 143, 161, 400, 3, 159, 320, 2)  # exact fits, straddles, oversized blocks
    for n in (1, 80, 160):
        mic = open_mic(hw, channel=6, buffer_s=0.01)  # 160 samples
        end = 0
        for frames in sizes:
            block = np.ascontiguousarray(RECORDING[end : end + frames])
            mic._callback(block, frames, times, status)
            end += frames
            window = mic.window(min(end, n))
            assert window is not None
            assert window.end_sample == end and window.new_samples == frames
            np.testing.assert_array_equal(window.samples, RECORDING[end - min(end, n) : end, 6])
            assert not window.overrun
        assert mic.counters.samples == end == sum(sizes)
        assert mic.counters.callbacks == len(sizes)


class RacingMicrophone(Microphone):
    """Injects writer blocks between a reader's copy and its consistency check (a preempted reader)."""

    laps_per_read = 0
    _pos = 0

    def _copy_out(self, end: int, out: np.ndarray) -> None:
        super()._copy_out(end, out)
        if self.laps_per_read:
            self.laps_per_read -= 1
            frames = self.capacity  # one block the size of the ring overwrites everything just copied
            block = np.ascontiguousarray(RECORDING[self._pos : self._pos + frames])
            self._callback(block, frames, None, sd.CallbackFlags())
            self._pos += frames


def test_reader_overtaken_by_the_writer_copies_again() -> None:
    hw = FakeUma8(recording=RECORDING)
    mic = RacingMicrophone(
        channels=UMA8_CHANNELS, channel=4, buffer_s=0.02, stream_factory=hw.input_stream, query_devices=hw.query_devices
    )
    mic.laps_per_read = 0
    mic._callback(np.ascontiguousarray(RECORDING[:320]), 320, None, sd.CallbackFlags())
    mic._pos = 320
    mic.laps_per_read = 2  # the first two copies are overwritten while they are taken
    window = fresh(mic, 200)
    assert window.end_sample == 320 + 2 * 320
    np.testing.assert_array_equal(window.samples, RECORDING[window.end_sample - 200 : window.end_sample, 4])
    assert not window.overrun
    mic._callback(np.ascontiguousarray(RECORDING[mic._pos : mic._pos + 10]), 10, None, sd.CallbackFlags())
    mic._pos += 10
    mic.laps_per_read = 100  # never a clean copy: the window is returned but flagged as lost input
    window = fresh(mic, 200)
    assert window.overrun and window.flags == FLAG_AUDIO_OVERRUN


# ---- overruns and staleness ----------------------------------------------------------------


def test_overruns_are_counted_and_flagged_once() -> None:
    hw = FakeUma8(recording=RECORDING, speed=SPEED, overflow_blocks={4, 5, 30})
    mic = open_mic(hw, channel=1)
    mic.start()
    try:
        hw.stream.wait_blocks(10)
        hw.stream.pause()
        first = fresh(mic, 1_000)
        assert first.overrun and first.flags == FLAG_AUDIO_OVERRUN
        assert mic.counters.overruns == 2  # two overflowing blocks, one flagged window
        np.testing.assert_array_equal(first.samples, source(first.end_sample, 1_000, 1))  # never fatal
        hw.stream.resume()
        hw.stream.wait_samples(first.end_sample + 100)
        second = fresh(mic, 1_000)
        if hw.stream.blocks_delivered <= 30:  # the third overflow may already be in: then it is this one's
            assert not second.overrun and second.flags == 0
        hw.stream.wait_blocks(40)
        later = [mic.window(1_000) for _ in range(3)]
        flagged = [w for w in [second, *later] if w is not None and w.overrun]
        assert len(flagged) == 1  # block 30's overflow shows exactly once
        assert mic.counters.overruns == 3
        assert mic.counters.stream_errors == 0
    finally:
        mic.close()


def test_stale_windows_when_the_device_stalls(hw: FakeUma8) -> None:
    mic = open_mic(hw, channel=0)
    assert mic.window(100) is None  # not started: nothing captured
    mic.start()
    hw.stream.wait_samples(2_000)
    hw.stream.pause()  # a hung device: the stream stays active but delivers nothing
    assert fresh(mic, 1_000).new_samples > 0
    for expected in (1, 2, 3):
        assert mic.window(1_000) is None
        assert mic.counters.stale_windows == expected
    hw.stream.resume()
    hw.stream.wait_samples(hw.stream.samples_delivered + 1)
    window = fresh(mic, 1_000)
    assert mic.counters.stale_windows == 0
    np.testing.assert_array_equal(window.samples, source(window.end_sample, 1_000, 0))
    mic.close()


def test_not_enough_samples_yet(hw: FakeUma8) -> None:
    mic = open_mic(hw, channel=0)
    mic._callback(np.ascontiguousarray(RECORDING[:500]), 500, None, sd.CallbackFlags())
    assert mic.window(1_000) is None
    assert mic.counters.stale_windows == 0  # warming up is not staleness
    mic._callback(np.ascontiguousarray(RECORDING[500:1_200]), 700, None, sd.CallbackFlags())
    window = fresh(mic, 1_000)
    assert window.new_samples == 1_200
    np.testing.assert_array_equal(window.samples, RECORDING[200:1_200, 0])


# ---- devices -------------------------------------------------------------------------------


def test_device_matching_by_substring(hw: FakeUma8) -> None:
    devices = hw.query_devices()
    assert find_input_device(devices, "UMA-8", 8) == (2, "miniDSP UMA-8: USB Audio (hw:2,0)")
    assert find_input_device(devices, "uma-8", 1) == (2, "miniDSP UMA-8: USB Audio (hw:2,0)")
    assert find_input_device(devices, "hw:2,0", 1)[0] == 2
    assert find_input_device(devices, "PnP", 1) == (3, "USB PnP Sound Device: Audio (hw:3,0)")
    # ALSA spells the card UMA8: punctuation is ignored when nothing matches literally.
    alsa = FakeUma8(recording=RECORDING, name="UMA8: USB Audio (hw:2,0)")
    mic = open_mic(alsa)
    assert mic.device_name == "UMA8: USB Audio (hw:2,0)" and mic.device_index == 2
    assert alsa.stream.device == 2 and alsa.stream.channels == 8 and alsa.stream.samplerate == SAMPLE_RATE
    mic.close()


def test_not_found_lists_the_input_devices_seen(hw: FakeUma8) -> None:
    with pytest.raises(SensorError) as caught:
        open_mic(hw, device_match="ReSpeaker")
    err = caught.value
    assert err.sensor == "microphone" and err.reason == "not_found"
    assert "no input device matching 'ReSpeaker'" in err.detail
    assert "[2] 'miniDSP UMA-8: USB Audio (hw:2,0)' (8 ch)" in err.detail
    assert "[3] 'USB PnP Sound Device: Audio (hw:3,0)' (1 ch)" in err.detail
    assert "Headphones" not in err.detail  # output-only devices are not inputs

    with pytest.raises(SensorError) as caught:
        open_mic(hw, device_match="PnP", channels=2, channel=1)
    assert caught.value.reason == "not_found"
    assert "fewer than 2 channels ('USB PnP Sound Device: Audio (hw:3,0)' has 1)" in caught.value.detail

    with pytest.raises(SensorError) as caught:
        find_input_device([], "UMA-8", 1)
    assert caught.value.detail == "no input device matching 'UMA-8'; input devices seen: none"


def test_default_sounddevice_path_on_a_machine_without_the_array() -> None:
    """No injection: sounddevice's own query_devices, which on this machine has no UMA-8."""
    if any("uma" in str(d["name"]).lower() for d in sd.query_devices()):
        pytest.skip("a real UMA-8 is attached")
    with pytest.raises(SensorError) as caught:
        Microphone()
    assert caught.value.reason == "not_found"
    assert "no input device matching 'UMA-8'" in caught.value.detail


def test_portaudio_error_on_open_is_disconnected(hw: FakeUma8) -> None:
    with pytest.raises(SensorDisconnected) as caught:
        open_mic(hw, sample_rate=48_000)  # the fake array runs at 16 kHz only
    assert caught.value.reason == "disconnected"
    assert "opening 8 ch at 48000 Hz on [2] 'miniDSP UMA-8: USB Audio (hw:2,0)' failed" in caught.value.detail
    assert "Invalid sample rate" in caught.value.detail


def test_unplug_then_a_new_microphone_works(hw: FakeUma8) -> None:
    mic = open_mic(hw, channel=2)
    mic.start()
    hw.stream.wait_samples(3_000)
    assert fresh(mic, 2_000).new_samples >= 3_000
    hw.unplug()
    hw.stream.wait_inactive()
    for _ in range(2):  # it stays disconnected: the caller must reopen
        with pytest.raises(SensorDisconnected, match="input stream ended"):
            mic.window(2_000)
    with pytest.raises(SensorDisconnected):
        mic.start()
    assert mic.counters.stream_errors == 1
    mic.close()  # closing a vanished device does not raise

    with pytest.raises(SensorError) as caught:  # while unplugged it is not in the device list
        open_mic(hw, channel=2)
    assert caught.value.reason == "not_found"

    hw.plug()
    with open_mic(hw, channel=2) as again:
        hw.stream.wait_samples(2_500)
        window = fresh(again, 2_000)
        np.testing.assert_array_equal(window.samples, source(window.end_sample, 2_000, 2))
        assert again.counters.stream_errors == 0


def test_unplug_without_notification_shows_as_stale(hw: FakeUma8) -> None:
    """Some hosts never end the stream when the device goes: windows stop being fresh instead."""
    mic = open_mic(hw)
    mic.start()
    hw.stream.wait_samples(2_000)
    hw.unplug(notify=False)
    mic.window(1_000)
    assert [mic.window(1_000) for _ in range(3)] == [None, None, None]
    assert mic.counters.stale_windows == 3
    mic.close()


def test_stop_start_and_close(hw: FakeUma8) -> None:
    mic = open_mic(hw, channel=1)
    mic.start()
    mic.start()  # idempotent
    hw.stream.wait_samples(1_500)
    mic.stop()  # our own stop is not a disconnect, though PortAudio calls finished_callback
    stopped_at = hw.stream.samples_delivered
    window = fresh(mic, 1_000)
    assert window.end_sample == stopped_at
    assert mic.window(1_000) is None
    mic.start()
    hw.stream.wait_samples(stopped_at + 1_000)
    window = fresh(mic, 1_000)
    np.testing.assert_array_equal(window.samples, source(window.end_sample, 1_000, 1))
    mic.close()
    mic.close()
    assert hw.stream.closed
    with pytest.raises(SensorDisconnected, match="closed"):
        mic.window(1_000)


def test_bad_arguments() -> None:
    hw = FakeUma8(recording=RECORDING)
    with pytest.raises(ValueError, match=r"channel must be in 0\.\.7"):
        open_mic(hw, channel=8)
    with pytest.raises(ValueError, match="buffer_s"):
        open_mic(hw, buffer_s=0.0)
    with pytest.raises(ValueError, match="match string is empty"):
        open_mic(hw, device_match=" ")
    with pytest.raises(ValueError, match="sample_rate"):
        open_mic(hw, sample_rate=0)
    mic = open_mic(hw, buffer_s=0.5)
    with pytest.raises(ValueError, match=r"n_samples must be in 1\.\.8000"):
        mic.window(8_001)
    with pytest.raises(ValueError, match="n_samples"):
        mic.window(0)
    mic.close()


# ---- features and allocation ---------------------------------------------------------------


def test_audio_features_of_a_window_equal_those_of_the_source(hw: FakeUma8) -> None:
    features = AudioFeatures(sample_rate=SAMPLE_RATE)
    by_channel = {}
    for channel in (0, KNOCK_CHANNEL, CHIME_CHANNEL):
        mic = open_mic(hw, channel=channel)
        mic.start()
        # Past the middle of the loop: the chime is on and knocks are in the window.
        hw.stream.wait_samples(RECORDING.shape[0] // 2 + SAMPLE_RATE)
        window = fresh(mic, SAMPLE_RATE)
        mic.close()
        got = features(window.samples)
        np.testing.assert_array_equal(got, features(source(window.end_sample, SAMPLE_RATE, channel)))
        assert np.isfinite(got).all()
        by_channel[channel] = dict(zip(AUDIO_FEATURES, got.tolist(), strict=True))
    # The channels carry what the recording put on them, and the features see it.
    assert by_channel[KNOCK_CHANNEL]["audio_peak_dbfs"] > by_channel[0]["audio_peak_dbfs"] + 6.0
    assert abs(by_channel[CHIME_CHANNEL]["audio_centroid_hz"] - CHIME_HZ) < 200.0
    assert by_channel[CHIME_CHANNEL]["audio_flatness"] < by_channel[0]["audio_flatness"]
    assert by_channel[0]["audio_centroid_hz"] < 400.0  # road rumble is low-frequency


def test_callback_does_not_allocate() -> None:
    """Many callbacks with 8-channel blocks: no memory is kept or transiently taken by microphone.py."""
    hw = FakeUma8(recording=RECORDING)
    mic = open_mic(hw, channel=3, buffer_s=1.0)
    frames = 1_024
    blocks = [np.ascontiguousarray(RECORDING[i * frames : (i + 1) * frames]) for i in range(8)]
    status = sd.CallbackFlags()
    overflow = sd.CallbackFlags()
    overflow.input_overflow = True
    times = FakeTimeInfo(0.0, 0.0, 0.0)
    for block in blocks:  # warm up (first-call caches)
        mic._callback(block, frames, times, status)
    gc.collect()
    module_file = str(Path(microphone_module.__file__).resolve())
    only_microphone = [tracemalloc.Filter(True, module_file)]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot().filter_traces(only_microphone)
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        for i in range(5_000):
            mic._callback(blocks[i % 8], frames, times, overflow if i % 97 == 0 else status)
        _, peak = tracemalloc.get_traced_memory()
        after = tracemalloc.take_snapshot().filter_traces(only_microphone)
    finally:
        tracemalloc.stop()
    kept = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert kept < 512, f"microphone.py kept {kept} bytes over 5000 callbacks"
    # One block's channel is 4 KiB: a copy of it anywhere in the path would show in the peak.
    assert peak - base < 2_048, f"the callback took {peak - base} bytes transiently"
    assert mic.counters.callbacks == 5_008 and mic.counters.overruns == 52
    np.testing.assert_array_equal(fresh(mic, frames).samples, blocks[4_999 % 8][:, 3])
