#!/usr/bin/env bash
# Boot the nimbus-tiny image once under libvirt (qemu:///system, TCG) and check the
# /init console contract end to end.
#
#   images/try-boot.sh [--reboot] [--shutdown] [--keep] [--timeout SEC]
#
#   --reboot    after NIMBUS-READY: `virsh reboot`, expect a second NIMBUS-READY in the
#               same console file and the root disk to remember the first boot
#   --shutdown  at the end: `virsh shutdown` (ACPI power button) instead of destroy and
#               expect the transient domain to disappear (on_poweroff=destroy)
#   --keep      keep the work dir (console log, overlay, XML) for inspection
#   --no-metadata  do not start the metadata server; expect "NIMBUS-METADATA error"
#   --plain-http   use `python3 -m http.server` (closes the connection after each
#               response) instead of the keep-alive server: shows that reconnect=1
#               lets later requests through again
#
# Steps: install-deps + build-tiny (both no-ops when done), per-guest work dir with a
# qcow2 overlay on rootfs.qcow2, a NoCloud seed ISO and a metadata HTTP server on a
# free 127.0.0.1 port; fill images/example-domain.xml; `virsh create`; poll the
# console file for the NIMBUS-* lines; assert; print timings; destroy; clean up.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
NIMBUS_HOME=${NIMBUS_HOME:-$REPO/.nimbus}
IMG=$NIMBUS_HOME/images/tiny
VIRSH=(virsh -q -c qemu:///system)
DO_REBOOT=0 DO_SHUTDOWN=0 KEEP=0 TIMEOUT=120 NO_MD=0 PLAIN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --reboot) DO_REBOOT=1 ;;
        --shutdown) DO_SHUTDOWN=1 ;;
        --keep) KEEP=1 ;;
        --no-metadata) NO_MD=1 ;;
        --plain-http) PLAIN=1 ;;
        --timeout) TIMEOUT=$2; shift ;;
        *) echo "usage: $0 [--reboot] [--shutdown] [--keep] [--no-metadata] [--plain-http] [--timeout SEC]" >&2; exit 2 ;;
    esac
    shift
done

