"""The outage guard, and the notice windows that turn a burst of deactivations into a digest.

Deactivating on failure is right when one object is broken and wrong when the cause is shared
(the upstream is down, a credential expired, a deploy broke the parser).  Like Envoy's outlier
detection, the guard lets failures deactivate objects one by one, but not when most of the task's
runs fail: then an *outage* of the task starts.

* **Start.** Within ``deactivate_outage_window`` seconds, at least ``deactivate_outage_objects``
  distinct objects had a final failure of the task, and the task's final failures are at least
  ``deactivate_outage_rate`` of its finished runs.  Then, once: ``outage_started``, one notice,
  a WARNING, and the objects this task deactivated within the window are re-activated (through
  :func:`~celery_deactivate.services.reactivate`: ``object_reactivated``).
* **During it** no failure of the task deactivates an object, nor counts toward
  ``deactivate_after`` (each is logged at INFO): the outage adds nothing to an object's count
  (the failures before it started did count).  The exception reaches Celery unchanged.
* **End.** The task's failure rate over the last window falls below the rate, or the window had
  no failure: ``outage_ended``, one recovery notice.  Checked by the task's own runs (when a
  process writes its counts) and by the periodic task ``celery_deactivate.maintain``.  After an
  end, the next start counts only failures and runs since it (hysteresis).

State is shared by every process on every machine through three tables of the library
(``celery_deactivate.models``): :class:`~celery_deactivate.models.TaskState` (one row per
task: the outage, the notice window), :class:`~celery_deactivate.models.TaskRuns` (finished runs
and final failures per task, per tenth of the window and per process: each process updates only
its own rows, so failures never queue on one row) and
:class:`~celery_deactivate.models.TaskFailure` (one row per task and object: the distinct objects,
the outage's victims, the pending digest).  Process clocks are assumed in sync (NTP).

Cost.  The success path runs no statement: runs and final failures are counted in memory alike
(:class:`~celery_deactivate.counts.Pending`) and written by the next run at least
:data:`FLUSH_EVERY` seconds after the last write (one ``UPDATE`` of the process's own row and a
read of the task's state), and when the process exits in order; there is no background thread.
A failure outside an outage adds a read of the task's state, the object's row in
``TaskFailure``, the distinct objects counted up to the threshold (then the sums of the window),
and after a deactivation a second read of the state; during an outage a failure costs a read,
and nothing on the object (less than a deactivation).  The guard off
(``deactivate_outage_objects=0``) and ``deactivate_notify_window=0`` add nothing at all.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from celery.signals import worker_process_shutdown, worker_shutdown
from django.apps import apps
from django.db import connections, transaction
from django.db.models import F, Q
from django.dispatch import Signal
from django.utils import timezone

from . import counts, notify, services, signals
from .conf import option_inputs, resolve
from .counts import FLUSH_EVERY, forget
from .exceptions import DeactivateConfigError
from .target import Target

if TYPE_CHECKING:
    from celery import Celery

    from .task import DeactivatingTask

logger = logging.getLogger("celery_deactivate")

#: The options the guard and the notices are resolved from.
GUARD_OPTIONS = (
    "deactivate_outage_objects",
    "deactivate_outage_rate",
    "deactivate_outage_min_runs",
    "deactivate_outage_window",
    "deactivate_notify_window",
    "deactivate_notify",
    "deactivate_notifier",
    "deactivate_site_url",
)


@dataclass(frozen=True)
class Guard:
    """The guard's and the notices' options of one task, resolved."""

    objects: int  # 0: the guard is off
    rate: float
    min_runs: int
    window: float
    notify_window: float
    notify: bool
    notifier: Any
    site_url: str | None

    @property
    def on(self) -> bool:
        return self.objects > 0

    @property
    def digests(self) -> bool:
        """Deactivations within a notice window wait for its digest."""
        return self.notify and self.notify_window > 0

    @property
    def records(self) -> bool:
        """The failure path writes the task's state at all."""
        return self.on or self.digests


_UNSET = object()


