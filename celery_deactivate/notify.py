"""Notifiers: called once per deactivation when ``deactivate_notify`` is on.

A notifier is any callable accepting the keyword arguments ``task``, ``instance``, ``exception``
and ``task_id`` (and ``**kwargs`` for arguments added later).  Set it with the
``deactivate_notifier`` option; an exception it raises is logged, never raised over the task's.
"""

from __future__ import annotations

from typing import Any

from django.core import mail
from django.db.models import Model

from .services import describe


def mail_admins(
    *,
    task: Any,
    instance: Model,
    exception: BaseException | None,
    task_id: str | None,
    **kwargs: Any,
) -> None:
    """Mail the site admins (``settings.ADMINS``) that ``instance`` was deactivated."""
    label = instance._meta.label
    subject = f"{label} {instance} deactivated after a task failure"
    lines = [
        f"The task {getattr(task, 'name', task)}[{task_id}] failed on {label} pk={instance.pk!r}",
        f"({instance}), which is now deactivated: it is not scheduled until reactivated.",
        "",
        describe(exception),
    ]
    mail.mail_admins(subject, "\n".join(lines), fail_silently=False)
