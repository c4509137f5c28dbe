"""``fleetctl drift``: drift, label-free accuracy and data quality of a scope (``status``).

``register`` adds the ``drift`` group and then every function of :data:`SUBCOMMANDS`, so another
subcommand (``evaluate``, offline) is one more function in that list.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from collector.fleetctl import Client, emit, table, when

TOP_FEATURES = 5


def _num(value: Any, digits: int = 3) -> str:
    """A number for a table: ``-`` when absent, small p-values in scientific notation."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0.0 and abs(value) < 10**-digits:
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def _scope_line(data: dict[str, Any]) -> str:
    s = data["scope"]
    parts = []
    if s.get("device_ids"):
        parts.append("devices " + ", ".join(s["device_ids"]))
    if s.get("group"):
        parts.append(f"group {s['group']}")
    if not parts:
        parts.append("every device")
    for key in ("model_name", "model_version"):
        if s.get(key):
            parts.append(s[key])
    parts.append(f"role {s.get('role') or 'any'}")
    since, until = s.get("since"), s.get("until")
    if since is None and until is None:
        parts.append("all time")
    else:
        parts.append(f"{when(since) if since is not None else '...'} to {when(until) if until is not None else 'now'}")
    return ", ".join(parts)


def _accuracy_lines(acc: dict[str, Any]) -> list[str]:
    exp = acc["expected"]
    level = f"{exp['level']:.0%}"
    if exp["method"] == "not_enough_data":
        line = f"  expected accuracy: not enough data ({exp['n']} records)"
    else:
        line = (
            f"  expected accuracy: {_num(exp['estimate'])} [{_num(exp['low'])}, {_num(exp['high'])}] "
            f"({level}, {exp['method']}, {exp['n']} records)"
        )
    region = acc["region"]
    if region["verdict"] == "not_enough_data":
        line += ": reliability not known (not enough data)"
    elif acc["reliable"]:
        line += ": reliable (inputs within the reference region)"
    else:
        line += f": UNRELIABLE ({'; '.join(acc.get('unreliable_reasons') or [region['reason']])})"
    lines = [line]
    real = acc.get("realized")
    if real:
        lines.append(
            f"  realized accuracy: {_num(real['estimate'])} [{_num(real['low'])}, {_num(real['high'])}] "
            f"from {real['n']} labelled records ({acc.get('realized_source') or 'labels'})"
        )
    gap = acc.get("gap")
    if gap and gap.get("gap") is not None:
        lines.append(
            f"  estimate vs realized: gap {_num(gap['gap'])} [{_num(gap['low'])}, {_num(gap['high'])}] "
            f"on {gap['n']} labelled records"
        )
    return lines


def _model_lines(m: dict[str, Any], top: int) -> list[str]:
    head = (
        f"{m['model_name']} {m['model_version']}: {m['verdict'].upper()} "
        f"({m['n_records']} records, {m['n_windows']} windows, {m['n_devices']} devices)"
    )
    lines = [head]
    if not m["has_reference"]:
        lines.extend(f"  {w}" for w in m["warnings"])
        return lines
    drift = m["drift"]
    thr = drift["thresholds"]
    lines.append(
        f"  features: {drift['n_drifting']} of {drift['n_tested']} tested drift "
        f"(share {_num(drift['drift_share'], 2)}; "
        f"overall drift at share >= {thr['drift_share']} or PSI >= {thr['psi_major']}); top by PSI:"
    )
    feats = sorted(drift["features"], key=lambda f: -(f["psi"] or 0.0))[:top]
    rows = [
        [
            f["name"],
            _num(f["psi"]),
            _num(f["ks"]["statistic"]),
            _num(f["ks"]["q_value"]),
            f"q<={thr['fdr_q']} & PSI>={thr['psi_minor']}",
            f["verdict"],
        ]
        for f in feats
    ]
    lines.extend(
        "    " + line for line in table(rows, ["FEATURE", "PSI", "KS D", "KS q", "THRESHOLD", "VERDICT"]).split("\n")
    )
    lines.append("  model signals:")
    signals = [drift[k] for k in ("class_mix", "confidence", "pca_error", "coactivation")]
    rows = [
        [s["name"], _num(s["statistic"]), _num(s["p_value"]), _num(s["q_value"]), s["threshold"], s["verdict"]]
        for s in signals
    ]
    lines.extend(
        "    " + line for line in table(rows, ["SIGNAL", "STATISTIC", "p", "q", "THRESHOLD", "VERDICT"]).split("\n")
    )
    lines.extend(_accuracy_lines(m["accuracy"]))
    dq = m["data_quality"]
    lines.append(f"  data quality: {dq['verdict']} ({dq['n']} records)")
    rows = [
        [c["name"], _num(c["value"], 4), c["threshold"], c["verdict"], ", ".join(c["features"]) or "-"]
        for c in dq["checks"]
    ]
    lines.extend(
        "    " + line for line in table(rows, ["CHECK", "VALUE", "THRESHOLD", "VERDICT", "FEATURES"]).split("\n")
    )
    return lines


def render_status(data: dict[str, Any], top: int = TOP_FEATURES) -> str:
    """A readable summary of one scope's status (the API's ``by=none`` answer)."""
    lines = [
        f"scope: {_scope_line(data)} "
        f"({data['n_records']} records in {data['n_windows']} windows of {data['window_s']:g} s)",
        f"verdict: {data['verdict'].upper()}",
    ]
    lines.extend(f"  - {r}" for r in data["reasons"])
    if data["warnings"]:
        lines.append("warnings:")
        lines.extend(f"  - {w}" for w in data["warnings"])
    for m in data["models"]:
        lines.append("")
        lines.extend(_model_lines(m, top))
    if not data["models"]:
        lines.append("no records in this scope")
    return "\n".join(lines)