die() { echo "try-boot.sh: FAIL: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

"$REPO/scripts/install-deps.sh"
"$HERE/build-tiny.sh" "$IMG" >/dev/null

IID=i-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n' | cut -c1-17)
NAME=nimbus-try-$IID
WORK=$NIMBUS_HOME/try-boot/$IID
mkdir -p "$WORK/seed" "$WORK/md/latest/meta-data"
HTTP_PID=
cleanup() {
    "${VIRSH[@]}" destroy "$NAME" >/dev/null 2>&1 || true
    [ -n "$HTTP_PID" ] && kill "$HTTP_PID" 2>/dev/null || true
    if [ $KEEP = 1 ]; then echo "try-boot.sh: kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# Per-guest files.
qemu-img create -q -f qcow2 -F qcow2 -b "$IMG/rootfs.qcow2" "$WORK/root.qcow2"
printf 'instance-id: %s\nlocal-hostname: %s\n' "$IID" "$IID" >"$WORK/seed/meta-data"
printf '#cloud-config\n{}\n' >"$WORK/seed/user-data"
(cd "$WORK/seed" && genisoimage -quiet -output "$WORK/seed.iso" -volid cidata -joliet -rock meta-data user-data)
printf '%s' "$IID" >"$WORK/md/latest/meta-data/instance-id"
CONSOLE=$WORK/console.log

# Metadata server on a free loopback port. With reconnect=1 on the guestfwd chardev
# QEMU would also start (and retry every second) if it were not listening yet.
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$WORK/mdserver.py" <<'PY'
# Metadata server for ONE guest. QEMU's guestfwd to a tcp chardev is a single
# persistent host connection that carries every guest connection back to back, so:
# never close it (ignore "Connection: close"), always send Content-Length.
import http.server, os, sys

root, port = sys.argv[1], int(sys.argv[2])

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def handle_one_request(self):
        super().handle_one_request()
        if self.raw_requestline:       # keep the stream open unless QEMU hung up
            self.close_connection = False

    def do_GET(self):
        p = os.path.normpath(self.path.split("?")[0]).lstrip("/")
        f = os.path.join(root, p)
        if p.startswith("..") or not os.path.isfile(f):
            body, code = b"not found\n", 404
        else:
            body, code = open(f, "rb").read(), 200
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
PY
if [ $NO_MD = 0 ]; then
    if [ $PLAIN = 1 ]; then
        python3 -m http.server --bind 127.0.0.1 --directory "$WORK/md" "$PORT" >"$WORK/http.log" 2>&1 &
    else
        python3 "$WORK/mdserver.py" "$WORK/md" "$PORT" >"$WORK/http.log" 2>&1 &
    fi
    HTTP_PID=$!
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
        sleep 0.05
    done
fi

python3 - "$HERE/example-domain.xml" "$WORK/domain.xml" <<EOF
import sys
from xml.sax.saxutils import escape
subst = {
    "NAME": "$NAME", "MEMORY_MIB": "256",
    "KERNEL": "$IMG/vmlinuz", "INITRD": "$IMG/initrd.img",
    "CMDLINE": __import__("json").load(open("$IMG/manifest.json"))["cmdline"],
    "ROOT_DISK": "$WORK/root.qcow2", "BASE_DISK": "$IMG/rootfs.qcow2",
    "SEED_ISO": "$WORK/seed.iso",
    "CONSOLE_LOG": "$CONSOLE", "METADATA_PORT": "$PORT",
}
x = open(sys.argv[1]).read()
for k, v in subst.items():
    x = x.replace("@" + k + "@", escape(v, {"'": "&apos;"}))
assert "@" not in x.replace("xmlns:qemu", ""), "unfilled placeholder"
open(sys.argv[2], "w").write(x)
EOF

# Wait until LINE_PREFIX appears COUNT times in the console; print elapsed since T0.
wait_line() {
    local prefix=$1 count=$2 t0=$3 deadline=$((SECONDS + TIMEOUT))
    while [ "$(tr -d '\r' <"$CONSOLE" 2>/dev/null | grep -c "^$prefix")" -lt "$count" ]; do
        if [ $SECONDS -ge $deadline ]; then
            echo "---- console ----" >&2
            tr -d '\r' <"$CONSOLE" >&2 || true
            die "no '$prefix' (#$count) within ${TIMEOUT}s"
        fi
        sleep 0.05
    done
    since "$t0"
}
expect_line() { # exact line must be present
    tr -d '\r' <"$CONSOLE" | grep -qx "$1" || { tr -d '\r' <"$CONSOLE" >&2; die "missing console line '$1'"; }
}

T0=$(now)
"${VIRSH[@]}" create "$WORK/domain.xml" >/dev/null
t_create=$(since "$T0")
t_boot=$(wait_line "NIMBUS-BOOT " 1 "$T0")
t_root=$(wait_line "NIMBUS-ROOT " 1 "$T0")
t_md=$(wait_line "NIMBUS-METADATA " 1 "$T0")
t_ready=$(wait_line "NIMBUS-READY" 1 "$T0")
expect_line "NIMBUS-BOOT instance-id=$IID"
expect_line "NIMBUS-ROOT ok"
if [ $NO_MD = 0 ]; then
    expect_line "NIMBUS-METADATA instance-id=$IID"
else
    expect_line "NIMBUS-METADATA error"
fi
echo "try-boot.sh: OK $NAME (metadata port $PORT)"
echo "  virsh create returned  ${t_create}s"
echo "  NIMBUS-BOOT            ${t_boot}s"
echo "  NIMBUS-ROOT            ${t_root}s"
echo "  NIMBUS-METADATA        ${t_md}s"
echo "  NIMBUS-READY           ${t_ready}s"

if [ $DO_REBOOT = 1 ]; then
    T1=$(now)
    "${VIRSH[@]}" reboot "$NAME" >/dev/null
    t_r=$(wait_line "NIMBUS-READY" 2 "$T1")
    [ "$(tr -d '\r' <"$CONSOLE" | grep -c '^NIMBUS-BOOT ')" = 2 ] || die "console not appended across reboot"
    expect_line "NIMBUS-POWEROFF"
    [ "$(tr -d '\r' <"$CONSOLE" | grep -cx "NIMBUS-METADATA instance-id=$IID")" = 2 ] ||
        { tr -d '\r' <"$CONSOLE" >&2; die "metadata failed after reboot"; }
    echo "  virsh reboot -> 2nd NIMBUS-READY ${t_r}s (console appended, metadata ok again)"
fi

if [ $DO_SHUTDOWN = 1 ]; then
    T2=$(now)
    "${VIRSH[@]}" shutdown "$NAME" >/dev/null
    deadline=$((SECONDS + 60))
    while "${VIRSH[@]}" domstate "$NAME" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "guest did not power off within 60 s after virsh shutdown"
        sleep 0.1
    done
    expect_line "NIMBUS-POWEROFF"
    echo "  virsh shutdown -> domain gone ${t_s:=$(since "$T2")}s"
fi
