"""``fleetctl``: the operator's command line, a thin client of the collector's HTTP API.

Every command takes ``--json`` and then prints exactly what the API returned, so scripts can rely
on the API's shapes (ARCHITECTURE §7). The API is found at ``FLEET_API_URL`` (default
``http://127.0.0.1:8000``) and authenticated with ``FLEET_API_TOKEN`` when the collector has one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

log = logging.getLogger("fleetctl")

DEFAULT_API_URL = "http://127.0.0.1:8000"


class ApiError(RuntimeError):
    """The API answered with an error status or could not be reached."""


class Client:
    """A small synchronous client of ``/api/v1``."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=f"{self.base_url}/api/v1", headers=headers, timeout=timeout)

    def get(self, path: str, **params: Any) -> Any:
        """GET ``path`` with the non-empty ``params``; return the decoded JSON body."""
        clean = {k: v for k, v in params.items() if v is not None}
        try:
            response = self._http.get(path, params=clean)
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach the collector at {self.base_url}: {exc}") from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ApiError(f"{response.status_code} from GET {path}: {detail}")
        return response.json()

    def items(self, path: str, limit: int | None, **params: Any) -> dict[str, Any]:
        """All items of a list endpoint, following ``next`` cursors until ``limit`` items are collected."""
        collected: list[Any] = []
        page: dict[str, Any] = {}
        cursor = None
        while True:
            want = 500 if limit is None else min(500, limit - len(collected))
            page = self.get(path, limit=want, cursor=cursor, **params)
            collected.extend(page["items"])
            cursor = page.get("next")
            if cursor is None or (limit is not None and len(collected) >= limit):
                break
        return {"items": collected, "total": page.get("total", len(collected)), "next": cursor}


def _when(value: float | str | None) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, str):
        return value.replace("T", " ")[:19]
    return datetime.fromtimestamp(float(value), UTC).strftime("%Y-%m-%d %H:%M:%S")


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header], *[["-" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _emit(args: argparse.Namespace, data: Any, render: Callable[[Any], str]) -> None:
    sys.stdout.write((json.dumps(data, indent=2, sort_keys=True) if args.json else render(data)) + "\n")


# ------------------------------------------------------------------------------------ commands


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
                _when(x.get("last_seen")),
            )
            for x in d["items"]
        ]
        table = _table(rows, ("DEVICE", "STATUS", "MODEL", "PROFILE", "RECORDS", "SPOOL", "LAST SEEN (UTC)"))
        return f"{table}\n{d['total']} devices"

    _emit(args, data, render)


def devices_show(client: Client, args: argparse.Namespace) -> None:
    """Everything the collector knows about one device."""
    data = client.get(f"/devices/{args.device_id}")

    def render(d: dict[str, Any]) -> str:
        return "\n".join(f"{k:16} {json.dumps(v) if isinstance(v, dict | list) else v}" for k, v in d.items())

    _emit(args, data, render)


def inferences_count(client: Client, args: argparse.Namespace) -> None:
    """How many inference records are stored for a device, model version and time range."""
    data = client.get(
        "/inferences/count",
        device_id=args.device_id,
        model_version=args.model_version,
        since=args.since,
        until=args.until,
    )
    _emit(args, data, lambda d: str(d["count"]))


def quarantine_list(client: Client, args: argparse.Namespace) -> None:
    """Payloads the collector refused, newest first, with the reason."""
    data = client.items("/quarantine", args.limit, reason=args.reason, device_id=args.device_id)

    def render(d: dict[str, Any]) -> str:
        rows = [
            (x["id"], _when(x["received_at"]), x.get("device_id"), x["reason"], x["payload_bytes"], x["detail"][:70])
            for x in d["items"]
        ]
        return f"{_table(rows, ('ID', 'RECEIVED (UTC)', 'DEVICE', 'REASON', 'BYTES', 'DETAIL'))}\n{d['total']} entries"

    _emit(args, data, render)


def quarantine_show(client: Client, args: argparse.Namespace) -> None:
    """One quarantined payload: reason, detail, topic and the first bytes of the payload."""
    data = client.get(f"/quarantine/{args.id}")
    _emit(args, data, lambda d: "\n".join(f"{k:16} {v}" for k, v in d.items()))


def build_parser() -> argparse.ArgumentParser:
    """The ``fleetctl`` argument parser."""
    parser = argparse.ArgumentParser(prog="fleetctl", description="Operate the fleet through the collector's API.")
    parser.add_argument("--api-url", default=os.environ.get("FLEET_API_URL", DEFAULT_API_URL), help="collector URL")
    parser.add_argument("--token", default=os.environ.get("FLEET_API_TOKEN"), help="API token (FLEET_API_TOKEN)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the API's JSON answer")
    groups = parser.add_subparsers(dest="group", required=True, metavar="GROUP")

    devices = groups.add_parser("devices", help="vehicles").add_subparsers(dest="cmd", required=True)
    p = devices.add_parser("list", parents=[common], help="list devices")
    p.add_argument("--status", choices=("online", "offline", "stopped", "unknown"))
    p.add_argument("--limit", type=int, default=None, help="at most this many (default all)")
    p.set_defaults(func=devices_list)
    p = devices.add_parser("show", parents=[common], help="one device")
    p.add_argument("device_id")
    p.set_defaults(func=devices_show)

    inferences = groups.add_parser("inferences", help="inference records").add_subparsers(dest="cmd", required=True)
    p = inferences.add_parser("count", parents=[common], help="count stored records")
    p.add_argument("--device-id")
    p.add_argument("--model-version")
    p.add_argument("--since", help="ISO 8601 time or seconds since the epoch")
    p.add_argument("--until", help="ISO 8601 time or seconds since the epoch")
    p.set_defaults(func=inferences_count)

    quarantine = groups.add_parser("quarantine", help="refused payloads").add_subparsers(dest="cmd", required=True)
    p = quarantine.add_parser("list", parents=[common], help="list quarantined payloads")
    p.add_argument("--reason")
    p.add_argument("--device-id")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.set_defaults(func=quarantine_list)
    p = quarantine.add_parser("show", parents=[common], help="one quarantined payload")
    p.add_argument("id", type=int)
    p.set_defaults(func=quarantine_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fleetctl`` console script."""
    logging.basicConfig(level=logging.WARNING, format="fleetctl: %(message)s")
    args = build_parser().parse_args(argv)
    client = Client(args.api_url, args.token)
    try:
        args.func(client, args)
    except ApiError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
