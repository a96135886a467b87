#!/usr/bin/env bash
# The data sqlx's compile-time checked queries (query!, query_as!, query_scalar!)
# are checked against: `.sqlx/`, one JSON file per query, committed. Builds
# read it (SQLX_OFFLINE=true in .cargo/config.toml), so no build needs a
# database.
#
#   scripts/sqlx-data.sh prepare   # after changing a query or a migration
#   scripts/sqlx-data.sh check     # scripts/test.sh: fails when .sqlx/ is stale
#
# Both make a throwaway database from migrations/ on the project's PostgreSQL
# (scripts/pg.sh start first), compile the control plane against it with
# the macros online, and collect what they describe. No sqlx-cli needed.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
mode=${1:-}
case "$mode" in prepare | check) ;; *)
	echo "usage: $0 prepare|check" >&2
	exit 2
	;;
esac

PSQL=${PGBIN:-/usr/lib/postgresql/15/bin}/psql
base=$(scripts/pg.sh test-url)
db="nimbus_sqlx_$$"
url="${base%/*}/$db"
out=$(mktemp -d)
cleanup() {
	"$PSQL" -q -X "$base" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
	rm -rf "$out"
}
trap cleanup EXIT

"$PSQL" -q -X -v ON_ERROR_STOP=1 "$base" -c "CREATE DATABASE $db" >/dev/null
for m in migrations/*.sql; do
	"$PSQL" -q -X -v ON_ERROR_STOP=1 -1 "$url" -f "$m" >/dev/null
done

# The macros expand again only when the crates that use them compile again.
for crate in control-plane; do
	find "$crate/src" -name '*.rs' -exec touch {} +
done
SQLX_OFFLINE=false DATABASE_URL="$url" SQLX_OFFLINE_DIR="$out" \
	cargo check --quiet --locked -p nimbus-control-plane --all-targets

if [ "$mode" = prepare ]; then
	rm -rf .sqlx
	mkdir -p .sqlx
	cp "$out"/*.json .sqlx/ 2>/dev/null || true
	echo "sqlx-data: .sqlx/ holds $(find .sqlx -name '*.json' | wc -l) queries"
else
	if ! diff -r "$out" .sqlx >/dev/null; then
		echo "sqlx-data: .sqlx/ is stale (a query or a migration changed): run scripts/sqlx-data.sh prepare and commit .sqlx/" >&2
		diff -r -q "$out" .sqlx >&2 || true
		exit 1
	fi
	echo "sqlx-data: .sqlx/ is current ($(find .sqlx -name '*.json' | wc -l) queries)"
fi
