"""A fake UMA-8 behind sounddevice's interface: device list, ``InputStream`` and a capture thread.

Only the hardware is fake. :class:`FakeUma8` plays an 8-channel cabin recording (the UMA-8's raw
mode has 8 channels) and :meth:`FakeUma8.input_stream` has ``sounddevice.InputStream``'s keyword
signature, so it is passed to :class:`edge_agent.sensors.microphone.Microphone` as its
``stream_factory``. A started stream calls the callback from its own thread, as PortAudio does,
with ``float32`` blocks of shape ``[frames, channels]``, a real ``sounddevice.CallbackFlags``
(``input_overflow`` set on chosen blocks) and a time struct, at real time or accelerated.

There is no audio recording under ``/work/shared/data`` (only the gas-sensor CSV), so the signal
is synthesised by :func:`cabin_recording`: road noise shaped like tyre/road rumble, engine
harmonics, a door knock every ~0.8 s and a 1 kHz chime, arriving at the array's microphones with
per-microphone delays, gains and self-noise, so every channel differs and a wrong channel
selection is visible sample for sample. The signal loops seamlessly (all its components are
periodic over its length), so a stream can run for any duration and stream sample ``i`` is
always ``recording[i % len(recording)]``.

Failure modes: ``overflow_blocks`` marks blocks with ``input_overflow`` (the samples themselves
are still delivered, so positions stay comparable); :meth:`FakeInputStream.pause` stalls delivery
while the stream stays active (a hung device); :meth:`FakeUma8.unplug` ends every stream the way
PortAudio does when a USB device goes (callbacks stop, ``active`` turns false,
``finished_callback`` runs), hides the device from the device list and makes opening fail until
:meth:`FakeUma8.plug`.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import sounddevice as sd

SAMPLE_RATE: Final = 16_000
UMA8_CHANNELS: Final = 8
UMA8_NAME: Final = "miniDSP UMA-8: USB Audio (hw:2,0)"
KNOCK_CHANNEL: Final = 1  # the microphone nearest the door: knocks are loudest here
CHIME_CHANNEL: Final = 2  # the microphone nearest the dashboard chime
CHIME_HZ: Final = 1_000.0
KNOCK_TIMES_S: Final = (0.31, 1.12, 1.93, 2.74)
# PortAudio with blocksize=0 hands the callback whatever the host API has ready: vary the sizes.
VARIABLE_BLOCKS: Final = (256, 160, 331, 512, 97, 240)


def _shaped_noise(rng: np.random.Generator, n: int, sample_rate: int, corner_hz: float, tilt: float) -> np.ndarray:
    """Periodic noise (shaped in the frequency domain, so it loops) falling ``tilt`` dB/octave above ``corner_hz``."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / sample_rate)
    shape = (1.0 + (freqs / corner_hz) ** 2) ** (-tilt / 12.0)
    shape[0] = 0.0
    x = np.fft.irfft(spectrum * shape, n)
    return x / np.sqrt(np.mean(x * x))


