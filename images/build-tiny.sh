#!/usr/bin/env bash
# Build the "nimbus-tiny" guest image from Debian packages (nothing is installed):
#
#   images/build-tiny.sh [OUTDIR]      # default ${NIMBUS_HOME:-<repo>/.nimbus}/images/tiny
#   FORCE=1 images/build-tiny.sh       # rebuild even if OUTDIR is up to date
#
# OUTDIR gets: vmlinuz, initrd.img, rootfs.qcow2, manifest.json (see images/README.md).
# The work is skipped when OUTDIR/manifest.json was written by the same recipe
# (RECIPE_VERSION and the sha256 of the recipe files) and the files still match it.
#
# Needs (scripts/install-deps.sh installs them): apt-get, dpkg, cpio, gzip,
# mke2fs (e2fsprogs >= 1.43 for -d), qemu-img, python3, sha256sum, readelf.
set -euo pipefail

RECIPE_VERSION=2
KERNEL_META=linux-image-cloud-amd64
BUSYBOX_PKG=busybox-static
# An SSH server for the guest (dropbear) and the libraries it links against;
# only the libraries it needs (read from the ELF files) go into the image.
SSH_PKGS=(dropbear-bin libc6 libcrypt1 libtomcrypt1 libtommath1 libgmp10 zlib1g)
# Modules the guest needs; their dependencies are added automatically (from each
# .ko's modinfo depends=) and everything is loaded in dependency order.
# Anything built into the kernel (e.g. ext4 on the cloud kernel) is skipped.
WANT_MODULES=(virtio_pci virtio_blk virtio_net isofs button evdev)
CMDLINE="console=ttyS0 quiet"
ROOTFS_SIZE=64M
# Fixed identifiers/timestamps so that the same packages give the same bytes.
EPOCH=1700000000
ROOTFS_UUID=6e696d62-7573-4000-8000-74696e790001
ROOTFS_HASH_SEED=6e696d62-7573-4000-8000-74696e790002

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
OUTDIR=${1:-${NIMBUS_HOME:-$REPO/.nimbus}/images/tiny}
OUTDIR=$(realpath -m "$OUTDIR")   # absolute: the build works in a temp dir
SRC=$HERE/tiny-initramfs
T0=$(date +%s.%N)

die() { echo "build-tiny.sh: $*" >&2; exit 1; }
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

for c in apt-get dpkg dpkg-deb cpio gzip mke2fs debugfs qemu-img python3 sha256sum readelf; do
    command -v "$c" >/dev/null || die "missing $c (run scripts/install-deps.sh)"
done

recipe_sha=$(cat "$HERE/build-tiny.sh" "$SRC/init" "$SRC/udhcpc.script" "$SRC/power-button" | sha256sum | cut -d' ' -f1)

# ---- up to date? -------------------------------------------------------------
up_to_date() {
    [ -f "$OUTDIR/manifest.json" ] || return 1
    python3 - "$OUTDIR" "$RECIPE_VERSION" "$recipe_sha" <<'EOF'
import hashlib, json, os, sys
out, ver, rsha = sys.argv[1:]
m = json.load(open(os.path.join(out, "manifest.json")))
if str(m.get("recipe_version")) != ver or m.get("recipe_sha256") != rsha:
    sys.exit(1)
for f, want in m["sha256"].items():
    p = os.path.join(out, f)
    if not os.path.isfile(p):
        sys.exit(1)
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for b in iter(lambda: fh.read(1 << 20), b""):
            h.update(b)
    if h.hexdigest() != want:
        sys.exit(1)
EOF
}

mkdir -p "$(dirname "$OUTDIR")"
exec 9>"$OUTDIR.lock"
flock 9   # one build per OUTDIR at a time

if [ "${FORCE:-0}" != 1 ] && up_to_date; then
    echo "build-tiny.sh: $OUTDIR is up to date (recipe $RECIPE_VERSION) [$(elapsed)s]"
    exit 0
fi

