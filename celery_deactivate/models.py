"""``DeactivatableModel``: an abstract model with every field a deactivating task records."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar, cast

from django.db import models

from ._history import CAUSES, KINDS

__all__ = [
    "DeactivatableModel",
    "DeactivatableQuerySet",
    "HistoryEvent",
    "PausedSchedule",
    "TaskFailure",
    "TaskRuns",
    "TaskState",
    "TaskStatus",
]

_M = TypeVar("_M", bound=models.Model)


class DeactivatableQuerySet(models.QuerySet[_M]):
    def active(self) -> DeactivatableQuerySet[_M]:
        """Objects a scheduler may pick."""
        return cast("DeactivatableQuerySet[_M]", self.filter(active=True))

    def deactivated(self) -> DeactivatableQuerySet[_M]:
        """Objects taken out of scheduling (by a failure or by hand)."""
        return cast("DeactivatableQuerySet[_M]", self.filter(active=False))


if TYPE_CHECKING:
    DeactivatableManager = models.Manager
else:
    DeactivatableManager = models.Manager.from_queryset(DeactivatableQuerySet)


class DeactivatableModel(models.Model):
    """Adds every field a deactivating task records.

    ``active``, ``error``, ``error_message``, ``deactivated_at`` and ``failure_count``; and for
    cool-down probes (``deactivate_cooldown``) ``next_probe_at``, ``cooldown`` and
    ``probing_since``.  ``objects`` is a manager with ``active()`` and ``deactivated()``; it
    returns every row, as Django's default manager does.
    """

    active = models.BooleanField(default=True, db_index=True)
    error = models.BooleanField(default=False)
    error_message = models.TextField(blank=True, default="")
    deactivated_at = models.DateTimeField(null=True, blank=True)
    failure_count = models.PositiveIntegerField(default=0)
    #: When the next cool-down probe is due (``None``: no probe, e.g. deactivated by hand).
    next_probe_at = models.DateTimeField(null=True, blank=True, db_index=True)
    #: The current cool-down in seconds: doubled by every failed probe, up to the maximum.
    cooldown = models.FloatField(null=True, blank=True)
    #: Since when a probe is out (``None``: none is).
    probing_since = models.DateTimeField(null=True, blank=True)

    objects = DeactivatableManager()

    class Meta:
        abstract = True

    def deactivate(
        self, error: BaseException | type[BaseException] | str | bool | None = None
    ) -> bool:
        """Take this object out of scheduling, by hand or for an ``error`` (an exception or its
        class, a message, or ``True``): the same service function as the task (targeted update,
        :data:`~celery_deactivate.signals.object_deactivated`).  Returns whether it changed.

        An object a failure deactivated keeps its error, but its cool-down probes are turned off
        (a probe scheduled is not sent, one out does not re-activate it): that is a change, and
        nothing is sent.  Any other inactive object is left as it is."""
        from .services import deactivate

        reason: BaseException | str | None
        if isinstance(error, type):
            reason = error.__qualname__
        elif error is True:
            reason = "deactivated by error"
        else:
            reason = error or None
        changed = deactivate(type(self), self.pk, exception=reason, using=self._state.db)
        return self._take(changed)

    def reactivate(self) -> bool:
        """Make this object active again: error cleared, failure count 0, no probe; sends
        :data:`~celery_deactivate.signals.object_reactivated`.  Returns whether it changed; an
        active object is left as it is and nothing is sent."""
        from .services import reactivate

        return self._take(reactivate(type(self), self.pk, using=self._state.db))

    def _take(self, changed: models.Model | None) -> bool:
        """Copy the fields of the changed row onto this instance."""
        if changed is None:
            return False
        for field in self._meta.concrete_fields:
            setattr(self, field.attname, getattr(changed, field.attname))
        return True


class PausedSchedule(models.Model):
    """A django-celery-beat ``PeriodicTask`` the library disabled when its object was
    deactivated, to re-enable it when the object is re-activated (:mod:`celery_deactivate.beat`).

    ``periodic_task_id`` is the row's id, not a foreign key: this app does not depend on
    django-celery-beat being installed.
    """

    periodic_task_id = models.BigIntegerField(unique=True)
    model = models.CharField(max_length=200)
    object_pk = models.CharField(max_length=255)
    paused_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = (models.Index(fields=("model", "object_pk"), name="celery_deac_paused_object"),)

    def __str__(self) -> str:
        return f"periodic task {self.periodic_task_id} of {self.model} pk={self.object_pk}"


# -- the library's own tables: the outage guard and the notice windows (issue #12) -------------
#
# Shared by every worker process on every machine through the database.  Written by the
# library's private ``_guard`` and ``_notices`` modules; read them, never write them by hand.


class TaskState(models.Model):
    """One row per deactivating task: whether an outage is open, and its notice window."""

    task = models.CharField(max_length=255, unique=True)
    #: When the open outage started (``None``: no outage).
    outage_started_at = models.DateTimeField(null=True, blank=True)
    #: When the last outage ended: the guard counts only failures after it (hysteresis).
    outage_ended_at = models.DateTimeField(null=True, blank=True)
    #: End of the current notice window (``None``: a quiet period, the next deactivation is
    #: notified at once); deactivations within it wait for the digest sent when it ends.
    notify_until = models.DateTimeField(null=True, blank=True)
    #: Tries of the pending notices that the notifier failed since the last delivered one: the
    #: next try waits the longer (``celery_deactivate._notices.retry_delay``).
    digest_attempts = models.PositiveIntegerField(default=0)

    class Meta:
        verbose_name = "task state"

    def __str__(self) -> str:
        return self.task


class TaskRuns(models.Model):
    """How many runs of a task finished, and how many failed for good, per time slot (a tenth of
    ``deactivate_outage_window``) and per worker process.

    Each process writes its own rows only, so failures never queue for one row; the guard sums the
    rows of the last window.
    """

    task = models.CharField(max_length=255)
    #: Start of the slot.
    slot = models.DateTimeField()
    #: ``host:pid`` of the process that counted them.
    process = models.CharField(max_length=255)
    runs = models.PositiveBigIntegerField(default=0)
    failures = models.PositiveBigIntegerField(default=0)

    class Meta:
        verbose_name = "task runs"
        verbose_name_plural = "task runs"
        constraints = (
            models.UniqueConstraint(
                fields=("task", "slot", "process"), name="celery_deactivate_runs_unique"
            ),
        )
        indexes = (models.Index(fields=("task", "slot"), name="celery_deactivate_runs_slot"),)

    def __str__(self) -> str:
        return f"{self.task} {self.slot:%Y-%m-%d %H:%M:%S} {self.process}"


class TaskFailure(models.Model):
    """The last final failure of a task on one object: the distinct objects the guard counts, the
    objects an outage re-activates, and the deactivations a digest lists."""

    task = models.CharField(max_length=255)
    #: The object's primary key, as text.
    object_pk = models.CharField(max_length=255)
    #: ``str()`` of the object when it was deactivated.
    object_repr = models.CharField(max_length=200, blank=True, default="")
    failed_at = models.DateTimeField()
    #: The object's ``deactivated_at`` as this task's failure wrote it (``None``: not deactivated
    #: by it, or re-activated by an outage since).
    deactivated_at = models.DateTimeField(null=True, blank=True)
    #: The deactivation waits for the digest of the current notice window.
    notice_pending = models.BooleanField(default=False)
    task_id = models.CharField(max_length=255, blank=True, default="")
    error = models.TextField(blank=True, default="")
    #: The innermost frames of the traceback.
    traceback = models.TextField(blank=True, default="")

    class Meta:
        verbose_name = "task failure"
        constraints = (
            models.UniqueConstraint(
                fields=("task", "object_pk"), name="celery_deactivate_failure_unique"
            ),
        )
        indexes = (
            models.Index(fields=("task", "failed_at"), name="celery_deactivate_failure_at"),
            # The deactivations a digest lists.  A plain index, not a partial one: MySQL and
            # MariaDB have no partial index (models.W037 on migrate and check).
            models.Index(fields=("task", "notice_pending"), name="celery_deactivate_notice"),
        )

    def __str__(self) -> str:
        return f"{self.task} pk={self.object_pk}"


# -- the operators' view (issue #20) --------------------------------------------------------------


class HistoryEvent(models.Model):
    """One change of an object's state, or of its task's (an outage): the history operators
    read on the admin change page and with ``manage.py deactivated MODEL PK --history``.

    Written by the library's private ``_history`` module, one ``INSERT`` in the transaction of
    the change it records (rolled back with it); kept ``deactivate_history_days`` days, pruned
    by ``celery_deactivate.maintain``.  Read it, never write it by hand.
    """

    at = models.DateTimeField()
    #: ``app_label.Model`` of the object (its concrete model); of the task's model for an outage.
    model = models.CharField(max_length=200)
    #: The object's primary key, as text (``""``: an outage, an event of the task).
    object_pk = models.CharField(max_length=255, blank=True, default="")
    #: What happened: ``_history.KINDS``.
    kind = models.CharField(max_length=20, choices=list(KINDS.items()))
    #: Why: ``_history.CAUSES`` (a failure, by hand, a probe, the outage guard).
    cause = models.CharField(max_length=20, choices=list(CAUSES.items()))
    task = models.CharField(max_length=255, blank=True, default="")
    task_id = models.CharField(max_length=255, blank=True, default="")
    #: Who did it by hand: the admin user's username, ``"command"`` (``manage.py deactivated``).
    actor = models.CharField(max_length=150, blank=True, default="")
    #: The admin user's primary key, as text.
    actor_id = models.CharField(max_length=255, blank=True, default="")
    #: The error, at most ``celery_deactivate._history.ERROR_LENGTH`` (1,000) characters.
    error = models.TextField(blank=True, default="")

    class Meta:
        verbose_name = "history event"
        ordering = ("-at", "-id")
        indexes = (
            # An object's history, newest first.
            models.Index(fields=("model", "object_pk", "at"), name="celery_deac_history_object"),
            # A model's events per hour (the status page's chart).
            models.Index(fields=("model", "at"), name="celery_deac_history_model"),
            # Pruning by age.
            models.Index(fields=("at",), name="celery_deac_history_at"),
        )

    def __str__(self) -> str:
        about = f"{self.model} pk={self.object_pk}" if self.object_pk else self.task
        return f"{about} {self.get_kind_display()} {self.get_cause_display()}"


class TaskStatus(TaskState):
    """The admin's status page of the deactivating tasks (``celery_deactivate.admin``): a proxy,
    so that the page has its place, its URL and its permissions in the admin; no table."""

    class Meta:
        proxy = True
        verbose_name = "task status"
        verbose_name_plural = "task status"
