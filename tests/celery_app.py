"""The test project's Celery app, configured from Django settings (``CELERY_`` namespace)."""

import os

from celery import Celery

app = Celery("tests")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.imports = [
    "tests.testapp.tasks",
    "tests.testapp.crash_tasks",
    "tests.testapp.outage_tasks",
]

if os.environ.get("SQL_HOOK_LOG"):  # a Sentry-style execute hook in this worker (tests/sqlhook.py)
    import tests.sqlhook  # noqa: F401
