"""The benchmark's Celery app: ``celery -A tests.benchmarks.app worker`` (Django set up first)."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.benchmarks.settings")

import django
from celery import Celery

django.setup()

app = Celery("bench")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.imports = ["tests.benchmarks.tasks"]
# Celery's Django fixup reads this exact key: keep connections across tasks, as production does.
app.conf["CELERY_DB_REUSE_MAX"] = int(os.environ.get("CELERY_DB_REUSE_MAX", "1000"))
app.conf.task_default_queue = "bench"
