#!/usr/bin/env bash
# Start/stop a throwaway PostgreSQL, PgBouncer, MariaDB and Redis on loopback for the test suite.
#
# Usage: scripts/services.sh start|stop|status|env
#
#   start   install what is missing (apt-get, as root), initdb on first use,
#           start PostgreSQL on 127.0.0.1:$PG_PORT (fsync off, 200 connections),
#           create database "celery_deactivate", start PgBouncer in
#           transaction pooling mode on 127.0.0.1:$PGBOUNCER_PORT in front of
#           it, start MariaDB on 127.0.0.1:$MARIADB_PORT (its own datadir under
#           SERVICES_DIR, run as the "mysql" user when root), start Redis on
#           127.0.0.1:$REDIS_PORT, wait for each. Idempotent.
#   stop    stop what this SERVICES_DIR started (never another server on the
#           same port); fine if they are already stopped. Idempotent.
#   status  say whether each is up; exit 0 only if all are.
#   env     print the export lines the test suite reads:
#             eval "$(scripts/services.sh env)"
#
# Settings (environment):
#   SERVICES_DIR  state dir (data, sockets, logs, pid files);
#                 default /tmp/celery-deactivate-services. As root, PostgreSQL
#                 and PgBouncer run as the "postgres" user, so this dir must be
#                 traversable by it; as another user they run as that user, from
#                 binaries already installed (nothing is installed).
#   PG_PORT       default 55432
#   REDIS_PORT    default 56379
#   PGBOUNCER_PORT default 56432
#   MARIADB_PORT  default 53306
#
# Progress goes to stderr; `status` and `env` write their answer to stdout.
set -euo pipefail

