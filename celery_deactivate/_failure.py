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
3. **Change the object** (:func:`celery_deactivate.services.record_failure`): count the failure,
   deactivate at ``deactivate_after``; the signal is sent in the transaction.
4. **Account.**  A deactivation opens the notice window or waits for its digest
   (:func:`celery_deactivate._notices.claim_window`); the failure is counted for the guard,
   which may start an outage and re-activate this object at once
   (:func:`celery_deactivate._guard.account`).
5. **Notice**, after the change commits (:func:`celery_deactivate._notices.notify_deactivation`).

Nothing here raises: an error is logged at ERROR and the task's exception reaches Celery
unchanged.  An error of the guard's own statements is logged and the failure recorded as without
the guard.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction

from . import _errors, _guard, _notices, services
from ._options import AnyTask, Options
from ._store import Failure
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
            outcome = services.record_failure(
                target,
                pk,
                exc,
                threshold=options.after,
                sender=task,
                task_id=task_id,
                using=using,
                timeout=timeout,
                cooldown=cooldown,
            )
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
    if outcome.probed:
        return outcome  # a probe's outcome: not a run of the task on a live object
    failed = None
    if outcome.instance is not None:
        failed = Failure(task.name, target, outcome.instance, exc, task_id)
    notify = options.notify and failed is not None and outcome.deactivated
    deferred = False
    if state is not None:
        if notify and options.digests:
            assert failed is not None
            deferred = not _notices.claim_window(failed, options, state, timeout)
        reactivated = _guard.account(
            task,
            options,
            state,
            failed,
            deactivated=outcome.deactivated,
            deferred=deferred,
            timeout=timeout,
        )
        if reactivated is None:  # the guard's statements failed: the deferred notice with them
            deferred = False
        notify = notify and not reactivated
    if notify and not deferred:
        assert failed is not None
        transaction.on_commit(
            lambda: _notices.notify_deactivation(task, options, failed), using=using
        )
    return outcome


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
