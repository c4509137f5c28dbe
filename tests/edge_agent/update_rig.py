"""What the updater tests need: release keys, bundles made from the committed reference, an artefact
HTTP server that honours Range (and can misbehave), signed desired states, and an MQTT peer that
plays the collector's desired-state side and records ``reported`` and ``events``.

Everything is real: Ed25519 keys made in temporary folders, bundles signed with them and loaded by
TFLite, a ``ThreadingHTTPServer`` over a socket, the tests' private Mosquitto.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import DEFAULT_BUNDLE, DEFAULT_KEY, AgentConfig, config_from_dict
from shared.bundle import Bundle, load_bundle, manifest_json, write_bundle
from shared.interpreter import load_interpreter
from shared.messages import Desired, DesiredArtefact, DeviceEvent
from shared.signing import generate_private_key, load_private_key, load_public_keys, sign, sign_desired
from shared.topics import Kind, parse, subscription, topic

REPO = Path(__file__).resolve().parents[2]
DEV_KEY = REPO / "collector" / "training" / "dev-release-key.pem"
_RANGE = re.compile(r"^bytes=(\d+)-$")


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# ------------------------------------------------------------------------------- keys, bundles


@dataclass
class ReleaseKey:
    """A private release key and the file of its public half (what a device pins)."""

    private: Ed25519PrivateKey
    public_file: Path


def release_key(folder: Path, name: str = "release") -> ReleaseKey:
    """A fresh Ed25519 key in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.pem"
    generate_private_key(path)
    return ReleaseKey(load_private_key(path), path.with_suffix(".pem.pub"))


def dev_key() -> ReleaseKey:
    """The committed development key, whose public half devices pin by default."""
    return ReleaseKey(load_private_key(DEV_KEY), DEFAULT_KEY)


def reference_bundle() -> Bundle:
    """The committed reference bundle, verified."""
    return load_bundle(DEFAULT_BUNDLE, load_public_keys([DEFAULT_KEY]))


def make_bundle(
    out: Path, key: ReleaseKey, *, version: str = "1.1.0", model: bytes | None = None, **manifest: Any
) -> Path:
    """A bundle from the reference one: another version (and model, golden cases...), signed by ``key``."""
    base = reference_bundle()
    doc = base.manifest.model_dump(mode="json")
    model = base.model if model is None else model
    doc.update(
        version=version,
        parent_version=base.manifest.version,
        model_sha256=hashlib.sha256(model).hexdigest(),
        model_bytes=len(model),
    )
    doc.update(manifest)
    data = manifest_json(doc)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bundle(out, model, data, sign(data, key.private))
    return out


