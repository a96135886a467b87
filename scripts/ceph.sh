#!/usr/bin/env bash
# A Ceph cluster owned by the project (RBD volumes, issue 20), started like
# scripts/pg.sh's PostgreSQL: one monitor and one (or three) bluestore OSDs on
# sparse files, all on 127.0.0.1, no manager daemon (RBD needs none), no
# systemd, no cephadm.
#
#   scripts/ceph.sh [--osds N] start      # create on first use, start what is not running,
#                                         # wait until the pool answers (idempotent)
#   scripts/ceph.sh [--osds N] stop       # stop the OSDs then the monitor (no-op when stopped)
#   scripts/ceph.sh [--osds N] status     # print the daemons; exit 0 when the pool answers
#   scripts/ceph.sh [--osds N] env        # shell exports for a client: eval "$(scripts/ceph.sh env)"
#   scripts/ceph.sh [--osds N] wipe       # stop, then delete the cluster's data and keys
#   scripts/ceph.sh [--osds N] stop-osd I # stop OSD I (fault tests); waits until the monitor sees it down
#   scripts/ceph.sh [--osds N] start-osd I # start OSD I; waits until the monitor sees it up
#
# Environment:
#   NIMBUS_HOME            default <repo>/.nimbus
#   NIMBUS_CEPH_OSDS       number of OSDs (default 1; --osds wins). One OSD: the cluster lives in
#                          $NIMBUS_HOME/ceph, pool size 1. N OSDs: $NIMBUS_HOME/ceph-N, pool size
#                          min(N,3) (min_size 2 with three: one OSD may be down), so replication
#                          is exercised.
#   NIMBUS_CEPH_PORT       the monitor's msgr2 port (default 26300 for one OSD, 26300+10*N
#                          otherwise); its legacy msgr1 port is PORT+1. Below Linux's ephemeral
#                          range, and not Ceph's 3300/6789, so a real Ceph on this host is no clash.
#   NIMBUS_CEPH_OSD_SIZE   each OSD's sparse block file, bytes (default 8 GiB; only written blocks
#                          use disk). Applies when an OSD is created.
#   NIMBUS_CEPH_WAIT_SECS  bound on each wait (default 120)
#
# Layout ($DIR = $NIMBUS_HOME/ceph or ceph-N, 0700, root's): ceph.conf (0644: QEMU reads it),
# keyrings 0600 (mon., client.admin, client.nimbus, each OSD's), mon.a/, osd.I/ (block file),
# run/ (pid files, admin sockets), log/. A cluster is complete once $DIR/created exists: a
# directory without it (a create that was interrupted) is wiped and made again.
#
# Clients: client.nimbus, caps `profile rbd` on the monitor and `profile rbd pool=nimbus-volumes`
# on the OSDs; its key stays in its keyring file (never on a command line).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NIMBUS_HOME=${NIMBUS_HOME:-$REPO/.nimbus}
OSDS=${NIMBUS_CEPH_OSDS:-1}
if [ "${1:-}" = --osds ]; then
    OSDS=${2:?--osds needs a number}
    shift 2
fi
case $OSDS in '' | *[!0-9]* | 0) echo "ceph.sh: bad OSD count '$OSDS'" >&2; exit 2 ;; esac
if [ "$OSDS" = 1 ]; then
    DIR=$NIMBUS_HOME/ceph
    PORT=${NIMBUS_CEPH_PORT:-26300}
    SIZE=1 MIN_SIZE=1
else
    DIR=$NIMBUS_HOME/ceph-$OSDS
    PORT=${NIMBUS_CEPH_PORT:-$((26300 + 10 * OSDS))}
    SIZE=$((OSDS < 3 ? OSDS : 3))
    MIN_SIZE=$((SIZE > 2 ? 2 : 1))
fi
PORT1=$((PORT + 1))
MON_HOST="[v2:127.0.0.1:$PORT,v1:127.0.0.1:$PORT1]"
POOL=nimbus-volumes
CLIENT=nimbus
CONF=$DIR/ceph.conf
WAIT=${NIMBUS_CEPH_WAIT_SECS:-120}
OSD_SIZE=${NIMBUS_CEPH_OSD_SIZE:-8589934592}
ME="ceph.sh[$(basename "$DIR")]"

die() { echo "$ME: $*" >&2; exit 1; }
say() { echo "$ME: $*" >&2; }

