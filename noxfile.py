"""The test matrix: Celery 5.3, 5.5, 5.7 x Django 4.2, 5.2 (Python 3.11); Django 6.0 (3.12).

    make test-matrix                                   # every session
    .venv/bin/nox -l                                   # list them
    .venv/bin/nox -s "tests(celery='5.3', django='4.2')" -- -m "not crash"
    .venv/bin/nox -t oldest latest                     # what CI runs through nox

Each session installs ``.[test]`` plus ``celery[redis]~=X.Y.0``, ``kombu~=X.Y.0`` and
``Django~=X.Y.0`` and runs pytest (arguments after ``--`` go to pytest).  ``DATABASE_URL``,
``CELERY_BROKER_URL``, ``CELERY_RESULT_BACKEND`` and ``TEST_DATABASE_NAME`` are passed through:
without them the suite runs on SQLite and Celery's in-memory transport.

Interpreters are looked up by full path, so that pyenv's are found even when pyenv has only one
version active (its ``python3.12`` shim then refuses to run): ``NOX_PYTHON_3_12`` (a path) if
set, else ``$PYENV_ROOT/versions/3.12.*`` (``~/.pyenv`` by default, highest patch first), else a
working ``python3.12`` on ``PATH``.  A missing interpreter skips its sessions (fails them when
``CI`` is set), and nox never downloads one.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.download_python = "never"
nox.options.sessions = ["tests"]

PASSTHROUGH_ENV = (
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND",
    "TEST_DATABASE_NAME",
    "PGBOUNCER_URL",
)

# (python, celery, django, tags)
MATRIX = [
    ("3.11", "5.3", "4.2", ["oldest"]),
    ("3.11", "5.3", "5.2", []),
    ("3.11", "5.5", "4.2", []),
    ("3.11", "5.5", "5.2", []),
    ("3.11", "5.7", "4.2", []),
    ("3.11", "5.7", "5.2", ["newest"]),
    ("3.12", "5.5", "6.0", ["django6"]),
    ("3.12", "5.7", "6.0", ["django6"]),
]


def _version_key(path: str) -> tuple[int, ...]:
    """``.../versions/3.12.10/bin/python3.12`` -> (3, 12, 10); unparsable names sort first."""
    name = os.path.basename(os.path.dirname(os.path.dirname(path)))
    try:
        return tuple(int(part) for part in name.split("."))
    except ValueError:
        return ()


def _runs_as(path: str, version: str) -> bool:
    try:
        out = subprocess.run(
            [path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and out.stdout.strip() == version


def find_python(version: str) -> str:
    """A full path to a working ``python<version>``, or ``version`` itself (nox: not found)."""
    override = os.environ.get(f"NOX_PYTHON_{version.replace('.', '_')}")
    if override:
        return override
    candidates: list[str] = []
    roots = [os.environ.get("PYENV_ROOT"), os.path.expanduser("~/.pyenv")]
    for root in dict.fromkeys(r for r in roots if r):
        found = glob.glob(os.path.join(root, "versions", f"{version}.*", "bin", f"python{version}"))
        candidates += sorted(found, key=_version_key, reverse=True)
    on_path = shutil.which(f"python{version}")
    if on_path:
        candidates.append(on_path)
    for path in candidates:
        if _runs_as(path, version):
            return path
    return version


PYTHONS = {version: find_python(version) for version in sorted({row[0] for row in MATRIX})}


@nox.session(tags=["matrix"])
@nox.parametrize(
    ("python", "celery", "django"),
    [
        nox.param(
            PYTHONS[py], celery, django, id=f"celery='{celery}', django='{django}'", tags=tags
        )
        for py, celery, django, tags in MATRIX
    ],
)
def tests(session: nox.Session, celery: str, django: str) -> None:
    """The whole suite (crash tests included) on one Celery x Django pair."""
    # kombu of the same minor: Celery 5.3 would take kombu 5.7, whose Redis transport needs
    # redis-py >= 6.1 while celery[redis] 5.3 caps it below 6.
    session.install(
        "-e", ".[test]", f"celery[redis]~={celery}.0", f"kombu~={celery}.0", f"Django~={django}.0"
    )
    _run_suite(session)


@nox.session(python=PYTHONS["3.12"], tags=["latest"])
def latest(session: nox.Session) -> None:
    """The whole suite on the newest releases of Celery, kombu, billiard and Django (no pins):
    a private API that moved, or a hook that changed, shows here first (CI runs it)."""
    session.install("-e", ".[test]")
    session.install(
        "--upgrade",
        "--upgrade-strategy",
        "eager",
        "celery[redis]",
        "kombu",
        "billiard",
        "Django",
        "psycopg[binary]",
    )
    _run_suite(session)


def _run_suite(session: nox.Session) -> None:
    session.run(
        "python",
        "-c",
        "import sys, importlib.metadata as m; print(sys.version.split()[0], *("
        "f'{d}=={m.version(d)}' for d in ('celery', 'kombu', 'billiard', 'redis', 'Django',"
        " 'psycopg', 'pytest-django')))",
        silent=False,
    )
    env = {name: os.environ[name] for name in PASSTHROUGH_ENV if name in os.environ}
    session.run("python", "-m", "pytest", *session.posargs, env=env)
