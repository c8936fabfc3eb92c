#!/usr/bin/env bash
# Install the MySQL/MariaDB driver (the [mysql] extra: mysqlclient) into a virtualenv.
#
# Usage: scripts/mysql-driver.sh PYTHON          install it (make venv runs this)
#        scripts/mysql-driver.sh --missing       print the Debian packages its build lacks
#
# mysqlclient is built from source: it needs MariaDB's client headers, pkg-config, a C compiler
# and Python's headers.  As root, what is missing is installed with apt-get (Debian, Ubuntu).
# As another user nothing is installed: without them the driver is left out, with a warning
# naming the packages, and the suite's run on MariaDB is skipped (scripts/on-each-database.sh
# says so); everything else works without it.
set -euo pipefail

say() { printf 'mysql-driver: %s\n' "$*" >&2; }

missing() {
    local pkgs=()
    dpkg -s libmariadb-dev >/dev/null 2>&1 || pkgs+=(libmariadb-dev)
    command -v pkg-config >/dev/null 2>&1 || pkgs+=(pkg-config)
    command -v gcc >/dev/null 2>&1 || pkgs+=(gcc)
    "${1:-python3}" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        || pkgs+=(python3-dev)
    echo "${pkgs[*]}"
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
    if [ "$(id -u)" != 0 ]; then
        say "WARNING: mysqlclient left out, its build needs: ${pkgs[*]}"
        say "  (as root: apt-get install ${pkgs[*]}; then: $0 $python); the suite's MariaDB run is skipped"
        exit 0
    fi
    say "apt-get install ${pkgs[*]} (to build mysqlclient)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >&2
fi
"$python" -m pip install -q -e '.[mysql]'
