"""Settings of the test project.

PostgreSQL and Redis when ``DATABASE_URL`` / ``CELERY_BROKER_URL`` point at them (CI does), else
SQLite and Celery's in-memory transport.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import django

SECRET_KEY = "celery-deactivate-tests"
USE_TZ = True
TIME_ZONE = "UTC"
DEBUG = False
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ROOT_URLCONF = "tests.urls"
STATIC_URL = "static/"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.admin",
    "django.contrib.staticfiles",  # the admin's CSS and icons for the browser test's live server
    "celery_deactivate",
    "tests.testapp",
]
if importlib.util.find_spec("django_celery_beat"):  # the [beat] extra (tests/test_beat.py)
    INSTALLED_APPS.append("django_celery_beat")
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]


def database_from_url(url: str) -> dict[str, object]:
    """``postgresql://`` or ``mysql://user:password@host:port/name`` (MySQL or MariaDB, through
    mysqlclient) as a Django DATABASES entry."""
    parts = urlsplit(url)
    common = {
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
    }
    test_name = os.environ.get("TEST_DATABASE_NAME") or None
    if parts.scheme in {"postgres", "postgresql"}:
        return {
            "ENGINE": "django.db.backends.postgresql",
            **common,
            "TEST": {"NAME": test_name},
        }
    if parts.scheme in {"mysql", "mariadb"}:
        return {
            "ENGINE": "django.db.backends.mysql",
            **common,
            "OPTIONS": {"charset": "utf8mb4"},
            "TEST": {"NAME": test_name, "CHARSET": "utf8mb4", "COLLATION": "utf8mb4_unicode_ci"},
        }
    raise ValueError(f"DATABASE_URL: postgresql:// or mysql:// only, got {url!r}")


_SQLITE_DIR = Path(os.environ.get("SQLITE_DIR") or tempfile.gettempdir())

DATABASES: dict[str, dict[str, Any]]
if os.environ.get("DATABASE_URL"):
    DATABASES = {"default": database_from_url(os.environ["DATABASE_URL"])}
else:
    # A file, not :memory:, so that worker threads and worker processes share it.
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(_SQLITE_DIR / "celery_deactivate.sqlite3"),
            "OPTIONS": {},
            "TEST": {
                "NAME": os.environ.get("TEST_DATABASE_NAME")
                or str(_SQLITE_DIR / f"celery_deactivate_test_{os.getpid()}.sqlite3")
            },
        }
    }

# A backend the library does not support, for its system check (tests/test_checks.py); never
# connected to, so never created.
DATABASES["exotic"] = {
    "ENGINE": "tests.exotic_db",
    "NAME": str(_SQLITE_DIR / "celery_deactivate_exotic.sqlite3"),
}

# The same database through PgBouncer in transaction pooling mode (scripts/services.sh), for the
# tests of what the library does behind a pooler (tests/test_poolers.py).
if os.environ.get("PGBOUNCER_URL") and DATABASES["default"]["ENGINE"].endswith("postgresql"):
    DATABASES["pooled"] = {
        **database_from_url(os.environ["PGBOUNCER_URL"]),
        "TEST": {"MIRROR": "default"},
    }

# Django's connection pool (PostgreSQL, Django 5.1+), for the crash tests' workers that use it.
if os.environ.get("DB_POOL") and DATABASES["default"]["ENGINE"].endswith("postgresql"):
    DATABASES["default"]["OPTIONS"] = {"pool": True}

# A worker subprocess of the crash tests (tests/crash) uses the test database of the pytest run
# that started it, and writes its mail where that run can read it.
if os.environ.get("USE_TEST_DATABASE_NAME"):
    DATABASES["default"]["NAME"] = DATABASES["default"]["TEST"]["NAME"]
# SQLite shared by several processes: "IMMEDIATE" transactions take the write lock when they
# begin, so no transaction fails to upgrade a read lock (Django 5.1+; "DEFERRED" is SQLite's and
# Django's default).
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    _options = DATABASES["default"]["OPTIONS"]
    _options["timeout"] = float(os.environ.get("SQLITE_TIMEOUT") or 20)
    if django.VERSION >= (5, 1):
        _options["transaction_mode"] = os.environ.get("SQLITE_TRANSACTION_MODE") or "IMMEDIATE"

EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
if os.environ.get("EMAIL_FILE_PATH"):
    EMAIL_BACKEND = "django.core.mail.backends.filebased.EmailBackend"
    EMAIL_FILE_PATH = os.environ["EMAIL_FILE_PATH"]
elif os.environ.get("EMAIL_PORT"):
    EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    EMAIL_HOST = "127.0.0.1"
    EMAIL_PORT = int(os.environ["EMAIL_PORT"])
    EMAIL_TIMEOUT = 5
# Addresses alone from Django 6.0, which deprecates (name, address) pairs; older ones need pairs.
ADMINS: list[Any] = (
    ["ops@example.com"] if django.VERSION >= (6, 0) else [("Operations", "ops@example.com")]
)
SERVER_EMAIL = "celery@example.com"

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "memory://")
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", "cache+memory://")
if CELERY_BROKER_URL.startswith("memory://"):
    CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, Any] = {"polling_interval": 0.01}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = False
# Keep database connections across tasks (Celery's Django fixup closes them around every task
# otherwise), as production settings should.
CELERY_DB_REUSE_MAX = int(os.environ.get("DB_REUSE_MAX") or 0) or None
# Seconds a prefork worker waits for the result of a killed child before WorkerLostError.
CELERY_WORKER_LOST_WAIT = float(os.environ.get("WORKER_LOST_WAIT") or 10.0)

# The notice window (on by default) set through the environment, e.g. for a crash-test worker
# whose test expects one notice per deactivation: DEACTIVATE_NOTIFY_WINDOW=0.
if os.environ.get("DEACTIVATE_NOTIFY_WINDOW"):
    CELERY_DEACTIVATE_NOTIFY_WINDOW = float(os.environ["DEACTIVATE_NOTIFY_WINDOW"])
# The crash tests' workers: the guard off worker-wide (tests/crash/worker.py); the guard's own
# tasks (tests/testapp/outage_tasks.py) set it per task.
if os.environ.get("DEACTIVATE_OUTAGE_OBJECTS"):
    CELERY_DEACTIVATE_OUTAGE_OBJECTS = int(os.environ["DEACTIVATE_OUTAGE_OBJECTS"])

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"celery_deactivate": {"handlers": ["console"], "level": "INFO"}},
}
