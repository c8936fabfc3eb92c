"""A task's options, resolved: one :class:`Options` object for one run of the task, or for one
of its failures.

Each option is read (:func:`celery_deactivate.conf.resolve`: per task, else the worker-wide
setting, else the default) when the run first uses it, and kept for the rest of that run: a
setting changed at run time, by assignment or in place, is seen by the next run, and a run reads
only what it uses (a success: the model's fields, ``deactivate_pass_object`` and
``deactivate_atomic``).  The only cache is :mod:`~celery_deactivate.conf`'s of coerced values.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Generic, TypeAlias, TypeVar, overload

from django.apps import apps

from .conf import ExceptionTypes, Notifier, resolve
from .exceptions import DeactivateConfigError
from .target import PROBE_ROLES, Target, resolve_target

#: A ``DeactivatingTask``, as the private modules name it: ``task.py`` imports them, so they do
#: not import it back, not even for annotations.
AnyTask: TypeAlias = Any

T = TypeVar("T")


class _Option(Generic[T]):
    """One option of :class:`Options`: resolved at its first read, then kept by the object."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __set_name__(self, owner: type, attribute: str) -> None:
        self.attribute = attribute

    @overload
    def __get__(self, options: None, owner: type) -> _Option[T]: ...

    @overload
    def __get__(self, options: Options, owner: type) -> T: ...

    def __get__(self, options: Options | None, owner: type) -> T | _Option[T]:
        if options is None:
            return self
        value: T = resolve(options.task, self.name)
        options.__dict__[self.attribute] = value  # kept: the next read is the attribute's
        return value


class Options:
    """The options of one task for one run (or one failure), resolved when first read.

    ``ImproperlyConfigured`` (:class:`~celery_deactivate.exceptions.DeactivateConfigError`)
    names the option, the model and the field when a value is wrong or the model lacks a field
    an option needs.
    """

    def __init__(self, task: AnyTask) -> None:
        self.task = task

    # -- the run -------------------------------------------------------------------------------
    pass_object: _Option[bool] = _Option("deactivate_pass_object")
    atomic: _Option[bool] = _Option("deactivate_atomic")
    crash_timeout: _Option[float] = _Option("deactivate_crash_timeout")

    @cached_property
    def target(self) -> Target:
        """The model and its fields by role (``model`` and ``deactivate_fields``)."""
        task = self.task
        fields = resolve(task, "deactivate_fields")
        return resolve_target(task.model, tuple(sorted(fields.items())), task.name)

    # -- a failure ------------------------------------------------------------------------------
    failure_types: _Option[ExceptionTypes] = _Option("deactivate_on")
    ignored_types: _Option[ExceptionTypes] = _Option("dont_deactivate_on")
    notify: _Option[bool] = _Option("deactivate_notify")
    notifier: _Option[Notifier] = _Option("deactivate_notifier")
    site_url: _Option[str | None] = _Option("deactivate_site_url")

    @cached_property
    def after(self) -> int:
        """``deactivate_after``: the consecutive final failures that deactivate."""
        after: int = resolve(self.task, "deactivate_after")
        target = self.target
        if after > 1 and not target.failure_count:
            raise DeactivateConfigError(
                f"deactivate_after={after} needs a failure counter, and {target.label} has no "
                "'failure_count' field (add one, or map the role with deactivate_fields)",
                task=self.task.name,
                model=target.label,
                field="failure_count",
            )
        return after

    def counts(self, exc: BaseException) -> bool:
        """Whether ``exc`` counts as a failure (``deactivate_on``, ``dont_deactivate_on``)."""
        return isinstance(exc, self.failure_types) and not isinstance(exc, self.ignored_types)

    @cached_property
    def probes(self) -> tuple[float, float] | None:
        """``(cooldown, cooldown_max)`` in seconds when cool-down probes are on, else ``None``."""
        cooldown: float | None = resolve(self.task, "deactivate_cooldown")
        if cooldown is None:
            return None
        target = self.target
        if not target.probes:
            missing = [role for role in PROBE_ROLES if getattr(target, role) is None]
            raise DeactivateConfigError(
                f"deactivate_cooldown needs the fields {', '.join(PROBE_ROLES)} on "
                f"{target.label}, which has no {', '.join(repr(m) for m in missing)} field "
                "(subclass DeactivatableModel, add them, or map the roles with "
                "deactivate_fields)",
                task=self.task.name,
                model=target.label,
                field=missing[0],
            )
        return cooldown, max(cooldown, resolve(self.task, "deactivate_cooldown_max"))

    # -- the outage guard and the notice windows -------------------------------------------------
    rate: _Option[float] = _Option("deactivate_outage_rate")
    min_runs: _Option[int] = _Option("deactivate_outage_min_runs")
    window: _Option[float] = _Option("deactivate_outage_window")
    notify_window: _Option[float] = _Option("deactivate_notify_window")

    @cached_property
    def objects(self) -> int:
        """``deactivate_outage_objects`` (0: the guard is off); a worker-wide ``None`` (set,
        not merely unset) is 0."""
        task, name = self.task, "deactivate_outage_objects"
        if getattr(task, name, None) is None and task.app.conf.get(name, _UNSET) is None:
            return 0
        objects: int = resolve(task, name)
        return objects

    @property
    def guard_on(self) -> bool:
        return self.objects > 0

    @property
    def digests(self) -> bool:
        """Deactivations within a notice window wait for its digest."""
        return self.notify and self.notify_window > 0

    @property
    def records(self) -> bool:
        """The failure path writes the task's state at all."""
        return self.guard_on or self.digests

    # -- all of them -------------------------------------------------------------------------------

    def check(self) -> None:
        """Resolve every option (``ImproperlyConfigured`` for a bad value or a missing field)
        and, when they need the library's tables, check that ``celery_deactivate`` is an
        installed app."""
        for name, value in vars(type(self)).items():
            if isinstance(value, _Option | cached_property):
                getattr(self, name)
        if self.records and apps.apps_ready and not apps.is_installed("celery_deactivate"):
            raise DeactivateConfigError(
                "the outage guard and the notice windows keep their state in the tables of the "
                "'celery_deactivate' app: add it to INSTALLED_APPS and migrate, or set "
                "deactivate_outage_objects=0 and deactivate_notify_window=0",
                task=self.task.name,
            )


_UNSET = object()