def guard_of(task: Any) -> Guard:
    """The task's :class:`Guard`, resolved again only when what it is resolved from changed."""
    changes = task.app.conf.changes
    inputs = (
        option_inputs(task, GUARD_OPTIONS),
        "deactivate_outage_objects" in changes,
    )
    memo = task.__dict__.get("_guard_memo")
    if memo is not None and memo[0] == inputs:
        guard: Guard = memo[1]
        return guard
    guard = Guard(
        objects=_objects(task),
        rate=resolve(task, "deactivate_outage_rate"),
        min_runs=resolve(task, "deactivate_outage_min_runs"),
        window=resolve(task, "deactivate_outage_window"),
        notify_window=resolve(task, "deactivate_notify_window"),
        notify=resolve(task, "deactivate_notify"),
        notifier=resolve(task, "deactivate_notifier"),
        site_url=resolve(task, "deactivate_site_url"),
    )
    if isinstance(task, type):
        return guard
    task._guard_memo = (inputs, guard)
    return guard


def _objects(task: Any) -> int:
    """``deactivate_outage_objects``; a worker-wide ``None`` (set, not merely unset) is 0: off."""
    name = "deactivate_outage_objects"
    if getattr(task, name, None) is None and task.app.conf.get(name, _UNSET) is None:
        return 0
    objects: int = resolve(task, name)
    return objects


def check(task: Any) -> None:
    """Resolve the options (``ImproperlyConfigured`` for a bad value) and, when they need the
    library's tables, check that ``celery_deactivate`` is an installed app."""
    guard = guard_of(task)
    if guard.records and apps.apps_ready and not apps.is_installed("celery_deactivate"):
        raise DeactivateConfigError(
            "the outage guard and the notice windows keep their state in the tables of the "
            "'celery_deactivate' app: add it to INSTALLED_APPS and migrate, or set "
            "deactivate_outage_objects=0 and deactivate_notify_window=0",
            task=task.name,
        )


# -- runs ------------------------------------------------------------------------------------


def ran(task: DeactivatingTask) -> None:
    """One finished run of ``task`` whose body succeeded: counted in memory.  Every
    :data:`FLUSH_EVERY` seconds the counts are written (and an open outage checked).  Never
    raises."""
    if counts.pending.add(task, failed=False):
        _write_counts(task)


def _write_counts(task: DeactivatingTask) -> None:
    """Write the runs and failures this process counted for ``task``; end its outage if it is
    over.  Never raises."""
    try:
        guard = guard_of(task)
        if not guard.on:
            counts.pending.take(task.name)  # nothing to write them for
            return
        using = counts.db()
        with counts.unit(using, None):
            runs, _ = counts.write_pending(task.name, guard.window, using)
            if not runs:
                return
            state = counts.read_state(task.name, using, create=False)
            if state is not None and state.outage_started_at is not None:
                _end_if_over(task, guard, state.outage_started_at, using)
    except Exception as error:
        logger.error(
            "celery_deactivate: %s: the outage guard could not write its run counts: %s",
            task.name,
            services.describe(error),
            exc_info=error,
        )


def write_counts_at_exit(**kwargs: Any) -> None:
    """Write what this process counted before it exits in order (a pool child recycled by
    ``--max-tasks-per-child``, a warm shutdown): connected to Celery's ``worker_process_shutdown``
    (sent in each prefork child) and ``worker_shutdown`` (the solo and thread pools)."""
    tasks = counts.pending.tasks_counted()
    for task in tasks:
        _write_counts(task)
    connection = connections[counts.db()]
    if tasks and not connection.in_atomic_block:
        connection.close()  # the process ends: leave no session open


worker_process_shutdown.connect(write_counts_at_exit, weak=False, dispatch_uid=__name__)
worker_shutdown.connect(write_counts_at_exit, weak=False, dispatch_uid=__name__)


# -- one failure --------------------------------------------------------------------------------


