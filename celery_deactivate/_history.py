"""Each object's history: one :class:`~celery_deactivate.models.HistoryEvent` row per change of
its state, written by :func:`record`, and read back by the admin, the command and the status page.

Every state change calls :func:`record` once, inside its own transaction, after the change and
before its signal: one ``INSERT``, rolled back with the change.  The success path writes nothing.
Who did it is a :class:`By`: the library's own causes (a failure, a probe, the outage guard, each
with its task), or, for :func:`services.deactivate <celery_deactivate.services.deactivate>` and
:func:`~celery_deactivate.services.reactivate`, their ``by=`` keyword: a user (the admin's
``request.user``) or a text (``"command"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any, Literal

from django.apps import apps
from django.db import router
from django.db.models import Model, QuerySet
from django.utils import timezone

from . import _charset, _errors
from .states import Cause as StateCause

#: Characters of an error an event keeps (its head, ending with "…").
ERROR_LENGTH = 1000

Kind = Literal[
    "deactivated",
    "reactivated",
    "probes_off",
    "probe_sent",
    "probe_failed",
    "outage_started",
    "outage_ended",
]
Cause = Literal["failure", "hand", "probe", "outage"]

#: What happened (``HistoryEvent.kind``), with the words the admin and the command show.
KINDS: dict[str, str] = {
    "deactivated": "deactivated",
    "reactivated": "re-activated",
    "probes_off": "probes turned off",
    "probe_sent": "probe sent",
    "probe_failed": "probe failed",
    "outage_started": "outage started",
    "outage_ended": "outage ended",
}

#: Why (``HistoryEvent.cause``): a final failure of the task, a person or a program by hand
#: (``actor``: the admin user, ``"command"``; empty: code that did not say), a cool-down probe,
#: the outage guard.
CAUSES: dict[str, str] = {
    "failure": "by a failure",
    "hand": "by hand",
    "probe": "by a probe",
    "outage": "by the outage guard",
}

#: Rows deleted per statement when the history is pruned, and statements per prune.
PRUNE_BATCH = 1000
PRUNE_BATCHES = 10


@dataclass(frozen=True)
class By:
    """Who or what made a change: ``cause`` (``HistoryEvent.Cause``), the task and its id, or the
    person."""

    cause: Cause
    task: str = ""
    task_id: str = ""
    actor: str = ""
    actor_id: str = ""

    @classmethod
    def of(cls, by: Any) -> By:
        """``by=`` of a service function: a :class:`By`, a user, a text, or ``None``."""
        if isinstance(by, By):
            return by
        if by is None:
            return cls("hand")
        if isinstance(by, str):
            return cls("hand", actor=by[:150])
        username = by.get_username() if hasattr(by, "get_username") else str(by)
        return cls("hand", actor=str(username)[:150], actor_id=str(getattr(by, "pk", "") or ""))

    @property
    def source(self) -> str:
        """The :class:`~celery_deactivate.states.Cause` the metrics count the change by: the
        library's own causes as they are; by hand, the admin (a user), the command, or code."""
        if self.cause != "hand":
            return self.cause
        if self.actor_id:
            return StateCause.ADMIN
        return StateCause.COMMAND if self.actor == "command" else StateCause.CODE

    @classmethod
    def run(cls, cause: Cause, task: Any, task_id: str | None) -> By:
        """A change by a run of ``task`` (a failure, a probe)."""
        return cls(cause, task=str(getattr(task, "name", "") or "")[:255], task_id=task_id or "")


def events() -> type[Model]:
    """The model :class:`~celery_deactivate.models.HistoryEvent`, looked up in Django's app
    registry: ``models`` imports the services (``instance.deactivate()``), which call
    :func:`record`."""
    return apps.get_model("celery_deactivate", "HistoryEvent")


def label_of(model: type[Model]) -> str:
    """The ``app_label.Model`` an object's events name: its concrete model's, so that a proxy
    and its model share one history."""
    concrete = model._meta.concrete_model or model
    return concrete._meta.label


