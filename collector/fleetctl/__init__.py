"""``fleetctl``: the operator's command line, a thin client of the collector's HTTP API.

Each resource's commands live in a module of this package with a ``register(groups, common)``
function (``groups`` is the top-level subparsers object, ``common`` the parent parser carrying
``--json``); :func:`build_parser` finds them, so adding a resource touches no other file.

Every command takes ``--json`` and then prints exactly what the API returned, so scripts can rely
on the API's shapes (ARCHITECTURE §7). The API is found at ``FLEET_API_URL`` (default
``http://127.0.0.1:8000``) and authenticated with ``FLEET_API_TOKEN`` when the collector has one.
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import json
import logging
import os
import pkgutil
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from types import ModuleType
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
        self.http = httpx.Client(base_url=f"{self.base_url}/api/v1", headers=headers, timeout=timeout)

    def get(self, path: str, **params: Any) -> Any:
        """GET ``path`` with the non-empty ``params``; return the decoded JSON body."""
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None, **params: Any) -> Any:
        """POST ``body`` as JSON to ``path``; return the decoded JSON body."""
        return self.request("POST", path, params=params, json=body)

    def put(self, path: str, body: Any = None) -> Any:
        """PUT ``body`` as JSON to ``path``; return the decoded JSON body."""
        return self.request("PUT", path, json=body)

    def delete(self, path: str) -> None:
        """DELETE ``path``."""
        self.request("DELETE", path)

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """Send one request; an error status or an unreachable collector raises :class:`ApiError`."""
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self.http.request(method, path, params=clean, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach the collector at {self.base_url}: {exc}") from None
        check(response, method, path)
        return response.json() if response.content else None

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


def error_detail(response: httpx.Response) -> str:
    """The API's ``detail`` as text: ``reason: message`` for a structured refusal."""
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        return response.text
    if isinstance(detail, dict) and "reason" in detail:
        return f"{detail['reason']}: {detail.get('message', '')}"
    return str(detail)


def check(response: httpx.Response, method: str, path: str) -> None:
    """Raise :class:`ApiError` for an error status."""
    if response.status_code >= 400:
        raise ApiError(f"{response.status_code} from {method} {path}: {error_detail(response)}")


def login() -> str:
    """The operator's login name (recorded as who did something), or ``operator`` when there is none."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in the environment or the password database (containers)
        return "operator"


def when(value: float | str | None) -> str:
    """A timestamp (epoch seconds or ISO 8601) as ``YYYY-MM-DD HH:MM:SS`` UTC, ``-`` when absent."""
    if value is None or value == "":
        return "-"
    if isinstance(value, str):
        return value.replace("T", " ")[:19]
    return datetime.fromtimestamp(float(value), UTC).strftime("%Y-%m-%d %H:%M:%S")


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Rows as a plain left-aligned text table under ``header``."""
    cells = [[str(c) for c in header], *[["-" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def emit(args: argparse.Namespace, data: Any, render: Callable[[Any], str]) -> None:
    """Print the API's JSON answer with ``--json``, else ``render(data)``."""
    sys.stdout.write((json.dumps(data, indent=2, sort_keys=True) if args.json else render(data)) + "\n")


def _command_modules() -> list[ModuleType]:
    """The command modules of this package, in name order: each has ``register(groups, common)``."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    return [importlib.import_module(f"{__name__}.{name}") for name in names]


def build_parser() -> argparse.ArgumentParser:
    """The ``fleetctl`` argument parser."""
    parser = argparse.ArgumentParser(prog="fleetctl", description="Operate the fleet through the collector's API.")
    parser.add_argument("--api-url", default=os.environ.get("FLEET_API_URL", DEFAULT_API_URL), help="collector URL")
    parser.add_argument("--token", default=os.environ.get("FLEET_API_TOKEN"), help="API token (FLEET_API_TOKEN)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the API's JSON answer")
    groups = parser.add_subparsers(dest="group", required=True, metavar="GROUP")

    for module in _command_modules():
        module.register(groups, common)
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