# The admin's ceph command, bounded: a monitor that does not answer fails in seconds.
admin() { timeout 30 ceph -c "$CONF" --connect-timeout 10 "$@"; }

# Runs "$@" quietly (Ceph's tools chat on stderr); on failure prints its output and dies.
quiet() {
    local out
    out=$("$@" 2>&1) || { printf '%s\n' "$out" >&2; die "failed: $*"; }
}

# The pid of a daemon (mon.a, osd.0) when it runs from this cluster, else nothing.
pid_of() {
    local f=$DIR/run/$1.pid pid
    [ -s "$f" ] || return 1
    pid=$(cat "$f")
    [ -r "/proc/$pid/cmdline" ] || return 1
    # The pid file may be stale after a restart: the process must be ours.
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$CONF" || return 1
    echo "$pid"
}

# Waits until "$@" succeeds, at most $WAIT s, saying what it waits for.
wait_for() {
    local what=$1 start=$SECONDS
    shift
    until "$@" >/dev/null 2>&1; do
        [ $((SECONDS - start)) -lt "$WAIT" ] || die "timed out after $WAIT s waiting for $what (logs: $DIR/log/)"
        sleep 0.5
    done
}

write_conf() {
    # Rewritten on every start so NIMBUS_CEPH_PORT / a moved repo take effect (the
    # monitor's own address is in its store: a changed port is re-injected below).
    local tmp
    tmp=$(mktemp "$DIR/ceph.conf.XXXXXX")
    cat >"$tmp" <<EOF
# Managed by scripts/ceph.sh -- rewritten on every start.
[global]
fsid = $(cat "$DIR/fsid")
mon_host = $MON_HOST
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
run_dir = $DIR/run
pid_file = $DIR/run/\$name.pid
admin_socket = $DIR/run/\$name.asok
log_file = $DIR/log/\$name.log
mon_cluster_log_file = $DIR/log/cluster.log
# One host: replicas go to different OSDs, and an OSD's peers on the same host
# may report it down (by default reporters must come from two hosts).
osd_crush_chooseleaf_type = 0
mon_osd_reporter_subtree_level = osd
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_pool_default_size = $SIZE
osd_pool_default_min_size = $MIN_SIZE
osd_pool_default_pg_autoscale_mode = off

[mon]
mon_data = $DIR/\$name
keyring = $DIR/mon.keyring
# Each RBD snapshot asks the monitor for a snapshot id, a change to the OSD map:
# with the default 1 s between Paxos proposals, \`rbd snap create\` took 1 s here;
# with 50 ms, 0.14 s. One monitor, few changes: the extra proposals cost nothing.
paxos_propose_interval = 0.05

[osd]
osd_data = $DIR/\$name
keyring = $DIR/\$name/keyring
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = $OSD_SIZE
# A small machine: one op shard, one thread, a small cache.
osd_memory_target = 536870912
osd_op_num_shards = 1
osd_op_num_threads_per_shard = 1

[client]
# Clients (rbd, QEMU's librbd as libvirt-qemu) get no admin socket or log here.
admin_socket =
log_file = /dev/null

[client.admin]
keyring = $DIR/client.admin.keyring
EOF
    chmod 644 "$tmp"
    mv "$tmp" "$CONF"
}

start_mon() {
    pid_of mon.a >/dev/null && return 0
    rm -f "$DIR/run/mon.a.asok"
    # A changed port: the monitor's address lives in its store, so re-inject the map.
    if ! ceph-mon -c "$CONF" -i a --extract-monmap "$DIR/monmap.now" >/dev/null 2>&1 ||
        ! monmaptool --print "$DIR/monmap.now" 2>/dev/null | grep -qF "v2:127.0.0.1:$PORT/"; then
        monmaptool --create --clobber --fsid "$(cat "$DIR/fsid")" --addv a "$MON_HOST" "$DIR/monmap.now" >/dev/null
        ceph-mon -c "$CONF" -i a --inject-monmap "$DIR/monmap.now" >/dev/null 2>&1 ||
            die "could not inject the monitor map (log: $DIR/log/mon.a.log)"
    fi
    rm -f "$DIR/monmap.now"
    # Another cluster (another checkout's NIMBUS_HOME) on our port: say so now
    # rather than time out waiting for a monitor that could not bind.
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
        die "127.0.0.1:$PORT is taken by another process (another checkout's cluster? set NIMBUS_CEPH_PORT)"
    fi
    # The daemons must not inherit the lock (fd 9): they would hold it for their lifetime.
    quiet ceph-mon -c "$CONF" -i a 9>&-
}

