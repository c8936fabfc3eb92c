"""The outage guard's and the notice windows' options of a task, resolved (:class:`Guard`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.apps import apps

from .conf import option_inputs, resolve
from .exceptions import DeactivateConfigError

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
