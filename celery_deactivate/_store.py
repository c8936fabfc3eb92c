"""The library's tables, read and written, and the runs each process counts in memory before
writing them: the state the outage guard and the notice windows share between processes.

* ``TaskState``: one row per task, read by every failure, written only on transitions.
* ``TaskRuns``: finished runs and final failures per task, per slot (a tenth of the window, at
  least a second) and per process (``host:pid``).  A process adds only to its own row of the
  current slot, so two processes never wait for one row; a sum over a window reads a few dozen
  rows (slots × processes) whatever the number of failures.
* ``TaskFailure``: one row per task and object, written with one upsert.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from django.db import IntegrityError, connections, router, transaction
from django.db.models import Exists, F, QuerySet, Subquery, Sum
from django.utils import timezone

from . import _charset, _errors, _transaction, notify
from .target import Target

#: Seconds between two writes of the runs a process counted in memory, per task.
FLUSH_EVERY = 2.0
#: A window is counted in this many slots (a tenth each, at least a second).
SLOTS = 10
#: Rows changed per statement when a list of keys is long (SQLite's parameter limit).
CHUNK = 500


def slot_of(window: float, when: datetime) -> datetime:
    """The start of the slot ``when`` falls in, for a window of ``window`` seconds."""
    width = max(window / SLOTS, 1.0)
    stamp = when.timestamp()
    return datetime.fromtimestamp(stamp - stamp % width, tz=when.tzinfo)


def db() -> str:
    """The database of the library's tables (the router's choice for them)."""
    from .models import TaskState

    return router.db_for_write(TaskState)


class Pending:
    """Finished runs and final failures counted in this process, per task and slot, not yet
    written.

    Both are written on the same schedule (every :data:`FLUSH_EVERY` seconds, and when the
    process exits in order), so the rows of every process lag alike: the rate the guard judges
    compares like with like, and a process killed before it wrote (SIGKILL, the OOM killer) loses
    successes and failures alike, which biases the rate neither way.  Each count keeps the second it
    fell in, so counts that wait (an idle process) still age out of the window.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: Task name -> second (its start) -> [runs, failures].
        self.counts: dict[str, dict[datetime, list[int]]] = {}
        self.written: dict[str, float] = {}
        #: Task name -> the task, for the writes when the process exits.
        self.tasks: dict[str, Any] = {}

    def add(self, task: Any, *, failed: bool) -> bool:
        """Count one finished run of ``task`` (``failed``: a final failure); whether it is time
        to write them."""
        now = time.monotonic()
        second = timezone.now().replace(microsecond=0)
        name = task.name
        with self.lock:
            counted = self.counts.setdefault(name, {}).setdefault(second, [0, 0])
            counted[0] += 1
            counted[1] += int(failed)
            self.tasks[name] = task
            written = self.written.setdefault(name, now)
        return now - written >= FLUSH_EVERY

    def peek(self, name: str, since: datetime) -> tuple[int, int]:
        """``(runs, failures)`` counted and not written, from ``since`` on."""
        with self.lock:
            seconds = list(self.counts.get(name, {}).items())
        recent = [counted for second, counted in seconds if second >= since]
        return sum(c[0] for c in recent), sum(c[1] for c in recent)

    def take(self, name: str) -> list[tuple[datetime, int, int]]:
        """``(second, runs, failures)`` counted, to be written now (no longer held here)."""
        with self.lock:
            self.written[name] = time.monotonic()
            seconds = self.counts.pop(name, {})
        return [(second, runs, failures) for second, (runs, failures) in sorted(seconds.items())]

    def tasks_counted(self) -> list[Any]:
        """The tasks with counts not written."""
        with self.lock:
            return [self.tasks[name] for name in self.counts]

    def clear(self) -> None:
        with self.lock:
            self.counts.clear()
            self.written.clear()
            self.tasks.clear()

    def forked(self) -> None:
        """In a forked child: nothing counted, and a lock of its own (the parent's may have been
        held by a thread the child does not have)."""
        self.__init__()  # type: ignore[misc]


pending = Pending()
if hasattr(os, "register_at_fork"):  # a pool child starts with nothing counted
    os.register_at_fork(after_in_child=pending.forked)


def forget() -> None:
    """Drop the counts this process has not written (tests: the tables were emptied)."""
    pending.clear()


