"""Resumable artefact download over HTTP with httpx: Range requests, a ``.part`` file, a size limit.

The download appends to ``<sha256>.part``; after an interruption (a dropped connection, a timeout,
the agent killed) the next attempt asks for ``Range: bytes=<part size>-`` and appends what comes
back, so no byte is fetched twice. A server that ignores the Range (``200``) or answers another
range restarts the file from zero. The desired ``size`` is a hard limit: a server that sends more is
refused (``oversized_download``), one whose artefact is shorter (an honest shorter length, ``416``, or
connections that keep closing before the end) is refused as ``truncated_download``. Attempts that
make no progress are retried with exponential backoff, up to ``retries`` in a row.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from shared.update import Reason

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class DownloadError(Exception):
    """A download that cannot complete: ``reason`` is a stable code, ``detail`` says more."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Interrupted(Exception):
    """The caller asked the download to stop (agent stopping, update superseded)."""


@dataclass(frozen=True)
class DownloadSettings:
    """How to download."""

    timeout_s: float = 30.0
    retries: int = 5
    backoff_s: float = 1.0
    bandwidth_bytes_per_s: int | None = None


@dataclass
class DownloadStats:
    """What one download did, for the status file and the tests."""

    requests: int = 0
    resumed_from: list[int] | None = None
    bytes_received: int = 0
    restarts: int = 0


