"""The library's internal tasks, registered on every Celery app (``shared_task``): the fan-out's
and the periodic ``celery_deactivate.maintain``.

``CeleryDeactivateConfig.ready()`` imports this module, so any process where Django is set up
(a worker with Celery's Django fixup, beat, a shell) knows them without ``autodiscover_tasks()``.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from celery import shared_task
from django.db import router
from django.utils import timezone

from . import _errors, _history, _notices, _outage, _store, dispatch
from ._options import Options
from .conf import setting

__all__ = ["MAINTAIN_TASK", "dispatch_active", "dispatch_range", "maintain", "maintain_entry"]

logger = logging.getLogger("celery_deactivate")


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


#: The periodic task of the library: add it to the beat schedule (:func:`maintain_entry`).
MAINTAIN_TASK = "celery_deactivate.maintain"


@shared_task(name=MAINTAIN_TASK, bind=True, ignore_result=True)
def maintain(self: Any) -> None:
    """The library's periodic work, one call per concern; each logs what it did, and one that
    fails is logged without stopping the others.

    * the outage guard and the notice windows: end the outages that are over, send the digests
      whose window ended, delete counts no window needs (:func:`maintain_guard`);
    * cool-down probes: claim and send the probes that are due, except for a task whose outage is
      open (:func:`celery_deactivate.probes.maintain`);
    * the objects' history: delete the events older than ``deactivate_history_days``, in
      bounded batches (:func:`maintain_history`).
    """
    from . import probes

    for concern, work in (
        ("the outage guard", maintain_guard),
        ("probes", probes.maintain),
        ("the history", maintain_history),
    ):
        try:
            work(self.app)
        except Exception:
            logger.exception("celery_deactivate.maintain: %s failed", concern)


def maintain_guard(app: Any) -> dict[str, int]:
    """For every task with a state row: end its outage if it is over, send its digest if due,
    delete counts no window needs any more.  What ``celery_deactivate.maintain`` runs."""
    from .models import TaskState
    from .task import DeactivatingTask

    using = _store.db()
    done = {"tasks": 0, "outages_ended": 0, "digests": 0}
    rows = TaskState.objects.using(using).values_list("task", "outage_started_at", "notify_until")
    for name, started, until in list(rows):
        task = app.tasks.get(name)
        if not isinstance(task, DeactivatingTask):
            logger.info(
                "celery_deactivate.maintain: %s is not a deactivating task of this app; skipped",
                name,
            )
            continue
        done["tasks"] += 1
        try:
            options = Options(task)
            if started is not None and _outage.end_if_over(task, options, started, using):
                done["outages_ended"] += 1
            if until is not None and until <= timezone.now():
                opened = _notices.send_digest(task, options, until, using)
                done["digests"] += int(opened is not None and opened != until)
            elif until is None and options.digests:
                done["digests"] += int(_notices.send_stranded(task, options, using) is not None)
            _prune(name, options, using)
        except Exception as error:
            logger.error(
                "celery_deactivate.maintain: %s failed: %s",
                name,
                _errors.describe(error),
                exc_info=error,
            )
    logger.info(
        "celery_deactivate.maintain: %(tasks)d task(s), %(outages_ended)d outage(s) ended, "
        "%(digests)d digest(s) sent",
        done,
    )
    return done


def _prune(name: str, options: Options, using: str) -> None:
    """Delete the counts and failure rows no window needs any more."""
    from .models import TaskFailure, TaskRuns

    now = timezone.now()
    horizon = timedelta(seconds=2 * max(options.window, options.notify_window))
    TaskRuns.objects.using(using).filter(task=name, slot__lt=now - horizon).delete()
    TaskFailure.objects.using(using).filter(
        task=name, failed_at__lt=now - horizon, notice_pending=False
    ).delete()


def maintain_history(app: Any) -> int:
    """Delete the history events older than ``deactivate_history_days`` (a worker-wide
    setting, 90 days by default), on each database they are written to (the library's and those
    of the app's deactivating tasks' models): at most
    :data:`~celery_deactivate._history.PRUNE_BATCHES` statements of
    :data:`~celery_deactivate._history.PRUNE_BATCH` rows per database and run.  How many went."""
    from .task import DeactivatingTask

    days = setting(app, "deactivate_history_days")
    databases = {_store.db()}
    for task in list(app.tasks.values()):
        if isinstance(task, DeactivatingTask) and task.model is not None:
            databases.add(router.db_for_write(task.target.model))
    deleted = sum(_history.prune(using, days) for using in sorted(databases))
    logger.info(
        "celery_deactivate.maintain: %d history event(s) older than %g days deleted", deleted, days
    )
    return deleted


def maintain_entry(every: float = 60.0, **entry_options: Any) -> dict[str, Any]:
    """A ``beat_schedule`` entry that runs ``celery_deactivate.maintain`` every ``every`` seconds::

        app.conf.beat_schedule = {"celery-deactivate": maintain_entry(every=60)}

    Every minute is a good default: an outage's end and a digest are noticed at most that late
    when the task itself is idle.  ``entry_options`` are the entry's ``options`` (default:
    ``expires`` after one period, so that missed runs do not pile up).  Safe to run from several
    beat instances at once: every change it makes is claimed with a conditional update.
    """
    return {
        "task": MAINTAIN_TASK,
        "schedule": every,
        "options": {"expires": every, **entry_options},
    }
