"""Settings of the test project.

PostgreSQL and Redis when ``DATABASE_URL`` / ``CELERY_BROKER_URL`` point at them (CI does), else
SQLite and Celery's in-memory transport.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

SECRET_KEY = "celery-deactivate-tests"
USE_TZ = True
TIME_ZONE = "UTC"
DEBUG = False
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ROOT_URLCONF = "tests.urls"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.admin",
    "celery_deactivate",
    "tests.testapp",
]
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
        "TEST": {"NAME": os.environ.get("TEST_DATABASE_NAME") or None},
    }


_SQLITE_DIR = Path(os.environ.get("SQLITE_DIR") or tempfile.gettempdir())

if os.environ.get("DATABASE_URL"):
    DATABASES = {"default": database_from_url(os.environ["DATABASE_URL"])}
else:
    # A file, not :memory:, so that worker threads and worker processes share it.
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(_SQLITE_DIR / "celery_deactivate.sqlite3"),
            "OPTIONS": {"timeout": 20},
            "TEST": {
                "NAME": os.environ.get("TEST_DATABASE_NAME")
                or str(_SQLITE_DIR / f"celery_deactivate_test_{os.getpid()}.sqlite3")
            },
        }
    }

EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
ADMINS = [("Operations", "ops@example.com")]
SERVER_EMAIL = "celery@example.com"

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "memory://")
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", "cache+memory://")
if CELERY_BROKER_URL.startswith("memory://"):
    CELERY_BROKER_TRANSPORT_OPTIONS = {"polling_interval": 0.01}
CELERY_TASK_ALWAYS_EAGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = False

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"celery_deactivate": {"handlers": ["console"], "level": "INFO"}},
}