WORK=$(mktemp -d /tmp/nimbus-build-tiny.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

# ---- download ------------------------------------------------------------------
apt_dl() {
    apt-get -q -o APT::Sandbox::User=root download "$@" >>"$WORK/apt.log" 2>&1
}
have_candidate() {
    apt-cache policy "$1" 2>/dev/null | grep -q 'Candidate: [0-9]'
}
if ! have_candidate "$KERNEL_META" || ! have_candidate "$BUSYBOX_PKG"; then
    apt-get -q update >>"$WORK/apt.log" 2>&1 || { cat "$WORK/apt.log" >&2; die "apt-get update failed"; }
fi
mkdir debs
(cd debs && apt_dl "$KERNEL_META" "$BUSYBOX_PKG" "${SSH_PKGS[@]}") || { cat "$WORK/apt.log" >&2; die "apt-get download failed"; }
# Follow the metapackage to the versioned kernel package (first linux-image-* dependency).
KPKG=$(dpkg-deb -f debs/"${KERNEL_META}"_*.deb Depends | tr ',|' '\n\n' |
    sed -n 's/^[[:space:]]*\(linux-image-[^[:space:](]*\).*/\1/p' | head -n 1)
[ -n "$KPKG" ] || die "cannot find the kernel package behind $KERNEL_META"
(cd debs && apt_dl "$KPKG") || { cat "$WORK/apt.log" >&2; die "apt-get download $KPKG failed"; }
KDEB=$(ls debs/"${KPKG}"_*.deb)
BDEB=$(ls debs/"${BUSYBOX_PKG}"_*.deb)
KPKG_VER=$(dpkg-deb -f "$KDEB" Version)
BB_VER=$(dpkg-deb -f "$BDEB" Version)

mkdir pkg ssh
dpkg -x "$KDEB" pkg
dpkg -x "$BDEB" pkg
SSH_VERS=()
for p in "${SSH_PKGS[@]}"; do
    deb=$(ls debs/"${p}"_*.deb)
    dpkg -x "$deb" ssh
    SSH_VERS+=("$p=$(dpkg-deb -f "$deb" Version)")
done
KVER=$(ls pkg/lib/modules | head -n 1)
[ -n "$KVER" ] && [ -f "pkg/boot/vmlinuz-$KVER" ] || die "no kernel in $KDEB"
MODDIR=pkg/lib/modules/$KVER
BB=pkg/bin/busybox
[ -x "$BB" ] || die "no busybox in $BDEB"

# ---- modules: resolve dependencies, dependency order ----------------------------
declare -A KO=() SEEN=()
while IFS= read -r f; do
    n=$(basename "$f" .ko)
    KO[$n]=$f
    KO[${n//-/_}]=$f
done < <(find "$MODDIR/kernel" -name '*.ko')
is_builtin() { grep -q "/$1.ko\$" "$MODDIR/modules.builtin" 2>/dev/null || grep -q "/${1//_/-}.ko\$" "$MODDIR/modules.builtin" 2>/dev/null; }
ORDER=()
visit() {
    local m=${1//-/_} d deps
    [ -n "${SEEN[$m]:-}" ] && return 0
    SEEN[$m]=1
    if [ -z "${KO[$m]:-}" ]; then
        is_builtin "$m" && return 0
        die "module $m is neither a module nor builtin in $KVER"
    fi
    deps=$(tr '\0' '\n' <"${KO[$m]}" | sed -n 's/^depends=//p' | head -n 1)
    for d in ${deps//,/ }; do visit "$d"; done
    ORDER+=("$m")
}
for m in "${WANT_MODULES[@]}"; do visit "$m"; done

# ---- initramfs -----------------------------------------------------------------
R=initramfs
mkdir -p $R/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,mnt/seed,mnt/root,lib/modules,etc/udhcpc,etc/acpi/PWRF,var/run,var/log}
cp "$BB" $R/bin/busybox
# Applet links, made at build time (busybox --list-full gives e.g. "sbin/insmod").
"$BB" --list-full | while read -r a; do
    [ "$a" = bin/busybox ] && continue
    mkdir -p "$R/$(dirname "$a")"
    ln -sf /bin/busybox "$R/$a"
done
: >$R/lib/modules/load-order
for m in "${ORDER[@]}"; do
    cp "${KO[$m]}" "$R/lib/modules/$m.ko"
    echo "$m" >>$R/lib/modules/load-order
done
# dropbear and, recursively, the shared libraries it needs (DT_NEEDED).
mkdir -p $R/usr/sbin $R/lib/x86_64-linux-gnu $R/lib64 $R/.ssh $R/etc/dropbear
install -m 755 ssh/usr/sbin/dropbear $R/usr/sbin/dropbear
install -m 755 ssh/lib64/ld-linux-x86-64.so.2 $R/lib64/ld-linux-x86-64.so.2
declare -A LIBSEEN=()
need_libs() {
    local lib f
    for lib in $(readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
        [ -n "${LIBSEEN[$lib]:-}" ] && continue
        LIBSEEN[$lib]=1
        f=
        for c in ssh/lib/x86_64-linux-gnu/"$lib" ssh/usr/lib/x86_64-linux-gnu/"$lib"; do
            if [ -e "$c" ]; then f=$c; break; fi
        done
        [ -n "$f" ] || die "dropbear needs $lib, which none of ${SSH_PKGS[*]} holds"
        cp -L "$f" $R/lib/x86_64-linux-gnu/"$lib"
        need_libs "$f"
    done
}
need_libs ssh/usr/sbin/dropbear
chmod 700 $R/.ssh
install -m 755 "$SRC/init" $R/init
install -m 755 "$SRC/udhcpc.script" $R/etc/udhcpc/default.script
install -m 755 "$SRC/power-button" $R/etc/acpi/PWRF/00000080
printf 'root:x:0:0:root:/:/bin/sh\n' >$R/etc/passwd
printf 'root:x:0:\n' >$R/etc/group
printf 'nimbus-tiny recipe=%s kernel=%s busybox=%s %s\n' "$RECIPE_VERSION" "$KVER" "$BB_VER" "${SSH_VERS[*]}" >$R/etc/nimbus-release
printf '/bin/sh\n' >$R/etc/shells
mknod -m 600 $R/dev/console c 5 1 2>/dev/null || true
find $R -exec touch -h -d "@$EPOCH" {} +
(cd $R && find . -mindepth 1 | LC_ALL=C sort |
    cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -9 -n >initrd.img

# ---- root disk -----------------------------------------------------------------
RD=rootdir
mkdir -p $RD/etc $RD/var/lib/nimbus
printf 'nimbus-tiny rootfs recipe=%s\n' "$RECIPE_VERSION" >$RD/etc/nimbus-release
find $RD -exec touch -h -d "@$EPOCH" {} +
truncate -s "$ROOTFS_SIZE" rootfs.raw
E2FSPROGS_FAKE_TIME=$EPOCH mke2fs -q -F -t ext4 -L nimbus-root -U "$ROOTFS_UUID" \
    -E "hash_seed=$ROOTFS_HASH_SEED,root_owner=0:0" -d $RD rootfs.raw "$ROOTFS_SIZE"
# mke2fs -d copies each file's ctime, which touch cannot set: pin the inode times.
(cd $RD && find . | sed 's|^\.||; s|^$|/|') | while read -r p; do
    for f in ctime atime mtime crtime; do echo "set_inode_field \"$p\" $f @$EPOCH"; done
done >debugfs.cmds
E2FSPROGS_FAKE_TIME=$EPOCH debugfs -w -f debugfs.cmds rootfs.raw >debugfs.log 2>&1 ||
    { cat debugfs.log >&2; die "debugfs failed"; }
qemu-img convert -q -f raw -O qcow2 rootfs.raw rootfs.qcow2

# ---- publish -------------------------------------------------------------------
NEW=$OUTDIR.new.$$
rm -rf "$NEW"
mkdir -p "$NEW"
cp "pkg/boot/vmlinuz-$KVER" "$NEW/vmlinuz"
mv initrd.img rootfs.qcow2 "$NEW/"
python3 - "$NEW" <<EOF
import hashlib, json, os, sys
out = sys.argv[1]
files = ["vmlinuz", "initrd.img", "rootfs.qcow2"]
def sha(p):
    h = hashlib.sha256()
    with open(os.path.join(out, p), "rb") as fh:
        for b in iter(lambda: fh.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()
m = {
    "name": "nimbus-tiny",
    "kernel": "vmlinuz",
    "initrd": "initrd.img",
    "root_disk": "rootfs.qcow2",
    "root_disk_format": "qcow2",
    "root_disk_virtual_size": "$ROOTFS_SIZE",
    "cmdline": "$CMDLINE",
    "sha256": {f: sha(f) for f in files},
    "kernel_version": "$KVER",
    "kernel_package": "$KPKG=$KPKG_VER",
    "busybox_package": "$BUSYBOX_PKG=$BB_VER",
    "ssh_packages": "${SSH_VERS[*]}".split(),
    "modules": "${ORDER[*]}".split(),
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
echo "build-tiny.sh: built $OUTDIR (kernel $KVER, modules: ${ORDER[*]}) [$(elapsed)s]"
