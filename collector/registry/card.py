"""Model cards: a readable summary of one registry version, as Markdown and as HTML, from its manifest.

The card is built from what the registry holds (the manifest, the lineage recorded at push, the stage
and its history), so it is always current; :func:`card_sections` builds one neutral document and the two
renderers only format it, so the Markdown and the HTML always say the same.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from collector.db.models import ModelStageChange, ModelVersion
from shared.bundle import Manifest


@dataclass
class Table:
    """A table: a header and rows of cells."""

    header: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    """A titled part of the card: paragraphs, then key/value facts, then tables."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    facts: list[tuple[str, str]] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


def _time(value: float | None) -> str:
    if value is None:
        return "-"
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _num(value: float) -> str:
    return f"{value:.6g}"


def card_sections(
    version: ModelVersion, manifest: Manifest, history: list[ModelStageChange], *, download_path: str
) -> tuple[str, list[Section]]:
    """The title and sections of the card of ``version``."""
    m = manifest
    ref = m.reference
    sections = [
        Section(
            "Summary",
            paragraphs=[m.description] if m.description else [],
            facts=[
                ("name", m.name),
                ("version", m.version),
                ("stage", version.stage),
                ("created", _time(m.created_at.timestamp())),
                ("pushed", f"{_time(version.pushed_at)} by {version.pushed_by}"),
                ("labels", ", ".join(m.labels)),
                ("inputs", f"{len(m.features)} features"),
                ("monitored hidden layer", f"{m.n_hidden} units"),
            ],
        ),
        Section(
            "Lineage",
            facts=[
                ("training dataset", m.training.dataset_version),
                ("dataset sha256", m.training.dataset_sha256 or "-"),
                ("training rows", str(m.training.rows)),
                ("code version", m.training.code_version or "-"),
                ("parent version", m.parent_version or "-"),
                ("signed at push by key", version.uploader_key_id),
                ("stored signed by release key", version.release_key_id),
            ],
        ),
        Section(
            "Metrics",
            paragraphs=[] if m.training.metrics else ["The manifest records no metrics."],
            tables=[Table(["metric", "value"], [[k, _num(v)] for k, v in sorted(m.training.metrics.items())])]
            if m.training.metrics
            else [],
        ),
        Section(
            "Calibration",
            facts=[("method", m.calibration.method), ("temperature", _num(m.calibration.temperature))],
        ),
        Section(
            "Features",
            paragraphs=["Inputs in physical units, fed to the model as (x - mean) / std; reference statistics."],
            tables=[
                Table(
                    ["#", "feature", "mean", "std", "min", "max"],
                    [
                        [str(i), f.name, _num(f.mean), _num(f.std), _num(f.min), _num(f.max)]
                        for i, f in enumerate(ref.features)
                    ],
                )
            ],
        ),
        Section(
            "Reference profile",
            facts=[
                ("reference records", str(ref.n_samples)),
                ("hidden-unit pairs checked", str(ref.coactivation.n_pairs)),
                ("rare co-activation threshold", _num(ref.coactivation.threshold)),
                (
                    "rare co-activations per record",
                    f"mean {_num(ref.coactivation.mean)}, p99 {_num(ref.coactivation.p99)}",
                ),
                ("PCA components", str(len(ref.pca.components))),
                ("PCA reconstruction error p99", _num(ref.pca.error_p99)),
                ("golden cases", f"{len(m.golden)} (tolerance {_num(m.golden_tolerance)})"),
            ],
            tables=[
                Table(
                    ["class", "prior"], [[label, _num(p)] for label, p in zip(m.labels, ref.class_priors, strict=True)]
                )
            ],
        ),
        Section(
            "Compatibility",
            facts=[
                ("hardware profiles", ", ".join(m.compatibility.hardware_profiles)),
                ("minimum agent version", m.compatibility.min_agent_version),
            ],
        ),
        Section(
            "Artefact",
            facts=[
                ("bundle sha256", version.sha256),
                ("bundle bytes", str(version.size)),
                ("model sha256", m.model_sha256),
                ("download", download_path),
            ],
        ),
        Section(
            "Stage history",
            tables=[
                Table(
                    ["when", "from", "to", "by", "note"],
                    [[_time(h.at), h.from_stage or "-", h.to_stage, h.by, h.note or ""] for h in history],
                )
            ],
        ),
    ]
    return f"Model card: {m.name} {m.version}", sections


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: list[Section]) -> str:
    """The card as Markdown."""
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for p in s.paragraphs:
            out += [p, ""]
        if s.facts:
            out += [f"- **{k}**: {_md_cell(v)}" for k, v in s.facts] + [""]
        for t in s.tables:
            out.append("| " + " | ".join(_md_cell(h) for h in t.header) + " |")
            out.append("|" + "---|" * len(t.header))
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
            out.append("")
    return "\n".join(out)


_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
    "table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:left}"
    "th{background:#f3f3f3}dt{font-weight:600;float:left;clear:left;width:16rem}dd{margin-left:16.5rem}"
    "code{font-size:.9em}"
)


def render_html(title: str, sections: list[Section]) -> str:
    """The card as a standalone HTML page (every value escaped)."""
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for s in sections:
        out.append(f"<section><h2>{e(s.title)}</h2>")
        out += [f"<p>{e(p)}</p>" for p in s.paragraphs]
        if s.facts:
            out.append("<dl>" + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in s.facts) + "</dl>")
        for t in s.tables:
            head = "".join(f"<th>{e(h)}</th>" for h in t.header)
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in t.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


def render(
    version: ModelVersion, manifest: Manifest, history: list[ModelStageChange], *, download_path: str, fmt: str
) -> str:
    """The card in ``fmt`` (``markdown`` or ``html``)."""
    title, sections = card_sections(version, manifest, history, download_path=download_path)
    if fmt == "html":
        return render_html(title, sections)
    if fmt == "markdown":
        return render_markdown(title, sections)
    raise ValueError(f"unknown card format {fmt!r}")


def card_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """The few manifest facts the API lists with a version (labels, features, compatibility, calibration)."""
    return {
        "description": manifest.get("description", ""),
        "labels": manifest.get("labels", []),
        "features": manifest.get("features", []),
        "calibration": manifest.get("calibration", {}),
        "compatibility": manifest.get("compatibility", {}),
    }
