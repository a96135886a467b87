#!/usr/bin/env bash
# Measures the project's Ceph (docs/ceph.md's figures): start times, the
# daemons' RSS, and the latency of RBD operations through the rbd tool (as the
# volumes crate runs it, process start included; median of 10).
#
#   scripts/ceph-bench.sh
#
# Uses clusters of its own in a temporary NIMBUS_HOME, on ports 26500/26510+,
# so the developer's clusters are never touched; wipes them at the end.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NIMBUS_HOME=$(mktemp -d /tmp/nimbus-ceph-bench.XXXXXX)
export NIMBUS_HOME
CEPH=$REPO/scripts/ceph.sh
cleanup() {
    NIMBUS_CEPH_PORT=26500 "$CEPH" wipe || true
    NIMBUS_CEPH_PORT=26510 "$CEPH" --osds 3 wipe || true
    rm -rf "$NIMBUS_HOME"
}
trap cleanup EXIT

now() { date +%s%N; }
ms() { echo $((($(now) - $1) / 1000000)); }
# Milliseconds of "$@" (tenths), quiet.
t() {
    local s
    s=$(now)
    "$@" >/dev/null 2>&1 || { echo "failed: $*" >&2; exit 1; }
    echo $((($(now) - s) / 100000))
}
med() { sort -n | awk '{a[NR]=$1} END {printf "median %.1f ms (min %.1f, max %.1f)\n", (a[5]+a[6])/20, a[1]/10, a[NR]/10}'; }
rss() { awk '/^VmRSS/ {printf "%d MB", $2/1024}' "/proc/$1/status"; }

one() { NIMBUS_CEPH_PORT=26500 "$CEPH" "$@"; }
three() { NIMBUS_CEPH_PORT=26510 "$CEPH" --osds 3 "$@"; }
D1=$NIMBUS_HOME/ceph

s=$(now); one start 2>/dev/null; echo "one OSD, create from nothing: $(ms "$s") ms"
for i in 1 2 3; do
    one stop
    s=$(now); one start; echo "one OSD, start after stop (data kept): $(ms "$s") ms"
done
kill -9 "$(cat "$D1/run/mon.a.pid")" "$(cat "$D1/run/osd.0.pid")"
sleep 1
s=$(now); one start; echo "one OSD, start after kill -9 of both (as after a reboot): $(ms "$s") ms"

eval "$(one env)"
R=(rbd -c "$NIMBUS_CEPH_CONF" --id "$NIMBUS_CEPH_CLIENT" --keyring "$NIMBUS_CEPH_KEYRING")
P=$NIMBUS_CEPH_POOL
echo -n "rbd create (10 GiB):   "; for i in $(seq 10); do t "${R[@]}" create --size 10G "$P/m$i"; done | med
echo -n "rbd snap create:       "; for i in $(seq 10); do t "${R[@]}" snap create --no-progress "$P/m$i@s"; done | med
echo -n "rbd snap protect:      "; for i in $(seq 10); do t "${R[@]}" snap protect "$P/m$i@s"; done | med
echo -n "rbd clone:             "; for i in $(seq 10); do t "${R[@]}" clone "$P/m$i@s" "$P/c$i"; done | med
echo -n "rbd info --format json:"; for i in $(seq 10); do t "${R[@]}" info --format json "$P/c$i"; done | med
echo -n "rbd flatten (unwritten clone): "; for i in $(seq 10); do t "${R[@]}" flatten --no-progress "$P/c$i"; done | med
echo -n "rbd rm (10 GiB, unwritten): "; for i in $(seq 10); do t "${R[@]}" rm --no-progress "$P/c$i"; done | med
head -c 64M /dev/urandom >"$NIMBUS_HOME/64m.raw"
s=$(now); "${R[@]}" import --no-progress "$NIMBUS_HOME/64m.raw" "$P/imported"; echo "rbd import 64 MiB: $(ms "$s") ms"
echo "RSS after the above: ceph-mon $(rss "$(cat "$D1/run/mon.a.pid")"), ceph-osd $(rss "$(cat "$D1/run/osd.0.pid")")"

s=$(now); three start 2>/dev/null; echo "three OSDs, create from nothing: $(ms "$s") ms"
three stop
s=$(now); three start; echo "three OSDs, start after stop: $(ms "$s") ms"
s=$(now); three stop-osd 1; echo "stop-osd 1 (until the monitor has it down): $(ms "$s") ms"
s=$(now); three start-osd 1; echo "start-osd 1 (until up): $(ms "$s") ms"
echo "RSS, three OSDs idle: $(for f in "$NIMBUS_HOME"/ceph-3/run/*.pid; do echo -n "$(basename "$f" .pid) $(rss "$(cat "$f")"); "; done)"
