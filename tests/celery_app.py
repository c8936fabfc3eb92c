"""The test project's Celery app, configured from Django settings (``CELERY_`` namespace)."""

from celery import Celery

app = Celery("tests")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.imports = ["tests.testapp.tasks", "tests.testapp.crash_tasks"]
