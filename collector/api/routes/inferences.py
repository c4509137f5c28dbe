"""``/api/v1/inferences``: query and count stored inference records."""

from __future__ import annotations

import math

import numpy as np
from fastapi import APIRouter, HTTPException

from collector import queries
from collector.api.deps import UNPROCESSABLE, CursorQuery, LimitQuery, SessionDep, TimeRangeDep
from collector.api.schemas import Count, InferencePublic, Page
from collector.db.models import Inference

router = APIRouter(prefix="/inferences", tags=["inferences"])


def _floats(raw: bytes | None, dtype: str) -> list[float] | None:
    if raw is None:
        return None
    return [float(v) for v in np.frombuffer(raw, dtype=dtype)]


def to_public(row: Inference) -> InferencePublic:
    """Decode a stored record's arrays."""
    features = [None if math.isnan(v) else v for v in _floats(row.features, row.features_dtype) or []]
    return InferencePublic(
        device_id=row.device_id,
        spool_epoch=row.spool_epoch,
        seq=row.seq,
        role=row.role,
        model_name=row.model_name,
        model_version=row.model_version,
        ts=row.ts,
        ts_corrected=row.ts_corrected,
        received_at=row.received_at,
        pred=row.pred,
        label=row.label,
        confidence=row.confidence,
        calibrated=row.calibrated,
        probs=_floats(row.probs, "<f2") or [],
        features=features,
        act_bits=row.act_bits.hex(),
        act_sample=_floats(row.act_sample, "<f2"),
        coact=row.coact,
        latency_us=row.latency_us,
        sensor_flags=row.sensor_flags,
    )


@router.get("", response_model=Page[InferencePublic])
def list_inferences(
    session: SessionDep,
    window: TimeRangeDep,
    device_id: str | None = None,
    model_version: str | None = None,
    limit: LimitQuery = 100,
    cursor: CursorQuery = None,
) -> Page[InferencePublic]:
    """Records ordered by device time, filtered by device, model version and time."""
    try:
        rows, total, nxt = queries.list_inferences(
            session,
            limit=limit,
            cursor=cursor,
            device_id=device_id,
            model_version=model_version,
            since=window.since,
            until=window.until,
        )
    except queries.BadCursor as exc:
        raise HTTPException(UNPROCESSABLE, str(exc)) from None
    return Page[InferencePublic](items=[to_public(r) for r in rows], total=total, next=nxt)


@router.get("/count", response_model=Count)
def count_inferences(
    session: SessionDep, window: TimeRangeDep, device_id: str | None = None, model_version: str | None = None
) -> Count:
    """``{"count": N}`` of records matching the filters."""
    n = queries.count_inferences(
        session, device_id=device_id, model_version=model_version, since=window.since, until=window.until
    )
    return Count(count=n)
