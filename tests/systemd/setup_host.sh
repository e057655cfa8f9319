#!/bin/sh
# Prepare this machine to boot a real systemd in a container for the role's tests.
# Idempotent: installs systemd-container (systemd-nspawn) and debootstrap only when missing.
# Usage: sudo tests/systemd/setup_host.sh      (called by tests/run.sh before pytest -m systemd)
set -eu

missing=""
command -v systemd-nspawn >/dev/null 2>&1 || missing="$missing systemd-container"
command -v debootstrap >/dev/null 2>&1 || missing="$missing debootstrap"
command -v nsenter >/dev/null 2>&1 || missing="$missing util-linux"

if [ -z "$missing" ]; then
    echo "setup_host: systemd-nspawn, debootstrap and nsenter already present"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "setup_host: need root to install:$missing" >&2
    exit 1
fi

echo "setup_host: installing:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086  # word splitting of the package list is intended
apt-get install -y -qq --no-install-recommends $missing
