#!/bin/sh
# mmdebstrap --customize-hook of images/build-debian.sh, run on the host after
# every package is installed: $1 = the image's root directory (mmdebstrap has
# /dev, /proc and /sys mounted in it). Settings come from the environment:
# ROOT_UUID, ROOT_LABEL, DISK_ID (MBR disk identifier, 8 hex digits).
#
# - cloud defaults: fstab, hostname, sshd config, locale (files/ was copied in
#   by the essential hook), services a cloud guest does not need are disabled
# - no per-machine identity: SSH host keys removed (cloud-init makes them on
#   first boot); mmdebstrap empties /etc/machine-id afterwards (systemd makes
#   one on first boot)
# - grub: the files `grub-install --target=i386-pc` would put in /boot/grub
#   (modules, boot.img, core.img) and the grub.cfg `update-grub` would write
#   on the guest; build-debian.sh writes boot.img and core.img onto the disk.
set -eu
R=$1
: "${ROOT_UUID:?}" "${ROOT_LABEL:?}" "${DISK_ID:?}"

# ---- cloud defaults ----------------------------------------------------------
printf 'UUID=%s / ext4 rw,discard,errors=remount-ro 0 1\n' "$ROOT_UUID" >"$R/etc/fstab"
echo localhost >"$R/etc/hostname"
# The same as sshd_config.d/50-nimbus-cloud.conf, in the main file: cloud-init's
# ssh_pwauth reads only this one and would otherwise edit it and restart sshd.
sed -i 's/^#\?PasswordAuthentication .*/PasswordAuthentication no/' "$R/etc/ssh/sshd_config"
grep -qx 'PasswordAuthentication no' "$R/etc/ssh/sshd_config"
# cloud-init renders the network config for netplan, which generates networkd
# units (full network-config v2: match by name glob, MAC, driver);
# resolved serves DNS (its package made /etc/resolv.conf its stub link).
chroot "$R" systemctl enable -q systemd-networkd.service systemd-resolved.service
ln -sf ../run/systemd/resolve/stub-resolv.conf "$R/etc/resolv.conf"
# Timers and services a short-lived cloud guest does not need at boot.
for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
    fstrim.timer; do
    if [ -e "$R/lib/systemd/system/$u" ]; then chroot "$R" systemctl disable -q "$u"; fi
done
# No host keys in the image: cloud-init's ssh module generates them on first boot.
rm -f "$R"/etc/ssh/ssh_host_*

# ---- grub (BIOS, grub-pc) ------------------------------------------------------
G=$R/boot/grub
mkdir -p "$G/i386-pc" "$G/fonts"
cp "$R"/usr/lib/grub/i386-pc/*.mod "$R"/usr/lib/grub/i386-pc/*.lst "$R"/usr/lib/grub/i386-pc/modinfo.sh \
    "$R"/usr/lib/grub/i386-pc/boot.img "$G/i386-pc/"
[ -f "$G/unicode.pf2" ] && mv "$G/unicode.pf2" "$G/fonts/unicode.pf2"
[ -f "$G/fonts/unicode.pf2" ] || cp "$R/usr/share/grub/unicode.pf2" "$G/fonts/"
# What grub-install builds for an ext4 partition on an MBR disk: the prefix is
# partition 1 of the disk the BIOS booted from.
chroot "$R" grub-mkimage -O i386-pc -o /boot/grub/i386-pc/core.img \
    -p '(,msdos1)/boot/grub' biosdisk part_msdos ext2
chroot "$R" grub-editenv /boot/grub/grubenv create

# grub.cfg exactly as update-grub writes it on the guest. grub-mkconfig asks
# grub-probe about the disk holding / and /boot, which in this chroot is the
# build host's: answer for the guest's disk instead (vda, MBR partition 1,
# ext4 with the image's fixed UUID). 10_linux writes root=UUID=... only when
# /dev/disk/by-uuid/<uuid> resolves: create it and a stand-in /dev/vda1 for the
# run (the chroot's /dev is its own directory, not the host's /dev).
if mountpoint -q "$R/dev"; then
    echo "customize.sh: $R/dev is a mount point; refusing to write in it" >&2
    exit 1
fi
mv "$R/usr/sbin/grub-probe" "$R/usr/sbin/grub-probe.real"
cat >"$R/usr/sbin/grub-probe" <<EOF
#!/bin/sh
t=
while [ \$# -gt 0 ]; do
    case "\$1" in
        --target=*) t=\${1#--target=} ;;
        -t|--target) t=\$2; shift ;;
    esac
    shift
done
case "\$t" in
    device) echo /dev/vda1 ;;
    disk) echo /dev/vda ;;
    fs) echo ext2 ;;
    fs_uuid) echo $ROOT_UUID ;;
    fs_label) echo $ROOT_LABEL ;;
    partuuid) echo $DISK_ID-01 ;;
    partmap) echo msdos ;;
    abstraction|cryptodisk_uuid) ;;
    drive) echo '(hd0,msdos1)' ;;
    compatibility_hint) echo hd0,msdos1 ;;
    hints_string) echo '--hint-bios=hd0,msdos1 --hint-efi=hd0,msdos1 --hint-baremetal=ahci0,msdos1' ;;
    *) echo "grub-probe (image build): no answer for --target=\$t" >&2; exit 1 ;;
esac
EOF
chmod 755 "$R/usr/sbin/grub-probe"
mkdir -p "$R/dev/disk/by-uuid"
: >"$R/dev/vda1"
ln -sf ../../vda1 "$R/dev/disk/by-uuid/$ROOT_UUID"
rc=0
chroot "$R" grub-mkconfig -o /boot/grub/grub.cfg 2>"$R/tmp/grub-mkconfig.log" || rc=$?
rm -rf "$R/dev/disk" "$R/dev/vda1"
mv "$R/usr/sbin/grub-probe.real" "$R/usr/sbin/grub-probe"
if [ $rc != 0 ]; then cat "$R/tmp/grub-mkconfig.log" >&2; exit $rc; fi
grep -q "root=UUID=$ROOT_UUID ro console=tty0 console=ttyS0" "$R/boot/grub/grub.cfg" ||
    { echo "customize.sh: unexpected grub.cfg:" >&2; cat "$R/boot/grub/grub.cfg" >&2; exit 1; }

# ---- leftovers that differ from build to build -----------------------------------
rm -f "$R"/var/cache/debconf/*-old "$R"/var/lib/dpkg/*-old
rm -rf "$R"/var/log/journal/* "$R"/var/lib/cloud/* "$R"/var/lib/systemd/random-seed
