#!/usr/bin/env bash
# Run a command (the test suite) once per database of the run: on DATABASE_URL (PostgreSQL, or
# SQLite when unset); then, when MYSQL_URL is set (scripts/services.sh starts a MariaDB), again
# on it; then, when DATABASE_URL is set, again on SQLite (a file in a temporary directory, with
# the same Redis: the crash tests then run on SQLite too).  Each later run has Redis databases of
# its own for the broker and the results (6 and 7 for MariaDB, 8 and 9 for SQLite, of the same
# Redis) so that no message of one run reaches another.
#
# Usage: scripts/on-each-database.sh PYTHON [ARGS...]
#
# Without the MySQL driver in PYTHON's environment (scripts/mysql-driver.sh could not build it)
# the MariaDB run is skipped, saying why; under CI it runs and fails instead.
#
# Every run goes to the end; the exit status is the first failing run's (0 when all pass).
set -uo pipefail

[ "$#" -gt 0 ] || { echo "usage: $0 PYTHON [ARGS...]" >&2; exit 2; }
say() { printf '\non-each-database: %s\n' "$*" >&2; }

rc=0
# again DATABASE_URL BROKER_DB RESULTS_DB COMMAND...: the command on another database
again() {
    local database=$1 broker_db=$2 results_db=$3
    shift 3
    (
        export DATABASE_URL="$database"
        unset PGBOUNCER_URL
        [ -n "$database" ] || unset TEST_DATABASE_NAME  # SQLite: its own file, not the server's name
        if [ -n "${CELERY_BROKER_URL:-}" ]; then
            export CELERY_BROKER_URL="${CELERY_BROKER_URL%/*}/$broker_db"
        fi
        if [ -n "${CELERY_RESULT_BACKEND:-}" ]; then
            export CELERY_RESULT_BACKEND="${CELERY_RESULT_BACKEND%/*}/$results_db"
        fi
        "$@"
    )
    local run_rc=$?
    [ "$rc" != 0 ] || rc=$run_rc
}

say "on ${DATABASE_URL:-SQLite (DATABASE_URL unset)}"
"$@"
rc=$?

if [ -n "${MYSQL_URL:-}" ] && ! "$1" -c 'import MySQLdb' 2>/dev/null && [ -z "${CI:-}" ]; then
    say "no run on MariaDB: mysqlclient is not installed (scripts/mysql-driver.sh says what its build needs)"
elif [ -n "${MYSQL_URL:-}" ]; then
    say "on $MYSQL_URL (MariaDB)"
    again "$MYSQL_URL" 6 7 "$@"
else
    say "MYSQL_URL unset: no run on MariaDB"
fi

if [ -n "${DATABASE_URL:-}" ]; then
    say "on SQLite"
    again "" 8 9 "$@"
fi
exit "$rc"
