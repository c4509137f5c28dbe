"""The updater's parts on their own: the transition table, the resumable download against a real HTTP
server over a socket, update conditions and compatibility, and the persisted record."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import httpx
import pytest

from edge_agent.updater.conditions import (
    DepotNetwork,
    FixedParked,
    FlagFileParked,
    Parked,
    TimeWindow,
    compatibility,
    in_window,
    parse_window,
    version_key,
)
from edge_agent.updater.download import Downloader, DownloadError, DownloadSettings, Throttle
from edge_agent.updater.machine import Updater
from edge_agent.updater.store import StateLock, UpdateRecord, UpdateStore
from shared.update import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    Event,
    InvalidTransition,
    Reason,
    State,
    next_state,
)
from tests.edge_agent.update_rig import ArtefactServer, reference_bundle

# ------------------------------------------------------------------------------ the table


def test_every_active_state_has_a_failure_edge_and_unknown_transitions_raise() -> None:
    for state in ACTIVE_STATES:
        assert TRANSITIONS[(state, Event.ERROR)] is State.FAILURE
    assert TRANSITIONS[(State.FAILURE, Event.START)] is State.ROLLING_BACK
    assert {TRANSITIONS[(State.ROLLING_BACK, e)] for e in (Event.ROLLBACK_DONE, Event.ROLLBACK_FAILED)} == {
        State.ROLLED_BACK,
        State.FAILED,
    }
    allowed = set(TRANSITIONS)
    for state in State:
        for event in Event:
            if (state, event) in allowed:
                assert next_state(state, event) is TRANSITIONS[(state, event)]
            else:
                with pytest.raises(InvalidTransition, match=event.value):
                    next_state(state, event)
    # Terminal states only leave through RESET; nothing leaves a terminal state by accident.
    for state in TERMINAL_STATES:
        assert {e for (s, e) in allowed if s is state} == {Event.RESET}


def test_every_state_is_reachable_and_every_working_state_has_a_handler(tmp_path: Path) -> None:
    reachable = {State.IDLE}
    frontier = [State.IDLE]
    while frontier:
        state = frontier.pop()
        for (s, _e), target in TRANSITIONS.items():
            if s is state and target not in reachable:
                reachable.add(target)
                frontier.append(target)
    assert reachable == set(State)
    # The local install path skips downloading; incompatibility is known once the manifest is read.
    assert next_state(State.IDLE, Event.INSTALL) is State.VERIFYING
    assert next_state(State.VERIFYING, Event.REJECT) is State.INCOMPATIBLE
    handlers = Updater.__dict__
    for state in (*ACTIVE_STATES, State.FAILURE, State.ROLLING_BACK):
        verb = {
            State.DOWNLOADING: "download",
            State.VERIFYING: "verify",
            State.STAGING: "stage",
            State.SELF_TESTING: "self_test",
            State.SHADOWING: "shadow",
            State.ACTIVATING: "activate",
            State.WATCHING: "watch",
            State.FAILURE: "fail",
            State.ROLLING_BACK: "roll_back",
        }[state]
        assert callable(handlers[verb]) and handlers[verb].__doc__.startswith(state.value)


# ------------------------------------------------------------------------------ download


@pytest.fixture
def server() -> ArtefactServer:
    s = ArtefactServer()
    yield s
    s.close()


def fetch(server_url: str, tmp_path: Path, size: int, **settings: float) -> tuple[Path, Downloader]:
    with httpx.Client() as client:
        downloader = Downloader(
            client,
            DownloadSettings(timeout_s=5, retries=int(settings.pop("retries", 3)), backoff_s=0.01, **settings),
            stop=threading.Event(),
        )
        out = downloader.fetch(server_url, tmp_path / "a.part", tmp_path / "a.tar", size=size)
    return out, downloader


def test_an_interrupted_download_resumes_with_a_range_request(server: ArtefactServer, tmp_path: Path) -> None:
    data = Path(reference_bundle_path()).read_bytes()
    url = server.add("bundle.tar", data, cuts=[30_000])
    out, downloader = fetch(url, tmp_path, len(data))
    assert out.read_bytes() == data
    requests = server.requests_for("bundle.tar")
    assert [r["status"] for r in requests] == [200, 206]
    assert requests[0]["sent"] == 30_000
    assert requests[1]["range"] == "bytes=30000-"
    assert downloader.stats.resumed_from == [30_000]
    assert server.bytes_served("bundle.tar") <= 1.05 * len(data)
    assert not (tmp_path / "a.part").exists()


def test_a_part_file_left_by_a_previous_run_is_resumed(server: ArtefactServer, tmp_path: Path) -> None:
    data = Path(reference_bundle_path()).read_bytes()
    (tmp_path / "a.part").write_bytes(data[:12_345])
    url = server.add("bundle.tar", data)
    out, _ = fetch(url, tmp_path, len(data))
    assert out.read_bytes() == data
    assert [r["range"] for r in server.requests_for("bundle.tar")] == ["bytes=12345-"]
    assert server.bytes_served("bundle.tar") == len(data) - 12_345


def test_a_server_ignoring_range_restarts_the_file(server: ArtefactServer, tmp_path: Path) -> None:
    data = Path(reference_bundle_path()).read_bytes()
    (tmp_path / "a.part").write_bytes(b"x" * 5000)  # garbage: must not survive a 200 answer
    url = server.add("bundle.tar", data, honour_range=False)
    out, downloader = fetch(url, tmp_path, len(data))
    assert out.read_bytes() == data and downloader.stats.restarts == 1


def test_truncated_downloads_are_rejected_with_their_reason(server: ArtefactServer, tmp_path: Path) -> None:
    data = Path(reference_bundle_path()).read_bytes()
    # The server's copy is short but announces the full length: every response closes early.
    url = server.add("short.tar", data[:40_000], claimed=len(data))
    with pytest.raises(DownloadError) as err:
        fetch(url, tmp_path, len(data), retries=2)
    assert err.value.reason == Reason.TRUNCATED_DOWNLOAD
    # An honest but wrong length: the artefact is not the one the desired state describes.
    url = server.add("honest.tar", data[:40_000])
    with pytest.raises(DownloadError) as err:
        fetch(url, tmp_path / "2", len(data))
    assert err.value.reason == Reason.TRUNCATED_DOWNLOAD and "40000" in err.value.detail
    url = server.add("long.tar", data + b"tail")
    with pytest.raises(DownloadError) as err:
        fetch(url, tmp_path / "3", len(data))
    assert err.value.reason == Reason.OVERSIZED_DOWNLOAD
    with pytest.raises(DownloadError) as err:
        fetch(f"http://127.0.0.1:{server.port}/missing.tar", tmp_path / "4", len(data))
    assert err.value.reason == Reason.HTTP_ERROR and "404" in err.value.detail
    for url in ("ftp://127.0.0.1/x.tar", "http://[::1"):
        with pytest.raises(DownloadError) as err:
            fetch(url, tmp_path / "5", len(data))
        assert err.value.reason == Reason.DOWNLOAD_FAILED


def test_the_throttle_keeps_the_average_rate_under_the_cap() -> None:
    now = [100.0]
    throttle = Throttle(10_000, clock=lambda: now[0])
    assert throttle.delay(5_000) == pytest.approx(0.5)  # 5 kB at 10 kB/s: due at +0.5 s
    now[0] += 0.5
    assert throttle.delay(5_000) == pytest.approx(0.5)
    now[0] += 2.0  # a slow network: no wait owed
    assert throttle.delay(1_000) == 0.0
    assert Throttle(None).delay(10**9) == 0.0


def reference_bundle_path() -> Path:
    from edge_agent.config import DEFAULT_BUNDLE

    return DEFAULT_BUNDLE


# -------------------------------------------------------------------------- conditions


def test_time_windows_may_cross_midnight_and_bad_ones_are_refused() -> None:
    night = parse_window("22:00-05:30")
    assert in_window(dt.time(23, 0), night) and in_window(dt.time(5, 29), night)
    assert not in_window(dt.time(5, 30), night) and not in_window(dt.time(12, 0), night)
    day = parse_window("09:00-17:00")
    assert in_window(dt.time(9, 0), day) and not in_window(dt.time(17, 0), day)
    for bad in ("25:00-01:00", "9-17", "10:00-10:00"):
        with pytest.raises(ValueError):
            parse_window(bad)
    noon = TimeWindow(["22:00-05:30"], clock=lambda: dt.datetime(2026, 1, 1, 12, 0))
    blocked = noon.check()
    assert blocked is not None and blocked.reason == Reason.OUTSIDE_WINDOW
    assert TimeWindow(["11:00-13:00"], clock=lambda: dt.datetime(2026, 1, 1, 12, 0)).check() is None
    assert TimeWindow([]).check() is None


def test_parked_and_depot_network_conditions(tmp_path: Path) -> None:
    assert Parked(FixedParked(True)).check() is None
    moving = Parked(FixedParked(False)).check()
    assert moving is not None and moving.reason == Reason.NOT_PARKED
    flag = tmp_path / "parked"
    signal = Parked(FlagFileParked(flag))
    assert signal.check() is not None
    flag.touch()
    assert signal.check() is None
    # The route to the broker on this machine is the loopback address.
    depot = DepotNetwork(["127.0.0.0/8"], None, ("127.0.0.1", 1883))
    assert depot.check() is None
    away = DepotNetwork(["10.20.0.0/16"], None, ("127.0.0.1", 1883)).check()
    assert away is not None and away.reason == Reason.NOT_ON_DEPOT_NETWORK and "127.0.0.1" in away.detail
    depot_flag = tmp_path / "depot"
    by_flag = DepotNetwork([], depot_flag, ("127.0.0.1", 1883))
    assert by_flag.check() is not None
    depot_flag.touch()
    assert by_flag.check() is None
    assert DepotNetwork([], None, ("127.0.0.1", 1883)).check() is None


def test_compatibility_by_profile_and_agent_version() -> None:
    m = reference_bundle().manifest
    assert compatibility(m, profile="sim-v1", agent_version="0.1.0") is None  # "*" and 0.1.0
    only_pi5 = m.model_copy(update={"compatibility": m.compatibility.model_copy(update={"hardware_profiles": ["pi5"]})})
    blocked = compatibility(only_pi5, profile="sim-v1", agent_version="0.1.0")
    assert blocked is not None and blocked.reason == Reason.INCOMPATIBLE_PROFILE
    newer = m.model_copy(update={"compatibility": m.compatibility.model_copy(update={"min_agent_version": "0.10"})})
    blocked = compatibility(newer, profile="sim-v1", agent_version="0.9.3")
    assert blocked is not None and blocked.reason == Reason.AGENT_TOO_OLD
    assert compatibility(newer, profile="sim-v1", agent_version="0.10.0") is None
    assert version_key("1.2.0rc1") < version_key("1.2.0") == version_key("1.2") < version_key("1.10")


# ------------------------------------------------------------------------------ the record


def test_the_record_survives_a_corrupt_file_and_the_lock_is_exclusive(tmp_path: Path) -> None:
    store = UpdateStore(tmp_path / "update")
    store.ensure()
    record = UpdateRecord(state=State.WATCHING, attempt=1, serial=7)
    store.save(record)
    assert store.load().state is State.WATCHING and store.load().serial == 7
    store.path.write_text("{not json")
    assert store.load(repair=False).state is State.IDLE and store.path.exists()
    assert store.load().state is State.IDLE and not store.path.exists()  # kept aside, never fatal
    assert list((tmp_path / "update").glob("state.corrupt-*.json"))
    first, second = StateLock(tmp_path), StateLock(tmp_path)
    assert first.try_acquire() and not second.try_acquire()
    first.release()
    assert second.try_acquire()
    second.release()
