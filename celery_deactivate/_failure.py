"""What happens to a final failure of a deactivating task, top to bottom.

:func:`record` is called by ``DeactivatingTask.record_failure``: from ``on_failure`` (in the
process that ran the body, after its transaction rolled back), for the calls Celery does not
trace, and from the worker's main process for a crash that killed the pool child (with a
``timeout``, :mod:`celery_deactivate.request`).  In order:

1. **Does it count?**  An exception outside ``deactivate_on`` (or in ``dont_deactivate_on``) is a
   finished run of the task, not a failure of its object.
2. **Judge.**  The task's state (:func:`celery_deactivate._guard.task_state`): during an outage
   no failure changes its object, except a cool-down probe's (the object stays deactivated, its
   cool-down doubled); the others are counted for the task only.
3. **Change the object**, in one transaction with what the library keeps of the failure
   (:func:`celery_deactivate.services.record_failure`): count the failure, deactivate at
   ``deactivate_after``; the object's periodic tasks follow and the signal is sent.  In the same
   transaction (:func:`_keep`), a deactivation opens the notice window or waits for its digest
   (:func:`celery_deactivate._notices.claim_window`), and the failure is recorded on the task's
   failure row: the change and its notice commit together, or not at all.
4. **Account**, after the commit: the failure is counted for the guard, which may start an
   outage and re-activate this object at once (:func:`celery_deactivate._guard.account`).
5. **Notice**, after the change commits (:func:`celery_deactivate._notices.notify_deactivation`).

Nothing here raises: an error is logged at ERROR and the task's exception reaches Celery
unchanged.  An error of the guard's own statements is logged and the failure recorded as without
the guard.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction
from django.utils import timezone

from . import _errors, _guard, _metrics, _notices, _store, services
from ._options import AnyTask, Options
from ._store import Failure
from ._transaction import bounded
from .target import Target

logger = logging.getLogger("celery_deactivate")


def record(
    task: AnyTask,
    exc: BaseException,
    pk: Any,
    task_id: str | None,
    *,
    timeout: float | None = None,
) -> services.FailureOutcome | None:
    """Record one final failure of ``task`` on the object ``pk``; what changed (``None``:
    nothing on the object).  Never raises."""
    identity = f"{task.model} pk={pk!r}"
    options = Options(task)
    try:
        target = options.target
        identity = target.identity(pk)
        if not options.counts(exc):
            logger.info(
                "celery_deactivate: %s[%s] on %s: %s is not counted (deactivate_on / "
                "dont_deactivate_on)",
                task.name,
                task_id,
                identity,
                type(exc).__qualname__,
            )
            _guard.ran(task)  # a finished run, not a failure of the object
            return None
        using = services.db_for(target)
        cooldown = options.probes
        state = _guard.task_state(task, options, timeout)
        failed, deferred = None, False
        if _guard.outage_open(options, state):
            assert state is not None
            outcome = services.record_probe_failure(
                target,
                pk,
                exc,
                cooldown=cooldown,
                using=using,
                timeout=timeout,
                sender=task,
                task_id=task_id,
            )
            if outcome is None:
                assert state.outage_started_at is not None
                logger.info(
                    "celery_deactivate: %s[%s] on %s: not deactivated nor counted against the "
                    "object, the task has an outage since %s (%s)",
                    task.name,
                    task_id,
                    identity,
                    state.outage_started_at.isoformat(timespec="seconds"),
                    _errors.describe(exc),
                )
                _guard.count_during_outage(task, options, state, timeout)
                return None
        else:
            # The change and the library's rows of it commit together; bounded on the crash path.
            with transaction.atomic(using=using), bounded(using, timeout):
                outcome = services.record_failure(
                    target,
                    pk,
                    exc,
                    threshold=options.after,
                    sender=task,
                    task_id=task_id,
                    using=using,
                    cooldown=cooldown,
                )
                failed = _failure_of(task, target, outcome, exc, task_id)
                deferred = _keep(options, state, failed, deactivated=outcome.deactivated)
    except Exception as error:
        logger.error(
            "celery_deactivate: could not record the failure of %s[%s] on %s (%s): %s",
            task.name,
            task_id,
            identity,
            _errors.describe(exc),
            _errors.describe(error),
            exc_info=error,
        )
        return None
    _log(task, target, outcome, exc, task_id, identity, options.after)
    _metrics.failure(task.name, target.label, outcome)
    if outcome.probed:
        return outcome  # a probe's outcome: not a run of the task on a live object
    notify = options.notify and failed is not None and outcome.deactivated
    if state is not None and options.guard_on:
        reactivated = _guard.account(
            task, options, state, failed, deactivated=outcome.deactivated, timeout=timeout
        )
        notify = notify and not reactivated
    if notify and not deferred:
        assert failed is not None
        transaction.on_commit(
            lambda: _notices.notify_deactivation(task, options, failed), using=using
        )
    return outcome


def _failure_of(
    task: AnyTask,
    target: Target,
    outcome: services.FailureOutcome,
    exc: BaseException,
    task_id: str | None,
) -> Failure | None:
    """The failure, when it changed a live object (counted or deactivated it)."""
    if outcome.instance is None or outcome.probed:
        return None
    return Failure(task.name, target, outcome.instance, exc, task_id)


def _keep(
    options: Options, state: _store.State | None, failed: Failure | None, *, deactivated: bool
) -> bool:
    """The failure's rows in the library's tables, in the change's transaction: a deactivation's
    notice opens the notice window or waits for its digest
    (:func:`celery_deactivate._notices.claim_window`), and the failure is recorded on the task's
    failure row (:func:`celery_deactivate._store.mark_failure`: the distinct objects, the
    outage's victims, the pending digest).  Whether the notice waits for the digest.  (The
    library's tables on a database of their own: their statements commit on their own.)"""
    if state is None or failed is None:
        return False
    deferred = (
        deactivated
        and options.notify
        and options.digests
        and not _notices.claim_window(failed, options, state)
    )
    if options.guard_on or deferred:
        now = timezone.now()
        _store.mark_failure(failed, now, _store.db(), deactivated=deactivated, pending=deferred)
    return deferred


def _log(
    task: AnyTask,
    target: Target,
    outcome: services.FailureOutcome,
    exc: BaseException,
    task_id: str | None,
    identity: str,
    after: int,
) -> None:
    error = _errors.describe(exc)
    if outcome.deactivated:
        logger.warning(
            "celery_deactivate: %s deactivated after %s failure(s) of %s[%s]: %s",
            identity,
            outcome.failure_count or 1,
            task.name,
            task_id,
            error,
        )
    elif outcome.probed:
        logger.warning(
            "celery_deactivate: %s stays deactivated: its probe %s[%s] failed (%s); next probe "
            "in %ss",
            identity,
            task.name,
            task_id,
            error,
            getattr(outcome.instance, target.cooldown or "", None),
        )
    elif outcome.instance is not None:
        logger.info(
            "celery_deactivate: %s failure %s of %s counted (%s[%s]: %s)",
            identity,
            outcome.failure_count,
            after,
            task.name,
            task_id,
            error,
        )
