#!/bin/bash
# Build (once) the Debian root file system that every systemd test container boots from.
#
# Usage: tests/systemd/build_rootfs.sh CACHE_DIR
# Prints the root file system's path on stdout. The result is cached under
# CACHE_DIR/<key>/rootfs, where <key> hashes this script (package list and post-build steps
# included) and the Debian mirror: changing either builds a new one. Concurrent callers wait on a
# lock. The containers boot it with --volatile=overlay, so it is never modified after the build.
set -euo pipefail

SUITE=bookworm
# What a stock Debian trading host managed by Ansible has: systemd, python3 with python3-apt
# (Ansible's apt module) and python3-venv (the role's uv install), sudo (Ansible's become),
# logrotate, procps (pgrep).
PACKAGES=systemd,systemd-sysv,dbus,python3,python3-apt,python3-venv,python3-pip,sudo,logrotate,procps

cache_dir=${1:?usage: build_rootfs.sh CACHE_DIR}

# The Debian mirror this machine's own apt sources name (never a hard-coded host).
mirror=$(awk '/^URIs:/ && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
if [ -z "$mirror" ]; then
    mirror=$(awk '$1 == "deb" && $3 == "'"$SUITE"'" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
fi
if [ -z "$mirror" ]; then
    echo "build_rootfs: no Debian mirror found in /etc/apt/sources.list{,.d/*.sources}" >&2
    exit 1
fi

key=$( (cat "$0"; echo "$mirror") | sha256sum | cut -c1-16)
target="$cache_dir/$key"
mkdir -p "$cache_dir"

exec 9>"$cache_dir/.lock"
flock 9

if [ -f "$target/.complete" ]; then
    echo "$target/rootfs"
    exit 0
fi

rm -rf "$target"
mkdir -p "$target"
echo "build_rootfs: debootstrap $SUITE from $mirror into $target/rootfs" >&2
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$target/rootfs" "$mirror" >"$target/debootstrap.log" 2>&1 || {
    tail -n 30 "$target/debootstrap.log" >&2
    exit 1
}

root=$target/rootfs
# Timers that would start unrelated jobs in the middle of a test.
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
    logrotate.timer man-db.timer dpkg-db-backup.timer; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
# An empty machine-id: systemd makes a transient one at each boot.
: >"$root/etc/machine-id"
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"* 2>/dev/null || true
echo "deb $mirror $SUITE main" >"$root/etc/apt/sources.list"

touch "$target/.complete"
# Root file systems of older package lists or mirrors are of no more use.
for old in "$cache_dir"/*/; do
    [ "${old%/}" = "$target" ] || rm -rf "${old%/}"
done
echo "$target/rootfs"
