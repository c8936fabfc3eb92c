"""The backends the benchmark runs on, and the environment of the process that runs one.

- ``embedded``: an SQLite file and SQLAlchemy's SQLite transport as the broker, in a temporary
  folder; always available.
- ``pgredis``: PostgreSQL + Redis, when ``DATABASE_URL`` (``postgresql://``) and
  ``CELERY_BROKER_URL`` (``redis://``) are set.  The benchmark uses its own database on that
  server, ``BENCH_DATABASE`` (default ``cd_bench``, created if missing), and its own Redis
  database number, ``BENCH_REDIS_DB`` (default 6): it empties its tables and queues.

No Django here: the runner imports this module before a backend's settings exist.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[2]


def backends() -> list[dict[str, str]]:
    found = [{"name": "embedded (SQLite + sqla+sqlite broker)", "key": "embedded"}]
    db, broker = os.environ.get("DATABASE_URL"), os.environ.get("CELERY_BROKER_URL", "")
    if db and broker.startswith("redis://"):
        parts = urlsplit(db)
        bench_db = urlunsplit(
            parts._replace(path="/" + os.environ.get("BENCH_DATABASE", "cd_bench"))
        )
        redis = urlsplit(broker)
        bench_broker = urlunsplit(redis._replace(path="/" + os.environ.get("BENCH_REDIS_DB", "6")))
        found.append(
            {
                "name": "PostgreSQL + Redis",
                "key": "pgredis",
                "BENCH_DATABASE_URL": bench_db,
                "BENCH_BROKER_URL": bench_broker,
            }
        )
    return found


def backend_env(backend: dict[str, str], workdir: str) -> dict[str, str]:
    """The variables :mod:`tests.benchmarks.settings` reads for ``backend``."""
    env = {k: v for k, v in backend.items() if k.startswith("BENCH_")}
    if backend["key"] == "embedded":
        env["BENCH_SQLITE"] = str(Path(workdir) / "bench.sqlite3")
        # kombu's filesystem transport can hand a consumer a half-written file while publishing
        # runs; the SQLAlchemy transport on an SQLite file is transactional.
        env["BENCH_BROKER_URL"] = f"sqla+sqlite:///{Path(workdir) / 'broker.sqlite3'}"
    else:
        ensure_database(os.environ["DATABASE_URL"], backend["BENCH_DATABASE_URL"])
    return env


def child_env(backend: dict[str, str], workdir: str) -> dict[str, str]:
    """The whole environment of the process that runs ``backend``'s benchmark."""
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "CELERY_BROKER_URL"}}
    env.update(backend_env(backend, workdir))
    env["DJANGO_SETTINGS_MODULE"] = "tests.benchmarks.settings"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("CELERY_DB_REUSE_MAX", "1000")
    return env


def ensure_database(server_url: str, url: str) -> None:
    """Create the database of ``url`` (on the server of ``server_url``) if it does not exist."""
    import psycopg
    from psycopg import sql

    name = unquote(urlsplit(url).path.lstrip("/"))
    with psycopg.connect(server_url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
