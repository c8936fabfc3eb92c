"""Notices of deactivations: at once for the first of a quiet period, in one digest for the
later ones of its notice window (``deactivate_notify_window``), delivered at least once.

The notice window is the ``notify_until`` of the task's state row: a deactivation that finds no
window open claims one and is notified now (:func:`claim_window`); one that finds it open waits,
its ``TaskFailure`` row marked pending, for the digest sent when the window ends
(:func:`send_digest`, by the task's next failure or ``celery_deactivate.maintain``; one whose
window closed before it committed, by ``maintain``: :func:`send_stranded`).  The
pending rows are marked sent only once the notifier has taken the digest; a notifier that fails
is tried again with a backoff (:func:`retry_delay`), and a deactivation notice it failed joins the
next digest (:func:`defer_undelivered`).  Every notice goes out after the change commits.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from . import _errors, _store, notify
from ._options import AnyTask, Options
from ._store import Failure

logger = logging.getLogger("celery_deactivate")


def notify_on_commit(task: Any, options: Options, notice: notify.Notice, using: str) -> None:
    """Deliver ``notice`` to the task's notifier once the transaction on ``using`` commits."""
    notifier = options.notifier
    transaction.on_commit(lambda: notify.deliver(notifier, notice, task=task), using=using)


# -- one deactivation ---------------------------------------------------------------------------


def claim_window(failed: Failure, options: Options, state: _store.State) -> bool:
    """Whether to notify this deactivation now: it is the first of a quiet period and opens a
    notice window.  Otherwise it waits for the digest of the window open.  In the change's
    transaction (:mod:`celery_deactivate._failure`): the claim commits with the change."""
    from .models import TaskState

    if state.notify_until is None:
        window = timedelta(seconds=options.notify_window)
        rows = TaskState.objects.using(_store.db()).filter(task=failed.name)
        if rows.filter(notify_until__isnull=True).update(notify_until=timezone.now() + window):
            return True
    logger.info(
        "celery_deactivate: %s deactivated by %s[%s]: notice deferred to the digest of the "
        "notice window",
        failed.target.identity(failed.instance.pk),
        failed.name,
        failed.task_id,
    )
    return False


def notify_deactivation(task: Any, options: Options, failed: Failure) -> None:
    """The deactivation notice (after commit).  One the notifier could not take joins the next
    digest; an error writing it is logged at ERROR."""
    identity = failed.target.identity(failed.instance.pk)
    try:
        item = notify.object_of(
            failed.instance, exception=failed.exc, task_id=failed.task_id, site_url=options.site_url
        )
        window = options.notify_window if options.digests else 0
        notice = notify.deactivation_notice(failed.name, item, window)
    except Exception as error:
        logger.error(
            "celery_deactivate: the notice of %s (deactivated by %s[%s]) could not be written: %s",
            identity,
            failed.name,
            failed.task_id,
            _errors.describe(error),
            exc_info=error,
        )
        return
    delivered = notify.deliver(
        options.notifier,
        notice,
        task=task,
        instance=failed.instance,
        exception=failed.exc,
        task_id=failed.task_id,
    )
    if not delivered:
        defer_undelivered(failed, options)


# -- digests --------------------------------------------------------------------------------------


def send_digest(task: AnyTask, options: Options, until: datetime, using: str) -> datetime | None:
    """Close the notice window that ended at ``until`` and send its digest, if it holds
    deactivations.  Returns the end of the window now open (``None``: quiet; ``until`` itself
    when another process closed it first).

    The deactivations stay pending until the notifier has taken the digest (at least once): the
    window is claimed until a retry time (:func:`retry_delay`), the digest is delivered after
    commit, and only then are its deactivations marked sent and a new window opened (the period
    was not quiet).  If the notifier fails, or the process dies meanwhile, the next failure or
    ``maintain`` run after the retry time sends them again, with what came since.
    """
    from .models import TaskFailure, TaskState

    name = task.name
    now = timezone.now()
    with transaction.atomic(using=using):
        state = TaskState.objects.using(using).filter(task=name)
        attempts = state.values_list("digest_attempts", flat=True).first() or 0
        retry_at = now + timedelta(seconds=retry_delay(attempts, options.notify_window))
        if not state.filter(notify_until=until).update(notify_until=retry_at):
            return until
        pending = TaskFailure.objects.using(using).filter(task=name, notice_pending=True)
        rows = list(
            pending.order_by("deactivated_at", "pk").values_list(
                "pk", "object_pk", "object_repr", "error", "traceback", "deactivated_at", "task_id"
            )
        )
        if not rows:
            state.filter(notify_until=retry_at).update(notify_until=None, digest_attempts=0)
            return None
        keys = [row[0] for row in rows]
        if not options.notify:
            return _digest_sent(name, options, keys, now, retry_at, using)
        target = task.target
        key = target.model._meta.pk
        assert key is not None
        items = [
            notify.NoticeObject(
                label=target.label,
                pk=(pk := key.to_python(text_pk)),
                name=text,
                error=error,
                traceback=tb,
                url=notify.admin_url(target.model, pk, options.site_url),
                deactivated_at=when,
                task_id=task_id or None,
            )
            for _, text_pk, text, error, tb, when, task_id in rows
        ]
        since = until - timedelta(seconds=options.notify_window)
        notice = notify.digest_notice(name, items, since, now)
        transaction.on_commit(
            lambda: _deliver_digest(task, options, notice, keys, now, retry_at, using), using=using
        )
    logger.info(
        "celery_deactivate: %s: digest of %d deactivation(s) of its notice window ending %s",
        name,
        len(rows),
        until.isoformat(timespec="seconds"),
    )
    return retry_at


