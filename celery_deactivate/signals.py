"""Signals sent by celery-deactivate.  Each is sent only when a row really changed.

Like Django's model signals they are sent synchronously, inside the transaction that made the
change (before it commits): a receiver's writes commit or roll back with it.  Put what leaves the
process in ``transaction.on_commit()``.  The receivers of one sending run in a savepoint: when one
raises, what they wrote is rolled back, the error is logged and the change stays.
"""

from __future__ import annotations

from django.dispatch import Signal

__all__ = [
    "failure_counted",
    "object_deactivated",
    "object_reactivated",
    "outage_ended",
    "outage_started",
]

#: Sent once per deactivation, after the row was written, in the same transaction.
#:
#: sender: the task (a :class:`~celery_deactivate.DeactivatingTask` instance) or, for a manual
#:     deactivation (admin action, management command), the model class.
#: instance: the model instance, read after the change.
#: exception: the exception that caused it (``None`` for a manual deactivation).
#: task_id: the failed task's id (``None`` for a manual deactivation).
#: failure_count: the consecutive failure count after the change (``None`` without the field).
object_deactivated = Signal()

#: Sent when a deactivated object is made active again (admin action, management command,
#: :func:`celery_deactivate.services.reactivate`).
#:
#: sender: the model class.
#: instance: the model instance, read after the change.
object_reactivated = Signal()

#: Sent for every final failure that was counted but did not (yet) deactivate the object.
#:
#: sender: the task.
#: instance: the model instance, read after the change.
#: exception: the exception that failed the task.
#: task_id: the failed task's id.
#: failure_count: the consecutive failure count after the change.
failure_counted = Signal()

#: Sent once when an outage of a task starts (the outage guard): in the transaction that opens
#: it, after its victims were re-activated.
#:
#: sender: the task.
#: started_at: when it started.
#: counts: ``{"runs", "failures", "objects"}`` over the window (finished runs, final failures,
#:     distinct failing objects).
#: exception: the failure that tripped the guard.
#: reactivated: the instances re-activated (each also sent ``object_reactivated``).
outage_started = Signal()

#: Sent once when the outage of a task ends, in the transaction that closes it.
#:
#: sender: the task.
#: started_at: when the outage started.
#: ended_at: when it ended.
#: counts: ``{"runs", "failures"}`` over the last window.
outage_ended = Signal()
