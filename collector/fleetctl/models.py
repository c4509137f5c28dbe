"""``fleetctl models``: push bundles (with a progress bar), list, show, download (resumable), stages and pins.

``push`` streams the ``.tar`` to ``POST /api/v1/models`` with its ``Content-Length`` (the collector refuses
an oversized body before reading it). ``download`` writes ``OUT.part`` and resumes it with a ``Range``
request guarded by ``If-Range`` (the ETag is the bundle's SHA-256, so a resume never mixes two
contents), checks the SHA-256 of the whole file against the registry's, and only then renames it to
``OUT``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from collector.fleetctl import ApiError, Client, check, emit, error_detail, login, table, when
from collector.fleetctl._progress import Progress

log = logging.getLogger("fleetctl")

CHUNK = 64 * 1024


def _stream(path: Path, progress: Progress) -> Iterator[bytes]:
    sent = 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            sent += len(chunk)
            progress.update(sent)
            yield chunk


def _render_version(d: dict[str, Any]) -> str:
    lin = d["lineage"]
    lines = [
        f"{d['name']} {d['version']}  [{d['stage']}]",
        f"  {d.get('description') or ''}".rstrip(),
        f"pushed        {when(lin['pushed_at'])} UTC by {lin['pushed_by']} (signed by key {lin['uploader_key_id']})",
        f"created       {when(lin['created_at'])} UTC",
        f"dataset       {lin['dataset_version']} (sha256 {lin['dataset_sha256'] or '-'})",
        f"code          {lin['code_version'] or '-'}",
        f"parent        {lin['parent_version'] or '-'}",
        f"labels        {', '.join(d['labels'])}",
        f"features      {len(d['features'])}",
        f"bundle        {d['size']} bytes, sha256 {d['sha256']} (release key {lin['release_key_id']})",
        f"download      {d['download']}",
        f"card          {d['card_markdown']}  {d['card_html']}",
    ]
    if lin["metrics"]:
        lines.append("metrics")
        lines += [f"  {k:28} {v:.6g}" for k, v in sorted(lin["metrics"].items())]
    if d.get("history"):
        lines.append("stages")
        lines += [
            f"  {when(h['at'])}  {h['from_stage'] or '-':>10} -> {h['to_stage']:<10} by {h['by']}"
            + (f"  ({h['note']})" if h.get("note") else "")
            for h in d["history"]
        ]
    if d.get("pins"):
        lines.append("pinned by    " + ", ".join(f"{p['scope']} {p['subject']}" for p in d["pins"]))
    if d.get("rollouts"):
        lines.append("rollouts     " + ", ".join(f"{r} ({n} devices)" for r, n in d["rollouts"].items()))
    return "\n".join(line for line in lines if line)


def models_push(client: Client, args: argparse.Namespace) -> None:
    """Upload a bundle .tar: the collector validates it, re-signs it and stores it as a candidate."""
    path = Path(args.bundle)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ApiError(f"cannot read {path}: {exc}") from None
    progress = Progress(f"push {path.name}", size, enabled=not args.no_progress)
    try:
        response = client.http.post(
            "/models",
            params={"by": args.by or login()},
            content=_stream(path, progress),
            headers={"Content-Type": "application/x-tar", "Content-Length": str(size)},
        )
    except httpx.HTTPError as exc:
        raise ApiError(f"upload to {client.base_url} failed: {exc}") from None
    finally:
        progress.close()
    check(response, "POST", "/models")
    data = response.json()

    def render(d: dict[str, Any]) -> str:
        verb = "stored" if d["created"] else "already stored (identical)"
        return f"{verb}: {d['name']} {d['version']} [{d['stage']}] sha256 {d['sha256']}\n{_render_version(d)}"

    emit(args, data, render)


def models_list(client: Client, args: argparse.Namespace) -> None:
    """Model versions with their stage, size and who pushed them."""
    data = client.items("/models", args.limit, name=args.name, stage=args.stage)

    def render(d: dict[str, Any]) -> str:
        rows = [
            (
                x["name"],
                x["version"],
                x["stage"],
                x["lineage"]["dataset_version"],
                x["lineage"]["parent_version"],
                x["size"],
                x["sha256"][:12],
                when(x["lineage"]["pushed_at"]),
                x["lineage"]["pushed_by"],
            )
            for x in d["items"]
        ]
        header = ("NAME", "VERSION", "STAGE", "DATASET", "PARENT", "BYTES", "SHA256", "PUSHED (UTC)", "BY")
        return f"{table(rows, header)}\n{d['total']} versions"

    emit(args, data, render)


def models_show(client: Client, args: argparse.Namespace) -> None:
    """One version: lineage, metrics, stage history, pins and the card's path."""
    emit(args, client.get(f"/models/{args.name}/{args.version}"), _render_version)


