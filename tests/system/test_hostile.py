"""Hostile input: over a thousand bad payloads while a real agent streams valid records.

Every hostile payload is quarantined with a specific reason and counted, the collector stays up,
and every valid record lands. Runs on the embedded default store (SQLite) with real Mosquitto.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx
import msgpack
import numpy as np
import paho.mqtt.client as mqtt
import pytest
import zstandard

from shared.codec import MAGIC, encode_batch
from shared.topics import topic
from tests.shared.test_codec import make_batch, make_block
from tests.system.procs import Collector, agent_config, replay_csv, tool

pytestmark = [pytest.mark.services, pytest.mark.slow]


def hostile_payloads(rng: np.random.Generator) -> list[tuple[str, str, bytes, set[str]]]:
    """``(category, topic device, payload, acceptable reasons)`` for each hostile message."""
    out: list[tuple[str, str, bytes, set[str]]] = []

    def add(cat: str, device: str, payload: bytes, reasons: set[str], kind: str = "telemetry") -> None:
        out.append((cat, topic(device, kind), payload, reasons))

    for _ in range(300):
        add("random", "h-random", rng.bytes(int(rng.integers(1, 4000))), {"bad_magic", "bad_compression"})
    for i in range(200):
        good = encode_batch(make_batch(make_block(20, seed=i), device_id="h-trunc"))
        cut = int(rng.integers(4, len(good) - 1))
        add("truncated", "h-trunc", good[:cut], {"bad_compression", "bad_magic", "unsupported_version"})
    for i in range(100):
        good = encode_batch(make_batch(make_block(5, seed=i), device_id="h-version"))
        add("version", "h-version", MAGIC + bytes([2 + i % 200]) + good[4:], {"unsupported_version"})
    for i in range(100):
        block = make_block(5, seed=i)
        doc = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(
            encode_batch(make_batch(block, device_id="h-oversize"))[4:]), raw=False)
        doc["blocks"][0]["cols"]["features"]["s"] = [5, 5000]  # claims 5,000 features
        body = zstandard.ZstdCompressor().compress(msgpack.packb(doc, use_bin_type=True))
        add("oversized", "h-oversize", MAGIC + b"\x01" + body, {"bad_shape", "bad_length"})
    bomb_body = zstandard.ZstdCompressor(level=19).compress(b"\x00" * (64 * 1024 * 1024))
    for _ in range(50):
        add("bomb", "h-bomb", MAGIC + b"\x01" + bomb_body, {"decompressed_too_large"})
    for i in range(100):
        block = make_block(5, seed=i)
        block.calibrated[int(rng.integers(0, 5))] = np.nan if i % 2 else np.inf
        add("non_finite", "h-nan", encode_batch(make_batch(block, device_id="h-nan")), {"non_finite"})
    for i in range(100):
        add("mismatch", "h-mismatch", encode_batch(make_batch(make_block(5, seed=i), device_id="someone-else")),
            {"device_mismatch"})
    for _ in range(50):
        add("status", "h-status", b"{not json", {"bad_json"}, kind="status")
    return out


def test_hostile_payloads_are_quarantined_while_valid_data_lands(broker, tmp_path: Path) -> None:
    rows = 20_000
    collector = Collector(tmp_path / "collector", f"sqlite:///{tmp_path / 'fleet.db'}", broker.url).start()
    csv = replay_csv(tmp_path / "replay.csv", rows, seed=2)
    config = agent_config(tmp_path / "agent", device_id="valid-001", mqtt_url=broker.url)
    log = (tmp_path / "agent.log").open("wb")
    agent = subprocess.Popen(
        [*tool("edge-agent"), "replay", "--config", str(config), "--csv", str(csv), "--rate", "4000"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    host, port = broker.url.removeprefix("mqtt://").split(":")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="hostile", protocol=mqtt.MQTTv311)
    client.connect(host, int(port))
    client.loop_start()
    try:
        rng = np.random.default_rng(7)
        payloads = hostile_payloads(rng)
        # Conflicts: the same keys sent again with different content.
        original = make_batch(make_block(10, seed=1000, first_seq=0), device_id="h-conflict", gaps=[])
        client.publish(topic("h-conflict", "telemetry"), encode_batch(original), qos=1).wait_for_publish(10)
        time.sleep(1.0)
        for i in range(100):
            block = make_block(10, seed=2000 + i, first_seq=0)
            changed = dataclasses.replace(original, blocks=[block])
            payloads.append(("conflict", topic("h-conflict", "telemetry"), encode_batch(changed), {"seq_conflict"}))
        order = rng.permutation(len(payloads))
        for k in order:
            _, t, payload, _ = payloads[k]
            client.publish(t, payload, qos=1)
            if k % 50 == 0:
                time.sleep(0.05)  # interleave with the valid stream rather than burst before it
        assert len(payloads) >= 1000
        assert agent.wait(240) == 0, (tmp_path / "agent.log").read_text()[-3000:]
        expected = Counter(cat for cat, *_ in payloads)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if collector.get("/quarantine", limit=1)["total"] >= len(payloads):
                break
            time.sleep(0.5)
        entries = []
        cursor = None
        while True:
            page = collector.get("/quarantine", limit=1000, **({"cursor": cursor} if cursor else {}))
            entries += page["items"]
            cursor = page["next"]
            if cursor is None:
                break
    finally:
        client.loop_stop()
        client.disconnect()
        if agent.poll() is None:
            agent.kill()
    try:
        assert collector.proc is not None and collector.proc.poll() is None, "the collector died"
        assert collector.get("/health")["database"] == "ok"
        assert collector.get("/inferences/count", device_id="valid-001")["count"] == rows
        assert collector.get("/inferences/count", device_id="h-conflict")["count"] == 10
        assert len(entries) == len(payloads), Counter(e["reason"] for e in entries)
        by_device = Counter(e["device_id"] for e in entries)
        allowed: dict[str, set[str]] = {}
        for _cat, t, _p, reasons in payloads:
            allowed.setdefault(t.split("/")[2], set()).update(reasons)
        for entry in entries:
            assert entry["reason"] in allowed[entry["device_id"]], entry
            assert entry["detail"], entry
        devices = {"random": "h-random", "truncated": "h-trunc", "version": "h-version", "oversized": "h-oversize",
                   "bomb": "h-bomb", "non_finite": "h-nan", "mismatch": "h-mismatch", "status": "h-status",
                   "conflict": "h-conflict"}
        for cat, n in expected.items():
            assert by_device[devices[cat]] == n, (cat, by_device)
        # Counted: the Prometheus counter per reason adds up to every hostile payload.
        text = httpx.get(f"http://127.0.0.1:{collector.port}/metrics", timeout=10).text
        counted = Counter()
        for line in text.splitlines():
            match = re.match(r'fleet_ingest_quarantined_total\{reason="([a-z_]+)"\} ([0-9.e+]+)', line)
            if match:
                counted[match.group(1)] += int(float(match.group(2)))
        assert counted == Counter(e["reason"] for e in entries)
    finally:
        collector.stop()
