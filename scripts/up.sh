#!/usr/bin/env bash
# The main job (README): an all-in-one Nimbus cloud on this machine that boots
# a real guest. Installs what is missing, starts libvirt, a project-owned
# PostgreSQL, the control plane and one host agent (KVM where it really works,
# QEMU/TCG otherwise) with the VPC data plane in network namespaces of its own
# (scripts/netns.sh: nimbus-host, and nimbus-out playing the internet), builds
# and registers the tiny image, launches one instance with a key pair and a
# public address, prints the lines its console shows, and logs into it with
# SSH from nimbus-out. The cloud keeps running; `scripts/down.sh` stops it.
#
#   scripts/up.sh
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
export PATH="$HOME/.cargo/bin:$PATH"
export NIMBUS_HOME=${NIMBUS_HOME:-$REPO/.nimbus}
PORT=${NIMBUS_PORT:-8787}
ENDPOINT="http://127.0.0.1:$PORT"
RUN=$NIMBUS_HOME/run
LOGS=$NIMBUS_HOME/logs
AGENT_STATE=$NIMBUS_HOME/agent
mkdir -p "$RUN" "$LOGS" "$AGENT_STATE"
chmod 755 "$NIMBUS_HOME" "$AGENT_STATE"

step() { printf '== %s\n' "$*"; }
die() { echo "up.sh: $*" >&2; exit 1; }

step "installing packages, starting libvirtd and virtlogd"
scripts/install-deps.sh
step "checking that every command the project runs comes from a package install-deps.sh names"
scripts/check-deps.sh
step "the host's network namespaces (nimbus-host, nimbus-out)"
scripts/netns.sh up
step "starting PostgreSQL"
scripts/pg.sh start
DATABASE_URL=$(scripts/pg.sh url)
step "building the tiny guest image"
images/build-tiny.sh "$NIMBUS_HOME/images/tiny"
step "building the Debian cloud image (cached machine-wide: a no-op unless its recipe changed)"
DEBIAN_IMAGE=$(images/build-debian.sh)
step "building Nimbus (release)"
cargo build --release --locked -q -p nimbus-control-plane -p nimbus-host-agent -p nimbus-cli
BIN=$REPO/target/release

# Tokens are made once and kept (mode 600) so that later runs reuse them.
if [ ! -f "$RUN/tokens.env" ]; then
    umask 077
    printf 'NIMBUS_ADMIN_TOKEN=%s\nNIMBUS_JOIN_TOKEN=%s\n' "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
        "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$RUN/tokens.env"
    umask 022
fi
if ! grep -q NIMBUS_MASTER_KEY "$RUN/tokens.env"; then
    printf 'NIMBUS_MASTER_KEY=%s\n' "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" >>"$RUN/tokens.env"
fi
# shellcheck disable=SC1091
. "$RUN/tokens.env"
export NIMBUS_ENDPOINT=$ENDPOINT NIMBUS_TOKEN=$NIMBUS_ADMIN_TOKEN

running() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2; shift 2
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "$what did not happen within the time limit (logs in $LOGS)"
        sleep 0.2
    done
}

if ! running control-plane; then
    step "starting the control plane on $ENDPOINT"
    DATABASE_URL=$DATABASE_URL NIMBUS_LISTEN=127.0.0.1:$PORT NIMBUS_ADMIN_TOKEN=$NIMBUS_ADMIN_TOKEN \
        NIMBUS_JOIN_TOKEN=$NIMBUS_JOIN_TOKEN NIMBUS_MASTER_KEY=$NIMBUS_MASTER_KEY NIMBUS_PUBLIC_POOL=198.51.100.0/24 \
        NIMBUS_IMAGE_STORE_DIR=$NIMBUS_HOME/image-store \
        NIMBUS_STORE_LISTEN=127.0.0.1:7400 NIMBUS_STORE_DIR=$NIMBUS_HOME/store/control-plane \
        setsid "$BIN/nimbus-control-plane" >>"$LOGS/control-plane.log" 2>&1 </dev/null &
    echo $! >"$RUN/control-plane.pid"
