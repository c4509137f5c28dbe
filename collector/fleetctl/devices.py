"""``fleetctl devices``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from collector.fleetctl import Client, emit, table, when


def devices_list(client: Client, args: argparse.Namespace) -> None:
    """List devices with their status, model and stored record count."""
    data = client.items("/devices", args.limit, status=args.status)

    def render(d: dict[str, Any]) -> str:
        rows = [
            (
                x["id"],
                x["status"],
                f"{x.get('model_name') or '-'}@{x.get('model_version') or '-'}",
                x.get("profile"),
                x.get("records"),
                x.get("spool_depth"),
                when(x.get("last_seen")),
            )
            for x in d["items"]
        ]
        text = table(rows, ("DEVICE", "STATUS", "MODEL", "PROFILE", "RECORDS", "SPOOL", "LAST SEEN (UTC)"))
        return f"{text}\n{d['total']} devices"

    emit(args, data, render)


def devices_show(client: Client, args: argparse.Namespace) -> None:
    """Everything the collector knows about one device."""
    data = client.get(f"/devices/{args.device_id}")

    def render(d: dict[str, Any]) -> str:
        return "\n".join(f"{k:16} {json.dumps(v) if isinstance(v, dict | list) else v}" for k, v in d.items())

    emit(args, data, render)


def register(groups: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``devices`` commands."""
    devices = groups.add_parser("devices", help="vehicles").add_subparsers(dest="cmd", required=True)
    p = devices.add_parser("list", parents=[common], help="list devices")
    p.add_argument("--status", choices=("online", "offline", "stopped", "unknown"))
    p.add_argument("--limit", type=int, default=None, help="at most this many (default all)")
    p.set_defaults(func=devices_list)
    p = devices.add_parser("show", parents=[common], help="one device")
    p.add_argument("device_id")
    p.set_defaults(func=devices_show)
