"""The UMA-8 microphone array through sounddevice (PortAudio): an input stream into a ring buffer.

PortAudio calls :meth:`Microphone._callback` from its own real-time thread for every block of
captured frames. The callback copies the selected channel into a preallocated float32 ring and
does nothing else: no allocation of sample buffers, no locks, no logging, no blocking, because
anything slow there makes PortAudio drop input (``input_overflow``). Overflows are counted and
surface once as :data:`~shared.features.FLAG_AUDIO_OVERRUN` on the next window, never as an error.

The ring is a single-writer structure with two positions counted in samples since the stream
opened: ``_reserved`` (where the block being copied ends, set *before* the copy) and
``_written`` (set *after* it). A reader copies the ``n`` samples ending at ``_written`` and then
checks that ``_reserved`` has not reached into the region it copied (it would have wrapped onto
it); if it has, it copies again. No lock is ever taken, so a slow reader cannot stall capture.

A device unplugged mid-run ends the stream (sounddevice calls ``finished_callback`` and
``stream.active`` becomes false); the next :meth:`Microphone.window` raises
:class:`~edge_agent.sensors.errors.SensorDisconnected` so that the caller reopens with a new
:class:`Microphone`. A device that merely stops delivering shows as stale windows (``None``),
counted in :attr:`MicrophoneCounters.stale_windows` for the health layer's "no data for N windows".
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from edge_agent.sensors.errors import SensorDisconnected, SensorError
from shared.features import FLAG_AUDIO_OVERRUN

logger = logging.getLogger(__name__)

SENSOR: Final = "microphone"
# A reader racing a writer that laps the whole ring retries this often before it gives up and
# flags the window as an overrun; in practice one retry is already rare (a copy takes
# microseconds, a block period milliseconds).
_SNAPSHOT_ATTEMPTS: Final = 8

StreamFactory = Callable[..., Any]
DeviceQuery = Callable[[], Sequence[Mapping[str, Any]]]


@dataclass(frozen=True, slots=True)
class AudioWindow:
    """The most recent ``n`` samples of the selected channel and what happened since the last window."""

    samples: np.ndarray  # float32, shape [n], a copy owned by the caller
    end_sample: int  # samples captured since the stream opened, up to the window's end
    new_samples: int  # samples that arrived since the previous window (> 0: the window is fresh)
    overrun: bool  # input was lost (PortAudio overflow) since the previous window
    flags: int  # FLAG_AUDIO_OVERRUN when ``overrun``, else 0 (OR it into the record's sensor flags)


@dataclass(frozen=True, slots=True)
class MicrophoneCounters:
    """A snapshot of the stream's counters since it was opened."""

    callbacks: int
    samples: int
    overruns: int
    stream_errors: int
    stale_windows: int  # consecutive windows without new samples (0 after a fresh one)


def _normalised(name: str) -> str:
    """Letters and digits only, case-folded: ``"UMA-8"`` matches ALSA's ``"UMA8"``."""
    return re.sub(r"[^0-9a-z]", "", name.casefold())


def _import_sounddevice() -> Any:
    """sounddevice, imported only when a microphone is used (it needs PortAudio even to import)."""
    try:
        import sounddevice
    except OSError as exc:  # libportaudio2 missing: sounddevice raises OSError on import
        raise SensorError(SENSOR, "no_portaudio", f"sounddevice cannot load the PortAudio library: {exc}") from exc
    return sounddevice


def find_input_device(devices: Sequence[Mapping[str, Any]], match: str, channels: int) -> tuple[int, str]:
    """``(index, name)`` of the first input device whose name contains ``match`` with enough channels.

    The match is case-insensitive; when nothing matches literally, punctuation and spaces are
    ignored too (ALSA names the UMA-8 ``UMA8``). Raises ``SensorError(reason="not_found")``
    listing the input devices that were seen.
    """
    if not match.strip():
        raise ValueError("the device match string is empty: it would pick any input device")
    inputs: list[tuple[int, str, int]] = []
    for position, device in enumerate(devices):
        max_in = int(device.get("max_input_channels", 0))
        if max_in > 0:
            inputs.append((int(device.get("index", position)), str(device.get("name", "")), max_in))
    needle = match.casefold()
    literal = [d for d in inputs if needle in d[1].casefold()]
    loose = [d for d in inputs if _normalised(match) and _normalised(match) in _normalised(d[1])]
    candidates = literal or loose
    for index, name, max_in in candidates:
        if max_in >= channels:
            return index, name
    seen = ", ".join(f"[{i}] {n!r} ({c} ch)" for i, n, c in inputs) or "none"
    if candidates:
        short = ", ".join(f"{n!r} has {c}" for _, n, c in candidates)
        detail = f"input device matching {match!r} has fewer than {channels} channels ({short}); inputs seen: {seen}"
    else:
        detail = f"no input device matching {match!r}; input devices seen: {seen}"
    raise SensorError(SENSOR, "not_found", detail)