class Failure:
    """The guard's part in recording one final failure of ``task`` on the object ``pk``.

    :meth:`outage_open` runs first: during an outage the failure is counted for the task
    only (:meth:`during_outage`), unless it is a cool-down probe's.  Otherwise the failure is
    recorded on the object, :meth:`notify_now` decides whether its deactivation is notified now
    or in the digest, and :meth:`after` counts the failure and checks the guard.  None raises:
    an error of the guard is logged at ERROR and the failure is recorded (and notified) as
    without it.
    """

    def __init__(
        self,
        task: DeactivatingTask,
        target: Target,
        pk: Any,
        exc: BaseException,
        task_id: str | None,
        *,
        timeout: float | None = None,
    ) -> None:
        self.task = task
        self.name = task.name
        self.target = target
        self.pk = pk
        self.exc = exc
        self.task_id = task_id
        self.timeout = timeout
        self.guard = guard_of(task)
        self.state = counts.State(None, None, None)
        self.using = ""
        self.working = self.guard.records
        self.notified = True

    def outage_open(self) -> bool:
        """Whether an outage of the task is open.  Reads the task's state first, and sends a
        digest that is due."""
        if not self.working:
            return False
        try:
            self.using = counts.db()
            with counts.unit(self.using, self.timeout):
                state = counts.read_state(self.name, self.using, create=True)
                assert state is not None
                until = state.notify_until
                if until is not None and until <= timezone.now():
                    opened = send_digest(self.task, self.guard, until, self.using)
                    state = state._replace(notify_until=opened)
                self.state = state
        except Exception as error:
            self._broken(error, "read the task's state")
            return False
        return self.guard.on and self.state.outage_started_at is not None

    def during_outage(self) -> None:
        """Count the failure during the open outage for the task only (not on the object), and
        log it.  After :meth:`outage_open`."""
        try:
            with counts.unit(self.using, self.timeout):
                self._during_outage()
        except Exception as error:
            self._broken(error, "count the failure")

    def _during_outage(self) -> None:
        guard, using = self.guard, self.using
        started = self.state.outage_started_at
        assert started is not None
        due = counts.pending.add(self.task, failed=True)
        logger.info(
            "celery_deactivate: %s[%s] on %s: not deactivated nor counted against the object, "
            "the task has an outage since %s (%s)",
            self.name,
            self.task_id,
            self.target.identity(self.pk),
            started.isoformat(timespec="seconds"),
            services.describe(self.exc),
        )
        if due or self.timeout:  # the crash path writes at once: its process runs no task
            runs, failures = counts.write_pending(self.name, guard.window, using)
            if runs > failures:  # successes counted too: the outage may be over
                _end_if_over(self.task, guard, started, using)

    def notify_now(self, outcome: services.FailureOutcome) -> bool:
        """Whether to notify this deactivation now: the first of a quiet period (it opens a
        notice window), or every one without a window.  ``False``: it waits for the digest."""
        self.notified = True
        if not (self.working and outcome.deactivated and self.guard.digests):
            return True
        try:
            with counts.unit(self.using, self.timeout):
                self.notified = self._quiet(timezone.now())
        except Exception as error:
            self._broken(error, "open a notice window")
        return self.notified

    def after(self, outcome: services.FailureOutcome | None) -> bool:
        """Count the failure for the task, check the guard, keep the deferred notice (after
        :meth:`notify_now`).  Returns whether a deactivation is to be notified now: not when
        :meth:`notify_now` deferred it, nor when the outage this failure started re-activated
        the object at once; always when its notice could not be deferred."""
        if not self.working:
            return self.notified
        try:
            with counts.unit(self.using, self.timeout):
                reactivated = self._after(outcome)
        except Exception as error:
            self._broken(error, "count the failure")
            return True  # a deferred notice went with the rolled-back row: notify it now
        return self.notified and not reactivated

    def _after(self, outcome: services.FailureOutcome | None) -> bool:
        if outcome is not None and outcome.probed:
            # A cool-down probe of a deactivated object: not a run of the task on a live object,
            # so neither its failure nor its success counts toward an outage.
            return False
        guard, using, name = self.guard, self.using, self.name
        instance = outcome.instance if outcome is not None else None
        deactivated = instance is not None and outcome is not None and outcome.deactivated
        now = timezone.now()
        pending = deactivated and not self.notified
        if instance is not None and (guard.on or pending):
            self._mark(instance, now, deactivated=deactivated, pending=pending)
        if pending:
            # A window is open for the deferred notice, or one is made due now: whoever closed
            # the window this failure saw open (maintain, another process) before the row above
            # was written has not sent it; the next maintain run or failure will.
            from .models import TaskState

            TaskState.objects.using(using).filter(task=name, notify_until__isnull=True).update(
                notify_until=now
            )
        if guard.on and (
            counts.pending.add(self.task, failed=instance is not None) or self.timeout
        ):
            # Written with the process's other counts (the crash path at once: its process runs
            # no task); until then the guard judges them from memory (counts.sums).
            counts.write_pending(name, guard.window, using)
        if not guard.on or instance is None:
            return False
        opened = self._trip(now)
        if deactivated and (opened or _outage_open(name, using)):
            # Deactivated while an outage started: one of its victims.  The process that opened
            # it may not have seen this row yet; re-activating twice changes the row once.
            _reactivate(self.task, self.target, guard, [(str(instance.pk), None)], using)
            return True
        return False

    def _quiet(self, now: datetime) -> bool:
        """Claim the notice window if the period is quiet: then notify this one now."""
        from .models import TaskState

        if self.state.notify_until is None:
            window = timedelta(seconds=self.guard.notify_window)
            rows = TaskState.objects.using(self.using).filter(task=self.name)
            if rows.filter(notify_until__isnull=True).update(notify_until=now + window):
                return True
        logger.info(
            "celery_deactivate: %s deactivated by %s[%s]: notice deferred to the digest of the "
            "notice window",
            self.target.identity(self.pk),
            self.name,
            self.task_id,
        )
        return False

    def _mark(self, instance: Any, now: datetime, *, deactivated: bool, pending: bool) -> None:
        """Record the failure in ``TaskFailure`` (one row per task and object)."""
        failed = Deactivation(self.name, self.target, instance, self.exc, self.task_id)
        _mark(failed, now, self.using, deactivated=deactivated, pending=pending)

    def _trip(self, now: datetime) -> bool:
        """Start an outage if the guard's conditions hold; whether this call started it."""
        guard, using, name = self.guard, self.using, self.name
        since = now - timedelta(seconds=guard.window)
        ended = self.state.outage_ended_at
        if ended is not None and ended > since:
            since = ended  # after an outage, count afresh
        if counts.distinct(name, using, since, guard.objects) < guard.objects:
            return False
        runs, failures = counts.sums(name, guard.window, using, since)
        if runs < guard.min_runs:
            logger.info(
                "celery_deactivate: %s: %d of %d finished runs failed for good since %s, too few "
                "runs to judge (deactivate_outage_min_runs=%d): failing objects are deactivated "
                "one by one",
                name,
                failures,
                runs,
                since.isoformat(timespec="seconds"),
                guard.min_runs,
            )
            return False
        if failures < guard.rate * runs:
            logger.info(
                "celery_deactivate: %s: %d of %d finished runs failed for good since %s, below "
                "the outage rate %.0f%%: failing objects are deactivated one by one",
                name,
                failures,
                runs,
                since.isoformat(timespec="seconds"),
                guard.rate * 100,
            )
            return False
        return start_outage(self.task, guard, now, since, self.exc, using)

    def _broken(self, error: Exception, doing: str) -> None:
        self.working = False
        logger.error(
            "celery_deactivate: the outage guard of %s could not %s for %s (%s); the failure is "
            "recorded as without the guard",
            self.name,
            doing,
            self.target.identity(self.pk),
            services.describe(error),
            exc_info=error,
        )


