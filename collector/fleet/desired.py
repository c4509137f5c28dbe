"""Desired state: which model every device should run, and why, kept with a serial that grows on every change.

Resolution (:func:`resolve`, pure) takes the first layer that names an active model:

1. **device pin** (``fleetctl models pin NAME VERSION --device ID``): exactly that version, nothing else
   (a rollout's shadow is ignored too: a pinned device is left alone);
2. **rollout assignment** (the rollout controller, :meth:`DesiredStates.assign_rollout`): its active
   version, with its shadow and rollout id; an assignment with only a shadow adds the shadow to what the
   layers below choose;
3. **group pin**: the pin of the device's group with the highest priority (then the group name, in
   order), over every group the device belongs to (assigned or tagged); the others are reported as
   overridden;
4. **production**: the production-stage version of the device's model line (the model name the device
   reports);
5. otherwise **none**: ``model: null``, "keep what you run".

:class:`DesiredStates` stores the result per device in ``device_desired`` (the message without its
signature, the layer that decided and the explanation), bumps ``serial`` when the message content
changes, and is the service the API and the rollout controller drive. Every change of an input (pins,
stages, group members, assignments) recomputes in the same transaction, under the desired-state lock,
so serials never race; :class:`~collector.fleet.publisher.DesiredPublisher` publishes what changed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Connection, Engine

from collector import metrics
from collector.db.engine import write_transaction
from collector.db.models import DeviceDesired, ModelPin, ModelVersion, RolloutAssignment
from collector.fleet import repository as repo
from collector.fleet.groups import Groups, membership
from collector.registry import repository as registry_repo
from collector.registry.errors import RegistryError
from collector.registry.service import DEPLOYABLE, bundle_path
from shared.messages import Desired, DesiredArtefact
from shared.topics import valid_device_id

log = logging.getLogger(__name__)

SOURCES = ("device_pin", "rollout", "group_pin", "production", "none")
MAX_COHORT = 100_000


@dataclass(frozen=True)
class Target:
    """A model version by name."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class GroupPin:
    """A pin on one of the device's groups, with the group's priority."""

    group: str
    priority: int
    target: Target


@dataclass(frozen=True)
class RolloutTarget:
    """What a rollout assigns a device: an active version, a shadow, or both."""

    rollout_id: str
    model: Target | None
    shadow: Target | None


@dataclass(frozen=True)
class Resolution:
    """The outcome of :func:`resolve`: the active model, the shadow, the rollout, the deciding layer and why."""

    source: str
    model: Target | None
    shadow: Target | None = None
    rollout_id: str | None = None
    explanation: list[dict[str, Any]] = field(default_factory=list)


def resolve(
    *,
    device_pin: Target | None,
    rollout: RolloutTarget | None,
    group_pins: Sequence[GroupPin],
    production: Target | None,
    model_line: str | None,
) -> Resolution:
    """Apply the precedence device pin > rollout > group pin > production (module docstring)."""
    steps: list[dict[str, Any]] = []
    ordered = sorted(group_pins, key=lambda p: (-p.priority, p.group))

    def note(layer: str, outcome: str, target: Target | None = None, **extra: Any) -> None:
        steps.append({"layer": layer, "outcome": outcome, "model": None if target is None else str(target), **extra})

    if device_pin is not None:
        note("device_pin", "chosen", device_pin)
        if rollout is not None:
            note("rollout", "ignored: the device is pinned", rollout.model, rollout_id=rollout.rollout_id)
        for p in ordered:
            note("group_pin", "overridden by the device pin", p.target, group=p.group, priority=p.priority)
        return Resolution("device_pin", device_pin, explanation=steps)
    note("device_pin", "absent")

    shadow = rollout.shadow if rollout is not None else None
    rollout_id = rollout.rollout_id if rollout is not None else None
    if rollout is not None and rollout.model is not None:
        note("rollout", "chosen", rollout.model, rollout_id=rollout_id, shadow=None if shadow is None else str(shadow))
        for p in ordered:
            note("group_pin", "overridden by the rollout", p.target, group=p.group, priority=p.priority)
        return Resolution("rollout", rollout.model, shadow, rollout_id, steps)
    if rollout is not None:
        note("rollout", "shadow only", None, rollout_id=rollout_id, shadow=None if shadow is None else str(shadow))
    else:
        note("rollout", "absent")

    if ordered:
        first, rest = ordered[0], ordered[1:]
        note("group_pin", "chosen", first.target, group=first.group, priority=first.priority)
        for p in rest:
            outcome = "same version" if p.target == first.target else f"overridden by group {first.group}"
            note("group_pin", outcome, p.target, group=p.group, priority=p.priority)
        return Resolution("group_pin", first.target, shadow, rollout_id, steps)
    note("group_pin", "absent")

    if production is not None:
        note("production", "chosen", production, model_line=model_line)
        return Resolution("production", production, shadow, rollout_id, steps)
    note("production", "absent" if model_line else "unknown model line", None, model_line=model_line)
    return Resolution("none", None, shadow, rollout_id, steps)