def _knock(sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """A knuckle on a door panel: a broadband click and two decaying panel resonances (~60 ms)."""
    t = np.arange(int(0.06 * sample_rate)) / sample_rate
    click = rng.standard_normal(t.size) * np.exp(-t / 0.0008)
    panel = np.sin(2 * np.pi * 180.0 * t) * np.exp(-t / 0.012) + 0.6 * np.sin(2 * np.pi * 1_350.0 * t) * np.exp(
        -t / 0.006
    )
    x = 0.5 * click + panel
    return x / np.max(np.abs(x))


def cabin_recording(seconds: int = 3, sample_rate: int = SAMPLE_RATE, seed: int = 7) -> np.ndarray:
    """A seamlessly looping 8-channel cabin recording, float32 ``[seconds * sample_rate, 8]`` in [-1, 1]."""
    rng = np.random.default_rng(seed)
    n = seconds * sample_rate
    t = np.arange(n) / sample_rate
    road = 0.05 * _shaped_noise(rng, n, sample_rate, corner_hz=120.0, tilt=9.0)
    hiss = 0.008 * _shaped_noise(rng, n, sample_rate, corner_hz=2_500.0, tilt=3.0)
    # 4-cylinder engine at 2250 rpm: firing frequency 75 Hz and harmonics; integer Hz keep it periodic.
    engine = sum(
        a * np.sin(2 * np.pi * f * t + p) for a, f, p in ((0.03, 75, 0.0), (0.012, 150, 1.0), (0.006, 225, 2.0))
    )
    knock = _knock(sample_rate, rng)
    knocks = np.zeros(n)
    for onset in KNOCK_TIMES_S:
        i = int(onset * sample_rate)
        knocks[i : i + knock.size] += knock[: n - i]
    # The chime sounds for the second half of the loop, with 5 ms fades (1000 Hz: whole cycles).
    gate = np.clip(np.minimum(t - seconds / 2, seconds - t) / 0.005, 0.0, 1.0)
    chime = np.sin(2 * np.pi * CHIME_HZ * t) * gate
    out = np.empty((n, UMA8_CHANNELS), dtype=np.float32)
    for ch in range(UMA8_CHANNELS):
        delay = 2 * ch  # samples: the array is ~4 cm across, sound arrives mic by mic
        knock_gain = 0.6 if ch == KNOCK_CHANNEL else 0.12 / (1 + ch)
        chime_gain = 0.25 if ch == CHIME_CHANNEL else 0.01
        self_noise = 3e-4 * rng.standard_normal(n)  # each MEMS microphone's own noise floor
        mix = (0.8 + 0.05 * ch) * np.roll(road + engine, delay) + hiss + knock_gain * np.roll(knocks, delay)
        out[:, ch] = np.clip(mix + chime_gain * chime + self_noise, -1.0, 1.0)
    return out


@dataclass(frozen=True, slots=True)
class FakeTimeInfo:
    """The fields of PortAudio's ``PaStreamCallbackTimeInfo`` that sounddevice passes as ``time``."""

    inputBufferAdcTime: float  # PortAudio's field names
    currentTime: float
    outputBufferDacTime: float


class FakeInputStream:
    """A started stream calls ``callback(indata, frames, time, status)`` from its own thread."""

    def __init__(
        self,
        *,
        hardware: FakeUma8,
        device: int | str | None = None,
        channels: int | None = None,
        samplerate: float | None = None,
        dtype: str | None = None,
        blocksize: int | None = None,
        callback: Callable[[np.ndarray, int, Any, sd.CallbackFlags], None] | None = None,
        finished_callback: Callable[[], None] | None = None,
        **unused: Any,
    ) -> None:
        if not hardware.plugged:
            raise sd.PortAudioError("Error opening InputStream: Device unavailable [PaErrorCode -9985]")
        if device not in (None, hardware.index, hardware.name):
            raise sd.PortAudioError(f"Error querying device {device}")
        channels = UMA8_CHANNELS if channels is None else channels
        if not 1 <= channels <= UMA8_CHANNELS:
            raise sd.PortAudioError("Error opening InputStream: Invalid number of channels [PaErrorCode -9998]")
        if samplerate not in (None, hardware.sample_rate):
            raise sd.PortAudioError("Error opening InputStream: Invalid sample rate [PaErrorCode -9997]")
        if dtype not in (None, "float32"):
            raise sd.PortAudioError(f"fake UMA-8 delivers float32 only, not {dtype}")
        if callback is None:
            raise sd.PortAudioError("the fake stream is callback-only")
        self.hardware = hardware
        self.device = hardware.index
        self.channels = channels
        self.samplerate = float(hardware.sample_rate)
        self.dtype = "float32"
        self.blocksize = blocksize or 0
        self.callback = callback
        self.finished_callback = finished_callback
        self.closed = False
        self.blocks_delivered = 0
        self.samples_delivered = 0
        self._active = False
        self._dead = False  # unplugged: this stream never runs again
        self._stop = threading.Event()
        self._running = threading.Event()  # cleared by pause()
        self._running.set()
        self._paused_ack = threading.Event()
        self._progress = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        """True while the stream is started and delivering (PortAudio's ``Pa_IsStreamActive``)."""
        return self._active

    @property
    def stopped(self) -> bool:
        """True when not active."""
        return not self._active

    def start(self) -> None:
        """Start the capture thread."""
        if self.closed or self._dead:
            raise sd.PortAudioError("Error starting stream: Unanticipated host error [PaErrorCode -9999]")
        if self._active:
            return
        self._stop.clear()
        self._active = True
        self._thread = threading.Thread(target=self._run, name="fake-uma8", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the capture thread; like PortAudio, call ``finished_callback``."""
        if not self._active and self._thread is None:
            return
        self._stop.set()
        self._running.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self._thread = None

    abort = stop

    def close(self) -> None:
        """Stop (if needed) and mark closed."""
        self.stop()
        self.closed = True

    def pause(self) -> None:
        """Stall delivery while staying active (a hung device); returns once the thread has stalled."""
        self._paused_ack.clear()
        self._running.clear()
        if self._active and not self._paused_ack.wait(timeout=5):
            raise TimeoutError("fake stream did not pause")

    def resume(self) -> None:
        """Deliver again after :meth:`pause`."""
        self._running.set()

    def wait_samples(self, n: int, timeout: float = 5.0) -> None:
        """Block until at least ``n`` samples have been delivered to the callback."""
        self._wait(lambda: self.samples_delivered >= n, timeout, f"{n} samples")

    def wait_blocks(self, n: int, timeout: float = 5.0) -> None:
        """Block until at least ``n`` blocks have been delivered to the callback."""
        self._wait(lambda: self.blocks_delivered >= n, timeout, f"{n} blocks")

    def wait_inactive(self, timeout: float = 5.0) -> None:
        """Block until the stream has ended (stop or unplug)."""
        self._wait(lambda: not self._active, timeout, "the stream to end")

    def _wait(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait on the progress condition for ``done``."""
        with self._progress:
            if not self._progress.wait_for(done, timeout=timeout):
                raise TimeoutError(f"fake stream: waited {timeout} s for {what}")

    def _unplug(self, notify: bool) -> None:
        """The device vanished: stop delivering; with ``notify`` end the stream as PortAudio does."""
        self._dead = True
        if notify:
            self.stop()
        else:
            self.pause()

    def _block_sizes(self) -> Iterable[int]:
        """The fixed block size, or PortAudio-like variable sizes for ``blocksize=0``."""
        return itertools.repeat(self.blocksize) if self.blocksize else itertools.cycle(VARIABLE_BLOCKS)

    def _run(self) -> None:
        """The capture thread: deliver blocks at the hardware's pace until stopped or unplugged."""
        hw = self.hardware
        source = hw.recording[:, : self.channels]
        period = 1.0 / (hw.sample_rate * hw.speed)
        started = time.monotonic()
        deadline = started
        for frames in self._block_sizes():
            if not self._running.is_set():
                self._paused_ack.set()
                self._running.wait()
                deadline = time.monotonic()
            if self._stop.is_set():
                break
            pos = self.samples_delivered
            block = np.ascontiguousarray(np.take(source, np.arange(pos, pos + frames), axis=0, mode="wrap"))
            status = sd.CallbackFlags()
            if self.blocks_delivered in hw.overflow_blocks:
                status.input_overflow = True
            now = time.monotonic() - started
            times = FakeTimeInfo(now - frames / hw.sample_rate, now, 0.0)
            self.callback(block, frames, times, status)
            with self._progress:
                self.blocks_delivered += 1
                self.samples_delivered = pos + frames
                self._progress.notify_all()
            deadline += frames * period
            delay = deadline - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
        with self._progress:
            self._active = False
            self._progress.notify_all()
        if self.finished_callback is not None:
            self.finished_callback()


class FakeUma8:
    """The fake array on a fake PortAudio host: device list, stream factory, plug and unplug."""

    def __init__(
        self,
        *,
        recording: np.ndarray | None = None,
        name: str = UMA8_NAME,
        index: int = 2,
        sample_rate: int = SAMPLE_RATE,
        speed: float = 1.0,
        overflow_blocks: Iterable[int] = (),
    ) -> None:
        self.recording = cabin_recording(sample_rate=sample_rate) if recording is None else recording
        self.name = name
        self.index = index
        self.sample_rate = sample_rate
        self.speed = speed  # 1.0: real time; 10.0: ten times faster
        self.overflow_blocks = frozenset(overflow_blocks)
        self.plugged = True
        self.streams: list[FakeInputStream] = []

    @property
    def stream(self) -> FakeInputStream:
        """The most recently opened stream."""
        return self.streams[-1]

    def input_stream(self, **kwargs: Any) -> FakeInputStream:
        """``sounddevice.InputStream`` stand-in (keyword arguments as sounddevice takes them)."""
        stream = FakeInputStream(hardware=self, **kwargs)
        self.streams.append(stream)
        return stream

    def query_devices(self) -> list[dict[str, Any]]:
        """``sounddevice.query_devices()`` on a Raspberry Pi with the array plugged in (or not)."""

        def device(index: int, name: str, n_in: int, n_out: int, rate: float) -> dict[str, Any]:
            return {
                "name": name,
                "index": index,
                "hostapi": 0,
                "max_input_channels": n_in,
                "max_output_channels": n_out,
                "default_low_input_latency": 0.0087 if n_in else -1.0,
                "default_low_output_latency": 0.0087 if n_out else -1.0,
                "default_high_input_latency": 0.034 if n_in else -1.0,
                "default_high_output_latency": 0.034 if n_out else -1.0,
                "default_samplerate": rate,
            }

        devices = [
            device(0, "bcm2835 Headphones: - (hw:0,0)", 0, 8, 44_100.0),
            device(1, "vc4-hdmi-0: MAI PCM i2s-hifi-0 (hw:1,0)", 0, 2, 48_000.0),
        ]
        if self.plugged:
            devices.append(device(self.index, self.name, UMA8_CHANNELS, 2, float(self.sample_rate)))
        devices += [
            device(3, "USB PnP Sound Device: Audio (hw:3,0)", 1, 0, 48_000.0),
            device(4, "sysdefault", 128, 128, 48_000.0),
            device(5, "default", 128, 128, 48_000.0),
        ]
        return devices

    def unplug(self, *, notify: bool = True) -> None:
        """Pull the USB cable: streams end (``notify``) or just go silent; the device disappears."""
        self.plugged = False
        for stream in self.streams:
            if stream.active:
                stream._unplug(notify)

    def plug(self) -> None:
        """Plug the array back in (streams opened before stay dead, as with PortAudio)."""
        self.plugged = True
