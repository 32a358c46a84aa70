#!/usr/bin/env bash
# Installs (first time: .venv, pinned packages, Debian tools the tests use) and runs the test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/system-deps.sh
exec .venv/bin/python -m pytest -q "$@"
