"""Topic scheme and the update transition table."""

from __future__ import annotations

import pytest

from shared import topics
from shared.update import ACTIVE_STATES, TRANSITIONS, Event, InvalidTransition, Result, State, next_state, result_of


def test_topic_round_trip() -> None:
    t = topics.topic("veh-0001", topics.Kind.TELEMETRY)
    assert t == "fleet/v1/veh-0001/telemetry"
    assert topics.parse(t) == ("veh-0001", topics.Kind.TELEMETRY)
    assert topics.subscription("telemetry", shared=True) == "$share/collectors/fleet/v1/+/telemetry"


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "x" * 65, "-lead"])
def test_bad_device_ids(bad: str) -> None:
    with pytest.raises(topics.TopicError):
        topics.topic(bad, "status")


@pytest.mark.parametrize("bad", ["fleet/v1/a", "fleet/v2/a/status", "fleet/v1/a/nope", "x/v1/a/status"])
def test_bad_topics(bad: str) -> None:
    with pytest.raises(topics.TopicError):
        topics.parse(bad)


def test_happy_path_and_failure_edges() -> None:
    state = State.IDLE
    path = [
        Event.START,
        Event.DOWNLOADED,
        Event.VERIFIED,
        Event.STAGED,
        Event.SHADOW_START,
        Event.SHADOW_PASSED,
        Event.ACTIVATED,
        Event.WATCH_PASSED,
    ]
    for event in path:
        state = next_state(state, event)
    assert state is State.COMMITTED and result_of(state) is Result.SUCCESS
    for s in ACTIVE_STATES:
        assert TRANSITIONS[(s, Event.ERROR)] is State.FAILURE
    assert next_state(next_state(State.FAILURE, Event.START), Event.ROLLBACK_DONE) is State.ROLLED_BACK
    with pytest.raises(InvalidTransition):
        next_state(State.IDLE, Event.ACTIVATED)
