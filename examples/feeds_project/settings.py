"""Settings of the example project.

Embedded by default: SQLite, kombu's filesystem broker and Celery's file result backend, all under
``examples/var/``, so nothing needs a server.  PostgreSQL and Redis through the environment:

    DATABASE_URL=postgresql://user:password@host:port/name
    CELERY_BROKER_URL=redis://host:port/0
    CELERY_RESULT_BACKEND=redis://host:port/1
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

import django

BASE_DIR = Path(__file__).resolve().parent.parent
#: Everything the embedded default writes: database, broker, results, mails, worker log
#: (``EXAMPLE_VAR_DIR`` elsewhere: tests/test_example.py seeds a project of its own there).
VAR_DIR = Path(os.environ.get("EXAMPLE_VAR_DIR") or BASE_DIR / "var")

SECRET_KEY = "celery-deactivate-example-not-a-secret"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ROOT_URLCONF = "feeds_project.urls"
STATIC_URL = "static/"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "celery_deactivate",
    "feeds",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
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


# -- database -------------------------------------------------------------------------------


def database_from_url(url: str) -> dict[str, object]:
    """``postgresql://user:password@host:port/name`` as a Django DATABASES entry."""
    parts = urlsplit(url)
    if parts.scheme not in {"postgres", "postgresql"}:
        raise ValueError(f"DATABASE_URL: only postgresql:// is supported, got {url!r}")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
    }


def sqlite_database(path: Path) -> dict[str, object]:
    """A SQLite file shared by the web process and the worker's pool processes."""
    options: dict[str, object] = {"timeout": 20}  # seconds to wait for another writer
    if django.VERSION >= (5, 1):
        # BEGIN IMMEDIATE: concurrent task transactions queue for the write lock instead of
        # failing with "database is locked" when a read lock cannot be upgraded.
        options["transaction_mode"] = "IMMEDIATE"
        options["init_command"] = "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
    return {"ENGINE": "django.db.backends.sqlite3", "NAME": str(path), "OPTIONS": options}


if os.environ.get("DATABASE_URL"):
    DATABASES = {"default": database_from_url(os.environ["DATABASE_URL"])}
else:
    DATABASES = {"default": sqlite_database(VAR_DIR / "feeds.sqlite3")}


# -- Celery (read by feeds_project/celery.py: CELERY_FOO is Celery's ``foo`` setting) ----------

# "localhost" only keeps kombu from warning that no host was given: no server is involved.
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "filesystem://localhost/")
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", f"file://{VAR_DIR / 'results'}")
CELERY_TASK_TRACK_STARTED = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1

if CELERY_BROKER_URL.startswith("filesystem://"):
    # One folder is both the queue the web process writes to and the one the worker reads.
    _BROKER_DIR = VAR_DIR / "broker"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_BROKER_DIR / "queue"),
        "data_folder_out": str(_BROKER_DIR / "queue"),
        "control_folder": str(_BROKER_DIR / "control"),
        "store_processed": True,  # keep consumed messages, moved by an atomic rename
        "processed_folder": str(_BROKER_DIR / "processed"),
        "polling_interval": 0.05,  # seconds between two looks at an empty queue
    }

# The folders of the embedded default must exist before the first connection, message or result.
VAR_DIR.mkdir(exist_ok=True)
if CELERY_BROKER_URL.startswith("filesystem://"):
    for _name in ("queue", "control", "processed"):
        (_BROKER_DIR / _name).mkdir(parents=True, exist_ok=True)
if CELERY_RESULT_BACKEND.startswith("file://"):
    (VAR_DIR / "results").mkdir(exist_ok=True)

# celery-deactivate options, worker-wide (a task's own keyword wins): see celery_deactivate.conf.
CELERY_DEACTIVATE_AFTER = 1
# The outage guard: an outage of a task starts when 3 distinct feeds failed for good within 5 s
# and at least half of the task's runs in those 5 s failed (defaults: 10 objects, 50 %, 300 s;
# the window is short here so that the demo sees the recovery within seconds).
CELERY_DEACTIVATE_OUTAGE_OBJECTS = 3
CELERY_DEACTIVATE_OUTAGE_RATE = 0.5
CELERY_DEACTIVATE_OUTAGE_WINDOW = 5
# Five feeds: the rate is judged from the first run (default: from 100 runs in the window, which
# five feeds never reach: no outage would ever start).
CELERY_DEACTIVATE_OUTAGE_MIN_RUNS = 1
# The first deactivation of a task in a quiet period is mailed at once; later ones within 5 minutes
# wait for one digest (sent by celery_deactivate.maintain, in the beat schedule of celery.py).
CELERY_DEACTIVATE_NOTIFY_WINDOW = 300
# The way back: an hour after a feed was deactivated by a failure, celery_deactivate.maintain sends
# one probe (the poll task, for that feed); success re-activates it, failure doubles the cool-down
# (up to a day, deactivate_cooldown_max).
CELERY_DEACTIVATE_COOLDOWN = 3600
# Admin links in the notices are absolute with the site's base URL (else site-relative paths).
CELERY_DEACTIVATE_SITE_URL = "http://127.0.0.1:8000"

# The demo's stand-in for the feeds' upstream: down while this file exists (feeds/tasks.py).
UPSTREAM_DOWN_FLAG = VAR_DIR / "upstream-down"


# -- mail: the admins are told about deactivations and outages ----------------------------------

# Addresses alone from Django 6.0, which deprecates (name, address) pairs; older ones need pairs.
ADMINS = (
    ["ops@example.com"] if django.VERSION >= (6, 0) else [("Feeds operations", "ops@example.com")]
)
SERVER_EMAIL = "feeds-worker@example.com"
EMAIL_SUBJECT_PREFIX = "[feeds] "
# Files under var/mail, so that the demo can show what the worker process sent.
EMAIL_BACKEND = "django.core.mail.backends.filebased.EmailBackend"
EMAIL_FILE_PATH = str(VAR_DIR / "mail")
