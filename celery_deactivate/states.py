"""The states an object is in, and what changes them: one vocabulary for every tool.

The admin (the state column and filter), ``manage.py deactivated`` (its table and ``--json``),
the metrics and the other operators' views name an object's state with :class:`State` and a
change's cause with :class:`Cause`, so the same object has the same name everywhere.

An object's state follows from the fields the library records (named by role, see
``deactivate_fields``), by these rules, in this order:

- *active*: its active flag is set;
- *probing*: inactive, a cool-down probe is in flight (``probing_since`` is set);
- *deactivated by error*: inactive, its error flag set (a failure did it, or a deactivation by
  hand that gave an error); a cool-down probe may be scheduled for it: :func:`detail` says
  "probe at 14:05";
- *deactivated by hand*: inactive without error (the admin, or ``deactivate()`` without an
  error);
- *deactivated*: inactive, for a model that records no error flag.

:func:`state_of` gives one object's state, :func:`condition` the ``Q`` of the objects in a
state (for ``filter()`` and ``Count(filter=...)``), :func:`states` the states a model can show.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from django.db import models
from django.utils import timezone
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from .target import Target

if TYPE_CHECKING:
    from django_stubs_ext import StrOrPromise
    from typing_extensions import Self

__all__ = ["Cause", "State", "condition", "describe", "detail", "state_of", "states"]


class _Named(str, Enum):
    """A member is its key (a ``str``: stored, in URLs and JSON) and has a ``label``, its name for
    people (translated when shown).  As Django's ``TextChoices``, which mypy cannot type here."""

    _value_: str
    label: StrOrPromise

    def __new__(cls, value: str, label: StrOrPromise) -> Self:
        member = str.__new__(cls, value)
        member._value_ = value
        member.label = label
        return member

    def __str__(self) -> str:
        return self._value_

    @classmethod
    def choices(cls) -> list[tuple[str, StrOrPromise]]:
        """``(key, label)`` pairs, as a model field's ``choices`` takes them."""
        return [(member.value, member.label) for member in cls]


class State(_Named):
    """An object's state: the value is its key (the admin filter's ``?deactivation=error``,
    the command's ``"state"`` in JSON), the label its name for people."""

    ACTIVE = "active", _("active")
    BY_ERROR = "error", _("deactivated by error")
    BY_HAND = "hand", _("deactivated by hand")
    #: For a model that records no error flag: inactive, for whatever reason.
    DEACTIVATED = "deactivated", _("deactivated")
    #: A cool-down probe is in flight: the object may be active again in a moment.
    PROBING = "probing", _("probing")


class Cause(_Named):
    """What changed an object's state (the ``cause`` of :mod:`celery_deactivate.services`'
    changes, the metrics' ``celery_deactivate.cause``)."""

    #: A final failure of a deactivating task (or a crash of its worker child).
    FAILURE = "failure", _("a failure")
    #: A cool-down probe that succeeded.
    PROBE = "probe", _("a probe")
    #: The outage guard, re-activating the first victims of an outage.
    OUTAGE = "outage", _("the outage guard")
    #: An action of the admin.
    ADMIN = "admin", _("the admin")
    #: ``manage.py deactivated``.
    COMMAND = "command", _("the command")
    #: A call of the services or of the model's ``deactivate()``/``reactivate()`` in code.
    CODE = "code", _("code")


@lru_cache(maxsize=256)
def states(target: Target) -> tuple[State, ...]:
    """The states the target's objects can be in, in the order the admin's filter lists
    them."""
    deactivated = (State.BY_ERROR, State.BY_HAND) if target.error else (State.DEACTIVATED,)
    probing = (State.PROBING,) if target.probes else ()
    return (State.ACTIVE, *deactivated, *probing)


def condition(target: Target, state: State) -> models.Q:
    """The objects of the target in ``state``, as a ``Q`` (the rules of :func:`state_of`)."""
    if state is State.ACTIVE:
        return models.Q(**{target.active: True})
    inactive = models.Q(**{target.active: False})
    probing = models.Q(**{f"{target.probing_since}__isnull": False}) if target.probes else None
    if state is State.PROBING:
        if probing is None:
            return models.Q(pk__in=[])
        return inactive & probing
    if probing is not None:
        inactive &= ~probing
    if state is State.DEACTIVATED:
        return inactive if target.error is None else models.Q(pk__in=[])
    if target.error is None:
        return models.Q(pk__in=[])
    return inactive & models.Q(**{target.error: state is State.BY_ERROR})


def state_of(target: Target, obj: Any) -> State:
    """The state of one object (a model instance, or anything with its fields as
    attributes)."""
    if getattr(obj, target.active):
        return State.ACTIVE
    if target.probes and getattr(obj, str(target.probing_since)) is not None:
        return State.PROBING
    if target.error is None:
        return State.DEACTIVATED
    return State.BY_ERROR if getattr(obj, target.error) else State.BY_HAND


def detail(target: Target, obj: Any, *, now: datetime | None = None) -> str:
    """What the state's name leaves out: ``"probe at 14:05"`` for an object deactivated by
    error with a cool-down probe scheduled, ``"since 14:03"`` for one probing; ``""``
    otherwise.  Times in the current time zone, with the date when it is not today's."""
    if not target.probes or getattr(obj, target.active):
        return ""
    since = getattr(obj, str(target.probing_since))
    if since is not None:
        return gettext("since %(time)s") % {"time": _clock(since, now)}
    due = getattr(obj, str(target.next_probe_at))
    if due is not None:
        return gettext("probe at %(time)s") % {"time": _clock(due, now)}
    return ""


def describe(target: Target, obj: Any, *, now: datetime | None = None) -> str:
    """The state's name and its :func:`detail`: ``"deactivated by error (probe at 14:05)"``."""
    name = str(state_of(target, obj).label)
    extra = detail(target, obj, now=now)
    return f"{name} ({extra})" if extra else name


def _clock(moment: datetime, now: datetime | None) -> str:
    """``14:05`` on the current day, ``2026-03-15 14:05`` on another (the current time
    zone)."""
    if timezone.is_aware(moment):
        moment = timezone.localtime(moment)
        today = timezone.localdate(now)
    else:
        today = (now or datetime.now()).date()
    if moment.date() == today:
        return moment.strftime("%H:%M")
    return moment.strftime("%Y-%m-%d %H:%M")
