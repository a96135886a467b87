#!/usr/bin/env bash
# The all-in-one cloud's network (scripts/up.sh): the host's VPC data plane
# lives in a network namespace of its own, and another plays the internet.
# (Guest traffic never touches this machine's own interfaces.)
#
#   scripts/netns.sh up     # idempotent
#   scripts/netns.sh down
#
#   nimbus-out: the internet (203.0.113.2, a public address; 10.99.0.2 on the
#        │      link, the host's default router; routes the public pool
#        │      198.51.100.0/24 to the host)
#        │ veth
#   nimbus-host (10.99.0.11 on "uplink": the underlay; the agent's VPC namespaces hang off it)
#
# Log into an instance from the "internet":
#   ip netns exec nimbus-out ssh -i .nimbus/run/demo-key.pem root@<public ip>
set -euo pipefail
HOST=nimbus-host OUT=nimbus-out
HOST_IP=10.99.0.11 OUT_IP=10.99.0.2 POOL=198.51.100.0/24 INTERNET_IP=203.0.113.2

up() {
    for ns in $HOST $OUT; do
        [ -e /run/netns/$ns ] || ip netns add $ns
        ip -n $ns link set lo up
    done
    if ! ip -n $HOST link show uplink >/dev/null 2>&1; then
        ip link add name uplink netns $HOST type veth peer name uplink netns $OUT
    fi
    ip -n $HOST addr replace $HOST_IP/24 dev uplink
    ip -n $OUT addr replace $OUT_IP/24 dev uplink
    ip -n $HOST link set uplink up
    ip -n $OUT link set uplink up
    ip -n $OUT addr replace $INTERNET_IP/32 dev lo
    ip -n $OUT route replace $POOL dev uplink src $INTERNET_IP
    ip -n $HOST route replace default via $OUT_IP
}

down() {
    for ns in $HOST $OUT; do
        [ -e /run/netns/$ns ] && ip netns del $ns
    done
    # The agent's VPC namespaces (nimbus-v<vni>).
    for ns in $(ip netns list | awk '{print $1}' | grep -E '^nimbus-v[0-9]+$' || true); do
        ip netns del "$ns"
    done
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