mon_ok() { admin mon stat; }

# Waits until the monitor answers; a monitor that exits is reported at once.
wait_mon() {
    local start=$SECONDS
    until mon_ok >/dev/null 2>&1; do
        pid_of mon.a >/dev/null || die "ceph-mon exited (log: $DIR/log/mon.a.log)"
        [ $((SECONDS - start)) -lt "$WAIT" ] || die "timed out after $WAIT s waiting for the monitor on 127.0.0.1:$PORT (log: $DIR/log/mon.a.log)"
        sleep 0.5
    done
}

osd_up() { admin osd dump --format json | grep -qE "\"osd\":$1,\"uuid\":\"[^\"]*\",\"up\":1"; }
osd_down() { admin osd dump --format json | grep -qE "\"osd\":$1,\"uuid\":\"[^\"]*\",\"up\":0"; }

start_osd() {
    local i=$1
    pid_of "osd.$i" >/dev/null && return 0
    rm -f "$DIR/run/osd.$i.asok"
    quiet ceph-osd -c "$CONF" -i "$i" 9>&-
}

# The pool answers a client: the nimbus key lists it (its placement groups are active).
pool_ok() {
    timeout 15 rbd -c "$CONF" --id "$CLIENT" --keyring "$DIR/client.$CLIENT.keyring" -p "$POOL" ls
}

create() {
    [ "$(id -u)" = 0 ] || die "run as root"
    if [ -d "$DIR" ]; then
        say "$DIR exists but was never completed: wiping it and creating the cluster again"
        stop_all
        rm -rf "$DIR"
    fi
    say "creating a cluster with $OSDS OSD(s) in $DIR (monitor on 127.0.0.1:$PORT)"
    mkdir -p "$NIMBUS_HOME"
    (umask 077 && mkdir "$DIR" "$DIR/run" "$DIR/log")
    # Traversable (not listable) by others: QEMU (libvirt-qemu) reads ceph.conf;
    # every key stays in a 0600 file.
    chmod 711 "$DIR"
    cat /proc/sys/kernel/random/uuid >"$DIR/fsid"
    write_conf
    (
        umask 077
        ceph-authtool --create-keyring "$DIR/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
        ceph-authtool --create-keyring "$DIR/client.admin.keyring" --gen-key -n client.admin \
            --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
        ceph-authtool "$DIR/mon.keyring" --import-keyring "$DIR/client.admin.keyring" >/dev/null
    )
    monmaptool --create --fsid "$(cat "$DIR/fsid")" --addv a "$MON_HOST" "$DIR/monmap" >/dev/null
    ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/mon.keyring" >/dev/null 2>&1 ||
        die "ceph-mon --mkfs failed (log: $DIR/log/mon.a.log)"
    rm -f "$DIR/monmap"
    start_mon
    wait_mon
    # Clients of this cluster are all pacific: RBD clone v2 (no protect needed,
    # though the volumes crate still protects) and msgr2 everywhere.
    admin osd set-require-min-compat-client mimic >/dev/null 2>&1 || true
    local i uuid
    for ((i = 0; i < OSDS; i++)); do
        uuid=$(cat /proc/sys/kernel/random/uuid)
        quiet admin osd new "$uuid" "$i"
        (umask 077 && mkdir "$DIR/osd.$i")
        ceph-osd -c "$CONF" -i "$i" --mkfs --mkkey --osd-uuid "$uuid" --no-mon-config >/dev/null 2>&1 ||
            die "ceph-osd --mkfs $i failed (log: $DIR/log/osd.$i.log)"
        quiet admin auth add "osd.$i" osd 'allow *' mon 'allow profile osd' mgr 'allow profile osd' \
            -i "$DIR/osd.$i/keyring"
        start_osd "$i"
    done
    for ((i = 0; i < OSDS; i++)); do wait_for "osd.$i to come up" osd_up "$i"; done
    local pgs=$((OSDS == 1 ? 16 : 32))
    quiet admin osd pool create "$POOL" "$pgs" "$pgs" replicated
    quiet admin osd pool set "$POOL" size "$SIZE" --yes-i-really-mean-it
    quiet admin osd pool set "$POOL" min_size "$MIN_SIZE"
    quiet admin osd pool application enable "$POOL" rbd
    (umask 077 && admin auth get-or-create "client.$CLIENT" mon 'profile rbd' \
        osd "profile rbd pool=$POOL" mgr "profile rbd pool=$POOL" -o "$DIR/client.$CLIENT.keyring")
    wait_for "pool $POOL to answer client.$CLIENT" pool_ok
    chmod 600 "$DIR"/*.keyring "$DIR"/osd.*/keyring
    touch "$DIR/created"
}