def models_stage(client: Client, args: argparse.Namespace) -> None:
    """Move a version to candidate, production or archived."""
    data = client.post(
        f"/models/{args.name}/{args.version}/stage", {"stage": args.stage, "by": args.by or login(), "note": args.note}
    )
    emit(args, data, lambda d: f"{d['name']} {d['version']} is {d['stage']}")


def _pin_path(args: argparse.Namespace) -> str:
    return f"/groups/{args.group}/pin" if args.group else f"/devices/{args.device}/pin"


def models_pin(client: Client, args: argparse.Namespace) -> None:
    """Pin a group or one device to a version."""
    data = client.put(
        _pin_path(args),
        {"model_name": args.name, "model_version": args.version, "by": args.by or login(), "note": args.note},
    )
    emit(args, data, lambda d: f"{d['scope']} {d['subject']} pinned to {d['model_name']} {d['model_version']}")


def models_unpin(client: Client, args: argparse.Namespace) -> None:
    """Remove the pin of a group or one device."""
    client.delete(_pin_path(args))
    subject = {"scope": "group" if args.group else "device", "subject": args.group or args.device, "unpinned": True}
    emit(args, subject, lambda d: f"{d['scope']} {d['subject']} unpinned")


def models_card(client: Client, args: argparse.Namespace) -> None:
    """Print (or save) the model card, Markdown or HTML."""
    path = f"/models/{args.name}/{args.version}/card.{'html' if args.html else 'md'}"
    try:
        response = client.http.get(path)
    except httpx.HTTPError as exc:
        raise ApiError(f"cannot reach the collector at {client.base_url}: {exc}") from None
    check(response, "GET", path)
    if args.out:
        Path(args.out).write_text(response.text, encoding="utf-8")
        sys.stdout.write(f"card written to {args.out}\n")
    else:
        sys.stdout.write(response.text + ("\n" if not response.text.endswith("\n") else ""))


