from __future__ import annotations

from django.apps import AppConfig


class CeleryDeactivateConfig(AppConfig):
    name = "celery_deactivate"
    default_auto_field = "django.db.models.BigAutoField"
    verbose_name = "Celery deactivate"

    def ready(self) -> None:
        from . import tasks  # noqa: F401  (registers the fan-out's internal tasks on every app)
        from .task import pending_checks

        for task_class in list(pending_checks):
            task_class.check_configuration()
            pending_checks.discard(task_class)