def record(
    using: str,
    model: type[Model],
    pk: Any,
    kind: Kind,
    by: By,
    error: BaseException | str | None = None,
) -> None:
    """Record one event, with one ``INSERT`` on ``using`` (the change's database, in its
    transaction).  ``pk`` ``None``: an event of the task (an outage)."""
    HistoryEvent = events()
    text = error if isinstance(error, str) else _errors.describe(error) if error else ""
    texts = {
        "error": _errors.cut(text.replace("\x00", "\ufffd"), ERROR_LENGTH),
        "actor": by.actor,
        "task": by.task,
    }
    event = HistoryEvent(
        at=timezone.now(),
        model=label_of(model),
        object_pk="" if pk is None else str(pk)[:255],
        kind=kind,
        cause=by.cause,
        task_id=by.task_id[:255],
        actor_id=by.actor_id[:255],
        **_charset.storable(HistoryEvent, texts, using),
    )
    event.save(using=using, force_insert=True)


# -- reads ----------------------------------------------------------------------------------------


def of_object(model: type[Model], pk: Any) -> QuerySet[Any]:
    """The events of one object, newest first, from the database its changes are written to."""
    HistoryEvent = events()
    rows: QuerySet[Any] = HistoryEvent._default_manager.using(router.db_for_write(model))
    mine: QuerySet[Any] = rows.filter(model=label_of(model), object_pk=str(pk))
    newest_first: QuerySet[Any] = mine.order_by("-at", "-id")
    return newest_first


def per_hour(model: type[Model], now: datetime, hours: int) -> dict[str, dict[datetime, int]]:
    """Deactivations and re-activations of ``model``'s objects per hour (the start of each hour,
    UTC) over the last ``hours`` hours: ``{kind: {hour: count}}``.  One query of the events'
    times, counted here (no database's date functions: MySQL's need its time zone tables)."""
    HistoryEvent = events()
    since = first_hour(now, hours)
    kinds = ("deactivated", "reactivated")
    counts: dict[str, dict[datetime, int]] = {kind: {} for kind in kinds}
    rows = HistoryEvent._default_manager.using(router.db_for_write(model)).filter(
        model=label_of(model), at__gte=since, object_pk__gt="", kind__in=kinds
    )
    for at, kind in rows.values_list("at", "kind").iterator(chunk_size=2000):
        hour = _hour(at)
        counts[kind][hour] = counts[kind].get(hour, 0) + 1
    return counts


def first_hour(now: datetime, hours: int) -> datetime:
    """The start (UTC) of the first of the last ``hours`` hours, the current one included."""
    return _hour(now) - timedelta(hours=hours - 1)


def _hour(moment: datetime) -> datetime:
    return moment.astimezone(dt_timezone.utc).replace(minute=0, second=0, microsecond=0)


# -- in words -------------------------------------------------------------------------------------


def who(event: Any) -> str:
    """``tests.tasks.poll[0f8e…]``, ``alice``, ``command``; the task alone for an outage."""
    if event.task:
        return f"{event.task}[{event.task_id}]" if event.task_id else str(event.task)
    return str(event.actor)


def what(event: Any) -> str:
    """``deactivated by a failure``, ``re-activated by hand``, ``probe sent``."""
    kind = KINDS.get(event.kind, str(event.kind))
    if event.kind in ("deactivated", "reactivated", "probes_off"):
        return f"{kind} {CAUSES.get(event.cause, event.cause)}"
    return kind


# -- pruning --------------------------------------------------------------------------------------


def prune(using: str, days: float, *, now: datetime | None = None) -> int:
    """Delete the events older than ``days`` days on ``using``, the oldest first: at most
    :data:`PRUNE_BATCHES` statements of at most :data:`PRUNE_BATCH` rows each; how many went.
    The rest waits for the next run.

    A batch is the ids of the :data:`PRUNE_BATCH` oldest events (by id), deleted by their range
    (two parameters, whatever the batch's size: SQLite's limit on parameters never bites)."""
    HistoryEvent = events()
    old = HistoryEvent._default_manager.using(using).filter(
        at__lt=(now or timezone.now()) - timedelta(days=days)
    )
    deleted = 0
    for _ in range(PRUNE_BATCHES):
        ids = list(old.order_by("id").values_list("id", flat=True)[:PRUNE_BATCH])
        if not ids:
            break
        count, _ = old.filter(id__gte=ids[0], id__lte=ids[-1]).delete()
        deleted += count
        if len(ids) < PRUNE_BATCH:
            break
    return deleted
