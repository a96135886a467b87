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
#   2. start virtlogd and libvirtd (daemon mode, no systemd) and wait until
#      `virsh -c qemu:///system version` answers.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

# Packages and what needs them:
#   libvirt-daemon-system  libvirtd, virtlogd, virsh (host agent, try-boot.sh)
#   libvirt-clients        virt-xml-validate (domain XML schema test)
#   libvirt-dev            the `virt` crate links against libvirt
#   pkg-config             virt-sys finds libvirt with it
#   qemu-system-x86        the emulator libvirt drives (TCG here)
#   cpio                   images/build-tiny.sh (initramfs)
#   genisoimage            NoCloud seed ISO (host agent, try-boot.sh)
#   e2fsprogs              mke2fs -d / debugfs for the tiny root disk
#   python3                try-boot.sh's metadata HTTP server, JSON in build-tiny.sh
#   qemu-utils             qemu-img (second step, see above)
# busybox-static is NOT installed on the host: build-tiny.sh only `apt-get download`s it.
PKGS1=(libvirt-daemon-system libvirt-clients libvirt-dev pkg-config qemu-system-x86 cpio genisoimage e2fsprogs python3)
PKGS2=(qemu-utils)

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

# ---- daemons -------------------------------------------------------------------

virsh_ok() { timeout 5 virsh -c qemu:///system version >/dev/null 2>&1; }

# virtlogd is checked on its own: libvirtd answers without it, but starting a QEMU
# domain fails when it is gone (libvirt logs QEMU's stdio through it).
if ! pgrep -x virtlogd >/dev/null; then
    run virtlogd -d
fi
if ! virsh_ok; then
    if ! pgrep -x libvirtd >/dev/null; then
        run libvirtd -d
    fi
    # Bounded wait (30 s), polling the condition.
    deadline=$((SECONDS + 30))
    until virsh_ok; do
        [ $SECONDS -lt $deadline ] || die "libvirtd did not answer on qemu:///system within 30 s"
        sleep 0.2
    done
fi
