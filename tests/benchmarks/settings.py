"""Django settings of the benchmark worker and runner: the test project on its own database.

``BENCH_DATABASE_URL`` (PostgreSQL) or ``BENCH_SQLITE`` (a file), ``BENCH_BROKER_URL`` and, for
the filesystem broker, ``BENCH_BROKER_FOLDER``.  Results are ignored: the tasks' own cost counts.
"""

from __future__ import annotations

import os
from pathlib import Path

import django

from tests.settings import *  # noqa: F403
from tests.settings import database_from_url

# As a real project has it: django-celery-beat installed (the test extra) with the library's
# integration, whose receivers make every state change run in a transaction and look up the
# object's schedules on each deactivation.

if os.environ.get("BENCH_DATABASE_URL"):
    DATABASES = {"default": database_from_url(os.environ["BENCH_DATABASE_URL"])}
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("BENCH_SQLITE", "/tmp/celery_deactivate_bench.sqlite3"),
            "OPTIONS": {"timeout": 30},
        }
    }
    if django.VERSION >= (5, 1):
        # Two worker processes on one SQLite file: a transaction that reads before it writes
        # (the recipe's body) fails with "database is locked" when it starts deferred.
        DATABASES["default"]["OPTIONS"]["transaction_mode"] = "IMMEDIATE"

# Mail over SMTP to the runner's sink on loopback (tests.benchmarks.mail), as a project sends it;
# rendered and dropped with ``--mail render``.
if os.environ.get("BENCH_SMTP_PORT"):
    EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    EMAIL_HOST = "127.0.0.1"
    EMAIL_PORT = int(os.environ["BENCH_SMTP_PORT"])
    EMAIL_TIMEOUT = 10
else:
    EMAIL_BACKEND = "tests.benchmarks.mail.RenderingBackend"

CELERY_BROKER_URL = os.environ.get("BENCH_BROKER_URL", "filesystem://")
# Results ignored, as the recipe's; the fan-out is measured a second time with a Redis result
# backend (``BENCH_RESULT_BACKEND``, tests.benchmarks.worker_run --fanout-only).
CELERY_RESULT_BACKEND = os.environ.get("BENCH_RESULT_BACKEND") or None
CELERY_TASK_IGNORE_RESULT = CELERY_RESULT_BACKEND is None
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {}
if CELERY_BROKER_URL.startswith("filesystem://"):
    _folder = Path(os.environ.get("BENCH_BROKER_FOLDER", "/tmp/celery_deactivate_bench_broker"))
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_folder),
        "data_folder_out": str(_folder),
        "control_folder": str(_folder / "control"),
        "polling_interval": 0.001,
    }

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"null": {"class": "logging.NullHandler"}},
    "loggers": {
        "celery_deactivate": {"handlers": ["null"], "level": "WARNING", "propagate": False}
    },
}