def nan_model() -> tuple[bytes, list[dict[str, Any]]]:
    """The reference model with one first-layer weight raised to 2.5e38, and golden cases it passes.

    On the golden inputs the temperature input (normalised) is below 0.9 and every output stays
    finite; on the simulated cabin it sits near 1.6, the hidden unit overflows to Inf and the
    probabilities come out NaN. The golden expectations are recomputed on the patched model, so the
    bundle's self-test passes and only the watch period on live inputs can catch it.
    """
    from tflite_runtime.interpreter import Interpreter, OpResolverType

    base = reference_bundle()
    m = base.manifest
    plain = Interpreter(
        model_content=base.model, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    plain.allocate_tensors()
    weights = next(
        plain.get_tensor(d["index"])
        for d in plain.get_tensor_details()
        if list(d["shape"]) == [m.n_hidden, len(m.features)]
    )
    offset = base.model.find(weights.astype("<f4").tobytes())
    assert offset > 0, "first-layer weights not found in the flatbuffer"
    model = bytearray(base.model)
    model[offset : offset + 4] = np.float32(2.5e38).tobytes()  # unit 0, input 0 (temperature)
    interp = load_interpreter(bytes(model))
    out = interp.get_output_details()
    inp = interp.get_input_details()[0]["index"]
    mean, std = np.asarray(m.normalisation.mean, np.float32), np.asarray(m.normalisation.std, np.float32)
    golden = []
    for case in m.golden:
        interp.set_tensor(inp, ((np.asarray(case.input, np.float32) - mean) / std).reshape(1, -1))
        interp.invoke()
        probs = interp.get_tensor(out[m.probabilities.index]["index"])[0]
        hidden = interp.get_tensor(out[m.hidden.index]["index"])[0]
        if np.isfinite(probs).all() and np.isfinite(hidden).all():
            golden.append({"input": case.input, "probabilities": probs.tolist(), "hidden": hidden.tolist()})
    assert golden, "no golden case stays finite"
    return bytes(model), golden


def tar_sha(path: Path) -> str:
    """SHA-256 of a bundle tar."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ artefact server


@dataclass
class Served:
    """One artefact and how the server treats it."""

    data: bytes
    claimed: int | None = None  # Content-Length/Content-Range total to announce (default: len(data))
    cuts: list[int] = field(default_factory=list)  # the n-th response closes after cuts[n] body bytes
    honour_range: bool = True


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client killed mid-download resets its connection; that is the point of some tests.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class ArtefactServer:
    """A real HTTP/1.1 server on a free port serving artefacts with Range support, logging every request."""

    def __init__(self) -> None:
        self.files: dict[str, Served] = {}
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                owner._serve(self)

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="artefact-server", daemon=True)
        self.thread.start()

    def add(self, name: str, data: bytes, **behaviour: Any) -> str:
        """Serve ``data`` at ``/name``; return its URL."""
        self.files[f"/{name}"] = Served(data, **behaviour)
        return f"http://127.0.0.1:{self.port}/{name}"

    def bytes_served(self, name: str) -> int:
        """Body bytes sent for ``/name`` over all requests."""
        with self.lock:
            return sum(r["sent"] for r in self.requests if r["path"] == f"/{name}")

    def requests_for(self, name: str) -> list[dict[str, Any]]:
        """The log of requests for ``/name``."""
        with self.lock:
            return [dict(r) for r in self.requests if r["path"] == f"/{name}"]

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        entry = self.files.get(h.path)
        header = h.headers.get("Range")
        record: dict[str, Any] = {"path": h.path, "range": header, "status": 404, "sent": 0}
        with self.lock:
            self.requests.append(record)
        if entry is None:
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        total = entry.claimed if entry.claimed is not None else len(entry.data)
        start = 0
        m = _RANGE.match(header or "")
        if m and entry.honour_range:
            start = int(m[1])
            if start >= len(entry.data):
                record["status"] = 416
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{total}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
            record["status"] = 206
        else:
            h.send_response(200)
            record["status"] = 200
        h.send_header("Content-Length", str(total - start))
        h.send_header("Content-Type", "application/x-tar")
        h.end_headers()
        body = entry.data[start:]
        with self.lock:
            cut = entry.cuts.pop(0) if entry.cuts else None
        if cut is not None:
            body = body[:cut]
        try:
            for i in range(0, len(body), 8192):
                h.wfile.write(body[i : i + 8192])
                record["sent"] += len(body[i : i + 8192])
            h.wfile.flush()
        except OSError:
            return
        if len(body) < total - start:
            # Close without the rest of the announced body: the client sees a truncated response.
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.httpd.server_close()


# ----------------------------------------------------------------------------- desired, MQTT


def artefact(path: Path, url: str) -> DesiredArtefact:
    """The desired-state entry of the bundle at ``path`` served at ``url``."""
    manifest = json.loads(_member(path, "manifest.json"))
    return DesiredArtefact(
        name=manifest["name"], version=manifest["version"], sha256=tar_sha(path), size=path.stat().st_size, url=url
    )


def _member(path: Path, name: str) -> bytes:
    import tarfile

    with tarfile.open(path) as tar:
        member = tar.extractfile(name)
        assert member is not None
        return member.read()


def signed_desired(
    serial: int,
    key: ReleaseKey,
    *,
    model: DesiredArtefact | None = None,
    shadow: DesiredArtefact | None = None,
    rollout_id: str | None = "test-rollout",
) -> Desired:
    """A desired state signed by ``key``."""
    desired = Desired(serial=serial, issued_at=time.time(), model=model, shadow=shadow, rollout_id=rollout_id)
    return sign_desired(desired, key.private)


class UpdatePeer:
    """Publishes retained desired states and records every device's ``reported`` and ``events``."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.reported: dict[str, list[dict[str, Any]]] = {}
        self.events: dict[str, list[DeviceEvent]] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"update-peer-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = lambda c, *_a: c.subscribe(
            [(subscription(Kind.REPORTED), 1), (subscription(Kind.EVENTS), 1)]
        )
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
        self.client.loop_start()
        assert self._subscribed.wait(10), "update peer could not subscribe"

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return
        device, kind = parse(msg.topic)
        with self._lock:
            if kind is Kind.REPORTED:
                self.reported.setdefault(device, []).append(json.loads(msg.payload))
            elif kind is Kind.EVENTS:
                self.events.setdefault(device, []).append(DeviceEvent.model_validate_json(msg.payload))

    def publish(self, device: str, payload: Desired | bytes | str) -> None:
        """Publish a desired state (or any payload) retained at QoS 1 on the device's topic."""
        body = payload.model_dump_json() if isinstance(payload, Desired) else payload
        info = self.client.publish(topic(device, Kind.DESIRED), body, qos=1, retain=True)
        info.wait_for_publish(10)

    def clear(self, device: str) -> None:
        """Remove the retained desired state."""
        self.client.publish(topic(device, Kind.DESIRED), b"", qos=1, retain=True).wait_for_publish(10)

    def last(self, device: str) -> dict[str, Any] | None:
        """The last ``reported`` of a device."""
        with self._lock:
            items = self.reported.get(device)
            return items[-1] if items else None

    def update_state(self, device: str) -> str | None:
        """The last reported update state."""
        last = self.last(device)
        return last["update"]["state"] if last else None

    def transitions(self, device: str) -> list[tuple[str, str, str]]:
        """``(from, to, event)`` of every update event received."""
        with self._lock:
            events = list(self.events.get(device, []))
        return [(e.data["from"], e.data["to"], e.data["event"]) for e in events if e.kind == "update"]

    def kinds(self, device: str) -> list[str]:
        """Kinds of the events received from a device."""
        with self._lock:
            return [e.kind for e in self.events.get(device, [])]

    def wait_state(self, device: str, states: set[str], timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the device reports one of ``states``; return that report."""
        wait_for(lambda: self.update_state(device) in states, timeout, f"{device} to report {states}")
        last = self.last(device)
        assert last is not None
        return last

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


def agent_config(
    tmp: Path,
    broker_url: str,
    device: str,
    *,
    keys: list[Path] | None = None,
    updates: dict[str, Any] | None = None,
    **sections: dict[str, Any],
) -> dict[str, Any]:
    """An agent configuration mapping for a simulated vehicle with short update periods."""
    doc: dict[str, Any] = {
        "device": {"id": device, "profile": "sim-v1"},
        "mqtt": {"url": broker_url, "reconnect_min_delay_s": 1, "reconnect_max_delay_s": 2},
        "model": {"trusted_keys": [str(k) for k in (keys or [DEFAULT_KEY])]},
        "sensors": {"backend": "simulated", "rate_hz": 20, "seed": 3},
        "spool": {"commit_interval_s": 0.2},
        "uplink": {"batch_max_age_s": 0.3, "ack_timeout_s": 5, "status_interval_s": 1},
        "updates": {"watch_s": 1.0, "watch_min_records": 5, "download_backoff_s": 0.05, "retry_interval_s": 0.5},
        "state_dir": str(tmp / device),
    }
    doc["updates"].update(updates or {})
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    return doc


def config_of(doc: dict[str, Any]) -> AgentConfig:
    """Validate a configuration mapping."""
    return config_from_dict(doc, source="test")
