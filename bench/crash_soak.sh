#!/usr/bin/env bash
# Crash-consistency soak: the CI test with many more SIGKILLs (default 200). Prints the seed; replay one with
#   POOLWATCH_CRASH_SEED=<seed> bash bench/crash_soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export POOLWATCH_CRASH_KILLS=${POOLWATCH_CRASH_KILLS:-200}
exec .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/test_crash_consistency.py --timeout 0
