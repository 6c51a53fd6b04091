#!/usr/bin/env bash
# The demo: sets up .venv (scripts/setup.sh) and fine-tunes a tiny model on the bundled chat task, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m jsft.demo --config configs/demo.py "$@"
