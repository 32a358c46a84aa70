#!/usr/bin/env bash
# Installs (first time) and starts the poolwatch daemon on the embedded default: it watches ./data/input,
# keeps the store and outputs in ./data/shared and serves metrics on 127.0.0.1:9464. Ctrl-C stops it.
# Extra arguments are key=value overrides, e.g. schedule.interval=30m stopping_condition.n_samples=0.1
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
mkdir -p data/input data/shared
# n_samples=0.1: a run (poolwatch trigger, SIGUSR1) keeps a tenth of the new images unless you say otherwise.
exec .venv/bin/poolwatch run input_dir=./data/input shared_dir=./data/shared stopping_condition.n_samples=0.1 "$@"