fi
wait_for 30 "control plane start" curl -sf "$ENDPOINT/healthz"

if ! running agent; then
    step "starting the host agent"
    NIMBUS_CONTROL_PLANE=$ENDPOINT NIMBUS_JOIN_TOKEN=$NIMBUS_JOIN_TOKEN NIMBUS_HOST_NAME=$(hostname) \
        NIMBUS_STATE_DIR=$AGENT_STATE NIMBUS_NETWORK=vpc NIMBUS_UNDERLAY_ADDRESS=10.99.0.11 \
        NIMBUS_NETWORK_NAMESPACE=nimbus-host NIMBUS_UPLINK=uplink NIMBUS_STORE_LISTEN=127.0.0.2:7401 \
        setsid "$BIN/nimbus-agent" >>"$LOGS/agent.log" 2>&1 </dev/null &
    echo $! >"$RUN/agent.pid"
fi
# The state store's ring of three: the control plane's node (127.0.0.1),
# the agent's (127.0.0.2) and a store-only host's (127.0.0.3): a host's
# certificate names its node's IP, which no other node may share (all of
# 127.0.0.0/8 is loopback). The store-only host is an agent with no
# capacity on libvirt's test driver (nothing is ever placed on it) that
# gets its certificate the same way.
if ! running store-host; then
    step "starting the store-only host (third node of the state store's ring)"
    mkdir -p "$NIMBUS_HOME/store-host"
    NIMBUS_CONTROL_PLANE=$ENDPOINT NIMBUS_JOIN_TOKEN=$NIMBUS_JOIN_TOKEN NIMBUS_HOST_NAME=$(hostname)-store \
        NIMBUS_STATE_DIR=$NIMBUS_HOME/store-host NIMBUS_RUN_DIR=$RUN/store-host NIMBUS_HYPERVISOR=test NIMBUS_NETWORK=user \
        NIMBUS_STORE_LISTEN=127.0.0.3:7402 \
        setsid "$BIN/nimbus-agent" --vcpus 0 --memory-mib 0 --disk-gib 0 >>"$LOGS/store-host.log" 2>&1 </dev/null &
    echo $! >"$RUN/store-host.pid"
fi
host_available() { "$BIN/nimbus" -o json describe-hosts | grep -q '"status": *"available"'; }
wait_for 60 "host registration" host_available
"$BIN/nimbus" describe-hosts

if ! "$BIN/nimbus" -o json describe-images | grep -q '"default": *true'; then
    step "registering the tiny image as the default image"
    "$BIN/nimbus" register-image --manifest "$NIMBUS_HOME/images/tiny/manifest.json" --default
fi
if ! "$BIN/nimbus" -o json describe-images --name debian-12-nimbus | grep -q '"image_id"'; then
    step "registering the Debian cloud image (public; default user debian)"
    "$BIN/nimbus" register-image --manifest "$DEBIAN_IMAGE/manifest.json"
fi

# An account for everyday use (the admin token is the operator's).
if [ ! -f "$RUN/account.json" ]; then
    step "creating the account 'demo'"
    (umask 077; "$BIN/nimbus" -o json admin create-account --name demo >"$RUN/account.json")
fi
AKID=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["access_key_id"])' "$RUN/account.json")
USER_TOKEN=$(python3 -c 'import json,sys; a=json.load(open(sys.argv[1])); print(a["access_key_id"] + ":" + a["secret_access_key"])' "$RUN/account.json")

# A key pair and a group that lets SSH in from the "internet" (nimbus-out), made once.
demo() { NIMBUS_TOKEN=$USER_TOKEN "$BIN/nimbus" "$@"; }
KEY=$RUN/demo-key.pem
if [ ! -f "$KEY" ]; then
    step "creating the key pair demo-key ($KEY)"
    demo delete-key-pair demo-key >/dev/null 2>&1 || true
    demo create-key-pair demo-key --out "$KEY"
