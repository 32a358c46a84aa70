#!/usr/bin/env bash
# Installs (first time) and runs poolwatch on the embedded default: images in ./data/input,
# store and outputs in ./data/shared. Extra arguments are key=value overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
mkdir -p data/input data/shared
exec .venv/bin/poolwatch ingest input_dir=./data/input shared_dir=./data/shared "$@"
