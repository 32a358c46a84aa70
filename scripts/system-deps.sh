#!/usr/bin/env bash
# Debian tools the tests use (skipped with a reason when missing): prometheus (a real scrape of /metrics).
# Installed when we can (root + apt-get); otherwise the tests that need them skip and say why.
set -uo pipefail
need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
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
        pkill -x prometheus 2>/dev/null || true
        exit 0
    fi
    sleep $((attempt * 5))
done
echo "warning: could not install ${need[*]} (see /tmp/poolwatch-apt.log); the tests that use them will be skipped"
exit 0
