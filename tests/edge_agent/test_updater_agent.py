"""The updater inside running agents: desired states over the real Mosquitto, artefacts over a real
HTTP server, real Ed25519 signatures and TFLite self-tests; the test plays the collector."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.app import Agent
from shared.codec import Batch
from shared.features import FLAG_OUTPUT_INVALID
from shared.update import Reason
from tests.edge_agent.test_uplink import CollectorPeer
from tests.edge_agent.update_rig import (
    ArtefactServer,
    ReleaseKey,
    UpdatePeer,
    agent_config,
    artefact,
    config_of,
    dev_key,
    make_bundle,
    nan_model,
    reference_bundle,
    release_key,
    signed_desired,
    tar_sha,
    wait_for,
)
from tests.services import Mosquitto

TERMINAL = {"committed", "rolled_back", "failed", "incompatible"}
BASE = reference_bundle().manifest
NAME, VERSION = BASE.name, BASE.version


@pytest.fixture
def server() -> Iterator[ArtefactServer]:
    s = ArtefactServer()
    yield s
    s.close()


@pytest.fixture
def peer(broker: Mosquitto) -> Iterator[UpdatePeer]:
    p = UpdatePeer(broker.url)
    yield p
    p.close()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for agent in started:
        agent.stop()


def start_agent(agents: list[Agent], doc: dict[str, Any]) -> Agent:
    agent = Agent(config_of(doc))
    agent.start()
    agents.append(agent)
    assert agent.uplink is not None and agent.uplink.wait_connected(10)
    return agent


def device() -> str:
    return f"upd-{uuid.uuid4().hex[:8]}"


def serve(server: ArtefactServer, path: Path, **behaviour: Any) -> Any:
    return artefact(path, server.add(f"{uuid.uuid4().hex[:6]}-{path.name}", path.read_bytes(), **behaviour))


def active_blocks(batches: list[Batch], device_id: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, str]]:
    out = []
    for b in batches:
        if b.device_id != device_id:
            continue
        for block in b.blocks:
            if block.role == "active":
                out.append((block.seq, block.mono, block.ts, block.model_version))
    return out


# ---------------------------------------------------------------------------------- success


def test_an_update_commits_with_no_inference_dropped_across_activation(
    broker: Mosquitto, server: ArtefactServer, peer: UpdatePeer, agents: list[Agent], tmp_path: Path
) -> None:
    dev = device()
    collector = CollectorPeer(broker.url)
    try:
        agent = start_agent(agents, agent_config(tmp_path, broker.url, dev))
        wait_for(lambda: len(collector.unique(dev)) >= 20, what="telemetry before the update")
        bundle = make_bundle(tmp_path / "v2.tar", dev_key(), version="1.2.0")
        peer.publish(dev, signed_desired(1, dev_key(), model=serve(server, bundle)))
        report = peer.wait_state(dev, {"committed"} | TERMINAL)
        assert report["update"]["result"] == "success", report
        assert report["model"] == {"name": NAME, "version": "1.2.0"}
        assert report["model_sha256"] == tar_sha(bundle) and report["desired_serial"] == 1
        assert report["update"]["serial"] == 1 and report["update"]["rollout_id"] == "test-rollout"
        assert agent.engine is not None and agent.engine.model_version == "1.2.0"
        wait_for(
            lambda: any(v == "1.2.0" for *_x, v in active_blocks(collector.batches, dev)), what="new model records"
        )
        wait_for(lambda: len([v for *_x, v in active_blocks(collector.batches, dev) if v == "1.2.0"]) >= 10)
    finally:
        collector.close()
    assert [t[1] for t in peer.transitions(dev)] == [
        "downloading",
        "verifying",
        "staging",
        "self_testing",
        "activating",
        "watching",
        "committed",
    ]
    # Every seq from the first record on, through the swap, in order; no gap in time beyond one period.
    blocks = active_blocks(collector.batches, dev)
    seqs = np.concatenate([b[0] for b in blocks]).astype(np.int64)
    monos = np.concatenate([b[1] for b in blocks])
    versions = np.concatenate([[b[3]] * len(b[0]) for b in blocks])
    order = np.argsort(seqs)
    seqs, monos, versions = seqs[order], monos[order], versions[order]
    unique, first = np.unique(seqs, return_index=True)
    monos, versions = monos[first], versions[first]
    assert unique[0] == 0 and np.all(np.diff(unique) == 1), "a seq is missing"
    swap = int(np.flatnonzero(versions == "1.2.0")[0])
    assert swap > 0 and set(versions[:swap]) == {VERSION} and set(versions[swap:]) == {"1.2.0"}
    period = 1 / 20
    gaps = np.diff(monos[swap - 5 : swap + 5])
    assert gaps.max() <= period * 1.5 + 1e-3, f"gap of {gaps.max():.4f} s around the swap"
    # The previous model's staging is gone at commit; the new one is where the report says.
    state_dir = tmp_path / dev
    assert [p.name for p in (state_dir / "models").iterdir()] == [tar_sha(bundle)]
    record = json.loads((state_dir / "update" / "state.json").read_text())
    assert record["state"] == "committed" and record["previous"] is None and not record["activated"]


# -------------------------------------------------------------------------------- rejections


def test_bad_artefacts_are_rejected_on_the_device_with_specific_reasons(
    broker: Mosquitto, server: ArtefactServer, peer: UpdatePeer, agents: list[Agent], tmp_path: Path
) -> None:
    key = dev_key()
    stranger = release_key(tmp_path / "keys", "stranger")
    good = make_bundle(tmp_path / "good.tar", key, version="1.3.0")
    tampered = bytearray(good.read_bytes())
    tampered[-2000] ^= 0xFF  # one byte in the tar: the desired sha256 no longer matches
    cases: dict[str, Any] = {
        Reason.HASH_MISMATCH: artefact(good, server.add("tampered.tar", bytes(tampered))),
        Reason.UNKNOWN_KEY: serve(server, make_bundle(tmp_path / "stranger.tar", stranger, version="1.3.1")),
        Reason.INCOMPATIBLE_PROFILE: serve(
            server,
            make_bundle(
                tmp_path / "pi5.tar",
                key,
                version="1.3.2",
                compatibility={"hardware_profiles": ["pi5-v2"], "min_agent_version": "0.1.0"},
            ),
        ),
        Reason.AGENT_TOO_OLD: serve(
            server,
            make_bundle(
                tmp_path / "future.tar",
                key,
                version="1.3.3",
                compatibility={"hardware_profiles": ["*"], "min_agent_version": "99.0"},
            ),
        ),
    }
    lying = [case.model_dump() for case in BASE.golden]
    lying[0]["probabilities"] = list(reversed(lying[0]["probabilities"]))  # signed, but the model disagrees
    cases[Reason.SELF_TEST_FAILED] = serve(
        server, make_bundle(tmp_path / "liar.tar", key, version="1.3.5", golden=lying)
    )
    short = make_bundle(tmp_path / "short.tar", key, version="1.3.4")
    data = short.read_bytes()
    cases[Reason.TRUNCATED_DOWNLOAD] = artefact(
        short, server.add("short.tar", data[: len(data) // 2], claimed=len(data))
    )
    devices = {}
    for reason, art in cases.items():
        dev = device()
        devices[reason] = dev
        start_agent(agents, agent_config(tmp_path, broker.url, dev, updates={"download_retries": 1}))
        peer.publish(dev, signed_desired(1, key, model=art))
    for reason, dev in devices.items():
        report = peer.wait_state(dev, TERMINAL)
        update = report["update"]
        expected = "incompatible" if reason in (Reason.INCOMPATIBLE_PROFILE, Reason.AGENT_TOO_OLD) else "rolled_back"
        assert (update["state"], update["result"], update["reason"]) == (expected, "failure", reason), update
        assert update["error"], update
        assert report["model"] == {"name": NAME, "version": VERSION}  # still running what it ran
    for agent in agents:
        state_dir = agent.config.state_dir
        assert not list((state_dir / "update" / "downloads").iterdir())  # nothing left behind
        assert not list((state_dir / "models").iterdir())


def test_malformed_unsigned_forged_and_stale_desired_states_are_ignored_and_counted(
    broker: Mosquitto, server: ArtefactServer, peer: UpdatePeer, agents: list[Agent], tmp_path: Path
) -> None:
    dev = device()
    agent = start_agent(agents, agent_config(tmp_path, broker.url, dev))
    key, stranger = dev_key(), release_key(tmp_path / "keys", "stranger")
    art = serve(server, make_bundle(tmp_path / "v2.tar", key, version="2.0.0"))
    assert agent.uplink is not None and agent.updater is not None
    peer.publish(dev, b"{not json")
    peer.publish(dev, json.dumps({"serial": "x"}))
    wait_for(lambda: agent.uplink.counters.bad_desired == 2, what="malformed payloads counted")
    unsigned = signed_desired(5, key, model=art).model_copy(update={"signature": None})
    peer.publish(dev, unsigned)
    peer.publish(dev, signed_desired(5, stranger, model=art))
    forged = signed_desired(5, key, model=art).model_copy(update={"serial": 6})  # signature over serial 5
    peer.publish(dev, forged)
    wait_for(lambda: agent.updater.counters.desired_rejected == 3, what="unsigned and forged desired rejected")
    reasons = [e.data["reason"] for e in peer.events.get(dev, []) if e.kind == "desired_rejected"]
    wait_for(lambda: len([e for e in peer.events.get(dev, []) if e.kind == "desired_rejected"]) == 3)
    reasons = [e.data["reason"] for e in peer.events[dev] if e.kind == "desired_rejected"]
    assert reasons == ["unsigned", "unknown_key", "bad_signature"]
    assert agent.updater.record.serial == -1 and peer.update_state(dev) == "idle"
    peer.publish(dev, signed_desired(5, key, model=art))
    peer.wait_state(dev, {"committed"})
    older = make_bundle(tmp_path / "old.tar", key, version="0.9.0")
    peer.publish(dev, signed_desired(4, key, model=serve(server, older)))  # a replayed older serial
    wait_for(lambda: agent.updater.counters.desired_stale == 1, what="stale serial counted")
    assert agent.engine is not None and agent.engine.model_version == "2.0.0"
    assert agent.failed is None and agent.updater.record.serial == 5


# --------------------------------------------------------------------------- watch rollbacks


def test_a_model_emitting_nan_on_live_inputs_rolls_back_during_watching(
    broker: Mosquitto, server: ArtefactServer, peer: UpdatePeer, agents: list[Agent], tmp_path: Path
) -> None:
    model, golden = nan_model()
    bundle = make_bundle(tmp_path / "nan.tar", dev_key(), version="6.6.6", model=model, golden=golden)
    dev = device()
    collector = CollectorPeer(broker.url)
    try:
        agent = start_agent(agents, agent_config(tmp_path, broker.url, dev, updates={"watch_s": 5}))
        peer.publish(dev, signed_desired(1, dev_key(), model=serve(server, bundle)))
        report = peer.wait_state(dev, TERMINAL)
        wait_for(lambda: any(v == "6.6.6" for *_x, v in active_blocks(collector.batches, dev)), what="nan records")
    finally:
        collector.close()
    update = report["update"]
    assert (update["state"], update["reason"]) == ("rolled_back", Reason.NONFINITE_OUTPUT), update
    assert [t[1] for t in peer.transitions(dev)][-4:] == ["watching", "failure", "rolling_back", "rolled_back"]
    assert report["model"]["version"] == VERSION and agent.engine is not None
    assert agent.engine.model_version == VERSION
    # The NaN records never travelled as NaN: zeroed and flagged, so nothing was quarantined.
    assert not collector.bad
    for b in collector.batches:
        for block in b.blocks:
            if block.model_version == "6.6.6":
                assert np.all(block.sensor_flags & FLAG_OUTPUT_INVALID) and np.isfinite(block.probs).all()


def test_a_model_over_the_latency_bound_rolls_back_during_watching(
    broker: Mosquitto, server: ArtefactServer, peer: UpdatePeer, agents: list[Agent], tmp_path: Path
) -> None:
    # The bound is set below what any TFLite inference costs here, so the new model is over it.
    dev = device()
    agent = start_agent(agents, agent_config(tmp_path, broker.url, dev, updates={"max_latency_ms": 0.0001}))
    bundle = make_bundle(tmp_path / "slow.tar", dev_key(), version="1.5.0")
    peer.publish(dev, signed_desired(1, dev_key(), model=serve(server, bundle)))
    update = peer.wait_state(dev, TERMINAL)["update"]
    assert (update["state"], update["reason"]) == ("rolled_back", Reason.LATENCY_OVER_BOUND), update
    assert "p95 latency" in update["error"]
    assert ("watching", "failure", "error") in peer.transitions(dev)
    assert agent.engine is not None and agent.engine.model_version == VERSION
    assert not (tmp_path / dev / "models").exists() or not list((tmp_path / dev / "models").iterdir())


# ------------------------------------------------------------------------------------- shadow


def test_shadow_records_pair_with_the_active_records_on_the_same_inputs(
    broker: Mosquitto, server: ArtefactServer, peer: UpdatePeer, agents: list[Agent], tmp_path: Path
) -> None:
    dev = device()
    collector = CollectorPeer(broker.url)
    key = dev_key()
    try:
        agent = start_agent(agents, agent_config(tmp_path, broker.url, dev))
        candidate = serve(server, make_bundle(tmp_path / "cand.tar", key, version="3.0.0"))
        peer.publish(dev, signed_desired(1, key, shadow=candidate))
        report = peer.wait_state(dev, {"shadowing"} | TERMINAL)
        assert report["update"]["slot"] == "shadow"
        wait_for(lambda: peer.last(dev).get("shadow") == {"name": NAME, "version": "3.0.0"}, what="shadow report")
        wait_for(
            lambda: sum(len(bl.seq) for b in collector.batches for bl in b.blocks if bl.role == "shadow") >= 30,
            what="shadow records",
        )
        # The shadow stops when the desired state no longer names it.
        peer.publish(dev, signed_desired(2, key))
        peer.wait_state(dev, {"idle"})
        assert agent.shadow is None and agent.engine is not None and agent.engine.model_version == VERSION
        assert peer.last(dev).get("shadow") is None
    finally:
        collector.close()
    active: dict[int, tuple[float, np.ndarray, int]] = {}
    shadow: dict[int, tuple[float, np.ndarray, str]] = {}
    for b in collector.batches:
        for block in b.blocks:
            target = active if block.role == "active" else shadow
            for i, seq in enumerate(block.seq):
                target[int(seq)] = (
                    float(block.mono[i]),
                    block.features[i],
                    block.model_version if block.role == "shadow" else int(block.pred[i]),
                )
    assert shadow and all(v[2] == "3.0.0" for v in shadow.values())
    for seq, (mono, features, _version) in shadow.items():
        partner = active.get(seq - 1)
        assert partner is not None, f"shadow record {seq} has no active record before it"
        assert partner[0] == mono
        np.testing.assert_array_equal(partner[1], features)
    assert ("self_testing", "shadowing", "shadow_start") in peer.transitions(dev)
    assert ("shadowing", "idle", "shadow_end") in peer.transitions(dev)


def test_a_shadow_phase_before_activation_then_promotion(
    broker: Mosquitto, server: ArtefactServer, peer: UpdatePeer, agents: list[Agent], tmp_path: Path
) -> None:
    dev = device()
    key = dev_key()
    agent = start_agent(
        agents, agent_config(tmp_path, broker.url, dev, updates={"shadow_s": 0.5, "shadow_min_records": 5})
    )
    candidate = serve(server, make_bundle(tmp_path / "cand.tar", key, version="3.1.0"))
    peer.publish(dev, signed_desired(1, key, model=candidate))
    peer.wait_state(dev, {"committed"})
    states = [t[1] for t in peer.transitions(dev)]
    assert states[3:] == ["self_testing", "shadowing", "activating", "watching", "committed"]
    assert agent.counters.shadow_records >= 5 and agent.shadow is None


# -------------------------------------------------------------------------------- conditions


def test_an_update_waits_until_the_vehicle_is_parked(
    broker: Mosquitto, server: ArtefactServer, peer: UpdatePeer, agents: list[Agent], tmp_path: Path
) -> None:
    dev = device()
    flag = tmp_path / "parked.flag"
    agent = start_agent(agents, agent_config(tmp_path, broker.url, dev, updates={"parked_flag_file": str(flag)}))
    bundle = make_bundle(tmp_path / "v2.tar", dev_key(), version="1.4.0")
    peer.publish(dev, signed_desired(1, dev_key(), model=serve(server, bundle)))
    report = peer.wait_state(dev, {"deferred"})
    assert report["update"]["reason"] == Reason.NOT_PARKED and report["update"]["result"] == "none"
    assert report["update"]["target"]["version"] == "1.4.0"
    flag.touch()
    peer.wait_state(dev, {"committed"})
    assert agent.engine is not None and agent.engine.model_version == "1.4.0"
    assert peer.transitions(dev)[:2] == [("idle", "deferred", "defer"), ("deferred", "downloading", "start")]


def test_a_newer_desired_state_supersedes_an_update_in_its_watch_period(
    broker: Mosquitto, server: ArtefactServer, peer: UpdatePeer, agents: list[Agent], tmp_path: Path
) -> None:
    dev = device()
    key: ReleaseKey = dev_key()
    agent = start_agent(agents, agent_config(tmp_path, broker.url, dev, updates={"watch_s": 30}))
    first = make_bundle(tmp_path / "a.tar", key, version="4.0.0")
    peer.publish(dev, signed_desired(1, key, model=serve(server, first)))
    peer.wait_state(dev, {"watching"})
    second = make_bundle(tmp_path / "b.tar", key, version="4.1.0")
    peer.publish(dev, signed_desired(2, key, model=serve(server, second)))
    wait_for(lambda: agent.engine is not None and agent.engine.model_version == "4.1.0", timeout=30, what="4.1.0")
    report = peer.wait_state(dev, {"watching", "committed"})
    assert report["update"]["target"]["version"] == "4.1.0" and report["update"]["serial"] == 2
    ends = [t for t in peer.transitions(dev) if t[1] in ("rolled_back", "committed")]
    assert ends[0] == ("rolling_back", "rolled_back", "rollback_done")
    history = json.loads((tmp_path / dev / "update" / "state.json").read_text())["history"]
    assert history[0]["reason"] == Reason.SUPERSEDED and history[0]["model"]["version"] == "4.0.0"
    assert report["previous"] == {"name": NAME, "version": VERSION}  # rolled back first, then 4.1.0 on top
