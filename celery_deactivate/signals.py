"""Signals sent by celery-deactivate.  Each is sent only when a row really changed."""

from __future__ import annotations

from django.dispatch import Signal

#: Sent once per deactivation, after the row was written (and committed, outside a transaction).
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
