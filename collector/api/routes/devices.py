"""``/api/v1/devices``: the fleet's vehicles, their desired state and why, device pins, retiring."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field

from collector import queries
from collector.api.deps import UNPROCESSABLE, CursorQuery, DesiredDep, LimitQuery, SessionDep, refused
from collector.api.routes.groups import PinIn, _pin_doc
from collector.api.routes.models import PinPublic
from collector.api.schemas import DevicePublic, Page
from collector.db.models import NAME_LEN
from collector.registry.errors import RegistryError

router = APIRouter(prefix="/devices", tags=["devices"])


class ResolvedModel(BaseModel):
    """A model version by name."""

    name: str
    version: str


class DesiredOut(BaseModel):
    """A device's desired state: what resolution chooses now, the layer that decided, and its publication."""

    model_config = ConfigDict(protected_namespaces=())

    device_id: str
    retired: bool
    model_line: str | None = Field(description="the model name the device reports: its production fallback")
    groups: list[str]
    source: str = Field(description="device_pin | rollout | group_pin | production | none | retired")
    model: ResolvedModel | None
    shadow: ResolvedModel | None
    rollout_id: str | None
    explanation: list[dict[str, Any]] = Field(description="every layer in precedence order and what it did")
    serial: int | None = Field(description="serial of the stored desired state (null: never had one)")
    published_serial: int | None = Field(description="the last serial the broker acknowledged")
    published_at: float | None
    pending: bool = Field(description="the stored state is not published yet")
    document: dict[str, Any] | None = Field(description="the stored message as published, without its signature")


class RetireIn(BaseModel):
    """Who retires the device."""

    model_config = ConfigDict(extra="forbid")

    by: str = Field("api", min_length=1, max_length=NAME_LEN)


@router.get("", response_model=Page[DevicePublic])
def list_devices(
    session: SessionDep,
    limit: LimitQuery = 100,
    cursor: CursorQuery = None,
    status_filter: Annotated[Literal["online", "offline", "stopped", "unknown"] | None, Query(alias="status")] = None,
    retired: Annotated[bool | None, Query(description="only retired (true) or only active (false) devices")] = None,
) -> Page[DevicePublic]:
    """Devices ordered by id."""
    try:
        rows, total, nxt = queries.list_devices(
            session, limit=limit, cursor=cursor, status=status_filter, retired=retired
        )
    except queries.BadCursor as exc:
        raise HTTPException(UNPROCESSABLE, str(exc)) from None
    return Page[DevicePublic](items=[DevicePublic.model_validate(r) for r in rows], total=total, next=nxt)


@router.get("/{device_id}", response_model=DevicePublic)
def get_device(device_id: str, session: SessionDep) -> DevicePublic:
    """One device."""
    device = queries.get_device(session, device_id=device_id)
    if device is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no device {device_id!r}")
    return DevicePublic.model_validate(device)


@router.get("/{device_id}/desired", response_model=DesiredOut)
def device_desired(device_id: str, desired: DesiredDep) -> DesiredOut:
    """The device's desired model as resolved now (device pin > rollout > group pin > production) and why."""
    try:
        return DesiredOut.model_validate(desired.explain(device_id=device_id))
    except RegistryError as exc:
        raise refused(exc) from None


@router.post("/{device_id}/retire", response_model=DesiredOut)
def retire_device(device_id: str, desired: DesiredDep, body: RetireIn | None = None) -> DesiredOut:
    """Retire a device: no more desired state; its retained desired, status and reported topics are emptied."""
    try:
        desired.retire(device_id=device_id, by=(body or RetireIn()).by)
        return DesiredOut.model_validate(desired.explain(device_id=device_id))
    except RegistryError as exc:
        raise refused(exc) from None


@router.put("/{device_id}/pin", response_model=PinPublic)
def pin_device(device_id: str, body: PinIn, desired: DesiredDep) -> PinPublic:
    """Pin one device to a version (candidate or production): above rollouts and group pins."""
    try:
        pin = desired.pin(
            scope="device",
            subject=device_id,
            name=body.model_name,
            version=body.model_version,
            by=body.by,
            note=body.note,
        )
    except RegistryError as exc:
        raise refused(exc) from None
    return PinPublic.model_validate(_pin_doc(pin))


@router.delete("/{device_id}/pin", status_code=204)
def unpin_device(device_id: str, desired: DesiredDep) -> Response:
    """Remove the device's pin (404 when it has none)."""
    try:
        removed = desired.unpin(scope="device", subject=device_id)
    except RegistryError as exc:
        raise refused(exc) from None
    if not removed:
        raise HTTPException(404, {"reason": "not_pinned", "message": f"device {device_id!r} has no pin"})
    return Response(status_code=204)
