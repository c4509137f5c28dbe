"""The README's configuration reference is generated from the config models and must match them."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.services import REPO


def test_readme_configuration_reference_is_current() -> None:
    generated = subprocess.run(
        [sys.executable, str(REPO / "docs" / "config_reference.py")], capture_output=True, text=True, check=True
    ).stdout.strip()
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- config-reference:start -->.*<!-- config-reference:end -->", readme, re.S)
    assert block is not None
    assert block.group(0) == generated, "run: make readme"


def test_readme_opens_with_the_two_commands() -> None:
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in first_block.strip().splitlines()] == [["make", "demo"], ["make", "test"]]
