"""``/api/v1/groups``: device groups (created, or named by ``group:<name>`` tags), members and group pins."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, ConfigDict, Field

from collector.api.deps import UNPROCESSABLE, CursorQuery, DesiredDep, LimitQuery, refused
from collector.api.routes.models import PinPublic
from collector.api.schemas import Page
from collector.db.models import NAME_LEN
from collector.fleet.groups import MAX_ASSIGN
from collector.queries import BadCursor, decode_cursor, encode_cursor
from collector.registry.errors import RegistryError

router = APIRouter(prefix="/groups", tags=["groups"])


class GroupPin(BaseModel):
    """The version a group is pinned to."""

    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str


class GroupPublic(BaseModel):
    """A group: created explicitly (``created``) or only named by devices' tags."""

    name: str
    created: bool
    description: str
    priority: int = Field(description="when two of a device's groups are pinned, the higher priority wins")
    created_at: float | None
    created_by: str | None
    n_members: int
    n_explicit: int = Field(description="members assigned through the API or fleetctl")
    n_tagged: int = Field(description="members whose status carries the tag group:<name>")
    pin: GroupPin | None


class Member(BaseModel):
    """A member and how it belongs (both may hold)."""

    device_id: str
    explicit: bool
    tagged: bool


class GroupDetail(GroupPublic):
    """A group with its members."""

    members: list[Member]


class GroupIn(BaseModel):
    """A new group."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    description: str = Field("", max_length=4000)
    priority: int = Field(0, ge=-1000, le=1000)
    by: str = Field("api", min_length=1, max_length=NAME_LEN)


class MembersIn(BaseModel):
    """Devices to assign to the group and to remove from it."""

    model_config = ConfigDict(extra="forbid")

    add: list[str] = Field(default_factory=list, max_length=MAX_ASSIGN)
    remove: list[str] = Field(default_factory=list, max_length=MAX_ASSIGN)
    by: str = Field("api", min_length=1, max_length=NAME_LEN)


class MembersOut(GroupDetail):
    """The group after an assignment, and what changed."""

    added: int
    removed: int


class PinIn(BaseModel):
    """A version to pin."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name: str = Field(min_length=1, max_length=NAME_LEN)
    model_version: str = Field(min_length=1, max_length=NAME_LEN)
    by: str = Field("api", min_length=1, max_length=NAME_LEN)
    note: str | None = Field(None, max_length=4000)


@router.get("", response_model=Page[GroupPublic])
def list_groups(desired: DesiredDep, limit: LimitQuery = 100, cursor: CursorQuery = None) -> Page[GroupPublic]:
    """Every group by name, with member counts and pin."""
    infos = desired.groups.list()
    if cursor is not None:
        try:
            (after,) = decode_cursor(cursor, (str,))
        except BadCursor as exc:
            raise HTTPException(UNPROCESSABLE, str(exc)) from None
        page = [g for g in infos if g.name > after]
    else:
        page = infos
    nxt = encode_cursor([page[limit - 1].name]) if len(page) > limit else None
    return Page[GroupPublic](
        items=[GroupPublic.model_validate(g.to_dict(with_members=False)) for g in page[:limit]],
        total=len(infos),
        next=nxt,
    )


@router.post("", response_model=GroupDetail, status_code=201)
def create_group(body: GroupIn, desired: DesiredDep) -> GroupDetail:
    """Create a group (409 when it exists)."""
    try:
        info = desired.groups.create(name=body.name, description=body.description, priority=body.priority, by=body.by)
    except RegistryError as exc:
        raise refused(exc) from None
    return GroupDetail.model_validate(info.to_dict(with_members=True))


@router.get("/{name}", response_model=GroupDetail)
def show_group(name: str, desired: DesiredDep) -> GroupDetail:
    """One group with its members."""
    try:
        info = desired.groups.get(name=name)
    except RegistryError as exc:
        raise refused(exc) from None
    return GroupDetail.model_validate(info.to_dict(with_members=True))


@router.post("/{name}/members", response_model=MembersOut)
def assign_members(name: str, body: MembersIn, desired: DesiredDep) -> MembersOut:
    """Assign devices to a created group and remove others; desired states follow at once."""
    try:
        info, added, removed = desired.groups.assign(name=name, add=body.add, remove=body.remove, by=body.by)
    except RegistryError as exc:
        raise refused(exc) from None
    return MembersOut.model_validate({**info.to_dict(with_members=True), "added": added, "removed": removed})


def _pin_doc(pin: Any) -> dict[str, Any]:
    return {
        "scope": pin.scope,
        "subject": pin.subject,
        "model_name": pin.model_name,
        "model_version": pin.model_version,
        "pinned_at": pin.pinned_at,
        "pinned_by": pin.pinned_by,
        "note": pin.note,
    }


@router.put("/{name}/pin", response_model=PinPublic)
def pin_group(name: str, body: PinIn, desired: DesiredDep) -> PinPublic:
    """Pin the group's devices to a version (candidate or production), below device pins and rollouts."""
    try:
        pin = desired.pin(
            scope="group", subject=name, name=body.model_name, version=body.model_version, by=body.by, note=body.note
        )
    except RegistryError as exc:
        raise refused(exc) from None
    return PinPublic.model_validate(_pin_doc(pin))


@router.delete("/{name}/pin", status_code=204)
def unpin_group(name: str, desired: DesiredDep) -> Response:
    """Remove the group's pin (404 when it has none)."""
    try:
        removed = desired.unpin(scope="group", subject=name)
    except RegistryError as exc:
        raise refused(exc) from None
    if not removed:
        raise HTTPException(404, {"reason": "not_pinned", "message": f"group {name!r} has no pin"})
    return Response(status_code=204)
