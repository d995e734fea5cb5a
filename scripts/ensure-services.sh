#!/usr/bin/env bash
# Ensure local Redis (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432, postgres/postgres) are installed and running. Usage: scripts/ensure-services.sh
set -euo pipefail

REDIS_HOST=127.0.0.1
REDIS_PORT=6379
PG_HOST=127.0.0.1
PG_PORT=5432
PG_URL="postgres://postgres:postgres@${PG_HOST}:${PG_PORT}/postgres"
WAIT_SECS="${ENSURE_SERVICES_TIMEOUT:-30}"

log() { echo "ensure-services: $*"; }
die() { echo "ensure-services: ERROR: $*" >&2; exit 1; }

# shellcheck source=scripts/as_root.sh
source "$(dirname "${BASH_SOURCE[0]}")/as_root.sh"

# Run a command as the postgres OS user.
as_postgres() {
    if [ "$(id -un)" = postgres ]; then
        "$@"
    elif [ "$(id -u)" -eq 0 ]; then
        # runuser does not need a login shell; fall back to su.
        if command -v runuser >/dev/null 2>&1; then
            runuser -u postgres -- "$@"
        else
            su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
        fi
    elif command -v sudo >/dev/null 2>&1; then
        sudo -u postgres "$@"
    else
        die "need root privileges (or sudo) to run as postgres: $*"
    fi
}

# quiet_run <command...>: run a command, showing its output only if it fails.
quiet_run() {
    local out rc=0
    out="$(mktemp)"
    "$@" >"$out" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then
        cat "$out" >&2
        rm -f "$out"
        die "command failed (exit $rc): $*"
    fi
    rm -f "$out"
}

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install $* manually"
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "running apt-get update"
        quiet_run as_root env DEBIAN_FRONTEND=noninteractive apt-get update
        APT_UPDATED=1
    fi
    log "installing $*"
    quiet_run as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "$@"
}

# wait_for <command...>: poll the command once a second for up to WAIT_SECS seconds.
wait_for() {
    local deadline=$((SECONDS + WAIT_SECS))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 1
    done
}

# ---------------------------------------------------------------- Redis

redis_ping() {
    [ "$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = "PONG" ]
}

ensure_redis() {
    if command -v redis-cli >/dev/null 2>&1 && redis_ping; then
        return 0
    fi

    local pkgs=()
    command -v redis-server >/dev/null 2>&1 || pkgs+=(redis-server)
    command -v redis-cli >/dev/null 2>&1 || pkgs+=(redis-tools)
    if [ "${#pkgs[@]}" -gt 0 ]; then
        apt_install "${pkgs[@]}"
    fi

    # Installing the package may have started the packaged service already.
    if redis_ping; then
        return 0
    fi

    local dir=/var/lib/redis logdir=/var/log/redis
    as_root mkdir -p "$dir" "$logdir"
    log "starting redis-server on ${REDIS_HOST}:${REDIS_PORT}"
    # Bind IPv6 loopback only when the kernel has it ("-" makes it optional for redis >= 7).
    as_root redis-server --daemonize yes --bind "$REDIS_HOST" -::1 --port "$REDIS_PORT" \
        --save "" --appendonly no --dir "$dir" --logfile "$logdir/ci.log" >/dev/null \
      || as_root redis-server --daemonize yes --bind "$REDIS_HOST" --port "$REDIS_PORT" \
        --save "" --appendonly no --dir "$dir" --logfile "$logdir/ci.log" >/dev/null \
      || die "redis-server failed to start (see $logdir/ci.log)"

    if ! wait_for redis_ping; then
        tail -n 20 "$logdir/ci.log" >&2 2>/dev/null || true
        die "redis did not answer PING on ${REDIS_HOST}:${REDIS_PORT} within ${WAIT_SECS}s"
    fi
    log "redis is up"
}

# ----------------------------------------------------------- PostgreSQL

pg_ready() {
    pg_isready -q -h "$PG_HOST" -p "$PG_PORT"
}

pg_login_ok() {
    PGCONNECT_TIMEOUT=5 psql "$PG_URL" -Atqc 'select 1' >/dev/null 2>&1
}

# Newest installed server version (e.g. 15), empty if none.
pg_version() {
    local d best=""
    for d in /usr/lib/postgresql/*/bin/postgres; do
        [ -x "$d" ] || continue
        d="${d#/usr/lib/postgresql/}"; d="${d%%/*}"
        if [ -z "$best" ] || [ "${d%%.*}" -gt "${best%%.*}" ]; then best="$d"; fi
    done
    echo "$best"
}

# Version of the first existing "main" cluster (as in `ls /etc/postgresql | head -1`), empty if none.
pg_cluster_version() {
    local d
    for d in /etc/postgresql/*/main/postgresql.conf; do
        [ -f "$d" ] || continue
        d="${d#/etc/postgresql/}"; echo "${d%%/*}"; return 0
    done
}

ensure_postgres() {
    if ! { command -v pg_isready >/dev/null 2>&1 && pg_ready; }; then
        if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(pg_version)" ]; then
            apt_install postgresql
        fi

        if ! pg_ready; then
            local ver
            ver="$(pg_cluster_version)"
            if [ -z "$ver" ]; then
                ver="$(pg_version)"
                [ -n "$ver" ] || die "no PostgreSQL server installation found under /usr/lib/postgresql"
                log "creating PostgreSQL $ver cluster 'main' on port $PG_PORT"
                as_root pg_createcluster "$ver" main --port "$PG_PORT" >/dev/null
            fi
            log "starting PostgreSQL $ver/main"
            # Ensure the socket dir exists (it lives on tmpfs on a fresh boot).
            as_root install -d -o postgres -g postgres -m 2775 /var/run/postgresql
            as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start \
                || die "pg_ctlcluster $ver main start failed (see /var/log/postgresql/postgresql-$ver-main.log)"
            if ! wait_for pg_ready; then
                tail -n 20 "/var/log/postgresql/postgresql-$ver-main.log" >&2 2>/dev/null || true
                die "PostgreSQL did not become ready on ${PG_HOST}:${PG_PORT} within ${WAIT_SECS}s"
            fi
            log "postgresql is up"
        fi
    fi

    if ! pg_login_ok; then
        log "setting password for database user postgres"
        (cd / && as_postgres psql -X -q -c "ALTER USER postgres PASSWORD 'postgres'") >/dev/null \
            || die "could not set the postgres password"
        pg_login_ok || die "cannot connect with $PG_URL (check pg_hba.conf)"
    fi
}

ensure_redis
ensure_postgres