def send_stranded(task: AnyTask, options: Options, using: str) -> datetime | None:
    """Send the deferred notices no window holds: their deactivation saw a window open that
    closed (its digest taken by another process) before the deactivation committed.  They are
    made due now and sent as a digest (by ``celery_deactivate.maintain``); returns the end of the
    window then open (``None``: there were none)."""
    from .models import TaskFailure, TaskState

    name = task.name
    if not TaskFailure.objects.using(using).filter(task=name, notice_pending=True).exists():
        return None
    now = timezone.now()
    quiet = TaskState.objects.using(using).filter(task=name, notify_until__isnull=True)
    if not quiet.update(notify_until=now):
        return None  # a window opened meanwhile: its digest takes them
    return send_digest(task, options, now, using)


#: Seconds before a notice the notifier could not deliver is tried again; doubled after each
#: failed try, up to the notice window.
RETRY_FIRST = 10.0


def retry_delay(attempts: int, window: float) -> float:
    """Seconds until the next try of a digest after ``attempts`` failed ones."""
    delay: float = min(RETRY_FIRST * 2.0 ** min(attempts, 32), max(window, RETRY_FIRST))
    return delay


def _deliver_digest(
    task: AnyTask,
    options: Options,
    notice: notify.Notice,
    keys: list[int],
    claimed_at: datetime,
    retry_at: datetime,
    using: str,
) -> None:
    """After commit: deliver the digest, then mark its deactivations sent, or count the failed
    try (they stay pending: the digest is sent again at ``retry_at``)."""
    from .models import TaskState

    delivered = notify.deliver(options.notifier, notice, task=task)
    try:
        if delivered:
            _digest_sent(task.name, options, keys, claimed_at, retry_at, using)
            return
        state = TaskState.objects.using(using).filter(task=task.name, notify_until=retry_at)
        state.update(digest_attempts=F("digest_attempts") + 1)
        logger.error(
            "celery_deactivate: %s: the digest of %d deactivation(s) was not delivered; it is "
            "sent again from %s (by the next failure or celery_deactivate.maintain): %s",
            task.name,
            len(notice.objects),
            retry_at.isoformat(timespec="seconds"),
            ", ".join(item.identity for item in notice.objects),
        )
    except Exception as error:
        logger.error(
            "celery_deactivate: %s: the digest's outcome could not be recorded (%s); its "
            "deactivations stay pending and are sent again",
            task.name,
            _errors.describe(error),
            exc_info=error,
        )


def _digest_sent(
    name: str,
    options: Options,
    keys: list[int],
    claimed_at: datetime,
    retry_at: datetime,
    using: str,
) -> datetime:
    """Mark the digest's deactivations sent (not those deactivated again since it was written)
    and open a new notice window; return its end."""
    from .models import TaskFailure, TaskState

    new_until = timezone.now() + timedelta(seconds=options.notify_window)
    with transaction.atomic(using=using):
        for chunk in _store.chunks(keys):
            sent = TaskFailure.objects.using(using).filter(pk__in=chunk, notice_pending=True)
            sent.exclude(deactivated_at__gt=claimed_at).update(notice_pending=False)
        TaskState.objects.using(using).filter(task=name, notify_until=retry_at).update(
            notify_until=new_until, digest_attempts=0
        )
    return new_until


def defer_undelivered(failed: Failure, options: Options) -> bool:
    """A deactivation notice the notifier could not deliver waits for the next digest, tried
    again within :data:`RETRY_FIRST` seconds.  Whether it could be kept (only with notice
    windows: ``deactivate_notify_window`` > 0).  Never raises."""
    from .models import TaskState

    if not options.digests:
        return False
    try:
        using = _store.db()
        now = timezone.now()
        retry_at = now + timedelta(seconds=RETRY_FIRST)
        with transaction.atomic(using=using):
            _store.mark_failure(failed, now, using, deactivated=True, pending=True)
            state = TaskState.objects.using(using).filter(task=failed.name)
            state.update(digest_attempts=F("digest_attempts") + 1)
            later = Q(notify_until__isnull=True) | Q(notify_until__gt=retry_at)
            state.filter(later).update(notify_until=retry_at)
    except Exception as error:
        logger.error(
            "celery_deactivate: the undelivered notice of %s could not be kept for a retry: %s",
            failed.target.identity(failed.instance.pk),
            _errors.describe(error),
            exc_info=error,
        )
        return False
    logger.warning(
        "celery_deactivate: the notice of %s is sent again with the digest from %s",
        failed.target.identity(failed.instance.pk),
        retry_at.isoformat(timespec="seconds"),
    )
    return True
