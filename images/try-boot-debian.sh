#!/usr/bin/env bash
# Boot the Nimbus Debian cloud image (or any cloud qcow2 that boots from its own disk
# with cloud-init) once under libvirt (qemu:///system, TCG) and check it end to end:
# cloud-init takes its data from a NoCloud seed (or the EC2 metadata service with
# --ec2), the console shows cloud-init's "finished" line, and SSH as user `debian`
# with a generated key reads back a file the user-data wrote.
#
#   images/try-boot-debian.sh [--ec2 | --ec2-latest-only] [--base FILE] [--user NAME] [--disk-size SIZE]
#                             [--memory MIB] [--vcpus N] [--analyze] [--keep]
#                             [--timeout SEC]
#
#   --ec2        no seed disk: serve meta-data and user-data through QEMU's guestfwd
#                on 169.254.169.254:80 with the host agent's tree (GET only), under
#                /latest/ and under every dated version (/2009-04-04/ ...: cloud-init
#                polls /2009-04-04/meta-data/instance-id); prints the paths asked for
#   --ec2-latest-only  like --ec2 but only /latest/, as host-agent/src/metadata/routes.rs
#                serves it today (cloud-init then gives up on Ec2 after max_wait)
#   --base FILE  boot this qcow2 instead of building/using build-debian.sh's image
#                (e.g. an official Debian/Ubuntu genericcloud image)
#   --user NAME  the image's default user (default debian; ubuntu for Ubuntu images)
#   --disk-size  virtual size of the guest's overlay (default 4G: growpart and
#                resizefs must grow the 2 GiB root to it; checked over SSH)
#   --analyze    print systemd-analyze and cloud-init analyze blame from the guest
#   --keep       keep the work dir (console log, overlay, seed, XML, key)
#
# Steps: build-debian.sh (a no-op when its cached image is up to date); a per-guest
# dir under ${NIMBUS_HOME:-<repo>/.nimbus}/try-boot-debian/ with a qcow2 overlay, an
# SSH key pair, a NoCloud seed ISO (meta-data, user-data, network-config v2) or a
# metadata server; fill images/debian-domain.xml (user-mode network with hostfwd of
# a free 127.0.0.1 port to the guest's port 22); `virsh create`; wait on the console
# for cloud-init's finished line; ssh; print timings; destroy; clean up (trap).
#
# Console lines waited for (\r stripped):
#   first line of any kind             (grub's "Loading Linux ..." / the kernel)
#   NIMBUS-TRY-BOOT instance-id=<id> <nonce>      (written by the user-data's runcmd)
#   Cloud-init v. <ver> finished at <date>. Datasource <ds>. Up <s> seconds
#                                      (may follow a "[ uptime] cloud-init[pid]: " prefix)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
NIMBUS_HOME=${NIMBUS_HOME:-$REPO/.nimbus}
VIRSH=(virsh -q -c qemu:///system)
EC2=0 LATEST_ONLY=0 KEEP=0 ANALYZE=0 TIMEOUT=600 BASE= GUSER=debian DISK_SIZE=4G MEMORY=512 VCPUS=1
usage() { sed -n '7,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --ec2) EC2=1 ;;
        --ec2-latest-only) EC2=1 LATEST_ONLY=1 ;;
        --keep) KEEP=1 ;;
        --analyze) ANALYZE=1 ;;
        --base) BASE=$2; shift ;;
        --user) GUSER=$2; shift ;;
        --disk-size) DISK_SIZE=$2; shift ;;
        --memory) MEMORY=$2; shift ;;
        --vcpus) VCPUS=$2; shift ;;
        --timeout) TIMEOUT=$2; shift ;;
        *) usage ;;
    esac
    shift
done

