"""``fleetctl alerts``: what is firing, and acknowledging it."""

from __future__ import annotations

import argparse
import json
from typing import Any

from collector.fleetctl import Client, emit, login, table, when


def alerts_list(client: Client, args: argparse.Namespace) -> None:
    """Alerts newest first: state, severity, kind, subject, model and what was seen."""
    data = client.items(
        "/alerts",
        args.limit,
        state=args.state,
        kind=args.kind,
        scope=args.scope,
        device_id=args.device_id,
        model_version=args.model_version,
        since=args.since,
    )

    def render(d: dict[str, Any]) -> str:
        rows = [
            (
                x["id"],
                x["state"],
                x["severity"],
                x["kind"],
                x["subject"] if x["scope"] == "device" else f"{x['scope']} {x['subject']}",
                f"{x.get('model_name') or '-'}@{x.get('model_version') or '-'}",
                when(x["fired_at"]),
                x["message"][:80],
            )
            for x in d["items"]
        ]
        header = ("ID", "STATE", "SEVERITY", "KIND", "SUBJECT", "MODEL", "FIRED (UTC)", "MESSAGE")
        return f"{table(rows, header)}\n{d['total']} alerts"

    emit(args, data, render)


def _render_alert(d: dict[str, Any]) -> str:
    lines = [f"{k:14} {v}" for k, v in d.items() if k != "details"]
    lines.append("details")
    lines.extend("  " + line for line in json.dumps(d["details"], indent=2, sort_keys=True).splitlines())
    return "\n".join(lines)


def alerts_show(client: Client, args: argparse.Namespace) -> None:
    """One alert with the statistics, thresholds and verdict behind it."""
    emit(args, client.get(f"/alerts/{args.id}"), _render_alert)


def alerts_ack(client: Client, args: argparse.Namespace) -> None:
    """Acknowledge an alert: someone is on it (it resolves by itself once the condition clears)."""
    data = client.post(f"/alerts/{args.id}/ack", {"by": args.by or login(), "note": args.note})
    emit(args, data, lambda d: f"alert {d['id']} {d['state']} by {d['acked_by']} at {when(d['acked_at'])}")


def register(groups: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``alerts`` commands."""
    alerts = groups.add_parser("alerts", help="drift, accuracy and data-quality alerts").add_subparsers(
        dest="cmd", required=True
    )
    p = alerts.add_parser("list", parents=[common], help="list alerts, newest first")
    p.add_argument("--state", choices=("open", "firing", "acknowledged", "resolved"))
    p.add_argument("--kind", help="e.g. input_drift, estimated_accuracy, stuck_sensor")
    p.add_argument("--scope", choices=("device", "group", "model"), help="model: a model version fleet-wide")
    p.add_argument("--device-id")
    p.add_argument("--model-version")
    p.add_argument("--since", help="fired at or after (ISO 8601 or seconds since the epoch)")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    p.set_defaults(func=alerts_list)
    p = alerts.add_parser("show", parents=[common], help="one alert with its statistics")
    p.add_argument("id", type=int)
    p.set_defaults(func=alerts_show)
    p = alerts.add_parser("ack", parents=[common], help="acknowledge an alert")
    p.add_argument("id", type=int)
    p.add_argument("--by", help="who acknowledges (default: the login name)")
    p.add_argument("--note", help="why, or what is being done")
    p.set_defaults(func=alerts_ack)
