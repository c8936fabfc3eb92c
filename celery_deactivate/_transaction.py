"""What runs in the transaction of a state change: the bound on how long its statements may
wait (:func:`bounded`), and the signals sent in it, in a savepoint (:func:`send_in_savepoint`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from django.db import DatabaseError, connections, router, transaction
from django.db.models import Model
from django.dispatch import Signal

from . import signals
from ._errors import describe
from .target import Target

logger = logging.getLogger("celery_deactivate")


@contextmanager
def bounded(using: str, seconds: float | None) -> Iterator[None]:
    """Bound how long the statements inside may wait for locks and run (called in a
    transaction).

    PostgreSQL: ``lock_timeout`` and ``statement_timeout`` for this transaction.  MySQL and
    MariaDB: :func:`_session_bounded`.  SQLite: nothing here, its bound is the connection's
    (:func:`bound_connection`).  Other backends: unbounded.
    """
    connection = connections[using]
    if not seconds or connection.vendor not in ("postgresql", "mysql"):
        yield
        return
    if connection.vendor == "mysql":
        with _session_bounded(connection, seconds):
            yield
        return
    millis = _millis(seconds)
    with connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL lock_timeout = {millis}")
        cursor.execute(f"SET LOCAL statement_timeout = {millis}")
    yield


def bound_connection(using: str, seconds: float) -> None:
    """Bound every lock wait of a connection of its own (the crash recording's, closed when it is
    done) on SQLite: its busy timeout, a setting of the connection, not of a transaction, which a
    ``BEGIN IMMEDIATE`` (``"transaction_mode": "IMMEDIATE"``) already waits under.  Other
    backends: nothing (:func:`bounded` bounds their waits in each transaction)."""
    connection = connections[using]
    if seconds and connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute(f"PRAGMA busy_timeout = {_millis(seconds)}")


def _millis(seconds: float) -> int:
    return max(int(seconds * 1000), 1)


@contextmanager
def _session_bounded(connection: Any, seconds: float) -> Iterator[None]:
    """MySQL and MariaDB have no per-transaction setting: the session's are set, and set back
    afterwards.  ``innodb_lock_wait_timeout`` bounds a row lock wait (whole seconds, at least
    1); a statement's run time is bounded by MariaDB's ``max_statement_time`` (seconds), MySQL's
    ``max_execution_time`` (milliseconds, ``SELECT`` only).  If the connection fails meanwhile,
    the bound stays on it until it is closed (the worker's crash handler closes its own)."""
    if connection.mysql_is_mariadb:
        statement, limit = "max_statement_time", seconds
    else:
        statement, limit = "max_execution_time", max(int(seconds * 1000), 1)
    lock_wait = max(math.ceil(seconds), 1)
    assign = f"SET SESSION innodb_lock_wait_timeout = %s, {statement} = %s"
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT @@SESSION.innodb_lock_wait_timeout, @@SESSION.{statement}")
        before = list(cursor.fetchone())
        cursor.execute(assign, [lock_wait, limit])
    try:
        yield
    finally:
        with suppress(DatabaseError), connection.cursor() as cursor:
            cursor.execute(assign, before)


#: Sent in a change's transaction, before the object's signal, to the library's own integrations
#: that are part of the change (django-celery-beat: :func:`celery_deactivate.beat.follow`), not
#: in a savepoint: an error rolls the change back.  Arguments: ``instance``, ``deactivated``.
changing = Signal()


class _ReceiversFailed(Exception):
    """Rolls back what the receivers of one signal wrote when one of them raised."""

    def __init__(self, failures: list[tuple[Any, BaseException]]) -> None:
        super().__init__(failures)
        self.failures = failures


def send(signal: Signal, target: Target, sender: Any, instance: Model, **kwargs: Any) -> None:
    """What follows an object's change, in its transaction: the object's periodic tasks follow
    a deactivation or a re-activation (:data:`changing`: part of the change), then ``signal`` is
    sent synchronously, like Django's model signals (:func:`send_in_savepoint`)."""
    if signal is not signals.failure_counted:
        deactivated = signal is signals.object_deactivated
        changing.send(sender, instance=instance, deactivated=deactivated)
    using = instance._state.db or router.db_for_write(target.model)
    about = target.identity(instance.pk)
    send_in_savepoint(signal, sender, using, about, instance=instance, **kwargs)


def send_in_savepoint(signal: Signal, sender: Any, using: str, about: str, **kwargs: Any) -> None:
    """Send ``signal`` in the caller's transaction on ``using``.

    Every receiver runs.  Their writes are in a savepoint: if one raises, the savepoint is rolled
    back (what the receivers wrote goes, the change that sent it stays) and each error is logged
    at ERROR with ``about`` (what the signal is about), never raised.
    """
    if not signal.has_listeners(sender):
        return
    try:
        with transaction.atomic(using=using):
            results = signal.send_robust(sender=sender, **kwargs)
            failures = [(r, e) for r, e in results if isinstance(e, BaseException)]
            if failures:
                raise _ReceiversFailed(failures)
    except _ReceiversFailed as failed:
        for receiver, error in failed.failures:
            logger.error(
                "celery_deactivate: receiver %r of %s raised for %s: %s",
                receiver,
                SIGNAL_NAMES.get(signal, repr(signal)),
                about,
                describe(error),
                exc_info=error,
            )


SIGNAL_NAMES = {
    signals.object_deactivated: "object_deactivated",
    signals.object_reactivated: "object_reactivated",
    signals.failure_counted: "failure_counted",
    signals.outage_started: "outage_started",
    signals.outage_ended: "outage_ended",
}