cmd_start() {
    command -v ceph-mon >/dev/null || die "ceph-mon not installed (run scripts/install-deps.sh)"
    [ -f "$DIR/created" ] || { create; return 0; }
    write_conf
    start_mon
    wait_mon
    local i
    for ((i = 0; i < OSDS; i++)); do start_osd "$i"; done
    for ((i = 0; i < OSDS; i++)); do wait_for "osd.$i to come up" osd_up "$i"; done
    wait_for "pool $POOL to answer client.$CLIENT" pool_ok
}

# Stops one daemon (mon.a, osd.0): SIGTERM, then SIGKILL after 30 s.
stop_daemon() {
    local pid n=0
    pid=$(pid_of "$1") || return 0
    kill "$pid" 2>/dev/null || true
    while [ -d "/proc/$pid" ] && pid_of "$1" >/dev/null; do
        n=$((n + 1))
        if [ $n -eq 300 ]; then
            say "$1 (pid $pid) still running after 30 s: SIGKILL"
            kill -9 "$pid" 2>/dev/null || true
        fi
        sleep 0.1
    done
    rm -f "$DIR/run/$1.pid"
}

stop_all() {
    local f n
    for f in "$DIR"/run/osd.*.pid; do
        [ -e "$f" ] || continue
        n=$(basename "$f" .pid)
        stop_daemon "$n" &
    done
    wait
    stop_daemon mon.a
}

osd_index() {
    case ${1:-} in '' | *[!0-9]*) die "which OSD? (0..$((OSDS - 1)))" ;; esac
    [ "$1" -lt "$OSDS" ] || die "no osd.$1 in a cluster of $OSDS"
}

cmd_status() {
    [ -f "$DIR/created" ] || { echo "$ME: not created ($DIR)"; return 1; }
    local n pid
    for n in mon.a $(for ((i = 0; i < OSDS; i++)); do echo "osd.$i"; done); do
        if pid=$(pid_of "$n"); then
            echo "$n: running, pid $pid, rss $(awk '/^VmRSS/ {print $2 " " $3}' "/proc/$pid/status")"
        else
            echo "$n: stopped"
        fi
    done
    pid_of mon.a >/dev/null && pool_ok >/dev/null 2>&1
}

cmd_env() {
    cat <<EOF
export NIMBUS_CEPH_CONF=$CONF
export NIMBUS_CEPH_CLIENT=$CLIENT
export NIMBUS_CEPH_KEYRING=$DIR/client.$CLIENT.keyring
export NIMBUS_CEPH_POOL=$POOL
export NIMBUS_CEPH_MON_HOST='$MON_HOST'
EOF
}

# One change at a time per cluster (test.sh and up.sh may start it together).
lock() {
    mkdir -p "$NIMBUS_HOME"
    exec 9>"$NIMBUS_HOME/.$(basename "$DIR").lock"
    flock -w "$WAIT" 9 || die "another ceph.sh holds $NIMBUS_HOME/.$(basename "$DIR").lock for more than $WAIT s"
}
case "${1:-}" in start | stop | wipe | stop-osd | start-osd) lock ;; esac

case "${1:-}" in
    start) cmd_start ;;
    stop) [ -d "$DIR/run" ] && stop_all; true ;;
    status) cmd_status ;;
    env) cmd_env ;;
    wipe)
        if [ -d "$DIR" ]; then
            stop_all
            rm -rf "$DIR"
        fi
        ;;
    stop-osd)
        osd_index "${2:-}"
        stop_daemon "osd.$2"
        wait_for "the monitor to mark osd.$2 down" osd_down "$2"
        ;;
    start-osd)
        osd_index "${2:-}"
        start_osd "$2"
        wait_for "osd.$2 to come up" osd_up "$2"
        ;;
    *) echo "usage: $0 [--osds N] start|stop|status|env|wipe|stop-osd I|start-osd I" >&2; exit 2 ;;
esac
