#!/usr/bin/env bash
# Installs (first time: .venv, pinned packages, Debian tools the tests use), lints and type-checks, and runs
# the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/system-deps.sh

echo "ruff check"
.venv/bin/ruff check pipeline daemon tests bench

# mypy cannot follow the editable install's import hook (package-dir maps pipeline/ -> poolwatch.pipeline,
# daemon/ -> poolwatch.daemon), so it reads the packages through links with their real module names
# (pyproject.toml: [tool.mypy] mypy_path, packages); its messages name the checkout's paths again.
echo "mypy"
tree=build/mypy/poolwatch
mkdir -p "$tree"
ln -sfn ../../../poolwatch_pkg/__init__.py "$tree/__init__.py"
ln -sfn ../../../pipeline "$tree/pipeline"
ln -sfn ../../../daemon "$tree/daemon"
.venv/bin/mypy | sed -e 's#^build/mypy/poolwatch/##'

exec .venv/bin/python -m pytest -q "$@"