SERVICES_DIR="${SERVICES_DIR:-/tmp/celery-deactivate-services}"
PG_PORT="${PG_PORT:-55432}"
REDIS_PORT="${REDIS_PORT:-56379}"
PGBOUNCER_PORT="${PGBOUNCER_PORT:-56432}"
MARIADB_PORT="${MARIADB_PORT:-53306}"
PG_DB=celery_deactivate
PG_USER=postgres
START_TIMEOUT="${START_TIMEOUT:-60}"   # seconds to wait for each service
case "$SERVICES_DIR" in /*) ;; *) SERVICES_DIR="$PWD/$SERVICES_DIR" ;; esac

PG_DIR="$SERVICES_DIR/pg"
PG_DATA="$PG_DIR/data"
PG_LOG="$PG_DIR/postgres.log"
REDIS_DIR="$SERVICES_DIR/redis"
REDIS_PID="$REDIS_DIR/redis.pid"
REDIS_LOG="$REDIS_DIR/redis.log"
PGB_DIR="$SERVICES_DIR/pgbouncer"
PGB_PID="$PGB_DIR/pgbouncer.pid"
PGB_LOG="$PGB_DIR/pgbouncer.log"
MARIADB_DIR="$SERVICES_DIR/mariadb"
MARIADB_DATA="$MARIADB_DIR/data"
MARIADB_SOCK="$MARIADB_DIR/mysqld.sock"
MARIADB_PID="$MARIADB_DIR/mysqld.pid"
MARIADB_LOG="$MARIADB_DIR/mysqld.log"
MARIADB_USER=mysql

log() { printf 'services: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# --- helpers -----------------------------------------------------------------

apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        apt_updated=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

# Directory holding initdb/pg_ctl/postgres: PATH first, then Debian's layout.
pg_bindir() {
    local p
    if p="$(command -v pg_ctl 2>/dev/null)" && [ -n "$p" ]; then
        dirname "$(readlink -f "$p")"
        return 0
    fi
    p="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    [ -n "$p" ] && [ -x "$p/pg_ctl" ] && { echo "$p"; return 0; }
    return 1
}

is_root() { [ "$(id -u)" = 0 ]; }

# Run a command as the postgres system user (initdb and PgBouncer refuse root), from a
# directory that user can read; not root: as the current user.
as_postgres() {
    if ! is_root; then
        (cd / && "$@")
    elif command -v runuser >/dev/null 2>&1; then
        (cd / && runuser -u "$PG_USER" -- "$@")
    else
        (cd / && su "$PG_USER" -s /bin/bash -c "$(printf '%q ' "$@")")
    fi
}

# psql_at PORT ARGS...: a quiet psql on 127.0.0.1:PORT (PostgreSQL or PgBouncer).
psql_at() {
    local port="$1"; shift
    PGCONNECT_TIMEOUT=3 psql -h 127.0.0.1 -p "$port" -U "$PG_USER" \
        -X -q -A -t -v ON_ERROR_STOP=1 "$@"
}
psql_q() { psql_at "$PG_PORT" "$@"; }

pg_up()    { psql_q -d postgres -c 'select 1' >/dev/null 2>&1; }
pgbouncer_up() { psql_at "$PGBOUNCER_PORT" -d "$PG_DB" -c 'select 1' >/dev/null 2>&1; }
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }
mariadb_q() {
    mariadb --no-defaults --protocol=tcp -h 127.0.0.1 -P "$MARIADB_PORT" -u root \
        --connect-timeout=3 -N -B "$@"
}
mariadb_up() { mariadb_q -e 'select 1' >/dev/null 2>&1; }

# wait_until DESCRIPTION TIMEOUT_SECONDS COMMAND...: poll until COMMAND succeeds.
wait_until() {
    local what="$1" timeout="$2"; shift 2
    local deadline=$(( $(date +%s) + timeout ))
    until "$@"; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            log "timed out after ${timeout}s waiting for $what"
            return 1
        fi
        sleep 0.2
    done
}

pg_ctl_status() {
    # 0 running, 3 not running, 4 no/invalid data dir
    local bindir rc=0
    bindir="$(pg_bindir)" || return 4
    [ -f "$PG_DATA/PG_VERSION" ] || return 4
    as_postgres "$bindir/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1 || rc=$?
    return "$rc"
}

# --- start -------------------------------------------------------------------

ensure_tools() {
    local pkgs=()
    command -v redis-server >/dev/null 2>&1 || pkgs+=(redis-server)
    command -v redis-cli >/dev/null 2>&1 || pkgs+=(redis-tools)
    command -v psql >/dev/null 2>&1 || pkgs+=(postgresql-client)
    command -v pgbouncer >/dev/null 2>&1 || pkgs+=(pgbouncer)
    command -v mariadbd >/dev/null 2>&1 || pkgs+=(mariadb-server)
    command -v mariadb >/dev/null 2>&1 || pkgs+=(mariadb-client)
    if ! pg_bindir >/dev/null || { is_root && ! id "$PG_USER" >/dev/null 2>&1; }; then
        pkgs+=(postgresql)
    fi
    if [ "${#pkgs[@]}" -gt 0 ]; then
        is_root || die "missing: ${pkgs[*]} (Debian packages); install them, or run as root to let this script install them"
        apt_install "${pkgs[@]}"
    fi
    pg_bindir >/dev/null || die "no PostgreSQL server binaries (initdb/pg_ctl) found"
    command -v redis-server >/dev/null 2>&1 || die "redis-server not found after install"
    command -v pgbouncer >/dev/null 2>&1 || die "pgbouncer not found after install"
    command -v mariadbd >/dev/null 2>&1 || die "mariadbd not found after install"
}

prepare_dirs() {
    mkdir -p "$SERVICES_DIR" "$REDIS_DIR" "$PG_DIR"
    # The postgres user must be able to reach $PG_DIR through $SERVICES_DIR.
    if ! as_postgres test -x "$SERVICES_DIR"; then
        log "chmod o+x $SERVICES_DIR (so the postgres user can reach it)"
        chmod o+x "$SERVICES_DIR"
    fi
    if is_root; then chown "$PG_USER:" "$PG_DIR"; fi
    chmod 700 "$PG_DIR"
    as_postgres test -w "$PG_DIR" || die "postgres user cannot write $PG_DIR (check the parents' permissions)"
}

start_pg() {
    local bindir rc=0
    bindir="$(pg_bindir)"
    if [ ! -f "$PG_DATA/PG_VERSION" ]; then
        if [ -e "$PG_DATA" ]; then
            log "removing incomplete data dir $PG_DATA"
            rm -rf "$PG_DATA"
        fi
        log "initdb $PG_DATA"
        as_postgres "$bindir/initdb" -D "$PG_DATA" -U "$PG_USER" --auth=trust \
            --encoding=UTF8 --locale=C --no-sync >"$PG_DIR/initdb.log" 2>&1 \
            || { cat "$PG_DIR/initdb.log" >&2; die "initdb failed"; }
    fi

    pg_ctl_status || rc=$?
    if [ "$rc" = 0 ]; then
        log "postgresql already running ($PG_DATA)"
    else
        log "starting postgresql on 127.0.0.1:$PG_PORT"
        local opts="-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1"
        opts+=" -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        opts+=" -c max_connections=200"
        if ! as_postgres "$bindir/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -o "$opts" \
                -t "$START_TIMEOUT" -w start </dev/null >&2; then
            tail -n 30 "$PG_LOG" >&2 || true
            die "postgresql did not start"
        fi
    fi
    wait_until "postgresql on 127.0.0.1:$PG_PORT" "$START_TIMEOUT" pg_up \
        || { tail -n 30 "$PG_LOG" >&2 || true; die "postgresql is not answering on 127.0.0.1:$PG_PORT"; }

    if [ "$(psql_q -d postgres -c "select 1 from pg_database where datname = '$PG_DB'")" != 1 ]; then
        log "creating database $PG_DB"
        psql_q -d postgres -c "create database $PG_DB" >/dev/null
    fi
    log "postgresql ready: postgresql://$PG_USER@127.0.0.1:$PG_PORT/$PG_DB"
}

# PgBouncer as deployments run it with Django: transaction pooling, so that one client's
# successive transactions may run on different server connections (round robin).
start_pgbouncer() {
    if pgbouncer_up; then
        log "pgbouncer already running on 127.0.0.1:$PGBOUNCER_PORT"
        return 0
    fi
    mkdir -p "$PGB_DIR"
    cat >"$PGB_DIR/pgbouncer.ini" <<EOF
[databases]
* = host=127.0.0.1 port=$PG_PORT user=$PG_USER

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGBOUNCER_PORT
unix_socket_dir =
auth_type = any
pool_mode = transaction
server_round_robin = 1
default_pool_size = 20
max_client_conn = 200
admin_users = $PG_USER
logfile = $PGB_LOG
pidfile = $PGB_PID
EOF
    if is_root; then chown -R "$PG_USER:" "$PGB_DIR"; fi
    log "starting pgbouncer (transaction pooling) on 127.0.0.1:$PGBOUNCER_PORT"
    # PgBouncer refuses to run as root.
    as_postgres pgbouncer -d "$PGB_DIR/pgbouncer.ini" </dev/null >&2 \
        || { tail -n 30 "$PGB_LOG" >&2 || true; die "pgbouncer failed to start"; }
    wait_until "pgbouncer on 127.0.0.1:$PGBOUNCER_PORT" "$START_TIMEOUT" pgbouncer_up \
        || { tail -n 30 "$PGB_LOG" >&2 || true; die "pgbouncer is not answering on 127.0.0.1:$PGBOUNCER_PORT"; }
    log "pgbouncer ready: postgresql://$PG_USER@127.0.0.1:$PGBOUNCER_PORT/$PG_DB"
}

start_redis() {
    if redis_up; then
        log "redis already running on 127.0.0.1:$REDIS_PORT"
        return 0
    fi
    log "starting redis on 127.0.0.1:$REDIS_PORT"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes \
        --save '' --appendonly no --dir "$REDIS_DIR" \
        --pidfile "$REDIS_PID" --logfile "$REDIS_LOG" </dev/null >&2 \
        || { tail -n 30 "$REDIS_LOG" >&2 || true; die "redis-server failed to start"; }
    wait_until "redis on 127.0.0.1:$REDIS_PORT" "$START_TIMEOUT" redis_up \
        || { tail -n 30 "$REDIS_LOG" >&2 || true; die "redis is not answering on 127.0.0.1:$REDIS_PORT"; }
    log "redis ready: redis://127.0.0.1:$REDIS_PORT"
}

# MariaDB (Debian's mariadb-server, not its system service): a datadir of its own, root without
# a password on loopback only, utf8mb4, InnoDB without fsync (throwaway data).
start_mariadb() {
    if mariadb_up; then
        log "mariadb already running on 127.0.0.1:$MARIADB_PORT"
        return 0
    fi
    mkdir -p "$MARIADB_DIR"
    local as=()
    if is_root; then
        chown "$MARIADB_USER:" "$MARIADB_DIR"
        as=(--user="$MARIADB_USER")
    fi
    if [ ! -d "$MARIADB_DATA/mysql" ]; then
        rm -rf "$MARIADB_DATA"
        log "mariadb-install-db $MARIADB_DATA"
        mariadb-install-db --no-defaults --datadir="$MARIADB_DATA" "${as[@]}" \
            --auth-root-authentication-method=normal --skip-test-db \
            >"$MARIADB_DIR/install.log" 2>&1 \
            || { cat "$MARIADB_DIR/install.log" >&2; die "mariadb-install-db failed"; }
    fi
    log "starting mariadb on 127.0.0.1:$MARIADB_PORT"
    # In a session of its own, detached from this script's output (a pipe stays open else).
    (cd / && exec setsid mariadbd --no-defaults --datadir="$MARIADB_DATA" "${as[@]}" \
        --port="$MARIADB_PORT" --bind-address=127.0.0.1 --socket="$MARIADB_SOCK" \
        --pid-file="$MARIADB_PID" --log-error="$MARIADB_LOG" --skip-name-resolve \
        --character-set-server=utf8mb4 --collation-server=utf8mb4_unicode_ci \
        --innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0 --max-connections=300) \
        </dev/null >/dev/null 2>&1 &
    wait_until "mariadb on 127.0.0.1:$MARIADB_PORT" "$START_TIMEOUT" mariadb_up \
        || { tail -n 30 "$MARIADB_LOG" >&2 || true; die "mariadb is not answering on 127.0.0.1:$MARIADB_PORT"; }
    mariadb_q -e "CREATE DATABASE IF NOT EXISTS $PG_DB CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
    log "mariadb ready: mysql://root@127.0.0.1:$MARIADB_PORT/$PG_DB"
}

cmd_start() {
    ensure_tools
    prepare_dirs
    start_pg
    start_pgbouncer
    start_mariadb
    start_redis
}

# --- stop --------------------------------------------------------------------

pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

stop_pg() {
    local rc=0 bindir
    pg_ctl_status || rc=$?
    if [ "$rc" != 0 ]; then
        log "postgresql not running ($PG_DATA)"
        return 0
    fi
    bindir="$(pg_bindir)"
    log "stopping postgresql"
    as_postgres "$bindir/pg_ctl" -D "$PG_DATA" -m fast -t "$START_TIMEOUT" -w stop >&2 \
        || die "pg_ctl stop failed (see $PG_LOG)"
}

stop_pgbouncer() {
    local pid=""
    [ -f "$PGB_PID" ] && pid="$(cat "$PGB_PID" 2>/dev/null || true)"
    if pid_alive "$pid"; then
        log "stopping pgbouncer"
        kill "$pid" 2>/dev/null || true
        wait_until "pgbouncer pid $pid to exit" "$START_TIMEOUT" bash -c "! kill -0 $pid 2>/dev/null" \
            || die "pgbouncer (pid $pid) did not stop"
    else
        log "pgbouncer not running"
    fi
    rm -f "$PGB_PID"
}

# Only the Redis this script started (its pid file): never another one on the same port.
stop_redis() {
    local pid=""
    [ -f "$REDIS_PID" ] && pid="$(cat "$REDIS_PID" 2>/dev/null || true)"
    if pid_alive "$pid"; then
        log "stopping redis on 127.0.0.1:$REDIS_PORT"
        kill "$pid" 2>/dev/null || true  # SIGTERM: a clean shutdown, nothing saved (--save '')
        wait_until "redis pid $pid to exit" "$START_TIMEOUT" bash -c "! kill -0 $pid 2>/dev/null" \
            || die "redis (pid $pid) did not stop"
    else
        log "redis not running"
    fi
    rm -f "$REDIS_PID"
}

# Only the MariaDB this script started (its pid file): never another one on the same port.
stop_mariadb() {
    local pid=""
    [ -f "$MARIADB_PID" ] && pid="$(cat "$MARIADB_PID" 2>/dev/null || true)"
    if pid_alive "$pid"; then
        log "stopping mariadb on 127.0.0.1:$MARIADB_PORT"
        kill "$pid" 2>/dev/null || true  # SIGTERM: a clean shutdown
        wait_until "mariadb pid $pid to exit" "$START_TIMEOUT" bash -c "! kill -0 $pid 2>/dev/null" \
            || die "mariadb (pid $pid) did not stop"
    else
        log "mariadb not running"
    fi
    rm -f "$MARIADB_PID"
}

cmd_stop() {
    stop_pgbouncer
    stop_pg
    stop_mariadb
    stop_redis
}

# --- status / env ------------------------------------------------------------

cmd_status() {
    local ok=0
    if pg_up; then
        echo "postgresql: up (127.0.0.1:$PG_PORT, data $PG_DATA)"
    else
        echo "postgresql: down (127.0.0.1:$PG_PORT)"; ok=1
    fi
    if pgbouncer_up; then
        echo "pgbouncer: up (127.0.0.1:$PGBOUNCER_PORT, transaction pooling)"
    else
        echo "pgbouncer: down (127.0.0.1:$PGBOUNCER_PORT)"; ok=1
    fi
    if mariadb_up; then
        echo "mariadb: up (127.0.0.1:$MARIADB_PORT, data $MARIADB_DATA)"
    else
        echo "mariadb: down (127.0.0.1:$MARIADB_PORT)"; ok=1
    fi
    if redis_up; then
        echo "redis: up (127.0.0.1:$REDIS_PORT)"
    else
        echo "redis: down (127.0.0.1:$REDIS_PORT)"; ok=1
    fi
    return "$ok"
}

cmd_env() {
    echo "export DATABASE_URL=postgresql://$PG_USER@127.0.0.1:$PG_PORT/$PG_DB"
    echo "export PGBOUNCER_URL=postgresql://$PG_USER@127.0.0.1:$PGBOUNCER_PORT/$PG_DB"
    echo "export MYSQL_URL=mysql://root@127.0.0.1:$MARIADB_PORT/$PG_DB"
    echo "export CELERY_BROKER_URL=redis://127.0.0.1:$REDIS_PORT/0"
    echo "export CELERY_RESULT_BACKEND=redis://127.0.0.1:$REDIS_PORT/1"
}

case "${1:-}" in
    start)  cmd_start ;;
    stop)   cmd_stop ;;
    status) cmd_status ;;
    env)    cmd_env ;;
    *)      echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