def models_keys(client: Client, args: argparse.Namespace) -> None:
    """The release keys devices should pin, and the signers a push accepts."""

    def render(d: dict[str, Any]) -> str:
        lines = [
            f"release key in use: {d['release_key_id'] or '(none: pushes are refused)'}",
            "published release keys:",
        ]
        lines += [f"  {k['key_id']}  {k['public_key']}" for k in d["published"]]
        lines.append("accepted push signers:")
        lines += [f"  {k['key_id']}  {k['public_key']}" for k in d["upload"]]
        return "\n".join(lines)

    emit(args, client.get("/models/keys"), render)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def download(client: Client, name: str, version: str, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Download a version's bundle to ``out``, resuming ``out.part``; return what happened."""
    info = client.get(f"/models/{name}/{version}")
    sha, size = info["sha256"], int(info["size"])
    if out.exists() and out.stat().st_size == size and _sha256(out) == sha:
        return {
            "name": name,
            "version": version,
            "path": str(out),
            "sha256": sha,
            "size": size,
            "resumed_from": None,
            "fetched": 0,
        }
    part = out.with_name(out.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    headers = {}
    if 0 < have < size:
        headers = {"Range": f"bytes={have}-", "If-Range": f'"{sha}"'}
    path = f"/models/{name}/{version}/bundle"
    fetched = 0
    resumed = None
    if have < size:
        bar = Progress(f"download {name} {version}", size, enabled=progress)
        try:
            with client.http.stream("GET", path, headers=headers) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ApiError(f"{response.status_code} from GET {path}: {error_detail(response)}")
                if response.status_code == 206:
                    resumed = have
                    mode = "ab"
                else:
                    have, mode = 0, "wb"
                with part.open(mode) as fh:
                    done = have
                    for chunk in response.iter_bytes(CHUNK):
                        fh.write(chunk)
                        done += len(chunk)
                        fetched += len(chunk)
                        bar.update(done)
        except httpx.HTTPError as exc:
            raise ApiError(f"download interrupted ({exc}); run the same command again to resume") from None
        finally:
            bar.close()
    got = _sha256(part)
    if got != sha:
        part.unlink()
        raise ApiError(f"downloaded file has sha256 {got}, the registry says {sha}; partial file removed, run again")
    part.replace(out)
    return {
        "name": name,
        "version": version,
        "path": str(out),
        "sha256": sha,
        "size": size,
        "resumed_from": resumed,
        "fetched": fetched,
    }


def models_download(client: Client, args: argparse.Namespace) -> None:
    """Download a version's bundle (resumes an interrupted download; checks its SHA-256)."""
    out = Path(args.out) if args.out else Path(f"{args.name}-{args.version}.tar")
    data = download(client, args.name, args.version, out, progress=not args.no_progress)

    def render(d: dict[str, Any]) -> str:
        how = f", resumed at byte {d['resumed_from']}" if d["resumed_from"] is not None else ""
        return f"{d['path']}: {d['size']} bytes, sha256 {d['sha256']} verified ({d['fetched']} bytes fetched{how})"

    emit(args, data, render)


def register(groups: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``models`` commands."""
    models = groups.add_parser("models", help="the model registry").add_subparsers(dest="cmd", required=True)
    p = models.add_parser("push", parents=[common], help="upload a bundle .tar (validated, re-signed, stored)")
    p.add_argument("bundle", help="bundle .tar")
    p.add_argument("--by", help="who pushes (default: the login name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=models_push)
    p = models.add_parser("list", parents=[common], help="list versions")
    p.add_argument("--name", help="one model line")
    p.add_argument("--stage", choices=("candidate", "production", "archived"))
    p.add_argument("--limit", type=int, default=None, help="at most this many (default all)")
    p.set_defaults(func=models_list)
    p = models.add_parser("show", parents=[common], help="one version: lineage, stages, pins, card")
    p.add_argument("name")
    p.add_argument("version")
    p.set_defaults(func=models_show)
    p = models.add_parser("download", parents=[common], help="download a bundle (resumable)")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--out", help="file to write (default NAME-VERSION.tar)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=models_download)
    p = models.add_parser("stage", parents=[common], help="move a version to another stage")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("stage", choices=("candidate", "production", "archived"))
    p.add_argument("--by", help="who (default: the login name)")
    p.add_argument("--note")
    p.set_defaults(func=models_stage)
    for cmd, func, text in (
        ("pin", models_pin, "pin a group or a device to a version"),
        ("unpin", models_unpin, "remove a pin"),
    ):
        p = models.add_parser(cmd, parents=[common], help=text)
        if cmd == "pin":
            p.add_argument("name")
            p.add_argument("version")
            p.add_argument("--by", help="who (default: the login name)")
            p.add_argument("--note")
        target = p.add_mutually_exclusive_group(required=True)
        target.add_argument("--group")
        target.add_argument("--device")
        p.set_defaults(func=func)
    p = models.add_parser("card", parents=[common], help="the model card (Markdown, or --html)")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--html", action="store_true")
    p.add_argument("--out", help="write to this file instead of stdout")
    p.set_defaults(func=models_card)
    p = models.add_parser("keys", parents=[common], help="release keys to pin on devices, accepted push signers")
    p.set_defaults(func=models_keys)