_process: tuple[int, str] = (0, "")


def process_key() -> str:
    """``host:pid`` of this process: the key of the rows it counts in."""
    global _process
    pid = os.getpid()
    if _process[0] != pid:
        _process = (pid, f"{socket.gethostname()}:{pid}"[-255:])
    return _process[1]


class State(NamedTuple):
    """A task's ``TaskState`` row."""

    outage_started_at: datetime | None
    outage_ended_at: datetime | None
    notify_until: datetime | None


def read_state(name: str, using: str, *, create: bool) -> State | None:
    from .models import TaskState

    rows = TaskState.objects.using(using).filter(task=name)
    found = rows.values_list("outage_started_at", "outage_ended_at", "notify_until")[:1]
    for row in found:
        return State(*row)
    if not create:
        return None
    TaskState.objects.using(using).bulk_create([TaskState(task=name)], ignore_conflicts=True)
    return State(None, None, None)


def write_pending(name: str, window: float, using: str) -> tuple[int, int]:
    """Write what this process counted for the task (:class:`Pending`) into its own rows, one per
    slot; return the ``(runs, failures)`` written."""
    slots: dict[datetime, list[int]] = {}
    for second, runs, failures in pending.take(name):
        counted = slots.setdefault(slot_of(window, second), [0, 0])
        counted[0] += runs
        counted[1] += failures
    for slot, (runs, failures) in slots.items():
        _add(name, window, slot, using, runs=runs, failures=failures)
    return sum(c[0] for c in slots.values()), sum(c[1] for c in slots.values())


def _add(name: str, window: float, slot: datetime, using: str, *, runs: int, failures: int) -> None:
    """Add to this process's row of ``slot``: one ``UPDATE``, an ``INSERT`` (and the removal of
    its rows older than two windows) once per slot."""
    from .models import TaskRuns

    process = process_key()
    table = TaskRuns.objects.using(using)
    row = table.filter(task=name, slot=slot, process=process)
    if row.update(runs=F("runs") + runs, failures=F("failures") + failures):
        return
    try:
        with savepoint(using):
            table.create(task=name, slot=slot, process=process, runs=runs, failures=failures)
    except IntegrityError:  # another thread of this process created it
        row.update(runs=F("runs") + runs, failures=F("failures") + failures)
        return
    old = timezone.now() - timedelta(seconds=2 * window)
    table.filter(task=name, process=process, slot__lt=old).delete()


def _runs_since(name: str, window: float, since: datetime) -> QuerySet[Any]:
    """The task's ``TaskRuns`` rows of the slots from the one holding ``since`` on."""
    from .models import TaskRuns

    rows: QuerySet[Any] = TaskRuns.objects.filter(task=name, slot__gte=slot_of(window, since))
    return rows


def _failed_since(name: str, since: datetime) -> QuerySet[Any]:
    """The task's ``TaskFailure`` rows (one per object) of final failures after ``since``."""
    from .models import TaskFailure

    rows: QuerySet[Any] = TaskFailure.objects.filter(task=name, failed_at__gt=since)
    return rows


def _with_pending(
    name: str, window: float, since: datetime, runs: int | None, failures: int | None
) -> tuple[int, int]:
    """Written sums (``None``: no row) plus what this process counted and has not written."""
    unwritten_runs, unwritten_failures = pending.peek(name, slot_of(window, since))
    return int(runs or 0) + unwritten_runs, int(failures or 0) + unwritten_failures


def sums(name: str, window: float, using: str, since: datetime) -> tuple[int, int]:
    """``(runs, failures)`` of the task since ``since`` (rounded down to the start of its slot):
    what every process wrote, plus what this one counted and has not written yet."""
    totals = (
        _runs_since(name, window, since)
        .using(using)
        .aggregate(runs=Sum("runs"), failures=Sum("failures"))
    )
    return _with_pending(name, window, since, totals["runs"], totals["failures"])


class Verdict(NamedTuple):
    """What the outage guard judges a failure by, once the failure committed."""

    #: When the task's open outage started (another process may have opened it meanwhile).
    outage_started_at: datetime | None
    #: Whether the threshold of distinct objects failed since the window's start.
    objects_reached: bool
    runs: int
    failures: int


