"""``/api/v1/labels``: push late labels, list them, and realized accuracy beside the label-free estimate.

A push is read with a size cap before it is parsed (a label is about 100 bytes of JSON; 10,000 of them
fit well inside :data:`MAX_BODY_BYTES`), then every item is checked on its own: a bad item is rejected
with its position and reason and the good ones are stored (``collector.labels.push_labels``).
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from collector import labels, metrics, queries
from collector.api.deps import UNPROCESSABLE, CursorQuery, LimitQuery, SessionDep, TimeRangeDep
from collector.api.schemas import Page
from collector.db.models import NAME_LEN
from collector.monitoring.service import MonitoringService, resolve_devices

log = logging.getLogger(__name__)

router = APIRouter(prefix="/labels", tags=["labels"])

MAX_BODY_BYTES = 8 * 1024 * 1024


class LabelIn(BaseModel):
    """One late label: the record's key and its true class, as an index or a class name."""

    device_id: str
    spool_epoch: str
    seq: int = Field(ge=0)
    label: int | str = Field(description="class index into the model's label list, or the class name")


# The push body, for the documentation only: the route parses it itself, item by item.
PUSH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["items"],
    "properties": {
        "items": {"type": "array", "maxItems": labels.MAX_ITEMS, "items": LabelIn.model_json_schema()},
        "source": {
            "type": "string",
            "minLength": 1,
            "maxLength": NAME_LEN,
            "default": "api",
            "description": "where the labels came from (fleetctl sends the file name)",
        },
    },
}


class RejectedLabel(BaseModel):
    """An item of a push that was not stored."""

    index: int = Field(description="position of the item in the push")
    code: str = Field(description=f"one of {', '.join(labels.REJECT_CODES)}")
    reason: str


class PushOut(BaseModel):
    """What a push stored: ``accepted = inserted + replaced``; ``matched``: accepted labels whose record is stored."""

    accepted: int
    inserted: int
    replaced: int
    matched: int
    rejected: list[RejectedLabel]


class LabelPublic(BaseModel):
    """A stored label with its record's model and prediction (null until the record arrives)."""

    model_config = ConfigDict(protected_namespaces=())

    device_id: str
    spool_epoch: str
    seq: int
    label: int
    received_at: float
    source: str
    matched: bool
    model_name: str | None
    model_version: str | None
    pred: int | None


class Interval(BaseModel):
    """An accuracy with its interval (null bounds below the minimum sample size)."""

    estimate: float | None
    low: float | None
    high: float | None
    method: str


class Gap(BaseModel):
    """Realized minus expected accuracy on the same labelled records."""

    gap: float | None
    low: float | None
    high: float | None
    stderr: float | None
    calibration_pvalue: float | None = Field(description="two-sided test that the model is still calibrated")


class AccuracyOut(BaseModel):
    """Realized accuracy of one model version from late labels, the label-free estimate and their gap."""

    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str
    n_labelled: int
    n_correct: int
    level: float
    realized: Interval = Field(description="accuracy on the labels, Wilson interval")
    expected: Interval = Field(description="label-free estimate (mean calibrated confidence), same records")
    gap: Gap


def _class_names(request: Request) -> labels.ClassNames:
    """Class names of the verified bundles of the catalog the app loaded at start (its monitoring service's)."""
    monitoring: MonitoringService = request.app.state.monitoring
    return labels.ClassNames.from_catalog(monitoring.catalog)


def _refuse(code: int, reason: str, detail: str) -> HTTPException:
    metrics.LABELS_PUSHES_REJECTED.labels(reason).inc()
    return HTTPException(code, detail)


