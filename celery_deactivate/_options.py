"""A task's options, resolved: the failure options (:class:`FailurePolicy`), the cool-down
probes' (:func:`probe_policy`), the outage guard's and the notice windows' (:class:`Guard`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

from django.apps import apps

from .conf import ExceptionTypes, Notifier, option_inputs, resolve
from .exceptions import DeactivateConfigError
from .target import PROBE_ROLES, Target


@dataclass(frozen=True)
class FailurePolicy:
    """The failure options of one task, resolved."""

    after: int
    on: ExceptionTypes
    dont_on: ExceptionTypes
    notify: bool
    notifier: Notifier

    def counts(self, exc: BaseException) -> bool:
        return isinstance(exc, self.on) and not isinstance(exc, self.dont_on)


def failure_policy(task: Any, target: Target) -> FailurePolicy:
    """The task's :class:`FailurePolicy`; ``ImproperlyConfigured`` for a count without a field."""
    after = resolve(task, "deactivate_after")
    if after > 1 and not target.failure_count:
        raise DeactivateConfigError(
            f"deactivate_after={after} needs a failure counter, and {target.label} has no "
            "'failure_count' field (add one, or map the role with deactivate_fields)",
            task=task.name,
            model=target.label,
            field="failure_count",
        )
    return FailurePolicy(
        after=after,
        on=resolve(task, "deactivate_on"),
        dont_on=resolve(task, "dont_deactivate_on"),
        notify=resolve(task, "deactivate_notify"),
        notifier=resolve(task, "deactivate_notifier"),
    )


def probe_policy(task: Any, target: Target) -> tuple[float, float] | None:
    """``(cooldown, cooldown_max)`` in seconds when cool-down probes are on, else ``None``;
    ``ImproperlyConfigured`` when the model lacks a probe field."""
    cooldown = resolve(task, "deactivate_cooldown")
    if cooldown is None:
        return None
    if not target.probes:
        missing = [role for role in PROBE_ROLES if getattr(target, role) is None]
        raise DeactivateConfigError(
            f"deactivate_cooldown needs the fields {', '.join(PROBE_ROLES)} on "
            f"{target.label}, which has no {', '.join(repr(m) for m in missing)} field "
            "(subclass DeactivatableModel, add them, or map the roles with "
            "deactivate_fields)",
            task=task.name,
            model=target.label,
            field=missing[0],
        )
    return cooldown, max(cooldown, resolve(task, "deactivate_cooldown_max"))


#: A ``DeactivatingTask``, as the private modules name it: ``task.py`` imports them, so they do
#: not import it back, not even for annotations.
AnyTask: TypeAlias = Any

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
