"""An outage's start and end (the rules: ``celery_deactivate._guard``): the task's state row
changed once, ``outage_started``/``outage_ended`` sent in the transaction, the victims of the
start re-activated, a WARNING, one notice after commit."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.db import transaction
from django.dispatch import Signal
from django.utils import timezone

from . import (
    _errors,
    _history,
    _metrics,
    _notices,
    _store,
    _transaction,
    notify,
    services,
    signals,
)
from ._options import AnyTask, Options

if TYPE_CHECKING:
    from .target import Target

logger = logging.getLogger("celery_deactivate")


def start_outage(
    task: AnyTask,
    options: Options,
    now: datetime,
    since: datetime,
    exc: BaseException | None,
    using: str,
) -> bool:
    """Open the task's outage unless one is open: ``outage_started`` (in the transaction), the
    victims re-activated, a WARNING, one notice after commit.  Whether this call opened it."""
    from .models import TaskState

    name, target = task.name, task.target
    outage = _history.By.run("outage", task, None)
    runs, failures = _store.sums(name, options.window, using, since)
    totals = {
        "runs": runs,
        "failures": failures,
        "objects": _store.distinct(name, using, since, None),
    }
    with transaction.atomic(using=using):
        rows = TaskState.objects.using(using).filter(task=name, outage_started_at__isnull=True)
        if not rows.update(outage_started_at=now):
            return False
        _history.record(using, target.model, None, "outage_started", outage, exc)
        victims = _victims(name, since, using)
        reactivated = reactivate_victims(task, target, options, victims, using)
        _send(
            signals.outage_started,
            task,
            started_at=now,
            counts=totals,
            exception=exc,
            reactivated=[instance for instance, _ in reactivated],
        )
    error = _errors.describe(exc)
    logger.warning(
        "celery_deactivate: outage of %s started: %d of %d finished runs failed for good since "
        "%s (%s), on %d distinct objects of %s (thresholds: %d objects, %.0f%%); no failure "
        "deactivates an object until it ends; %d object(s) it deactivated re-activated; last "
        "error: %s",
        name,
        failures,
        runs,
        since.isoformat(timespec="seconds"),
        f"{failures / runs:.0%}" if runs else "-",
        totals["objects"],
        target.label,
        options.objects,
        options.rate * 100,
        len(reactivated),
        error,
    )
    _metrics.add("celery_deactivate.outages.started", task=name, model=target.label)
    if options.notify:
        notice = notify.outage_started_notice(
            name,
            label=target.label,
            started_at=now,
            counts=totals,
            rate=options.rate,
            window=options.window,
            error=error,
            reactivated=[item for _, item in reactivated],
        )
        _notices.notify_on_commit(task, options, notice, using)
    return True


def end_if_over(task: AnyTask, options: Options, started: datetime, using: str) -> bool:
    """End the outage that started at ``started`` if the failure rate over the last window is
    below the rate (or the window had no failure); whether this call ended it."""
    from .models import TaskState

    name = task.name
    now = timezone.now()
    runs, failures = _store.sums(
        name, options.window, using, now - timedelta(seconds=options.window)
    )
    if failures and failures >= options.rate * runs:
        return False
    totals = {"runs": runs, "failures": failures}
    with transaction.atomic(using=using):
        rows = TaskState.objects.using(using).filter(task=name, outage_started_at=started)
        if not rows.update(outage_started_at=None, outage_ended_at=now):
            return False  # ended by another process
        _history.record(
            using, task.target.model, None, "outage_ended", _history.By.run("outage", task, None)
        )
        _send(signals.outage_ended, task, started_at=started, ended_at=now, counts=totals)
    logger.warning(
        "celery_deactivate: outage of %s ended after %s: %d of %d finished runs failed for good "
        "in the last %g s, below %.0f%%; failures deactivate objects again",
        name,
        now - started,
        failures,
        runs,
        options.window,
        options.rate * 100,
    )
    _metrics.add("celery_deactivate.outages.ended", task=name, model=task.target.label)
    if options.notify:
        notice = notify.outage_ended_notice(
            name, started_at=started, ended_at=now, counts=totals, window=options.window
        )
        _notices.notify_on_commit(task, options, notice, using)
    return True


def _victims(name: str, since: datetime, using: str) -> list[tuple[str, datetime | None]]:
    """``(pk as text, deactivated_at)`` of the objects the task deactivated since ``since``."""
    from .models import TaskFailure

    rows = TaskFailure.objects.using(using).filter(task=name, deactivated_at__gt=since)
    return list(rows.values_list("object_pk", "deactivated_at"))


def reactivate_victims(
    task: AnyTask,
    target: Target,
    options: Options,
    victims: Sequence[tuple[str, datetime | None]],
    using: str,
) -> list[tuple[Any, notify.NoticeObject]]:
    """Re-activate the objects still off as this task left them (``deactivated_at`` unchanged;
    without that field: any inactive one), through :func:`services.reactivate`."""
    from .models import TaskFailure

    if not victims:
        return []
    model = target.model
    meta_pk = model._meta.pk
    assert meta_pk is not None
    fields = target.fields()
    model_db = services.db_for(target)
    wanted = {meta_pk.to_python(text): when for text, when in victims}
    reactivated = []
    for chunk in _store.chunks(list(wanted)):
        rows = model._base_manager.db_manager(model_db).filter(pk__in=chunk)
        rows = rows.filter(**{target.active: False})
        stamp = target.deactivated_at
        for pk, current in rows.values_list("pk", stamp or "pk"):
            when = wanted[pk]
            if stamp and when is not None and current != when:
                logger.info(
                    "celery_deactivate: %s stays deactivated: deactivated again since %s did",
                    target.identity(pk),
                    task.name,
                )
                continue
            by = _history.By.run("outage", task, None)
            instance = services.reactivate(model, pk, fields=fields, using=model_db, by=by)
            if instance is None:
                continue
            logger.warning(
                "celery_deactivate: %s re-activated: deactivated by %s, a victim of its outage",
                target.identity(pk),
                task.name,
            )
            reactivated.append((instance, notify.object_of(instance, site_url=options.site_url)))
    for chunk in _store.chunks([text for text, _ in victims]):
        TaskFailure.objects.using(using).filter(task=task.name, object_pk__in=chunk).update(
            deactivated_at=None, notice_pending=False
        )
    return reactivated


def _send(signal: Signal, task: AnyTask, **kwargs: Any) -> None:
    """Send an outage signal in the caller's transaction, as the object signals are."""
    _transaction.send_in_savepoint(signal, task, _store.db(), task.name, **kwargs)
