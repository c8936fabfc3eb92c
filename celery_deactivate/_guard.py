"""The outage guard: no deactivation while most of a task's runs fail.

Deactivating on failure is right when one object is broken and wrong when the cause is shared
(the upstream is down, a credential expired, a deploy broke the parser).  Like Envoy's outlier
detection, the guard lets failures deactivate objects one by one, but not when most of the task's
runs fail: then an *outage* of the task starts.

* **Start.** Within ``deactivate_outage_window`` seconds, at least ``deactivate_outage_objects``
  distinct objects had a final failure of the task, and the task's final failures are at least
  ``deactivate_outage_rate`` of its finished runs, of which there were at least
  ``deactivate_outage_min_runs``.  Then, once: ``outage_started``, one notice,
  a WARNING, and the objects this task deactivated within the window are re-activated (through
  :func:`~celery_deactivate.services.reactivate`: ``object_reactivated``).
* **During it** no failure of the task deactivates an object, nor counts toward
  ``deactivate_after`` (each is logged at INFO): the outage adds nothing to an object's count
  (the failures before it started did count).  The exception reaches Celery unchanged.
* **End.** The task's failure rate over the last window falls below the rate, or the window had
  no failure: ``outage_ended``, one recovery notice.  Checked by the task's own runs (when a
  process writes its counts) and by the periodic task ``celery_deactivate.maintain``.  After an
  end, the next start counts only failures and runs since it (hysteresis).

The start and the end themselves (the state row, the signals, the victims, the notices) are in
``celery_deactivate._outage``.

State is shared by every process on every machine through three tables of the library
(``celery_deactivate.models``): :class:`~celery_deactivate.models.TaskState` (one row per
task: the outage, the notice window), :class:`~celery_deactivate.models.TaskRuns` (finished runs
and final failures per task, per tenth of the window and per process: each process updates only
its own rows, so failures never queue on one row) and
:class:`~celery_deactivate.models.TaskFailure` (one row per task and object: the distinct objects,
the outage's victims, the pending digest).  Process clocks are assumed in sync (NTP).

Cost.  The success path runs no statement: runs and final failures are counted in memory alike
(:class:`~celery_deactivate._store.Pending`) and written by the next run at least
:data:`FLUSH_EVERY` seconds after the last write (one ``UPDATE`` of the process's own row and a
read of the task's state), and when the process exits in order; there is no background thread.
A failure outside an outage adds a read of the task's state, the object's row in
``TaskFailure`` (in the change's transaction) and, once the change committed, one read of the
task's state with what the guard judges by (:func:`celery_deactivate._store.verdict`: an outage
opened meanwhile, the distinct objects up to the threshold, the sums of the window); during an
outage a failure costs a read, and nothing on the object (less than a deactivation).  The guard off
(``deactivate_outage_objects=0``) and ``deactivate_notify_window=0`` add nothing at all.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from celery.signals import worker_process_shutdown, worker_shutdown
from django.db import connections
from django.utils import timezone

from . import _errors, _notices, _outage, _store
from ._options import AnyTask, Options
from ._store import Failure

logger = logging.getLogger("celery_deactivate")


# -- runs ------------------------------------------------------------------------------------


def ran(task: AnyTask) -> None:
    """One finished run of ``task`` whose body succeeded: counted in memory.  Every
    :data:`FLUSH_EVERY` seconds the counts are written (and an open outage checked).  Never
    raises."""
    if _store.pending.add(task, failed=False):
        _write_counts(task)


def _write_counts(task: AnyTask) -> None:
    """Write the runs and failures this process counted for ``task``; end its outage if it is
    over.  Never raises."""
    try:
        options = Options(task)
        if not options.guard_on:
            _store.pending.take(task.name)  # nothing to write them for
            return
        using = _store.db()
        with _store.unit(using, None):
            runs, _ = _store.write_pending(task.name, options.window, using)
            if not runs:
                return
            state = _store.read_state(task.name, using, create=False)
            if state is not None and state.outage_started_at is not None:
                _outage.end_if_over(task, options, state.outage_started_at, using)
    except Exception as error:
        logger.error(
            "celery_deactivate: %s: the outage guard could not write its run counts: %s",
            task.name,
            _errors.describe(error),
            exc_info=error,
        )


def write_counts_at_exit(**kwargs: Any) -> None:
    """Write what this process counted before it exits in order (a pool child recycled by
    ``--max-tasks-per-child``, a warm shutdown): connected to Celery's ``worker_process_shutdown``
    (sent in each prefork child) and ``worker_shutdown`` (the solo and thread pools)."""
    tasks = _store.pending.tasks_counted()
    for task in tasks:
        _write_counts(task)
    connection = connections[_store.db()]
    if tasks and not connection.in_atomic_block:
        connection.close()  # the process ends: leave no session open


worker_process_shutdown.connect(write_counts_at_exit, weak=False, dispatch_uid=__name__)
worker_shutdown.connect(write_counts_at_exit, weak=False, dispatch_uid=__name__)


# -- one failure (called by celery_deactivate._failure, in this order) ---------------------------


def task_state(task: AnyTask, options: Options, timeout: float | None) -> _store.State | None:
    """The task's state row (created at its first failure), after sending a digest that is due;
    ``None`` when neither the guard nor the notice window is on, or the row could not be read
    (then the failure is recorded as without them, logged at ERROR).  Never raises."""
    if not options.records:
        return None
    try:
        using = _store.db()
        with _store.unit(using, timeout):
            state = _store.read_state(task.name, using, create=True)
            assert state is not None
            until = state.notify_until
            if until is not None and until <= timezone.now():
                opened = _notices.send_digest(task, options, until, using)
                state = state._replace(notify_until=opened)
    except Exception as error:
        _broken(task, error, "read the task's state")
        return None
    return state


def outage_open(options: Options, state: _store.State | None) -> bool:
    return options.guard_on and state is not None and state.outage_started_at is not None


def count_during_outage(
    task: AnyTask, options: Options, state: _store.State, timeout: float | None
) -> None:
    """A failure during the task's outage: counted for the task only, not on the object.  Never
    raises."""
    started = state.outage_started_at
    assert started is not None
    try:
        using = _store.db()
        with _store.unit(using, timeout):
            if _store.pending.add(task, failed=True) or timeout:  # the crash path writes at once
                runs, failures = _store.write_pending(task.name, options.window, using)
                if runs > failures:  # successes counted too: the outage may be over
                    _outage.end_if_over(task, options, started, using)
    except Exception as error:
        _broken(task, error, "count a failure")


def account(
    task: AnyTask,
    options: Options,
    state: _store.State,
    failed: Failure | None,
    *,
    deactivated: bool,
    timeout: float | None,
) -> bool | None:
    """After the failure's change committed (``failed``; ``None``: it changed nothing), with its
    row of the task's failures (:func:`celery_deactivate._failure._keep`): count it, and start an
    outage if the guard's conditions hold.

    Returns whether the object was re-activated at once (it was deactivated while an outage
    started), or ``None`` if the guard's statements failed (logged at ERROR).
    """
    try:
        using = _store.db()
        with _store.unit(using, timeout):
            if _store.pending.add(task, failed=failed is not None) or timeout:
                # Written with the process's other counts (the crash path at once: its process
                # runs no task); until then the guard judges them from memory (_store.verdict).
                _store.write_pending(task.name, options.window, using)
            if failed is None:
                return False
            now = timezone.now()
            since = _counted_since(options, state, now)
            # Read once the change committed: an outage another process opened meanwhile is seen.
            judged = _store.verdict(task.name, options.window, using, since, options.objects)
            outage = judged.outage_started_at is not None or _trip(
                task, options, judged, since, failed.exc, now, using
            )
            if not (deactivated and outage):
                return False
            # Deactivated while an outage started: one of its victims.  The process that opened
            # it may not have seen this row yet; re-activating twice changes the row once.
            victim = [(str(failed.instance.pk), None)]
            _outage.reactivate_victims(task, failed.target, options, victim, using)
            return True
    except Exception as error:
        _broken(task, error, "count a failure")
        return None


def _counted_since(options: Options, state: _store.State, now: datetime) -> datetime:
    """The start of what the guard counts: the window, or the end of the last outage if later
    (after an outage, it counts afresh)."""
    since = now - timedelta(seconds=options.window)
    ended = state.outage_ended_at
    return ended if ended is not None and ended > since else since


def _trip(
    task: AnyTask,
    options: Options,
    judged: _store.Verdict,
    since: datetime,
    exc: BaseException,
    now: datetime,
    using: str,
) -> bool:
    """Start an outage if the guard's conditions hold; whether one is open now: this call's, or
    one another process opened since the verdict was read (its start waited for that process's
    transaction, whose victims may not have included this failure's object)."""
    if not judged.objects_reached:
        return False
    runs, failures = judged.runs, judged.failures
    if runs < options.min_runs or failures < options.rate * runs:
        logger.info(
            "celery_deactivate: %s: %d of %d finished runs failed for good since %s, %s: failing "
            "objects are deactivated one by one",
            task.name,
            failures,
            runs,
            since.isoformat(timespec="seconds"),
            f"too few runs to judge (deactivate_outage_min_runs={options.min_runs})"
            if runs < options.min_runs
            else f"below the outage rate {options.rate:.0%}",
        )
        return False
    _outage.start_outage(task, options, now, since, exc, using)
    return True


def _broken(task: AnyTask, error: Exception, doing: str) -> None:
    logger.error(
        "celery_deactivate: the outage guard of %s could not %s (%s); the failure is recorded as "
        "without the guard",
        task.name,
        doing,
        _errors.describe(error),
        exc_info=error,
    )


# -- what operators read ----------------------------------------------------------------------


def counts_now(task: AnyTask) -> Mapping[str, int]:
    """The guard's counts of ``task`` over its last window, as the tables hold them (for
    operators and tests): ``runs``, ``failures``, ``objects``."""
    options = Options(task)
    using = _store.db()
    since = timezone.now() - timedelta(seconds=options.window)
    runs, failures = _store.sums(task.name, options.window, using, since)
    return {
        "runs": runs,
        "failures": failures,
        "objects": _store.distinct(task.name, using, since, None),
    }


def outage_of(task: AnyTask) -> datetime | None:
    """When the task's open outage started; ``None`` without one."""
    state = _store.read_state(task.name, _store.db(), create=False)
    return state.outage_started_at if state is not None else None
