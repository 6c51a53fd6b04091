#!/usr/bin/env bash
# The whole test suite: sets up .venv (scripts/setup.sh) and runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}" JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
# pytest exits 5 when it collected no test: that is a failure here, like any other non-zero exit.
exec .venv/bin/python -m pytest "$@"