fi
SG=$(demo -o json describe-security-groups | python3 -c 'import json,sys; print(" ".join(g["group_id"] for g in json.load(sys.stdin)["security_groups"] if g["group_name"] == "ssh"))')
if [ -z "$SG" ]; then
    step "creating the security group ssh (port 22 from the internet namespace, 203.0.113.0/24)"
    SG=$(demo -o json create-security-group --group-name ssh --description "SSH from nimbus-out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["group_id"])')
fi
# The internet namespace's address (an all-in-one made before it had one
# allowed 10.99.0.0/24): authorized once, whatever the group held before.
if ! demo -o json describe-security-groups | grep -q "203.0.113.0/24"; then
    demo authorize-security-group-ingress "$SG" --port 22 --cidr 203.0.113.0/24 >/dev/null
fi

step "launching one instance as the account demo (key demo-key, groups default and ssh)"
DEFAULT_SG=$(demo -o json describe-security-groups | python3 -c 'import json,sys; print([g["group_id"] for g in json.load(sys.stdin)["security_groups"] if g["group_name"] == "default"][0])')
demo -o json run-instances --instance-type t3.nano --key-name demo-key --security-group-ids "$DEFAULT_SG,$SG" \
    --user-data "#!/bin/sh
echo hello from nimbus" --wait >"$RUN/last-launch.json"
ID=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["instances"][0]["instance_id"])' "$RUN/last-launch.json")
demo describe-instances --instance-id "$ID"
PUBLIC_IP=$(demo -o json describe-instances --instance-id "$ID" | python3 -c 'import json,sys; print(json.load(sys.stdin)["instances"][0].get("public_ip_address") or "")')

CONSOLE=$AGENT_STATE/instances/$ID/console.log
step "waiting for $ID's console (serial log $CONSOLE)"
wait_for 180 "the guest's NIMBUS-READY line" grep -q NIMBUS-READY "$CONSOLE"
grep -a '^NIMBUS-' "$CONSOLE" | tr -d '\r'
SSH=(ip netns exec nimbus-out ssh -i "$KEY" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o ConnectTimeout=10 -o LogLevel=ERROR)
if [ -n "$PUBLIC_IP" ]; then
    step "logging into $ID at $PUBLIC_IP from nimbus-out: ${SSH[*]} root@$PUBLIC_IP"
    wait_for 120 "SSH into $PUBLIC_IP" "${SSH[@]}" "root@$PUBLIC_IP" true
    "${SSH[@]}" "root@$PUBLIC_IP" 'echo "$(hostname): $(cat /etc/nimbus-release | cut -d" " -f1-2)"; ip -4 -o addr show dev eth0'
fi

cat <<EOM

Nimbus is up. Log into the instance from the "internet" namespace:
  ip netns exec nimbus-out ssh -i $KEY root@${PUBLIC_IP:-<public ip>}
Use it as the account demo with:
  export NIMBUS_ENDPOINT=$ENDPOINT NIMBUS_TOKEN=\$(python3 -c 'import json; a=json.load(open("$RUN/account.json")); print(a["access_key_id"] + ":" + a["secret_access_key"])')
  $BIN/nimbus describe-instances
  $BIN/nimbus run-instances --instance-type t3.micro --count 2 --wait
  $BIN/nimbus terminate-instances $ID --wait
The same key works with the AWS CLI and SDKs (secret in $RUN/account.json):
  AWS_ACCESS_KEY_ID=$AKID AWS_SECRET_ACCESS_KEY=... AWS_DEFAULT_REGION=nimbus-1 \\
    aws ec2 describe-instances --endpoint-url $ENDPOINT
Operator commands (describe-hosts, register-image, admin create-account) take
the admin token: NIMBUS_TOKEN=\$(grep ADMIN $RUN/tokens.env | cut -d= -f2)
Logs: $LOGS   Stop everything: scripts/down.sh
EOM
