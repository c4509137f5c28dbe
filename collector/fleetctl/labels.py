"""``fleetctl labels``: push a file of late labels, list them, and realized accuracy per model version.

The file is CSV with a header naming at least ``device_id, spool_epoch, seq, label`` (other columns
are ignored), plain or gzip-compressed: what the edge agent's late-label writer produces. A label
that is a whole number is a class index, anything else a class name. The whole file is checked
before anything is sent (a missing column or a seq that is not a number stops the push with the
line at fault), then it goes in chunks of at most 10,000 labels; the collector rejects bad labels
one by one and stores the others. Pushing a file again is safe: a label replaces the earlier one.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import io
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from collector.fleetctl import ApiError, Client, emit, table, when

log = logging.getLogger("fleetctl")

COLUMNS = ("device_id", "spool_epoch", "seq", "label")
MAX_CHUNK = 10_000  # the API's limit per push (collector.labels.MAX_ITEMS)
SHOWN_REJECTIONS = 10
_INTEGER = re.compile(r"[+-]?[0-9]+")


class LabelFileError(ValueError):
    """A label file that cannot be read as CSV with the label columns."""


@contextlib.contextmanager
def _open_text(path: Path) -> Iterator[IO[str]]:
    """``path`` as UTF-8 text, decompressed when it starts with the gzip magic bytes."""
    with path.open("rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
        with io.TextIOWrapper(stream, encoding="utf-8-sig", newline="") as text:
            yield text


def read_label_file(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, item)`` for every label of the file; a malformed file raises :class:`LabelFileError`."""
    try:
        with _open_text(path) as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise LabelFileError(f"{path}: empty file (expected a header line {','.join(COLUMNS)})")
            names = [h.strip() for h in header]
            missing = [c for c in COLUMNS if c not in names]
            if missing:
                raise LabelFileError(
                    f"{path}: missing column(s) {', '.join(missing)} in the header line ({','.join(names)})"
                )
            at = {c: names.index(c) for c in COLUMNS}
            width = max(at.values()) + 1
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                line = reader.line_num
                if len(row) < width:
                    raise LabelFileError(f"{path}: line {line} has {len(row)} fields, the header {len(names)}")
                seq = row[at["seq"]].strip()
                if not _INTEGER.fullmatch(seq):
                    raise LabelFileError(f"{path}: line {line}: seq {seq!r} is not a whole number")
                label = row[at["label"]].strip()
                yield (
                    line,
                    {
                        "device_id": row[at["device_id"]].strip(),
                        "spool_epoch": row[at["spool_epoch"]].strip(),
                        "seq": int(seq),
                        "label": int(label) if _INTEGER.fullmatch(label) else label,
                    },
                )
    except UnicodeDecodeError as exc:
        raise LabelFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (gzip.BadGzipFile, EOFError) as exc:
        raise LabelFileError(f"{path}: corrupt gzip file ({exc})") from None
    except csv.Error as exc:
        raise LabelFileError(f"{path}: not CSV ({exc})") from None
    except OSError as exc:
        raise LabelFileError(f"cannot read {path}: {exc.strerror or exc}") from None


def push_file(client: Client, path: Path, *, source: str, chunk: int = MAX_CHUNK) -> dict[str, Any]:
    """Check the whole file, then push it in chunks; the merged answer has the API's shape.

    Rejections carry the item's ``index`` in the file (0-based, over the labels) and its ``line``.
    """
    total = sum(1 for _ in read_label_file(path))
    merged: dict[str, Any] = {"accepted": 0, "inserted": 0, "replaced": 0, "matched": 0, "rejected": []}
    sent = 0
    batch: list[tuple[int, dict[str, Any]]] = []

    def send() -> None:
        nonlocal sent
        try:
            answer = client.post("/labels", {"items": [item for _, item in batch], "source": source})
        except ApiError as exc:
            raise ApiError(f"{exc} (after {sent} of {total} were sent; pushing the file again is safe)") from None
        for key in ("accepted", "inserted", "replaced", "matched"):
            merged[key] += answer[key]
        for r in answer["rejected"]:
            merged["rejected"].append({**r, "index": sent + r["index"], "line": batch[r["index"]][0]})
        sent += len(batch)
        batch.clear()

    for entry in read_label_file(path):
        batch.append(entry)
        if len(batch) == chunk:
            send()
    if batch:
        send()
    return merged


