"""``/api/v1/drift``: drift, label-free accuracy and data quality of any scope and time range.

The answer is :meth:`collector.monitoring.service.ScopeStatus.to_dict` (one scope) or a page of
them (``by=device``: one per device, drift decided with Benjamini-Hochberg across the devices
jointly; ``by=window``: one per window). The response models below document every field; they
mirror the service's dataclasses one to one, so nothing the service computes is dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from collector.api.deps import UNPROCESSABLE, CursorQuery, TimeRangeDep
from collector.monitoring.service import MonitoringService, Scope, ScopeStatus

router = APIRouter(prefix="/drift", tags=["drift"])

MAX_ITEMS = 500


def get_monitoring(request: Request) -> MonitoringService:
    """The monitoring service the app created at start."""
    service: MonitoringService = request.app.state.monitoring
    return service


MonitoringDep = Annotated[MonitoringService, Depends(get_monitoring)]


# ------------------------------------------------------------------------------ response shapes


class _Out(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


class TestResultOut(_Out):
    """One statistical test: statistic, p-value, BH q-value, threshold and verdict."""

    name: str
    statistic: float | None = Field(description="KS D, chi-square, mean shift or U/(n m), by test")
    p_value: float | None
    threshold: float = Field(description="level the q-value (or p-value) is compared with")
    verdict: Literal["drift", "ok", "not_enough_data"]
    n_reference: int
    n_current: int
    q_value: float | None = Field(None, description="Benjamini-Hochberg adjusted p-value within the family")
    effect: float | None = Field(
        None, description="effect size the verdict also needed, where the test has a floor (class mix: total variation)"
    )
    design_effect: float = Field(
        1.0, description="variance inflation for autocorrelated current records, (1 + rho) / (1 - rho); 1: independent"
    )


class FeatureDriftOut(_Out):
    """Every statistic of one input feature against its reference histogram."""

    name: str
    n_reference: int
    n_current: int
    n_effective: float | None = Field(
        description="current records discounted for their lag-1 autocorrelation: the sample size the tests use"
    )
    psi: float | None = Field(description="population stability index")
    psi_bias: float | None = Field(
        description="PSI that sampling alone gives, (B - 1)(1 / n_effective + 1 / n_reference); the score subtracts it"
    )
    hellinger: float | None
    kl: float | None = Field(description="KL(current || reference), nats")
    jensen_shannon: float | None = Field(description="base 2, in [0, 1]")
    ks: TestResultOut = Field(description="KS from binned CDFs")
    severity: Literal["none", "moderate", "major"] = Field(description="score below psi_minor / psi_major / above")
    verdict: Literal["drift", "ok", "not_enough_data"] = Field(
        description="drift: KS q <= fdr_q and score >= psi_minor; not_enough_data below the minimum (effective) size"
    )
    score: float | None = Field(description="the feature's drift score: PSI minus its sampling bias, at least 0")


class DriftReportOut(_Out):
    """Feature and model-signal tests of a merged window and the overall drift verdict."""

    features: list[FeatureDriftOut]
    class_mix: TestResultOut
    confidence: TestResultOut
    pca_error: TestResultOut
    coactivation: TestResultOut
    n_tested: int
    n_drifting: int
    drift_share: float
    max_psi: float | None
    verdict: Literal["drift", "ok", "not_enough_data"]
    reasons: list[str]
    thresholds: dict[str, Any]


class AccuracyEstimateOut(_Out):
    """An accuracy with its interval (null bounds: not enough data)."""

    n: int
    estimate: float | None
    low: float | None
    high: float | None
    method: Literal["exact", "normal", "wilson", "not_enough_data"]
    level: float


class RegionOut(_Out):
    """Whether the inputs stay in the region the calibration was fitted on."""

    verdict: Literal["reliable", "unreliable", "not_enough_data"]
    reliable: bool
    reason: str | None
    pca_rate: float | None = Field(description="share of records above the reference p99 of PCA error")
    pca_pvalue: float | None
    coact_rate: float | None = Field(description="share of records above the reference p99 of rare co-activations")
    coact_pvalue: float | None


class GapOut(_Out):
    """Realized minus estimated accuracy on the same labelled records."""

    model_version: str
    n: int
    estimated: float | None
    realized: float | None
    gap: float | None
    stderr: float | None
    low: float | None
    high: float | None
    calibration_pvalue: float | None
    level: float


class AccuracyOut(_Out):
    """Label-free expected accuracy, its reliability, and realized accuracy where labels exist."""

    expected: AccuracyEstimateOut
    region: RegionOut
    reliable: bool
    realized: AccuracyEstimateOut | None
    realized_source: str | None = Field(description="inline_labels (labels sent with the records) or labels")
    gap: GapOut | None
    unreliable_reasons: list[str] = Field(
        default_factory=list, description="why reliable is false: the region test's reason, or wholesale input drift"
    )


class QualityCheckOut(_Out):
    """One data-quality check."""

    name: str
    value: float | None
    threshold: float
    verdict: Literal["ok", "bad", "not_enough_data"]
    features: list[str] = Field(description="features failing the check")
    detail: str


class DataQualityOut(_Out):
    """Data-quality checks, their verdict and the per-feature counters."""

    verdict: Literal["ok", "bad", "not_enough_data"]
    n: int
    problems: list[str]
    checks: list[QualityCheckOut]
    features: list[dict[str, Any]] = Field(
        description="per feature: missing, missing_rate, out_of_range, stuck, repeat_rate, should_vary, mean, std"
    )
    sensor_flags: dict[str, Any] = Field(description="flagged_records, rate, bits (count per set bit)")
    clock: dict[str, Any] = Field(description="device clock offset and delivery delay, seconds")
    seq: dict[str, Any] = Field(description="seqs missing between received records: missing, gaps, rate")


class ModelStatusOut(_Out):
    """One model version within the scope."""

    model_name: str
    model_version: str
    n_records: int
    n_windows: int
    n_devices: int
    first_window: float | None
    last_window_end: float | None
    has_reference: bool = Field(description="false: no verified bundle in the catalog, so no verdict (see warnings)")
    verdict: Literal["drift", "ok", "not_enough_data", "no_reference"]
    reasons: list[str]
    warnings: list[str]
    drift: DriftReportOut | None
    accuracy: AccuracyOut | None
    data_quality: DataQualityOut | None
    unreadable_windows: int


class ScopeOut(_Out):
    """The scope as asked."""

    device_ids: list[str] | None
    group: str | None
    model_name: str | None
    model_version: str | None
    role: str | None
    since: float | None
    until: float | None


class DriftStatus(_Out):
    """Drift, label-free accuracy and data quality of a scope, per model version, with every threshold."""

    scope: ScopeOut
    devices: list[str] | None = Field(description="devices of the scope; null: every device")
    window_s: float
    verdict: Literal["drift", "ok", "not_enough_data", "no_reference"]
    reasons: list[str] = Field(description="why the verdict is drift")
    warnings: list[str] = Field(description="unreliable estimates, data-quality problems, versions without reference")
    n_records: int
    n_windows: int
    models: list[ModelStatusOut]
    thresholds: dict[str, Any]


class DriftPage(_Out):
    """``by=device`` or ``by=window``: one status per device or window."""

    items: list[DriftStatus]
    total: int
    next: str | None


# ------------------------------------------------------------------------------------- route


def _scope(
    window: TimeRangeDep,
    device_id: Annotated[list[str] | None, Query(description="device id; repeat for several")] = None,
    group: Annotated[str | None, Query(description="members of the group: assigned, or tagged group:<group>")] = None,
    model_name: str | None = None,
    model_version: str | None = None,
    role: Annotated[Literal["active", "shadow", "any"], Query(description="records of this role")] = "active",
) -> Scope:
    if group is not None and not group.strip():
        raise HTTPException(UNPROCESSABLE, "group must not be empty")
    if device_id is not None and any(not d.strip() for d in device_id):
        raise HTTPException(UNPROCESSABLE, "device_id must not be empty")
    if window.since is not None and window.until is not None and window.until == window.since:
        raise HTTPException(UNPROCESSABLE, "until must be after since")
    return Scope(
        device_ids=None if device_id is None else tuple(device_id),
        group=group,
        model_name=model_name,
        model_version=model_version,
        role=None if role == "any" else role,
        since=window.since,
        until=window.until,
    )


ScopeDep = Annotated[Scope, Depends(_scope)]


def _page(statuses: list[tuple[str, ScopeStatus]], cursor: str | None, limit: int) -> dict[str, Any]:
    keys = [k for k, _ in statuses]
    start = 0
    if cursor is not None:
        if cursor not in keys:
            raise HTTPException(UNPROCESSABLE, f"cursor {cursor!r} is not an item of this answer")
        start = keys.index(cursor)
    chunk = statuses[start : start + limit]
    nxt = keys[start + limit] if start + limit < len(keys) else None
    return {"items": [s.to_dict() for _, s in chunk], "total": len(statuses), "next": nxt}


@router.get(
    "",
    response_model=DriftStatus | DriftPage,
    responses={422: {"description": "bad parameter (detail says which)"}},
)
def drift_status(
    monitoring: MonitoringDep,
    scope: ScopeDep,
    by: Annotated[
        Literal["none", "device", "window"],
        Query(description="none: one status for the scope; device/window: a page of statuses, one per device/window"),
    ] = "none",
    limit: Annotated[int, Query(ge=1, le=MAX_ITEMS, description="page size for by=device|window")] = 100,
    cursor: CursorQuery = None,
) -> dict[str, Any]:
    """Every drift statistic, its threshold and verdict, expected accuracy and data quality for a scope.

    The scope: devices (``device_id``, repeatable, and/or ``group``), ``model_name``, ``model_version``,
    ``role`` and windows whose start lies in ``[since, until)`` (ISO 8601 or seconds since the epoch,
    collector-corrected time). ``by=device`` decides drift with Benjamini-Hochberg across all the
    devices of the scope jointly (not just the page).
    """
    if by == "none":
        if cursor is not None:
            raise HTTPException(UNPROCESSABLE, "cursor only applies to by=device or by=window")
        return monitoring.status(scope).to_dict()
    if by == "device":
        per_device = monitoring.evaluate_devices(scope)
        return _page(list(per_device.items()), cursor, limit)
    per_window = monitoring.evaluate_windows(scope)
    return _page([(repr(start), s) for start, s in per_window.items()], cursor, limit)