die() { echo "try-boot-debian.sh: FAIL: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
for c in virsh qemu-img genisoimage ssh ssh-keygen python3; do
    command -v "$c" >/dev/null || die "missing $c (run scripts/install-deps.sh)"
done
"${VIRSH[@]}" version >/dev/null 2>&1 || die "libvirt does not answer (run scripts/install-deps.sh)"

if [ -z "$BASE" ]; then
    IMG=$("$HERE/build-debian.sh")
    BASE=$IMG/disk.qcow2
fi
BASE=$(cd "$(dirname "$BASE")" && pwd)/$(basename "$BASE")
[ -f "$BASE" ] || die "no image $BASE"

IID=i-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n' | cut -c1-17)
NONCE=$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
NAME=nimbus-try-$IID
WORK=$NIMBUS_HOME/try-boot-debian/$IID
mkdir -p "$WORK/seed" "$WORK/md"
chmod 755 "$NIMBUS_HOME" "$NIMBUS_HOME/try-boot-debian" "$WORK"
HTTP_PID=
cleanup() {
    "${VIRSH[@]}" destroy "$NAME" >/dev/null 2>&1 || true
    [ -n "$HTTP_PID" ] && kill "$HTTP_PID" 2>/dev/null || true
    if [ $KEEP = 1 ]; then echo "try-boot-debian.sh: kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# ---- per-guest files -------------------------------------------------------------
qemu-img create -q -f qcow2 -F qcow2 -b "$BASE" "$WORK/root.qcow2" "$DISK_SIZE"
want_size=$(qemu-img info --output=json "$WORK/root.qcow2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
ssh-keygen -q -t ed25519 -N '' -C "try-boot-debian@$IID" -f "$WORK/key"
PUBKEY=$(cat "$WORK/key.pub")
cat >"$WORK/user-data" <<EOF
#cloud-config
ssh_authorized_keys:
  - $PUBKEY
write_files:
  - path: /var/tmp/nimbus-try-boot
    content: |
      NIMBUS-TRY-BOOT instance-id=$IID $NONCE
runcmd:
  - [ sh, -c, 'cat /var/tmp/nimbus-try-boot >/dev/ttyS0' ]
EOF
SSH_PORT=$(free_port)
NETDEV="user,id=n0,restrict=on,net=169.254.169.0/24,host=169.254.169.1,dhcpstart=169.254.169.15,hostfwd=tcp:127.0.0.1:$SSH_PORT-:22"
if [ $EC2 = 0 ]; then
    printf 'instance-id: %s\nlocal-hostname: %s\n' "$IID" "$IID" >"$WORK/seed/meta-data"
    cp "$WORK/user-data" "$WORK/seed/user-data"
    # network-config v2: DHCP on whatever the first virtio NIC is called.
    printf 'version: 2\nethernets:\n  nic0:\n    match:\n      name: "e*"\n    dhcp4: true\n' >"$WORK/seed/network-config"
    (cd "$WORK/seed" && genisoimage -quiet -output "$WORK/seed.iso" -volid cidata -joliet -rock \
        meta-data user-data network-config)
else
    # The routes of the host agent's metadata server (host-agent/src/metadata/routes.rs):
    # GET only, everything under /latest/.
    M=$WORK/md/latest/meta-data
    mkdir -p "$M/public-keys/0" "$M/placement"
    printf '%s' "$IID" >"$M/instance-id"
    printf '%s' "$IID" >"$M/local-hostname"
    printf '%s' "$IID" >"$M/hostname"
    printf 'ami-00000000' >"$M/ami-id"
    printf 't2.micro' >"$M/instance-type"
    printf 'az1' >"$M/placement/availability-zone"
    printf 'availability-zone' >"$M/placement/_list"
    printf '0=try-boot' >"$M/public-keys/_list"
    printf 'openssh-key' >"$M/public-keys/0/_list"
    printf '%s' "$PUBKEY" >"$M/public-keys/0/openssh-key"
    printf 'ami-id\nhostname\ninstance-id\ninstance-type\nlocal-hostname\nplacement/\npublic-keys/\n' >"$M/_list"
    cp "$WORK/user-data" "$WORK/md/latest/user-data"
    MD_PORT=$(free_port)
    cat >"$WORK/mdserver.py" <<'PY'
# Metadata server for ONE guest (QEMU guestfwd: one persistent connection carries
# every guest connection, so never close it and always send Content-Length).
import http.server, os, re, sys
root, port, log = sys.argv[1], int(sys.argv[2]), open(sys.argv[3], "a", buffering=1)
latest_only = sys.argv[4] == "1"
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def handle_one_request(self):
        super().handle_one_request()
        if self.raw_requestline:
            self.close_connection = False
    def reply(self, code, body):
        log.write("%s %s %d\n" % (self.command, self.path, code))
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
    def do_GET(self):
        p = os.path.normpath(self.path.split("?")[0]).lstrip("/")
        if not latest_only:   # every dated API version answers like latest
            p = re.sub(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(/|$)", r"latest\1", p)
        f = os.path.join(root, p)
        if p.startswith(".."):
            return self.reply(404, b"Not Found\n")
        if os.path.isdir(f):
            f = os.path.join(f, "_list")
        if not os.path.isfile(f):
            return self.reply(404, b"Not Found\n")
        self.reply(200, open(f, "rb").read())
    def do_PUT(self):   # the agent's router answers other methods with 405
        n = int(self.headers.get("Content-Length") or 0)
        if n: self.rfile.read(n)
        self.reply(405, b"")
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
PY
    python3 "$WORK/mdserver.py" "$WORK/md" "$MD_PORT" "$WORK/md-requests.log" "$LATEST_ONLY" >"$WORK/http.log" 2>&1 &
    HTTP_PID=$!
    NETDEV="$NETDEV,guestfwd=tcp:169.254.169.254:80-tcp:127.0.0.1:$MD_PORT,,reconnect=1"
fi
CONSOLE=$WORK/console.log

python3 - "$HERE/debian-domain.xml" "$WORK/domain.xml" "$EC2" <<EOF
import re, sys
from xml.sax.saxutils import escape
subst = {
    "NAME": "$NAME", "MEMORY_MIB": "$MEMORY", "VCPUS": "$VCPUS",
    "ROOT_DISK": "$WORK/root.qcow2", "BASE_DISK": "$BASE",
    "SEED_ISO": "$WORK/seed.iso", "CONSOLE_LOG": "$CONSOLE", "NETDEV": "$NETDEV",
}
x = open(sys.argv[1]).read()
if sys.argv[3] == "1":   # no seed disk
    x = re.sub(r"\s*<!-- vdb:.*?</disk>", "", x, flags=re.S)
for k, v in subst.items():
    x = x.replace("@" + k + "@", escape(v, {"'": "&apos;"}))
assert "@" not in re.sub(r"<!--.*?-->", "", x, flags=re.S), "unfilled placeholder"
open(sys.argv[2], "w").write(x)
EOF

# ---- boot and wait -------------------------------------------------------------------
console() { tr -d '\r' <"$CONSOLE" 2>/dev/null || true; }
fail_console() {
    echo "---- console (last 60 lines) ----" >&2
    console | tail -n 60 >&2
    if [ $EC2 = 1 ]; then
        echo "---- metadata requests ----" >&2
        sort "$WORK/md-requests.log" | uniq -c >&2 || true
    fi
    die "$1"
}
wait_console() { # REGEX T0: wait until a console line matches; print seconds since T0
    local deadline=$((SECONDS + TIMEOUT))
    until console | grep -qE "$1"; do
        [ $SECONDS -lt $deadline ] || fail_console "no console line matching '$1' within ${TIMEOUT}s"
        if console | grep -qE 'Cloud-init v\. [^ ]+ finished at .*DataSourceNone'; then
            fail_console "cloud-init found no datasource (DataSourceNone)"
        fi
        sleep 0.1
    done
    since "$2"
}
SSH=(ssh -i "$WORK/key" -p "$SSH_PORT" -o BatchMode=yes -o ConnectTimeout=10
    -o UserKnownHostsFile="$WORK/known_hosts" -o StrictHostKeyChecking=yes -o LogLevel=ERROR
    "$GUSER@127.0.0.1")

T0=$(now)
"${VIRSH[@]}" create "$WORK/domain.xml" >/dev/null
t_create=$(since "$T0")
t_first=$(wait_console '.' "$T0")
t_grub=$(wait_console '^Loading Linux ' "$T0")
t_initrd=$(wait_console '^Loading initial ramdisk' "$T0")
t_kernel=$(wait_console 'Linux version ' "$T0")
t_ci=$(wait_console "Cloud-init v\\. [^ ]+ running 'init-local'" "$T0")
t_try=$(wait_console "^NIMBUS-TRY-BOOT instance-id=$IID $NONCE\$" "$T0")
t_done=$(wait_console 'Cloud-init v\. [^ ]+ finished at ' "$T0")
FINISHED=$(console | grep -oE 'Cloud-init v\. [^ ]+ finished at .*' | tail -n 1)

# The host keys the guest printed on its console (cloud-init keys-to-console) are
# the only ones SSH accepts: what GetConsoleOutput shows is what a user can trust.
console | sed -n '/^-----BEGIN SSH HOST KEY KEYS-----$/,/^-----END SSH HOST KEY KEYS-----$/p' |
    grep -v '^-----' | sed "s/^/[127.0.0.1]:$SSH_PORT /" >"$WORK/known_hosts"
[ -s "$WORK/known_hosts" ] || fail_console "no SSH host keys on the console"

deadline=$((SECONDS + TIMEOUT))
until GOT=$("${SSH[@]}" cat /var/tmp/nimbus-try-boot 2>"$WORK/ssh.err"); do
    [ $SECONDS -lt $deadline ] || { cat "$WORK/ssh.err" >&2; die "ssh to $GUSER@127.0.0.1:$SSH_PORT failed for ${TIMEOUT}s"; }
    sleep 0.5
done
t_ssh=$(since "$T0")
[ "$GOT" = "NIMBUS-TRY-BOOT instance-id=$IID $NONCE" ] || die "read back '$GOT'"

# A few cloud defaults, checked from inside.
CHECK=$("${SSH[@]}" 'echo "hostname=$(hostname)"
    echo "sudo=$(sudo -n id -u)"
    echo "root_size=$(df -B1 --output=size / | tail -n 1 | tr -d " ")"
    echo "machine_id=$(cat /etc/machine-id)"
    echo "password_auth=$(sudo -n sshd -T | sed -n "s/^passwordauthentication //p")"
    echo "datasource=$(sudo -n cat /run/cloud-init/status.json | python3 -c "import json,sys; print(json.load(sys.stdin)[\"v1\"][\"datasource\"])")"
    echo "errors=$(python3 -c "import json; print(json.load(open(\"/run/cloud-init/result.json\"))[\"v1\"][\"errors\"])")"' 2>&1) ||
    { echo "$CHECK" >&2; die "checks over ssh failed"; }
val() { echo "$CHECK" | sed -n "s/^$1=//p"; }
[ "$(val hostname)" = "$IID" ] || die "hostname is '$(val hostname)', not $IID"
[ "$(val sudo)" = 0 ] || die "passwordless sudo does not work"
[ "$(val password_auth)" = no ] || die "sshd allows password login"
echo "$(val machine_id)" | grep -qE '^[0-9a-f]{32}$' || die "no machine-id generated"
[ "$(val root_size)" -gt $((want_size * 9 / 10)) ] ||
    die "root file system is $(val root_size) bytes on a $want_size-byte disk: not grown"
case "$(val datasource)" in
    *NoCloud*) [ $EC2 = 0 ] || die "EC2 boot used $(val datasource)" ;;
    *Ec2*) [ $EC2 = 1 ] || die "seed boot used $(val datasource)" ;;
    *) die "datasource $(val datasource)" ;;
esac
[ "$(val errors)" = "[]" ] || echo "try-boot-debian.sh: cloud-init reported errors: $(val errors)" >&2

echo "try-boot-debian.sh: OK $NAME ($(basename "$(dirname "$BASE")")/$(basename "$BASE"), ssh port $SSH_PORT)"
echo "  $FINISHED"
echo "  datasource: $(val datasource); hostname $(val hostname); root fs $(val root_size) bytes; machine-id $(val machine_id)"
echo "  virsh create returned        ${t_create}s"
echo "  first console line           ${t_first}s"
echo "  grub: Loading Linux          ${t_grub}s"
echo "  grub: Loading initial ramdisk ${t_initrd}s"
echo "  kernel (Linux version)       ${t_kernel}s"
echo "  cloud-init init-local        ${t_ci}s"
echo "  NIMBUS-TRY-BOOT (runcmd)     ${t_try}s"
echo "  cloud-init finished          ${t_done}s"
echo "  SSH works (file read back)   ${t_ssh}s"
if [ $EC2 = 1 ]; then
    echo "  metadata requests:"
    sed 's/^/    /' "$WORK/md-requests.log"
fi
if [ $ANALYZE = 1 ]; then
    "${SSH[@]}" 'systemd-analyze; systemd-analyze blame | head -n 15; sudo -n cloud-init analyze blame 2>&1 | head -n 25' || true
fi
