#!/usr/bin/env bash
# Build the Nimbus Debian 12 cloud image from Debian packages (mmdebstrap; nothing
# but the Debian archive is downloaded):
#
#   images/build-debian.sh [OUTDIR]   # prints OUTDIR (the only line on stdout)
#   FORCE=1 images/build-debian.sh    # rebuild even if up to date (takes the
#                                     # archive's current package versions)
#
# Default OUTDIR: ${NIMBUS_IMAGE_CACHE:-/var/cache/nimbus/images}/debian-<first 12
# hex digits of the recipe hash>: a machine-wide cache, so a fresh clone (CI) finds
# the image a previous run built. Downloaded packages are kept in
# ${NIMBUS_IMAGE_CACHE:-...}/debian-debs (only the last build's set) for the next
# cold build.
#
# OUTDIR gets disk.qcow2 (whole disk: MBR, one ext4 root partition, grub-pc in the
# MBR gap; boots with its own boot loader), packages.txt and manifest.json (see
# images/README.md). Skipped when OUTDIR/manifest.json was written by the same
# recipe (RECIPE_VERSION and the sha256 of build-debian.sh and images/debian/) and
# the files still match their sha256. Built next to OUTDIR under a flock, published
# by rename. Reproducible for the same package versions: SOURCE_DATE_EPOCH, fixed
# file system UUID, hash seed, MBR disk id and inode times, no machine-id, no SSH
# host keys.
#
# Needs root (mmdebstrap --mode=root, chroot, loop device for grub-bios-setup) and
# the host commands: mmdebstrap, sfdisk, mke2fs, debugfs, e2fsck, losetup, mount,
# umount, mountpoint, chroot, flock, qemu-img, python3, sha256sum, touch, find.
set -euo pipefail

RECIPE_VERSION=1
NAME=debian-12-nimbus
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
SECURITY_MIRROR=http://deb.debian.org/debian-security
# --variant=apt: Essential:yes packages and apt, plus these (no Recommends).
PACKAGES=(
    systemd-sysv udev dbus libpam-systemd kmod
    linux-image-cloud-amd64 initramfs-tools grub-pc
    cloud-init cloud-guest-utils e2fsprogs
    openssh-server sudo ca-certificates
    netbase iproute2 netplan.io systemd-resolved systemd-timesyncd
    less vim-tiny curl iputils-ping
)
DISK_SIZE=$((2 * 1024 * 1024 * 1024))  # virtual size of disk.qcow2
PART_START=2048                         # sectors; 1 MiB gap holds grub's core.img
# Fixed identifiers/timestamps so that the same packages give the same bytes.
EPOCH=1700000000
ROOT_UUID=6e696d62-7573-4000-8000-64656269616e
ROOT_HASH_SEED=6e696d62-7573-4000-8000-646562690002
ROOT_LABEL=debian-root
DISK_ID=6e696d62

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${NIMBUS_IMAGE_CACHE:-/var/cache/nimbus/images}
DEBS=$CACHE/debian-debs
T0=$(date +%s.%N)

log() { echo "build-debian.sh: $*" >&2; }
die() { log "$*"; exit 1; }
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap --mode=root, chroot, losetup)"
for c in mmdebstrap sfdisk mke2fs debugfs e2fsck losetup mount umount mountpoint chroot \
    flock qemu-img python3 sha256sum touch find; do
    command -v "$c" >/dev/null || die "missing $c (run scripts/install-deps.sh)"
done

# The recipe: this script and everything under images/debian/ (names and contents).
recipe_sha=$(cd "$HERE" && find build-debian.sh debian -type f | LC_ALL=C sort |
    while IFS= read -r f; do printf '%s\0' "$f"; cat "$f"; done | sha256sum | cut -d' ' -f1)
