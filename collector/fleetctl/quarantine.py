"""``fleetctl quarantine``."""

from __future__ import annotations

import argparse
from typing import Any

from collector.fleetctl import Client, emit, table, when


def quarantine_list(client: Client, args: argparse.Namespace) -> None:
    """Payloads the collector refused, newest first, with the reason."""
    data = client.items("/quarantine", args.limit, reason=args.reason, device_id=args.device_id)

    def render(d: dict[str, Any]) -> str:
        rows = [
            (x["id"], when(x["received_at"]), x.get("device_id"), x["reason"], x["payload_bytes"], x["detail"][:70])
            for x in d["items"]
        ]
        return f"{table(rows, ('ID', 'RECEIVED (UTC)', 'DEVICE', 'REASON', 'BYTES', 'DETAIL'))}\n{d['total']} entries"

    emit(args, data, render)


def quarantine_show(client: Client, args: argparse.Namespace) -> None:
    """One quarantined payload: reason, detail, topic and the first bytes of the payload."""
    data = client.get(f"/quarantine/{args.id}")
    emit(args, data, lambda d: "\n".join(f"{k:16} {v}" for k, v in d.items()))


def register(groups: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``quarantine`` commands."""
    quarantine = groups.add_parser("quarantine", help="refused payloads").add_subparsers(dest="cmd", required=True)
    p = quarantine.add_parser("list", parents=[common], help="list quarantined payloads")
    p.add_argument("--reason")
    p.add_argument("--device-id")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.set_defaults(func=quarantine_list)
    p = quarantine.add_parser("show", parents=[common], help="one quarantined payload")
    p.add_argument("id", type=int)
    p.set_defaults(func=quarantine_show)
