"""edge_agent and collector never import each other; shared imports neither."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"edge_agent": {"collector"}, "collector": {"edge_agent"}, "shared": {"collector", "edge_agent"}}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_boundaries(package: str) -> None:
    offenders = [
        f"{path.relative_to(REPO)} imports {sorted(imported_packages(path) & FORBIDDEN[package])}"
        for path in sorted((REPO / package).rglob("*.py"))
        if imported_packages(path) & FORBIDDEN[package]
    ]
    assert not offenders, offenders


def test_only_uplink_and_collector_mqtt_import_paho() -> None:
    allowed = {REPO / "edge_agent" / "uplink.py", REPO / "collector" / "mqtt.py"}
    offenders = [
        str(path.relative_to(REPO))
        for package in ("edge_agent", "collector", "shared")
        for path in (REPO / package).rglob("*.py")
        if "paho" in imported_packages(path) and path not in allowed
    ]
    assert not offenders, offenders