async def _read_body(request: Request) -> bytes:
    """The request body, refused with 413 as soon as it passes the cap (before anything is parsed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _refuse(413, "body_too_large", f"body of {int(declared)} bytes is over the {MAX_BODY_BYTES}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _refuse(413, "body_too_large", f"body is over the {MAX_BODY_BYTES}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_push(body: bytes) -> tuple[list[Any], str]:
    """The items and source of a push body; the whole push is refused only when its envelope is wrong."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise _refuse(UNPROCESSABLE, "bad_body", f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
        raise _refuse(UNPROCESSABLE, "bad_body", 'body must be an object with a list "items"')
    items: list[Any] = doc["items"]
    if len(items) > labels.MAX_ITEMS:
        raise _refuse(
            413, "too_many_items", f"{len(items)} items: at most {labels.MAX_ITEMS} per push, send the rest in chunks"
        )
    source = doc.get("source", "api")
    problem = labels.text_problem(source, NAME_LEN)
    if problem:
        raise _refuse(UNPROCESSABLE, "bad_body", f"source {problem}")
    return items, source


def _store(engine: Engine, items: list[Any], classes: labels.ClassNames, source: str) -> labels.PushResult:
    with engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
        return labels.push_labels(conn, items, classes, source=source)


@router.post(
    "",
    response_model=PushOut,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PUSH_SCHEMA}},
        }
    },
)
async def push_labels(request: Request) -> PushOut:
    """Store late labels (a label pushed again replaces the earlier one); bad items are rejected one by one."""
    items, source = _parse_push(await _read_body(request))
    metrics.LABELS_RECEIVED.inc(len(items))
    classes = _class_names(request)
    result = await run_in_threadpool(_store, request.app.state.engine, items, classes, source)
    metrics.LABELS_STORED.labels("inserted").inc(result.inserted)
    metrics.LABELS_STORED.labels("replaced").inc(result.replaced)
    for rejection in result.rejected:
        metrics.LABELS_REJECTED.labels(rejection.code).inc()
    if result.rejected:
        first = result.rejected[0]
        log.info(
            "labels from %s: %d accepted, %d rejected (first: item %d, %s)",
            source,
            result.accepted,
            len(result.rejected),
            first.index,
            first.reason,
        )
    return PushOut.model_validate(result.to_dict())


@router.get("", response_model=Page[LabelPublic])
def list_labels(
    session: SessionDep,
    device_id: str | None = None,
    spool_epoch: str | None = None,
    limit: LimitQuery = 100,
    cursor: CursorQuery = None,
) -> Page[LabelPublic]:
    """Stored labels ordered by record key, with the record's model and prediction once it has arrived."""
    try:
        rows, total, nxt = labels.list_labels(
            session, limit=limit, cursor=cursor, device_id=device_id, spool_epoch=spool_epoch
        )
    except queries.BadCursor as exc:
        raise HTTPException(UNPROCESSABLE, str(exc)) from None
    return Page[LabelPublic](items=[LabelPublic.model_validate(r) for r in rows], total=total, next=nxt)


@router.get("/accuracy", response_model=Page[AccuracyOut])
def accuracy(
    session: SessionDep,
    window: TimeRangeDep,
    model_name: str | None = None,
    model_version: str | None = None,
    device_id: str | None = None,
    group: Annotated[str | None, Query(description="members of the group: assigned, or tagged group:<group>")] = None,
    role: Annotated[str, Query(description="active or shadow")] = "active",
    level: Annotated[float, Query(gt=0.5, lt=1.0, description="confidence level of the intervals")] = 0.95,
) -> Page[AccuracyOut]:
    """Per model version: realized accuracy on late labels, the label-free estimate on the same records, the gap.

    Records are selected by device (id and/or group: its members, assigned or tagged ``group:<group>``) and by their
    corrected time (``since`` inclusive, ``until`` exclusive); an unknown group selects no record.
    """
    devices = resolve_devices(session, device_ids=None if device_id is None else [device_id], group=group)
    stats = labels.label_stats(
        session,
        device_ids=devices,
        model_name=model_name,
        model_version=model_version,
        role=role,
        since=window.since,
        until=window.until,
    )
    items = [
        AccuracyOut.model_validate(labels.compare_accuracy(name, version, s, level=level).to_dict())
        for (name, version), s in sorted(stats.items())
    ]
    return Page[AccuracyOut](items=items, total=len(items), next=None)