def verdict(name: str, window: float, using: str, since: datetime, objects: int) -> Verdict:
    """The task's open outage, whether at least ``objects`` distinct objects had a final failure
    after ``since`` (:func:`distinct`), and the ``(runs, failures)`` since then (:func:`sums`,
    with what this process has not written yet): one ``SELECT`` of the task's state row, the
    counts as its subqueries."""
    from .models import TaskState

    counted = _runs_since(name, window, since).order_by().values("task")
    rows = (
        TaskState.objects.using(using)
        .filter(task=name)
        .annotate(
            # the threshold's row exists
            objects_reached=Exists(_failed_since(name, since).order_by()[objects - 1 : objects]),
            runs_sum=Subquery(counted.annotate(total=Sum("runs")).values("total")),
            failures_sum=Subquery(counted.annotate(total=Sum("failures")).values("total")),
        )
        .values_list("outage_started_at", "objects_reached", "runs_sum", "failures_sum")
    )
    started, reached, written_runs, written_failures = next(iter(rows), (None, False, 0, 0))
    runs, failures = _with_pending(name, window, since, written_runs, written_failures)
    return Verdict(started, bool(reached), runs, failures)


def distinct(name: str, using: str, since: datetime, at_most: int | None) -> int:
    """Distinct objects with a final failure after ``since``, counted up to ``at_most``."""
    rows = _failed_since(name, since).using(using)
    counted: int = rows[:at_most].count() if at_most is not None else rows.count()
    return counted


@contextmanager
def savepoint(using: str) -> Iterator[None]:
    """A savepoint in a transaction, so that an error leaves it usable; nothing in autocommit."""
    with transaction.atomic(using=using) if connections[using].in_atomic_block else nullcontext():
        yield


@contextmanager
def unit(using: str, timeout: float | None) -> Iterator[None]:
    """The guard's statements of one failure: in autocommit (each its own transaction), in a
    savepoint inside someone else's transaction, or, bounded by ``timeout`` (the crash path of
    the worker's main process), in a transaction of their own."""
    if timeout:
        with transaction.atomic(using=using), _transaction.bounded(using, timeout):
            yield
    else:
        with savepoint(using):
            yield


def chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


@dataclass(frozen=True)
class Failure:
    """A final failure of the task ``name`` on an object (``instance``, as the change left it)."""

    name: str
    target: Target
    instance: Any
    exc: BaseException
    task_id: str | None


def mark_failure(
    failed: Failure, now: datetime, using: str, *, deactivated: bool, pending: bool
) -> None:
    """Record a failure in ``TaskFailure`` (one row per task and object, an upsert).

    One ``INSERT ... ON CONFLICT (task, object_pk) DO UPDATE`` on PostgreSQL and SQLite, one
    ``INSERT ... ON DUPLICATE KEY UPDATE`` on MySQL and MariaDB: Django's ``bulk_create()`` takes
    the conflict's ``unique_fields`` only where the database names a conflict target (MySQL's
    upsert fires on any unique key, and ``(task, object_pk)`` is the table's only one besides
    the primary key, which an insert never repeats)."""
    from .models import TaskFailure

    instance = failed.instance
    row = TaskFailure(task=failed.name, object_pk=str(instance.pk)[:255], failed_at=now)
    fields = ["failed_at"]
    if deactivated:
        field = failed.target.deactivated_at
        row.deactivated_at = getattr(instance, field) if field else now
        row.notice_pending = pending
        row.task_id = failed.task_id or ""
        row.error = _errors.format_error(failed.exc, None)
        row.traceback = notify.traceback_of(failed.exc).replace("\x00", "\ufffd")
        row.object_repr = notify.name_of(instance)
        fields += ["deactivated_at", "notice_pending", "task_id", "error", "traceback"]
        fields += ["object_repr"]
    target = ["task", "object_pk"]
    if not connections[using].features.supports_update_conflicts_with_target:
        target = []  # MySQL, MariaDB: ON DUPLICATE KEY UPDATE, whichever unique key conflicts
    texts = {name: getattr(row, name) for name in ("error", "traceback", "object_repr")}
    for name, text in _charset.storable(TaskFailure, texts, using).items():
        setattr(row, name, text)
    TaskFailure.objects.using(using).bulk_create(
        [row], update_conflicts=True, unique_fields=target or None, update_fields=fields
    )
