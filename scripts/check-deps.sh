#!/usr/bin/env bash
# The guard against a missing install step: every external command the project
# runs must resolve to a file owned by the Debian package that
# scripts/install-deps.sh names for it (its table: `install-deps.sh --table`).
# A command that resolves only because someone installed a package by hand, or
# from somewhere else (pip, /usr/local), fails here with the package to add,
# instead of in a test on a fresh machine.
#
#   scripts/check-deps.sh        # exit 0: all good; 1: each problem is printed
#
# Also checked: every command the Rust code runs (`Command::new("...")`) is in
# the table, so a new one cannot be added without naming its package.
# scripts/test.sh runs this right after install-deps.sh, before anything else.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

problems=()
problem() { problems+=("$*"); }

# The variants of a path dpkg may have recorded: as given, resolved, and with
# /usr merged or not (dpkg records /bin/x for some packages, /usr/bin/x for others).
variants() {
    local p q
    for p in "$1" "$(readlink -f "$1")"; do
        for q in "$p" "${p#/usr}" "/usr$p"; do echo "$q"; done
    done | sort -u
}

# First pass: resolve every command (one `dpkg -S` for all of them is much faster).
TABLE=$(scripts/install-deps.sh --table)
declare -A known=() path_of=()
while read -r step pkg cmds; do
    for c in $cmds; do
        [ "$c" = - ] && continue
        known[$(basename "$c")]=1
        if [[ $c == */* ]]; then
            [ -e "$c" ] && path_of[$c]=$c
        else
            path_of[$c]=$(command -v "$c" 2>/dev/null) || unset "path_of[$c]"
        fi
    done
done <<<"$TABLE"
declare -A owners_of=()
while IFS= read -r line; do
    # "pkg[:arch][, pkg2[:arch]]: /path"
    owners_of[${line#*: }]+="$(printf '%s' "${line%%: /*}" | tr ',' '\n' | sed 's/^ *//; s/:.*//') "
done < <(for p in "${path_of[@]}"; do variants "$p"; done | sort -u | xargs -r dpkg -S 2>/dev/null || true)

while read -r step pkg cmds; do
    for c in $cmds; do
        [ "$c" = - ] && continue
        path=${path_of[$c]:-}
        [ -n "$path" ] || { problem "$c: not found (package $pkg)"; continue; }
        if [ "$step" = machine ]; then
            [ -x "$path" ] || problem "$c: $path is not executable ($pkg)"
            continue
        fi
        owners=$(for v in $(variants "$path"); do printf '%s' "${owners_of[$v]:-}"; done)
        if [ -z "$owners" ]; then
            problem "$c: $path belongs to no Debian package; install-deps.sh expects package $pkg"
        elif ! tr ' ' '\n' <<<"$owners" | grep -qx -- "$pkg"; then
            problem "$c: $path belongs to ${owners}but install-deps.sh names $pkg for it"
        fi
    done
    if [ "$step" != machine ] && [ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null)" != installed ]; then
        problem "package $pkg is not installed (run scripts/install-deps.sh)"
    fi
done <<<"$TABLE"

# Commands the Rust code runs must be in the table.
while read -r c; do
    [ -n "${known[$c]:-}" ] || problem "the Rust code runs '$c', which scripts/install-deps.sh's table does not name: add it with its package"
done < <(grep -rhoE --include='*.rs' 'Command::new\("[^"/]+"\)' proto control-plane host-agent cli state-store tests volumes |
    sed -E 's/.*\("([^"]+)"\)/\1/' | sort -u)

if [ ${#problems[@]} -gt 0 ]; then
    echo "check-deps.sh: ${#problems[@]} problem(s):" >&2
    printf '  %s\n' "${problems[@]}" >&2
    exit 1
fi
echo "check-deps.sh: ${#known[@]} commands, each from the package install-deps.sh names"
