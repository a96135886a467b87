#!/usr/bin/env bash
# Install and start everything Nimbus needs on a Debian 12 host (root, no systemd).
#
# Idempotent and non-interactive; quiet unless something fails; < 2 s when all is
# already in place.
#
#   scripts/install-deps.sh
#
# Steps:
#   1. apt packages (apt-get update at most once). Debian's qemu-utils is installed
#      in a SECOND apt-get step: installing libvirt/qemu-system-x86 removes the
#      preinstalled non-Debian qemu-utils (qemu-img 10.x), and asking for everything
#      in one command fails with "held broken packages".
#   2. give /dev/kvm the permissions a Debian host has (root:kvm 0660) when no udev
#      did it: with root:root 0600 libvirt re-probes QEMU on every domain start
#      (~50 s each), because the QEMU user cannot open the device it probed.
#   3. start virtlogd and libvirtd (daemon mode, no systemd) and wait until
#      `virsh -c qemu:///system version` answers. The first start on a fresh
#      machine probes QEMU's capabilities for one to two minutes: the wait is
#      bounded by NIMBUS_LIBVIRTD_WAIT_SECS (default 600) and says what it waits for.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

# Every package Nimbus needs on a host, and the external commands the project
# runs from each: the one list that this script installs and
# scripts/check-deps.sh checks (`install-deps.sh --table` prints it; each
# command must resolve to a file that `dpkg -S` says belongs to its package).
#
# Columns: step, package, commands run from it (by scripts, tests, image
# recipes or the agent); "-" for a package needed for its files or its set-up
# (libvirt-dev, libvirt-daemon-system).
# Step 1: one apt-get install. Step 2: a second one (installing libvirt and
# qemu-system-x86 removes the machine's preinstalled non-Debian qemu-utils, and
# asking for both in one command fails with "held broken packages").
# Step "machine": the machine's own toolchain, not Debian packages (rustup's
# cargo, pyenv's python3 with pip): check-deps only checks that they resolve.
# A command given with a path is checked at that path.
# Packages the base image already has are named too: a machine of another
# kind may lack them, and naming them lets check-deps verify where a command
# really comes from. busybox-static is NOT installed on the host:
# build-tiny.sh only `apt-get download`s it.
# Ceph (scripts/ceph.sh, the volumes crate): Debian's 16.2 daemons and tools;
# qemu-block-extra holds QEMU's librbd block driver (block-rbd.so), which
# `qemu-system-x86_64 -drive format=help` lists even when it is missing.
DEPS_TABLE='
1  libvirt-daemon-system   -
1  libvirt-daemon          libvirtd virtlogd
1  libvirt-clients         virsh virt-xml-validate virt-admin
1  libxml2-utils           xmllint
1  libvirt-dev             -
1  pkgconf                 pkg-config
1  qemu-system-x86         qemu-system-x86_64
1  cpio                    cpio
1  genisoimage             genisoimage
1  e2fsprogs               mke2fs debugfs
1  python3                 -
1  curl                    curl
1  util-linux              runuser flock setsid
1  coreutils               timeout stat chgrp chmod sha256sum od truncate mktemp tee cat
1  procps                  pgrep sysctl
1  passwd                  groupadd usermod
1  dpkg                    dpkg dpkg-deb dpkg-query
1  apt                     apt-get apt-cache
1  gzip                    gzip
1  findutils               find
1  mawk                    awk
1  mmdebstrap              mmdebstrap
1  fdisk                   sfdisk
1  mount                   losetup mount umount
1  debian-archive-keyring  -
1  openssh-client          ssh ssh-keygen
1  binutils-x86-64-linux-gnu readelf
1  iproute2                ip bridge
1  nftables                nft
1  redis-server            redis-server
1  postgresql-15           /usr/lib/postgresql/15/bin/initdb /usr/lib/postgresql/15/bin/pg_ctl /usr/lib/postgresql/15/bin/postgres /usr/lib/postgresql/15/bin/pgbench
1  postgresql-client-15    /usr/lib/postgresql/15/bin/psql /usr/lib/postgresql/15/bin/pg_isready
1  ceph-mon                ceph-mon
1  ceph-osd                ceph-osd
1  ceph-base               monmaptool
1  ceph-common             ceph rbd ceph-authtool
1  qemu-block-extra        -
2  qemu-utils              qemu-img
machine  rustup            cargo
machine  pyenv             python3
'
if [ "${1:-}" = --table ]; then
    printf '%s\n' "$DEPS_TABLE" | sed '/^$/d'
    exit 0