def render_page(data: dict[str, Any], by: str) -> str:
    """One line per device or window (the API's ``by=device|window`` answer)."""
    rows = []
    for item in data["items"]:
        scope = item["scope"]
        subject = (scope["device_ids"] or ["-"])[0] if by == "device" else when(scope["since"])
        for m in item["models"]:
            drifting = []
            acc = "-"
            dq = "-"
            if m["has_reference"]:
                feats = sorted(
                    (f for f in m["drift"]["features"] if f["verdict"] == "drift"), key=lambda f: -(f["psi"] or 0.0)
                )
                drifting = [f["name"] for f in feats[:3]]
                exp = m["accuracy"]["expected"]
                acc = _num(exp["estimate"]) + ("" if m["accuracy"]["reliable"] else " (unreliable)")
                dq = m["data_quality"]["verdict"]
            rows.append(
                [
                    subject,
                    f"{m['model_name']} {m['model_version']}",
                    m["verdict"],
                    m["n_records"],
                    ", ".join(drifting) or "-",
                    acc,
                    dq,
                ]
            )
    header = ["DEVICE" if by == "device" else "WINDOW", "MODEL", "VERDICT", "RECORDS", "TOP DRIFT", "EXP. ACC", "DATA"]
    footer = f"{data['total']} {'devices' if by == 'device' else 'windows'}"
    if data.get("next"):
        footer += f" (more: --cursor {data['next']})"
    return table(rows, header) + "\n" + footer


def drift_status(client: Client, args: argparse.Namespace) -> None:
    """Drift, expected accuracy and data quality of a scope."""
    data = client.get(
        "/drift",
        device_id=args.device_id,
        group=args.group,
        model_name=args.model_name,
        model_version=args.model_version,
        role=args.role,
        since=args.since,
        until=args.until,
        by=args.by,
        limit=args.limit if args.by != "none" else None,
        cursor=args.cursor,
    )
    if args.by == "none":
        emit(args, data, lambda d: render_status(d, args.top))
    else:
        emit(args, data, lambda d: render_page(d, args.by))


def _register_status(drift: Any, common: argparse.ArgumentParser) -> None:
    p = drift.add_parser("status", parents=[common], help="drift, expected accuracy and data quality of a scope")
    p.add_argument("--device-id", action="append", help="a device (repeat for several)")
    p.add_argument("--group", help="members of GROUP (assigned, or tagged group:GROUP)")
    p.add_argument("--model-name")
    p.add_argument("--model-version")
    p.add_argument("--role", choices=["active", "shadow", "any"], default="active")
    p.add_argument("--since", help="ISO 8601 time or seconds since the epoch (windows starting at or after)")
    p.add_argument("--until", help="ISO 8601 time or seconds since the epoch (windows starting before)")
    p.add_argument(
        "--by", choices=["none", "device", "window"], default="none", help="one status, or one per device/window"
    )
    p.add_argument("--limit", type=int, default=100, help="page size with --by device|window")
    p.add_argument("--cursor", help="the `next` value of the previous page")
    p.add_argument("--top", type=int, default=TOP_FEATURES, help="features listed, by PSI")
    p.set_defaults(func=drift_status)


SUBCOMMANDS: list[Callable[[Any, argparse.ArgumentParser], None]] = [_register_status]
"""Each adds one ``drift`` subcommand to the group's subparsers."""


def drift_evaluate(client: Client, args: argparse.Namespace) -> None:
    """Offline evaluation of two CSV files under a verified bundle; runs locally, no API call."""
    # Imported here so that `drift status` does not load scipy and the TFLite runtime.
    import logging

    from collector.config import ConfigError, load_settings
    from collector.monitoring.offline import OfflineInputError, evaluate_files, render_text

    log = logging.getLogger("fleetctl")
    try:
        keys = args.trusted_key or load_settings().monitoring_trusted_keys
        if not keys:
            log.error("no trusted key: pass --trusted-key FILE or set FLEET_MONITORING_TRUSTED_KEYS")
            raise SystemExit(2)
        report = evaluate_files(
            args.bundle, args.reference, args.current, trusted_keys=keys, label_column=args.label_column
        )
    except (OfflineInputError, ConfigError) as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None
    emit(args, report, render_text)


def _register_evaluate(drift: Any, common: argparse.ArgumentParser) -> None:
    p = drift.add_parser(
        "evaluate", parents=[common], help="the collector's drift and accuracy tests on two CSV files, locally"
    )
    p.add_argument("--bundle", required=True, help="model bundle (.tar) whose reference edges and model are used")
    p.add_argument("--reference", required=True, help="reference CSV (optionally gzipped), one column per feature")
    p.add_argument("--current", required=True, help="current CSV, same columns")
    p.add_argument("--label-column", help="column of true classes (names or indexes): realized accuracy too")
    p.add_argument(
        "--trusted-key",
        "--key",
        action="append",
        metavar="FILE",
        help="public key file the bundle must be signed with (repeatable; default FLEET_MONITORING_TRUSTED_KEYS)",
    )
    p.set_defaults(func=drift_evaluate)


SUBCOMMANDS.append(_register_evaluate)


def register(groups: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``drift`` commands."""
    drift = groups.add_parser("drift", help="drift, accuracy and data quality").add_subparsers(
        dest="cmd", required=True
    )
    for add in SUBCOMMANDS:
        add(drift, common)
