#!/usr/bin/env bash
# Install the MySQL/MariaDB driver (the [mysql] extra: mysqlclient) into a virtualenv, for the
# suite's run on MariaDB.
#
# Usage: scripts/mysql-driver.sh PYTHON          install it (make test runs this; quick when it is there)
#        scripts/mysql-driver.sh --missing       print the Debian packages its build lacks
#
# mysqlclient is built from source: it needs MariaDB's (or MySQL's) client headers, found through
# pkg-config, a C compiler and Python's headers.  As root, what is missing is installed with
# apt-get (Debian, Ubuntu).  As another user nothing is installed.  When the driver cannot be
# had (not root, no apt-get, no network, a failed build) it is left out with a warning that says
# why and what to run, and the suite's run on MariaDB is skipped (scripts/on-each-database.sh
# says so); under CI (CI set) that is an error instead.
set -uo pipefail

cd "$(dirname "$0")/.."
say() { printf 'mysql-driver: %s\n' "$*" >&2; }

headers_found() {
    command -v pkg-config >/dev/null 2>&1 || return 1
    local name
    for name in mysqlclient mariadb libmariadb; do
        pkg-config --exists "$name" && return 0
    done
    return 1
}

missing() {
    local pkgs=()
    command -v pkg-config >/dev/null 2>&1 || pkgs+=(pkg-config)
    headers_found || pkgs+=(libmariadb-dev)
    command -v gcc >/dev/null 2>&1 || pkgs+=(gcc)
    "${1:-python3}" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        || pkgs+=(python3-dev)
    echo "${pkgs[*]}"
}

left_out() {
    say "WARNING: mysqlclient left out: $1"
    say "  then: $0 $python (the suite's MariaDB run is skipped until then)"
    [ -z "${CI:-}" ] || exit 1
    exit 0
}

[ "$#" = 1 ] || { echo "usage: $0 PYTHON | --missing" >&2; exit 2; }
if [ "$1" = "--missing" ]; then
    missing python3
    exit 0
fi

python="$1"
if "$python" -c 'import MySQLdb' 2>/dev/null; then
    exit 0
fi
read -ra pkgs <<< "$(missing "$python")"
if [ "${#pkgs[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        left_out "its build needs ${pkgs[*]} (Debian: apt-get install ${pkgs[*]}, as root)"
    fi
    say "apt-get install ${pkgs[*]} (to build mysqlclient)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${pkgs[@]}"; } >&2 \
        || left_out "apt-get install ${pkgs[*]} failed"
fi
"$python" -m pip install -q -e '.[mysql]' || left_out "pip install -e '.[mysql]' failed"