@dataclass(frozen=True)
class Deactivation:
    """One object deactivated by a final failure of the task ``name``."""

    name: str
    target: Target
    instance: Any
    exc: BaseException
    task_id: str | None


def _mark(
    failed: Deactivation, now: datetime, using: str, *, deactivated: bool, pending: bool
) -> None:
    """Record a failure in ``TaskFailure`` (one row per task and object, an upsert)."""
    from .models import TaskFailure

    instance = failed.instance
    row = TaskFailure(task=failed.name, object_pk=str(instance.pk)[:255], failed_at=now)
    fields = ["failed_at"]
    if deactivated:
        field = failed.target.deactivated_at
        row.deactivated_at = getattr(instance, field) if field else now
        row.notice_pending = pending
        row.task_id = failed.task_id or ""
        row.error = services.format_error(failed.exc, None)
        row.traceback = notify.traceback_of(failed.exc).replace("\x00", "\ufffd")
        row.object_repr = notify.name_of(instance)
        fields += ["deactivated_at", "notice_pending", "task_id", "error", "traceback"]
        fields += ["object_repr"]
    TaskFailure.objects.using(using).bulk_create(
        [row], update_conflicts=True, unique_fields=["task", "object_pk"], update_fields=fields
    )


def _outage_open(name: str, using: str) -> bool:
    state = counts.read_state(name, using, create=False)
    return state is not None and state.outage_started_at is not None


