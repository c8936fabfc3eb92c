#!/usr/bin/env bash
# Run a command (the test suite) once per database of the run: on DATABASE_URL (PostgreSQL, or
# SQLite when unset), then, when MYSQL_URL is set (scripts/services.sh starts a MariaDB), again
# on it, with Redis databases of its own for the broker and the results (6 and 7 of the same
# Redis) so that no message of the first run reaches the second.
#
# Usage: scripts/on-each-database.sh PYTHON [ARGS...]
#
# Without the MySQL driver in PYTHON's environment (scripts/mysql-driver.sh could not build it)
# the MariaDB run is skipped, saying why; under CI it runs and fails instead.
#
# Every run goes to the end; the exit status is the first failing run's (0 when all pass).
set -uo pipefail

[ "$#" -gt 0 ] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }
say() { printf '\non-each-database: %s\n' "$*" >&2; }

say "on ${DATABASE_URL:-SQLite (DATABASE_URL unset)}"
"$@"
rc=$?

if [ -n "${MYSQL_URL:-}" ] && ! "$1" -c 'import MySQLdb' 2>/dev/null && [ -z "${CI:-}" ]; then
    say "no run on MariaDB: mysqlclient is not installed (scripts/mysql-driver.sh says what its build needs)"
elif [ -n "${MYSQL_URL:-}" ]; then
    say "on $MYSQL_URL (MariaDB)"
    (
        export DATABASE_URL="$MYSQL_URL"
        unset PGBOUNCER_URL
        if [ -n "${CELERY_BROKER_URL:-}" ]; then
            export CELERY_BROKER_URL="${CELERY_BROKER_URL%/*}/6"
        fi
        if [ -n "${CELERY_RESULT_BACKEND:-}" ]; then
            export CELERY_RESULT_BACKEND="${CELERY_RESULT_BACKEND%/*}/7"
        fi
        "$@"
    )
    mysql_rc=$?
    [ "$rc" != 0 ] || rc=$mysql_rc
else
    say "MYSQL_URL unset: no run on MariaDB"
fi
exit "$rc"
