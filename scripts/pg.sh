#!/usr/bin/env bash
# A PostgreSQL 15 server owned by the project (for the control plane and tests).
#
#   scripts/pg.sh start    # initdb on first use, start, wait until ready (idempotent)
#   scripts/pg.sh stop     # fast shutdown (no-op when not running)
#   scripts/pg.sh status   # exit 0 when running and accepting connections
#   scripts/pg.sh url      # the control plane's: postgres://nimbus:<password>@127.0.0.1:25432/nimbus
#   scripts/pg.sh test-url # the tests' (may create databases): postgres://nimbus_tests:<password>@.../postgres
#
# Environment:
#   NIMBUS_HOME     default <repo>/.nimbus ; data dir is $NIMBUS_HOME/pg
#   NIMBUS_PG_PORT  default 25432 ; listens on 127.0.0.1 only, unix socket in the data dir.
#                   Below Linux's ephemeral range (32768-60999), so no outgoing
#                   loopback connection can be holding it when the server starts.
#
# Runs as the `postgres` OS user (the server refuses root). Roles, checked and
# corrected on every start (so an older cluster is repaired too):
#   nimbus        the control plane's: no SUPERUSER, CREATEDB or CREATEROLE; owns the
#                 database `nimbus` (and so its schema), which no one else may connect to.
#   nimbus_tests  the tests': CREATEDB only (each test makes and owns its own database).
# Each has a random password, generated once and kept in $NIMBUS_HOME/pg-secrets/
# (directory 0700, files 0600, root's): no well-known password opens anything.
# Unix-socket connections (trust) are possible only for the postgres OS user: the
# socket lives in the 0700 data directory. fsync stays on (the default).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NIMBUS_HOME=${NIMBUS_HOME:-$REPO/.nimbus}
PORT=${NIMBUS_PG_PORT:-25432}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PGDATA=$NIMBUS_HOME/pg
SECRETS=$NIMBUS_HOME/pg-secrets
PGUSER_OS=postgres

die() { echo "pg.sh: $*" >&2; exit 1; }

as_pg() {
    if [ "$(id -un)" = "$PGUSER_OS" ]; then
        "$@"
    else
        runuser -u "$PGUSER_OS" -- "$@"
    fi
}

# The postgres user must be able to reach $PGDATA: give o+x to any ancestor it
# cannot traverse (e.g. a 700 /root). Only the search bit is added, no read bit.
ensure_traversable() {
    # Walk from / downwards: a dir below an untraversable one would look untraversable too.
    local d=$1 dirs=() i
    while [ "$d" != "/" ] && [ -n "$d" ]; do
        dirs+=("$d")
        d=$(dirname "$d")
    done
    for ((i = ${#dirs[@]} - 1; i >= 0; i--)); do
        d=${dirs[i]}
        if [ -d "$d" ] && ! as_pg test -x "$d"; then
            chmod o+x "$d"
            echo "pg.sh: added o+x on $d so $PGUSER_OS can traverse it" >&2
        fi
    done
}

running() {
    [ -f "$PGDATA/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1
}

ready() {
    "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -t 1
}

write_conf() {
    # Rewritten on every start so NIMBUS_PG_PORT / a moved repo take effect.
    local tmp
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# Managed by scripts/pg.sh -- rewritten on every start.
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$PGDATA'
fsync = on
max_connections = 200
EOF
    chown "$PGUSER_OS:" "$tmp"
    chmod 600 "$tmp"
    mv "$tmp" "$PGDATA/nimbus.conf"
}

init_cluster() {
    [ "$(id -u)" = 0 ] || [ "$(id -un)" = "$PGUSER_OS" ] || die "run as root (or postgres)"
    mkdir -p "$NIMBUS_HOME"
    ensure_traversable "$NIMBUS_HOME"
    local tmp=$PGDATA.init.$$
    rm -rf "$tmp"
    mkdir -m 700 "$tmp"
    chown "$PGUSER_OS:" "$tmp"
    local pwfile
    pwfile=$(mktemp)
    echo postgres >"$pwfile"
    chown "$PGUSER_OS:" "$pwfile"
    if ! out=$(as_pg "$PGBIN/initdb" -D "$tmp" -U postgres -E UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 --pwfile="$pwfile" 2>&1); then
        rm -rf "$tmp" "$pwfile"
        echo "$out" >&2
        die "initdb failed"
    fi
    rm -f "$pwfile"
    echo "include_if_exists = 'nimbus.conf'" >>"$tmp/postgresql.conf"
    mv "$tmp" "$PGDATA"   # atomic: a half-done initdb never looks like a cluster
}

# The password of a role: made once (random), kept 0600 in a 0700 directory.
password() {
    local f=$SECRETS/$1.password
    if [ ! -s "$f" ]; then
        [ "$(id -u)" = 0 ] || die "the password of $1 does not exist yet: run scripts/pg.sh start as root"
        (umask 077; mkdir -p "$SECRETS"; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$f.tmp" && mv "$f.tmp" "$f")
    fi
    cat "$f"
}

# Roles and the database, as the header says; idempotent, run on every start.
setup_roles() {
    local app tests
    app=$(password nimbus)
    tests=$(password nimbus_tests)
    as_pg "$PGBIN/psql" -q -X -v ON_ERROR_STOP=1 -v app="$app" -v tests="$tests" \
        -h "$PGDATA" -p "$PORT" -U postgres -d postgres >/dev/null <<'EOF'
SELECT 'CREATE ROLE nimbus' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'nimbus')\gexec
SELECT 'CREATE ROLE nimbus_tests' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'nimbus_tests')\gexec
ALTER ROLE nimbus LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD :'app';
ALTER ROLE nimbus_tests LOGIN NOSUPERUSER CREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD :'tests';
SELECT 'CREATE DATABASE nimbus OWNER nimbus'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'nimbus')\gexec
ALTER DATABASE nimbus OWNER TO nimbus;
REVOKE ALL ON DATABASE nimbus FROM PUBLIC;
EOF
}

url() { echo "postgres://nimbus:$(password nimbus)@127.0.0.1:$PORT/nimbus"; }
test_url() { echo "postgres://nimbus_tests:$(password nimbus_tests)@127.0.0.1:$PORT/postgres"; }

cmd_start() {
    [ -x "$PGBIN/postgres" ] || die "PostgreSQL 15 not found in $PGBIN"
    [ -f "$PGDATA/PG_VERSION" ] || init_cluster
    if running; then
        if ! ready; then
            # Started but still recovering/starting: wait below.
            :
        fi
    else
        ensure_traversable "$PGDATA"
        chown -R "$PGUSER_OS:" "$PGDATA"
        chmod 700 "$PGDATA"
        write_conf
        if ! as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w -t 60 start >/dev/null; then
            tail -n 30 "$PGDATA/server.log" >&2 || true
            die "server did not start (log: $PGDATA/server.log)"
        fi
    fi
    local deadline=$((SECONDS + 60))
    until ready; do
        [ $SECONDS -lt $deadline ] || die "server not ready within 60 s (log: $PGDATA/server.log)"
        sleep 0.1
    done
    setup_roles
}

cmd_stop() {
    if running; then
        as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w -t 60 stop >/dev/null
    fi
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) running && ready ;;
    url) url ;;
    test-url) test_url ;;
    *) echo "usage: $0 start|stop|status|url|test-url" >&2; exit 2 ;;
esac
