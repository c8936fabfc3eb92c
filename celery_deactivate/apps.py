from __future__ import annotations

from django.apps import AppConfig
from django.core import checks


class CeleryDeactivateConfig(AppConfig):
    name = "celery_deactivate"
    default_auto_field = "django.db.models.BigAutoField"
    verbose_name = "Celery deactivate"

    def ready(self) -> None:
        from . import (
            beat,
            tasks,  # noqa: F401  (registers the fan-out's internal tasks on every app)
        )
        from .checks import (
            TAG,
            check_databases,
            check_maintain,
            check_maintain_periodic_tasks,
            check_settings,
            check_tasks,
            check_tasks_on_deploy,
        )
        from .task import pending_checks

        checks.register(check_settings, TAG)
        checks.register(check_tasks, TAG)
        checks.register(check_databases, TAG)
        checks.register(check_maintain, TAG)
        checks.register(check_maintain_periodic_tasks, checks.Tags.database)
        checks.register(check_tasks_on_deploy, TAG, deploy=True)
        if beat.installed():
            beat.connect()

        for task_class in list(pending_checks):
            task_class.check_configuration()
            pending_checks.discard(task_class)
