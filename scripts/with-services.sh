#!/usr/bin/env bash
# Run a command (the test suite: `make test`, `make test-crash`) with PostgreSQL,
# PgBouncer, MariaDB and Redis.
#
# Usage: scripts/with-services.sh COMMAND [ARGS...]
#
#   - DATABASE_URL or CELERY_BROKER_URL already set (CI's .ci/run, or servers
#     of your own): run COMMAND as it is, on them.
#   - Otherwise start a throwaway PostgreSQL, PgBouncer, MariaDB and Redis with
#     scripts/services.sh, in a temporary SERVICES_DIR on free loopback ports
#     (PG_PORT, PGBOUNCER_PORT, MARIADB_PORT, REDIS_PORT when set), run COMMAND
#     with their URLs (MariaDB's as MYSQL_URL: scripts/on-each-database.sh), then
#     stop them and remove the directory, whatever happens.
#   - If they cannot be installed or started (not root and not installed, no
#     apt, ...), run COMMAND on the embedded default (SQLite and Celery's
#     in-memory transport): the tests that need a server are skipped, each
#     with its reason (pytest -rs). With CI set, that is an error instead.
#
# The exit status is COMMAND's (1 if CI is set and the services did not start).
set -uo pipefail

[ "$#" -gt 0 ] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }
SERVICES="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)/services.sh"

say() { printf 'with-services: %s\n' "$*" >&2; }

if [ -n "${DATABASE_URL:-}" ] || [ -n "${CELERY_BROKER_URL:-}" ]; then
    say "using DATABASE_URL=${DATABASE_URL:-(unset: SQLite)} CELERY_BROKER_URL=${CELERY_BROKER_URL:-(unset: memory://)}"
    exec "$@"
fi

# Free TCP ports on 127.0.0.1, as the kernel hands them out (held together, so distinct).
free_ports() {
    "${PYTHON:-python3}" -c '
import socket, sys
sockets = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in sockets))
' "$1"
}

SERVICES_DIR="$(mktemp -d "${TMPDIR:-/tmp}/celery-deactivate-test.XXXXXX")" || exit 1
export SERVICES_DIR
started=0

cleanup() {
    local rc=$?
    trap - EXIT
    trap '' INT TERM  # a second Ctrl-C must not cut the cleanup short
    if [ "$started" = 1 ]; then
        "$SERVICES" stop || say "warning: services.sh stop failed"
    fi
    rm -rf "$SERVICES_DIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ports="$(free_ports 4)"; then
    read -r pg_free pgbouncer_free redis_free mariadb_free <<<"$ports"
    export PG_PORT="${PG_PORT:-$pg_free}"
    export PGBOUNCER_PORT="${PGBOUNCER_PORT:-$pgbouncer_free}"
    export REDIS_PORT="${REDIS_PORT:-$redis_free}"
    export MARIADB_PORT="${MARIADB_PORT:-$mariadb_free}"
fi

say "starting a throwaway PostgreSQL, PgBouncer, MariaDB and Redis in $SERVICES_DIR"
started=1  # from here on, stop whatever part of them did start
if [ -n "${PG_PORT:-}" ] && "$SERVICES" start; then
    eval "$("$SERVICES" env)"
else
    "$SERVICES" stop 2>/dev/null
    started=0
    if [ -n "${CI:-}" ]; then
        say "ERROR: the servers did not start (above); CI is set: no fallback to SQLite"
        exit 1
    fi
    say "the servers did not start (above): running on SQLite and Celery's in-memory transport;"
    say "the tests that need PostgreSQL, PgBouncer or Redis are skipped, each with its reason"
fi

"$@"