OUTDIR=${1:-$CACHE/debian-${recipe_sha:0:12}}
case $OUTDIR in /*) ;; *) OUTDIR=$PWD/$OUTDIR ;; esac

# ---- up to date? -------------------------------------------------------------
up_to_date() {
    [ -f "$OUTDIR/manifest.json" ] || return 1
    python3 - "$OUTDIR" "$RECIPE_VERSION" "$recipe_sha" <<'EOF'
# A file is hashed again only when its size, mtime or inode changed since it was
# last hashed (OUTDIR/.verified): a second run does not read 160 MB.
import hashlib, json, os, sys
out, ver, rsha = sys.argv[1:]
m = json.load(open(os.path.join(out, "manifest.json")))
if str(m.get("recipe_version")) != ver or m.get("recipe_sha256") != rsha:
    sys.exit(1)
stamp = os.path.join(out, ".verified")
try:
    seen = json.load(open(stamp))
except (OSError, ValueError):
    seen = {}
now = {}
for f, want in m["sha256"].items():
    p = os.path.join(out, f)
    if not os.path.isfile(p):
        sys.exit(1)
    st = os.stat(p)
    key = [st.st_size, st.st_mtime_ns, st.st_ino, want]
    if seen.get(f) != key:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for b in iter(lambda: fh.read(1 << 20), b""):
                h.update(b)
        if h.hexdigest() != want:
            sys.exit(1)
    now[f] = key
if now != seen:
    with open(stamp + ".tmp", "w") as fh:
        json.dump(now, fh)
    os.replace(stamp + ".tmp", stamp)
EOF
}

mkdir -p "$(dirname "$OUTDIR")"
exec 9>"$OUTDIR.lock"
flock 9   # one build per OUTDIR at a time

# Images of other recipes in the machine-wide cache that no build has asked for in
# NIMBUS_IMAGE_CACHE_DAYS (default 14) days are removed (not while locked).
prune_cache() {
    [ -z "${1:-}" ] || return 0   # only for the default OUTDIR
    local d ref
    for d in "$CACHE"/debian-????????????; do
        [ -d "$d" ] && [ "$d" != "$OUTDIR" ] || continue
        ref=$d/.last-used
        [ -e "$ref" ] || ref=$d
        [ -z "$(find "$ref" -maxdepth 0 -mtime -"${NIMBUS_IMAGE_CACHE_DAYS:-14}")" ] || continue
        (flock -n 8 && rm -rf "$d" "$d.lock" && log "removed unused $d") 8>"$d.lock" || true
    done
}

if [ "${FORCE:-0}" != 1 ] && up_to_date; then
    touch "$OUTDIR/.last-used"
    prune_cache "${1:-}"
    log "$OUTDIR is up to date (recipe $RECIPE_VERSION) [$(elapsed)s]"
    echo "$OUTDIR"
    exit 0
fi

# Built next to OUTDIR (same file system, so publishing is a rename).
WORK=$(mktemp -d "$(dirname "$OUTDIR")/.build-debian.XXXXXX")
R=$WORK/root
LOOP= PLOOP=
cleanup() {
    set +e
    # Unmount whatever is still mounted under WORK (deepest first), detach the loop
    # device, and never let rm cross into a mount.
    grep -o " $WORK/[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done
    [ -n "$PLOOP" ] && losetup -d "$PLOOP"
    [ -n "$LOOP" ] && losetup -d "$LOOP"
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
log "building $OUTDIR in $WORK"

# ---- root file system tree: mmdebstrap --------------------------------------------
export SOURCE_DATE_EPOCH=$EPOCH ROOT_UUID ROOT_LABEL DISK_ID
export PYTHONHASHSEED=0   # byte-compiled Python (cloud-init) the same on every build
mkdir -p "$DEBS"
# Only .deb files in the package cache: apt's lock and partial/ would be copied in
# with their old times and make the image depend on the cache's history.
find "$DEBS" -mindepth 1 -maxdepth 1 ! -name '*.deb' -exec rm -rf {} +
touch "$WORK/build-start"
q() { printf '%q' "$1"; }
CUST=$(q "$HERE/debian/customize.sh")
FILES=$(q "$HERE/debian/files")
mmdebstrap --mode=root --variant=apt --include="$(IFS=,; echo "${PACKAGES[*]}")" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --skip=essential/unlink \
    --setup-hook='mkdir -p "$1"/var/cache/apt/archives' \
    --setup-hook="sync-in $(q "$DEBS") /var/cache/apt/archives/" \
    --essential-hook='echo "grub-pc grub-pc/install_devices_empty boolean true" | chroot "$1" debconf-set-selections' \
    --essential-hook="cd $FILES && find . -type f | LC_ALL=C sort | while IFS= read -r f; do install -D -m 644 \"\$f\" \"\$1/\$f\"; done" \
    --customize-hook="$CUST \"\$1\"" \
    --customize-hook="find $(q "$DEBS") -maxdepth 1 -name '*.deb' -delete" \
    --customize-hook="sync-out /var/cache/apt/archives $(q "$DEBS")" \
    --customize-hook="rm -rf $(q "$DEBS")/lock $(q "$DEBS")/partial" \
    "$SUITE" "$R" \
    "deb $MIRROR $SUITE main" \
    "deb $MIRROR $SUITE-updates main" \
    "deb $SECURITY_MIRROR $SUITE-security main" \
    >"$WORK/mmdebstrap.log" 2>&1 || { tail -n 60 "$WORK/mmdebstrap.log" >&2; die "mmdebstrap failed"; }
log "mmdebstrap done [$(elapsed)s]"

[ -s "$R/etc/machine-id" ] && die "the image has a machine-id"
ls "$R"/etc/ssh/ssh_host_* >/dev/null 2>&1 && die "the image has SSH host keys"
KVER=$(cd "$R/boot" && ls vmlinuz-* | sed 's/^vmlinuz-//' | head -n 1)
[ -n "$KVER" ] && [ -f "$R/boot/initrd.img-$KVER" ] || die "no kernel/initrd in /boot"
chroot "$R" dpkg-query -W -f '${Package} ${Version}\n' | LC_ALL=C sort >"$WORK/packages.txt"
pkgver() { awk -v p="$1" '$1 == p { print $2 }' "$WORK/packages.txt"; }
KCMDLINE=$(sed -n "s|^[[:space:]]*linux[[:space:]]\+/boot/vmlinuz-$KVER[[:space:]]\+||p" "$R/boot/grub/grub.cfg" |
    head -n 1 | sed 's/[[:space:]]*$//')
[ -n "$KCMDLINE" ] || die "no kernel line in grub.cfg"

# Times: whatever the build wrote (maintainer scripts, hooks, byte-compiled Python)
# and every directory gets mtime EPOCH; files unpacked from packages keep the mtime
# in their .deb (a .pyc records its source's mtime: clamping sources would make every
# .pyc stale and Python would compile on each first boot). Directories too, because
# whether apt or dpkg made one first (e.g. /var/cache/apt/archives/partial) depends
# on what was in the package cache. Then every inode's ctime/atime/crtime = EPOCH
# (mke2fs -d copies them; touch cannot set ctime).
find "$R" -xdev \( -newer "$WORK/build-start" -o -type d \) -print0 | xargs -0r touch -h -d "@$EPOCH"
if find "$R" -xdev | grep -q '["\\]'; then die "a path in the image has a quote or backslash"; fi

# ---- disk: MBR + ext4 partition ------------------------------------------------------
DISK=$WORK/disk.raw
PART_OFF=$((PART_START * 512))
FS_SIZE=$((DISK_SIZE - PART_OFF))
truncate -s "$DISK_SIZE" "$DISK"
printf 'label: dos\nlabel-id: 0x%s\nunit: sectors\nstart=%s, type=83, bootable\n' "$DISK_ID" "$PART_START" |
    sfdisk -q --no-reread --no-tell-kernel "$DISK" >"$WORK/sfdisk.log" 2>&1 ||
    { cat "$WORK/sfdisk.log" >&2; die "sfdisk failed"; }
MKE2FS_CONFIG=$HERE/debian/mke2fs.conf E2FSPROGS_FAKE_TIME=$EPOCH \
    mke2fs -q -F -t ext4 -L "$ROOT_LABEL" -U "$ROOT_UUID" \
    -E "hash_seed=$ROOT_HASH_SEED,root_owner=0:0,offset=$PART_OFF" \
    -d "$R" "$DISK" "$((FS_SIZE / 1024))k" >"$WORK/mke2fs.log" 2>&1 ||
    { cat "$WORK/mke2fs.log" >&2; die "mke2fs failed"; }
(cd "$R" && find . -xdev | sed 's|^\.||; s|^$|/|') | while IFS= read -r p; do
    printf 'set_inode_field "%s" ctime @%s\nset_inode_field "%s" atime @%s\nset_inode_field "%s" crtime @%s\n' \
        "$p" "$EPOCH" "$p" "$EPOCH" "$p" "$EPOCH"
done >"$WORK/debugfs.cmds"
E2FSPROGS_FAKE_TIME=$EPOCH debugfs -w -f "$WORK/debugfs.cmds" "$DISK?offset=$PART_OFF" >"$WORK/debugfs.log" 2>&1 ||
    { tail -n 20 "$WORK/debugfs.log" >&2; die "debugfs failed"; }
if grep -v '^debugfs' "$WORK/debugfs.log" | grep -q .; then
    grep -v '^debugfs' "$WORK/debugfs.log" | head -n 20 >&2; die "debugfs reported errors"
fi
log "file system done [$(elapsed)s]"

# ---- boot loader: boot.img in the MBR, core.img in the gap before the partition -----
# grub-bios-setup from the image itself (its own boot.img and core.img, the same
# grub build as the modules in /boot/grub), run in the image's tree on a loop device
# of the whole disk; it reads /boot/grub/i386-pc from the root partition, attached
# by a second loop device (offset; this kernel makes no loopNpM partition devices)
# and mounted read-only, so nothing in the file system changes.
LOOP=$(losetup --show -f "$DISK")
PLOOP=$(losetup --show -f -o "$PART_OFF" --sizelimit "$FS_SIZE" "$DISK")
e2fsck -fn "$PLOOP" >"$WORK/e2fsck.log" 2>&1 || { cat "$WORK/e2fsck.log" >&2; die "e2fsck found errors"; }
mkdir -p "$WORK/mnt"
mount -o ro,noload "$PLOOP" "$WORK/mnt"
mount --bind /dev "$R/dev"
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount --bind "$WORK/mnt" "$R/mnt"
printf '(hd0) %s\n' "$LOOP" >"$R/tmp/device.map"
chroot "$R" grub-bios-setup -v -d /mnt/boot/grub/i386-pc -m /tmp/device.map "$LOOP" >"$WORK/grub.log" 2>&1 ||
    { cat "$WORK/grub.log" >&2; die "grub-bios-setup failed"; }
for m in "$R/mnt" "$R/sys" "$R/proc" "$R/dev" "$WORK/mnt"; do umount "$m"; done
losetup -d "$PLOOP"
PLOOP=
losetup -d "$LOOP"
LOOP=
head -c 440 "$DISK" | grep -qa GRUB || die "no grub boot code in the MBR"
sfdisk -d "$DISK" 2>/dev/null | grep -q "start= *$PART_START, .*type=83, bootable" || die "partition table damaged"
log "boot loader done [$(elapsed)s]"

# ---- publish -------------------------------------------------------------------
NEW=$OUTDIR.new.$$
rm -rf "$NEW"
mkdir -p "$NEW"
qemu-img convert -q -c -f raw -O qcow2 "$DISK" "$NEW/disk.qcow2"
chmod 644 "$NEW/disk.qcow2"
mv "$WORK/packages.txt" "$NEW/packages.txt"
python3 - "$NEW" <<EOF
import hashlib, json, os, sys
out = sys.argv[1]
files = ["disk.qcow2", "packages.txt"]
def sha(p):
    h = hashlib.sha256()
    with open(os.path.join(out, p), "rb") as fh:
        for b in iter(lambda: fh.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()
m = {
    "name": "$NAME",
    "boot": "disk",
    "root_disk": "disk.qcow2",
    "root_disk_format": "qcow2",
    "root_disk_virtual_size": $DISK_SIZE,
    "partition_table": {"type": "dos", "disk_id": "0x$DISK_ID", "root_partition": 1,
                        "root_partition_start_sector": $PART_START},
    "root_fs": {"type": "ext4", "uuid": "$ROOT_UUID", "label": "$ROOT_LABEL"},
    "boot_loader": "grub-pc",
    "kernel_cmdline": "$KCMDLINE",
    "console": "ttyS0",
    "cloud_init": {
        "datasources": ["NoCloud", "Ec2", "None"],
        "default_user": "debian",
        "finished_line_regex": "Cloud-init v\\\\. \\\\S+ finished at ",
    },
    "suite": "$SUITE",
    "kernel_version": "$KVER",
    "packages": {p: v for p, v in (l.split() for l in open(os.path.join(out, "packages.txt")))
                 if p in ("linux-image-$KVER", "systemd", "cloud-init", "openssh-server", "grub-pc")},
    "source_date_epoch": $EPOCH,
    "sha256": {f: sha(f) for f in files},
    "recipe_version": $RECIPE_VERSION,
    "recipe_sha256": "$recipe_sha",
}
with open(os.path.join(out, "manifest.json"), "w") as fh:
    json.dump(m, fh, indent=2)
    fh.write("\n")
EOF
if [ -d "$OUTDIR" ]; then
    OLD=$OUTDIR.old.$$
    mv "$OUTDIR" "$OLD"
    mv "$NEW" "$OUTDIR"
    rm -rf "$OLD"
else
    mv "$NEW" "$OUTDIR"
fi
touch "$OUTDIR/.last-used"
prune_cache "${1:-}"
log "built $OUTDIR (kernel $KVER, $(du -h --apparent-size "$OUTDIR/disk.qcow2" | cut -f1) qcow2) [$(elapsed)s]"
echo "$OUTDIR"
