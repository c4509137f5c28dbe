"""``fleetctl groups``: list, create and show device groups, assign devices to them.

A device is in a group when it was assigned (``groups assign``) or when its status carries the tag
``group:<name>``; both kinds show up here, and group pins (``fleetctl models pin ... --group``) apply to both.
"""

from __future__ import annotations

import argparse
from typing import Any

from collector.fleetctl import Client, emit, login, table, when


def _render_group(d: dict[str, Any]) -> str:
    pin = d.get("pin")
    lines = [
        f"group {d['name']}" + ("" if d["created"] else " (named by device tags only)"),
        f"description  {d['description'] or '-'}",
        f"priority     {d['priority']}",
        f"created      {when(d['created_at'])} by {d['created_by'] or '-'}" if d["created"] else "",
        f"pinned to    {pin['model_name']} {pin['model_version']}" if pin else "pinned to    -",
        f"members      {d['n_members']} ({d['n_explicit']} assigned, {d['n_tagged']} tagged)",
    ]
    if "added" in d:
        lines.append(f"this change  {d['added']} added, {d['removed']} removed")
    for m in d.get("members", []):
        how = " and ".join(k for k in ("assigned", "tagged") if m["explicit" if k == "assigned" else "tagged"])
        lines.append(f"  {m['device_id']:24} {how}")
    return "\n".join(line for line in lines if line)


def groups_list(client: Client, args: argparse.Namespace) -> None:
    """Every group with its member counts and pin."""
    data = client.items("/groups", args.limit)

    def render(d: dict[str, Any]) -> str:
        rows = [
            (
                x["name"],
                "yes" if x["created"] else "tags",
                x["priority"],
                x["n_members"],
                x["n_explicit"],
                x["n_tagged"],
                f"{x['pin']['model_name']}@{x['pin']['model_version']}" if x["pin"] else "-",
                x["description"][:40],
            )
            for x in d["items"]
        ]
        header = ("GROUP", "CREATED", "PRIORITY", "MEMBERS", "ASSIGNED", "TAGGED", "PIN", "DESCRIPTION")
        return f"{table(rows, header)}\n{d['total']} groups"

    emit(args, data, render)


def groups_create(client: Client, args: argparse.Namespace) -> None:
    """Create a group."""
    body = {"name": args.name, "description": args.description, "priority": args.priority, "by": args.by or login()}
    emit(args, client.post("/groups", body), _render_group)


def groups_show(client: Client, args: argparse.Namespace) -> None:
    """One group with its members."""
    emit(args, client.get(f"/groups/{args.name}"), _render_group)


def groups_assign(client: Client, args: argparse.Namespace) -> None:
    """Assign devices to a group (and remove others with --remove)."""
    body = {"add": args.devices, "remove": args.remove or [], "by": args.by or login()}
    emit(args, client.post(f"/groups/{args.name}/members", body), _render_group)


def register(groups: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``groups`` commands."""
    g = groups.add_parser("groups", help="device groups").add_subparsers(dest="cmd", required=True)
    p = g.add_parser("list", parents=[common], help="list groups (created and tag-named)")
    p.add_argument("--limit", type=int, default=None, help="at most this many (default all)")
    p.set_defaults(func=groups_list)
    p = g.add_parser("create", parents=[common], help="create a group")
    p.add_argument("name")
    p.add_argument("--description", default="")
    p.add_argument("--priority", type=int, default=0, help="the higher wins when two groups' pins disagree")
    p.add_argument("--by", help="who (default: the login name)")
    p.set_defaults(func=groups_create)
    p = g.add_parser("show", parents=[common], help="one group with its members")
    p.add_argument("name")
    p.set_defaults(func=groups_show)
    p = g.add_parser("assign", parents=[common], help="assign devices to a group")
    p.add_argument("name", help="the group")
    p.add_argument("devices", nargs="*", help="device ids to add")
    p.add_argument("--remove", nargs="+", metavar="DEVICE", help="device ids to remove from the group")
    p.add_argument("--by", help="who (default: the login name)")
    p.set_defaults(func=groups_assign)