# -- starting and ending an outage ------------------------------------------------------------


def start_outage(
    task: DeactivatingTask,
    guard: Guard,
    now: datetime,
    since: datetime,
    exc: BaseException | None,
    using: str,
) -> bool:
    """Open the task's outage unless one is open: ``outage_started`` (in the transaction), the
    victims re-activated, a WARNING, one notice after commit.  Whether this call opened it."""
    from .models import TaskState

    name, target = task.name, task.target
    runs, failures = counts.sums(name, guard.window, using, since)
    totals = {
        "runs": runs,
        "failures": failures,
        "objects": counts.distinct(name, using, since, None),
    }
    with transaction.atomic(using=using):
        rows = TaskState.objects.using(using).filter(task=name, outage_started_at__isnull=True)
        if not rows.update(outage_started_at=now):
            return False
        victims = _victims(name, since, using)
        reactivated = _reactivate(task, target, guard, victims, using)
        _send(
            signals.outage_started,
            task,
            started_at=now,
            counts=totals,
            exception=exc,
            reactivated=[instance for instance, _ in reactivated],
        )
    error = services.describe(exc)
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
        guard.objects,
        guard.rate * 100,
        len(reactivated),
        error,
    )
    if guard.notify:
        notice = notify.outage_started_notice(
            name,
            label=target.label,
            started_at=now,
            counts=totals,
            rate=guard.rate,
            window=guard.window,
            error=error,
            reactivated=[item for _, item in reactivated],
        )
        _notify_on_commit(task, guard, notice, using)
    return True


def _end_if_over(task: DeactivatingTask, guard: Guard, started: datetime, using: str) -> bool:
    """End the outage that started at ``started`` if the failure rate over the last window is
    below the rate (or the window had no failure); whether this call ended it."""
    from .models import TaskState

    name = task.name
    now = timezone.now()
    runs, failures = counts.sums(name, guard.window, using, now - timedelta(seconds=guard.window))
    if failures and failures >= guard.rate * runs:
        return False
    totals = {"runs": runs, "failures": failures}
    with transaction.atomic(using=using):
        rows = TaskState.objects.using(using).filter(task=name, outage_started_at=started)
        if not rows.update(outage_started_at=None, outage_ended_at=now):
            return False  # ended by another process
        _send(signals.outage_ended, task, started_at=started, ended_at=now, counts=totals)
    logger.warning(
        "celery_deactivate: outage of %s ended after %s: %d of %d finished runs failed for good "
        "in the last %g s, below %.0f%%; failures deactivate objects again",
        name,
        now - started,
        failures,
        runs,
        guard.window,
        guard.rate * 100,
    )
    if guard.notify:
        notice = notify.outage_ended_notice(
            name, started_at=started, ended_at=now, counts=totals, window=guard.window
        )
        _notify_on_commit(task, guard, notice, using)
    return True


def _victims(name: str, since: datetime, using: str) -> list[tuple[str, datetime | None]]:
    """``(pk as text, deactivated_at)`` of the objects the task deactivated since ``since``."""
    from .models import TaskFailure

    rows = TaskFailure.objects.using(using).filter(task=name, deactivated_at__gt=since)
    return list(rows.values_list("object_pk", "deactivated_at"))


