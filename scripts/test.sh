#!/usr/bin/env bash
# The test command (README, .ci/run): on a fresh Debian 12 machine it installs
# what is missing, starts libvirt, a project-owned PostgreSQL and Ceph, builds the
# tiny guest image and the Debian cloud image, then runs every test of the
# workspace, including those that boot real guests (tiny, and Debian with
# cloud-init, SSH and CreateImage), and the boto3 / AWS CLI session in tests/python.
#
#   scripts/test.sh [extra cargo test args]
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
export PATH="$HOME/.cargo/bin:$PATH"
export NIMBUS_HOME=${NIMBUS_HOME:-$REPO/.nimbus}

step() { printf '== %s\n' "$*"; }

# Format first: a slip fails in seconds, before anything is installed or built.
step "cargo fmt --check"
cargo fmt --all --check

step "installing packages, starting libvirtd and virtlogd"
scripts/install-deps.sh
step "checking that every command the project runs comes from a package install-deps.sh names"
scripts/check-deps.sh
step "starting PostgreSQL"
scripts/pg.sh start
# The tests' role may create databases (one per test); the control plane's
# own role (checked by tests/tests/security.rs) may not.
export DATABASE_URL NIMBUS_APP_DATABASE_URL
DATABASE_URL=$(scripts/pg.sh test-url)
NIMBUS_APP_DATABASE_URL=$(scripts/pg.sh url)
step "checking that .sqlx/ (the data of the compile-time checked queries) matches the queries and migrations"
scripts/sqlx-data.sh check
step "starting Ceph (RBD volumes): one monitor and one OSD, and a three-OSD cluster"
scripts/ceph.sh start
# NIMBUS_CEPH_CONF, _CLIENT, _KEYRING, _POOL: volumes/tests/rbd.rs runs against it.
eval "$(scripts/ceph.sh env)"
# Three OSDs, pool size 3: the replication test stops and restarts one (NIMBUS_CEPH3_*).
scripts/ceph.sh --osds 3 start
eval "$(scripts/ceph.sh --osds 3 env | sed 's/NIMBUS_CEPH_/NIMBUS_CEPH3_/')"
step "building the tiny guest image"
images/build-tiny.sh "$NIMBUS_HOME/images/tiny"
export NIMBUS_IMAGE_DIR=$NIMBUS_HOME/images/tiny
step "building the Debian cloud image (cached machine-wide: a no-op unless its recipe changed)"
# tests/tests/debian_guest.rs boots it (cloud-init, SSH, CreateImage).
NIMBUS_DEBIAN_IMAGE_DIR=$(images/build-debian.sh)
export NIMBUS_DEBIAN_IMAGE_DIR
# Guests' files live under the test's temp dirs; QEMU (user libvirt-qemu) must reach them.
export NIMBUS_TEST_DIR=$NIMBUS_HOME/test-tmp
mkdir -p "$NIMBUS_TEST_DIR"
chmod 755 "$NIMBUS_HOME" "$NIMBUS_TEST_DIR"

# A one-off build on a clean clone gains nothing from the incremental cache,
# which would double the target directory's size.
if [ -n "${CI:-}" ]; then export CARGO_INCREMENTAL=0; fi
step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "cargo test --workspace"
cargo test --workspace --locked "$@"

step "boto3 and the AWS CLI against the EC2 front door (pytest)"
# Ansible (with the amazon.aws collection) and Apache libcloud drive the EC2
# front door as users' launch tools do (tests/python/test_launch_tools.py).
if ! python3 -c 'import boto3, awscli, pytest, libcloud, ansible' 2>/dev/null || ! command -v ansible-playbook >/dev/null; then
    python3 -m pip install -q --disable-pip-version-check boto3 awscli pytest ansible apache-libcloud
fi
cargo build --locked -q -p nimbus-tests --bin testbed
NIMBUS_TESTBED=$REPO/target/debug/testbed python3 -m pytest -q tests/python
