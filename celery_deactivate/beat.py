"""django-celery-beat: an object's periodic tasks follow its state (extra ``[beat]``).

When ``django_celery_beat`` is in ``INSTALLED_APPS``, deactivating an object disables the enabled
``PeriodicTask`` rows that schedule a deactivating task of its model for it (the task's name, the
object's pk as first positional argument, as a number or as text), and re-activating it
re-enables exactly the rows it disabled (a row someone disabled by hand stays disabled).  Which
rows were disabled is kept in :class:`~celery_deactivate.models.PausedSchedule`.  The scheduler is
told once per change (``PeriodicTasks.update_changed()``), not once per row: a running beat with
the ``DatabaseScheduler`` picks the change up at its next tick.

It is part of the change: ``follow()`` receives the library's internal ``changing`` signal,
which the service functions send in the change's transaction right after the row changed (before
:data:`~celery_deactivate.signals.object_deactivated` or
:data:`~celery_deactivate.signals.object_reactivated`), without a savepoint: the rows change with
the object or not at all (an error rolls the change back, and is logged), when
django-celery-beat's tables are on the model's write database (``router.db_for_write(PeriodicTask)``
decides where they are written).  When the object's task has no schedule, that is one ``SELECT``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from celery import current_app
from django.apps import apps
from django.db import router
from django.db.models import Model, Q, QuerySet

from . import _transaction
from .target import get_model

__all__ = ["connect", "task_names"]

DISPATCH_UID = "celery_deactivate.beat.follow"


def installed() -> bool:
    return apps.is_installed("django_celery_beat")


def connect() -> None:
    """Make the periodic tasks follow the objects' changes (``CeleryDeactivateConfig.ready()``
    does, when django-celery-beat is installed)."""
    _transaction.changing.connect(follow, dispatch_uid=DISPATCH_UID)


def follow(sender: Any, instance: Model, deactivated: bool, **kwargs: Any) -> None:
    """The object's periodic tasks follow its deactivation or re-activation."""
    (pause if deactivated else resume)(sender, instance)


def pause(sender: Any, instance: Model) -> None:
    """Disable the enabled periodic tasks of ``instance`` and remember them."""
    from django_celery_beat.models import PeriodicTask, PeriodicTasks

    from .models import PausedSchedule

    names = task_names(type(instance), getattr(sender, "app", None))
    using = router.db_for_write(PeriodicTask)
    rows = schedules_of(names, instance.pk).using(using).filter(enabled=True)
    ids = list(rows.values_list("pk", flat=True))
    if not ids:
        return
    PeriodicTask.objects.using(using).filter(pk__in=ids).update(enabled=False)
    label, key = instance._meta.label, str(instance.pk)
    PausedSchedule.objects.using(using).bulk_create(
        [PausedSchedule(periodic_task_id=id_, model=label, object_pk=key) for id_ in ids],
        ignore_conflicts=True,
    )
    PeriodicTasks.update_changed()


def resume(sender: Any, instance: Model) -> None:
    """Re-enable the periodic tasks :func:`pause` disabled for ``instance``."""
    from django_celery_beat.models import PeriodicTask, PeriodicTasks

    from .models import PausedSchedule

    using = router.db_for_write(PeriodicTask)
    paused = PausedSchedule.objects.using(using).filter(
        model=instance._meta.label, object_pk=str(instance.pk)
    )
    ids = list(paused.values_list("periodic_task_id", flat=True))
    if not ids:
        return
    PeriodicTask.objects.using(using).filter(pk__in=ids).update(enabled=True)
    paused.delete()
    PeriodicTasks.update_changed()


def task_names(model: type[Model], app: Any = None) -> list[str]:
    """The names of the deactivating tasks of ``app`` (default: the current app) on ``model``."""
    from .task import DeactivatingTask

    names = []
    for task in list((app or current_app).tasks.values()):
        if isinstance(task, DeactivatingTask):
            try:  # the model alone: its options are not needed to know whose task it is
                if get_model(task.model, task.name) is model:
                    names.append(task.name)
            except Exception:  # a misconfigured task is reported elsewhere (checks, on_bound)
                continue
    return names


def schedules_of(names: list[str], pk: Any) -> QuerySet[Any]:
    """The ``PeriodicTask`` rows of these tasks whose first positional argument is ``pk``.

    ``args`` is JSON text: the pk as a JSON number or string, first in the list.
    """
    from django_celery_beat.models import PeriodicTask

    forms = {json.dumps(str(pk))}
    if isinstance(pk, int):
        forms.add(json.dumps(pk))
    first = "|".join(re.escape(form) for form in sorted(forms))
    pattern = rf"^\s*\[\s*({first})\s*[,\]]"
    rows: QuerySet[Any] = PeriodicTask.objects.filter(Q(task__in=names), args__regex=pattern)
    return rows