def _reactivate(
    task: DeactivatingTask,
    target: Target,
    guard: Guard,
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
    fields = resolve(task, "deactivate_fields")
    model_db = services.db_for(target)
    wanted = {meta_pk.to_python(text): when for text, when in victims}
    reactivated = []
    for chunk in counts.chunks(list(wanted)):
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
            instance = services.reactivate(model, pk, fields=fields, using=model_db)
            if instance is None:
                continue
            logger.warning(
                "celery_deactivate: %s re-activated: deactivated by %s, a victim of its outage",
                target.identity(pk),
                task.name,
            )
            reactivated.append((instance, notify.object_of(instance, site_url=guard.site_url)))
    for chunk in counts.chunks([text for text, _ in victims]):
        TaskFailure.objects.using(using).filter(task=task.name, object_pk__in=chunk).update(
            deactivated_at=None, notice_pending=False
        )
    return reactivated


# -- digests --------------------------------------------------------------------------------------


def send_digest(
    task: DeactivatingTask, guard: Guard, until: datetime, using: str
) -> datetime | None:
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
        retry_at = now + timedelta(seconds=retry_delay(attempts, guard.notify_window))
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
        if not guard.notify:
            return _digest_sent(name, guard, keys, now, retry_at, using)
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
                url=notify.admin_url(target.model, pk, guard.site_url),
                deactivated_at=when,
                task_id=task_id or None,
            )
            for _, text_pk, text, error, tb, when, task_id in rows
        ]
        since = until - timedelta(seconds=guard.notify_window)
        notice = notify.digest_notice(name, items, since, now)
        transaction.on_commit(
            lambda: _deliver_digest(task, guard, notice, keys, now, retry_at, using), using=using
        )
    logger.info(
        "celery_deactivate: %s: digest of %d deactivation(s) of its notice window ending %s",
        name,
        len(rows),
        until.isoformat(timespec="seconds"),
    )
    return retry_at


#: Seconds before a notice the notifier could not deliver is tried again; doubled after each
#: failed try, up to the notice window.
RETRY_FIRST = 10.0


def retry_delay(attempts: int, window: float) -> float:
    """Seconds until the next try of a digest after ``attempts`` failed ones."""
    delay: float = min(RETRY_FIRST * 2.0 ** min(attempts, 32), max(window, RETRY_FIRST))
    return delay


def _deliver_digest(
    task: DeactivatingTask,
    guard: Guard,
    notice: notify.Notice,
    keys: list[int],
    claimed_at: datetime,
    retry_at: datetime,
    using: str,
) -> None:
    """After commit: deliver the digest, then mark its deactivations sent, or count the failed
    try (they stay pending: the digest is sent again at ``retry_at``)."""
    from .models import TaskState

    delivered = notify.deliver(guard.notifier, notice, task=task)
    try:
        if delivered:
            _digest_sent(task.name, guard, keys, claimed_at, retry_at, using)
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
            services.describe(error),
            exc_info=error,
        )


def _digest_sent(
    name: str,
    guard: Guard,
    keys: list[int],
    claimed_at: datetime,
    retry_at: datetime,
    using: str,
) -> datetime:
    """Mark the digest's deactivations sent (not those deactivated again since it was written)
    and open a new notice window; return its end."""
    from .models import TaskFailure, TaskState

    new_until = timezone.now() + timedelta(seconds=guard.notify_window)
    with transaction.atomic(using=using):
        for chunk in counts.chunks(keys):
            sent = TaskFailure.objects.using(using).filter(pk__in=chunk, notice_pending=True)
            sent.exclude(deactivated_at__gt=claimed_at).update(notice_pending=False)
        TaskState.objects.using(using).filter(task=name, notify_until=retry_at).update(
            notify_until=new_until, digest_attempts=0
        )
    return new_until


