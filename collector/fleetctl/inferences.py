"""``fleetctl inferences``."""

from __future__ import annotations

import argparse
from typing import Any

from collector.fleetctl import Client, emit


def inferences_count(client: Client, args: argparse.Namespace) -> None:
    """How many inference records are stored for a device, model version and time range."""
    data = client.get(
        "/inferences/count",
        device_id=args.device_id,
        model_version=args.model_version,
        since=args.since,
        until=args.until,
    )
    emit(args, data, lambda d: str(d["count"]))


def register(groups: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``inferences`` commands."""
    inferences = groups.add_parser("inferences", help="inference records").add_subparsers(dest="cmd", required=True)
    p = inferences.add_parser("count", parents=[common], help="count stored records")
    p.add_argument("--device-id")
    p.add_argument("--model-version")
    p.add_argument("--since", help="ISO 8601 time or seconds since the epoch")
    p.add_argument("--until", help="ISO 8601 time or seconds since the epoch")
    p.set_defaults(func=inferences_count)
