"""Update states and events of the device updater (ARCHITECTURE §5) as a transition table."""

from __future__ import annotations

from enum import StrEnum
from typing import Final, Literal

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
    INSTALL = "install"  # a local bundle (`edge-agent model install`): nothing to download
    DEFER = "defer"
    REJECT = "reject"  # incompatible hardware profile or agent version
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    STAGED = "staged"
    SELF_TEST_PASSED = "self_test_passed"
    SHADOW_START = "shadow_start"
    SHADOW_PASSED = "shadow_passed"
    SHADOW_END = "shadow_end"  # a shadow-only candidate is no longer wanted
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
    (State.IDLE, Event.INSTALL): State.VERIFYING,
    (State.DEFERRED, Event.INSTALL): State.VERIFYING,
    (State.DOWNLOADING, Event.DOWNLOADED): State.VERIFYING,
    (State.VERIFYING, Event.VERIFIED): State.STAGING,
    # Compatibility is declared in the manifest, which is only readable once the bundle is here.
    (State.VERIFYING, Event.REJECT): State.INCOMPATIBLE,
    (State.STAGING, Event.STAGED): State.SELF_TESTING,
    (State.SELF_TESTING, Event.SELF_TEST_PASSED): State.ACTIVATING,
    (State.SELF_TESTING, Event.SHADOW_START): State.SHADOWING,
    (State.SHADOWING, Event.SHADOW_PASSED): State.ACTIVATING,
    (State.SHADOWING, Event.SHADOW_END): State.IDLE,
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


class Reason(StrEnum):
    """Stable codes of why an update was deferred, rejected or rolled back (``UpdateReport.reason``).

    Bundle verification adds the codes of :class:`shared.bundle.BundleError` (``bad_manifest``,
    ``bad_archive``, ``missing_member``, ``bad_model``, ``bad_tensors``...), passed through as they are.
    """

    NOT_PARKED = "not_parked"
    NOT_ON_DEPOT_NETWORK = "not_on_depot_network"
    OUTSIDE_WINDOW = "outside_window"
    INCOMPATIBLE_PROFILE = "incompatible_profile"
    AGENT_TOO_OLD = "agent_too_old"
    DOWNLOAD_FAILED = "download_failed"
    HTTP_ERROR = "http_error"
    TRUNCATED_DOWNLOAD = "truncated_download"
    OVERSIZED_DOWNLOAD = "oversized_download"
    HASH_MISMATCH = "hash_mismatch"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_KEY = "unknown_key"
    ARTEFACT_MISMATCH = "artefact_mismatch"
    BUNDLE_NOT_FOUND = "bundle_not_found"
    STAGING_FAILED = "staging_failed"
    SELF_TEST_FAILED = "self_test_failed"
    SHADOW_FAILED = "shadow_failed"
    ACTIVATION_FAILED = "activation_failed"
    CRASH_LOOP = "crash_loop"
    NONFINITE_OUTPUT = "nonfinite_output"
    LATENCY_OVER_BOUND = "latency_over_bound"
    INFERENCE_ERRORS = "inference_errors"
    TOO_MANY_ATTEMPTS = "too_many_attempts"
    SUPERSEDED = "superseded"
    ROLLBACK_FAILED = "rollback_failed"
    INTERNAL_ERROR = "internal_error"


class ModelTarget(BaseModel):
    """The model an update installs (or runs in shadow): name, version and the bundle's SHA-256."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    sha256: str | None = None


class UpdateReport(BaseModel):
    """The update part of the retained ``reported`` message.

    ``state``/``progress`` say where the update is, ``result`` how the last one ended, separately.
    The optional fields name what is being installed and why it stopped; older readers ignore them.
    """

    model_config = ConfigDict(extra="forbid")

    state: State = State.IDLE
    progress: float = Field(0.0, ge=0.0, le=1.0)
    result: Result = Result.NONE
    error: str | None = None
    reason: str | None = Field(None, description="stable code (Reason or a BundleError reason)")
    serial: int | None = Field(None, description="serial of the desired state this update acts on")
    rollout_id: str | None = None
    slot: Literal["active", "shadow"] | None = Field(None, description="where the target goes")
    origin: Literal["desired", "local"] | None = Field(None, description="desired state or `model install`")
    target: ModelTarget | None = None
    attempt: int = Field(0, ge=0, description="unclean restarts in the current state")
    updated_at: float | None = None
