#!/usr/bin/env bash
# Create or reuse .venv and install jsft with the verified versions (constraints.txt). Idempotent.
# EXTRAS=test (default) installs the test reference libraries too (torch CPU, trl, peft, pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-test}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.jsft-installed
want="$(cat pyproject.toml constraints.txt | sha1sum) $EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[${EXTRAS}]"
  echo "$want" > "$stamp"
fi
