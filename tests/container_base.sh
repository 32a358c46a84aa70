#!/usr/bin/env bash
# Builds a local stand-in for the Dockerfile's base image (python:3.11-slim-bookworm) as a root-filesystem
# tarball, for tests/test_container.py on machines that reach package registries but no image registry.
#
#   bash tests/container_base.sh OUT.tar
#
# Debian bookworm (minbase, debootstrap) + Debian's python3.11, python3-venv and python3-pip, made to look
# like the official image where the Dockerfile relies on it: /usr/local/bin/python{,3,3.11} and
# /usr/local/bin/pip{,3} exist and pip may install (no EXTERNALLY-MANAGED marker). The host's CA bundle,
# its Debian apt sources and a pip.conf pointing at the bundle are baked in, so that HTTPS from inside a
# build works wherever the host's does (a TLS-inspecting proxy included); the project's Dockerfile itself
# stays portable. Needs root, debootstrap and network access to the Debian mirror. Writes OUT.tar
# atomically; does nothing when it exists (the caller caches it).
set -euo pipefail
out=${1:?usage: container_base.sh OUT.tar}
[ -s "$out" ] && exit 0
mirror=${POOLWATCH_DEBIAN_MIRROR:-}
if [ -z "$mirror" ] && [ -r /etc/apt/sources.list.d/debian.sources ]; then
    mirror=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
fi
mirror=${mirror:-http://deb.debian.org/debian}
mkdir -p "$(dirname "$out")"
work=$(mktemp -d "$(dirname "$out")/base.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
echo "container_base: debootstrap bookworm from $mirror"
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }

# apt inside the stand-in: the host's Debian sources when it has them (a mirror or a snapshot), else the mirror.
if [ -r /etc/apt/sources.list.d/debian.sources ]; then
    cp /etc/apt/sources.list.d/debian.sources "$root/etc/apt/sources.list.d/debian.sources"
    : >"$root/etc/apt/sources.list"
fi
# A snapshot mirror's Release files are past their Valid-Until date; the host accepts them, so does this.
printf 'Acquire::Check-Valid-Until "false";\n' >"$root/etc/apt/apt.conf.d/99check-valid-until"
cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
export DEBIAN_FRONTEND=noninteractive
echo "container_base: installing python3 python3-venv python3-pip"
{ chroot "$root" apt-get update -q \
    && chroot "$root" apt-get install -y -q --no-install-recommends python3 python3-venv python3-pip ca-certificates \
    && chroot "$root" apt-get clean; } >"$work/apt.log" 2>&1 \
    || { tail -n 30 "$work/apt.log" >&2; exit 1; }
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin

# Where the official python image has its interpreter and pip.
py=$(chroot "$root" sh -c 'command -v python3.11 || command -v python3')
for name in python python3 python3.11; do ln -sf "$py" "$root/usr/local/bin/$name"; done
for name in pip pip3 pip3.11; do ln -sf /usr/bin/pip3 "$root/usr/local/bin/$name"; done
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED

# The host's trust store (it may hold a proxy's CA), and pip told to use it.
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
: >"$root/etc/resolv.conf"   # the container engine provides its own

tar -C "$root" --numeric-owner -cf "$work/base.tar" .
mv "$work/base.tar" "$out"
echo "container_base: wrote $out ($(du -h "$out" | cut -f1))"
