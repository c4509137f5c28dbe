#!/usr/bin/env bash
# Create the peer environment (.venv-peers at the repository root) with Evidently,
# alibi-detect and NannyML, pinned in requirements.txt beside this script.
# Idempotent: re-running only installs what is missing. Takes about 3 minutes and
# 2.8 GB the first time. Override the interpreter with PYTHON=..., the target with VENV=...
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python3.11}"
venv="${VENV:-$root/.venv-peers}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
fi
"$venv/bin/pip" install --quiet -r "$here/requirements.txt"
"$venv/bin/python" - <<'PY'
import alibi_detect
import evidently
import nannyml

print(f"peers ready: evidently {evidently.__version__}, alibi-detect {alibi_detect.__version__}, nannyml {nannyml.__version__}")
PY