def defer_undelivered(failed: Deactivation, guard: Guard) -> bool:
    """A deactivation notice the notifier could not deliver waits for the next digest, tried
    again within :data:`RETRY_FIRST` seconds.  Whether it could be kept (only with notice
    windows: ``deactivate_notify_window`` > 0).  Never raises."""
    from .models import TaskState

    if not guard.digests:
        return False
    try:
        using = counts.db()
        now = timezone.now()
        retry_at = now + timedelta(seconds=RETRY_FIRST)
        with transaction.atomic(using=using):
            _mark(failed, now, using, deactivated=True, pending=True)
            state = TaskState.objects.using(using).filter(task=failed.name)
            state.update(digest_attempts=F("digest_attempts") + 1)
            later = Q(notify_until__isnull=True) | Q(notify_until__gt=retry_at)
            state.filter(later).update(notify_until=retry_at)
    except Exception as error:
        logger.error(
            "celery_deactivate: the undelivered notice of %s could not be kept for a retry: %s",
            failed.target.identity(failed.instance.pk),
            services.describe(error),
            exc_info=error,
        )
        return False
    logger.warning(
        "celery_deactivate: the notice of %s is sent again with the digest from %s",
        failed.target.identity(failed.instance.pk),
        retry_at.isoformat(timespec="seconds"),
    )
    return True


# -- maintenance ---------------------------------------------------------------------------------


def maintain(app: Celery) -> dict[str, int]:
    """For every task with a state row: end its outage if it is over, send its digest if due,
    delete counts no window needs any more.  What ``celery_deactivate.maintain`` runs."""
    from .models import TaskState
    from .task import DeactivatingTask

    using = counts.db()
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
            guard = guard_of(task)
            if started is not None and _end_if_over(task, guard, started, using):
                done["outages_ended"] += 1
            if until is not None and until <= timezone.now():
                opened = send_digest(task, guard, until, using)
                done["digests"] += int(opened is not None and opened != until)
            _prune(name, guard, using)
        except Exception as error:
            logger.error(
                "celery_deactivate.maintain: %s failed: %s",
                name,
                services.describe(error),
                exc_info=error,
            )
    logger.info(
        "celery_deactivate.maintain: %(tasks)d task(s), %(outages_ended)d outage(s) ended, "
        "%(digests)d digest(s) sent",
        done,
    )
    return done


def _prune(name: str, guard: Guard, using: str) -> None:
    from .models import TaskFailure, TaskRuns

    now = timezone.now()
    horizon = timedelta(seconds=2 * max(guard.window, guard.notify_window))
    TaskRuns.objects.using(using).filter(task=name, slot__lt=now - horizon).delete()
    TaskFailure.objects.using(using).filter(
        task=name, failed_at__lt=now - horizon, notice_pending=False
    ).delete()


# -- signals and notices ------------------------------------------------------------------------


def _send(signal: Signal, task: DeactivatingTask, **kwargs: Any) -> None:
    """Send an outage signal in the caller's transaction, as the object signals are."""
    services.send_in_savepoint(signal, task, counts.db(), task.name, **kwargs)


def _notify_on_commit(
    task: DeactivatingTask, guard: Guard, notice: notify.Notice, using: str
) -> None:
    notifier = guard.notifier
    transaction.on_commit(lambda: notify.deliver(notifier, notice, task=task), using=using)


def counts_now(task: DeactivatingTask) -> Mapping[str, int]:
    """The guard's counts of ``task`` over its last window, as the tables hold them (for
    operators and tests): ``runs``, ``failures``, ``objects``."""
    guard = guard_of(task)
    using = counts.db()
    since = timezone.now() - timedelta(seconds=guard.window)
    runs, failures = counts.sums(task.name, guard.window, using, since)
    return {
        "runs": runs,
        "failures": failures,
        "objects": counts.distinct(task.name, using, since, None),
    }


def outage_of(task: DeactivatingTask) -> datetime | None:
    """When the task's open outage started; ``None`` without one."""
    state = counts.read_state(task.name, counts.db(), create=False)
    return state.outage_started_at if state is not None else None


__all__ = [
    "FLUSH_EVERY",
    "Failure",
    "Guard",
    "check",
    "counts_now",
    "forget",
    "guard_of",
    "maintain",
    "outage_of",
    "ran",
    "send_digest",
    "start_outage",
]
