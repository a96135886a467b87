#!/usr/bin/env bash
# Stops what scripts/up.sh started: terminates every instance (so guests and
# their files go away), then stops the agent, the control plane and PostgreSQL.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
export NIMBUS_HOME=${NIMBUS_HOME:-$REPO/.nimbus}
RUN=$NIMBUS_HOME/run
BIN=$REPO/target/release

stop() {
    local pidfile=$RUN/$1.pid
    [ -f "$pidfile" ] || return 0
    local pid; pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
}

if [ -f "$RUN/tokens.env" ] && [ -x "$BIN/nimbus" ]; then
    # shellcheck disable=SC1091
    . "$RUN/tokens.env"
    export NIMBUS_ENDPOINT=http://127.0.0.1:${NIMBUS_PORT:-8787}
    NIMBUS_TOKEN=$(python3 -c 'import json,sys; a=json.load(open(sys.argv[1])); print(a["access_key_id"] + ":" + a["secret_access_key"])' "$RUN/account.json" 2>/dev/null || true)
    export NIMBUS_TOKEN
    ids=$("$BIN/nimbus" -o json describe-instances --state pending --state running 2>/dev/null |
        python3 -c 'import json,sys; print(" ".join(i["instance_id"] for i in json.load(sys.stdin)["instances"]))' || true)
    if [ -n "$ids" ]; then
        # shellcheck disable=SC2086
        "$BIN/nimbus" terminate-instances $ids --wait --timeout 120 || true
    fi
fi
stop agent
stop store-host
stop control-plane
scripts/pg.sh stop
scripts/netns.sh down
