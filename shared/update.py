"""Update states and events of the device updater (ARCHITECTURE §5) as a transition table."""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from pydantic import BaseModel, ConfigDict, Field


class State(StrEnum):
    """Where an update is."""

    IDLE = "idle"
    DEFERRED = "deferred"
    INCOMPATIBLE = "incompatible"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGING = "staging"
    SELF_TESTING = "self_testing"
    SHADOWING = "shadowing"
    ACTIVATING = "activating"
    WATCHING = "watching"
    COMMITTED = "committed"
    FAILURE = "failure"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


class Event(StrEnum):
    """What happened."""

    START = "start"
    DEFER = "defer"
    REJECT = "reject"  # incompatible hardware profile or agent version
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    STAGED = "staged"
    SELF_TEST_PASSED = "self_test_passed"
    SHADOW_START = "shadow_start"
    SHADOW_PASSED = "shadow_passed"
    ACTIVATED = "activated"
    WATCH_PASSED = "watch_passed"
    ERROR = "error"
    ROLLBACK_DONE = "rollback_done"
    ROLLBACK_FAILED = "rollback_failed"
    RESET = "reset"


class Result(StrEnum):
    """Outcome, reported separately from progress."""

    NONE = "none"
    SUCCESS = "success"
    FAILURE = "failure"


class InvalidTransition(ValueError):
    """An event that is not allowed in the current state."""


# States an update passes through while it is under way: each has an ERROR edge to FAILURE.
ACTIVE_STATES: Final = (
    State.DOWNLOADING,
    State.VERIFYING,
    State.STAGING,
    State.SELF_TESTING,
    State.SHADOWING,
    State.ACTIVATING,
    State.WATCHING,
)
TERMINAL_STATES: Final = (State.COMMITTED, State.ROLLED_BACK, State.FAILED, State.INCOMPATIBLE)

TRANSITIONS: Final[dict[tuple[State, Event], State]] = {
    (State.IDLE, Event.START): State.DOWNLOADING,
    (State.IDLE, Event.DEFER): State.DEFERRED,
    (State.IDLE, Event.REJECT): State.INCOMPATIBLE,
    (State.DEFERRED, Event.START): State.DOWNLOADING,
    (State.DEFERRED, Event.DEFER): State.DEFERRED,
    (State.DEFERRED, Event.REJECT): State.INCOMPATIBLE,
    (State.DOWNLOADING, Event.DOWNLOADED): State.VERIFYING,
    (State.VERIFYING, Event.VERIFIED): State.STAGING,
    (State.STAGING, Event.STAGED): State.SELF_TESTING,
    (State.SELF_TESTING, Event.SELF_TEST_PASSED): State.ACTIVATING,
    (State.SELF_TESTING, Event.SHADOW_START): State.SHADOWING,
    (State.SHADOWING, Event.SHADOW_PASSED): State.ACTIVATING,
    (State.ACTIVATING, Event.ACTIVATED): State.WATCHING,
    (State.WATCHING, Event.WATCH_PASSED): State.COMMITTED,
    (State.FAILURE, Event.START): State.ROLLING_BACK,
    (State.ROLLING_BACK, Event.ROLLBACK_DONE): State.ROLLED_BACK,
    (State.ROLLING_BACK, Event.ROLLBACK_FAILED): State.FAILED,
    **{(s, Event.ERROR): State.FAILURE for s in ACTIVE_STATES},
    **{(s, Event.RESET): State.IDLE for s in (*TERMINAL_STATES, State.DEFERRED)},
}

PROGRESS_STATES: Final = frozenset(ACTIVE_STATES) | {State.FAILURE, State.ROLLING_BACK}


def next_state(state: State, event: Event) -> State:
    """The state ``event`` leads to from ``state``; raise :class:`InvalidTransition` if none."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(f"event {event.value!r} is not allowed in state {state.value!r}") from None


def result_of(state: State) -> Result:
    """The outcome a state reports."""
    if state is State.COMMITTED:
        return Result.SUCCESS
    if state in (State.ROLLED_BACK, State.FAILED, State.INCOMPATIBLE):
        return Result.FAILURE
    return Result.NONE


class UpdateReport(BaseModel):
    """The update part of the retained ``reported`` message."""

    model_config = ConfigDict(extra="forbid")

    state: State = State.IDLE
    progress: float = Field(0.0, ge=0.0, le=1.0)
    result: Result = Result.NONE
    error: str | None = None