class Microphone:
    """One input stream on the device matching ``device_match``, captured into a ring buffer.

    Construction finds the device and opens the stream (raising ``SensorError`` ``not_found`` or
    ``SensorDisconnected``); :meth:`start` begins capture; :meth:`window` reads. ``stream_factory``
    and ``query_devices`` default to ``sounddevice.InputStream`` and ``sounddevice.query_devices``.
    """

    def __init__(
        self,
        *,
        device_match: str = "UMA-8",
        sample_rate: int = 16_000,
        channels: int = 1,
        channel: int = 0,
        buffer_s: float = 4.0,
        blocksize: int = 0,
        stream_factory: StreamFactory | None = None,
        query_devices: DeviceQuery | None = None,
    ) -> None:
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        if channels < 1:
            raise ValueError(f"channels must be at least 1, got {channels}")
        if not 0 <= channel < channels:
            raise ValueError(f"channel must be in 0..{channels - 1} for {channels} channels, got {channel}")
        if blocksize < 0:
            raise ValueError(f"blocksize must be >= 0 (0: PortAudio chooses), got {blocksize}")
        capacity = round(buffer_s * sample_rate)
        if not buffer_s > 0 or capacity < 1:
            raise ValueError(f"buffer_s must hold at least one sample, got {buffer_s}")
        self.sample_rate = sample_rate
        self.channels = channels
        self.channel = channel
        self.capacity = capacity
        self._ring = np.zeros(capacity, dtype=np.float32)
        # Writer state (only the callback changes these after start).
        self._reserved = 0
        self._written = 0
        self._callbacks = 0
        self._overruns = 0
        self._stream_errors = 0
        # Reader state (only window() changes these).
        self._last_end = 0
        self._overruns_seen = 0
        self._stale_windows = 0
        # Lifecycle: _running distinguishes our own stop() from the device ending the stream.
        self._running = False
        self._finished = False
        self._closed = False
        self._ended: str | None = None  # why the stream ended on its own; sticky until a new Microphone

        self._sd = _import_sounddevice()
        query = query_devices if query_devices is not None else self._sd.query_devices
        try:
            devices = list(query())
        except self._sd.PortAudioError as exc:
            raise SensorDisconnected(SENSOR, detail=f"querying audio devices failed: {exc}") from exc
        self.device_index, self._device_name = find_input_device(devices, device_match, channels)
        factory = stream_factory if stream_factory is not None else self._sd.InputStream
        try:
            self._stream = factory(
                device=self.device_index,
                channels=channels,
                samplerate=sample_rate,
                dtype="float32",
                blocksize=blocksize,
                callback=self._callback,
                finished_callback=self._on_finished,
            )
        except self._sd.PortAudioError as exc:
            self._stream_errors += 1
            raise SensorDisconnected(
                SENSOR,
                detail=f"opening {channels} ch at {sample_rate} Hz on [{self.device_index}] "
                f"{self._device_name!r} failed: {exc}",
            ) from exc
        logger.info(
            "microphone: [%d] %r, %d ch at %d Hz, channel %d, %.1f s ring",
            self.device_index,
            self._device_name,
            channels,
            sample_rate,
            channel,
            buffer_s,
        )

    @property
    def device_name(self) -> str:
        """The name of the input device in use."""
        return self._device_name

    @property
    def counters(self) -> MicrophoneCounters:
        """Callbacks, samples, overruns, stream errors and consecutive stale windows so far."""
        return MicrophoneCounters(
            callbacks=self._callbacks,
            samples=self._written,
            overruns=self._overruns,
            stream_errors=self._stream_errors,
            stale_windows=self._stale_windows,
        )

    def start(self) -> None:
        """Start capture (idempotent); a PortAudio error is ``SensorDisconnected``."""
        if self._closed:
            raise SensorDisconnected(SENSOR, detail="the microphone was closed")
        if self._ended is not None:
            raise SensorDisconnected(SENSOR, detail=f"{self._ended}; open a new Microphone")
        if self._running:
            return
        self._finished = False
        self._running = True
        try:
            self._stream.start()
        except self._sd.PortAudioError as exc:
            self._running = False
            self._stream_errors += 1
            detail = f"starting the stream on {self._device_name!r} failed: {exc}"
            raise SensorDisconnected(SENSOR, detail=detail) from exc

    def stop(self) -> None:
        """Stop capture, keeping the stream open for :meth:`start`; never raises for a vanished device."""
        if not self._running or self._closed:
            return
        self._running = False
        try:
            self._stream.stop()
        except self._sd.PortAudioError as exc:
            logger.warning("microphone: stopping the stream on %r failed: %s", self._device_name, exc)

    def close(self) -> None:
        """Stop and release the stream (idempotent); never raises for a vanished device."""
        if self._closed:
            return
        self.stop()
        self._closed = True
        try:
            self._stream.close()
        except self._sd.PortAudioError as exc:
            logger.warning("microphone: closing the stream on %r failed: %s", self._device_name, exc)

    def __enter__(self) -> Microphone:
        """Start capture for a ``with`` block."""
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close on leaving a ``with`` block."""
        self.close()

    def _on_finished(self) -> None:
        """PortAudio's finished callback: the stream ended, by our stop() or because the device went."""
        self._finished = True

    def _check_alive(self) -> None:
        """Raise ``SensorDisconnected`` when the stream ended without our stop()."""
        if self._closed:
            raise SensorDisconnected(SENSOR, detail="the microphone was closed")
        if self._ended is not None:
            raise SensorDisconnected(SENSOR, detail=self._ended)
        if not self._running:
            return
        try:
            ended = self._finished or not self._stream.active
        except self._sd.PortAudioError as exc:
            ended, why = True, f"stream state unavailable: {exc}"
        else:
            why = "the input stream ended (device unplugged or failed)"
        if ended:
            self._running = False
            self._stream_errors += 1
            self._ended = f"{self._device_name!r}: {why}"
            raise SensorDisconnected(SENSOR, detail=self._ended)

    def _callback(self, indata: np.ndarray, frames: int, time: Any, status: Any) -> None:
        """PortAudio's input callback: copy the selected channel into the ring; nothing else."""
        try:
            if status and status.input_overflow:
                self._overruns += 1
            ring = self._ring
            cap = self.capacity
            start = self._written
            end = start + frames
            # Only the last ``cap`` samples of an oversized block can survive in the ring.
            keep = frames if frames <= cap else cap
            self._reserved = end
            pos = (end - keep) % cap
            first = keep if keep <= cap - pos else cap - pos
            column = indata[frames - keep :, self.channel]
            ring[pos : pos + first] = column[:first]
            if first < keep:
                ring[: keep - first] = column[first:]
            self._written = end
            self._callbacks += 1
        except Exception:  # a broken block must not kill capture; it is lost input, counted
            self._overruns += 1
            self._stream_errors += 1

    def window(self, n_samples: int) -> AudioWindow | None:
        """The most recent ``n_samples`` (a float32 copy), or ``None`` if none arrived since the last call.

        ``None`` is also returned until ``n_samples`` have been captured. Raises
        ``SensorDisconnected`` once the stream has ended on its own (device unplugged).
        """
        if not 0 < n_samples <= self.capacity:
            raise ValueError(f"n_samples must be in 1..{self.capacity} (the ring's size), got {n_samples}")
        self._check_alive()
        end = self._written
        if end <= self._last_end:
            self._stale_windows += 1
            return None
        if end < n_samples:
            return None
        out = np.empty(n_samples, dtype=np.float32)
        torn = True
        for _ in range(_SNAPSHOT_ATTEMPTS):
            end = self._written
            self._copy_out(end, out)
            # Everything the writer may have touched lies below _reserved; the copy is intact
            # unless that reached a lap beyond the copied region's start.
            if self._reserved <= end - n_samples + self.capacity:
                torn = False
                break
        overruns = self._overruns
        overrun = torn or overruns != self._overruns_seen
        self._overruns_seen = overruns
        new = end - self._last_end
        self._last_end = end
        self._stale_windows = 0
        return AudioWindow(
            samples=out,
            end_sample=end,
            new_samples=new,
            overrun=overrun,
            flags=FLAG_AUDIO_OVERRUN if overrun else 0,
        )

    def _copy_out(self, end: int, out: np.ndarray) -> None:
        """Copy the ``len(out)`` ring samples ending at absolute position ``end`` into ``out``."""
        n = out.shape[0]
        cap = self.capacity
        pos = (end - n) % cap
        first = min(n, cap - pos)
        out[:first] = self._ring[pos : pos + first]
        if first < n:
            out[first:] = self._ring[: n - first]
