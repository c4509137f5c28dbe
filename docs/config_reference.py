"""Print the configuration reference tables of README.md from the config models themselves.

``python docs/config_reference.py`` prints the Markdown that README.md holds between the
``<!-- config-reference:start -->`` and ``<!-- config-reference:end -->`` markers; a test checks
they are the same, so the reference cannot drift from the code. ``--write`` (``make readme``)
puts the current tables into README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from collector.config import Settings
from edge_agent.config import AgentConfig

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"


ROOT = str(Path(__file__).resolve().parents[1]) + "/"


def _show(value: Any) -> str:
    if isinstance(value, Path):
        return str(value).replace(ROOT, "")
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value.value if hasattr(value, "value") else value)


def _default(field: FieldInfo) -> str:
    factory = field.default_factory
    if factory is not None and factory.__name__.startswith("_default"):
        return "(per machine)"  # e.g. the host name: not a constant worth printing
    value = factory() if factory is not None else field.default  # type: ignore[call-arg]
    if value is None:
        return "—"
    text = _show(value)
    return f"`{text}`" if text else '`""`'


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def agent_tables() -> list[str]:
    """One table per agent config section."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for name, field in AgentConfig.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for sub, sub_field in annotation.model_fields.items():
                lines.append(f"| `{name}.{sub}` | {_default(sub_field)} | {_cell(sub_field.description)} |")
        else:
            lines.append(f"| `{name}` | {_default(field)} | {_cell(field.description)} |")
    return lines


def collector_table() -> list[str]:
    """The collector's settings with their environment variables."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        lines.append(f"| `FLEET_{name.upper()}` | {_default(field)} | {_cell(field.description)} |")
    return lines


def reference() -> str:
    """The whole generated block, markers included."""
    parts = [
        START,
        "### Agent (`edge-agent --config agent.yaml`)",
        "",
        "YAML sections as below; any key can be overridden with `EDGE_AGENT_<SECTION>__<KEY>` "
        "(for example `EDGE_AGENT_MQTT__URL`). Unknown keys are an error.",
        "",
        *agent_tables(),
        "",
        "### Collector (`fleet-collector serve [--config settings.yaml]`)",
        "",
        "Every setting comes from the environment (`FLEET_*`, shown), or from the YAML file under its "
        "lower-case name; the environment wins. Unknown keys are an error.",
        "",
        *collector_table(),
        END,
    ]
    return "\n".join(parts)


def write_readme(readme: Path = Path(ROOT) / "README.md") -> None:
    """Replace the marked block of ``readme`` with the current tables."""
    text = readme.read_text()
    start, end = text.index(START), text.index(END) + len(END)
    readme.write_text(text[:start] + reference() + text[end:])


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_readme()
    else:
        sys.stdout.write(reference() + "\n")