fi
# shellcheck disable=SC2207
PKGS1=($(printf '%s\n' "$DEPS_TABLE" | awk '$1 == "1" { print $2 }'))
# shellcheck disable=SC2207
PKGS2=($(printf '%s\n' "$DEPS_TABLE" | awk '$1 == "2" { print $2 }'))

LOG=$(mktemp /tmp/nimbus-install-deps.XXXXXX.log)
trap 'rm -f "$LOG"' EXIT

die() {
    echo "install-deps.sh: $*" >&2
    if [ -s "$LOG" ]; then
        echo "---- last lines of log ----" >&2
        tail -n 40 "$LOG" >&2
    fi
    exit 1
}

run() { "$@" >>"$LOG" 2>&1 || die "failed: $*"; }

[ "$(id -u)" = 0 ] || die "must run as root"

missing() {
    local p out=()
    for p in "$@"; do
        if [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" != "installed" ]; then
            out+=("$p")
        fi
    done
    echo "${out[@]:-}"
}

updated=0
apt_install() {
    [ $# -gt 0 ] || return 0
    if [ $updated = 0 ]; then
        run apt-get update -q
        updated=1
    fi
    run apt-get install -y -q --no-install-recommends "$@"
}

# shellcheck disable=SC2207
m1=($(missing "${PKGS1[@]}"))
apt_install "${m1[@]}"
# shellcheck disable=SC2207
m2=($(missing "${PKGS2[@]}"))
# qemu-img must also be Debian's (the first step may just have removed it).
if [ ${#m2[@]} -eq 0 ] && ! command -v qemu-img >/dev/null 2>&1; then
    m2=("${PKGS2[@]}")
fi
apt_install "${m2[@]}"
command -v qemu-img >/dev/null 2>&1 || die "qemu-img missing after install"

# ---- /dev/kvm ------------------------------------------------------------------

# Debian's udev rule makes /dev/kvm root:kvm 0660; machines without udev leave it
# root:root 0600. Only the group and mode are changed, and only when they differ.
if [ -c /dev/kvm ]; then
    getent group kvm >/dev/null || run groupadd --system kvm
    # The QEMU user libvirt runs guests as (Debian: libvirt-qemu) opens it through the group.
    if id libvirt-qemu >/dev/null 2>&1 && ! id -nG libvirt-qemu | grep -qw kvm; then
        run usermod -a -G kvm libvirt-qemu
    fi
    if [ "$(stat -c %G:%a /dev/kvm)" != "kvm:660" ]; then
        echo "install-deps.sh: /dev/kvm was $(stat -c %U:%G:%a /dev/kvm); setting root:kvm 0660 as udev would" >&2
        run chgrp kvm /dev/kvm
        run chmod 0660 /dev/kvm
    fi
fi

# ---- daemons -------------------------------------------------------------------

virsh_ok() { timeout 10 virsh -c qemu:///system version >/dev/null 2>&1; }

# virtlogd is checked on its own: libvirtd answers without it, but starting a QEMU
# domain fails when it is gone (libvirt logs QEMU's stdio through it).
if ! pgrep -x virtlogd >/dev/null; then
    run virtlogd -d
fi
if ! virsh_ok; then
    if ! pgrep -x libvirtd >/dev/null; then
        run libvirtd -d
    fi
    # libvirtd answers only once it has probed QEMU's capabilities: one to two
    # minutes on a fresh machine (seconds once its cache exists).
    wait_secs=${NIMBUS_LIBVIRTD_WAIT_SECS:-600}
    echo "install-deps.sh: waiting for libvirtd to answer on qemu:///system (first start probes QEMU, 1-2 min; bound ${wait_secs} s)" >&2
    start=$SECONDS
    next_report=$((SECONDS + 30))
    until virsh_ok; do
        pgrep -x libvirtd >/dev/null || die "libvirtd exited while starting (see its log in /var/log/libvirt/)"
        [ $((SECONDS - start)) -lt "$wait_secs" ] || die "libvirtd did not answer on qemu:///system within ${wait_secs} s"
        if [ $SECONDS -ge $next_report ]; then
            echo "install-deps.sh: still waiting for libvirtd ($((SECONDS - start)) s)" >&2
            next_report=$((SECONDS + 30))
        fi
        sleep 0.5
    done
    echo "install-deps.sh: libvirtd answered after $((SECONDS - start)) s" >&2
fi