def _target(name: str | None, version: str | None) -> Target | None:
    return Target(name, version) if name is not None and version is not None else None


@dataclass
class _Inputs:
    """Everything resolution reads, loaded once per recomputation."""

    pins: dict[tuple[str, str], ModelPin]
    priorities: dict[str, int]
    assignments: dict[str, RolloutAssignment]
    production: dict[str, ModelVersion]
    versions: dict[tuple[str, str], ModelVersion]

    @classmethod
    def load(cls, conn: Connection, device_ids: Sequence[str] | None) -> _Inputs:
        pins = {(p.scope, p.subject): p for p in repo.pins(conn)}
        assignments = repo.assignments(conn, device_ids=device_ids)
        keys = {(p.model_name, p.model_version) for p in pins.values()}
        for a in assignments.values():
            if a.model_name is not None and a.model_version is not None:
                keys.add((a.model_name, a.model_version))
            if a.shadow_name is not None and a.shadow_version is not None:
                keys.add((a.shadow_name, a.shadow_version))
        return cls(
            pins=pins,
            priorities={g.name: g.priority for g in repo.groups(conn)},
            assignments=assignments,
            production=registry_repo.production_versions(conn),
            versions=registry_repo.versions_named(conn, keys),
        )

    def deployable(self, target: Target | None) -> bool:
        v = None if target is None else self.versions.get((target.name, target.version))
        return v is not None and v.stage in DEPLOYABLE

    def resolve(self, device: repo.DeviceFacts, groups: set[str]) -> Resolution:
        pin = self.pins.get(("device", device.id))
        device_pin = _target(pin.model_name, pin.model_version) if pin else None
        a = self.assignments.get(device.id)
        rollout = (
            RolloutTarget(
                a.rollout_id, _target(a.model_name, a.model_version), _target(a.shadow_name, a.shadow_version)
            )
            if a is not None
            else None
        )
        group_pins = []
        for g in sorted(groups):
            p = self.pins.get(("group", g))
            if p is not None:
                group_pins.append(GroupPin(g, self.priorities.get(g, 0), Target(p.model_name, p.model_version)))
        prod = self.production.get(device.model_name) if device.model_name else None
        return resolve(
            device_pin=device_pin if self.deployable(device_pin) else None,
            rollout=rollout,
            group_pins=[p for p in group_pins if self.deployable(p.target)],
            production=None if prod is None else Target(prod.name, prod.version),
            model_line=device.model_name,
        )

    def artefact(self, target: Target | None, base_url: str) -> DesiredArtefact | None:
        if target is None:
            return None
        v = self.versions.get((target.name, target.version))
        if v is None:
            v = self.production.get(target.name)
            assert v is not None and v.version == target.version
        return DesiredArtefact(
            name=v.name, version=v.version, sha256=v.sha256, size=v.size, url=base_url + bundle_path(v.name, v.version)
        )


