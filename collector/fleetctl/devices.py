"""``fleetctl devices``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from collector.fleetctl import Client, emit, login, table, when


def devices_list(client: Client, args: argparse.Namespace) -> None:
    """List devices with their status, model and stored record count."""
    retired = {"retired": "true", "active": "false"}.get(args.retired or "")
    data = client.items("/devices", args.limit, status=args.status, retired=retired)

    def render(d: dict[str, Any]) -> str:
        rows = [
            (
                x["id"],
                "retired" if x.get("retired_at") else x["status"],
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


def _render_desired(d: dict[str, Any]) -> str:
    def ref(m: dict[str, Any] | None) -> str:
        return f"{m['name']} {m['version']}" if m else "-"

    lines = [
        f"device       {d['device_id']}" + ("  (retired)" if d["retired"] else ""),
        f"model line   {d['model_line'] or '-'}",
        f"groups       {', '.join(d['groups']) or '-'}",
        f"desired      {ref(d['model'])}  (from {d['source']})",
        f"shadow       {ref(d['shadow'])}",
        f"rollout      {d['rollout_id'] or '-'}",
        f"serial       {d['serial'] if d['serial'] is not None else '-'}"
        f" (published {d['published_serial'] if d['published_serial'] is not None else '-'}"
        f"{', pending' if d['pending'] else ''})",
        "why",
    ]
    for step in d["explanation"]:
        extra = ", ".join(
            f"{k} {v}" for k, v in step.items() if k not in ("layer", "outcome", "model") and v is not None
        )
        model = f" {step['model']}" if step.get("model") else ""
        lines.append(f"  {step['layer']:11} {step['outcome']}{model}" + (f" ({extra})" if extra else ""))
    return "\n".join(lines)


def devices_desired(client: Client, args: argparse.Namespace) -> None:
    """The model a device should run, the layer that decided it and why, and whether it is published."""
    emit(args, client.get(f"/devices/{args.device_id}/desired"), _render_desired)


def devices_retire(client: Client, args: argparse.Namespace) -> None:
    """Retire a device: no desired state any more, its retained topics are cleared."""
    emit(args, client.post(f"/devices/{args.device_id}/retire", {"by": args.by or login()}), _render_desired)


def register(groups: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``devices`` commands."""
    devices = groups.add_parser("devices", help="vehicles").add_subparsers(dest="cmd", required=True)
    p = devices.add_parser("list", parents=[common], help="list devices")
    p.add_argument("--status", choices=("online", "offline", "stopped", "unknown"))
    p.add_argument("--retired", choices=("retired", "active"), help="only retired or only active devices")
    p.add_argument("--limit", type=int, default=None, help="at most this many (default all)")
    p.set_defaults(func=devices_list)
    p = devices.add_parser("show", parents=[common], help="one device")
    p.add_argument("device_id")
    p.set_defaults(func=devices_show)
    p = devices.add_parser("desired", parents=[common], help="the model a device should run, and why")
    p.add_argument("device_id")
    p.set_defaults(func=devices_desired)
    p = devices.add_parser("retire", parents=[common], help="retire a device (clears its retained topics)")
    p.add_argument("device_id")
    p.add_argument("--by", help="who (default: the login name)")
    p.set_defaults(func=devices_retire)