def labels_push(client: Client, args: argparse.Namespace) -> None:
    """Push a label file; report totals and the first rejected lines."""
    path = Path(args.file)
    try:
        data = push_file(client, path, source=args.source or path.name, chunk=args.chunk_size)
    except LabelFileError as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None

    def render(d: dict[str, Any]) -> str:
        rejected = d["rejected"]
        lines = [
            f"{d['accepted']} labels stored from {path.name} ({d['inserted']} new, {d['replaced']} replaced); "
            f"{d['matched']} match records already stored; {len(rejected)} rejected"
        ]
        lines += [f"  line {r['line']}: {r['reason']}" for r in rejected[:SHOWN_REJECTIONS]]
        if len(rejected) > SHOWN_REJECTIONS:
            lines.append(f"  ... and {len(rejected) - SHOWN_REJECTIONS} more (--json lists them all)")
        return "\n".join(lines)

    emit(args, data, render)


def labels_list(client: Client, args: argparse.Namespace) -> None:
    """Stored labels with their record's model and prediction."""
    data = client.items("/labels", args.limit, device_id=args.device_id, spool_epoch=args.spool_epoch)

    def render(d: dict[str, Any]) -> str:
        rows = [
            (
                x["device_id"],
                x["spool_epoch"],
                x["seq"],
                x["label"],
                x["pred"],
                f"{x['model_name']}@{x['model_version']}" if x["matched"] else "(record not stored)",
                x["source"],
                when(x["received_at"]),
            )
            for x in d["items"]
        ]
        text = table(rows, ("DEVICE", "EPOCH", "SEQ", "LABEL", "PRED", "MODEL", "SOURCE", "RECEIVED (UTC)"))
        return f"{text}\n{d['total']} labels"

    emit(args, data, render)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _interval(low: float | None, high: float | None, signed: bool = False) -> str:
    if low is None or high is None:
        return "(not enough labels)"
    fmt = "{:+.1f}" if signed else "{:.1f}"
    return f"[{fmt.format(100 * low)}, {fmt.format(100 * high)}]"


def labels_accuracy(client: Client, args: argparse.Namespace) -> None:
    """Realized accuracy per model version beside the label-free estimate and their gap."""
    data = client.get(
        "/labels/accuracy",
        model_name=args.model_name,
        model_version=args.model_version,
        device_id=args.device_id,
        group=args.group,
        since=args.since,
        until=args.until,
        role=args.role,
    )

    def render(d: dict[str, Any]) -> str:
        rows = []
        for x in d["items"]:
            r, e, g = x["realized"], x["expected"], x["gap"]
            gap = "-" if g["gap"] is None else f"{100 * g['gap']:+.1f} pts"
            pvalue = "-" if g["calibration_pvalue"] is None else f"{g['calibration_pvalue']:.2g}"
            rows.append(
                (
                    x["model_name"],
                    x["model_version"],
                    x["n_labelled"],
                    f"{_pct(r['estimate'])} {_interval(r['low'], r['high'])}",
                    f"{_pct(e['estimate'])} {_interval(e['low'], e['high'])}",
                    f"{gap} {_interval(g['low'], g['high'], signed=True)}",
                    pvalue,
                )
            )
        header = ("MODEL", "VERSION", "LABELLED", "REALIZED", "EXPECTED", "GAP (REALIZED - EXPECTED)", "CALIB. P")
        level = f"{100 * d['items'][0]['level']:g}% intervals" if d["items"] else "no labelled records"
        return f"{table(rows, header)}\n{level}"

    emit(args, data, render)


def _chunk_size(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_CHUNK:
        raise argparse.ArgumentTypeError(f"must be 1-{MAX_CHUNK}")
    return value


def register(groups: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``labels`` commands."""
    cmds = groups.add_parser("labels", help="late labels and realized accuracy").add_subparsers(
        dest="cmd", required=True
    )
    p = cmds.add_parser("push", parents=[common], help="push a CSV of late labels (device_id,spool_epoch,seq,label)")
    p.add_argument("file", help="CSV file, optionally gzip-compressed")
    p.add_argument("--source", help="where the labels came from (default: the file name)")
    p.add_argument("--chunk-size", type=_chunk_size, default=MAX_CHUNK, help=f"labels per request (max {MAX_CHUNK})")
    p.set_defaults(func=labels_push)
    p = cmds.add_parser("list", parents=[common], help="stored labels")
    p.add_argument("--device-id")
    p.add_argument("--spool-epoch")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    p.set_defaults(func=labels_list)
    p = cmds.add_parser("accuracy", parents=[common], help="realized vs expected accuracy per model version")
    p.add_argument("--model-name")
    p.add_argument("--model-version")
    p.add_argument("--device-id")
    p.add_argument("--group", help="members of GROUP (assigned, or tagged group:GROUP)")
    p.add_argument("--role", default="active", choices=("active", "shadow"))
    p.add_argument("--since", help="ISO 8601 or seconds since the epoch (record time, inclusive)")
    p.add_argument("--until", help="ISO 8601 or seconds since the epoch (exclusive)")
    p.set_defaults(func=labels_accuracy)
