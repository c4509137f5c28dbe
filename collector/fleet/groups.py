"""Device groups: one notion, whether a device was assigned (API, fleetctl) or reports a ``group:<name>`` tag.

A device is a member of group ``G`` when it was assigned to ``G`` explicitly or its last ``status``
carried the tag ``group:G``; a retired device is a member of no group. A group exists when it was
created (``fleetctl groups create``: a description and a priority, the order in which two groups'
pins are applied) or when some device's tag names it. :func:`members_of` is what monitoring scopes,
alerts and desired-state resolution all use.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from collector.db.engine import write_transaction
from collector.fleet import repository as repo
from collector.registry.errors import RegistryError
from shared.topics import valid_device_id

GROUP_TAG = "group:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
MAX_ASSIGN = 10_000


def check_group_name(name: str) -> str:
    """``name`` if usable as a group name (as a device id: 1-64 of letters, digits, ``_.-``)."""
    if not _NAME.match(name):
        raise RegistryError(
            "bad_group_name",
            f"group name {name!r} must be 1-64 letters, digits, '_', '.', '-', starting with a letter or digit",
        )
    return name


def tag_groups(tags: Iterable[str]) -> set[str]:
    """The groups named by ``group:<name>`` tags."""
    return {t[len(GROUP_TAG) :] for t in tags if t.startswith(GROUP_TAG) and len(t) > len(GROUP_TAG)}


@dataclass
class Membership:
    """Who is in which group, and how: ``explicit[g]`` and ``tagged[g]`` are sets of device ids."""

    explicit: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    tagged: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    def members(self, group: str) -> set[str]:
        """Every member of ``group``."""
        return self.explicit.get(group, set()) | self.tagged.get(group, set())

    def groups_of(self) -> dict[str, set[str]]:
        """Device id -> its groups."""
        out: dict[str, set[str]] = defaultdict(set)
        for source in (self.explicit, self.tagged):
            for group, devices in source.items():
                for device in devices:
                    out[device].add(group)
        return out

    def names(self) -> set[str]:
        """Groups that have members."""
        return {g for g, d in self.explicit.items() if d} | {g for g, d in self.tagged.items() if d}


def membership(conn: Connection, *, devices: Sequence[repo.DeviceFacts] | None = None) -> Membership:
    """Explicit and tag memberships of every non-retired device (of ``devices`` when given)."""
    facts = repo.device_facts(conn) if devices is None else devices
    retired = {d.id for d in facts if d.retired_at is not None}
    known = {d.id for d in facts}
    out = Membership()
    for d in facts:
        if d.retired_at is None:
            for g in tag_groups(d.tags):
                out.tagged[g].add(d.id)
    for group, device in repo.memberships(conn):
        # Assigned before the device was first heard of: still a member (it is not retired).
        if device not in retired and (devices is None or device in known):
            out.explicit[group].add(device)
    return out


def members_of(conn: Connection, group: str) -> list[str]:
    """The members of ``group``, sorted (empty for an unknown group)."""
    return sorted(membership(conn).members(group))


@dataclass(frozen=True)
class GroupInfo:
    """A group as the API shows it."""

    name: str
    created: bool
    description: str
    priority: int
    created_at: float | None
    created_by: str | None
    explicit_members: list[str]
    tagged_members: list[str]
    pin: dict[str, Any] | None

    @property
    def members(self) -> list[str]:
        """Every member, sorted."""
        return sorted(set(self.explicit_members) | set(self.tagged_members))

    def to_dict(self, *, with_members: bool) -> dict[str, Any]:
        """The API shape (members listed only with ``with_members``)."""
        doc: dict[str, Any] = {
            "name": self.name,
            "created": self.created,
            "description": self.description,
            "priority": self.priority,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "n_members": len(self.members),
            "n_explicit": len(self.explicit_members),
            "n_tagged": len(self.tagged_members),
            "pin": self.pin,
        }
        if with_members:
            doc["members"] = [
                {
                    "device_id": d,
                    "explicit": d in self.explicit_members,
                    "tagged": d in self.tagged_members,
                }
                for d in self.members
            ]
        return doc


OnChange = Callable[[Connection], None]


class Groups:
    """Create, list and show groups; assign devices to them."""

    def __init__(self, engine: Engine, *, on_change: OnChange | None = None) -> None:
        self.engine = engine
        self.on_change = on_change

    def _infos(self, conn: Connection) -> dict[str, GroupInfo]:
        m = membership(conn)
        created = {g.name: g for g in repo.groups(conn)}
        pins = {p.subject: p for p in repo.pins(conn) if p.scope == "group"}
        out = {}
        for name in sorted(set(created) | m.names()):
            g = created.get(name)
            pin = pins.get(name)
            out[name] = GroupInfo(
                name=name,
                created=g is not None,
                description=g.description if g else "",
                priority=g.priority if g else 0,
                created_at=g.created_at if g else None,
                created_by=g.created_by if g else None,
                explicit_members=sorted(m.explicit.get(name, set())),
                tagged_members=sorted(m.tagged.get(name, set())),
                pin=None if pin is None else {"model_name": pin.model_name, "model_version": pin.model_version},
            )
        return out

    def list(self) -> list[GroupInfo]:
        """Every group (created or named by tags), by name."""
        with self.engine.connect() as conn:
            return list(self._infos(conn).values())

    def get(self, *, name: str) -> GroupInfo:
        """One group with its members (``not_found`` when neither created nor named by a tag)."""
        with self.engine.connect() as conn:
            info = self._infos(conn).get(name)
        if info is None:
            raise RegistryError("not_found", f"no group {name!r} (create it, or tag devices group:{name})", "not_found")
        return info

    def exists(self, conn: Connection, name: str) -> bool:
        """Whether the group was created or is named by some device's tag."""
        return repo.get_group(conn, name=name) is not None or name in membership(conn).names()

    def create(
        self, *, name: str, description: str = "", priority: int = 0, by: str, now: float | None = None
    ) -> GroupInfo:
        """Create a group (``group_exists`` if it was created before; a tag-only group becomes a created one)."""
        check_group_name(name)
        values = {
            "name": name,
            "description": description,
            "priority": priority,
            "created_at": time.time() if now is None else now,
            "created_by": by,
        }
        try:
            with write_transaction(self.engine, desired_lock=True) as conn:
                repo.insert_group(conn, values=values)
                if self.on_change is not None:
                    self.on_change(conn)  # the group's priority may decide between pins
        except sa_exc.IntegrityError:
            raise RegistryError("group_exists", f"group {name!r} exists already", "conflict") from None
        return self.get(name=name)

    def assign(
        self,
        *,
        name: str,
        add: Sequence[str] = (),
        remove: Sequence[str] = (),
        by: str,
        now: float | None = None,
    ) -> tuple[GroupInfo, int, int]:
        """Assign devices to the group and remove others: ``(group, added, removed)``.

        The group must have been created; devices need not have been heard of yet (they join when they
        appear). Removing a device that is a member through its tag alone changes nothing: tags come
        from the device.
        """
        check_group_name(name)
        if len(add) + len(remove) > MAX_ASSIGN:
            raise RegistryError("too_many_devices", f"at most {MAX_ASSIGN} devices per request", "too_large")
        bad = [d for d in [*add, *remove] if not valid_device_id(d)]
        if bad:
            raise RegistryError("bad_device_id", f"not device ids: {', '.join(map(repr, bad[:5]))}")
        both = set(add) & set(remove)
        if both:
            raise RegistryError("bad_request", f"devices both added and removed: {', '.join(sorted(both)[:5])}")
        at = time.time() if now is None else now
        with write_transaction(self.engine, desired_lock=True) as conn:
            if repo.get_group(conn, name=name) is None:
                raise RegistryError(
                    "not_found", f"no group {name!r}: create it first (fleetctl groups create)", "not_found"
                )
            added = repo.add_members(conn, group=name, device_ids=list(add), at=at, by=by)
            removed = repo.remove_members(conn, group=name, device_ids=list(remove))
            if (added or removed) and self.on_change is not None:
                self.on_change(conn)
        return self.get(name=name), added, removed
