"""The internal tasks of the fan-out, registered on every Celery app (``shared_task``).

``CeleryDeactivateConfig.ready()`` imports this module, so any process where Django is set up
(a worker with Celery's Django fixup, beat, a shell) knows them without ``autodiscover_tasks()``.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task

from . import dispatch


@shared_task(name=dispatch.DISPATCH_ACTIVE_TASK, bind=True)
def dispatch_active(
    self: Any,
    task_name: str,
    shards: int | None = None,
    batch_size: int = dispatch.DEFAULT_BATCH_SIZE,
    options: dict[str, Any] | None = None,
) -> int:
    """Run ``dispatch_active`` for the task ``task_name`` (what a beat entry schedules)."""
    task = dispatch.task_named(self.app, task_name)
    return dispatch.dispatch_active(task, shards=shards, batch_size=batch_size, **(options or {}))


@shared_task(name=dispatch.DISPATCH_RANGE_TASK, bind=True)
def dispatch_range(
    self: Any,
    task_name: str,
    lo: Any,
    hi: Any,
    batch_size: int = dispatch.DEFAULT_BATCH_SIZE,
    options: dict[str, Any] | None = None,
) -> int:
    """Enqueue the active objects of ``task_name``'s model with ``lo <= pk < hi``.

    The bounds arrive as the task serializer carried them (a UUID may be a string):
    :func:`~celery_deactivate.dispatch.iter_pk_batches` converts them with the key field.
    """
    task = dispatch.task_named(self.app, task_name)
    return dispatch.dispatch_range(task, (lo, hi), batch_size=batch_size, **(options or {}))