class Throttle:
    """Keeps the average rate of a transfer at or below ``rate`` bytes per second."""

    def __init__(self, rate: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self.start = clock()
        self.sent = 0

    def delay(self, n: int) -> float:
        """Account for ``n`` more bytes; return how long to wait before taking more."""
        self.sent += n
        if not self.rate:
            return 0.0
        return max(0.0, self.start + self.sent / self.rate - self.clock())


class Downloader:
    """Downloads one artefact into a ``.part`` file and renames it when complete."""

    def __init__(
        self,
        client: httpx.Client,
        settings: DownloadSettings,
        *,
        stop: threading.Event,
        check: Callable[[], None] = lambda: None,
        progress: Callable[[int], None] = lambda _n: None,
        pause_at: int | None = None,
        on_pause: Callable[[], None] = lambda: None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.stop = stop
        self.check = check  # raises to abandon the download (superseded)
        self.progress = progress
        self.pause_at = pause_at  # test hook: block after this many bytes are on disk
        self.on_pause = on_pause
        self.stats = DownloadStats(resumed_from=[])

    def fetch(self, url: str, part: Path, final: Path, *, size: int) -> Path:
        """Download ``url`` (exactly ``size`` bytes) to ``final`` via ``part``; raise DownloadError."""
        if final.exists() and final.stat().st_size == size:
            return final
        try:
            scheme = httpx.URL(url).scheme
        except httpx.InvalidURL as exc:
            raise DownloadError(Reason.DOWNLOAD_FAILED, f"invalid URL {url!r}: {exc}") from None
        if scheme not in ("http", "https"):
            raise DownloadError(Reason.DOWNLOAD_FAILED, f"URL {url!r} is not http(s)")
        part.parent.mkdir(parents=True, exist_ok=True)
        failures = 0
        last_error = ""
        while True:
            offset = part.stat().st_size if part.exists() else 0
            if offset > size:
                log.warning("%s holds %d bytes, more than the artefact's %d: starting over", part, offset, size)
                part.unlink()
                offset = 0
            if offset == size:
                break
            self._wait_if_stopping()
            self.check()
            before = offset
            try:
                self._one_request(url, part, offset, size)
            except DownloadError:
                raise
            except httpx.HTTPStatusError as exc:
                code = exc.response.status_code
                if 400 <= code < 500 and code not in (408, 429):
                    raise DownloadError(Reason.HTTP_ERROR, f"HTTP {code} for {url}") from None
                last_error = f"HTTP {code}"
            except httpx.RemoteProtocolError as exc:
                last_error = f"connection closed early: {exc}"
            except httpx.TransportError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            now = part.stat().st_size if part.exists() else 0
            if now >= size:
                break
            if now > before:
                failures = 0  # progress: only attempts that fetch nothing count towards the limit
            else:
                failures += 1
            log.info("download of %s stopped at %d of %d bytes (%s)", url, now, size, last_error or "short response")
            if failures > self.settings.retries:
                if "closed early" in last_error or not last_error:
                    raise DownloadError(
                        Reason.TRUNCATED_DOWNLOAD,
                        f"only {now} of {size} bytes after {failures} attempts without progress "
                        f"({last_error or 'short responses'})",
                    )
                raise DownloadError(Reason.DOWNLOAD_FAILED, f"{now} of {size} bytes; last error: {last_error}")
            if failures:
                delay = min(MAX_BACKOFF_S, self.settings.backoff_s * 2 ** (failures - 1))
                if self.stop.wait(delay):
                    raise Interrupted()
        with open(part, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(part, final)
        return final

    def _wait_if_stopping(self) -> None:
        if self.stop.is_set():
            raise Interrupted()

    def _one_request(self, url: str, part: Path, offset: int, size: int) -> None:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        self.stats.requests += 1
        if offset:
            assert self.stats.resumed_from is not None
            self.stats.resumed_from.append(offset)
        timeout = httpx.Timeout(self.settings.timeout_s)
        with self.client.stream("GET", url, headers=headers, timeout=timeout) as resp:
            if resp.status_code == 416:
                raise DownloadError(
                    Reason.TRUNCATED_DOWNLOAD, f"server has no bytes from {offset} on; the artefact is {size} bytes"
                )
            resp.raise_for_status()
            start, total = self._range_of(resp, offset)
            if total is not None and total < size:
                raise DownloadError(Reason.TRUNCATED_DOWNLOAD, f"server says the artefact is {total} bytes, not {size}")
            if total is not None and total > size:
                raise DownloadError(Reason.OVERSIZED_DOWNLOAD, f"server says the artefact is {total} bytes, not {size}")
            if start != offset:
                # The server ignored the Range (200) or answered another one: start over from its start.
                self.stats.restarts += 1
                log.info("server sent bytes from %d, not %d: restarting %s", start, offset, part.name)
                offset = start
            mode = "r+b" if offset else "wb"
            with open(part, mode) as fh:
                fh.seek(offset)
                fh.truncate()
                throttle = Throttle(self.settings.bandwidth_bytes_per_s)
                written = offset
                # Chunks as they arrive (no re-chunking): bytes received before a connection drops are kept.
                for data in resp.iter_bytes():
                    if written + len(data) > size:
                        fh.write(data[: size - written])
                        raise DownloadError(Reason.OVERSIZED_DOWNLOAD, f"server sent more than the {size} bytes")
                    fh.write(data)
                    written += len(data)
                    self.stats.bytes_received += len(data)
                    self.progress(written)
                    if self.pause_at is not None and written >= self.pause_at:
                        fh.flush()
                        os.fsync(fh.fileno())
                        self.pause_at = None
                        self.on_pause()
                    wait = throttle.delay(len(data))
                    if wait > 0 and self.stop.wait(wait):
                        fh.flush()
                        raise Interrupted()
                    if self.stop.is_set():
                        fh.flush()
                        raise Interrupted()
                    self.check()

    @staticmethod
    def _range_of(resp: httpx.Response, offset: int) -> tuple[int, int | None]:
        """``(first byte, total length)`` of a response (total None when the server does not say)."""
        if resp.status_code == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
            if not m:
                raise DownloadError(
                    Reason.DOWNLOAD_FAILED, f"206 without a usable Content-Range: {resp.headers.get('content-range')!r}"
                )
            total = None if m[3] == "*" else int(m[3])
            return int(m[1]), total
        length = resp.headers.get("content-length")
        return 0, int(length) if length and length.isdigit() and "content-encoding" not in resp.headers else None
