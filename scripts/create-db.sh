#!/usr/bin/env bash
# Create the PostgreSQL database named in a postgres:// URL if it does not exist yet (connects to the "postgres" db on the same server). Usage: scripts/create-db.sh postgres://user:pass@host:port/dbname
set -euo pipefail

die() { echo "create-db: ERROR: $*" >&2; exit 1; }

[ "$#" -eq 1 ] || die "usage: $0 postgres://user:pass@host:port/dbname"
command -v psql >/dev/null 2>&1 || die "psql not found (run scripts/ensure-services.sh first)"

url="$1"
base="${url%%\?*}"          # drop ?query
db="${base##*/}"            # last path segment
admin_url="${base%/*}/postgres"

case "$url" in
    postgres://*/*|postgresql://*/*) ;;
    *) die "not a postgres:// URL with a database name: $url" ;;
esac
# Restrict to plain identifiers so the name can be used in SQL without escaping issues.
[[ "$db" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "unsupported database name '$db' (use [A-Za-z0-9_])"

exists="$(psql "$admin_url" -X -Atq -v ON_ERROR_STOP=1 \
    -c "select 1 from pg_database where datname = '$db'")" \
    || die "cannot connect to $admin_url"
if [ "$exists" != "1" ]; then
    echo "create-db: creating database $db"
    psql "$admin_url" -X -q -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"$db\"" >/dev/null
fi