def content_of(document: dict[str, Any]) -> dict[str, Any]:
    """What a change is judged on: the message without serial, time and signature."""
    return {k: v for k, v in document.items() if k not in ("serial", "issued_at", "signature")}


Notify = Callable[[], None]


class DesiredStates:
    """Resolve, store and explain every device's desired state; pins and rollout assignments.

    ``notify`` is called after a commit that changed some device's desired state (the publisher's wake-up).
    """

    def __init__(self, engine: Engine, *, base_url: str, notify: Notify | None = None) -> None:
        self.engine = engine
        self.base_url = base_url.rstrip("/")
        self.notify = notify
        self.groups = Groups(engine, on_change=self.on_change)

    # ------------------------------------------------------------------------ recomputation

    def on_change(self, conn: Connection) -> None:
        """Hook for other services' transactions: recompute every device (the publisher is woken after commit)."""
        self.recompute(conn)

    def _wake(self) -> None:
        if self.notify is not None:
            self.notify()

    def recompute(
        self, conn: Connection, *, device_ids: Sequence[str] | None = None, now: float | None = None
    ) -> list[str]:
        """Resolve the devices (all, or ``device_ids``) on ``conn`` and store what changed; return those device ids.

        Call inside a transaction holding the desired-state lock (:func:`write_transaction` with
        ``desired_lock``). Retired devices are left alone.
        """
        rows, changed = self._plan(conn, device_ids, time.time() if now is None else now)
        repo.put_desired(conn, rows=rows)
        if changed:
            log.info("desired state changed for %d device(s)", len(changed))
        return changed

    def _plan(
        self, conn: Connection, device_ids: Sequence[str] | None, at: float
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """The desired rows to write (new serials, or a new explanation only) and the devices whose state changed."""
        devices = [d for d in repo.device_facts(conn, device_ids=device_ids) if d.retired_at is None]
        if not devices:
            return [], []
        ids = None if device_ids is None else [d.id for d in devices]
        inputs = _Inputs.load(conn, ids)
        groups_of = membership(conn, devices=devices).groups_of()
        stored = repo.desired_rows(conn, device_ids=ids)
        rows, changed = [], []
        for device in devices:
            res = inputs.resolve(device, groups_of.get(device.id, set()))
            old = stored.get(device.id)
            document = Desired(
                serial=0,
                issued_at=at,
                model=inputs.artefact(res.model, self.base_url),
                shadow=inputs.artefact(res.shadow, self.base_url),
                rollout_id=res.rollout_id,
            ).model_dump(mode="json", exclude={"signature"})
            if old is None and document["model"] is None and document["shadow"] is None:
                continue  # never told anything: nothing to publish yet
            if old is not None and not old.clear and content_of(old.document) == content_of(document):
                if old.source != res.source or old.explanation != res.explanation:
                    rows.append(self._row(device.id, old.document, res, at, old.serial))
                continue
            serial = 1 if old is None else old.serial + 1
            document.update(serial=serial)
            rows.append(self._row(device.id, document, res, at, serial))
            changed.append(device.id)
        return rows, changed

    @staticmethod
    def _row(device_id: str, document: dict[str, Any], res: Resolution, at: float, serial: int) -> dict[str, Any]:
        return {
            "device_id": device_id,
            "serial": serial,
            "document": document,
            "source": res.source,
            "explanation": res.explanation,
            "clear": False,
            "updated_at": at,
        }

    def reconcile(self, *, now: float | None = None) -> list[str]:
        """Recompute every device (tags reported in status, new devices); return the devices that changed.

        Resolution runs first on a read-only connection; only when something is to be written does it run
        again in a write transaction (so the periodic pass takes no write lock while nothing changes).
        """
        at = time.time() if now is None else now
        with self.engine.connect() as conn:
            rows, _ = self._plan(conn, None, at)
        if not rows:
            return []
        with write_transaction(self.engine, desired_lock=True) as conn:
            changed = self.recompute(conn, now=at)
        if changed:
            self._wake()
        return changed

    def _changing(self, work: Callable[[Connection], Any], device_ids: Sequence[str] | None = None) -> Any:
        with write_transaction(self.engine, desired_lock=True) as conn:
            result = work(conn)
            changed = self.recompute(conn, device_ids=device_ids)
        if changed:
            self._wake()
        return result

    # ----------------------------------------------------------------------------------- pins

    def pin(self, *, scope: str, subject: str, name: str, version: str, by: str, note: str | None = None) -> ModelPin:
        """Pin ``subject`` (a device id or group name, by ``scope``) to a deployable version; replaces its pin."""
        self._check_subject(scope, subject)

        def work(conn: Connection) -> ModelPin:
            found = registry_repo.get_version(conn, name=name, version=version)
            if found is None:
                raise RegistryError("not_found", f"no model {name} version {version}", "not_found")
            if found.stage not in DEPLOYABLE:
                raise RegistryError(
                    "not_deployable", f"{name} {version} is {found.stage}: it cannot be pinned", "conflict"
                )
            if scope == "group" and not self.groups.exists(conn, subject):
                raise RegistryError(
                    "not_found", f"no group {subject!r} (create it, or tag devices group:{subject})", "not_found"
                )
            values: dict[str, Any] = {
                "scope": scope,
                "subject": subject,
                "model_name": name,
                "model_version": version,
                "pinned_at": time.time(),
                "pinned_by": by,
                "note": note,
            }
            repo.put_pin(conn, values=values)
            return ModelPin(**values)

        pin: ModelPin = self._changing(work, [subject] if scope == "device" else None)
        log.info("pinned %s %s to %s %s by %s", scope, subject, name, version, by)
        return pin

    def unpin(self, *, scope: str, subject: str) -> bool:
        """Remove the pin of a device or group; False when there was none."""
        self._check_subject(scope, subject)
        removed: bool = self._changing(
            lambda conn: repo.delete_pin(conn, scope=scope, subject=subject), [subject] if scope == "device" else None
        )
        return removed

    def pins(self) -> list[ModelPin]:
        """Every pin."""
        with self.engine.connect() as conn:
            return repo.pins(conn)

    @staticmethod
    def _check_subject(scope: str, subject: str) -> None:
        if scope not in ("device", "group"):
            raise RegistryError("bad_scope", f"scope must be device or group, not {scope!r}")
        if not valid_device_id(subject):
            raise RegistryError("bad_subject", f"{subject!r} is not a valid {scope} name")

    # ----------------------------------------------------------------------------- rollouts

    def assign_rollout(
        self,
        *,
        rollout_id: str,
        device_ids: Sequence[str],
        model: Target | None,
        shadow: Target | None = None,
        now: float | None = None,
    ) -> list[str]:
        """Give a cohort of devices a rollout's active version and/or shadow (replacing their assignments).

        Returns the devices whose desired state changed. Versions must be deployable (candidate or production).
        """
        if model is None and shadow is None:
            raise RegistryError("bad_request", "a rollout assignment needs a model, a shadow or both")
        if not 1 <= len(rollout_id) <= 64:
            raise RegistryError("bad_request", "rollout_id must be 1-64 characters")
        if len(device_ids) > MAX_COHORT:
            raise RegistryError("too_many_devices", f"at most {MAX_COHORT} devices per assignment", "too_large")
        bad = [d for d in device_ids if not valid_device_id(d)]
        if bad:
            raise RegistryError("bad_device_id", f"not device ids: {', '.join(map(repr, bad[:5]))}")
        at = time.time() if now is None else now

        def work(conn: Connection) -> None:
            for target in (model, shadow):
                if target is not None:
                    found = registry_repo.get_version(conn, name=target.name, version=target.version)
                    if found is None or found.stage not in DEPLOYABLE:
                        state = "missing" if found is None else found.stage
                        raise RegistryError(
                            "not_deployable", f"{target} is {state}: it cannot be rolled out", "conflict"
                        )
            rows = [
                {
                    "device_id": d,
                    "rollout_id": rollout_id,
                    "model_name": None if model is None else model.name,
                    "model_version": None if model is None else model.version,
                    "shadow_name": None if shadow is None else shadow.name,
                    "shadow_version": None if shadow is None else shadow.version,
                    "assigned_at": at,
                }
                for d in sorted(set(device_ids))
            ]
            repo.put_assignments(conn, rows=rows)

        with write_transaction(self.engine, desired_lock=True) as conn:
            work(conn)
            changed = self.recompute(conn, device_ids=list(device_ids), now=at)
        if changed:
            self._wake()
        return changed

    def clear_rollout(self, *, rollout_id: str, device_ids: Sequence[str] | None = None) -> list[str]:
        """Drop a rollout's assignments (of ``device_ids`` only, when given); return the devices that changed."""
        with write_transaction(self.engine, desired_lock=True) as conn:
            affected = (
                [a.device_id for a in repo.assignments(conn).values() if a.rollout_id == rollout_id]
                if device_ids is None
                else list(device_ids)
            )
            repo.delete_assignments(conn, rollout_id=rollout_id, device_ids=device_ids)
            changed = self.recompute(conn, device_ids=affected) if affected else []
        if changed:
            self._wake()
        return changed

    # ----------------------------------------------------------------------------- devices

    def retire(self, *, device_id: str, by: str, now: float | None = None) -> DeviceDesired:
        """Retire a device: never again given a desired state, its retained topics cleared by the publisher."""
        at = time.time() if now is None else now
        with write_transaction(self.engine, desired_lock=True) as conn:
            if not repo.device_exists(conn, device_id=device_id):
                raise RegistryError("not_found", f"no device {device_id!r}", "not_found")
            newly = repo.retire_device(conn, device_id=device_id, at=at, by=by)
            old = repo.desired_rows(conn, device_ids=[device_id]).get(device_id)
            row = {
                "device_id": device_id,
                "serial": 1 if old is None else old.serial + (1 if newly or not old.clear else 0),
                "document": {},
                "source": "retired",
                "explanation": [{"layer": "retired", "outcome": f"retired by {by}", "model": None}],
                "clear": True,
                "updated_at": at,
            }
            repo.put_desired(conn, rows=[row])
            stored = repo.desired_rows(conn, device_ids=[device_id])[device_id]
        if newly:
            metrics.DEVICES_RETIRED.inc()
            log.info("device %s retired by %s", device_id, by)
        self._wake()
        return stored

    def explain(self, *, device_id: str) -> dict[str, Any]:
        """The device's desired state as resolved now, why, and how far its publication got."""
        with self.engine.connect() as conn:
            facts = repo.device_facts(conn, device_ids=[device_id])
            row = repo.desired_rows(conn, device_ids=[device_id]).get(device_id)
            if not facts and row is None:
                raise RegistryError("not_found", f"no device {device_id!r}", "not_found")
            device = facts[0] if facts else repo.DeviceFacts(device_id, None, (), None)
            groups = sorted(membership(conn).groups_of().get(device_id, set()))
            inputs = _Inputs.load(conn, [device_id])
        retired = device.retired_at is not None
        res = None if retired else inputs.resolve(device, set(groups))
        return {
            "device_id": device_id,
            "retired": retired,
            "model_line": device.model_name,
            "groups": groups,
            "source": "retired" if res is None else res.source,
            "model": None
            if res is None or res.model is None
            else {"name": res.model.name, "version": res.model.version},
            "shadow": None
            if res is None or res.shadow is None
            else {"name": res.shadow.name, "version": res.shadow.version},
            "rollout_id": None if res is None else res.rollout_id,
            "explanation": [{"layer": "retired", "outcome": "retired", "model": None}]
            if res is None
            else res.explanation,
            "serial": None if row is None else row.serial,
            "published_serial": None if row is None else row.published_serial,
            "published_at": None if row is None else row.published_at,
            "pending": row is not None and (row.published_serial is None or row.published_serial < row.serial),
            "document": None if row is None or row.clear else row.document,
        }
